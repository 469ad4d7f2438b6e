//! NBD wire format: the constants of the protocol (doc/proto.md of the
//! NetworkBlockDevice project) and pure encoders and decoders. Nothing here does
//! I/O or can panic on any input; the property tests feed it random bytes.

use std::io::{self, Read};

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply of fixed newstyle negotiation.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request (compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Prefix of every request once extended headers are negotiated.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Prefix of every reply chunk once extended headers are negotiated.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits).
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR + 10;

/// The one metadata context this server offers.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// The id it gets when selected (any nonzero value would do; it is per connection).
pub const META_BASE_ALLOCATION_ID: u32 = 1;
// Flags of `base:allocation` extents.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Structured / extended reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Information types of NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Error values of the transmission phase (the protocol's own numbering, which
// matches Linux errno for these).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Size constraints this server advertises (`NBD_INFO_BLOCK_SIZE`) and enforces.
/// 512 matches the logical block of the ublk export; 4096 is the cache's sector.
pub const MIN_BLOCK: u32 = 512;
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ or WRITE payload (32 MiB, the protocol's interoperable maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Length of a request header (compact).
pub const REQUEST_LEN: usize = 28;
/// Length of a request header with extended headers.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Length of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;
/// Longest error message put in an error chunk (the protocol's string limit).
pub const MAX_MESSAGE: usize = 4096;
/// Length of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of the greeting the server sends first.
pub const GREETING_LEN: usize = 18;

/// A violation of the protocol by the client. The connection is closed after it:
/// either the byte stream can no longer be trusted, or the protocol says so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error(
        "bad request magic {0:#010x} (expected {REQUEST_MAGIC:#010x}): the client does not speak \
         NBD transmission, or the stream is out of sync"
    )]
    BadRequestMagic(u32),
    #[error(
        "bad option magic {0:#018x} (expected 'IHAVEOPT' {IHAVEOPT:#018x}): the client does not \
         speak newstyle NBD"
    )]
    BadOptionMagic(u64),
    #[error("client flags {0:#x} set bits this server did not offer (it offers FIXED_NEWSTYLE and NO_ZEROES)")]
    UnknownClientFlags(u32),
    #[error("option {option} carries {len} bytes of data, more than the {max} this server reads")]
    OptionTooLong { option: u32, len: u32, max: u32 },
    #[error("more than {0} options without entering transmission; giving up on this client")]
    TooManyOptions(usize),
    #[error(
        "NBD_OPT_EXPORT_NAME asked for export {0:?}; the only export is the default one (\"\")"
    )]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME without TLS, but this export requires TLS (--tls require)")]
    TlsRequired,
    #[error(
        "NBD_OPT_EXPORT_NAME after extended headers were negotiated (the protocol forbids it)"
    )]
    ExportNameWithExtendedHeaders,
    #[error("request payload of {0} bytes is more than the {MAX_PAYLOAD} this server accepts")]
    PayloadTooLarge(u64),
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the client closed the connection {0}")]
    Truncated(&'static str),
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("internal error (bug) while serving this connection: {0}")]
    Internal(String),
}

impl ConnError {
    /// Map an I/O error, turning a short read into [`ConnError::Truncated`].
    pub fn io(context: &'static str, e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ConnError::Truncated(context)
        } else {
            ConnError::Io { context, source: e }
        }
    }
}

/// Read and drop exactly `len` bytes (data that is refused but must be consumed
/// to stay in step with the client). `what` names the data for errors.
pub fn skip_bytes(r: &mut impl Read, len: u32, what: &'static str) -> Result<(), ConnError> {
    let n = io::copy(&mut r.take(u64::from(len)), &mut io::sink())
        .map_err(|e| ConnError::io(what, e))?;
    if n != u64::from(len) {
        return Err(ConnError::Truncated(what));
    }
    Ok(())
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// Check the client's flags against what [`greeting`] offered.
pub fn parse_client_flags(b: [u8; 4]) -> Result<u32, ProtocolError> {
    let flags = u32::from_be_bytes(b);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::UnknownClientFlags(flags));
    }
    Ok(flags)
}

