//! The transmission phase of one connection: read requests, check them against
//! the export, run them on a small pool of worker threads, send replies in the
//! negotiated style (simple; structured chunks; or extended headers, whose
//! requests carry 64-bit lengths).
//!
//! * READ with structured replies: one `OFFSET_DATA` chunk, or, where the data
//!   has long all-zero stretches, `OFFSET_HOLE` chunks for those (less to send).
//! * BLOCK_STATUS (with `base:allocation` selected): the target's extents as one
//!   status chunk.
//! * Errors with structured replies: an `ERROR` chunk with a short message.
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

use super::handshake::Session;
use super::proto::*;
use crate::target::{BlockTarget, Extent};

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
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
    /// `base:allocation` of the range; with `req_one`, one extent only.
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
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
        skip: u64,
    },
    /// `NBD_CMD_DISC`: finish what is in flight, then close.
    Disconnect,
}

/// The payload bytes that follow a request header. A WRITE always carries its
/// data: with extended headers the protocol says it sets `PAYLOAD_LEN`, but
/// QEMU's client (10.0) leaves the flag out, so a WRITE without it is taken as
/// carrying `len` bytes all the same.
pub fn payload_len(h: &RequestHeader, session: &Session) -> u64 {
    if session.style == ReplyStyle::Extended {
        if h.kind == CMD_WRITE || h.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
            h.len
        } else {
            0
        }
    } else if h.kind == CMD_WRITE {
        h.len
    } else {
        0
    }
}

/// Check a request against an export of `size` bytes and what was negotiated.
///
/// Errors follow the protocol's advice: unknown commands, unknown or
/// inapplicable flags (and BLOCK_STATUS without a selected metadata context),
/// misaligned or oversized requests and reads, trims or status queries past the
/// end get `EINVAL`; writes (and write-zeroes) past the end get `ENOSPC`.
pub fn decide(h: &RequestHeader, size: u64, session: &Session) -> Decision {
    let extended = session.style == ReplyStyle::Extended;
    let skip = payload_len(h, session);
    let reject = |error| Decision::Reject { error, skip };
    let allowed = match h.kind {
        CMD_DISC => return Decision::Disconnect,
        CMD_WRITE if extended => CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS if session.base_allocation => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        // CACHE, BLOCK_STATUS without a context, and anything unknown.
        _ => return reject(NBD_EINVAL),
    };
    if h.flags & !allowed != 0 {
        return reject(NBD_EINVAL);
    }
    // With extended headers only a WRITE carries a payload.
    if extended && h.kind != CMD_WRITE && h.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
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
    if matches!(h.kind, CMD_READ | CMD_WRITE) && h.len > u64::from(MAX_PAYLOAD) {
        return reject(NBD_EINVAL);
    }
    let bs = u64::from(MIN_BLOCK);
    if !h.offset.is_multiple_of(bs) || !h.len.is_multiple_of(bs) {
        return reject(NBD_EINVAL);
    }
    let in_range = h.offset.checked_add(h.len).is_some_and(|end| end <= size);
    if !in_range {
        let error = match h.kind {
            CMD_WRITE | CMD_WRITE_ZEROES => NBD_ENOSPC,
            _ => NBD_EINVAL,
        };
        return reject(error);
    }
    if h.len == 0 {
        // A status query of nothing cannot be answered with at least one extent.
        if h.kind == CMD_BLOCK_STATUS {
            return reject(NBD_EINVAL);
        }
        return Decision::Run(Cmd::Nop);
    }
    let (offset, len) = (h.offset, h.len);
    Decision::Run(match h.kind {
        // Both checked against MAX_PAYLOAD above, so they fit 32 bits.
        CMD_READ => Cmd::Read {
            offset,
            len: len as u32,
        },
        CMD_WRITE => Cmd::Write {
            offset,
            len: len as u32,
            fua,
        },
        CMD_TRIM => Cmd::Trim { offset, len, fua },
        CMD_BLOCK_STATUS => Cmd::BlockStatus {
            offset,
            len,
            req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
        },
        // NO_HOLE asks for the range to stay allocated. The engine's write-zeroes
        // reaches the backend, which zeroes with FALLOC_FL_ZERO_RANGE or
        // BLKZEROOUT where it can (allocated) and punches a hole only where those
        // are unsupported; the data reads back as zeroes either way, which is what
        // the client relies on. The ublk path treats REQ_NOUNMAP the same way.
        _ => Cmd::WriteZeroes { offset, len, fua },
    })
}

