//! The I/O engines on their own: EOF handling, big and concurrent transfers.

use std::fs::OpenOptions;
use std::io;
use std::sync::Arc;
use std::thread;

use rbd_backend::{EngineKind, IoEngine, UringEngine};
use testkit::backends::for_each_engine;
use testkit::{pattern, scratch_dir, Rng};

fn scratch_file(dir: &tempfile::TempDir, len: usize) -> std::fs::File {
    let p = dir.path().join("e.img");
    std::fs::write(&p, pattern(4, len)).expect("create");
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("open")
}

#[test]
fn reads_stop_at_end_of_file() {
    for_each_engine(|e| {
        let dir = scratch_dir!();
        let f = scratch_file(&dir, 10_000);
        let mut buf = vec![0u8; 4096];
        let n = e.read_upto(&f, 9000, &mut buf).expect("read_upto");
        assert_eq!(n, 1000, "{:?}", e.kind());
        assert!(buf[..1000] == pattern(4, 10_000)[9000..]);
        assert_eq!(e.read_upto(&f, 20_000, &mut buf).expect("past eof"), 0);
        let err = e
            .read_at(&f, 9000, &mut buf)
            .expect_err("short read is an error");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        e.read_at(&f, 5000, &mut buf).expect("full read");
        assert!(buf == pattern(4, 10_000)[5000..9096]);
    });
}

#[test]
fn huge_offsets_are_refused_not_wrapped() {
    for_each_engine(|e| {
        let dir = scratch_dir!();
        let f = scratch_file(&dir, 4096);
        let mut buf = [0u8; 16];
        // u64::MAX would mean "current file position" to io_uring.
        for off in [u64::MAX, u64::MAX - 8, 1 << 63] {
            let err = e.read_at(&f, off, &mut buf).expect_err("refused");
            assert!(
                matches!(err.kind(), io::ErrorKind::InvalidInput)
                    || err.raw_os_error() == Some(libc::EINVAL),
                "{:?}: {err}",
                e.kind()
            );
            assert!(e.write_at(&f, off, &buf).is_err());
        }
        assert_eq!(
            std::fs::metadata(dir.path().join("e.img"))
                .expect("stat")
                .len(),
            4096
        );
    });
}

#[test]
fn big_transfer_and_fdatasync() {
    for_each_engine(|e| {
        let dir = scratch_dir!();
        let f = scratch_file(&dir, 0);
        let data = Rng::new(3).bytes(9 << 20);
        e.write_at(&f, 12_345, &data).expect("write");
        e.fdatasync(&f).expect("fdatasync");
        let mut back = vec![0u8; data.len()];
        e.read_at(&f, 12_345, &mut back).expect("read");
        assert!(back == data, "{:?}", e.kind());
    });
}

/// A tiny ring (2 SQ entries, 4 CQ entries) under 16 threads: exercises the
/// in-flight limit and full-SQ handling; every byte must land where it was sent.
#[test]
fn tiny_ring_many_threads() {
    let e: Arc<dyn IoEngine> = match UringEngine::with_entries(2) {
        Ok(u) => Arc::new(u),
        Err(err) => {
            eprintln!("SKIP: io_uring unavailable: {err}");
            return;
        }
    };
    assert_eq!(e.kind(), EngineKind::Uring);
    let dir = scratch_dir!();
    let f = Arc::new(scratch_file(&dir, 0));
    const T: usize = 16;
    const CHUNK: usize = 8192;
    const ROUNDS: usize = 40;
    let handles: Vec<_> = (0..T)
        .map(|t| {
            let (e, f) = (Arc::clone(&e), Arc::clone(&f));
            thread::spawn(move || {
                let mut rng = Rng::new(t as u64);
                for r in 0..ROUNDS {
                    let off = ((r * T + t) * CHUNK) as u64;
                    let data = rng.bytes(CHUNK);
                    e.write_at(&f, off, &data).expect("write");
                    let mut back = vec![0u8; CHUNK];
                    e.read_at(&f, off, &mut back).expect("read");
                    assert!(back == data);
                    if r % 10 == 0 {
                        e.fdatasync(&f).expect("sync");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker");
    }
    assert_eq!(
        f.metadata().expect("stat").len(),
        (T * ROUNDS * CHUNK) as u64
    );
}
