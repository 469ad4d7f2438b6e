//! Tests of the NBD frontend: request checks, property tests that feed the
//! request parser and the handshake random and mutated byte streams, an exact
//! model check of the transmission phase, and the server over real sockets with
//! a minimal client written independently (testkit/src/nbd_client.rs).

use std::collections::HashMap;
use std::io::{Cursor, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::handshake::tests::{info_data, meta_data, opt, parse_output};
use super::handshake::{ExportInfo, Negotiated, Negotiation, Session, TlsPolicy};
use super::proto::*;
use super::transmission::{
    self, decide, payload_len, transmit, Cmd, Decision, End, TransmitConfig,
};
use super::*;
use crate::target::{AsyncTarget, Extent, TargetError, TargetResult};
use rbd_backend::aio::BufSlice;

// Written independently of `proto` (its own constants): the two check each other.
use client::Client;
use testkit::nbd_client as client;

/// An in-memory disk; optionally slow, to keep requests in flight.
struct MemTarget {
    data: Mutex<Vec<u8>>,
    delay: Duration,
    writes: AtomicUsize,
    flushes: AtomicUsize,
}

impl MemTarget {
    fn new(size: usize) -> Arc<Self> {
        Self::slow(size, Duration::ZERO)
    }

    fn slow(size: usize, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0; size]),
            delay,
            writes: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
        })
    }

    fn range(&self, offset: u64, len: u64) -> TargetResult<std::ops::Range<usize>> {
        let size = self.data.lock().unwrap().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(TargetError::new(libc::EINVAL, "out of range")),
        }
    }
}

impl MemTarget {
    async fn pause(&self) {
        if !self.delay.is_zero() {
            rbd_backend::aio::sleep(self.delay).await;
        }
    }

