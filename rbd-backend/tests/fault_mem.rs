//! MemBackend and FaultyBackend: the test doubles other crates build on.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rbd_backend::{Backend, BlockIo, ErrorKind, FaultyBackend, MemBackend, OpKind};

#[test]
fn delays_slow_down_only_their_kind() {
    let f = FaultyBackend::builder(MemBackend::new(1 << 20))
        .read_delay(Duration::from_millis(2))
        .build();
    let mut b = [0u8; 512];
    let t = Instant::now();
    for _ in 0..10 {
        f.read_at(0, &mut b).expect("read");
    }
    assert!(
        t.elapsed() >= Duration::from_millis(20),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    for _ in 0..10 {
        f.write_at(0, &b).expect("write");
    }
    assert!(
        t.elapsed() < Duration::from_millis(20),
        "writes not delayed"
    );

    // 1 ms + up to 1 ms jitter: the "slow backend" of the benchmarks.
    let slow = FaultyBackend::builder(MemBackend::new(4096))
        .all_delay(Duration::from_millis(1))
        .all_jitter(Duration::from_millis(1))
        .build();
    let t = Instant::now();
    for _ in 0..20 {
        slow.write_at(0, &b).expect("write");
    }
    let el = t.elapsed();
    assert!(
        el >= Duration::from_millis(20) && el < Duration::from_secs(5),
        "{el:?}"
    );
}

#[test]
fn bandwidth_is_shared_by_reads_and_writes_from_every_thread() {
    // 4 MB/s: 8 ops of 64 KiB from two threads are 512 KiB, so at least 131 ms
    // on the link whatever their order (a lower bound: sleeping never ends early).
    let f = Arc::new(
        FaultyBackend::builder(MemBackend::new(4 << 20))
            .bandwidth(4_000_000)
            .build(),
    );
    assert_eq!(f.bandwidth(), 4_000_000);
    let t = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let f = Arc::clone(&f);
            thread::spawn(move || {
                let mut b = vec![0u8; 64 << 10];
                for _ in 0..4 {
                    if i == 0 {
                        f.read_at(0, &mut b).expect("read");
                    } else {
                        f.write_at(0, &b).expect("write");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let el = t.elapsed();
    assert!(el >= Duration::from_millis(131), "{el:?}");
    // Lifted: the link no longer waits (4 MiB would take over a second on it).
    f.set_bandwidth(0);
    let t = Instant::now();
    let mut b = vec![0u8; 4 << 20];
    f.read_at(0, &mut b).expect("read");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(f.stats().bytes_read, (4 << 16) + (4 << 20));
}

#[test]
fn fail_next_and_read_only() {
    let mem = Arc::new(MemBackend::new(8192));
    let f = FaultyBackend::new(Arc::clone(&mem));
    f.fail_next(OpKind::Write, 2, libc::EIO);
    for _ in 0..2 {
        let e = f.write_at(0, &[1u8; 512]).expect_err("injected");
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.errno(), libc::EIO);
    }
    f.write_at(0, &[1u8; 512]).expect("third write passes");
    assert!(mem.snapshot()[..512].iter().all(|&x| x == 1));
    f.read_at(0, &mut [0u8; 512]).expect("reads unaffected");

    f.fail_next(OpKind::Flush, 1, libc::ETIMEDOUT);
    assert_eq!(f.flush().expect_err("flush").kind(), ErrorKind::Timeout);
    f.flush().expect("flush passes");

    f.set_read_only(true);
    for r in [
        f.write_at(0, &[2u8; 512]),
        f.discard(0, 512),
        f.write_zeroes(0, 512),
    ] {
        let e = r.expect_err("read-only");
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert_eq!(e.errno(), libc::EROFS);
    }
    f.read_at(0, &mut [0u8; 512]).expect("reads still work");
    f.flush().expect("flush still works");
    f.set_read_only(false);
    f.write_at(512, &[3u8; 512]).expect("writable again");
    assert!(
        mem.snapshot()[..512].iter().all(|&x| x == 1),
        "refused writes changed nothing"
    );

    let s = f.stats();
    assert_eq!(s.writes, 2);
    assert_eq!(s.bytes_written, 1024);
    assert_eq!(s.reads, 2);
    assert_eq!(s.flushes, 2);
    assert_eq!(s.injected_failures, 2 + 1 + 3);
    f.reset_stats();
    assert_eq!(f.stats(), Default::default());
}

#[test]
fn stall_blocks_until_release() {
    let f = Arc::new(FaultyBackend::new(MemBackend::new(4096)));
    f.stall();
    let workers: Vec<_> = (0..3)
        .map(|i| {
            let f = Arc::clone(&f);
            thread::spawn(move || f.write_at(i * 512, &[9u8; 512]))
        })
        .collect();
    assert!(
        f.wait_for_stalled(3, Duration::from_secs(10)),
        "ops did not stall"
    );
    thread::sleep(Duration::from_millis(20));
    assert!(
        workers.iter().all(|w| !w.is_finished()),
        "stalled ops completed"
    );
    assert_eq!(f.stats().writes, 0);
    f.release();
    for w in workers {
        w.join().expect("join").expect("write after release");
    }
    assert_eq!(f.stalled_ops(), 0);
    assert_eq!(f.stats().writes, 3);
    assert!(!f.wait_for_stalled(1, Duration::from_millis(10)));
}

#[test]
fn wrapper_forwards_geometry_and_identity() {
    let mem = MemBackend::builder()
        .size(1 << 16)
        .block_size(4096)
        .name("m1")
        .fingerprint("fp")
        .build();
    let f = FaultyBackend::new(mem);
    assert_eq!(f.size(), 1 << 16);
    assert_eq!(f.block_size(), 4096);
    assert_eq!(f.identity().name, "m1");
    assert_eq!(f.identity().fingerprint, "fp");
    let marker = |b: &dyn Backend| {
        b.change_tracking()
            .map(|t| t.change_marker().expect("marker"))
    };
    assert!(
        marker(&f).is_some(),
        "the inner backend's change tracking is forwarded"
    );
    assert_eq!(marker(&f), marker(f.inner()), "forwarded");
    assert!(
        f.exclusive_lock().is_none(),
        "mem has no lock, and the wrapper adds none"
    );
    assert!(
        f.resize_watch().is_none(),
        "mem is never resized under a server"
    );
    let boxed: Box<dyn Backend> = Box::new(f);
    assert_eq!(boxed.size(), 1 << 16);
    boxed.write_zeroes(0, 4096).expect("zeroes");
    let e = boxed.read_at(1 << 16, &mut [0u8; 1]).expect_err("range");
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
}

#[test]
fn two_backends_can_share_one_link() {
    // 4 MB/s shared: 256 KiB through each of two backends is 512 KiB on the
    // one link, at least 131 ms; each alone on its own link would need 65 ms.
    let a = FaultyBackend::builder(MemBackend::new(1 << 20))
        .bandwidth(4_000_000)
        .build();
    let b = FaultyBackend::builder(MemBackend::new(1 << 20))
        .share_link_with(&a)
        .build();
    assert_eq!(b.bandwidth(), 4_000_000, "the rate is the shared link's");
    let t = Instant::now();
    let buf = vec![0u8; 256 << 10];
    a.write_at(0, &buf).expect("write a");
    b.write_at(0, &buf).expect("write b");
    let el = t.elapsed();
    assert!(el >= Duration::from_millis(131), "{el:?}");
    // Lifting it on one lifts it for both.
    b.set_bandwidth(0);
    assert_eq!(a.bandwidth(), 0);
}
