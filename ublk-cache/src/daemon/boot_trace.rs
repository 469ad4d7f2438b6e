//! `--boot-trace record`: the recorder on the engine from the start, and a
//! thread that, once the boot window ends (or the server stops first),
//! merges what the guest read into the disk's trace and saves it.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use tracing::{info, warn};

use super::config::ServeConfig;
use super::error::{DaemonError, DaemonResult};
use crate::boot_trace::{merge, store, BootRecorder, BootTraceMode};
use crate::Engine;

pub const DEFAULT_DIR: &str = "/var/lib/ublk-cache/traces";
pub const DEFAULT_WINDOW_SECS: u32 = 120;

/// The longest boot window there is (an hour: a "boot" beyond is a workload).
pub const MAX_WINDOW_SECS: u32 = 3600;

type Stop = Arc<(Mutex<bool>, Condvar)>;

pub struct BootTraceJob {
    stop: Stop,
    thread: Option<JoinHandle<()>>,
}

/// The key of this disk's trace: `--boot-trace-key`, else the backend's
/// kind and name (a file's path, an RBD image's pool/name).
fn key_of(cfg: &ServeConfig, engine: &Engine) -> String {
    cfg.boot_trace_key.clone().unwrap_or_else(|| {
        let id = engine.backend_identity();
        format!("{}:{}", id.kind, id.name)
    })
}

impl BootTraceJob {
    /// Check the options (before anything starts).
    pub fn validate(cfg: &ServeConfig) -> DaemonResult<()> {
        if let Some(w) = cfg.boot_trace_window {
            if w == 0 || w > MAX_WINDOW_SECS {
                return Err(DaemonError::config(format!(
                    "--boot-trace-window {w}: give 1 to {MAX_WINDOW_SECS} seconds"
                )));
            }
        }
        if let Some(k) = &cfg.boot_trace_key {
            if k.is_empty() || k.len() > 256 {
                return Err(DaemonError::config(format!(
                    "--boot-trace-key '{k}': give 1 to 256 bytes"
                )));
            }
        }
        let set = cfg.boot_trace_dir.is_some()
            || cfg.boot_trace_key.is_some()
            || cfg.boot_trace_window.is_some();
        if set && cfg.boot_trace == BootTraceMode::Off {
            return Err(DaemonError::config(
                "--boot-trace-dir, --boot-trace-key and --boot-trace-window need --boot-trace record",
            ));
        }
        Ok(())
    }

    /// Put a recorder on `engine` and start the thread that saves its boot.
    pub fn start(cfg: &ServeConfig, engine: &Arc<Engine>) -> DaemonResult<Option<Self>> {
        if cfg.boot_trace == BootTraceMode::Off {
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
        let rec = Arc::new(BootRecorder::new(disk, engine.line_size(), window));
        engine.record_boot(rec.clone());
        info!(key, trace = %path.display(), window_s = window.as_secs(), "recording this boot's reads");
        let stop: Stop = Arc::default();
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("boot-trace".into())
            .spawn(move || {
                {
                    let (lock, cv) = &*s;
                    let mut stopped = lock.lock();
                    while !*stopped && !rec.ended() {
                        cv.wait_for(&mut stopped, Duration::from_millis(200));
                    }
                }
                let boot = rec.finish();
                if boot.lines.is_empty() {
                    info!(
                        key,
                        "boot trace: the guest read nothing in its boot window; nothing saved"
                    );
                    return;
                }
                let old = store::load(&path, &key, disk);
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let t = merge(old.as_ref(), &boot, &key, disk, now);
                match store::save(&path, &t) {
                    Ok(()) => info!(
                        key,
                        lines = boot.lines.len(),
                        window_ms = boot.window_ms,
                        extents = t.extents.len(),
                        boots = t.boots,
                        "boot trace saved to {}",
                        path.display()
                    ),
                    Err(e) => warn!("boot trace not saved: {e}"),
                }
            })
            .map_err(|e| DaemonError::io("starting the boot-trace thread", e))?;
        Ok(Some(Self {
            stop,
            thread: Some(thread),
        }))
    }

    /// End recording now if its window has not (the server stops), save the
    /// trace, and wait for that.
    pub fn stop(mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock() = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
