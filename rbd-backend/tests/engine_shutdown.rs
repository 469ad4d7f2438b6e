//! Dropping a UringEngine joins its reaper thread. Alone in its own test binary so
//! that no other test's threads are counted.

use std::fs;
use std::io::Write;

use rbd_backend::{IoEngine, UringEngine};

fn reaper_threads() -> usize {
    fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim() == "uring-reaper")
        .count()
}

#[test]
fn drop_joins_the_reaper() {
    let mut f = tempfile::tempfile().expect("tempfile");
    f.write_all(&[5u8; 4096]).expect("fill");
    for round in 0..50 {
        let e = match UringEngine::new() {
            Ok(e) => e,
            Err(err) => {
                eprintln!("SKIP: io_uring unavailable: {err}");
                return;
            }
        };
        let mut b = [0u8; 4096];
        e.read_at(&f, 0, &mut b).expect("read");
        assert!(b.iter().all(|&x| x == 5));
        // The reaper names itself when it starts; completing a read proves it has.
        assert_eq!(reaper_threads(), 1, "round {round}");
        drop(e);
        assert_eq!(
            reaper_threads(),
            0,
            "round {round}: reaper still running after drop"
        );
    }
}
