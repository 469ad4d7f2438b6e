//! `--boot-trace`: with `record`, the recorder on the engine from the start,
//! and a thread that, once the boot window ends (or the server stops
//! first), merges what the guest read into the disk's trace and saves it;
//! with `replay`, a thread that prefetches the trace's replay set a bounded
//! distance ahead of the guest (`--boot-trace-ahead`), at `--preload-rate`
//! at most, and once its boot is over judges the trace by what the guest
//! used of it (two mostly wasted replays in a row put it aside); `auto`
//! does both.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{info, warn};

use super::config::{ServeConfig, Start};
use super::error::{DaemonError, DaemonResult};
use super::stop::StopToken;
use crate::boot_trace::format::KEY_MAX;
use crate::boot_trace::{replay_set, store, BootRecorder, BootReplay, BootTraceMode};
use crate::engine::PreloadOptions;
use crate::Engine;

mod prefetch;
mod trace_file;

use prefetch::prefetch;
use trace_file::TraceFile;

pub const DEFAULT_DIR: &str = "/var/lib/ublk-cache/traces";
pub const DEFAULT_WINDOW_SECS: u32 = 120;

/// The longest boot window there is (an hour: a "boot" beyond is a workload).
pub const MAX_WINDOW_SECS: u32 = 3600;

pub struct BootTraceJob {
    /// Its own: the server's token is asked only after the exports stopped.
    /// Its flag is the prefetch's cancel flag.
    stop: StopToken,
    threads: Vec<JoinHandle<()>>,
    replay: Option<Arc<BootReplay>>,
}

pub const DEFAULT_AHEAD_SECS: u32 = 5;

/// How often a thread that waits only for time to pass looks again.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// The key of this disk's trace: `--boot-trace-key`, else the backend's
/// kind and name (a file's path, an RBD image's pool/name).
/// A derived key longer than the file holds is shortened, with its crc32c
/// kept so that it stays its own.
fn key_of(cfg: &ServeConfig, engine: &Engine) -> String {
    cfg.boot_trace_key.clone().unwrap_or_else(|| {
        let id = engine.backend_identity();
        fit_key(format!("{}:{}", id.kind, id.name))
    })
}

/// `key` if it fits the trace file's key field, else its first bytes (at a
/// character boundary) and `#` and its crc32c: a longer key would be cut
/// when saved, and the saved trace then taken for another disk's at load.
fn fit_key(key: String) -> String {
    if key.len() <= KEY_MAX {
        return key;
    }
    let mut end = KEY_MAX - 9;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}#{:08x}", &key[..end], crc32c::crc32c(key.as_bytes()))
}

impl BootTraceJob {
    /// Check the options (before anything starts).
    pub fn validate(cfg: &ServeConfig) -> DaemonResult<()> {
        for (name, v) in [
            ("window", cfg.boot_trace_window),
            ("ahead", cfg.boot_trace_ahead),
        ] {
            if let Some(v) = v.filter(|&v| v == 0 || v > MAX_WINDOW_SECS) {
                return Err(DaemonError::config(format!(
                    "--boot-trace-{name} {v}: give 1 to {MAX_WINDOW_SECS} seconds"
                )));
            }
        }
        if let Some(k) = &cfg.boot_trace_key {
            if k.is_empty() || k.len() > KEY_MAX {
                return Err(DaemonError::config(format!(
                    "--boot-trace-key '{k}': give 1 to {KEY_MAX} bytes"
                )));
            }
        }
        let set = cfg.boot_trace_dir.is_some()
            || cfg.boot_trace_key.is_some()
            || cfg.boot_trace_window.is_some()
            || cfg.boot_trace_ahead.is_some();
        if set && cfg.boot_trace == BootTraceMode::Off {
            return Err(DaemonError::config(
                "--boot-trace-dir, -key, -window and -ahead need --boot-trace record, replay or auto",
            ));
        }
        if cfg.boot_trace.replays() && !cfg.mode.uses_cache() {
            return Err(DaemonError::config(format!(
                "--boot-trace {} prefetches into the cache, but mode '{}' uses none",
                cfg.boot_trace, cfg.mode
            )));
        }
        Ok(())
    }