    fn zero(&self, offset: u64, len: u64) -> TargetResult<()> {
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
}

impl AsyncTarget for MemTarget {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    async fn read(&self, offset: u64, dst: BufSlice) -> TargetResult<()> {
        self.pause().await;
        let r = self.range(offset, dst.len() as u64)?;
        // SAFETY: the request owns `dst` while it runs.
        unsafe { dst.request_bytes_mut() }.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }
    async fn write(&self, offset: u64, src: BufSlice, fua: bool) -> TargetResult<()> {
        self.pause().await;
        let r = self.range(offset, src.len() as u64)?;
        // SAFETY: the request owns `src` while it runs.
        self.data.lock().unwrap()[r].copy_from_slice(unsafe { src.request_bytes() });
        self.writes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.flushes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
    async fn flush(&self) -> TargetResult<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn discard(&self, offset: u64, len: u64) -> TargetResult<()> {
        self.zero(offset, len)
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> TargetResult<()> {
        self.zero(offset, len)
    }
    /// All-zero 512-byte blocks are holes (what the model expects).
    fn block_status(&self, offset: u64, len: u64) -> TargetResult<Vec<Extent>> {
        let r = self.range(offset, len)?;
        let d = self.data.lock().unwrap();
        let mut out: Vec<Extent> = Vec::new();
        for b in d[r].chunks(512) {
            let hole = b.iter().all(|&x| x == 0);
            match out.last_mut() {
                Some(e) if e.hole == hole => e.len += b.len() as u64,
                _ => out.push(Extent {
                    len: b.len() as u64,
                    hole,
                }),
            }
        }
        Ok(out)
    }
}

const SIZE: u64 = 1 << 20;

/// Run the transmission phase over an in-memory stream; returns how it ended
/// and every byte it sent.
fn run_transmit(
    input: Vec<u8>,
    t: &Arc<MemTarget>,
    cfg: &TransmitConfig,
) -> (Result<End, ConnError>, Vec<u8>) {
    let wire = std::rc::Rc::new(super::wire::MemWire::new(input));
    let end = rbd_backend::aio::block_on(transmit(std::rc::Rc::clone(&wire), Arc::clone(t), cfg))
        .expect("an event loop");
    let out = wire.output.borrow().clone();
    (end, out)
}

fn hdr(kind: u16, flags: u16, offset: u64, len: u64) -> RequestHeader {
    RequestHeader {
        flags,
        kind,
        handle: 7,
        offset,
        len,
    }
}

#[test]
fn request_checks_follow_the_protocol() {
    let rej = |error, skip| Decision::Reject { error, skip };
    let cases = [
        (
            hdr(CMD_READ, 0, 0, 4096),
            Decision::Run(Cmd::Read {
                offset: 0,
                len: 4096,
            }),
        ),
        (
            hdr(CMD_WRITE, CMD_FLAG_FUA, 512, 512),
            Decision::Run(Cmd::Write {
                offset: 512,
                len: 512,
                fua: true,
            }),
        ),
        (
            hdr(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 8192),
            Decision::Run(Cmd::WriteZeroes {
                offset: 0,
                len: 8192,
                fua: false,
            }),
        ),
        (hdr(CMD_FLUSH, 0, 0, 0), Decision::Run(Cmd::Flush)),
        (hdr(CMD_FLUSH, 0, 512, 0), rej(NBD_EINVAL, 0)),
        (hdr(CMD_DISC, 0, 0, 0), Decision::Disconnect),
        (hdr(CMD_READ, 0, 0, 0), Decision::Run(Cmd::Nop)),
        // Misaligned.
        (hdr(CMD_READ, 0, 1, 512), rej(NBD_EINVAL, 0)),
        (hdr(CMD_WRITE, 0, 0, 100), rej(NBD_EINVAL, 100)),
        (hdr(CMD_TRIM, 0, 0, 1000), rej(NBD_EINVAL, 0)),
        // Out of range: reads and trims EINVAL, writes ENOSPC.
        (hdr(CMD_READ, 0, SIZE, 512), rej(NBD_EINVAL, 0)),
        (hdr(CMD_TRIM, 0, SIZE - 512, 1024), rej(NBD_EINVAL, 0)),
        (hdr(CMD_WRITE, 0, SIZE, 512), rej(NBD_ENOSPC, 512)),
        (hdr(CMD_WRITE_ZEROES, 0, SIZE, 512), rej(NBD_ENOSPC, 0)),
        (hdr(CMD_READ, 0, u64::MAX - 511, 512), rej(NBD_EINVAL, 0)),
        // Oversized payload.
        (
            hdr(CMD_WRITE, 0, 0, u64::from(MAX_PAYLOAD) + 512),
            rej(NBD_EINVAL, u64::from(MAX_PAYLOAD) + 512),
        ),
        (
            hdr(CMD_READ, 0, 0, u64::from(MAX_PAYLOAD) + 512),
            rej(NBD_EINVAL, 0),
        ),
        // Unknown or unadvertised commands and flags.
        (hdr(CMD_CACHE, 0, 0, 512), rej(NBD_EINVAL, 0)),
        (hdr(CMD_BLOCK_STATUS, 0, 0, 512), rej(NBD_EINVAL, 0)),
        (hdr(99, 0, 0, 512), rej(NBD_EINVAL, 0)),
        (hdr(CMD_READ, CMD_FLAG_DF, 0, 512), rej(NBD_EINVAL, 0)),
        (
            hdr(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512),
            rej(NBD_EINVAL, 512),
        ),
        (
            hdr(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512),
            rej(NBD_EINVAL, 0),
        ),
    ];
    for (h, want) in cases {
        assert_eq!(decide(&h, SIZE, &SIMPLE), want, "{h:?}");
    }
    // Block status needs base:allocation; with it, REQ_ONE is allowed.
    let st = Session {
        style: ReplyStyle::Structured,
        base_allocation: true,
    };
    let ext = Session {
        style: ReplyStyle::Extended,
        base_allocation: true,
    };
    let bs = |flags, offset, len| hdr(CMD_BLOCK_STATUS, flags, offset, len);
    let run_bs = |offset, len, req_one| {
        Decision::Run(Cmd::BlockStatus {
            offset,
            len,
            req_one,
        })
    };
    for (h, session, want) in [
        (bs(0, 0, 4096), st, run_bs(0, 4096, false)),
        (bs(CMD_FLAG_REQ_ONE, 512, 512), st, run_bs(512, 512, true)),
        (bs(0, 0, 4096), SIMPLE, rej(NBD_EINVAL, 0)),
        (bs(0, 0, 0), st, rej(NBD_EINVAL, 0)),
        (bs(0, SIZE, 512), st, rej(NBD_EINVAL, 0)),
        (bs(CMD_FLAG_NO_HOLE, 0, 512), st, rej(NBD_EINVAL, 0)),
        // Extended headers: 64-bit effect lengths, payload only on WRITE.
        (bs(0, 0, SIZE), ext, run_bs(0, SIZE, false)),
        (
            hdr(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512),
            ext,
            Decision::Run(Cmd::Write {
                offset: 0,
                len: 512,
                fua: false,
            }),
        ),
        // QEMU 10 leaves PAYLOAD_LEN out on writes: still a write with its data.
        (
            hdr(CMD_WRITE, CMD_FLAG_FUA, 0, 512),
            ext,
            Decision::Run(Cmd::Write {
                offset: 0,
                len: 512,
                fua: true,
            }),
        ),
        (
            hdr(CMD_READ, CMD_FLAG_PAYLOAD_LEN, 0, 512),
            ext,
            rej(NBD_EINVAL, 512),
        ),
        (
            hdr(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512),
            st,
            rej(NBD_EINVAL, 512),
        ),
        (
            hdr(CMD_TRIM, 0, 0, SIZE),
            ext,
            Decision::Run(Cmd::Trim {
                offset: 0,
                len: SIZE,
                fua: false,
            }),
        ),
        (hdr(CMD_TRIM, 0, 0, 1 << 40), ext, rej(NBD_EINVAL, 0)),
    ] {
        assert_eq!(decide(&h, SIZE, &session), want, "{h:?} {session:?}");
    }
}

const SIMPLE: Session = Session {
    style: ReplyStyle::Simple,
    base_allocation: false,
};

#[test]
fn advertised_flags_and_uris() {
    let f = export_flags();
    for bit in [
        TF_HAS_FLAGS,
        TF_SEND_FLUSH,
        TF_SEND_FUA,
        TF_SEND_TRIM,
        TF_SEND_WRITE_ZEROES,
        TF_CAN_MULTI_CONN,
    ] {
        assert_ne!(f & bit, 0);
    }
    for bit in [
        TF_READ_ONLY,
        TF_ROTATIONAL,
        TF_SEND_DF,
        TF_SEND_CACHE,
        TF_SEND_FAST_ZERO,
    ] {
        assert_eq!(f & bit, 0);
    }
    assert_eq!(
        uri_for_unix(std::path::Path::new("/run/a b/x&y.sock")),
        "nbd+unix:///?socket=/run/a%20b/x%26y.sock"
    );
    assert_eq!(
        client::unescape("/run/a%20b/x%26y.sock"),
        "/run/a b/x&y.sock"
    );
    assert_eq!(
        uri_for_tcp(&"127.0.0.1:10809".parse().unwrap()),
        "nbd://127.0.0.1:10809/"
    );
    assert_eq!(uri_for_tcp(&"[::1]:99".parse().unwrap()), "nbd://[::1]:99/");
}

// ---------------------------------------------------------------------------
// Property tests (fuzzing)
// ---------------------------------------------------------------------------

fn check_decision(h: &RequestHeader, d: Decision, size: u64, session: &Session) {
    match d {
        Decision::Run(Cmd::Read { offset, len })
        | Decision::Run(Cmd::Write { offset, len, .. }) => {
            assert!(len > 0 && offset % 512 == 0 && len % 512 == 0);
            assert!(offset + u64::from(len) <= size && len <= MAX_PAYLOAD);
            assert_eq!((offset, u64::from(len)), (h.offset, h.len));
        }
        Decision::Run(Cmd::Trim { offset, len, .. })
        | Decision::Run(Cmd::WriteZeroes { offset, len, .. })
        | Decision::Run(Cmd::BlockStatus { offset, len, .. }) => {
            assert!(len > 0 && offset % 512 == 0 && len % 512 == 0);
            assert!(offset + len <= size);
            assert_eq!((offset, len), (h.offset, h.len));
            if h.kind == CMD_BLOCK_STATUS {
                assert!(session.base_allocation && session.style != ReplyStyle::Simple);
            }
        }
        Decision::Run(Cmd::Flush) => assert_eq!(h.kind, CMD_FLUSH),
        Decision::Run(Cmd::Nop) => assert_eq!(h.len, 0),
        Decision::Reject { error, skip } => {
            assert!(error == NBD_EINVAL || error == NBD_ENOSPC);
            assert_eq!(skip, payload_len(h, session));
        }
        Decision::Disconnect => assert_eq!(h.kind, CMD_DISC),
    }
}

fn session_strategy() -> impl Strategy<Value = Session> {
    (0u8..3, any::<bool>()).prop_map(|(s, base_allocation)| {
        let style = [
            ReplyStyle::Simple,
            ReplyStyle::Structured,
            ReplyStyle::Extended,
        ][s as usize];
        Session {
            style,
            base_allocation: base_allocation && style != ReplyStyle::Simple,
        }
    })
}

/// A valid client handshake script ending in GO (or EXPORT_NAME).
fn handshake_script(extra: &[(u32, Vec<u8>)], export_name: bool) -> Vec<u8> {
    let mut v = 3u32.to_be_bytes().to_vec();
    for (o, d) in extra {
        v.extend(opt(*o, d));
    }
    if export_name {
        v.extend(opt(OPT_EXPORT_NAME, b""));
    } else {
        v.extend(opt(OPT_GO, &info_data(b"", &[INFO_BLOCK_SIZE])));
    }
    v
}

fn option_strategy() -> impl Strategy<Value = (u32, Vec<u8>)> {
    prop_oneof![
        Just((OPT_LIST, vec![])),
        Just((OPT_INFO, info_data(b"", &[INFO_EXPORT, INFO_BLOCK_SIZE]))),
        Just((OPT_INFO, info_data(b"other", &[]))),
        Just((OPT_STRUCTURED_REPLY, vec![])),
        Just((OPT_EXTENDED_HEADERS, vec![])),
        Just((OPT_STARTTLS, vec![])),
        Just((OPT_SET_META_CONTEXT, meta_data(b"", &[b"base:allocation"]))),
        Just((OPT_LIST_META_CONTEXT, meta_data(b"", &[]))),
        Just((OPT_SET_META_CONTEXT, meta_data(b"", &[b"base:", b"x"]))),
        (12u32..1000, prop::collection::vec(any::<u8>(), 0..40)),
    ]
}

/// Run the handshake on `input` and check that the server's output is a
/// well-formed sequence of replies, whatever the input was.
fn handshake_never_panics(input: Vec<u8>, tls: TlsPolicy) {
    let mut r = Cursor::new(input);
    let mut w = Vec::new();
    let export = ExportInfo {
        size: SIZE,
        flags: export_flags(),
    };
    let res =
        Negotiation::greet(&mut r, &mut w, tls).and_then(|mut n| n.haggle(&mut r, &mut w, &export));
    let (replies, rest) = parse_output(&w);
    for rep in &replies {
        if rep.kind == REP_META_CONTEXT {
            let id = if rep.option == OPT_LIST_META_CONTEXT {
                0
            } else {
                1
            };
            assert_eq!(rep.data, rep_meta_context(id, "base:allocation"));
        }
        if tls == TlsPolicy::Off {
            assert_ne!(rep.kind, REP_ERR_TLS_REQD);
        }
    }
    match res {
        Ok(Negotiated::Transmission(_)) => {
            // Either GO's ACK or the EXPORT_NAME reply (size, flags, maybe zeroes).
            if rest.is_empty() {
                let last = replies.last().expect("a reply");
                assert_eq!((last.option, last.kind), (OPT_GO, REP_ACK));
            } else {
                assert!(rest.len() == 10 || rest.len() == 134, "{}", rest.len());
                assert_eq!(rest[..8], SIZE.to_be_bytes());
            }
        }
        Ok(Negotiated::StartTls) => {
            assert_ne!(tls, TlsPolicy::Off);
            let last = replies.last().expect("a reply");
            assert_eq!((last.option, last.kind), (OPT_STARTTLS, REP_ACK));
        }
        Ok(Negotiated::Aborted) | Err(ConnError::Protocol(_)) | Err(ConnError::Truncated(_)) => {
            assert!(rest.is_empty(), "stray bytes after the replies");
        }
        Err(e) => panic!("unexpected handshake error {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn request_parser_never_panics(b in any::<[u8; REQUEST_LEN]>(), size in 0u64..=1 << 40) {
        let size = size & !511;
        if let Ok(h) = parse_request(&b) {
            check_decision(&h, decide(&h, size, &SIMPLE), size, &SIMPLE);
        }
        let mut e = [0u8; EXTENDED_REQUEST_LEN];
        e[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        e[4..].copy_from_slice(&b[..EXTENDED_REQUEST_LEN - 4]);
        let h = parse_extended_request(&e).unwrap();
        for base_allocation in [false, true] {
            let session = Session { style: ReplyStyle::Extended, base_allocation };
            check_decision(&h, decide(&h, size, &session), size, &session);
        }
    }

    #[test]
    fn valid_magic_requests_always_decide(
        flags in any::<u16>(), kind in 0u16..10, offset in any::<u64>(), len in any::<u64>(),
        small in any::<bool>(), session in session_strategy(),
    ) {
        // Bias half the cases towards the interesting range.
        let (offset, len) = if small { (offset % (2 * SIZE), len % (1 << 21)) } else { (offset, len) };
        let len = if session.style == ReplyStyle::Extended { len } else { len & 0xffff_ffff };
        let h = RequestHeader { flags: flags & 0x3f, kind, handle: 1, offset, len };
        check_decision(&h, decide(&h, SIZE, &session), SIZE, &session);
        prop_assert_eq!(parse_extended_request(&encode_extended_request(&h)), Ok(h));
        if len <= u64::from(u32::MAX) {
            prop_assert_eq!(parse_request(&encode_request(&h)), Ok(h));
        }
    }

    #[test]
    fn handshake_random_bytes(input in prop::collection::vec(any::<u8>(), 0..300)) {
        handshake_never_panics(input.clone(), TlsPolicy::Off);
        handshake_never_panics(input, TlsPolicy::Require);
    }

    #[test]
    fn handshake_mutated_scripts(
        extra in prop::collection::vec(option_strategy(), 0..5),
        export_name in any::<bool>(),
        tls in prop_oneof![Just(TlsPolicy::Off), Just(TlsPolicy::Optional), Just(TlsPolicy::Require)],
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<Option<prop::sample::Index>>(),
        insert in any::<Option<(prop::sample::Index, Vec<u8>)>>(),
    ) {
        let mut s = handshake_script(&extra, export_name);
        for (i, b) in flips {
            let i = i.index(s.len());
            s[i] ^= b;
        }
        if let Some((i, bytes)) = insert {
            let at = i.index(s.len() + 1);
            s.splice(at..at, bytes);
        }
        if let Some(i) = cut {
            s.truncate(i.index(s.len() + 1));
        }
        handshake_never_panics(s, tls);
    }
}

/// A request for the model test.
#[derive(Debug, Clone)]
struct Req {
    h: RequestHeader,
    seed: u8,
}

fn req_strategy(extended: bool) -> impl Strategy<Value = Req> {
    let size = SIZE / 8; // a small export keeps the model cheap
    let aligned = (0..size / 512, 0u64..24).prop_map(|(s, n)| (s * 512, n * 512));
    let anything = (0..size + 4096, 0u64..10_000);
    let extent = prop_oneof![4 => aligned, 1 => anything];
    (
        prop_oneof![
            4 => Just(CMD_READ), 4 => Just(CMD_WRITE), 1 => Just(CMD_FLUSH),
            1 => Just(CMD_TRIM), 1 => Just(CMD_WRITE_ZEROES), 1 => Just(CMD_CACHE),
            2 => Just(CMD_BLOCK_STATUS), 1 => 8u16..100,
        ],
        prop_oneof![8 => Just(0u16), 2 => Just(CMD_FLAG_FUA), 1 => Just(CMD_FLAG_REQ_ONE), 1 => 0u16..64],
        extent,
        any::<u8>(),
        0u8..10,
    )
        .prop_map(move |(kind, mut flags, (offset, len), seed, odd)| {
            // With extended headers a WRITE says it carries a payload, nearly always.
            if extended && kind == CMD_WRITE && odd != 0 {
                flags |= CMD_FLAG_PAYLOAD_LEN;
            }
            Req {
                h: RequestHeader {
                    flags,
                    kind,
                    handle: 0,
                    offset,
                    len,
                },
                seed,
            }
        })
}

fn payload(r: &Req, session: &Session) -> Vec<u8> {
    (0..payload_len(&r.h, session))
        .map(|i| (i as u8).wrapping_mul(13) ^ r.seed)
        .collect()
}

fn encode_stream(reqs: &[Req], session: &Session) -> Vec<u8> {
    let mut v = Vec::new();
    for r in reqs {
        if session.style == ReplyStyle::Extended {
            v.extend_from_slice(&encode_extended_request(&r.h));
        } else {
            v.extend_from_slice(&encode_request(&r.h));
        }
        v.extend(payload(r, session));
    }
    v
}

/// What a reply said, as a client reassembles it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Ok,
    Data(Vec<u8>),
    /// base:allocation extents: (length, flags).
    Status(Vec<(u64, u32)>),
    Error(u32),
}

fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(b[i..i + 4].try_into().unwrap())
}
fn be64(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i..i + 8].try_into().unwrap())
}

/// A reply being reassembled: read data, which bytes it covers, an error, extents.
type Partial = (Vec<u8>, Vec<bool>, Option<u32>, Option<Vec<(u64, u32)>>);

/// Split server output into answers in arrival order, checking the framing of
/// every reply and chunk as a strict client would. `reqs`: handle -> (offset, len, kind).
fn parse_replies(
    out: &[u8],
    style: ReplyStyle,
    reqs: &HashMap<u64, (u64, u64, u16)>,
) -> Vec<(u64, Answer)> {
    let mut done = Vec::new();
    // Reads being reassembled: handle -> (buffer, bytes covered, error).
    let mut partial: HashMap<u64, Partial> = HashMap::new();
    let mut rest = out;
    while !rest.is_empty() {
        if style != ReplyStyle::Extended && rest.len() >= 4 && be32(rest, 0) == SIMPLE_REPLY_MAGIC {
            assert!(rest.len() >= SIMPLE_REPLY_LEN, "truncated simple reply");
            let (error, handle) = parse_simple_reply(rest[..16].try_into().unwrap()).unwrap();
            rest = &rest[16..];
            let &(_, len, kind) = reqs.get(&handle).expect("reply to a known handle");
            if style == ReplyStyle::Structured {
                assert_ne!(
                    kind, CMD_READ,
                    "a simple reply to READ under structured replies"
                );
            }
            if error != 0 {
                done.push((handle, Answer::Error(error)));
            } else if kind == CMD_READ {
                let n = len as usize;
                assert!(rest.len() >= n, "truncated read data");
                done.push((handle, Answer::Data(rest[..n].to_vec())));
                rest = &rest[n..];
            } else {
                done.push((handle, Answer::Ok));
            }
            continue;
        }
        assert_ne!(style, ReplyStyle::Simple, "bad simple reply magic");
        let (flags, kind, handle, plen) = parse_chunk_header(rest, style).expect("chunk magic");
        let hl = style.chunk_header_len();
        if style == ReplyStyle::Extended {
            let &(off, _, _) = reqs.get(&handle).expect("known handle");
            assert_eq!(
                be64(rest, 16),
                off,
                "extended reply echoes the request offset"
            );
        }
        let plen = plen as usize;
        assert!(rest.len() >= hl + plen, "truncated chunk");
        let p = &rest[hl..hl + plen];
        rest = &rest[hl + plen..];
        let &(off, len, rkind) = reqs.get(&handle).expect("known handle");
        let entry = partial.entry(handle).or_insert_with(|| {
            // A mutated READ longer than the server accepts only gets an error.
            let n = if rkind == CMD_READ && len <= u64::from(MAX_PAYLOAD) {
                len as usize
            } else {
                0
            };
            (vec![0u8; n], vec![false; n], None, None)
        });
        match kind {
            REPLY_TYPE_NONE => assert_eq!(plen, 0),
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(rkind, CMD_READ);
                let at = be64(p, 0);
                let n = if kind == REPLY_TYPE_OFFSET_DATA {
                    assert!(plen > 8);
                    plen - 8
                } else {
                    assert_eq!(plen, 12);
                    be32(p, 8) as usize
                };
                assert!(
                    n > 0 && at >= off && at + n as u64 <= off + len,
                    "chunk outside the read"
                );
                let a = (at - off) as usize;
                for i in a..a + n {
                    assert!(!entry.1[i], "overlapping content chunks");
                    entry.1[i] = true;
                }
                if kind == REPLY_TYPE_OFFSET_DATA {
                    entry.0[a..a + n].copy_from_slice(&p[8..]);
                }
            }
            REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
                assert_eq!(rkind, CMD_BLOCK_STATUS);
                assert_eq!(be32(p, 0), META_BASE_ALLOCATION_ID);
                let mut list = Vec::new();
                if kind == REPLY_TYPE_BLOCK_STATUS_EXT {
                    assert_eq!(style, ReplyStyle::Extended);
                    let n = be32(p, 4) as usize;
                    assert!(n > 0 && plen == 8 + 16 * n, "status chunk length");
                    for i in 0..n {
                        let flags = be64(p, 8 + 16 * i + 8);
                        assert!(flags <= u64::from(u32::MAX));
                        list.push((be64(p, 8 + 16 * i), flags as u32));
                    }
                } else {
                    assert_eq!(style, ReplyStyle::Structured);
                    assert!(
                        plen >= 12 && (plen - 4).is_multiple_of(8),
                        "status chunk length"
                    );
                    for i in 0..(plen - 4) / 8 {
                        list.push((u64::from(be32(p, 4 + 8 * i)), be32(p, 8 + 8 * i)));
                    }
                }
                assert!(entry.3.is_none(), "one status chunk per context");
                entry.3 = Some(list);
            }
            REPLY_TYPE_ERROR => {
                let e = be32(p, 0);
                let m = u16::from_be_bytes([p[4], p[5]]) as usize;
                assert!(e != 0 && plen == 6 + m && m <= MAX_MESSAGE);
                assert!(std::str::from_utf8(&p[6..]).is_ok(), "message is UTF-8");
                entry.2 = Some(e);
            }
            k => panic!("unknown chunk type {k}"),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            let (data, covered, error, status) = partial.remove(&handle).unwrap();
            let answer = if let Some(e) = error {
                Answer::Error(e)
            } else if rkind == CMD_READ {
                assert!(
                    covered.iter().all(|&c| c),
                    "read reply does not cover the request"
                );
                Answer::Data(data)
            } else if let Some(list) = status {
                Answer::Status(list)
            } else {
                Answer::Ok
            };
            done.push((handle, answer));
        }
    }
    assert!(partial.is_empty(), "a reply without its final chunk");
    done
}

