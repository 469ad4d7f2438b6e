//! Listeners and connections: bind unix and TCP sockets, accept clients, run
//! one thread per connection (handshake, then transmission), and stop cleanly.

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::handshake::{ExportInfo, Negotiated, Negotiation, Session, TlsPolicy};
use super::proto::ConnError;
use super::tls::{BlockingTls, TlsTransport};
use super::transmission::{transmit, End, TransmitConfig};
use super::wire::SockWire;
use super::{export_flags, uri_for_tcp, uri_for_unix, ListenSpec, NbdError, NbdOptions};
use crate::target::AsyncTarget;

/// A connected client socket of either kind.
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }

    fn shutdown(&self, how: Shutdown) {
        // ENOTCONN once the peer is gone: nothing left to shut down.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }

    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Bound {
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// (device, inode) of the socket we created, so we only ever remove our own.
        ident: (u64, u64),
    },
    Tcp {
        listener: TcpListener,
        addr: SocketAddr,
    },
}

impl Bound {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Bound::Unix { listener, .. } => listener.as_fd(),
            Bound::Tcp { listener, .. } => listener.as_fd(),
        }
    }

    fn uri(&self) -> String {
        match self {
            Bound::Unix { path, .. } => uri_for_unix(path),
            Bound::Tcp { addr, .. } => uri_for_tcp(addr),
        }
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Bound::Unix { listener, path, .. } => {
                let (s, _) = listener.accept()?;
                Ok((Stream::Unix(s), format!("unix:{}", path.display())))
            }
            Bound::Tcp { listener, .. } => {
                let (s, peer) = listener.accept()?;
                // Replies are written whole; do not hold small ones back.
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), format!("tcp:{peer}")))
            }
        }
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Bound::Unix { path, ident, .. } = self {
            match std::fs::symlink_metadata(&*path) {
                Ok(m) if (m.dev(), m.ino()) == *ident => {
                    if let Err(e) = std::fs::remove_file(&*path) {
                        warn!("removing NBD socket {}: {e}", path.display());
                    }
                }
                _ => {}
            }
        }
    }
}

/// Bound sockets, not yet accepting. Binding before the engine attaches lets a
/// busy address or a bad path fail the start before any data is touched.
pub struct Listeners {
    bound: Vec<Bound>,
}

impl Listeners {
    /// Bind every spec. Unix sockets get `socket_mode` (e.g. `0o600`); a stale
    /// socket file (nobody listening) is replaced, a live one is refused.
    pub fn bind(specs: &[ListenSpec], socket_mode: u32) -> Result<Self, NbdError> {
        let mut bound = Vec::with_capacity(specs.len());
        for spec in specs {
            bound.push(match spec {
                ListenSpec::Unix(path) => bind_unix(path, socket_mode)?,
                ListenSpec::Tcp { host, port } => bind_tcp(host, *port)?,
            });
        }
        Ok(Self { bound })
    }

    /// One URI per listener, in the order of the specs.
    pub fn uris(&self) -> Vec<String> {
        self.bound.iter().map(Bound::uri).collect()
    }
}

fn bind_unix(path: &Path, mode: u32) -> Result<Bound, NbdError> {
    let err = |what: String| NbdError::Bind {
        what: format!("unix socket {}", path.display()),
        detail: what,
    };
    let (listener, path) = crate::unix_socket::bind(path, mode, "NBD").map_err(err)?;
    let meta =
        std::fs::symlink_metadata(&path).map_err(|e| err(format!("stat after bind: {e}")))?;
    Ok(Bound::Unix {
        listener,
        path,
        ident: (meta.dev(), meta.ino()),
    })
}

fn bind_tcp(host: &str, port: u16) -> Result<Bound, NbdError> {
    let host = if host.is_empty() { "127.0.0.1" } else { host };
    let what = format!("tcp {host}:{port}");
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| NbdError::Bind {
            what: what.clone(),
            detail: format!("cannot resolve: {e}"),
        })?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpListener::bind(a) {
            Ok(listener) => {
                let addr = listener.local_addr().unwrap_or(a);
                return Ok(Bound::Tcp { listener, addr });
            }
            Err(e) => last = Some(e),
        }
    }
    Err(NbdError::Bind {
        what,
        detail: last.map_or("the name resolves to no address".into(), |e| {
            format!("bind: {e}")
        }),
    })
}

