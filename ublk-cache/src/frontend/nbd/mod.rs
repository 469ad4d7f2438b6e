//! NBD frontend: serves an [`AsyncTarget`](crate::target::AsyncTarget) over the
//! Network Block Device protocol on unix and TCP sockets, beside or instead of
//! the ublk device. QEMU, libvirt, qemu-img, nbdcopy, nbdinfo and fio speak it
//! natively, and it needs nothing from the kernel.
//!
//! # Protocol
//!
//! Fixed newstyle handshake only ([`handshake`]): `NBD_OPT_GO`, `NBD_OPT_INFO`
//! (with `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE`: minimum 512, preferred
//! 4096, maximum payload 32 MiB), `NBD_OPT_LIST`, `NBD_OPT_ABORT`,
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_EXTENDED_HEADERS`,
//! `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` (`base:allocation`)
//! and `NBD_OPT_STARTTLS` ([`tls`]); every other option gets
//! `NBD_REP_ERR_UNSUP`. One export, the default one (empty name). Transmission
//! ([`transmission`]) with simple, structured or extended replies: READ, WRITE
//! (+FUA), FLUSH, TRIM, WRITE_ZEROES (+NO_HOLE), BLOCK_STATUS (+REQ_ONE) and
//! DISC. Transmission flags: see [`export_flags`].
//!
//! # One event loop per connection
//!
//! One acceptor thread polls the listeners. Each connection gets a thread: the
//! handshake runs there with blocking socket I/O (it is short, and TLS is set up
//! in it), then the thread becomes the connection's event loop
//! (`rbd_backend::aio`): the socket is read and written with io_uring, a task per
//! request calls the engine's asynchronous interface on the same loop (a cache
//! hit is a read of the cache device on this thread's ring), and one sender
//! writes replies in batches, so replies may leave out of order. No worker pool,
//! no hand-off. A server has few connections (one or a handful per VM disk).
//! Stopping is explicit: shut the read side of each socket, let the requests in
//! flight finish and be answered, join.
//!
//! # Multi-connection
//!
//! `NBD_FLAG_CAN_MULTI_CONN` is advertised because every connection calls the
//! same engine: there is one cache and one map, so a write answered on one
//! connection is seen by reads on every other, and a FLUSH (or FUA) makes every
//! write the engine completed before it durable, whichever connection sent it.
//! That is exactly what the flag promises.

pub mod handshake;
pub mod proto;
mod server;
pub mod tls;
pub mod transmission;
pub mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use handshake::TlsPolicy;
pub use server::{Listeners, NbdServer};
pub use tls::{TlsConfig, TlsFiles};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSpec {
    /// A unix socket at this path.
    Unix(PathBuf),
    /// A TCP address; an empty host means loopback (127.0.0.1).
    Tcp { host: String, port: u16 },
}

/// Port NBD clients use when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// Tuning of the NBD server.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// Requests of one connection running at once (more wait to be read).
    pub max_requests_per_connection: usize,
    /// Connections served at once; more are closed right after accept.
    pub max_connections: usize,
    /// WRITE/READ payload buffered or in flight per connection before reading pauses.
    pub max_inflight_bytes: usize,
    /// Longest a client may take per read or write during the handshake.
    pub handshake_timeout: Duration,
    /// At stop: how long to wait for clients that stopped reading their replies.
    pub stop_grace: Duration,
    /// TLS credentials (`NBD_OPT_STARTTLS` is offered only with them).
    pub tls: Option<TlsConfig>,
    /// Whether clients must upgrade to TLS; `Off` unless `tls` is set.
    pub tls_policy: TlsPolicy,
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self {
            max_requests_per_connection: 128,
            max_connections: 64,
            max_inflight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(30),
            tls: None,
            tls_policy: TlsPolicy::Off,
        }
    }
}

/// Errors of the NBD frontend as a whole (per-connection problems are logged and
/// close only that connection).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD {what}: {detail}")]
    Bind { what: String, detail: String },
    #[error("NBD: {0}")]
    Config(String),
    #[error("NBD: {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Transmission flags of the export: flush, FUA, trim and write-zeroes are
/// supported; multi-conn is safe (see the module documentation).
pub fn export_flags() -> u16 {
    use proto::*;
    TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_CAN_MULTI_CONN
}

/// Percent-encode everything but unreserved characters and `/`.
fn uri_escape(s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `nbd+unix:///?socket=PATH` (the default export over a unix socket).
pub fn uri_for_unix(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    format!(
        "nbd+unix:///?socket={}",
        uri_escape(path.as_os_str().as_bytes())
    )
}

/// `nbd://HOST:PORT/` (the default export over TCP).
pub fn uri_for_tcp(addr: &SocketAddr) -> String {
    // SocketAddr's Display puts an IPv6 address in brackets, as URIs need.
    format!("nbd://{addr}/")
}

#[cfg(test)]
mod tests;
