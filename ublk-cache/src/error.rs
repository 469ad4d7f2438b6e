//! The engine's error type: a kind to match on, and a message that names the
//! problem (which file, which field, what to do).

use rbd_backend::{BackendError, ErrorKind as BackendKind};

use crate::format::FormatError;
use crate::target::TargetError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineErrorKind {
    /// The backend failed a request.
    BackendIo,
    /// The cache device failed a request.
    CacheIo,
    /// On-disk cache state is corrupt or from an unknown format: refused.
    Corrupt,
    /// The cache belongs to another backend or another geometry: refused.
    Mismatch,
    /// The cache device holds data that is not a ublk-cache: refused unless formatting is asked for.
    NotEmpty,
    /// Acting would lose dirty data: refused unless the operator says so.
    DirtyData,
    /// A guest request outside the device or otherwise malformed.
    InvalidRequest,
    /// The engine is shutting down.
    Stopped,
    /// Bad configuration.
    Config,
}

/// A way forward from a refusal, for the operator. The engine names the
/// problem and the remedies; the binary says how to apply each (its options),
/// so no engine message names a command-line flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Remedy {
    /// Initialize the cache device anew; destroys what it holds.
    Format,
    /// Drop the cache's dirty data; the writes it holds are lost.
    DiscardDirty,
    /// Write the dirty data back over the backend's newer data in those ranges.
    AcceptBackendChange,
    /// Restart the server in offline mode.
    StartOffline,
    /// Write the dirty data back to the backend first, then try again.
    WriteBackFirst,
    /// Give the crash shadow a writable tmpfs directory.
    ShadowDir,
}

/// The error an engine error came from, kept with its kind so that callers
/// (write-back, the daemon, the CLI) can tell causes apart.
#[derive(Debug, thiserror::Error)]
pub enum ErrorSource {
    #[error(transparent)]
    Backend(BackendError),
    #[error(transparent)]
    Format(FormatError),
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    kind: EngineErrorKind,
    message: String,
    errno: i32,
    remedies: Vec<Remedy>,
    /// Boxed: engine results are returned on every request, and the common
    /// error has no source.
    #[source]
    source: Option<Box<ErrorSource>>,
}

impl EngineError {
    pub fn new(kind: EngineErrorKind, message: impl Into<String>) -> Self {
        let errno = match kind {
            EngineErrorKind::InvalidRequest => libc::EINVAL,
            EngineErrorKind::Stopped => libc::ESHUTDOWN,
            _ => libc::EIO,
        };
        Self {
            kind,
            message: message.into(),
            errno,
            remedies: Vec::new(),
            source: None,
        }
    }

    /// The same error, naming these ways forward.
    pub fn with_remedies(mut self, remedies: &[Remedy]) -> Self {
        self.remedies = remedies.to_vec();
        self
    }

    /// What the operator can do about it (empty: nothing but fixing the cause).
    pub fn remedies(&self) -> &[Remedy] {
        &self.remedies
    }

    pub fn backend(context: &str, e: BackendError) -> Self {
        let errno = match e.kind() {
            // A refused backend write is still an I/O error for the guest; the
            // errno tells the log why.
            BackendKind::InvalidRequest => libc::EINVAL,
            _ => libc::EIO,
        };
        Self {
            kind: EngineErrorKind::BackendIo,
            message: format!("backend {context}: {e}"),
            errno,
            remedies: Vec::new(),
            source: Some(Box::new(ErrorSource::Backend(e))),
        }
    }

    pub fn cache(context: &str, e: BackendError) -> Self {
        Self {
            kind: EngineErrorKind::CacheIo,
            message: format!("cache device {context}: {e}"),
            errno: libc::EIO,
            remedies: Vec::new(),
            source: Some(Box::new(ErrorSource::Backend(e))),
        }
    }

