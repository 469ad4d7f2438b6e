//! This disk's trace file as the boot-trace job changes it: the recording
//! merged in, the replay's verdict.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::boot_trace::{
    judge, latest_boot_only, merge, store, BootRecorder, ReplayReport, Verdict,
};

/// This disk's trace file. Each change takes the file's lock (`store::lock`):
/// the recording's merge and the replay's verdict of one server, and those of
/// other servers of the same key.
pub(super) struct TraceFile {
    /// This start's recording is in the trace (`auto`).
    pub(super) saved: Arc<AtomicBool>,
    pub(super) path: PathBuf,
    pub(super) key: String,
    pub(super) disk: u64,
}

impl TraceFile {
    /// Merge what `rec` saw into the trace and save it.
    pub(super) fn save(&self, rec: &BootRecorder) {
        let (path, key) = (&self.path, self.key.as_str());
        let boot = rec.finish();
        if boot.lines.is_empty() {
            info!(
                key,
                "boot trace: the guest read nothing in its boot window; nothing saved"
            );
            return;
        }
        let _one = match store::lock(path) {
            Ok(l) => l,
            Err(e) => return warn!("boot trace not saved: {e}"),
        };
        let old = store::load(path, key, self.disk);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let t = merge(old.as_ref(), &boot, key, self.disk, now);
        match store::save(path, &t) {
            Ok(()) => {
                self.saved.store(true, Ordering::Release);
                info!(
                    key,
                    lines = boot.lines.len(),
                    window_ms = boot.window_ms,
                    extents = t.extents.len(),
                    boots = t.boots,
                    "boot trace saved to {}",
                    path.display()
                )
            }
            Err(e) => warn!("boot trace not saved: {e}"),
        }
    }

    /// Keep the trace, with its count of poor replays brought up to date,
    /// or put it aside as stale, by what the guest used of `rep`'s prefetch.
    /// In `auto` the trace judged may hold this boot already: what counts
    /// is that the extents replayed were mostly wasted, and a stale trace
    /// that holds this boot is replaced by a trace of this boot alone (else
    /// the recording saves this boot as a new trace).
    pub(super) fn judge(&self, rep: &ReplayReport) {
        let (path, key) = (&self.path, self.key.as_str());
        let _one = match store::lock(path) {
            Ok(l) => l,
            Err(e) => return warn!("boot trace not judged: {e}"),
        };
        let Some(mut t) = store::load(path, key, self.disk) else {
            return;
        };
        let precision = rep.precision();
        match judge(t.poor_boots, rep) {
            Verdict::NotJudged => info!(
                key,
                fetched_lines = rep.fetched_lines,
                "boot trace: prefetch fetched too little to judge the trace by"
            ),
            Verdict::Keep { poor_boots } => {
                if poor_boots > 0 {
                    warn!(
                        key,
                        poor_boots,
                        "boot trace: the guest used {:.0} % of what prefetch fetched; the trace is put aside after {} such boots in a row",
                        precision * 100.0,
                        crate::boot_trace::replay::STALE_AFTER
                    );
                }
                if poor_boots != t.poor_boots {
                    t.poor_boots = poor_boots;
                    if let Err(e) = store::save(path, &t) {
                        warn!("boot trace: its count of poor replays not saved: {e}");
                    }
                }
            }
            Verdict::Stale => match store::retire(path) {
                Ok(to) => {
                    warn!(
                        key,
                        "boot trace: the guest used {:.0} % of what prefetch fetched, {} boots in a row; the trace is stale, moved to {}",
                        precision * 100.0,
                        crate::boot_trace::replay::STALE_AFTER,
                        to.display()
                    );
                    let fresh = self
                        .saved
                        .load(Ordering::Acquire)
                        .then(|| latest_boot_only(&t));
                    match fresh.flatten() {
                        Some(f) => match store::save(path, &f) {
                            Ok(()) => info!(key, "boot trace: started anew from this boot"),
                            Err(e) => warn!("boot trace: not started anew from this boot: {e}"),
                        },
                        None => info!(key, "boot trace: the next recorded boot starts a new one"),
                    }
                }
                Err(e) => warn!("boot trace: stale, but {e}"),
            },
        }
    }
}
