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
    /// The cache device holds data that is not a ublk-cache: refused without --format.
    NotEmpty,
    /// Acting would lose dirty data: refused without an explicit operator flag.
    DirtyData,
    /// A guest request outside the device or otherwise malformed.
    InvalidRequest,
    /// The engine is shutting down.
    Stopped,
    /// Bad configuration.
    Config,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    kind: EngineErrorKind,
    message: String,
    errno: i32,
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
        }
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
        }
    }

    pub fn cache(context: &str, e: BackendError) -> Self {
        Self {
            kind: EngineErrorKind::CacheIo,
            message: format!("cache device {context}: {e}"),
            errno: libc::EIO,
        }
    }

    pub fn corrupt(what: &str, e: FormatError) -> Self {
        Self::new(EngineErrorKind::Corrupt, format!("{what}: {e}"))
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