/// A run of all-zero read data at least this long is sent as an
/// `NBD_REPLY_TYPE_OFFSET_HOLE` chunk instead of as data (structured replies).
pub const HOLE_MIN: usize = 64 << 10;
/// Zero runs are found in blocks of this size (relative to the request).
const HOLE_GRAIN: usize = 4096;

fn all_zero(b: &[u8]) -> bool {
    // OR-folding fixed-size pieces vectorises well, with an early exit per piece.
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Split read data into `(start, end, hole)` runs: all-zero stretches of at
/// least [`HOLE_MIN`] bytes are holes, the rest data. Covers `data` exactly.
pub fn read_chunks(data: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, block) in data.chunks(HOLE_GRAIN).enumerate() {
        let (a, b) = (i * HOLE_GRAIN, i * HOLE_GRAIN + block.len());
        let zero = all_zero(block);
        match runs.last_mut() {
            Some(r) if r.2 == zero => r.1 = b,
            _ => runs.push((a, b, zero)),
        }
    }
    // Short zero runs are not worth a chunk of their own: they join the data.
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for (a, b, zero) in runs {
        let hole = zero && b - a >= HOLE_MIN;
        match out.last_mut() {
            Some(r) if r.2 == hole => r.1 = b,
            _ => out.push((a, b, hole)),
        }
    }
    out
}

/// The `NBD_CMD_BLOCK_STATUS` reply for `base:allocation`: one final status
/// chunk. Extents are clipped to the request (so `REQ_ONE` and the protocol's
/// "first N-1 extents within the request" hold whatever the target returned),
/// and in compact style to what a 32-bit length holds.
pub fn block_status_reply(
    style: ReplyStyle,
    handle: u64,
    offset: u64,
    req_len: u64,
    req_one: bool,
    extents: &[Extent],
) -> Vec<u8> {
    let max_one = if style == ReplyStyle::Extended {
        u64::MAX
    } else {
        u64::from(u32::MAX) / u64::from(MIN_BLOCK) * u64::from(MIN_BLOCK)
    };
    let mut list: Vec<(u64, u32)> = Vec::with_capacity(extents.len());
    let mut left = req_len;
    for e in extents {
        if left == 0 || e.len == 0 {
            break;
        }
        let n = e.len.min(left).min(max_one);
        let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        list.push((n, flags));
        left -= n;
        if req_one || n < e.len {
            break;
        }
    }
    let mut out = Vec::new();
    if style == ReplyStyle::Extended {
        push_chunk_header(
            &mut out,
            style,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS_EXT,
            handle,
            offset,
            8 + 16 * list.len(),
        );
        out.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
        out.extend_from_slice(&(list.len() as u32).to_be_bytes());
        for (n, f) in list {
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(&u64::from(f).to_be_bytes());
        }
    } else {
        push_chunk_header(
            &mut out,
            style,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            handle,
            offset,
            4 + 8 * list.len(),
        );
        out.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
        for (n, f) in list {
            out.extend_from_slice(&(n as u32).to_be_bytes());
            out.extend_from_slice(&f.to_be_bytes());
        }
    }
    out
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
    /// What the handshake negotiated (reply style, metadata context).
    pub session: Session,
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
    /// The request's offset (extended reply headers echo it).
    offset: u64,
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
    style: ReplyStyle,
    /// A reply could not be written: the client is gone. Later replies are dropped.
    broken: AtomicBool,
    /// Rejected requests logged so far (the log is not a client's to flood).
    rejects_logged: AtomicUsize,
    peer: &'a str,
}

const REJECTS_LOGGED: usize = 8;

/// Room before READ data for the largest single-chunk reply header.
const READ_PREFIX: usize = EXTENDED_REPLY_LEN + 8;

