//! The handshake: fixed newstyle negotiation with option haggling.
//!
//! Supported options: `NBD_OPT_GO`, `NBD_OPT_INFO` (answering with
//! `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE`), `NBD_OPT_LIST`, `NBD_OPT_ABORT`
//! and the old `NBD_OPT_EXPORT_NAME`. Every other option (TLS, structured
//! replies, metadata contexts, extended headers, unknown numbers) is answered
//! with `NBD_REP_ERR_UNSUP` and negotiation goes on. The server has exactly one
//! export, the default one, whose name is the empty string.
//!
//! Bytes the client sends are bounded: option data beyond [`MAX_OPTION_DATA`]
//! is skipped (or, for an unknown option beyond [`MAX_SKIP`], the connection is
//! closed), and a client gets [`MAX_OPTIONS`] options before it is dropped.

use std::io::{self, Read, Write};

use super::proto::*;

/// Largest option data this server reads into memory (export names are at
/// most 4096 bytes; INFO/GO add 6 bytes and a short list of info types).
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

/// How the handshake ended, when it ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME` succeeded: transmission starts.
    Transmission,
    /// The client sent `NBD_OPT_ABORT` (answered) or closed the connection
    /// between two options.
    Aborted,
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

/// Run the server side of the handshake on a fresh connection.
pub fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    export: &ExportInfo,
) -> Result<Negotiated, ConnError> {
    send(w, &greeting())?;
    let mut cf = [0u8; 4];
    read_exact(r, &mut cf, "before sending its client flags")?;
    // A client that leaves out FIXED_NEWSTYLE is still answered the fixed way
    // (the protocol allows it); an old client only ever sends EXPORT_NAME anyway.
    let client_flags = parse_client_flags(cf)?;
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    for _ in 0..MAX_OPTIONS {
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
                if !name.is_empty() {
                    // This option cannot be answered with an error: the protocol
                    // says to close the connection.
                    return Err(ProtocolError::UnknownExport(
                        String::from_utf8_lossy(&name).into_owned(),
                    )
                    .into());
                }
                send(w, &export_name_reply(export.size, export.flags, no_zeroes))?;
                return Ok(Negotiated::Transmission);
            }
            OPT_ABORT => {
                // Data is not expected; it is ignored, as the protocol asks.
                if len <= MAX_SKIP {
                    skip_bytes(r, len, "in the middle of option data")?;
                    // The client may already have closed its end; that is fine.
                    let _ = send(w, &option_reply(option, REP_ACK, &[]));
                }
                return Ok(Negotiated::Aborted);
            }
            OPT_LIST => {
                if len != 0 {
                    skip_or_close(r, option, len)?;
                    reply_err(w, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let mut out = option_reply(option, REP_SERVER, &rep_server(""));
                out.extend_from_slice(&option_reply(option, REP_ACK, &[]));
                send(w, &out)?;
            }
            OPT_INFO | OPT_GO => {
                if len > MAX_OPTION_DATA {
                    skip_or_close(r, option, len)?;
                    reply_err(w, option, REP_ERR_INVALID, "option data too long")?;
                    continue;
                }
                let mut data = vec![0u8; len as usize];
                read_exact(r, &mut data, "in the middle of option data")?;
                let req = match parse_info_request(&data) {
                    Ok(req) => req,
                    Err(msg) => {
                        reply_err(w, option, REP_ERR_INVALID, msg)?;
                        continue;
                    }
                };
                if !req.name.is_empty() {
                    let msg = format!(
                        "no export named {:?}; this server has only the default export (empty name)",
                        String::from_utf8_lossy(&req.name)
                    );
                    reply_err(w, option, REP_ERR_UNKNOWN, &msg)?;
                    continue;
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
                    return Ok(Negotiated::Transmission);
                }
            }
            _ => {
                skip_or_close(r, option, len)?;
                let msg = format!("{} is not supported by this server", option_name(option));
                reply_err(w, option, REP_ERR_UNSUP, &msg)?;
            }
        }
    }
    Err(ProtocolError::TooManyOptions(MAX_OPTIONS).into())
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
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
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
        assert_eq!(res.unwrap(), Negotiated::Transmission);
        // Nothing of the transmission phase was consumed.
        assert_eq!(&input[pos as usize..], b"first request bytes");
        let (replies, rest) = parse_output(&out);
        assert!(rest.is_empty());
        let kinds: Vec<(u32, u32)> = replies.iter().map(|r| (r.option, r.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (OPT_STRUCTURED_REPLY, REP_ERR_UNSUP),
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
            assert_eq!(res.unwrap(), Negotiated::Transmission);
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
        assert_eq!(res.unwrap(), Negotiated::Transmission);
        let (replies, _) = parse_output(&out);
        assert_eq!(replies[0].kind, REP_ERR_INVALID);
        assert_eq!(replies[1].kind, REP_ERR_INVALID);
        assert_eq!(replies.last().unwrap().kind, REP_ACK);
    }

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
