//! TLS for NBD (`NBD_OPT_STARTTLS`), over rustls with the ring provider.
//!
//! Two layers, kept apart on purpose:
//!
//! * [`TlsTransport`] is sans-IO: a rustls `ServerConnection` fed with bytes
//!   read from the socket and drained of bytes to write to it. It never touches
//!   a file descriptor, so an event loop (io_uring, one per connection) can
//!   drive it as well as a blocking thread.
//! * [`BlockingTls`] drives a transport over a blocking socket for the
//!   thread-per-connection server: it runs the handshake and splits into a
//!   [`TlsReader`] (the connection's reading thread) and a [`TlsWriter`] (its
//!   workers' replies). Neither holds the TLS state's lock while it blocks on
//!   the socket, and ciphertext leaves in the order rustls produced it.
//!
//! Server certificate and key come from PEM files; with a CA file, clients
//! must present a certificate that CA signed (otherwise any client may
//! connect, encrypted). TLS 1.2 and 1.3. TLS-PSK is not offered: no released
//! rustls supports external pre-shared keys.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use super::NbdError;

/// Where the server's TLS credentials are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; `None`:
    /// clients are not asked for a certificate.
    pub ca: Option<PathBuf>,
}

/// A loaded server configuration, shared by every connection.
#[derive(Clone)]
pub struct TlsConfig {
    config: Arc<ServerConfig>,
    verifies_clients: bool,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("verifies_clients", &self.verifies_clients)
            .finish()
    }
}

