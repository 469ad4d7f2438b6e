//! The transmission phase of one connection: read requests, check them against
//! the export, run them on a small pool of worker threads, send simple replies.
//!
//! * The connection's thread reads requests (and WRITE payloads) and queues them.
//!   Requests that fail a check are answered right there with an error; the
//!   stream stays usable. Only a request that breaks the framing (bad magic) or a
//!   short read ends the connection.
//! * `workers` scoped threads call the [`BlockTarget`] (blocking) and write the
//!   reply under a lock, so replies may leave in any order; the handle tells the
//!   client which request each one answers. A reply is sent only after the
//!   target returned: a client that vanishes loses nothing it saw acknowledged.
//! * Memory is bounded: at most `max_inflight_bytes` of payload (plus one
//!   request) is buffered or in flight per connection; beyond that the reader
//!   stops reading and TCP / the socket buffer pushes back on the client.
//! * When the reader stops (client DISC or EOF, a protocol error, or the server
//!   shutting the socket's read side), every queued request still runs and is
//!   answered before the function returns.

use std::io::{self, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use tracing::{debug, warn};

use super::proto::*;
use crate::target::BlockTarget;

/// A request that passed every check, ready for the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// A zero-length request: succeeds without touching the target.
    Nop,
}

/// What to do with a request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Run(Cmd),
    /// Answer with this error; first read and drop `skip` payload bytes (a
    /// rejected WRITE still carries its data, which must be consumed to stay in
    /// step with the client).
    Reject {
        error: u32,
        skip: u32,
    },
    /// `NBD_CMD_DISC`: finish what is in flight, then close.
    Disconnect,
}

/// Check a request against an export of `size` bytes.
///
/// Errors follow the protocol's advice: unknown commands, unknown or
/// inapplicable flags, misaligned or oversized requests and reads or trims past
/// the end get `EINVAL`; writes (and write-zeroes) past the end get `ENOSPC`.
pub fn decide(h: &RequestHeader, size: u64) -> Decision {
    let skip = if h.kind == CMD_WRITE { h.len } else { 0 };
    let reject = |error| Decision::Reject { error, skip };
    let allowed = match h.kind {
        CMD_DISC => return Decision::Disconnect,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        // CACHE, BLOCK_STATUS (not advertised), and anything unknown.
        _ => return reject(NBD_EINVAL),
    };
    if h.flags & !allowed != 0 {
        return reject(NBD_EINVAL);
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    if h.kind == CMD_FLUSH {
        // Offset and length are reserved and must be zero.
        return if h.offset == 0 && h.len == 0 {
            Decision::Run(Cmd::Flush)
        } else {
            reject(NBD_EINVAL)
        };
    }
    if matches!(h.kind, CMD_READ | CMD_WRITE) && h.len > MAX_PAYLOAD {
        return reject(NBD_EINVAL);
    }
    let bs = u64::from(MIN_BLOCK);
    if !h.offset.is_multiple_of(bs) || !u64::from(h.len).is_multiple_of(bs) {
        return reject(NBD_EINVAL);
    }
    let in_range = h
        .offset
        .checked_add(u64::from(h.len))
        .is_some_and(|end| end <= size);
    if !in_range {
        let error = match h.kind {
            CMD_WRITE | CMD_WRITE_ZEROES => NBD_ENOSPC,
            _ => NBD_EINVAL,
        };
        return reject(error);
    }
    if h.len == 0 {
        return Decision::Run(Cmd::Nop);
    }
    let (offset, len) = (h.offset, h.len);
    Decision::Run(match h.kind {
        CMD_READ => Cmd::Read { offset, len },
        CMD_WRITE => Cmd::Write { offset, len, fua },
        CMD_TRIM => Cmd::Trim { offset, len, fua },
        // NO_HOLE asks for the range to stay allocated. The engine's write-zeroes
        // reaches the backend, which zeroes with FALLOC_FL_ZERO_RANGE or
        // BLKZEROOUT where it can (allocated) and punches a hole only where those
        // are unsupported; the data reads back as zeroes either way, which is what
        // the client relies on. The ublk path treats REQ_NOUNMAP the same way.
        _ => Cmd::WriteZeroes { offset, len, fua },
    })
}

/// How a connection's transmission phase ended without a protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client (or the server's shutdown) closed the read side between requests.
    Closed,
}