/// An option header: which option, and how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn parse_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtocolError> {
    let magic = be_u64(b, 0);
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadOptionMagic(magic));
    }
    Ok(OptionHeader {
        option: be_u32(b, 8),
        len: be_u32(b, 12),
    })
}

/// One option reply: magic, the option it answers, reply type, data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    // Data is at most a few KiB (error messages, names), far below u32::MAX.
    v.extend_from_slice(&(data.len().min(u32::MAX as usize) as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// `NBD_REP_INFO` payload for `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// `NBD_REP_INFO` payload for `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

/// `NBD_REP_SERVER` payload: one export name.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124 zero
/// bytes unless the client negotiated `NO_ZEROES`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(10 + 124);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub infos: Vec<u16>,
}

/// Parse the data of `NBD_OPT_INFO` / `NBD_OPT_GO`; the error is the message of
/// an `NBD_REP_ERR_INVALID` reply.
pub fn parse_info_request(d: &[u8]) -> Result<InfoRequest, &'static str> {
    if d.len() < 6 {
        return Err("option data shorter than the 6 bytes of an empty INFO/GO request");
    }
    let name_len = be_u32(d, 0) as usize;
    if name_len > d.len() - 6 {
        return Err("export name length reaches past the option data");
    }
    let name = d[4..4 + name_len].to_vec();
    let n = be_u16(d, 4 + name_len) as usize;
    let rest = &d[6 + name_len..];
    if rest.len() != 2 * n {
        return Err("number of information requests does not match the option length");
    }
    let infos = rest.chunks_exact(2).map(|c| be_u16(c, 0)).collect();
    Ok(InfoRequest { name, infos })
}

/// A request header as it arrived; not yet checked against the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    /// 32 bits in a compact header, 64 with extended headers.
    pub len: u64,
}

pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<RequestHeader, ProtocolError> {
    let magic = be_u32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadRequestMagic(magic));
    }
    Ok(RequestHeader {
        flags: be_u16(b, 4),
        kind: be_u16(b, 6),
        handle: be_u64(b, 8),
        offset: be_u64(b, 16),
        len: u64::from(be_u32(b, 24)),
    })
}

/// A request header once extended headers are negotiated (64-bit length).
pub fn parse_extended_request(
    b: &[u8; EXTENDED_REQUEST_LEN],
) -> Result<RequestHeader, ProtocolError> {
    let magic = be_u32(b, 0);
    if magic != EXTENDED_REQUEST_MAGIC {
        return Err(ProtocolError::BadRequestMagic(magic));
    }
    Ok(RequestHeader {
        flags: be_u16(b, 4),
        kind: be_u16(b, 6),
        handle: be_u64(b, 8),
        offset: be_u64(b, 16),
        len: be_u64(b, 24),
    })
}

/// A compact request header (the length is cut to 32 bits).
pub fn encode_request(h: &RequestHeader) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.kind.to_be_bytes());
    b[8..16].copy_from_slice(&h.handle.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..].copy_from_slice(&(h.len as u32).to_be_bytes());
    b
}

pub fn encode_extended_request(h: &RequestHeader) -> [u8; EXTENDED_REQUEST_LEN] {
    let mut b = [0u8; EXTENDED_REQUEST_LEN];
    b[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.kind.to_be_bytes());
    b[8..16].copy_from_slice(&h.handle.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..].copy_from_slice(&h.len.to_be_bytes());
    b
}