struct Conn {
    /// A clone of the socket, to shut it down from the outside.
    ctl: Stream,
    thread: JoinHandle<()>,
}

/// A running NBD server: listeners plus the threads of the connections.
pub struct NbdServer {
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    conns: Arc<Mutex<HashMap<u64, Conn>>>,
    uris: Vec<String>,
    grace: Duration,
}

impl NbdServer {
    /// Start accepting on `listeners`, serving `target` to every client.
    pub fn start<T: AsyncTarget + 'static>(
        listeners: Listeners,
        target: Arc<T>,
        opts: NbdOptions,
    ) -> Result<Self, NbdError> {
        let size = target.size();
        if size == 0 || !size.is_multiple_of(u64::from(super::proto::MIN_BLOCK)) {
            return Err(NbdError::Config(format!(
                "export size {size} is not a positive multiple of 512"
            )));
        }
        for b in &listeners.bound {
            let r = match b {
                Bound::Unix { listener, .. } => listener.set_nonblocking(true),
                Bound::Tcp { listener, .. } => listener.set_nonblocking(true),
            };
            r.map_err(|e| NbdError::Io {
                op: "setting a listener non-blocking",
                source: e,
            })?;
        }
        if opts.tls_policy != TlsPolicy::Off && opts.tls.is_none() {
            return Err(NbdError::Config(
                "TLS is asked for (--tls) but no certificate is configured (--tls-cert, --tls-key)"
                    .into(),
            ));
        }
        for b in &listeners.bound {
            if let Bound::Tcp { addr, .. } = b {
                if addr.ip().is_loopback() {
                    continue;
                }
                match opts.tls_policy {
                    TlsPolicy::Require => {}
                    TlsPolicy::Optional => warn!(
                        %addr,
                        "NBD over TCP with optional TLS: a client that does not upgrade reads and writes the disk in clear text, unauthenticated (--tls require refuses such clients)"
                    ),
                    TlsPolicy::Off => warn!(
                        %addr,
                        "NBD without TLS has no authentication and no encryption: anyone who can reach this address can read and write the disk (use --tls-cert/--tls-key, or a unix socket)"
                    ),
                }
            }
        }
        let uris = listeners.uris();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<HashMap<u64, Conn>>> = Arc::default();
        let grace = opts.stop_grace;
        let acceptor = {
            let stop = Arc::clone(&stop);
            let conns = Arc::clone(&conns);
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(listeners, target, opts, stop, conns))
                .map_err(|e| NbdError::Io {
                    op: "starting the NBD accept thread",
                    source: e,
                })?
        };
        for u in &uris {
            info!(uri = %u, "NBD export listening");
        }
        Ok(Self {
            stop,
            acceptor: Some(acceptor),
            conns,
            uris,
            grace,
        })
    }

    /// One URI per listener, in the order they were given.
    pub fn uris(&self) -> &[String] {
        &self.uris
    }

    /// Connections currently open.
    pub fn connections(&self) -> usize {
        let mut c = lock(&self.conns);
        c.retain(|_, conn| !conn.thread.is_finished());
        c.len()
    }

    /// Stop: close the listeners (unix socket files are removed), stop reading
    /// requests, let every request already read finish and be answered, then
    /// close the connections. Returns when no connection thread is left, so the
    /// engine can be shut down afterwards.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(a) = self.acceptor.take() {
            if a.join().is_err() {
                error!("the NBD accept thread panicked");
            }
        }
        let conns: Vec<(u64, Conn)> = lock(&self.conns).drain().collect();
        let open = conns
            .iter()
            .filter(|(_, c)| !c.thread.is_finished())
            .count();
        if open == 0 {
            info!("NBD export stopped");
            return;
        }
        info!(
            connections = open,
            "NBD: no new requests; finishing the ones in flight"
        );
        for (_, c) in &conns {
            c.ctl.shutdown(Shutdown::Read);
        }
        let start = Instant::now();
        let mut forced = false;
        for (id, c) in conns {
            while !c.thread.is_finished() {
                if !forced && start.elapsed() > self.grace {
                    // Requests still running in the engine finish regardless; this
                    // only unblocks replies to a client that stopped reading them.
                    warn!(
                        "NBD clients still connected after {:?}; closing their sockets",
                        self.grace
                    );
                    forced = true;
                }
                if forced {
                    c.ctl.shutdown(Shutdown::Both);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if c.thread.join().is_err() {
                error!(conn = id, "an NBD connection thread panicked");
            }
        }
        info!("NBD export stopped");
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.stop_inner();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop<T: AsyncTarget + 'static>(
    listeners: Listeners,
    target: Arc<T>,
    opts: NbdOptions,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, Conn>>>,
) {
    let fds: Vec<BorrowedFd<'_>> = listeners.bound.iter().map(Bound::fd).collect();
    let export = ExportInfo {
        size: target.size(),
        flags: export_flags(),
    };
    let mut next_id = 0u64;
    while !stop.load(Ordering::Acquire) {
        let ready = match crate::unix_socket::poll_readable(&fds, Duration::from_millis(100)) {
            Ok(r) => r,
            Err(e) => {
                error!("NBD: poll on the listeners failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        for (b, _) in listeners.bound.iter().zip(ready).filter(|(_, r)| *r) {
            let (stream, origin) = match b.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    // EMFILE and the like: log, back off, keep serving the others.
                    warn!("NBD: accept on {} failed: {e}", b.uri());
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            next_id += 1;
            let id = next_id;
            let mut table = lock(&conns);
            table.retain(|_, c| !c.thread.is_finished());
            if table.len() >= opts.max_connections {
                warn!(
                    conn = id,
                    origin,
                    max = opts.max_connections,
                    "NBD: too many connections; closing the new one"
                );
                continue;
            }
            if let Err(e) = spawn_conn(id, stream, origin, &target, &export, &opts, &mut table) {
                warn!(conn = id, "NBD: could not start a connection thread: {e}");
            }
        }
    }
    // Dropping `listeners` closes them and removes the unix socket files.
    drop(fds);
    drop(listeners);
}

fn spawn_conn<T: AsyncTarget + 'static>(
    id: u64,
    stream: Stream,
    origin: String,
    target: &Arc<T>,
    export: &ExportInfo,
    opts: &NbdOptions,
    table: &mut HashMap<u64, Conn>,
) -> io::Result<()> {
    let ctl = stream.try_clone()?;
    // `ctl` keeps the socket open until the entry is reaped, so the thread shuts
    // the connection down itself when it is done, whatever the outcome.
    let closer = stream.try_clone()?;
    let target = Arc::clone(target);
    let export = export.clone();
    let opts = opts.clone();
    let thread = std::thread::Builder::new()
        .name(format!("nbd-c{id}"))
        .spawn(move || {
            let peer = format!("#{id} {origin}");
            let res = catch_unwind(AssertUnwindSafe(|| {
                serve_conn(stream, &peer, &target, &export, &opts)
            }))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                Err(ConnError::Internal(msg))
            });
            closer.shutdown(Shutdown::Both);
            match res {
                Ok(how) => info!(peer, "NBD connection closed ({how})"),
                Err(ConnError::Truncated(w)) => {
                    warn!(peer, "NBD connection closed by the client {w}")
                }
                Err(e @ ConnError::Io { .. }) => warn!(peer, "NBD connection failed: {e}"),
                Err(e) => error!(peer, "closing NBD connection: {e}"),
            }
        })?;
    table.insert(id, Conn { ctl, thread });
    Ok(())
}