/// The model's answer to one request, or `None` if the connection must close.
fn model_answer(r: &Req, model: &mut [u8], session: &Session) -> Answer {
    let h = r.h;
    let size = model.len() as u64;
    let (off, len) = (h.offset, h.len);
    let extended = session.style == ReplyStyle::Extended;
    let known_flags = match h.kind {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_WRITE if extended => CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN,
        _ => CMD_FLAG_FUA,
    };
    let is_known = matches!(
        h.kind,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES
    ) || (h.kind == CMD_BLOCK_STATUS && session.base_allocation);
    let has_payload = h.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    let aligned = off % 512 == 0 && len % 512 == 0;
    let fits = off + len <= size;
    let bad_payload = extended && h.kind != CMD_WRITE && has_payload;
    let error = if !is_known || h.flags & !known_flags != 0 || bad_payload {
        NBD_EINVAL
    } else if h.kind == CMD_FLUSH {
        if off == 0 && len == 0 {
            0
        } else {
            NBD_EINVAL
        }
    } else if !aligned {
        NBD_EINVAL
    } else if !fits {
        if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            NBD_ENOSPC
        } else {
            NBD_EINVAL
        }
    } else if h.kind == CMD_BLOCK_STATUS && len == 0 {
        NBD_EINVAL
    } else {
        0
    };
    if error != 0 {
        return Answer::Error(error);
    }
    let range = off as usize..(off + len) as usize;
    match h.kind {
        CMD_READ => Answer::Data(model[range].to_vec()),
        CMD_WRITE => {
            model[range].copy_from_slice(&payload(r, session));
            Answer::Ok
        }
        CMD_TRIM | CMD_WRITE_ZEROES => {
            model[range].fill(0);
            Answer::Ok
        }
        CMD_BLOCK_STATUS => {
            // The test target reports all-zero 512-byte blocks as holes.
            let mut list: Vec<(u64, u32)> = Vec::new();
            for b in model[range].chunks(512) {
                let f = if b.iter().all(|&x| x == 0) {
                    STATE_HOLE | STATE_ZERO
                } else {
                    0
                };
                match list.last_mut() {
                    Some(l) if l.1 == f => l.0 += 512,
                    _ => list.push((512, f)),
                }
            }
            if h.flags & CMD_FLAG_REQ_ONE != 0 {
                list.truncate(1);
            }
            Answer::Status(list)
        }
        _ => Answer::Ok,
    }
}

