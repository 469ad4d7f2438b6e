//! The handshake: fixed newstyle negotiation with option haggling.
//!
//! Supported options: `NBD_OPT_GO`, `NBD_OPT_INFO` (answering with
//! `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE`), `NBD_OPT_LIST`, `NBD_OPT_ABORT`,
//! the old `NBD_OPT_EXPORT_NAME`, `NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_EXTENDED_HEADERS`, `NBD_OPT_LIST_META_CONTEXT` and
//! `NBD_OPT_SET_META_CONTEXT` (one context: `base:allocation`), and
//! `NBD_OPT_STARTTLS` where the listener has TLS. Every other option is
//! answered with `NBD_REP_ERR_UNSUP` and negotiation goes on. The server has
//! exactly one export, the default one, whose name is the empty string.
//!
//! TLS: on `NBD_OPT_STARTTLS` the server answers `NBD_REP_ACK` and
//! [`Negotiation::haggle`] returns [`Negotiated::StartTls`]; the caller runs the
//! TLS handshake on the same socket, calls [`Negotiation::tls_started`] (which
//! forgets every option negotiated before, as the protocol demands) and goes on
//! haggling over the encrypted stream. With [`TlsPolicy::Require`] (the
//! protocol's FORCEDTLS mode) every option but `STARTTLS` and `ABORT` is
//! answered `NBD_REP_ERR_TLS_REQD` until TLS is up, and `NBD_OPT_EXPORT_NAME`
//! (which cannot be answered with an error) closes the connection.
//!
//! Bytes the client sends are bounded: option data beyond [`MAX_OPTION_DATA`]
//! is skipped (or, for an unknown option beyond [`MAX_SKIP`], the connection is
//! closed), and a client gets [`MAX_OPTIONS`] options before it is dropped.

use std::io::{self, Read, Write};

use super::proto::*;

/// Largest option data this server reads into memory (export names are at
/// most 4096 bytes; INFO/GO add 6 bytes and a short list of info types; meta
/// context queries are strings of at most 4096 bytes each).
pub const MAX_OPTION_DATA: u32 = 16 << 10;
/// Largest option data skipped for an option this server does not support.
pub const MAX_SKIP: u32 = 1 << 20;
/// Options per connection before the client is considered hostile.
pub const MAX_OPTIONS: usize = 1024;

/// What the handshake tells a client about the one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

/// Whether a listener offers TLS, and insists on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// No TLS: `NBD_OPT_STARTTLS` is unsupported.
    #[default]
    Off,
    /// TLS for clients that ask (SELECTIVETLS with no TLS-only export).
    Optional,
    /// Clients must upgrade before anything else (FORCEDTLS).
    Require,
}

/// What the transmission phase needs to know from the negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Session {
    pub style: ReplyStyle,
    /// `base:allocation` was selected (`NBD_CMD_BLOCK_STATUS` is allowed).
    pub base_allocation: bool,
}

/// How a round of haggling ended, when it ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME` succeeded: transmission starts.
    Transmission(Session),
    /// The client sent `NBD_OPT_ABORT` (answered) or closed the connection
    /// between two options.
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: run the TLS handshake now, then call
    /// [`Negotiation::tls_started`] and haggle on over TLS.
    StartTls,
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), ConnError> {
    r.read_exact(buf).map_err(|e| ConnError::io(what, e))
}

fn send(w: &mut impl Write, bytes: &[u8]) -> Result<(), ConnError> {
    w.write_all(bytes)
        .and_then(|()| w.flush())
        .map_err(|e| ConnError::io("writing a handshake reply", e))
}

fn reply_err(w: &mut impl Write, option: u32, reply: u32, msg: &str) -> Result<(), ConnError> {
    send(w, &option_reply(option, reply, msg.as_bytes()))
}

/// The state of one connection's negotiation.
#[derive(Debug)]
pub struct Negotiation {
    no_zeroes: bool,
    /// The client speaks fixed newstyle (TLS needs it).
    fixed: bool,
    tls: TlsPolicy,
    tls_active: bool,
    session: Session,
    options: usize,
}

