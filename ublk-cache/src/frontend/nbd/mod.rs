//! NBD frontend: serves a [`BlockTarget`](crate::target::BlockTarget) over the
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
//! # Threads, not tokio
//!
//! The engine is blocking: every [`BlockTarget`](crate::target::BlockTarget)
//! call holds its thread until the I/O is done. Under an async runtime each
//! request would hop to `spawn_blocking` anyway, adding a runtime, a second
//! thread pool and a dependency for no gain. A server has few connections (one
//! or a handful per VM disk), so plain threads are the simpler, easier to reason
//! about design: one thread per connection reads requests, a small pool of
//! scoped worker threads per connection runs them (so replies can leave out of
//! order), and one acceptor thread polls the listeners. Stopping is explicit:
//! shut the read side of each socket, let the workers drain, join.
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
    /// Threads per connection that call the target (requests in flight per connection).
    pub workers_per_connection: usize,
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
            workers_per_connection: 16,
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
