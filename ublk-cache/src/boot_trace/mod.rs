//! Learned boot preload (`--boot-trace`): what a guest reads while it boots
//! is recorded per cache line ([`recorder`]), merged into a trace that ages
//! per line instead of being replaced ([`merge`]), and kept in a small
//! checksummed file ([`format`]) under a key that clones of one image can
//! share ([`store`]), and prefetched on the next boot a bounded distance
//! ahead of the guest ([`replay`]).

pub mod format;
pub mod merge;
pub mod recorder;
pub mod replay;
pub mod store;

pub use format::{BootTrace, Extent};
pub use merge::{latest_boot_only, merge, BootSet};
pub use recorder::BootRecorder;
pub use replay::{judge, replay_set, BootReplay, ReplayReport, Verdict};

pub use policies::BootTraceMode;

/// A trace file that is not to be trusted, or that cannot be kept.
#[derive(Debug, thiserror::Error)]
pub enum BootTraceError {
    #[error("corrupt boot trace: {0}")]
    Corrupt(String),
    #[error("boot trace {path}: {what}: {source}")]
    Io {
        path: std::path::PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}
