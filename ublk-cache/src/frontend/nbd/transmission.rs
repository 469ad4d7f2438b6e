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
//! * The connection runs on an event loop of its own (`rbd_backend::aio`): a
//!   reader reads requests (and WRITE payloads) from the [`Wire`] and starts one
//!   task per request; the task calls the [`AsyncTarget`] on the same loop and
//!   queues its reply; a sender writes queued replies in batches. Requests that
//!   fail a check are answered right away with an error; the stream stays
//!   usable. Only a request that breaks the framing (bad magic) or a short read
//!   ends the connection.
//! * Replies may leave in any order; the handle tells the client which request
//!   each one answers. A reply is queued only after the target returned: a
//!   client that vanishes loses nothing it saw acknowledged.
//! * Memory is bounded: at most `max_inflight_bytes` of payload (plus one
//!   request) is buffered or in flight per connection; beyond that the reader
//!   stops reading and TCP / the socket buffer pushes back on the client.
//! * When the reader stops (client DISC or EOF, a protocol error, or the server
//!   shutting the socket's read side), every request already read still runs
//!   and is answered before the function returns.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use event_listener::Event;
use rbd_backend::aio::{self, DmaBuf};
use tracing::{debug, warn};

use super::handshake::Session;
use super::proto::*;
use super::wire::Wire;
use crate::target::{AsyncTarget, Extent, TargetError};

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
    /// Payload bytes buffered or in flight before the reader waits.
    pub max_inflight_bytes: usize,
    /// Requests running at once before the reader waits (1 runs them in order).
    pub max_requests: usize,
    /// What the handshake negotiated (reply style, metadata context).
    pub session: Session,
    /// For logs.
    pub peer: String,
}

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

/// A success without data: a simple reply, or a final `NONE` chunk once
/// structured replies are negotiated.
fn encode_ok(style: ReplyStyle, handle: u64, offset: u64) -> Vec<u8> {
    if style == ReplyStyle::Simple {
        let mut hdr = [0u8; SIMPLE_REPLY_LEN];
        encode_simple_reply(&mut hdr, 0, handle);
        hdr.to_vec()
    } else {
        let mut v = Vec::with_capacity(EXTENDED_REPLY_LEN);
        push_chunk_header(
            &mut v,
            style,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            handle,
            offset,
            0,
        );
        v
    }
}

fn encode_error(
    style: ReplyStyle,
    handle: u64,
    offset: u64,
    error: u32,
    rejected: bool,
) -> Vec<u8> {
    if style == ReplyStyle::Simple {
        let mut hdr = [0u8; SIMPLE_REPLY_LEN];
        encode_simple_reply(&mut hdr, error, handle);
        hdr.to_vec()
    } else {
        let mut v = Vec::with_capacity(64);
        push_error_chunk(
            &mut v,
            style,
            handle,
            offset,
            error,
            error_message(error, rejected),
        );
        v
    }
}

/// A successful READ of `data` at `offset`: one data chunk, or data and hole
/// chunks where the data has long zero stretches (structured replies).
fn encode_read(style: ReplyStyle, handle: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    if style == ReplyStyle::Simple {
        let mut v = Vec::with_capacity(SIMPLE_REPLY_LEN + data.len());
        let mut hdr = [0u8; SIMPLE_REPLY_LEN];
        encode_simple_reply(&mut hdr, 0, handle);
        v.extend_from_slice(&hdr);
        v.extend_from_slice(data);
        return v;
    }
    let chunks = read_chunks(data);
    let data_bytes: usize = chunks.iter().filter(|c| !c.2).map(|c| c.1 - c.0).sum();
    let mut v = Vec::with_capacity(data_bytes + chunks.len().max(1) * (READ_PREFIX + 4));
    if chunks.is_empty() {
        push_chunk_header(
            &mut v,
            style,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            handle,
            offset,
            0,
        );
        return v;
    }
    let last = chunks.len() - 1;
    for (i, &(a, b, hole)) in chunks.iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        let at = offset + a as u64;
        if hole {
            push_chunk_header(
                &mut v,
                style,
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
                style,
                flags,
                REPLY_TYPE_OFFSET_DATA,
                handle,
                offset,
                8 + (b - a),
            );
            v.extend_from_slice(&at.to_be_bytes());
            v.extend_from_slice(&data[a..b]);
        }
    }
    v
}

