//! The crash harness in short runs (the full run is the `crash-harness` binary,
//! run by scripts/test.sh), and proof that it can fail.

use policies::{CacheMode, WritebackOrder};
use ublk_cache::format::FormatVersion;
use ublk_cache_tests::harness::{run, RunConfig};

fn cfg(mode: CacheMode, order: WritebackOrder, seed: u64) -> RunConfig {
    RunConfig {
        mode,
        order,
        seed,
        ops: 100,
        line_size: 4096,
        points: 25,
        variants: 3,
        reverse_writeback_bug: false,
        format: FormatVersion::V2,
        skip_log_checksums_bug: false,
        check_only_newest_record_bug: false,
        shadow_dir: shadow_dir(),
        slow_writeback: false,
        reverse_writeback_after_recovery_bug: false,
    }
}

/// One private shadow directory for the whole test process.
fn shadow_dir() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
        .path()
        .to_path_buf()
}

#[test]
fn short_runs_in_every_mode_find_no_violation() {
    let mut states = 0;
    for mode in [
        CacheMode::None,
        CacheMode::Around,
        CacheMode::Through,
        CacheMode::Back,
    ] {
        for order in [WritebackOrder::Ordered, WritebackOrder::Relaxed] {
            let r = run(&cfg(mode, order, 7));
            assert!(
                r.violations.is_empty(),
                "{mode:?}/{order}: {:?}",
                &r.violations[..r.violations.len().min(3)]
            );
            states += r.states;
        }
    }
    assert!(states > 500, "only {states} crash states checked");
}

#[test]
fn short_runs_on_a_format_v1_cache_find_no_violation() {
    for order in [WritebackOrder::Ordered, WritebackOrder::Relaxed] {
        let mut c = cfg(CacheMode::Back, order, 5);
        c.format = FormatVersion::V1;
        let r = run(&c);
        assert!(
            r.violations.is_empty(),
            "v1 {order}: {:?}",
            &r.violations[..r.violations.len().min(3)]
        );
        assert!(r.states > 50, "only {} crash states checked", r.states);
    }
}

#[test]
fn writing_back_newest_epoch_first_is_caught() {
    // Several seeds: the bug shows whenever two epochs are dirty at once and
    // the crash lands between their write-backs.
    let caught = (1..=6).any(|seed| {
        let mut c = cfg(CacheMode::Back, WritebackOrder::Ordered, seed);
        c.reverse_writeback_bug = true;
        c.points = 120;
        let r = run(&c);
        r.violations.iter().any(|v| v.starts_with("G3"))
    });
    assert!(
        caught,
        "the harness did not notice write-back out of epoch order"
    );
}

#[test]
fn a_recovery_drain_out_of_epoch_order_is_caught_by_the_double_failure_check() {
    // The engine before the crash is correct, so the backend at every crash
    // point is fine; only losing the cache while the recovered engine writes
    // back (newest epoch first) shows the bug.
    let caught = (1..=8).any(|seed| {
        let mut c = cfg(CacheMode::Back, WritebackOrder::Ordered, seed);
        c.reverse_writeback_after_recovery_bug = true;
        c.points = 120;
        let r = run(&c);
        assert!(
            !r.violations
                .iter()
                .any(|v| v.starts_with("G3 Run") || v.starts_with("G1/G2")),
            "a violation before the second failure: {:?}",
            &r.violations[..r.violations.len().min(3)]
        );
        r.violations
            .iter()
            .any(|v| v.contains("after a second failure"))
    });
    assert!(
        caught,
        "the harness did not notice a recovery drain out of epoch order"
    );
}

#[test]
fn trusting_torn_log_records_is_caught() {
    // A power cut during a round's flush: the record can land while some of
    // the data it names does not. Without the checksum check, recovery serves
    // whatever the slot held before.
    let caught = loses_acknowledged_data_in_some_run(|c| c.skip_log_checksums_bug = true);
    assert!(
        caught,
        "the harness did not notice recovery trusting data that never arrived"
    );
}

/// Whether some ordered `back` run with `bug` set (seeds 1 to 8, many crash
/// points) finds a sector that breaks G1/G2.
fn loses_acknowledged_data_in_some_run(bug: impl Fn(&mut RunConfig)) -> bool {
    (1..=8).any(|seed| {
        let mut c = cfg(CacheMode::Back, WritebackOrder::Ordered, seed);
        bug(&mut c);
        c.points = 120;
        c.variants = 4;
        let r = run(&c);
        r.violations.iter().any(|v| v.starts_with("G1/G2"))
    })
}

#[test]
fn checking_only_the_newest_record_after_fua_rounds_is_caught() {
    // A FUA write's round writes its record durable and flushes nothing; the
    // other writes that record names may not have arrived when a later
    // record is written. Checking only the newest record trusts them, and
    // serves what the slot held before (another line's data). Slow
    // write-back keeps those lines dirty long enough to matter.
    let caught = loses_acknowledged_data_in_some_run(|c| {
        c.check_only_newest_record_bug = true;
        c.slow_writeback = true;
    });
    assert!(
        caught,
        "the harness did not notice recovery trusting data of an unflushed FUA round"
    );
}