/// Tuning of one connection.
#[derive(Debug, Clone)]
pub struct TransmitConfig {
    /// Size of the export.
    pub size: u64,
    /// Worker threads calling the target.
    pub workers: usize,
    /// Payload bytes buffered or in flight before the reader waits.
    pub max_inflight_bytes: usize,
    /// For logs.
    pub peer: String,
}

/// Payload bytes held by queued or running requests, with a wait for room.
struct Budget {
    used: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

impl Budget {
    fn acquire(&self, n: usize) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        // A request larger than the budget still runs, alone.
        while *used > 0 && *used + n > self.max {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += n;
    }

    fn release(&self, n: usize) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }
}

struct Job {
    handle: u64,
    cmd: Cmd,
    /// WRITE data.
    payload: Vec<u8>,
    charge: usize,
}

/// What the reader and the workers share.
struct Shared<'a, W> {
    target: &'a dyn BlockTarget,
    out: &'a Mutex<W>,
    budget: Budget,
    /// A reply could not be written: the client is gone. Later replies are dropped.
    broken: AtomicBool,
    /// Rejected requests logged so far (the log is not a client's to flood).
    rejects_logged: AtomicUsize,
    peer: &'a str,
}

const REJECTS_LOGGED: usize = 8;

impl<W: Write> Shared<'_, W> {
    /// Send one reply (header at the start of `buf`, then any data).
    fn reply(&self, buf: &[u8]) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out.write_all(buf).and_then(|()| out.flush()) {
            if !self.broken.swap(true, Ordering::AcqRel) {
                debug!(
                    peer = self.peer,
                    "writing a reply failed: {e}; dropping further replies"
                );
            }
        }
    }

    fn reply_error(&self, handle: u64, error: u32) {
        let mut hdr = [0u8; SIMPLE_REPLY_LEN];
        encode_simple_reply(&mut hdr, error, handle);
        self.reply(&hdr);
    }

    fn note_reject(&self, h: &RequestHeader, error: u32) {
        let n = self.rejects_logged.fetch_add(1, Ordering::Relaxed);
        if n < REJECTS_LOGGED {
            warn!(
                peer = self.peer,
                kind = h.kind,
                flags = h.flags,
                offset = h.offset,
                len = h.len,
                "request refused with error {error}{}",
                if n + 1 == REJECTS_LOGGED {
                    " (further refusals on this connection are logged at debug level)"
                } else {
                    ""
                }
            );
        } else {
            debug!(peer = self.peer, ?h, error, "request refused");
        }
    }

    fn execute(&self, job: Job) {
        let Job {
            handle,
            cmd,
            payload,
            charge,
        } = job;
        let t = self.target;
        let mut read_buf = Vec::new();
        let res = catch_unwind(AssertUnwindSafe(|| match cmd {
            Cmd::Read { offset, len } => {
                read_buf = vec![0u8; SIMPLE_REPLY_LEN + len as usize];
                t.read(offset, &mut read_buf[SIMPLE_REPLY_LEN..])
            }
            Cmd::Write { offset, fua, .. } => t.write(offset, &payload, fua),
            Cmd::Flush => t.flush(),
            Cmd::Trim { offset, len, fua } => {
                t.discard(offset, u64::from(len))
                    .and_then(|()| if fua { t.flush() } else { Ok(()) })
            }
            Cmd::WriteZeroes { offset, len, fua } => t
                .write_zeroes(offset, u64::from(len))
                .and_then(|()| if fua { t.flush() } else { Ok(()) }),
            Cmd::Nop => Ok(()),
        }));
        drop(payload);
        let error = match res {
            Ok(Ok(())) => 0,
            Ok(Err(e)) => {
                warn!(peer = self.peer, ?cmd, "target error: {e}");
                nbd_errno(e.errno())
            }
            Err(_) => {
                tracing::error!(
                    peer = self.peer,
                    ?cmd,
                    "target panicked; failing the request with EIO"
                );
                NBD_EIO
            }
        };
        if error == 0 && matches!(cmd, Cmd::Read { .. }) {
            let mut hdr = [0u8; SIMPLE_REPLY_LEN];
            encode_simple_reply(&mut hdr, 0, handle);
            read_buf[..SIMPLE_REPLY_LEN].copy_from_slice(&hdr);
            self.reply(&read_buf);
        } else {
            // A failed read is answered without data, as the protocol allows.
            self.reply_error(handle, error);
        }
        drop(read_buf);
        self.budget.release(charge);
    }
}