/// Run the server side of the handshake on a fresh connection without TLS.
pub fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    export: &ExportInfo,
) -> Result<Negotiated, ConnError> {
    let mut n = Negotiation::greet(r, w, TlsPolicy::Off)?;
    n.haggle(r, w, export)
}

impl Negotiation {
    /// Send the greeting and read the client's flags.
    pub fn greet<R: Read, W: Write>(
        r: &mut R,
        w: &mut W,
        tls: TlsPolicy,
    ) -> Result<Self, ConnError> {
        send(w, &greeting())?;
        let mut cf = [0u8; 4];
        read_exact(r, &mut cf, "before sending its client flags")?;
        // A client that leaves out FIXED_NEWSTYLE is still answered the fixed way
        // (the protocol allows it); an old client only ever sends EXPORT_NAME anyway.
        let client_flags = parse_client_flags(cf)?;
        Ok(Self {
            no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
            fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
            tls,
            tls_active: false,
            session: Session::default(),
            options: 0,
        })
    }

    /// The TLS handshake after [`Negotiated::StartTls`] succeeded: everything
    /// negotiated before it is forgotten.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.session = Session::default();
    }

    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Whether an option must be refused for want of TLS.
    fn tls_required(&self) -> bool {
        self.tls == TlsPolicy::Require && !self.tls_active
    }

    /// Haggle over options until transmission, an abort, or a TLS upgrade.
    pub fn haggle<R: Read, W: Write>(
        &mut self,
        r: &mut R,
        w: &mut W,
        export: &ExportInfo,
    ) -> Result<Negotiated, ConnError> {
        while self.options < MAX_OPTIONS {
            self.options += 1;
            let mut hb = [0u8; OPTION_HEADER_LEN];
            match r.read(&mut hb[..1]) {
                Ok(0) => return Ok(Negotiated::Aborted),
                Ok(_) => read_exact(r, &mut hb[1..], "in the middle of an option header")?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    read_exact(r, &mut hb, "in the middle of an option header")?
                }
                Err(e) => return Err(ConnError::io("reading an option header", e)),
            }
            let OptionHeader { option, len } = parse_option_header(&hb)?;
            if let Some(end) = self.option(r, w, export, option, len)? {
                return Ok(end);
            }
        }
        Err(ProtocolError::TooManyOptions(MAX_OPTIONS).into())
    }

    /// Answer one option; `Some` when haggling ends.
    fn option<R: Read, W: Write>(
        &mut self,
        r: &mut R,
        w: &mut W,
        export: &ExportInfo,
        option: u32,
        len: u32,
    ) -> Result<Option<Negotiated>, ConnError> {
        match option {
            OPT_EXPORT_NAME => {
                if len > MAX_OPTION_DATA {
                    return Err(ProtocolError::OptionTooLong {
                        option,
                        len,
                        max: MAX_OPTION_DATA,
                    }
                    .into());
                }
                let mut name = vec![0u8; len as usize];
                read_exact(r, &mut name, "in the middle of an export name")?;
                // This option cannot be answered with an error: the protocol
                // says to close the connection.
                if self.tls_required() {
                    return Err(ProtocolError::TlsRequired.into());
                }
                if self.session.style == ReplyStyle::Extended {
                    return Err(ProtocolError::ExportNameWithExtendedHeaders.into());
                }
                if !name.is_empty() {
                    return Err(ProtocolError::UnknownExport(
                        String::from_utf8_lossy(&name).into_owned(),
                    )
                    .into());
                }
                send(
                    w,
                    &export_name_reply(export.size, export.flags, self.no_zeroes),
                )?;
                return Ok(Some(Negotiated::Transmission(self.session)));
            }
            OPT_ABORT => {
                // Data is not expected; it is ignored, as the protocol asks.
                if len <= MAX_SKIP {
                    skip_bytes(r, len, "in the middle of option data")?;
                    // The client may already have closed its end; that is fine.
                    let _ = send(w, &option_reply(option, REP_ACK, &[]));
                }
                return Ok(Some(Negotiated::Aborted));
            }
            OPT_STARTTLS => {
                skip_or_close(r, option, len)?;
                let (reply, msg) = if self.tls == TlsPolicy::Off || !self.fixed {
                    (
                        REP_ERR_UNSUP,
                        "this export has no TLS (the server was started without --tls-cert)",
                    )
                } else if self.tls_active {
                    (REP_ERR_INVALID, "TLS is already running on this connection")
                } else if len != 0 {
                    (REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
                } else {
                    send(w, &option_reply(option, REP_ACK, &[]))?;
                    return Ok(Some(Negotiated::StartTls));
                };
                reply_err(w, option, reply, msg)?;
            }
            _ if self.tls_required() => {
                skip_or_close(r, option, len)?;
                let msg = format!(
                    "{}: this server requires TLS (NBD_OPT_STARTTLS) first",
                    option_name(option)
                );
                reply_err(w, option, REP_ERR_TLS_REQD, &msg)?;
            }
            OPT_LIST => {
                if len != 0 {
                    skip_or_close(r, option, len)?;
                    reply_err(w, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    return Ok(None);
                }
                let mut out = option_reply(option, REP_SERVER, &rep_server(""));
                out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
                send(w, &out)?;
            }
            OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS => {
                skip_or_close(r, option, len)?;
                if len != 0 {
                    let msg = format!("{} takes no data", option_name(option));
                    reply_err(w, option, REP_ERR_INVALID, &msg)?;
                } else if option == OPT_STRUCTURED_REPLY
                    && self.session.style == ReplyStyle::Extended
                {
                    reply_err(
                        w,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    )?;
                } else {
                    self.session.style = if option == OPT_EXTENDED_HEADERS {
                        ReplyStyle::Extended
                    } else {
                        ReplyStyle::Structured
                    };
                    send(w, &option_reply(option, REP_ACK, &[]))?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if option == OPT_SET_META_CONTEXT {
                    // Replaced even when the option fails.
                    self.session.base_allocation = false;
                }
                let Some(data) = read_data(r, w, option, len)? else {
                    return Ok(None);
                };
                self.meta_context(w, option, &data)?;
            }
            OPT_INFO | OPT_GO => {
                let Some(data) = read_data(r, w, option, len)? else {
                    return Ok(None);
                };
                let req = match parse_info_request(&data) {
                    Ok(req) => req,
                    Err(msg) => {
                        reply_err(w, option, REP_ERR_INVALID, msg)?;
                        return Ok(None);
                    }
                };
                if !req.name.is_empty() {
                    let msg = format!(
                        "no export named {:?}; this server has only the default export (empty name)",
                        String::from_utf8_lossy(&req.name)
                    );
                    reply_err(w, option, REP_ERR_UNKNOWN, &msg)?;
                    return Ok(None);
                }
                // Block sizes are sent whether or not the client asked: they are
                // stricter than the protocol's defaults (minimum 512, not 1). A
                // client that did not ask and sends unaligned requests gets EINVAL
                // for them, which the protocol allows.
                let mut out =
                    option_reply(option, REP_INFO, &info_export(export.size, export.flags));
                out.extend_from_slice(&option_reply(
                    option,
                    REP_INFO,
                    &info_block_size(MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD),
                ));
                out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
                send(w, &out)?;
                if option == OPT_GO {
                    return Ok(Some(Negotiated::Transmission(self.session)));
                }
            }
            _ => {
                skip_or_close(r, option, len)?;
                let msg = format!("{} is not supported by this server", option_name(option));
                reply_err(w, option, REP_ERR_UNSUP, &msg)?;
            }
        }
        Ok(None)
    }

    /// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` with its data.
    fn meta_context<W: Write>(
        &mut self,
        w: &mut W,
        option: u32,
        data: &[u8],
    ) -> Result<(), ConnError> {
        if self.session.style == ReplyStyle::Simple {
            return reply_err(
                w,
                option,
                REP_ERR_INVALID,
                "negotiate structured replies (or extended headers) before metadata contexts",
            );
        }
        let req = match parse_meta_request(data) {
            Ok(req) => req,
            Err(msg) => return reply_err(w, option, REP_ERR_INVALID, msg),
        };
        if !req.name.is_empty() {
            let msg = format!(
                "no export named {:?}; this server has only the default export (empty name)",
                String::from_utf8_lossy(&req.name)
            );
            return reply_err(w, option, REP_ERR_UNKNOWN, &msg);
        }
        let list = option == OPT_LIST_META_CONTEXT;
        let mut matched = false;
        for q in &req.queries {
            let Some(colon) = q.iter().position(|&b| b == b':') else {
                let msg = "a metadata context query lacks the namespace's colon";
                return reply_err(w, option, REP_ERR_INVALID, msg);
            };
            // Unknown namespaces and leaves are ignored, as the protocol asks;
            // "base:" is a wildcard for LIST only.
            matched |= q.as_slice() == META_BASE_ALLOCATION.as_bytes()
                || (list && &q[..colon] == b"base" && colon + 1 == q.len());
        }
        // LIST with no queries lists everything; SET with none selects nothing.
        let selected = matched || (list && req.queries.is_empty());
        let mut out = Vec::new();
        if selected {
            let id = if list { 0 } else { META_BASE_ALLOCATION_ID };
            out.extend(option_reply(
                option,
                REP_META_CONTEXT,
                &rep_meta_context(id, META_BASE_ALLOCATION),
            ));
            if !list {
                self.session.base_allocation = true;
            }
        }
        out.extend(option_reply(option, REP_ACK, &[]));
        send(w, &out)
    }
}

/// Read an option's data, or answer `NBD_REP_ERR_TOO_BIG` (`None`) if there is
/// more than this server reads.
fn read_data<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    option: u32,
    len: u32,
) -> Result<Option<Vec<u8>>, ConnError> {
    if len > MAX_OPTION_DATA {
        skip_or_close(r, option, len)?;
        reply_err(w, option, REP_ERR_TOO_BIG, "option data too long")?;
        return Ok(None);
    }
    let mut data = vec![0u8; len as usize];
    read_exact(r, &mut data, "in the middle of option data")?;
    Ok(Some(data))
}

/// Skip the data of an option that is answered with an error, unless there is
/// so much of it that reading it would only serve a denial of service.
fn skip_or_close(r: &mut impl Read, option: u32, len: u32) -> Result<(), ConnError> {
    if len > MAX_SKIP {
        return Err(ProtocolError::OptionTooLong {
            option,
            len,
            max: MAX_SKIP,
        }
        .into());
    }
    skip_bytes(r, len, "in the middle of option data")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;

    pub(crate) const EXPORT: ExportInfo = ExportInfo {
        size: 1 << 20,
        flags: TF_HAS_FLAGS | TF_SEND_FLUSH,
    };

    pub(crate) fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    pub(crate) fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// One option reply as the client sees it.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) struct Reply {
        pub option: u32,
        pub kind: u32,
        pub data: Vec<u8>,
    }

    /// Parse server output: greeting, then option replies; returns the replies
    /// and whatever bytes follow the last complete one.
    pub(crate) fn parse_output(out: &[u8]) -> (Vec<Reply>, Vec<u8>) {
        assert!(out.len() >= GREETING_LEN, "no greeting");
        assert_eq!(out[..GREETING_LEN], greeting());
        let mut rest = &out[GREETING_LEN..];
        let mut replies = Vec::new();
        while rest.len() >= 20 && rest[..8] == OPT_REPLY_MAGIC.to_be_bytes() {
            let option = u32::from_be_bytes(rest[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(rest[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
            assert!(rest.len() >= 20 + len, "truncated option reply");
            replies.push(Reply {
                option,
                kind,
                data: rest[20..20 + len].to_vec(),
            });
            rest = &rest[20 + len..];
        }
        (replies, rest.to_vec())
    }

    fn run(input: Vec<u8>) -> (Result<Negotiated, ConnError>, Vec<u8>, u64) {
        let mut r = Cursor::new(input);
        let mut w = Vec::new();
        let res = negotiate(&mut r, &mut w, &EXPORT);
        (res, w, r.position())
    }

    #[test]
    fn go_after_info_list_and_unknown_options() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_STARTTLS, &[]));
        input.extend(opt(0xdead, b"whatever"));
        input.extend(opt(OPT_LIST, &[]));
        input.extend(opt(
            OPT_INFO,
            &info_data(b"", &[INFO_EXPORT, INFO_BLOCK_SIZE]),
        ));
        input.extend(opt(OPT_GO, &info_data(b"nope", &[])));
        input.extend(opt(OPT_GO, &info_data(b"", &[INFO_BLOCK_SIZE])));
        input.extend_from_slice(b"first request bytes");
        let (res, out, pos) = run(input.clone());
        assert_eq!(res.unwrap(), Negotiated::Transmission(Session::default()));
        // Nothing of the transmission phase was consumed.
        assert_eq!(&input[pos as usize..], b"first request bytes");
        let (replies, rest) = parse_output(&out);
        assert!(rest.is_empty());
        let kinds: Vec<(u32, u32)> = replies.iter().map(|r| (r.option, r.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (OPT_STARTTLS, REP_ERR_UNSUP),
                (0xdead, REP_ERR_UNSUP),
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_ACK),
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_ACK),
                (OPT_GO, REP_ERR_UNKNOWN),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ]
        );
        assert_eq!(replies[2].data, 0u32.to_be_bytes());
        assert_eq!(replies[4].data, info_export(EXPORT.size, EXPORT.flags));
        assert_eq!(
            replies[5].data,
            info_block_size(512, 4096, 32 << 20),
            "block sizes: min 512, preferred 4096, max 32 MiB"
        );
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        for (flags, pad) in [(1u32, 124usize), (3, 0)] {
            let mut input = flags.to_be_bytes().to_vec();
            input.extend(opt(OPT_EXPORT_NAME, b""));
            let (res, out, _) = run(input);
            assert_eq!(res.unwrap(), Negotiated::Transmission(Session::default()));
            assert_eq!(out.len(), GREETING_LEN + 10 + pad);
            assert_eq!(
                out[GREETING_LEN..GREETING_LEN + 8],
                EXPORT.size.to_be_bytes()
            );
        }
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_EXPORT_NAME, b"other"));
        assert!(matches!(
            run(input).0,
            Err(ConnError::Protocol(ProtocolError::UnknownExport(_)))
        ));
    }

    #[test]
    fn abort_is_acknowledged() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_ABORT, &[]));
        let (res, out, _) = run(input);
        assert_eq!(res.unwrap(), Negotiated::Aborted);
        let (replies, _) = parse_output(&out);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].kind, REP_ACK);
    }

    #[test]
    fn malformed_input_is_a_clean_error() {
        // Garbage instead of client flags.
        let (res, _, _) = run(b"garbage\n".to_vec());
        assert!(matches!(
            res,
            Err(ConnError::Protocol(ProtocolError::UnknownClientFlags(_)))
        ));
        // Good flags, then garbage instead of an option.
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend_from_slice(b"this is not an option header");
        assert!(matches!(
            run(input).0,
            Err(ConnError::Protocol(ProtocolError::BadOptionMagic(_)))
        ));
        // Truncated in the middle of option data.
        let mut input = 1u32.to_be_bytes().to_vec();
        let o = opt(OPT_GO, &info_data(b"", &[]));
        input.extend_from_slice(&o[..o.len() - 2]);
        assert!(matches!(run(input).0, Err(ConnError::Truncated(_))));
        // Huge unknown option: closed without reading 4 GiB.
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend_from_slice(&IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&99u32.to_be_bytes());
        input.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            run(input).0,
            Err(ConnError::Protocol(ProtocolError::OptionTooLong { .. }))
        ));
        // Closed right after the flags: not an error worth shouting about.
        assert_eq!(
            run(1u32.to_be_bytes().to_vec()).0.unwrap(),
            Negotiated::Aborted
        );
        // Malformed INFO data is answered, and the connection goes on.
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_INFO, &[0, 0, 0, 200, 0, 0]));
        input.extend(opt(OPT_LIST, b"x"));
        input.extend(opt(OPT_GO, &info_data(b"", &[])));
        let (res, out, _) = run(input);
        assert_eq!(res.unwrap(), Negotiated::Transmission(Session::default()));
        let (replies, _) = parse_output(&out);
        assert_eq!(replies[0].kind, REP_ERR_INVALID);
        assert_eq!(replies[1].kind, REP_ERR_INVALID);
        assert_eq!(replies.last().unwrap().kind, REP_ACK);
    }

    pub(crate) fn meta_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        d
    }

    #[test]
    fn structured_replies_meta_contexts_and_extended_headers() {
        let mut input = 3u32.to_be_bytes().to_vec();
        // Before structured replies, meta contexts are refused.
        input.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_data(b"", &[b"base:allocation"]),
        ));
        input.extend(opt(OPT_STRUCTURED_REPLY, b"x"));
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(OPT_LIST_META_CONTEXT, &meta_data(b"", &[])));
        input.extend(opt(OPT_LIST_META_CONTEXT, &meta_data(b"", &[b"base:"])));
        input.extend(opt(
            OPT_LIST_META_CONTEXT,
            &meta_data(b"", &[b"qemu:dirty-bitmap:a"]),
        ));
        input.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_data(b"x", &[b"base:allocation"]),
        ));
        input.extend(opt(OPT_SET_META_CONTEXT, &meta_data(b"", &[b"nocolon"])));
        input.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_data(b"", &[b"base:", b"x-y:z", b"base:allocation"]),
        ));
        input.extend(opt(OPT_EXTENDED_HEADERS, &[]));
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(OPT_GO, &info_data(b"", &[])));
        let (res, out, _) = run(input);
        assert_eq!(
            res.unwrap(),
            Negotiated::Transmission(Session {
                style: ReplyStyle::Extended,
                base_allocation: true
            })
        );
        let (replies, rest) = parse_output(&out);
        assert!(rest.is_empty());
        let kinds: Vec<(u32, u32)> = replies.iter().map(|r| (r.option, r.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (OPT_SET_META_CONTEXT, REP_ERR_INVALID),
                (OPT_STRUCTURED_REPLY, REP_ERR_INVALID),
                (OPT_STRUCTURED_REPLY, REP_ACK),
                (OPT_LIST_META_CONTEXT, REP_META_CONTEXT),
                (OPT_LIST_META_CONTEXT, REP_ACK),
                (OPT_LIST_META_CONTEXT, REP_META_CONTEXT),
                (OPT_LIST_META_CONTEXT, REP_ACK),
                (OPT_LIST_META_CONTEXT, REP_ACK),
                (OPT_SET_META_CONTEXT, REP_ERR_UNKNOWN),
                (OPT_SET_META_CONTEXT, REP_ERR_INVALID),
                (OPT_SET_META_CONTEXT, REP_META_CONTEXT),
                (OPT_SET_META_CONTEXT, REP_ACK),
                (OPT_EXTENDED_HEADERS, REP_ACK),
                (OPT_STRUCTURED_REPLY, REP_ERR_EXT_HEADER_REQD),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ]
        );
        assert_eq!(replies[3].data, rep_meta_context(0, "base:allocation"));
        assert_eq!(replies[10].data, rep_meta_context(1, "base:allocation"));
        // A later SET without a match selects nothing; EXPORT_NAME after
        // extended headers closes the connection.
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_data(b"", &[b"base:allocation"]),
        ));
        input.extend(opt(OPT_SET_META_CONTEXT, &meta_data(b"", &[])));
        input.extend(opt(OPT_GO, &info_data(b"", &[])));
        let (res, _, _) = run(input);
        assert_eq!(
            res.unwrap(),
            Negotiated::Transmission(Session {
                style: ReplyStyle::Structured,
                base_allocation: false
            })
        );
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_EXTENDED_HEADERS, &[]));
        input.extend(opt(OPT_EXPORT_NAME, b""));
        assert!(matches!(
            run(input).0,
            Err(ConnError::Protocol(
                ProtocolError::ExportNameWithExtendedHeaders
            ))
        ));
    }

    #[test]
    fn tls_required_refuses_everything_but_starttls() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_LIST, &[]));
        input.extend(opt(OPT_GO, &info_data(b"", &[])));
        input.extend(opt(OPT_STARTTLS, b"x"));
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(OPT_STARTTLS, &[]));
        input.extend_from_slice(b"TLS client hello");
        let mut r = Cursor::new(input);
        let mut w = Vec::new();
        let mut n = Negotiation::greet(&mut r, &mut w, TlsPolicy::Require).unwrap();
        assert_eq!(
            n.haggle(&mut r, &mut w, &EXPORT).unwrap(),
            Negotiated::StartTls
        );
        let rest = &r.get_ref()[r.position() as usize..];
        assert_eq!(
            rest, b"TLS client hello",
            "nothing of the TLS stream consumed"
        );
        let (replies, _) = parse_output(&w);
        let kinds: Vec<(u32, u32)> = replies.iter().map(|r| (r.option, r.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (OPT_LIST, REP_ERR_TLS_REQD),
                (OPT_GO, REP_ERR_TLS_REQD),
                (OPT_STARTTLS, REP_ERR_INVALID),
                (OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD),
                (OPT_STARTTLS, REP_ACK),
            ]
        );
        // After the upgrade: a second STARTTLS is invalid, GO works, and what
        // was negotiated before TLS is forgotten.
        n.tls_started();
        let mut input = opt(OPT_STARTTLS, &[]);
        input.extend(opt(OPT_GO, &info_data(b"", &[])));
        let mut r = Cursor::new(input);
        let mut w = GREETING_BYTES.to_vec();
        assert_eq!(
            n.haggle(&mut r, &mut w, &EXPORT).unwrap(),
            Negotiated::Transmission(Session::default())
        );
        let (replies, _) = parse_output(&w);
        assert_eq!(replies[0].kind, REP_ERR_INVALID);
        assert_eq!(replies.last().unwrap().kind, REP_ACK);
        // EXPORT_NAME without TLS closes the connection.
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(OPT_EXPORT_NAME, b""));
        let mut r = Cursor::new(input);
        let mut w = Vec::new();
        let mut n = Negotiation::greet(&mut r, &mut w, TlsPolicy::Require).unwrap();
        assert!(matches!(
            n.haggle(&mut r, &mut w, &EXPORT),
            Err(ConnError::Protocol(ProtocolError::TlsRequired))
        ));
    }

    const GREETING_BYTES: [u8; GREETING_LEN] = {
        let mut g = [0u8; GREETING_LEN];
        let a = NBD_MAGIC.to_be_bytes();
        let b = IHAVEOPT.to_be_bytes();
        let mut i = 0;
        while i < 8 {
            g[i] = a[i];
            g[8 + i] = b[i];
            i += 1;
        }
        g[17] = (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) as u8;
        g
    };

    #[test]
    fn too_many_options() {
        let mut input = 1u32.to_be_bytes().to_vec();
        for _ in 0..=MAX_OPTIONS {
            input.extend(opt(OPT_LIST, &[]));
        }
        assert!(matches!(
            run(input).0,
            Err(ConnError::Protocol(ProtocolError::TooManyOptions(_)))
        ));
    }
}