fn serve_conn<T: AsyncTarget + 'static>(
    stream: Stream,
    peer: &str,
    target: &Arc<T>,
    export: &ExportInfo,
    opts: &NbdOptions,
) -> Result<&'static str, ConnError> {
    let io_err = |context| move |e| ConnError::io(context, e);
    debug!(peer, "NBD client connected");
    // A client gets `handshake_timeout` per read or write during the handshake
    // (the TLS one included); once it is in transmission, an idle connection is
    // legitimate.
    stream
        .set_timeouts(Some(opts.handshake_timeout))
        .map_err(io_err("setting socket timeouts"))?;
    let timeouts = stream.try_clone().map_err(io_err("cloning the socket"))?;
    let mut reader = BufReader::with_capacity(
        256 << 10,
        stream.try_clone().map_err(io_err("cloning the socket"))?,
    );
    let mut writer = stream;
    let policy = match opts.tls {
        Some(_) => opts.tls_policy,
        None => TlsPolicy::Off,
    };
    let mut n = Negotiation::greet(&mut reader, &mut writer, policy)?;
    let session = match n.haggle(&mut reader, &mut writer, export)? {
        Negotiated::Aborted => return Ok("client ended the handshake"),
        Negotiated::Transmission(s) => s,
        Negotiated::StartTls => {
            let Some(cfg) = &opts.tls else {
                return Err(ConnError::Internal(
                    "TLS acknowledged on a listener without TLS".into(),
                ));
            };
            // Bytes the client sent past the option (it should have waited for
            // the ACK) belong to the TLS stream.
            let early = reader.buffer().to_vec();
            let raw = reader.into_inner();
            let (tr, mut tw) = BlockingTls::handshake(cfg, raw, writer, &early)
                .map_err(io_err("TLS handshake"))?;
            n.tls_started();
            info!(peer, "NBD client upgraded to TLS");
            let mut reader = BufReader::with_capacity(256 << 10, tr);
            let session = match n.haggle(&mut reader, &mut tw, export)? {
                Negotiated::Aborted => {
                    tw.close();
                    return Ok("client ended the handshake (TLS)");
                }
                Negotiated::Transmission(s) => s,
                Negotiated::StartTls => {
                    return Err(ConnError::Internal("a second TLS upgrade".into()))
                }
            };
            timeouts
                .set_timeouts(None)
                .map_err(io_err("clearing socket timeouts"))?;
            // Plaintext the handshake's reader took past its end: the first requests.
            let early = reader.buffer().to_vec();
            let tls = BlockingTls::into_transport(reader.into_inner(), tw)
                .map_err(|e| ConnError::Internal(format!("taking over the TLS session: {e}")))?;
            return run_transmission(
                timeouts.fd(),
                Some(tls),
                early,
                target,
                export,
                opts,
                session,
                peer,
            );
        }
    };
    timeouts
        .set_timeouts(None)
        .map_err(io_err("clearing socket timeouts"))?;
    let early = reader.buffer().to_vec();
    drop(reader);
    drop(writer);
    run_transmission(
        timeouts.fd(),
        None,
        early,
        target,
        export,
        opts,
        session,
        peer,
    )
}