    /// Put a recorder and/or a replay on `engine` and start their threads.
    pub fn start(cfg: &ServeConfig, engine: &Arc<Engine>) -> DaemonResult<Option<Self>> {
        let mode = cfg.boot_trace;
        if mode == BootTraceMode::Off {
            return Ok(None);
        }
        // Only a start under a guest that boots: a live-migration destination
        // and a re-attach after a crash serve a guest that runs already, whose
        // reads are no boot (recorded, they would teach every clone of the
        // key a wrong trace; replayed, they would fetch a boot nobody makes).
        let running_guest = if cfg.start == Start::MigrateIn {
            Some("a live-migration destination")
        } else if cfg.recover.is_some() {
            Some("a re-attach to a running device")
        } else {
            None
        };
        if let Some(why) = running_guest {
            info!("boot trace: off for this start, {why}: its guest is not booting");
            return Ok(None);
        }
        let dir = cfg
            .boot_trace_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        let key = key_of(cfg, engine);
        let path = store::path_for(&dir, &key);
        store::prepare(&dir, &path).map_err(|e| {
            DaemonError::io(
                format!("--boot-trace-dir {}", dir.display()),
                std::io::Error::other(e.to_string()),
            )
        })?;
        let window =
            Duration::from_secs(cfg.boot_trace_window.unwrap_or(DEFAULT_WINDOW_SECS) as u64);
        let disk = crate::target::BlockTarget::size(engine.as_ref());
        // In `auto`: whether this boot's recording is in the trace yet.
        let saved = Arc::new(AtomicBool::new(false));
        let mut job = Self {
            stop: StopToken::new(),
            threads: Vec::new(),
            replay: None,
        };
        if mode.replays() {
            // Under the lock: a load may move a bad trace aside, and must not
            // move another server's good one that replaced it meanwhile.
            let loaded = store::lock(&path).map(|_one| store::load(&path, &key, disk));
            let loaded = loaded.unwrap_or_else(|e| {
                warn!("boot trace: not read: {e}");
                None
            });
            match loaded {
                None => info!(
                    key,
                    "boot trace: none for this disk yet; nothing to prefetch"
                ),
                Some(t) => {
                    let ahead = Duration::from_secs(
                        cfg.boot_trace_ahead.unwrap_or(DEFAULT_AHEAD_SECS) as u64,
                    );
                    let r = Arc::new(BootReplay::new(replay_set(&t), engine.line_size(), ahead));
                    engine.follow_boot(r.clone());
                    // Prefetch ends at the latest twice the recorded window
                    // after it starts (a guest that went another way).
                    let limit = Duration::from_millis(t.window_ms as u64 * 2).max(window);
                    let opts = PreloadOptions {
                        rate: cfg.preload_rate.map(|r| r.0),
                    };
                    info!(
                        key,
                        extents = r.extents().len(),
                        boots = t.boots,
                        ahead_s = ahead.as_secs(),
                        "boot trace: prefetching ahead of the guest"
                    );
                    let (e, stop, rr) = (engine.clone(), job.stop.clone(), r.clone());
                    let trace = TraceFile {
                        saved: saved.clone(),
                        path: path.clone(),
                        key: key.clone(),
                        disk,
                    };
                    job.threads.push(
                        std::thread::Builder::new()
                            .name("boot-prefetch".into())
                            .spawn(move || {
                                if prefetch(&e, &rr, &stop, opts, limit) {
                                    trace.judge(&rr.report());
                                }
                            })
                            .map_err(|e| DaemonError::io("starting the boot-prefetch thread", e))?,
                    );
                    job.replay = Some(r);
                }
            }
        }
        if mode.records() {
            let rec = Arc::new(BootRecorder::new(disk, engine.line_size(), window));
            engine.record_boot(rec.clone());
            info!(key, trace = %path.display(), window_s = window.as_secs(), "recording this boot's reads");
            let stop = job.stop.clone();
            let trace = TraceFile {
                saved,
                path,
                key,
                disk,
            };
            job.threads.push(
                std::thread::Builder::new()
                    .name("boot-trace".into())
                    .spawn(move || {
                        stop.wait_until(IDLE_POLL, || rec.ended());
                        trace.save(&rec);
                    })
                    .map_err(|e| DaemonError::io("starting the boot-trace thread", e))?,
            );
        }
        Ok(Some(job))
    }

    /// End recording now if its window has not (the server stops), save the
    /// trace, stop prefetching, and report what the replay achieved.
    pub fn stop(mut self) {
        self.halt();
        if let Some(r) = &self.replay {
            let rep = r.report();
            info!(
                planned_lines = rep.planned_lines,
                fetched_lines = rep.fetched_lines,
                fetched_bytes = rep.fetched_bytes,
                used_lines = rep.used_lines,
                read_lines = rep.read_lines,
                max_lead_ms = rep.max_lead_ms,
                "boot prefetch: precision {:.2} recall {:.2}",
                rep.precision(),
                rep.recall()
            );
        }
    }
}

impl BootTraceJob {
    fn halt(&mut self) {
        self.stop.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A job dropped without `stop` (a start that failed half way) still ends
/// its threads.
impl Drop for BootTraceJob {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_derived_key_is_shortened_and_stays_its_own() {
        assert_eq!(fit_key("file:/a".into()), "file:/a");
        let long = format!("file:/{}", "é".repeat(200));
        let (a, b) = (fit_key(long.clone()), fit_key(format!("{long}x")));
        assert!(a.len() <= KEY_MAX && b.len() <= KEY_MAX, "{}", a.len());
        assert_ne!(a, b);
        assert_eq!(a, fit_key(long), "the same disk, the same key");
    }
}
