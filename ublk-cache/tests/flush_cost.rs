//! What a guest FLUSH costs the cache device in `back` mode: format v2 makes
//! one 4 KiB write followed by a FLUSH cost one device flush and one metadata
//! block (a log record written together with the data), where format v1 needs
//! two flushes (data, then the metadata block naming it). Counted with the
//! engine's own stats, on a backend that refuses writes so that no write-back
//! round adds flushes of its own.

use std::sync::Arc;

use policies::CacheMode;
use rbd_backend::{Backend, FaultyBackend, MemBackend};
use ublk_cache::format::FormatVersion;
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};

const MIB: usize = 1 << 20;
const ROUNDS: u64 = 100;

struct Cost {
    flushes: u64,
    meta_bytes: u64,
}

/// `ROUNDS` times: a 4 KiB write, then a FLUSH.
fn write_flush_rounds(format: FormatVersion) -> Cost {
    let backend = Arc::new(MemBackend::new(64 * MIB));
    let refusing = Arc::new(FaultyBackend::builder(backend).build());
    refusing.set_read_only(true);
    // A 64 MiB cache has a 2 MiB log: 100 one-block records fit without a
    // checkpoint, so every round is the steady-state cost.
    let cache = Arc::new(MemBackend::new(64 * MIB));
    let e = Engine::open(
        refusing as Arc<dyn Backend>,
        Some(cache as Arc<dyn Backend>),
        EngineConfig {
            mode: CacheMode::Back,
            line_size: Some(64 * 1024),
            format_version: format,
            shadow_dir: testkit::rig::shadow_dir(),
            ..EngineConfig::default()
        },
    )
    .expect("open");
    let before = e.stats();
    for i in 0..ROUNDS {
        // Spread over lines and within them: new lines, overwrites of
        // flushed data (a new version) and of unflushed data all occur.
        let off = (i * 7 % 40) * 64 * 1024 + (i % 16) * 4096;
        e.write(off, &[i as u8 + 1; 4096], false).expect("write");
        e.flush().expect("flush");
    }
    let after = e.stats();
    e.abandon();
    Cost {
        flushes: after.cache_flushes - before.cache_flushes,
        meta_bytes: after.meta_write_bytes - before.meta_write_bytes,
    }
}

#[test]
fn a_flush_after_one_write_costs_one_device_flush_in_format_v2() {
    let v2 = write_flush_rounds(FormatVersion::V2);
    let v1 = write_flush_rounds(FormatVersion::V1);
    eprintln!(
        "per 4 KiB write + FLUSH: v2 {:.2} device flushes, {} metadata bytes; v1 {:.2} flushes, {} bytes",
        v2.flushes as f64 / ROUNDS as f64,
        v2.meta_bytes / ROUNDS,
        v1.flushes as f64 / ROUNDS as f64,
        v1.meta_bytes / ROUNDS
    );
    assert_eq!(v2.flushes, ROUNDS, "format v2: one cache flush per round");
    assert_eq!(
        v2.meta_bytes,
        ROUNDS * 4096,
        "format v2: one 4 KiB log record per round"
    );
    assert!(
        v1.flushes >= 2 * ROUNDS,
        "format v1 flushes data and metadata separately ({} flushes)",
        v1.flushes
    );
}