/// The message of an error chunk: what a person at the client needs, without
/// the server's paths or internals (those are in the server's log).
fn error_message(error: u32, rejected: bool) -> &'static str {
    match (rejected, error) {
        (true, NBD_ENOSPC) => "request reaches past the end of the export",
        (true, _) => {
            "request refused: unknown command or flag, misaligned, too large, \
                      or past the end of the export (see the server log)"
        }
        (false, NBD_ESHUTDOWN) => "the server is shutting down",
        (false, _) => "the server's storage failed this request (see the server log)",
    }
}

impl<W: Write> Shared<'_, W> {
    /// Send one reply (or several chunks), whole, under the output lock.
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

    /// Success without data: a simple reply, or a final `NONE` chunk once
    /// structured replies are negotiated (a simple reply would do for all but
    /// READ, but a zero-length READ ends here too).
    fn reply_ok(&self, handle: u64, offset: u64) {
        if self.style == ReplyStyle::Simple {
            let mut hdr = [0u8; SIMPLE_REPLY_LEN];
            encode_simple_reply(&mut hdr, 0, handle);
            self.reply(&hdr);
        } else {
            let mut v = Vec::with_capacity(EXTENDED_REPLY_LEN);
            push_chunk_header(
                &mut v,
                self.style,
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                handle,
                offset,
                0,
            );
            self.reply(&v);
        }
    }

    fn reply_error(&self, handle: u64, offset: u64, error: u32, rejected: bool) {
        if self.style == ReplyStyle::Simple {
            let mut hdr = [0u8; SIMPLE_REPLY_LEN];
            encode_simple_reply(&mut hdr, error, handle);
            self.reply(&hdr);
        } else {
            let mut v = Vec::with_capacity(64);
            let msg = error_message(error, rejected);
            push_error_chunk(&mut v, self.style, handle, offset, error, msg);
            self.reply(&v);
        }
    }

    /// A successful READ: `buf` holds the data from [`READ_PREFIX`] on.
    fn reply_read(&self, handle: u64, offset: u64, mut buf: Vec<u8>) {
        let data_len = buf.len() - READ_PREFIX;
        if self.style == ReplyStyle::Simple {
            let at = READ_PREFIX - SIMPLE_REPLY_LEN;
            let mut hdr = [0u8; SIMPLE_REPLY_LEN];
            encode_simple_reply(&mut hdr, 0, handle);
            buf[at..READ_PREFIX].copy_from_slice(&hdr);
            return self.reply(&buf[at..]);
        }
        let chunks = read_chunks(&buf[READ_PREFIX..]);
        if let [(_, _, false)] = chunks[..] {
            // All data: one chunk, its header written in place before the data.
            let mut hdr = Vec::with_capacity(READ_PREFIX);
            push_chunk_header(
                &mut hdr,
                self.style,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                handle,
                offset,
                8 + data_len,
            );
            hdr.extend_from_slice(&offset.to_be_bytes());
            let at = READ_PREFIX - hdr.len();
            buf[at..READ_PREFIX].copy_from_slice(&hdr);
            return self.reply(&buf[at..]);
        }
        let data_bytes: usize = chunks.iter().filter(|c| !c.2).map(|c| c.1 - c.0).sum();
        let mut v = Vec::with_capacity(data_bytes + chunks.len() * (READ_PREFIX + 4));
        let last = chunks.len() - 1;
        for (i, &(a, b, hole)) in chunks.iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            let at = offset + a as u64;
            if hole {
                push_chunk_header(
                    &mut v,
                    self.style,
                    flags,
                    REPLY_TYPE_OFFSET_HOLE,
                    handle,
                    offset,
                    12,
                );
                v.extend_from_slice(&at.to_be_bytes());
                // Reads are at most MAX_PAYLOAD, so a hole fits 32 bits.
                v.extend_from_slice(&((b - a) as u32).to_be_bytes());
            } else {
                push_chunk_header(
                    &mut v,
                    self.style,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    handle,
                    offset,
                    8 + (b - a),
                );
                v.extend_from_slice(&at.to_be_bytes());
                v.extend_from_slice(&buf[READ_PREFIX + a..READ_PREFIX + b]);
            }
        }
        self.reply(&v);
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
            offset: req_offset,
            cmd,
            payload,
            charge,
        } = job;
        let t = self.target;
        let mut read_buf = Vec::new();
        let mut extents = Vec::new();
        let res = catch_unwind(AssertUnwindSafe(|| match cmd {
            Cmd::Read { offset, len } => {
                read_buf = vec![0u8; READ_PREFIX + len as usize];
                t.read(offset, &mut read_buf[READ_PREFIX..])
            }
            Cmd::Write { offset, fua, .. } => t.write(offset, &payload, fua),
            Cmd::Flush => t.flush(),
            Cmd::Trim { offset, len, fua } => {
                t.discard(offset, len)
                    .and_then(|()| if fua { t.flush() } else { Ok(()) })
            }
            Cmd::WriteZeroes { offset, len, fua } => {
                t.write_zeroes(offset, len)
                    .and_then(|()| if fua { t.flush() } else { Ok(()) })
            }
            Cmd::BlockStatus { offset, len, .. } => t.block_status(offset, len).and_then(|e| {
                extents = e;
                if extents.first().is_some_and(|e| e.len > 0) {
                    Ok(())
                } else {
                    Err(crate::target::TargetError::new(
                        libc::EIO,
                        "block status answered no extent (bug)",
                    ))
                }
            }),
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
        match cmd {
            // A failed read is answered without data, as the protocol allows.
            _ if error != 0 => self.reply_error(handle, req_offset, error, false),
            Cmd::Read { offset, .. } => self.reply_read(handle, offset, read_buf),
            Cmd::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                let r = block_status_reply(self.style, handle, offset, len, req_one, &extents);
                self.reply(&r);
            }
            _ => self.reply_ok(handle, req_offset),
        }
        self.budget.release(charge);
    }
}

