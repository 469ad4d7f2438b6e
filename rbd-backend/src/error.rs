//! One error type for every backend, with a kind that callers can match on.
//! The ublk/NBD edge turns it into a plain -errno with [`BackendError::errno`].

use std::io;

/// What went wrong, coarse enough to decide on a reaction (retry, fail the guest, refuse to start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (out of range, misaligned, too large).
    InvalidRequest,
    /// The backend refused to write (read-only, lock lost: EROFS/EPERM/EACCES).
    ReadOnly,
    /// The backend did not answer within its deadline.
    Timeout,
    /// A media or transport error (EIO and friends). May be transient.
    Io,
    /// The backend cannot be opened or used at all (missing path, wrong type).
    Unavailable,
    /// An operation the backend cannot do (e.g. discard on a device without it).
    Unsupported,
}

#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct BackendError {
    kind: ErrorKind,
    context: String,
    #[source]
    source: io::Error,
}

impl BackendError {
    pub fn new(kind: ErrorKind, context: impl Into<String>, source: io::Error) -> Self {
        Self {
            kind,
            context: context.into(),
            source,
        }
    }

    /// Classify an OS error by its errno.
    pub fn from_io(context: impl Into<String>, source: io::Error) -> Self {
        let kind = match source.raw_os_error() {
            Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES) => ErrorKind::ReadOnly,
            Some(libc::EINVAL) | Some(libc::ERANGE) => ErrorKind::InvalidRequest,
            Some(libc::ETIMEDOUT) => ErrorKind::Timeout,
            Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => ErrorKind::Unavailable,
            _ => ErrorKind::Io,
        };
        Self::new(kind, context, source)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The positive errno to hand to a frontend (which negates it for ublk).
    pub fn errno(&self) -> i32 {
        match self.source.raw_os_error() {
            Some(e) if e > 0 => e,
            _ => match self.kind {
                ErrorKind::InvalidRequest => libc::EINVAL,
                ErrorKind::ReadOnly => libc::EROFS,
                ErrorKind::Timeout => libc::ETIMEDOUT,
                ErrorKind::Unsupported => libc::EOPNOTSUPP,
                ErrorKind::Io | ErrorKind::Unavailable => libc::EIO,
            },
        }
    }
}

pub type Result<T> = std::result::Result<T, BackendError>;