fn style_strategy() -> impl Strategy<Value = Session> {
    prop_oneof![
        Just(SIMPLE),
        Just(Session {
            style: ReplyStyle::Structured,
            base_allocation: false
        }),
        Just(Session {
            style: ReplyStyle::Structured,
            base_allocation: true
        }),
        Just(Session {
            style: ReplyStyle::Extended,
            base_allocation: true
        }),
        Just(Session {
            style: ReplyStyle::Extended,
            base_allocation: false
        }),
    ]
}

fn model_case() -> impl Strategy<Value = (Session, Vec<Req>)> {
    style_strategy().prop_flat_map(|s| {
        let ext = s.style == ReplyStyle::Extended;
        (Just(s), prop::collection::vec(req_strategy(ext), 0..40))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// With one worker, requests run in order: every reply is checked exactly
    /// against a plain model of the disk and of the protocol's rules, in every
    /// reply style (simple, structured, extended headers).
    #[test]
    fn transmission_matches_the_model((session, mut reqs) in model_case(), disc in any::<bool>()) {
        let size = SIZE / 8;
        for (i, r) in reqs.iter_mut().enumerate() {
            r.h.handle = 1000 + i as u64;
        }
        let mut input = encode_stream(&reqs, &session);
        if disc {
            let d = hdr(CMD_DISC, 0, 0, 0);
            if session.style == ReplyStyle::Extended {
                input.extend_from_slice(&encode_extended_request(&d));
            } else {
                input.extend_from_slice(&encode_request(&d));
            }
            input.extend_from_slice(b"ignored after DISC");
        }
        let t = MemTarget::new(size as usize);
        let cfg = TransmitConfig { size, max_inflight_bytes: 1 << 20, max_requests: 1, session, peer: "model".into() };
        let (end, output) = run_transmit(input, &t, &cfg);
        let end = end.expect("well-formed stream");
        prop_assert_eq!(end, if disc { End::Disconnect } else { End::Closed });

        let mut model = vec![0u8; size as usize];
        let mut want: HashMap<u64, Answer> = HashMap::new();
        let mut info = HashMap::new();
        for r in &reqs {
            info.insert(r.h.handle, (r.h.offset, r.h.len, r.h.kind));
            want.insert(r.h.handle, model_answer(r, &mut model, &session));
        }
        let got = parse_replies(&output, session.style, &info);
        prop_assert_eq!(got.len(), reqs.len(), "one reply per request");
        for (handle, answer) in got {
            let w = want.remove(&handle).expect("a reply for a known, unanswered handle");
            prop_assert!(answer == w, "handle {}: got {:?}, want {:?}", handle, answer, w);
        }
        prop_assert!(*t.data.lock().unwrap() == model, "disk differs from the model");
    }

    /// Mutated request streams with several workers: never a panic; the stream
    /// ends cleanly or with a protocol error; replies are well-formed.
    #[test]
    fn transmission_survives_mutated_streams(
        (session, reqs) in model_case(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<Option<prop::sample::Index>>(),
    ) {
        let size = SIZE / 8;
        let mut reqs = reqs;
        reqs.truncate(20);
        for (i, r) in reqs.iter_mut().enumerate() {
            r.h.handle = i as u64;
        }
        let mut input = encode_stream(&reqs, &session);
        for (i, b) in flips {
            if !input.is_empty() {
                let i = i.index(input.len());
                input[i] ^= b;
            }
        }
        if let Some(i) = cut {
            input.truncate(i.index(input.len() + 1));
        }
        // Which handles are which requests, as the server will frame the stream
        // (a mutation may duplicate a handle: then replies cannot be told apart).
        let mut info = HashMap::new();
        let mut dup = false;
        let mut rest = &input[..];
        let hl = if session.style == ReplyStyle::Extended { EXTENDED_REQUEST_LEN } else { REQUEST_LEN };
        while rest.len() >= hl {
            let parsed = if session.style == ReplyStyle::Extended {
                parse_extended_request(rest[..hl].try_into().unwrap())
            } else {
                parse_request(rest[..hl].try_into().unwrap())
            };
            let Ok(h) = parsed else { break };
            rest = &rest[hl..];
            if h.kind == CMD_DISC {
                break;
            }
            dup |= info.insert(h.handle, (h.offset, h.len, h.kind)).is_some();
            let p = payload_len(&h, &session);
            if session.style == ReplyStyle::Extended && p > u64::from(MAX_PAYLOAD) {
                break;
            }
            if (rest.len() as u64) < p { break; }
            rest = &rest[p as usize..];
        }
        let t = MemTarget::new(size as usize);
        let cfg = TransmitConfig { size, max_inflight_bytes: 64 << 10, max_requests: 3, session, peer: "fuzz".into() };
        let (res, output) = run_transmit(input, &t, &cfg);
        match res {
            Ok(_)
            | Err(ConnError::Protocol(ProtocolError::BadRequestMagic(_)))
            | Err(ConnError::Protocol(ProtocolError::PayloadTooLarge(_)))
            | Err(ConnError::Truncated(_)) => {}
            Err(e) => panic!("unexpected transmission error {e}"),
        }
        if !dup {
            parse_replies(&output, session.style, &info);
        }
    }

    /// Read replies with holes: the chunks cover the data exactly, holes are
    /// all zero and long, and data chunks hold what was read.
    #[test]
    fn read_chunks_cover_the_data(blocks in prop::collection::vec((any::<bool>(), 1usize..40), 0..12), tail in 0usize..4096) {
        let mut data = Vec::new();
        for (zero, n) in blocks {
            let b = if zero { 0u8 } else { 0x5a };
            data.extend(std::iter::repeat_n(b, n * 4096));
        }
        data.extend(std::iter::repeat_n(1u8, tail));
        let chunks = transmission::read_chunks(&data);
        let mut pos = 0;
        for (a, b, hole) in chunks {
            prop_assert_eq!(a, pos);
            prop_assert!(b > a);
            if hole {
                prop_assert!(b - a >= transmission::HOLE_MIN);
                prop_assert!(data[a..b].iter().all(|&x| x == 0));
            }
            pos = b;
        }
        prop_assert_eq!(pos, data.len());
    }
}

#[test]
fn block_status_replies_are_clipped_to_the_request() {
    let ext = [
        Extent {
            len: 8192,
            hole: true,
        },
        Extent {
            len: 1 << 33,
            hole: false,
        },
    ];
    // Compact: the 8 GiB extent is clipped to the request.
    let v = transmission::block_status_reply(ReplyStyle::Structured, 5, 0, 1 << 32, false, &ext);
    let (_, kind, _, plen) = parse_chunk_header(&v, ReplyStyle::Structured).unwrap();
    assert_eq!((kind, plen), (REPLY_TYPE_BLOCK_STATUS, 4 + 16));
    assert_eq!(be32(&v, 24), 8192);
    assert_eq!(be32(&v, 28), STATE_HOLE | STATE_ZERO);
    assert_eq!(u64::from(be32(&v, 32)), (1u64 << 32) - 8192);
    // REQ_ONE: one extent, within the request.
    let v = transmission::block_status_reply(ReplyStyle::Extended, 5, 0, 4096, true, &ext);
    let (_, kind, _, plen) = parse_chunk_header(&v, ReplyStyle::Extended).unwrap();
    assert_eq!((kind, plen), (REPLY_TYPE_BLOCK_STATUS_EXT, 8 + 16));
    assert_eq!(be64(&v, 40), 4096);
    // Extended: 64-bit lengths pass whole.
    let v = transmission::block_status_reply(ReplyStyle::Extended, 5, 0, 1 << 40, false, &ext);
    assert_eq!(be64(&v, 56), 1 << 33);
}

// ---------------------------------------------------------------------------
// The server over real sockets
// ---------------------------------------------------------------------------

fn start(
    target: Arc<MemTarget>,
    dir: &std::path::Path,
    opts: NbdOptions,
) -> (NbdServer, std::path::PathBuf) {
    let sock = dir.join("nbd.sock");
    let l = Listeners::bind(&[ListenSpec::Unix(sock.clone())], 0o600).unwrap();
    (NbdServer::start(l, target, opts).unwrap(), sock)
}

#[test]
fn serves_reads_writes_and_errors_over_a_unix_socket() {
    let d = tempfile::tempdir().unwrap();
    let t = MemTarget::new(SIZE as usize);
    let (srv, sock) = start(t.clone(), d.path(), NbdOptions::default());
    assert_eq!(srv.uris(), &[uri_for_unix(&sock)]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    let mut c = Client::connect_uri(&srv.uris()[0]).unwrap();
    assert_eq!(c.size, SIZE);
    assert_eq!(c.flags, export_flags());
    assert_eq!(c.block_size, Some((512, 4096, 32 << 20)));
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    c.write(4096, &data, true).unwrap().unwrap();
    assert_eq!(c.read(4096, 8192).unwrap().unwrap(), data);
    c.write_zeroes(4096, 512, client::FLAG_NO_HOLE)
        .unwrap()
        .unwrap();
    c.trim(8192, 4096).unwrap().unwrap();
    c.flush().unwrap().unwrap();
    let back = c.read(4096, 8192).unwrap().unwrap();
    assert!(back[..512].iter().all(|&b| b == 0));
    assert_eq!(back[512..4096], data[512..4096]);
    // Errors keep the connection usable.
    assert_eq!(c.read(SIZE, 512).unwrap(), Err(client::EINVAL));
    assert_eq!(
        c.write(SIZE - 512, &[1; 1024], false).unwrap(),
        Err(client::ENOSPC)
    );
    assert_eq!(c.read(100, 512).unwrap(), Err(client::EINVAL));
    assert_eq!(c.raw(42, 0, 0, 512, &[]).unwrap(), client::EINVAL);
    assert_eq!(c.read(0, 512).unwrap().unwrap(), vec![0; 512]);
    c.disconnect().unwrap();
    assert!(
        t.flushes.load(Ordering::SeqCst) >= 2,
        "FUA and FLUSH reach the target"
    );
    srv.stop();
    assert!(!sock.exists(), "socket file removed at stop");
}

#[test]
fn malformed_handshake_closes_only_that_connection() {
    let d = tempfile::tempdir().unwrap();
    let t = MemTarget::new(SIZE as usize);
    let (srv, sock) = start(t, d.path(), NbdOptions::default());
    let mut good = Client::connect_unix(&sock).unwrap();
    good.write(0, &[7; 512], false).unwrap().unwrap();

    for garbage in [
        &b"garbage\n"[..],
        b"\x00\x00\x00\x01NOTANOPTIONHEADER.....",
        b"\x00\x00\x00\x01IHAVEOPT\x00\x00\x00\x07\xff\xff\xff\xff",
    ] {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(garbage).unwrap();
        let mut got = Vec::new();
        // The server closes the connection (after the greeting, maybe a reply).
        s.read_to_end(&mut got).unwrap();
        assert!(got.starts_with(b"NBDMAGICIHAVEOPT"), "{got:?}");
    }
    // The established connection and a new one still work.
    assert_eq!(good.read(0, 512).unwrap().unwrap(), vec![7; 512]);
    let mut again = Client::connect_unix(&sock).unwrap();
    assert_eq!(again.read(0, 512).unwrap().unwrap(), vec![7; 512]);
    // A broken request stream closes only its own connection.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let raw = Client::handshake(Box::new(s.try_clone().unwrap())).unwrap();
    s.write_all(&[0xee; 28]).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no reply to a request with a bad magic");
    drop(raw);
    assert_eq!(again.read(0, 512).unwrap().unwrap(), vec![7; 512]);
    good.disconnect().unwrap();
    again.disconnect().unwrap();
    srv.stop();
}

#[test]
fn requests_run_concurrently_and_replies_come_out_of_order() {
    let d = tempfile::tempdir().unwrap();
    let t = MemTarget::slow(SIZE as usize, Duration::from_millis(200));
    let (srv, sock) = start(t, d.path(), NbdOptions::default());
    let mut c = Client::connect_unix(&sock).unwrap();
    let start = Instant::now();
    let mut handles = Vec::new();
    for i in 0..8u64 {
        handles.push(
            c.send(client::WRITE, 0, i * 4096, 4096, &[i as u8; 4096])
                .unwrap(),
        );
    }
    // A refused request is answered at once, before the slow writes.
    let bad = c.send(client::READ, 0, 1, 512, &[]).unwrap();
    let (first, err, _) = c.recv(|_| 0).unwrap();
    assert_eq!((first, err), (bad, client::EINVAL));
    let mut got = Vec::new();
    for _ in 0..8 {
        let (h, e, _) = c.recv(|_| 0).unwrap();
        assert_eq!(e, 0);
        got.push(h);
    }
    got.sort_unstable();
    assert_eq!(got, handles);
    assert!(
        start.elapsed() < Duration::from_millis(1200),
        "8 writes of 200 ms took {:?}: not concurrent",
        start.elapsed()
    );
    c.disconnect().unwrap();
    srv.stop();
}

#[test]
fn stop_finishes_requests_in_flight_and_other_connections_are_independent() {
    let d = tempfile::tempdir().unwrap();
    let t = MemTarget::slow(SIZE as usize, Duration::from_millis(300));
    let (srv, sock) = start(t.clone(), d.path(), NbdOptions::default());
    let mut a = Client::connect_unix(&sock).unwrap();
    let b = Client::connect_unix(&sock).unwrap();
    let h = a.send(client::WRITE, 0, 0, 4096, &[9; 4096]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // A client that disconnects abruptly does not disturb the others.
    drop(b);
    let stopper = std::thread::spawn(move || srv.stop());
    let (rh, e, _) = a.recv(|_| 0).unwrap();
    assert_eq!((rh, e), (h, 0), "the write in flight was answered");
    stopper.join().unwrap();
    assert_eq!(t.writes.load(Ordering::SeqCst), 1);
    assert_eq!(t.data.lock().unwrap()[..4096], [9; 4096]);
    assert!(!sock.exists());
    assert!(Client::connect_unix(&sock).is_err(), "no longer accepting");
}

#[test]
fn stale_socket_is_replaced_and_a_live_one_refused() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s.sock");
    // A stale socket: bound, then its listener closed without removing the file.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let l = Listeners::bind(&[ListenSpec::Unix(sock.clone())], 0o660).unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let e = Listeners::bind(&[ListenSpec::Unix(sock.clone())], 0o600)
        .err()
        .unwrap();
    assert!(e.to_string().contains("another server is listening"), "{e}");
    drop(l);
    assert!(!sock.exists());
    let file = d.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let e = Listeners::bind(&[ListenSpec::Unix(file.clone())], 0o600)
        .err()
        .unwrap();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert!(file.exists(), "a regular file is never removed");
}

#[test]
fn tcp_loopback_with_an_ephemeral_port() {
    let t = MemTarget::new(SIZE as usize);
    let l = Listeners::bind(
        &[ListenSpec::Tcp {
            host: String::new(),
            port: 0,
        }],
        0o600,
    )
    .unwrap();
    let srv = NbdServer::start(l, t, NbdOptions::default()).unwrap();
    let uri = srv.uris()[0].clone();
    assert!(
        uri.starts_with("nbd://127.0.0.1:") && !uri.ends_with(":0/"),
        "{uri}"
    );
    let mut c = Client::connect_uri(&uri).unwrap();
    c.write(0, &[5; 4096], false).unwrap().unwrap();
    assert_eq!(c.read(0, 4096).unwrap().unwrap(), vec![5; 4096]);
    c.disconnect().unwrap();
    srv.stop();
}

#[test]
fn connection_limit_closes_extra_clients() {
    let d = tempfile::tempdir().unwrap();
    let t = MemTarget::new(SIZE as usize);
    let opts = NbdOptions {
        max_connections: 1,
        ..NbdOptions::default()
    };
    let (srv, sock) = start(t, d.path(), opts);
    let mut a = Client::connect_unix(&sock).unwrap();
    assert!(
        Client::connect_unix(&sock).is_err(),
        "second client refused"
    );
    a.flush().unwrap().unwrap();
    a.disconnect().unwrap();
    // Once the first is gone, a new client gets in.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Client::connect_unix(&sock) {
            Ok(c) => {
                c.disconnect().unwrap();
                break;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    }
    srv.stop();
}