const REJECTS_LOGGED: usize = 8;

/// One connection's state, shared by its reader, request tasks and sender (all
/// on the connection's event loop).
struct Conn {
    style: ReplyStyle,
    peer: String,
    /// Replies queued for the sender.
    out: RefCell<Vec<u8>>,
    out_ready: Event,
    /// No more replies will be queued: the sender sends what is left and ends.
    closing: Cell<bool>,
    /// Sending failed: the client is gone; later replies are dropped.
    broken: Cell<bool>,
    /// Payload bytes of requests read and not yet answered.
    used: Cell<usize>,
    max: usize,
    room: Event,
    /// Requests running.
    running: Cell<usize>,
    idle: Event,
    rejects_logged: Cell<usize>,
}

impl Conn {
    fn reply(&self, bytes: Vec<u8>) {
        if self.broken.get() {
            return;
        }
        let mut out = self.out.borrow_mut();
        if out.is_empty() {
            *out = bytes;
        } else {
            out.extend_from_slice(&bytes);
        }
        drop(out);
        self.out_ready.notify(1);
    }

    fn note_reject(&self, h: &RequestHeader, error: u32) {
        let n = self.rejects_logged.get();
        self.rejects_logged.set(n + 1);
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

    /// Wait until `n` more payload bytes fit (a request larger than the budget
    /// still runs, alone).
    async fn acquire(&self, n: usize) {
        loop {
            let l = self.room.listen();
            let used = self.used.get();
            if used == 0 || used + n <= self.max {
                self.used.set(used + n);
                return;
            }
            l.await;
        }
    }

    fn release(&self, n: usize) {
        self.used.set(self.used.get().saturating_sub(n));
        self.room.notify(usize::MAX);
    }
}

/// Buffered reading from the wire.
struct Reader<'a, W> {
    wire: &'a W,
    buf: Vec<u8>,
    pos: usize,
}

impl<W: Wire> Reader<'_, W> {
    /// Fill `out` completely. `Ok(false)`: the stream ended before the first byte.
    async fn read_exact(&mut self, out: &mut [u8], what: &'static str) -> Result<bool, ConnError> {
        let mut got = 0;
        while got < out.len() {
            if self.pos < self.buf.len() {
                let n = (out.len() - got).min(self.buf.len() - self.pos);
                out[got..got + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                got += n;
                continue;
            }
            self.buf.resize(256 << 10, 0);
            self.pos = 0;
            let n = self
                .wire
                .recv(&mut self.buf)
                .await
                .map_err(|e| ConnError::io("reading a request", e))?;
            self.buf.truncate(n);
            if n == 0 {
                if got == 0 {
                    return Ok(false);
                }
                return Err(ConnError::Truncated(what));
            }
        }
        Ok(true)
    }

    async fn skip(&mut self, mut n: u64) -> Result<(), ConnError> {
        let mut scratch = vec![0u8; (64 << 10).min(n as usize)];
        while n > 0 {
            let k = (n as usize).min(scratch.len());
            if !self
                .read_exact(&mut scratch[..k], "in the middle of write data")
                .await?
            {
                return Err(ConnError::Truncated("in the middle of write data"));
            }
            n -= k as u64;
        }
        Ok(())
    }

    async fn header(&mut self, style: ReplyStyle) -> Result<Option<RequestHeader>, ConnError> {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        let n = if style == ReplyStyle::Extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        };
        if !self
            .read_exact(&mut b[..n], "in the middle of a request header")
            .await?
        {
            return Ok(None);
        }
        Ok(Some(if style == ReplyStyle::Extended {
            parse_extended_request(&b)?
        } else {
            let mut c = [0u8; REQUEST_LEN];
            c.copy_from_slice(&b[..REQUEST_LEN]);
            parse_request(&c)?
        }))
    }
}

