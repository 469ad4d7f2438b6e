//! Errors of the helper. Every message names the problem in the words an
//! OpenNebula operator reads in `onevm show` (the TM's error line): the
//! attribute, the host, the sizes, the command that failed.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OpenNebula attribute (DISK, IMAGE or DATASTORE) with a bad value.
    #[error("{0}")]
    Attribute(String),
    /// Valid input this host refuses: no cache space, LS_MAX, a disk type this
    /// version does not serve.
    #[error("{0}")]
    Refused(String),
    /// Bad command-line arguments (the TM scripts' contract was broken).
    #[error("{0}")]
    Usage(String),
    /// The XML bundle on stdin.
    #[error("{0}")]
    Xml(String),
    /// /etc/ublk-cache/one.conf.
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// An external command (rbd, lvcreate, systemctl, ublk-cache) that failed.
    #[error("`{cmd}` failed ({status}): {detail}")]
    Command {
        cmd: String,
        status: String,
        detail: String,
    },
    /// A ublk-cache server that did not start, stop or answer as expected.
    #[error("{0}")]
    Server(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// `.map_err(io_at("reading X"))` for std::io results.
pub fn io_at(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}