/// Read a request header (compact, or extended when negotiated); `Ok(None)` at
/// a clean end of stream.
fn read_header(r: &mut impl Read, style: ReplyStyle) -> Result<Option<RequestHeader>, ConnError> {
    let mut b = [0u8; EXTENDED_REQUEST_LEN];
    let n = if style == ReplyStyle::Extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    let mut got = 0;
    while got < n {
        match r.read(&mut b[got..n]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ConnError::Truncated("in the middle of a request header")),
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ConnError::io("reading a request", e)),
        }
    }
    Ok(Some(if style == ReplyStyle::Extended {
        parse_extended_request(&b)?
    } else {
        let mut c = [0u8; REQUEST_LEN];
        c.copy_from_slice(&b[..REQUEST_LEN]);
        parse_request(&c)?
    }))
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

/// Read and drop a refused request's payload.
fn skip_payload(r: &mut impl Read, len: u64) -> Result<(), ConnError> {
    let n = io::copy(&mut r.take(len), &mut io::sink())
        .map_err(|e| ConnError::io("in the middle of write data", e))?;
    if n != len {
        return Err(ConnError::Truncated("in the middle of write data"));
    }
    Ok(())
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
        style: cfg.session.style,
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
        let res = read_loop(reader, &tx, &shared, cfg);
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
    cfg: &TransmitConfig,
) -> Result<End, ConnError> {
    loop {
        let Some(h) = read_header(r, sh.style)? else {
            return Ok(End::Closed);
        };
        match decide(&h, cfg.size, &cfg.session) {
            Decision::Disconnect => return Ok(End::Disconnect),
            Decision::Reject { error, skip } => {
                // With extended headers any command may carry a payload; one
                // beyond what the server would ever accept is a denial of
                // service, and the protocol says to disconnect.
                if sh.style == ReplyStyle::Extended && skip > u64::from(MAX_PAYLOAD) {
                    return Err(ProtocolError::PayloadTooLarge(skip).into());
                }
                skip_payload(r, skip)?;
                sh.note_reject(&h, error);
                sh.reply_error(h.handle, h.offset, error, true);
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
                    offset: h.offset,
                    cmd,
                    payload,
                    charge,
                };
                if let Err(crossbeam_channel::SendError(job)) = tx.send(job) {
                    // Cannot happen while this function holds a receiver's peers
                    // alive, but never drop a request silently.
                    sh.budget.release(job.charge);
                    sh.reply_error(job.handle, job.offset, NBD_EIO, false);
                }
            }
        }
    }
}