/// Serve requests from `wire` until the client disconnects, the stream ends, or
/// the client breaks the protocol, on the current thread's event loop. Every
/// request read completely is executed and answered (if the client still
/// listens) before this returns. `early`: bytes read past the handshake.
pub async fn transmit<T: AsyncTarget + 'static, W: Wire + 'static>(
    wire: Rc<W>,
    target: Arc<T>,
    cfg: &TransmitConfig,
) -> Result<End, ConnError> {
    let conn = Rc::new(Conn {
        style: cfg.session.style,
        peer: cfg.peer.clone(),
        out: RefCell::new(Vec::new()),
        out_ready: Event::new(),
        closing: Cell::new(false),
        broken: Cell::new(false),
        used: Cell::new(0),
        max: cfg.max_inflight_bytes.max(1),
        room: Event::new(),
        running: Cell::new(0),
        idle: Event::new(),
        rejects_logged: Cell::new(0),
    });
    let sender = {
        let (conn, wire) = (Rc::clone(&conn), Rc::clone(&wire));
        aio::spawn(async move { send_loop(&conn, &*wire).await })
            .map_err(|e| ConnError::Internal(format!("starting the sender: {e}")))?
    };
    let res = read_loop(&conn, &*wire, &target, cfg).await;
    // Every request read runs to its reply; then the sender empties the queue.
    loop {
        let l = conn.idle.listen();
        if conn.running.get() == 0 {
            break;
        }
        l.await;
    }
    conn.closing.set(true);
    conn.out_ready.notify(usize::MAX);
    sender.await;
    res
}

async fn send_loop<W: Wire>(conn: &Conn, wire: &W) {
    loop {
        let l = conn.out_ready.listen();
        let batch = std::mem::take(&mut *conn.out.borrow_mut());
        if batch.is_empty() {
            if conn.closing.get() {
                return;
            }
            l.await;
            continue;
        }
        if conn.broken.get() {
            continue;
        }
        if let Err(e) = wire.send_all(batch).await {
            if !conn.broken.replace(true) {
                debug!(
                    peer = conn.peer,
                    "writing a reply failed: {e}; dropping further replies"
                );
            }
        }
    }
}

