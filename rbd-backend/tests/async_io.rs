//! The asynchronous data path of the backends, on an event loop: every file setup
//! (engine x O_DIRECT), aligned and unaligned requests, concurrency on one loop,
//! and the fault injector's delays and stalls without blocking the loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rbd_backend::aio::{self, DmaBuf};
use rbd_backend::{BlockIo, FaultyBackend, MemBackend, OpKind, WriteMode};
use testkit::backends::{for_each_file_setup, make_file};
use testkit::{pattern, scratch_dir};

const MIB: usize = 1 << 20;

#[test]
fn reads_and_writes_round_trip_on_every_file_setup() {
    for_each_file_setup(|s| {
        let dir = scratch_dir!();
        let path = make_file(&dir, "a.img", &vec![0u8; 4 * MIB]);
        let b = s.open(&path);
        aio::block_on(async {
            // Aligned (ring), then a misaligned one (the blocking path on the loop).
            for (off, len, seed) in [
                (8192u64, 128 * 1024, 3u8),
                (MIB as u64 + 512 * 3, 4096 * 3 + 512, 4),
            ] {
                let src = DmaBuf::copy_of(&pattern(seed.into(), len));
                b.write_async(off, src.slice_all(), WriteMode::Normal)
                    .await
                    .expect("write");
                let mut dst = DmaBuf::new(len);
                b.read_async(off, dst.slice_all()).await.expect("read");
                let got = dst.bytes_mut().unwrap();
                let want = pattern(seed.into(), len);
                let bad = got.iter().zip(&want).position(|(a, b)| a != b);
                assert!(
                    bad.is_none(),
                    "{}: {off}+{len} differs from byte {bad:?}",
                    s.label()
                );
            }
            b.write_async(
                0,
                DmaBuf::copy_of(&[7u8; 4096]).slice_all(),
                WriteMode::Durable,
            )
            .await
            .expect("durable write");
            b.flush_async().await.expect("flush");
        })
        .unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[..4096] == [7u8; 4096][..], "{}", s.label());
        assert!(
            on_disk[8192..8192 + 128 * 1024] == pattern(3, 128 * 1024)[..],
            "{}",
            s.label()
        );
    });
}

#[test]
fn requests_past_the_end_are_refused() {
    let b = MemBackend::new(MIB);
    let r = aio::block_on(async {
        b.read_async(MIB as u64 - 512, DmaBuf::new(4096).slice_all())
            .await
    })
    .unwrap();
    assert!(r.is_err());
}

#[test]
fn many_requests_run_concurrently_on_one_loop() {
    for_each_file_setup(|s| {
        let dir = scratch_dir!();
        let path = make_file(&dir, "c.img", &pattern(5, 4 * MIB));
        let b = Arc::new(s.open(&path));
        aio::block_on(async {
            let mut tasks = Vec::new();
            for i in 0..64u64 {
                let b = Arc::clone(&b);
                tasks.push(
                    aio::spawn(async move {
                        let mut d = DmaBuf::new(4096);
                        b.read_async(i * 65536, d.slice_all()).await.unwrap();
                        d.bytes_mut().unwrap()[..8].to_vec()
                    })
                    .unwrap(),
                );
            }
            let want = pattern(5, 4 * MIB);
            for (i, t) in tasks.into_iter().enumerate() {
                let off = i * 65536;
                assert_eq!(t.await, want[off..off + 8].to_vec());
            }
        })
        .unwrap();
    });
}

#[test]
fn injected_delays_overlap_instead_of_blocking_the_loop() {
    let b = Arc::new(
        FaultyBackend::builder(MemBackend::new(MIB))
            .read_delay(Duration::from_millis(50))
            .build(),
    );
    let t = Instant::now();
    aio::block_on(async {
        let tasks: Vec<_> = (0..10u64)
            .map(|i| {
                let b = Arc::clone(&b);
                aio::spawn(
                    async move { b.read_async(i * 4096, DmaBuf::new(4096).slice_all()).await },
                )
                .unwrap()
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    })
    .unwrap();
    // Ten 50 ms reads in parallel: far less than their sum.
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(b.stats().reads, 10);
}

#[test]
fn a_stalled_op_waits_on_the_loop_until_released() {
    let b = Arc::new(FaultyBackend::new(MemBackend::new(MIB)));
    b.stall();
    let b2 = Arc::clone(&b);
    let th = std::thread::spawn(move || {
        assert!(b2.wait_for_stalled(1, Duration::from_secs(5)));
        b2.release();
    });
    aio::block_on(async {
        b.write_async(
            0,
            DmaBuf::copy_of(&[1u8; 512]).slice_all(),
            WriteMode::Normal,
        )
        .await
        .unwrap();
    })
    .unwrap();
    th.join().unwrap();
    assert_eq!(b.stats().writes, 1);
    assert_eq!(b.stats().injected_failures, 0);
    let _ = OpKind::Read;
}
