//! The daemon's error: a sentence that names the problem, and the error it
//! came from (engine, backend, frontend, I/O) as its `source`, so the edge can
//! print the whole chain and look at the kind (an engine refusal's remedies,
//! a backend's `ErrorKind`).

use std::io;

use rbd_backend::BackendError;

use crate::error::{EngineError, Remedy};
use crate::frontend::nbd::NbdError;
use crate::frontend::ublk::UblkError;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is wrong: the message names the option and why.
    #[error("{0}")]
    Config(String),
    /// Something is in the way (a busy lock, a live socket, a foreign record).
    #[error("{0}")]
    Refused(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{context}")]
    Backend {
        context: String,
        #[source]
        source: BackendError,
    },
    #[error("{context}")]
    Engine {
        context: String,
        #[source]
        source: Box<EngineError>,
    },
    #[error("{context}")]
    Ublk {
        context: String,
        #[source]
        source: UblkError,
    },
    /// A server refused a control request.
    #[error("{message}")]
    Remote {
        message: String,
        remedies: Vec<Remedy>,
    },
    #[error("{context}")]
    Nbd {
        context: String,
        #[source]
        source: NbdError,
    },
}

impl DaemonError {
    pub fn config(msg: impl Into<String>) -> Self {
        DaemonError::Config(msg.into())
    }

    pub fn refused(msg: impl Into<String>) -> Self {
        DaemonError::Refused(msg.into())
    }

    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        DaemonError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn backend(context: impl Into<String>, source: BackendError) -> Self {
        DaemonError::Backend {
            context: context.into(),
            source,
        }
    }

    pub fn engine(context: impl Into<String>, source: EngineError) -> Self {
        DaemonError::Engine {
            context: context.into(),
            source: Box::new(source),
        }
    }

    pub fn ublk(context: impl Into<String>, source: UblkError) -> Self {
        DaemonError::Ublk {
            context: context.into(),
            source,
        }
    }

    pub fn nbd(context: impl Into<String>, source: NbdError) -> Self {
        DaemonError::Nbd {
            context: context.into(),
            source,
        }
    }

    /// The engine error at the root of this one, if any (its kind and remedies).
    pub fn engine_error(&self) -> Option<&EngineError> {
        match self {
            DaemonError::Engine { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The kind of the backend error at the root of this one, directly or
    /// through the engine: a lost lock, a timeout, a missing disk, ...
    pub fn backend_kind(&self) -> Option<rbd_backend::ErrorKind> {
        match self {
            DaemonError::Backend { source, .. } => Some(source.kind()),
            DaemonError::Engine { source, .. } => source.backend_kind(),
            _ => None,
        }
    }

    /// What the operator can do about it, as the engine (here or in the
    /// server that answered) named it.
    pub fn remedies(&self) -> &[Remedy] {
        match self {
            DaemonError::Engine { source, .. } => source.remedies(),
            DaemonError::Remote { remedies, .. } => remedies,
            _ => &[],
        }
    }

    /// The message with every cause, `context: cause: cause` (a cause whose
    /// text its parent already ends with is not repeated).
    pub fn chain(&self) -> String {
        chain(self)
    }
}

/// `e` and every cause, `context: cause: cause`, without repeats.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

pub type DaemonResult<T> = Result<T, DaemonError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_names_every_cause_once_and_kinds_reach_the_edge() {
        let io = io::Error::from_raw_os_error(libc::ETIMEDOUT);
        let b = BackendError::new(rbd_backend::ErrorKind::Timeout, "rbd:p/i: read", io);
        let e = DaemonError::engine(
            "preloading 0+4096",
            EngineError::backend("read of line 0", b),
        );
        assert_eq!(e.backend_kind(), Some(rbd_backend::ErrorKind::Timeout));
        let c = e.chain();
        assert_eq!(c.matches("rbd:p/i: read").count(), 1, "{c}");
        assert!(
            c.starts_with("preloading 0+4096: backend read of line 0"),
            "{c}"
        );
        assert!(DaemonError::config("x").backend_kind().is_none());
    }
}
