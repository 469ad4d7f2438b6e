//! How a file backend's reads, writes and syncs reach the kernel.
//!
//! Two engines with the same blocking interface: io_uring (fewer syscalls per I/O
//! under concurrency, one shared ring) and plain pread/pwrite (works everywhere,
//! including sandboxes whose seccomp filter refuses io_uring). The engine does no
//! alignment work: the caller hands it buffers and offsets that suit the fd.

mod sync;
mod uring;

pub use sync::SyncEngine;
pub use uring::UringEngine;

use std::fmt;
use std::fs::File;
use std::io;
use std::sync::Arc;

use crate::error::{BackendError, ErrorKind, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Sync,
    Uring,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Sync => "sync",
            EngineKind::Uring => "uring",
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which engine to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring, falling back to sync.
    #[default]
    Auto,
    /// Exactly this engine; an error if it cannot be set up.
    Force(EngineKind),
}

impl EngineChoice {
    /// Parses an operator's spelling ("sync", "uring", "auto"; case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sync" => Some(Self::Force(EngineKind::Sync)),
            "uring" | "io_uring" | "io-uring" => Some(Self::Force(EngineKind::Uring)),
            "auto" | "" => Some(Self::Auto),
            _ => None,
        }
    }
}

/// Blocking positional I/O on a file. Implementations are shared by many threads.
pub trait IoEngine: Send + Sync + fmt::Debug {
    fn kind(&self) -> EngineKind;

    /// Fill `buf` from `offset`, stopping early only at end of file. Returns the bytes read.
    fn read_upto(&self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize>;

    /// Write all of `buf` at `offset`.
    fn write_at(&self, file: &File, offset: u64, buf: &[u8]) -> io::Result<()>;

    fn fdatasync(&self, file: &File) -> io::Result<()>;

    /// Fill all of `buf`; reaching end of file first is an error.
    fn read_at(&self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = self.read_upto(file, offset, buf)?;
        if n < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "short read: {n} of {} bytes at offset {offset} (end of file)",
                    buf.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Opens the engine `choice` asks for. `Auto` tries io_uring and falls back to
/// the sync engine (with a warning) when the kernel or a seccomp filter refuses
/// it: a slower backend beats no backend. (Operators force an engine with
/// `UBLK_CACHE_IO_ENGINE`, which the binary reads and passes in as the choice.)
pub fn open_engine(choice: EngineChoice) -> Result<Arc<dyn IoEngine>> {
    match choice {
        EngineChoice::Force(EngineKind::Sync) => Ok(Arc::new(SyncEngine::new())),
        EngineChoice::Force(EngineKind::Uring) => UringEngine::new()
            .map(|e| Arc::new(e) as Arc<dyn IoEngine>)
            .map_err(|e| BackendError::new(ErrorKind::Unavailable, "io_uring engine", e)),
        EngineChoice::Auto => match UringEngine::new() {
            Ok(e) => Ok(Arc::new(e)),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "io_uring unavailable; using the synchronous pread/pwrite engine"
                );
                Ok(Arc::new(SyncEngine::new()))
            }
        },
    }
}

/// Offset of the `done`-th byte of a request. Offsets past i64::MAX are refused
/// rather than wrapped: the kernel reads them as negative, and io_uring even treats
/// u64::MAX as "use the file position".
fn offset_plus(offset: u64, done: usize) -> io::Result<u64> {
    u64::try_from(done)
        .ok()
        .and_then(|d| offset.checked_add(d))
        .filter(|&o| i64::try_from(o).is_ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("offset {offset}+{done} beyond the largest file offset"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_engine_choice() {
        assert_eq!(
            EngineChoice::parse("sync"),
            Some(EngineChoice::Force(EngineKind::Sync))
        );
        assert_eq!(
            EngineChoice::parse(" URING "),
            Some(EngineChoice::Force(EngineKind::Uring))
        );
        assert_eq!(EngineChoice::parse("auto"), Some(EngineChoice::Auto));
        assert_eq!(EngineChoice::parse("aio"), None);
    }

    #[test]
    fn forced_engines_open_as_asked() {
        let s = open_engine(EngineChoice::Force(EngineKind::Sync)).expect("sync");
        assert_eq!(s.kind(), EngineKind::Sync);
        match open_engine(EngineChoice::Force(EngineKind::Uring)) {
            Ok(u) => assert_eq!(u.kind(), EngineKind::Uring),
            Err(e) => eprintln!("SKIP: io_uring unavailable here: {e}"),
        }
    }
}