/// The transmission phase, on an event loop of this connection's thread. The
/// socket `fd` stays open (the caller holds it) until this returns.
#[allow(clippy::too_many_arguments)]
fn run_transmission<T: AsyncTarget + 'static>(
    fd: RawFd,
    tls: Option<TlsTransport>,
    early: Vec<u8>,
    target: &Arc<T>,
    export: &ExportInfo,
    opts: &NbdOptions,
    session: Session,
    peer: &str,
) -> Result<&'static str, ConnError> {
    info!(peer, ?session, "NBD client entered transmission");
    let cfg = TransmitConfig {
        size: export.size,
        max_inflight_bytes: opts.max_inflight_bytes,
        max_requests: opts.max_requests_per_connection,
        session,
        peer: peer.to_string(),
    };
    let lp = rbd_backend::aio::EventLoop::new().map_err(|e| {
        ConnError::Internal(format!("cannot make the connection's event loop: {e}"))
    })?;
    let wire = std::rc::Rc::new(SockWire::new(fd, tls, early));
    let res = lp
        .block_on(async {
            let r = transmit(std::rc::Rc::clone(&wire), Arc::clone(target), &cfg).await;
            wire.close_tls().await;
            r
        })
        .map_err(|e| ConnError::Internal(format!("the connection's event loop failed: {e}")))?;
    res.map(|end| match end {
        End::Disconnect => "client sent NBD_CMD_DISC",
        End::Closed => "end of stream",
    })
}