/// Read a request header; `Ok(None)` at a clean end of stream.
fn read_header(r: &mut impl Read) -> Result<Option<[u8; REQUEST_LEN]>, ConnError> {
    let mut b = [0u8; REQUEST_LEN];
    let mut got = 0;
    while got < REQUEST_LEN {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ConnError::Truncated("in the middle of a request header")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ConnError::io("reading a request", e)),
        }
    }
    Ok(Some(b))
}

fn read_payload(r: &mut impl Read, len: u32) -> Result<Vec<u8>, ConnError> {
    let mut v = Vec::with_capacity(len as usize);
    r.take(u64::from(len))
        .read_to_end(&mut v)
        .map_err(|e| ConnError::io("reading write data", e))?;
    if v.len() != len as usize {
        return Err(ConnError::Truncated("in the middle of write data"));
    }
    Ok(v)
}

/// Serve requests from `reader` until the client disconnects, the stream ends,
/// or the client breaks the protocol. Replies go to `out`. Every request that was
/// read completely is executed and answered (if the client still listens) before
/// this returns.
pub fn transmit<R: Read, W: Write + Send>(
    reader: &mut R,
    out: &Mutex<W>,
    target: &dyn BlockTarget,
    cfg: &TransmitConfig,
) -> Result<End, ConnError> {
    let shared = Shared {
        target,
        out,
        budget: Budget {
            used: Mutex::new(0),
            freed: Condvar::new(),
            max: cfg.max_inflight_bytes.max(1),
        },
        broken: AtomicBool::new(false),
        rejects_logged: AtomicUsize::new(0),
        peer: &cfg.peer,
    };
    let workers = cfg.workers.max(1);
    let (tx, rx) = crossbeam_channel::bounded::<Job>(workers * 2);
    std::thread::scope(|s| {
        let mut spawned = 0;
        for i in 0..workers {
            let rx = rx.clone();
            let sh = &shared;
            let h = std::thread::Builder::new()
                .name(format!("nbd-w{i}"))
                .spawn_scoped(s, move || {
                    for job in rx {
                        sh.execute(job);
                    }
                });
            match h {
                Ok(_) => spawned += 1,
                Err(e) => {
                    warn!(peer = cfg.peer, "could not start worker thread {i}: {e}");
                    break;
                }
            }
        }
        drop(rx);
        if spawned == 0 {
            return Err(ConnError::Internal(
                "no worker thread could be started".into(),
            ));
        }
        let res = read_loop(reader, &tx, &shared, cfg.size);
        // Closing the queue lets the workers drain it and exit; the scope joins
        // them, so every request read is answered before this returns.
        drop(tx);
        res
    })
}

fn read_loop<R: Read, W: Write>(
    r: &mut R,
    tx: &crossbeam_channel::Sender<Job>,
    sh: &Shared<'_, W>,
    size: u64,
) -> Result<End, ConnError> {
    loop {
        let Some(hb) = read_header(r)? else {
            return Ok(End::Closed);
        };
        let h = parse_request(&hb)?;
        match decide(&h, size) {
            Decision::Disconnect => return Ok(End::Disconnect),
            Decision::Reject { error, skip } => {
                skip_bytes(r, skip, "in the middle of write data")?;
                sh.note_reject(&h, error);
                sh.reply_error(h.handle, error);
            }
            Decision::Run(cmd) => {
                let charge = match cmd {
                    Cmd::Read { len, .. } | Cmd::Write { len, .. } => len as usize,
                    _ => 0,
                };
                sh.budget.acquire(charge);
                let payload = match cmd {
                    Cmd::Write { len, .. } => match read_payload(r, len) {
                        Ok(p) => p,
                        Err(e) => {
                            sh.budget.release(charge);
                            return Err(e);
                        }
                    },
                    _ => Vec::new(),
                };
                let job = Job {
                    handle: h.handle,
                    cmd,
                    payload,
                    charge,
                };
                if let Err(crossbeam_channel::SendError(job)) = tx.send(job) {
                    // Cannot happen while this function holds a receiver's peers
                    // alive, but never drop a request silently.
                    sh.budget.release(job.charge);
                    sh.reply_error(job.handle, NBD_EIO);
                }
            }
        }
    }
}