/// How replies are framed on a connection, as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplyStyle {
    /// Simple replies only (nothing negotiated).
    #[default]
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY`: structured chunks for reads and errors.
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte requests and reply chunks, 64-bit lengths.
    Extended,
}

impl ReplyStyle {
    /// Length of a chunk header in this style (simple replies have no chunks).
    pub fn chunk_header_len(self) -> usize {
        match self {
            ReplyStyle::Extended => EXTENDED_REPLY_LEN,
            _ => STRUCTURED_REPLY_LEN,
        }
    }
}

/// Append a structured (or, with `Extended`, extended) reply chunk header.
/// `offset` is the request's offset (only extended headers carry it).
pub fn push_chunk_header(
    out: &mut Vec<u8>,
    style: ReplyStyle,
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    payload_len: usize,
) {
    if style == ReplyStyle::Extended {
        out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&handle.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&(payload_len as u64).to_be_bytes());
    } else {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&handle.to_be_bytes());
        // Payloads are at most MAX_PAYLOAD plus a few bytes of chunk fields.
        out.extend_from_slice(&(payload_len.min(u32::MAX as usize) as u32).to_be_bytes());
    }
}

/// An `NBD_REPLY_TYPE_ERROR` chunk (final) with a message for humans.
pub fn push_error_chunk(
    out: &mut Vec<u8>,
    style: ReplyStyle,
    handle: u64,
    offset: u64,
    error: u32,
    message: &str,
) {
    let mut m = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(m) {
        m -= 1;
    }
    push_chunk_header(
        out,
        style,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        offset,
        6 + m,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(m as u16).to_be_bytes());
    out.extend_from_slice(&message.as_bytes()[..m]);
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: Vec<u8>,
    pub queries: Vec<Vec<u8>>,
}

/// Parse the data of a meta context option; the error is the message of an
/// `NBD_REP_ERR_INVALID` reply.
pub fn parse_meta_request(d: &[u8]) -> Result<MetaRequest, &'static str> {
    if d.len() < 8 {
        return Err("option data shorter than the 8 bytes of an empty meta context request");
    }
    let name_len = be_u32(d, 0) as usize;
    if name_len > d.len() - 8 {
        return Err("export name length reaches past the option data");
    }
    let name = d[4..4 + name_len].to_vec();
    let n = be_u32(d, 4 + name_len) as usize;
    let mut rest = &d[8 + name_len..];
    // Each query takes at least its 4-byte length: bound `n` before allocating.
    if n > rest.len() / 4 {
        return Err("number of queries does not fit the option length");
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        if rest.len() < 4 {
            return Err("a query length reaches past the option data");
        }
        let ql = be_u32(rest, 0) as usize;
        if ql > rest.len() - 4 {
            return Err("a query reaches past the option data");
        }
        if ql > MAX_MESSAGE {
            return Err("a query is longer than the protocol's 4096-byte string limit");
        }
        queries.push(rest[4..4 + ql].to_vec());
        rest = &rest[4 + ql..];
    }
    if !rest.is_empty() {
        return Err("bytes left over after the last query");
    }
    Ok(MetaRequest { name, queries })
}

/// `NBD_REP_META_CONTEXT` payload: context id, then its name.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// Write a simple reply header into `out`.
pub fn encode_simple_reply(out: &mut [u8; SIMPLE_REPLY_LEN], error: u32, handle: u64) {
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&handle.to_be_bytes());
}

/// A simple reply header: (error, handle), or `None` if the magic is wrong.
pub fn parse_simple_reply(b: &[u8; SIMPLE_REPLY_LEN]) -> Option<(u32, u64)> {
    (be_u32(b, 0) == SIMPLE_REPLY_MAGIC).then(|| (be_u32(b, 4), be_u64(b, 8)))
}

/// An errno from the engine as one of the protocol's error values.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EACCES | libc::EROFS => NBD_EPERM,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::ENOTSUP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

/// Parse a chunk header of either style: (flags, type, handle, payload length).
/// For the tests' reply parsers; `None` if the magic does not match the style.
pub fn parse_chunk_header(b: &[u8], style: ReplyStyle) -> Option<(u16, u16, u64, u64)> {
    match style {
        ReplyStyle::Extended if b.len() >= EXTENDED_REPLY_LEN => (be_u32(b, 0)
            == EXTENDED_REPLY_MAGIC)
            .then(|| (be_u16(b, 4), be_u16(b, 6), be_u64(b, 8), be_u64(b, 24))),
        ReplyStyle::Structured if b.len() >= STRUCTURED_REPLY_LEN => {
            (be_u32(b, 0) == STRUCTURED_REPLY_MAGIC).then(|| {
                (
                    be_u16(b, 4),
                    be_u16(b, 6),
                    be_u64(b, 8),
                    u64::from(be_u32(b, 16)),
                )
            })
        }
        _ => None,
    }
}

/// A printable name of an option, for logs.
pub fn option_name(o: u32) -> String {
    match o {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME".into(),
        OPT_ABORT => "NBD_OPT_ABORT".into(),
        OPT_LIST => "NBD_OPT_LIST".into(),
        OPT_STARTTLS => "NBD_OPT_STARTTLS".into(),
        OPT_INFO => "NBD_OPT_INFO".into(),
        OPT_GO => "NBD_OPT_GO".into(),
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY".into(),
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT".into(),
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT".into(),
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS".into(),
        other => format!("option {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_bad_magic() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 4096,
            len: 512,
        };
        assert_eq!(parse_extended_request(&encode_extended_request(&h)), Ok(h));
        let b = encode_request(&h);
        assert_eq!(parse_request(&b), Ok(h));
        let mut bad = b;
        bad[0] ^= 1;
        assert!(matches!(
            parse_request(&bad),
            Err(ProtocolError::BadRequestMagic(_))
        ));
    }

    #[test]
    fn info_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let r = parse_info_request(&d).unwrap();
        assert_eq!(r.name, b"abc");
        assert_eq!(r.infos, vec![INFO_EXPORT, INFO_BLOCK_SIZE]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        assert!(parse_info_request(&[0, 0, 0, 9, 0, 0]).is_err());
        assert!(parse_info_request(&[]).is_err());
        assert_eq!(
            parse_info_request(&[0, 0, 0, 0, 0, 0]).unwrap(),
            InfoRequest {
                name: vec![],
                infos: vec![]
            }
        );
    }

    #[test]
    fn meta_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        let r = parse_meta_request(&d).unwrap();
        assert_eq!(r.name, b"");
        assert_eq!(r.queries.len(), 2);
        assert_eq!(r.queries[0], b"base:allocation");
        for cut in 0..d.len() {
            assert!(parse_meta_request(&d[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = d.clone();
        long.push(0);
        assert!(parse_meta_request(&long).is_err());
        // A huge query count does not allocate.
        let mut huge = 0u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&huge).is_err());
    }

    #[test]
    fn error_chunks_are_bounded_and_parse_back() {
        for style in [ReplyStyle::Structured, ReplyStyle::Extended] {
            let mut v = Vec::new();
            let msg = "é".repeat(3000);
            push_error_chunk(&mut v, style, 9, 4096, NBD_EIO, &msg);
            let (flags, kind, handle, len) = parse_chunk_header(&v, style).unwrap();
            assert_eq!(
                (flags, kind, handle),
                (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 9)
            );
            let hl = style.chunk_header_len();
            assert_eq!(v.len() - hl, len as usize);
            let m = be_u16(&v, hl + 4) as usize;
            assert!(m <= MAX_MESSAGE && 6 + m == len as usize);
            assert!(std::str::from_utf8(&v[hl + 6..]).is_ok());
        }
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags([0, 0, 0, 3]), Ok(3));
        assert!(parse_client_flags([0, 0, 0, 4]).is_err());
    }

    #[test]
    fn errno_mapping_stays_in_the_protocol_set() {
        for e in 0..200 {
            let n = nbd_errno(e);
            assert!([
                NBD_EPERM,
                NBD_EIO,
                NBD_ENOMEM,
                NBD_EINVAL,
                NBD_ENOSPC,
                NBD_EOVERFLOW,
                NBD_ENOTSUP,
                NBD_ESHUTDOWN
            ]
            .contains(&n));
        }
        assert_eq!(nbd_errno(libc::EDQUOT), NBD_ENOSPC);
        assert_eq!(nbd_errno(libc::EIO), NBD_EIO);
    }
}