async fn read_loop<T: AsyncTarget + 'static, W: Wire>(
    conn: &Rc<Conn>,
    wire: &W,
    target: &Arc<T>,
    cfg: &TransmitConfig,
) -> Result<End, ConnError> {
    let mut r = Reader {
        wire,
        buf: Vec::new(),
        pos: 0,
    };
    loop {
        let Some(h) = r.header(conn.style).await? else {
            return Ok(End::Closed);
        };
        match decide(&h, cfg.size, &cfg.session) {
            Decision::Disconnect => return Ok(End::Disconnect),
            Decision::Reject { error, skip } => {
                // With extended headers any command may carry a payload; one
                // beyond what the server would ever accept is a denial of
                // service, and the protocol says to disconnect.
                if conn.style == ReplyStyle::Extended && skip > u64::from(MAX_PAYLOAD) {
                    return Err(ProtocolError::PayloadTooLarge(skip).into());
                }
                r.skip(skip).await?;
                conn.note_reject(&h, error);
                conn.reply(encode_error(conn.style, h.handle, h.offset, error, true));
            }
            Decision::Run(cmd) => {
                let charge = match cmd {
                    Cmd::Read { len, .. } | Cmd::Write { len, .. } => len as usize,
                    _ => 0,
                };
                conn.acquire(charge).await;
                loop {
                    let l = conn.idle.listen();
                    if conn.running.get() < cfg.max_requests.max(1) {
                        break;
                    }
                    l.await;
                }
                let mut buf = match cmd {
                    Cmd::Read { len, .. } | Cmd::Write { len, .. } => DmaBuf::new(len as usize),
                    _ => DmaBuf::new(0),
                };
                if let Cmd::Write { len, .. } = cmd {
                    let dst = buf.bytes_mut().expect("new buffer");
                    let ok = r
                        .read_exact(&mut dst[..len as usize], "in the middle of write data")
                        .await;
                    match ok {
                        Ok(true) => {}
                        Ok(false) => {
                            conn.release(charge);
                            return Err(ConnError::Truncated("in the middle of write data"));
                        }
                        Err(e) => {
                            conn.release(charge);
                            return Err(e);
                        }
                    }
                }
                conn.running.set(conn.running.get() + 1);
                let (c, t) = (Rc::clone(conn), Arc::clone(target));
                let (handle, req_offset) = (h.handle, h.offset);
                let task = async move {
                    let reply = execute(&*t, cmd, buf, c.style, handle, req_offset, &c.peer).await;
                    c.reply(reply);
                    c.release(charge);
                    c.running.set(c.running.get() - 1);
                    c.idle.notify(usize::MAX);
                };
                match aio::spawn(task) {
                    Ok(t) => t.detach(),
                    Err(e) => {
                        conn.running.set(conn.running.get() - 1);
                        conn.release(charge);
                        warn!(peer = conn.peer, "cannot run a request: {e}");
                        conn.reply(encode_error(conn.style, handle, req_offset, NBD_EIO, false));
                    }
                }
            }
        }
    }
}

/// Run one request and encode its reply.
async fn execute<T: AsyncTarget + 'static>(
    t: &T,
    cmd: Cmd,
    buf: DmaBuf,
    style: ReplyStyle,
    handle: u64,
    req_offset: u64,
    peer: &str,
) -> Vec<u8> {
    let flush_after = |fua: bool| async move {
        if fua {
            t.flush().await
        } else {
            Ok(())
        }
    };
    let mut extents = Vec::new();
    let res: Result<(), TargetError> = match cmd {
        Cmd::Read { offset, len } => t.read(offset, buf.slice(0, len as usize)).await,
        Cmd::Write { offset, len, fua } => t.write(offset, buf.slice(0, len as usize), fua).await,
        Cmd::Flush => t.flush().await,
        Cmd::Trim { offset, len, fua } => match t.discard(offset, len).await {
            Ok(()) => flush_after(fua).await,
            Err(e) => Err(e),
        },
        Cmd::WriteZeroes { offset, len, fua } => match t.write_zeroes(offset, len).await {
            Ok(()) => flush_after(fua).await,
            Err(e) => Err(e),
        },
        Cmd::BlockStatus { offset, len, .. } => match t.block_status(offset, len) {
            Ok(e) if e.first().is_some_and(|e| e.len > 0) => {
                extents = e;
                Ok(())
            }
            Ok(_) => Err(TargetError::new(
                libc::EIO,
                "block status answered no extent (bug)",
            )),
            Err(e) => Err(e),
        },
        Cmd::Nop => Ok(()),
    };
    let error = match res {
        Ok(()) => 0,
        Err(e) => {
            warn!(peer, ?cmd, "target error: {e}");
            nbd_errno(e.errno())
        }
    };
    match cmd {
        // A failed read is answered without data, as the protocol allows.
        _ if error != 0 => encode_error(style, handle, req_offset, error, false),
        Cmd::Read { offset, .. } => match buf.bytes() {
            Some(data) => encode_read(style, handle, offset, data),
            None => encode_error(style, handle, req_offset, NBD_EIO, false),
        },
        Cmd::BlockStatus {
            offset,
            len,
            req_one,
        } => block_status_reply(style, handle, offset, len, req_one, &extents),
        _ => encode_ok(style, handle, req_offset),
    }
}
