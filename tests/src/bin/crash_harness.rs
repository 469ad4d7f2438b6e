//! The crash-state harness over every mode, with fixed seeds.
//!   crash-harness [--min-states N] [--seeds N]
//! CRASH_SOAK=1 runs many more seeds. Exits non-zero on any violation.
//! CRASH_ONLY=<mode>/<order>/<line size>/<format>[/slow]/<seed> runs one
//! configuration (`/slow`: backend flushes slowed so write-back lags),
//! CRASH_DEBUG=1 prints the first violation's sector history, device writes
//! and the recovery's log replay.

use policies::{CacheMode, WritebackOrder};
use ublk_cache::format::FormatVersion;
use ublk_cache_tests::harness::{run, RunConfig};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let shadow = tempfile::tempdir().expect("temporary shadow directory");
    let soak = std::env::var("CRASH_SOAK").is_ok_and(|v| v == "1");
    let seeds = arg("--seeds", if soak { 200 } else { 12 });
    let min_states = arg("--min-states", 100_000);
    use FormatVersion::{V1, V2};
    // (mode, order, line size, format, slow write-back)
    let setups = [
        (CacheMode::Back, WritebackOrder::Ordered, 4096, V2, false),
        (CacheMode::Back, WritebackOrder::Ordered, 16384, V2, false),
        (CacheMode::Back, WritebackOrder::Relaxed, 4096, V2, false),
        (CacheMode::Back, WritebackOrder::Relaxed, 16384, V2, false),
        // Write-back lagging the guest: long version chains, superseded
        // versions dropped (relaxed).
        (CacheMode::Back, WritebackOrder::Ordered, 4096, V2, true),
        (CacheMode::Back, WritebackOrder::Relaxed, 4096, V2, true),
        (CacheMode::Through, WritebackOrder::Ordered, 4096, V2, false),
        (CacheMode::Around, WritebackOrder::Ordered, 4096, V2, false),
        (CacheMode::None, WritebackOrder::Ordered, 4096, V2, false),
        (CacheMode::Offline, WritebackOrder::Ordered, 4096, V2, false),
        // Caches formatted by releases before format v2 keep their format.
        (CacheMode::Back, WritebackOrder::Ordered, 4096, V1, false),
        (CacheMode::Back, WritebackOrder::Relaxed, 16384, V1, false),
        (CacheMode::Through, WritebackOrder::Ordered, 4096, V1, false),
    ];
    let started = std::time::Instant::now();
    let (mut states, mut runs, mut failed_runs) = (0u64, 0u64, 0u64);
    let mut seed = 1u64;
    while seed <= seeds || states < min_states {
        for &(mode, order, line_size, format, slow) in &setups {
            // CRASH_ONLY=Back/ordered/4096/V2/9 runs that one configuration
            // (CRASH_DEBUG=1 then explains its first violation).
            let slow_tag = if slow { "/slow" } else { "" };
            if let Ok(only) = std::env::var("CRASH_ONLY") {
                if only != format!("{mode:?}/{order}/{line_size}/{format:?}{slow_tag}/{seed}") {
                    continue;
                }
            }
            let cfg = RunConfig {
                mode,
                order,
                seed,
                ops: 160,
                line_size,
                points: 300,
                variants: 4,
                reverse_writeback_bug: false,
                format,
                skip_log_checksums_bug: false,
                check_only_newest_record_bug: false,
                shadow_dir: shadow.path().to_path_buf(),
                slow_writeback: slow,
                reverse_writeback_after_recovery_bug: false,
            };
            let t0 = std::time::Instant::now();
            let r = run(&cfg);
            if std::env::var("CRASH_VERBOSE").is_ok() {
                eprintln!(
                    "{mode:?}/{order}/{line_size}/{format:?}{slow_tag}: {} states in {:?}",
                    r.states,
                    t0.elapsed()
                );
            }
            states += r.states;
            runs += 1;
            if !r.violations.is_empty() {
                failed_runs += 1;
                eprintln!("VIOLATION in {cfg:?}:");
                for v in r.violations.iter().take(5) {
                    eprintln!("  {v}");
                }
            }
        }
        seed += 1;
    }
    println!(
        "crash-harness: checked {states} crash states in {runs} recorded runs ({} s)",
        started.elapsed().as_secs()
    );
    println!(
        "crash-harness: {} passed, {} failed",
        runs - failed_runs,
        failed_runs
    );
    if failed_runs > 0 {
        std::process::exit(1);
    }
}