fn tls_err(what: String) -> NbdError {
    NbdError::Config(format!("TLS: {what}"))
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, NbdError> {
    File::open(path).map_err(|e| tls_err(format!("{what} {}: {e}", path.display())))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(format!("{what} {}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            tls_err(format!(
                "{what} {}: not a PEM certificate file: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(tls_err(format!(
            "{what} {}: holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

impl TlsConfig {
    /// Load the files and build the rustls configuration; every problem is
    /// named with the file it is in.
    pub fn load(files: &TlsFiles) -> Result<Self, NbdError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certs(&files.cert, "--tls-cert")?;
        File::open(&files.key)
            .map_err(|e| tls_err(format!("--tls-key {}: {e}", files.key.display())))?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
            tls_err(format!(
                "--tls-key {}: no PEM private key in it: {e}",
                files.key.display()
            ))
        })?;
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(format!("protocol versions: {e}")))?;
        let builder = match &files.ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in certs(ca, "--tls-ca")? {
                    roots.add(c).map_err(|e| {
                        tls_err(format!(
                            "--tls-ca {}: unusable CA certificate: {e}",
                            ca.display()
                        ))
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| tls_err(format!("--tls-ca {}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(chain, key).map_err(|e| {
            tls_err(format!(
                "--tls-cert {} and --tls-key {} do not make a usable pair: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
        Ok(Self {
            config: Arc::new(config),
            verifies_clients: files.ca.is_some(),
        })
    }

    /// Client certificates are required and checked against the CA.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }
}

fn proto_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

/// One connection's TLS state, without any I/O of its own.
pub struct TlsTransport {
    conn: ServerConnection,
}

impl TlsTransport {
    pub fn new(cfg: &TlsConfig) -> io::Result<Self> {
        let conn = ServerConnection::new(Arc::clone(&cfg.config)).map_err(proto_err)?;
        Ok(Self { conn })
    }

    /// Bytes read from the socket. All of `data` is taken (rustls buffers what
    /// it cannot process yet); a protocol violation or a refused certificate
    /// is an error, after which the connection is unusable (an alert to tell
    /// the peer may be waiting in [`TlsTransport::take_ciphertext`]).
    pub fn receive_ciphertext(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.conn.read_tls(&mut data)?;
            if n == 0 {
                break;
            }
            self.conn.process_new_packets().map_err(proto_err)?;
        }
        Ok(())
    }

    /// Feed bytes read from the socket, as many as rustls takes now (it takes
    /// less than all while decrypted bytes wait to be read): returns how many.
    pub fn receive_some(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let before = data.len();
        if !data.is_empty() {
            self.conn.read_tls(&mut data)?;
            self.conn.process_new_packets().map_err(proto_err)?;
        }
        Ok(before - data.len())
    }

    /// Decrypted bytes. `WouldBlock`: none yet, feed more ciphertext; `Ok(0)`:
    /// the peer closed TLS cleanly (close_notify).
    pub fn read_plaintext(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn.reader().read(buf)
    }

    /// Plaintext to encrypt; returns how much was taken (less than all when
    /// rustls's buffer is full: drain [`TlsTransport::take_ciphertext`] first).
    pub fn write_plaintext(&mut self, data: &[u8]) -> io::Result<usize> {
        self.conn.writer().write(data)
    }

    /// Move every byte waiting to be sent to the socket into `out`.
    pub fn take_ciphertext(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(out)?;
        }
        Ok(())
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Queue close_notify (sent with the next [`TlsTransport::take_ciphertext`]).
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }
}

/// A transport shared by one connection's reader and writer halves. Lock order:
/// `tls`, then `sock_out`; the socket is written under `sock_out` only, so
/// records leave in the order they were made.
struct Shared<S> {
    tls: Mutex<TlsTransport>,
    sock_out: Mutex<S>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: Write> Shared<S> {
    /// Send what the transport has queued. Takes the socket lock before
    /// letting go of the TLS lock, so no other thread's later records can
    /// overtake these.
    fn flush_out(&self, mut tls: MutexGuard<'_, TlsTransport>) -> io::Result<()> {
        let mut buf = Vec::new();
        tls.take_ciphertext(&mut buf)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut sock = lock(&self.sock_out);
        drop(tls);
        sock.write_all(&buf)?;
        sock.flush()
    }
}

/// Runs a [`TlsTransport`] over a blocking socket: `R` reads it, `W` writes it
/// (two handles of the same socket).
pub struct BlockingTls;

impl BlockingTls {
    /// The TLS handshake right after `NBD_REP_ACK` to `NBD_OPT_STARTTLS`.
    /// `early` holds bytes already read from the socket past the option (a
    /// client that did not wait for the ACK). The socket's timeouts bound it.
    pub fn handshake<R: Read, W: Write>(
        cfg: &TlsConfig,
        mut sock_in: R,
        mut sock_out: W,
        early: &[u8],
    ) -> io::Result<(TlsReader<R, W>, TlsWriter<W>)> {
        fn send<W: Write>(t: &mut TlsTransport, sock: &mut W) -> io::Result<()> {
            let mut out = Vec::new();
            t.take_ciphertext(&mut out)?;
            if !out.is_empty() {
                sock.write_all(&out)?;
                sock.flush()?;
            }
            Ok(())
        }
        let mut t = TlsTransport::new(cfg)?;
        let mut buf = vec![0u8; 16 << 10];
        let mut res = t.receive_ciphertext(early);
        loop {
            // Send what there is, an alert after a failure included.
            let sent = send(&mut t, &mut sock_out);
            res?;
            sent?;
            if !t.is_handshaking() {
                break;
            }
            let n = sock_in.read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection during the TLS handshake",
                ));
            }
            res = t.receive_ciphertext(&buf[..n]);
        }
        // Session tickets and the like, queued as the handshake completed.
        send(&mut t, &mut sock_out)?;
        let shared = Arc::new(Shared {
            tls: Mutex::new(t),
            sock_out: Mutex::new(sock_out),
        });
        Ok((
            TlsReader {
                shared: Arc::clone(&shared),
                sock_in,
                buf,
            },
            TlsWriter { shared },
        ))
    }
}

impl BlockingTls {
    /// The TLS state of a connection whose handshake is done, for the event
    /// loop that serves its transmission (the two halves give it up).
    pub fn into_transport<R, W>(
        reader: TlsReader<R, W>,
        writer: TlsWriter<W>,
    ) -> io::Result<TlsTransport> {
        drop(writer);
        let shared = Arc::try_unwrap(reader.shared)
            .map_err(|_| io::Error::other("the TLS session is still shared"))?;
        Ok(shared.tls.into_inner().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The reading half: decrypted bytes from the socket.
pub struct TlsReader<R, W> {
    shared: Arc<Shared<W>>,
    sock_in: R,
    buf: Vec<u8>,
}

impl<R: Read, W: Write> Read for TlsReader<R, W> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut tls = lock(&self.shared.tls);
                match tls.read_plaintext(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // Block on the socket without holding the TLS state.
            let n = self.sock_in.read(&mut self.buf)?;
            if n == 0 {
                // The socket ended without close_notify (or our own shutdown
                // of the read side at stop): the stream ends here.
                return Ok(0);
            }
            let mut tls = lock(&self.shared.tls);
            let res = tls.receive_ciphertext(&self.buf[..n]);
            // Key updates and alerts need an answer.
            let sent = self.shared.flush_out(tls);
            res?;
            sent?;
        }
    }
}

/// The writing half: plaintext in, encrypted onto the socket at once.
pub struct TlsWriter<W> {
    shared: Arc<Shared<W>>,
}

impl<W: Write> TlsWriter<W> {
    /// Send close_notify (best effort: the peer may be gone).
    pub fn close(&self) {
        let mut tls = lock(&self.shared.tls);
        tls.close();
        let _ = self.shared.flush_out(tls);
    }
}

impl<W: Write> Write for TlsWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut tls = lock(&self.shared.tls);
        let n = tls.write_plaintext(data)?;
        self.shared.flush_out(tls)?;
        if n == 0 && !data.is_empty() {
            // Buffer full even after draining: try once more with room made.
            let mut tls = lock(&self.shared.tls);
            let n = tls.write_plaintext(data)?;
            self.shared.flush_out(tls)?;
            return Ok(n);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let tls = lock(&self.shared.tls);
        self.shared.flush_out(tls)
    }
}