    /// Offline mode refused: a cache of `capacity` data bytes cannot hold an
    /// image of `image` bytes (at attach and at a live switch alike).
    pub fn offline_capacity(capacity: u64, image: u64) -> Self {
        Self::new(
            EngineErrorKind::Config,
            format!(
                "offline mode keeps the whole image in the cache, but the cache holds {capacity} bytes of \
                 data and the image is {image} bytes; give the cache at least the image size plus 1% for \
                 metadata"
            ),
        )
    }

    pub fn corrupt(what: &str, e: FormatError) -> Self {
        let mut err = Self::new(EngineErrorKind::Corrupt, format!("{what}: {e}"));
        err.source = Some(Box::new(ErrorSource::Format(e)));
        err
    }

    /// The backend's (or cache device's) error this one came from.
    pub fn backend_error(&self) -> Option<&BackendError> {
        match self.source.as_deref() {
            Some(ErrorSource::Backend(e)) => Some(e),
            _ => None,
        }
    }

    /// The kind of the backend's (or cache device's) error this one came from.
    pub fn backend_kind(&self) -> Option<BackendKind> {
        self.backend_error().map(BackendError::kind)
    }

    /// The backend refused to write: its exclusive lock went to another client
    /// (or it is read-only). Retrying will not help until that changes.
    pub fn is_lock_lost(&self) -> bool {
        self.kind == EngineErrorKind::BackendIo
            && self.backend_kind() == Some(BackendKind::ReadOnly)
    }

    /// The backend did not answer in time (an outage); retrying may help.
    pub fn is_timeout(&self) -> bool {
        self.kind == EngineErrorKind::BackendIo && self.backend_kind() == Some(BackendKind::Timeout)
    }

    /// The on-disk format error this one came from.
    pub fn format_error(&self) -> Option<&FormatError> {
        match self.source.as_deref() {
            Some(ErrorSource::Format(e)) => Some(e),
            _ => None,
        }
    }

    pub fn kind(&self) -> EngineErrorKind {
        self.kind
    }

    pub fn errno(&self) -> i32 {
        self.errno
    }
}

impl From<EngineError> for TargetError {
    fn from(e: EngineError) -> Self {
        TargetError::new(e.errno, e.message)
    }
}

pub type EngineResult<T> = Result<T, EngineError>;

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::io;

    use super::*;

    fn backend_err(kind: BackendKind, errno: i32) -> BackendError {
        BackendError::new(
            kind,
            "rbd:one/disk: write",
            io::Error::from_raw_os_error(errno),
        )
    }

    #[test]
    fn backend_errors_keep_their_kind_and_source() {
        let lost = EngineError::backend(
            "write-back",
            backend_err(BackendKind::ReadOnly, libc::EROFS),
        );
        assert!(lost.is_lock_lost() && !lost.is_timeout());
        assert_eq!(lost.kind(), EngineErrorKind::BackendIo);
        assert_eq!(lost.errno(), libc::EIO);
        let src = lost.source().expect("a source");
        assert!(src.to_string().contains("rbd:one/disk"), "{src}");
        let slow = EngineError::backend(
            "write-back",
            backend_err(BackendKind::Timeout, libc::ETIMEDOUT),
        );
        assert!(slow.is_timeout() && !slow.is_lock_lost());
        assert_eq!(slow.backend_kind(), Some(BackendKind::Timeout));
        // The cache device's errors are not the backend's lock or outage.
        let cache = EngineError::cache("read", backend_err(BackendKind::ReadOnly, libc::EROFS));
        assert!(!cache.is_lock_lost());
        assert_eq!(cache.backend_kind(), Some(BackendKind::ReadOnly));
        let bad = EngineError::backend(
            "read",
            backend_err(BackendKind::InvalidRequest, libc::EINVAL),
        );
        assert_eq!(TargetError::from(bad).errno, libc::EINVAL);
        let c = EngineError::corrupt("superblock", FormatError::NoMagic);
        assert_eq!(c.format_error(), Some(&FormatError::NoMagic));
        assert!(EngineError::new(EngineErrorKind::Config, "x")
            .source()
            .is_none());
    }
}
