//! The byte stream of one connection in the transmission phase, on the
//! connection's event loop: a socket read and written with io_uring (plain, or
//! through a TLS transport), or an in-memory stream for tests.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types};
use rbd_backend::aio;

use super::tls::TlsTransport;

/// Bytes received per read from the socket.
const RECV_CHUNK: usize = 256 << 10;

/// A connection's stream. Single-threaded: the reader and the sender of one
/// connection run on its loop; sends never interleave (the wire orders them).
pub trait Wire {
    /// Read some bytes into `buf`; 0 at the end of the stream.
    fn recv(&self, buf: &mut [u8]) -> impl std::future::Future<Output = io::Result<usize>>;
    /// Send all of `data`, after everything sent before.
    fn send_all(&self, data: Vec<u8>) -> impl std::future::Future<Output = io::Result<()>>;
}

/// A socket on the current event loop.
pub struct SockWire {
    fd: RawFd,
    tls: Option<RefCell<TlsTransport>>,
    /// Plaintext (or, without TLS, socket bytes) received but not yet read.
    pending: RefCell<Vec<u8>>,
    /// One send at a time keeps records in order (TLS) and replies whole.
    sending: Cell<bool>,
    sent: event_listener::Event,
}

impl SockWire {
    /// `fd` stays owned by the caller and open while this lives. `early` holds
    /// bytes the handshake read past its end (the first requests).
    pub fn new(fd: RawFd, tls: Option<TlsTransport>, early: Vec<u8>) -> Self {
        Self {
            fd,
            tls: tls.map(RefCell::new),
            pending: RefCell::new(early),
            sending: Cell::new(false),
            sent: event_listener::Event::new(),
        }
    }

    async fn recv_raw(&self) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; RECV_CHUNK];
        let sqe = opcode::Recv::new(types::Fd(self.fd), v.as_mut_ptr(), v.len() as u32).build();
        loop {
            // SAFETY: the SQE names `v`'s heap buffer, which the request owns
            // until it completes (a Vec's buffer does not move with the Vec).
            let op = unsafe { aio::submit(sqe.clone(), v) }?;
            let (res, back) = op.await;
            v = back;
            match res {
                r if r >= 0 => {
                    v.truncate(r as usize);
                    return Ok(v);
                }
                r if r == -libc::EINTR || r == -libc::EAGAIN => continue,
                r => return Err(io::Error::from_raw_os_error(-r)),
            }
        }
    }

    async fn send_raw(&self, mut data: Vec<u8>) -> io::Result<()> {
        let mut at = 0usize;
        while at < data.len() {
            // SAFETY: the SQE names bytes of `data`'s heap buffer, owned by the
            // request until it completes.
            let sqe = opcode::Send::new(
                types::Fd(self.fd),
                unsafe { data.as_ptr().add(at) },
                (data.len() - at) as u32,
            )
            .flags(libc::MSG_NOSIGNAL)
            .build();
            // SAFETY: as above; `at < data.len()`, so the pointer is in bounds.
            let op = unsafe { aio::submit(sqe, data) }?;
            let (res, back) = op.await;
            data = back;
            match res {
                r if r > 0 => at += r as usize,
                r if r == -libc::EINTR || r == -libc::EAGAIN => {}
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the socket took no bytes",
                    ))
                }
                r => return Err(io::Error::from_raw_os_error(-r)),
            }
        }
        Ok(())
    }

    async fn lock_send(&self) -> SendGuard<'_> {
        loop {
            if !self.sending.replace(true) {
                return SendGuard(self);
            }
            let l = self.sent.listen();
            if !self.sending.get() {
                continue;
            }
            l.await;
        }
    }

    /// Send what the TLS transport has queued (alerts, key updates, records).
    async fn flush_tls(&self) -> io::Result<()> {
        let Some(t) = &self.tls else { return Ok(()) };
        let _g = self.lock_send().await;
        let mut out = Vec::new();
        t.borrow_mut().take_ciphertext(&mut out)?;
        if out.is_empty() {
            return Ok(());
        }
        self.send_raw(out).await
    }

    /// Queue close_notify and send it (best effort).
    pub async fn close_tls(&self) {
        if let Some(t) = &self.tls {
            t.borrow_mut().close();
            let _ = self.flush_tls().await;
        }
    }
}

struct SendGuard<'a>(&'a SockWire);

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        self.0.sending.set(false);
        self.0.sent.notify(1);
    }
}

impl Wire for SockWire {
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut p = self.pending.borrow_mut();
                if !p.is_empty() {
                    let n = buf.len().min(p.len());
                    buf[..n].copy_from_slice(&p[..n]);
                    p.drain(..n);
                    return Ok(n);
                }
            }
            if let Some(t) = &self.tls {
                match t.borrow_mut().read_plaintext(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            let data = self.recv_raw().await?;
            if data.is_empty() {
                return Ok(0);
            }
            match &self.tls {
                None => *self.pending.borrow_mut() = data,
                Some(t) => {
                    // rustls holds a bounded amount of decrypted data: feed the
                    // ciphertext in steps, moving the plaintext out in between.
                    let mut at = 0;
                    let mut res = Ok(());
                    while at < data.len() {
                        let mut tt = t.borrow_mut();
                        match tt.receive_some(&data[at..]) {
                            Ok(n) => at += n,
                            Err(e) => {
                                res = Err(e);
                                break;
                            }
                        }
                        let mut chunk = [0u8; 16 << 10];
                        loop {
                            match tt.read_plaintext(&mut chunk) {
                                Ok(0) => break,
                                Ok(n) => self.pending.borrow_mut().extend_from_slice(&chunk[..n]),
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                                Err(e) => {
                                    res = Err(e);
                                    break;
                                }
                            }
                        }
                        if res.is_err() {
                            break;
                        }
                    }
                    // Key updates and alerts need an answer.
                    let sent = self.flush_tls().await;
                    res?;
                    sent?;
                }
            }
        }
    }

    async fn send_all(&self, data: Vec<u8>) -> io::Result<()> {
        let _g = self.lock_send().await;
        let Some(t) = &self.tls else {
            return self.send_raw(data).await;
        };
        let mut at = 0;
        while at < data.len() {
            let mut out = Vec::new();
            {
                let mut t = t.borrow_mut();
                let n = t.write_plaintext(&data[at..])?;
                at += n;
                t.take_ciphertext(&mut out)?;
                if n == 0 && out.is_empty() {
                    return Err(io::Error::other("the TLS transport takes no more data"));
                }
            }
            if !out.is_empty() {
                self.send_raw(out).await?;
            }
        }
        Ok(())
    }
}

/// An in-memory stream (tests): reads from `input`, collects what is sent.
pub struct MemWire {
    input: RefCell<std::io::Cursor<Vec<u8>>>,
    pub output: RefCell<Vec<u8>>,
}

impl MemWire {
    pub fn new(input: Vec<u8>) -> Self {
        Self {
            input: RefCell::new(std::io::Cursor::new(input)),
            output: RefCell::new(Vec::new()),
        }
    }
}

impl Wire for MemWire {
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // Yield once, so requests already running get a turn (as on a socket).
        futures_lite::future::yield_now().await;
        std::io::Read::read(&mut *self.input.borrow_mut(), buf)
    }

    async fn send_all(&self, data: Vec<u8>) -> io::Result<()> {
        self.output.borrow_mut().extend_from_slice(&data);
        Ok(())
    }
}
