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

use super::handshake::tests::{info_data, opt, parse_output};
use super::handshake::{negotiate, ExportInfo, Negotiated};
use super::proto::*;
use super::transmission::{decide, transmit, Cmd, Decision, End, TransmitConfig};
use super::*;
use crate::target::{BlockTarget, TargetError, TargetResult};

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

impl BlockTarget for MemTarget {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> TargetResult<()> {
        std::thread::sleep(self.delay);
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }
    fn write(&self, offset: u64, buf: &[u8], fua: bool) -> TargetResult<()> {
        std::thread::sleep(self.delay);
        let r = self.range(offset, buf.len() as u64)?;
        self.data.lock().unwrap()[r].copy_from_slice(buf);
        self.writes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.flushes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
    fn flush(&self) -> TargetResult<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> TargetResult<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> TargetResult<()> {
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
}

const SIZE: u64 = 1 << 20;

fn hdr(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
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
            hdr(CMD_WRITE, 0, 0, MAX_PAYLOAD + 512),
            rej(NBD_EINVAL, MAX_PAYLOAD + 512),
        ),
        (hdr(CMD_READ, 0, 0, MAX_PAYLOAD + 512), rej(NBD_EINVAL, 0)),
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
        assert_eq!(decide(&h, SIZE), want, "{h:?}");
    }
}

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

fn check_decision(h: &RequestHeader, d: Decision, size: u64) {
    match d {
        Decision::Run(Cmd::Read { offset, len })
        | Decision::Run(Cmd::Write { offset, len, .. })
        | Decision::Run(Cmd::Trim { offset, len, .. })
        | Decision::Run(Cmd::WriteZeroes { offset, len, .. }) => {
            assert!(len > 0 && offset % 512 == 0 && len % 512 == 0);
            assert!(offset + u64::from(len) <= size);
            if matches!(h.kind, CMD_READ | CMD_WRITE) {
                assert!(len <= MAX_PAYLOAD);
            }
            assert_eq!((offset, len), (h.offset, h.len));
        }
        Decision::Run(Cmd::Flush) => assert_eq!(h.kind, CMD_FLUSH),
        Decision::Run(Cmd::Nop) => assert_eq!(h.len, 0),
        Decision::Reject { error, skip } => {
            assert!(error == NBD_EINVAL || error == NBD_ENOSPC);
            assert_eq!(skip, if h.kind == CMD_WRITE { h.len } else { 0 });
        }
        Decision::Disconnect => assert_eq!(h.kind, CMD_DISC),
    }
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
        Just((OPT_STARTTLS, vec![])),
        (12u32..1000, prop::collection::vec(any::<u8>(), 0..40)),
    ]
}

/// Run the handshake on `input` and check that the server's output is a
/// well-formed sequence of replies, whatever the input was.
fn handshake_never_panics(input: Vec<u8>) {
    let mut r = Cursor::new(input);
    let mut w = Vec::new();
    let res = negotiate(
        &mut r,
        &mut w,
        &ExportInfo {
            size: SIZE,
            flags: export_flags(),
        },
    );
    let (replies, rest) = parse_output(&w);
    match res {
        Ok(Negotiated::Transmission) => {
            // Either GO's ACK or the EXPORT_NAME reply (size, flags, maybe zeroes).
            if rest.is_empty() {
                let last = replies.last().expect("a reply");
                assert_eq!((last.option, last.kind), (OPT_GO, REP_ACK));
            } else {
                assert!(rest.len() == 10 || rest.len() == 134, "{}", rest.len());
                assert_eq!(rest[..8], SIZE.to_be_bytes());
            }
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
            check_decision(&h, decide(&h, size), size);
        }
    }

    #[test]
    fn valid_magic_requests_always_decide(
        flags in any::<u16>(), kind in 0u16..10, offset in any::<u64>(), len in any::<u32>(),
        small in any::<bool>(),
    ) {
        // Bias half the cases towards the interesting range.
        let (offset, len) = if small { (offset % (2 * SIZE), len % (1 << 21)) } else { (offset, len) };
        let h = RequestHeader { flags: flags & 0x1f, kind, handle: 1, offset, len };
        check_decision(&h, decide(&h, SIZE), SIZE);
        prop_assert_eq!(parse_request(&encode_request(&h)), Ok(h));
    }

    #[test]
    fn handshake_random_bytes(input in prop::collection::vec(any::<u8>(), 0..300)) {
        handshake_never_panics(input);
    }

    #[test]
    fn handshake_mutated_scripts(
        extra in prop::collection::vec(option_strategy(), 0..5),
        export_name in any::<bool>(),
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
        handshake_never_panics(s);
    }
}

/// A request for the model test; `None` payload for commands without one.
#[derive(Debug, Clone)]
struct Req {
    h: RequestHeader,
    seed: u8,
}

fn req_strategy() -> impl Strategy<Value = Req> {
    let size = SIZE / 8; // a small export keeps the model cheap
    let aligned = (0..size / 512, 0u32..24).prop_map(|(s, n)| (s * 512, n * 512));
    let anything = (0..size + 4096, 0u32..10_000);
    let extent = prop_oneof![4 => aligned, 1 => anything];
    (
        prop_oneof![
            4 => Just(CMD_READ), 4 => Just(CMD_WRITE), 1 => Just(CMD_FLUSH),
            1 => Just(CMD_TRIM), 1 => Just(CMD_WRITE_ZEROES), 1 => Just(CMD_CACHE),
            1 => 8u16..100,
        ],
        prop_oneof![8 => Just(0u16), 2 => Just(CMD_FLAG_FUA), 1 => 0u16..64],
        extent,
        any::<u8>(),
    )
        .prop_map(|(kind, flags, (offset, len), seed)| Req {
            h: RequestHeader {
                flags,
                kind,
                handle: 0,
                offset,
                len,
            },
            seed,
        })
}

fn payload(r: &Req) -> Vec<u8> {
    (0..r.h.len)
        .map(|i| (i as u8).wrapping_mul(13) ^ r.seed)
        .collect()
}

fn encode_stream(reqs: &[Req]) -> Vec<u8> {
    let mut v = Vec::new();
    for r in reqs {
        v.extend_from_slice(&encode_request(&r.h));
        if r.h.kind == CMD_WRITE {
            v.extend(payload(r));
        }
    }
    v
}

/// Split server output into replies: handle -> (error, data), in arrival order.
fn parse_replies(out: &[u8], read_len: &HashMap<u64, u32>) -> Vec<(u64, u32, Vec<u8>)> {
    let mut v = Vec::new();
    let mut rest = out;
    while !rest.is_empty() {
        assert!(rest.len() >= SIMPLE_REPLY_LEN, "truncated reply");
        let (error, handle) =
            parse_simple_reply(rest[..16].try_into().unwrap()).expect("reply magic");
        rest = &rest[16..];
        let n = if error == 0 {
            *read_len.get(&handle).unwrap_or(&0) as usize
        } else {
            0
        };
        assert!(rest.len() >= n, "truncated read data");
        v.push((handle, error, rest[..n].to_vec()));
        rest = &rest[n..];
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// With one worker, requests run in order: every reply is checked exactly
    /// against a plain model of the disk and of the protocol's rules.
    #[test]
    fn transmission_matches_the_model(mut reqs in prop::collection::vec(req_strategy(), 0..40), disc in any::<bool>()) {
        let size = SIZE / 8;
        for (i, r) in reqs.iter_mut().enumerate() {
            r.h.handle = 1000 + i as u64;
        }
        let mut input = encode_stream(&reqs);
        if disc {
            input.extend_from_slice(&encode_request(&hdr(CMD_DISC, 0, 0, 0)));
            input.extend_from_slice(b"ignored after DISC");
        }
        let t = MemTarget::new(size as usize);
        let out = Mutex::new(Vec::new());
        let cfg = TransmitConfig { size, workers: 1, max_inflight_bytes: 1 << 20, peer: "model".into() };
        let end = transmit(&mut Cursor::new(input), &out, &*t, &cfg).expect("well-formed stream");
        prop_assert_eq!(end, if disc { End::Disconnect } else { End::Closed });

        let mut model = vec![0u8; size as usize];
        let mut want: HashMap<u64, (u32, Vec<u8>)> = HashMap::new();
        let mut read_len = HashMap::new();
        for r in &reqs {
            let h = r.h;
            let (off, len) = (h.offset, u64::from(h.len));
            let known_flags = match h.kind {
                CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
                _ => CMD_FLAG_FUA,
            };
            let is_known = matches!(h.kind, CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES);
            let aligned = off % 512 == 0 && len % 512 == 0;
            let fits = off + len <= size;
            let error = if !is_known || h.flags & !known_flags != 0 {
                NBD_EINVAL
            } else if h.kind == CMD_FLUSH {
                if off == 0 && len == 0 { 0 } else { NBD_EINVAL }
            } else if !aligned {
                NBD_EINVAL
            } else if !fits {
                if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) { NBD_ENOSPC } else { NBD_EINVAL }
            } else {
                0
            };
            let mut data = Vec::new();
            if error == 0 {
                let range = off as usize..(off + len) as usize;
                match h.kind {
                    CMD_READ => {
                        data = model[range].to_vec();
                        read_len.insert(h.handle, h.len);
                    }
                    CMD_WRITE => model[range].copy_from_slice(&payload(r)),
                    CMD_TRIM | CMD_WRITE_ZEROES => model[range].fill(0),
                    _ => {}
                }
            }
            want.insert(h.handle, (error, data));
        }
        let got = parse_replies(&out.into_inner().unwrap(), &read_len);
        prop_assert_eq!(got.len(), reqs.len(), "one reply per request");
        for (handle, error, data) in got {
            let (we, wd) = want.remove(&handle).expect("a reply for a known, unanswered handle");
            prop_assert_eq!(error, we, "handle {}", handle);
            prop_assert!(data == wd, "read data differs for handle {}", handle);
        }
        prop_assert!(*t.data.lock().unwrap() == model, "disk differs from the model");
    }

    /// Mutated request streams with several workers: never a panic; the stream
    /// ends cleanly or with a protocol error; replies are well-formed.
    #[test]
    fn transmission_survives_mutated_streams(
        reqs in prop::collection::vec(req_strategy(), 0..20),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<Option<prop::sample::Index>>(),
    ) {
        let size = SIZE / 8;
        let mut reqs = reqs;
        for (i, r) in reqs.iter_mut().enumerate() {
            r.h.handle = i as u64;
        }
        let mut input = encode_stream(&reqs);
        for (i, b) in flips {
            if !input.is_empty() {
                let i = i.index(input.len());
                input[i] ^= b;
            }
        }
        if let Some(i) = cut {
            input.truncate(i.index(input.len() + 1));
        }
        // Which handles are reads, as the server will frame the stream (a
        // mutation may duplicate a handle: then replies cannot be told apart).
        let mut read_len = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let mut dup = false;
        let mut rest = &input[..];
        while rest.len() >= REQUEST_LEN {
            let Ok(h) = parse_request(rest[..REQUEST_LEN].try_into().unwrap()) else { break };
            rest = &rest[REQUEST_LEN..];
            if h.kind == CMD_DISC {
                break;
            }
            dup |= !seen.insert(h.handle);
            if h.kind == CMD_READ {
                read_len.insert(h.handle, h.len);
            }
            if h.kind == CMD_WRITE {
                if rest.len() < h.len as usize { break; }
                rest = &rest[h.len as usize..];
            }
        }
        let t = MemTarget::new(size as usize);
        let out = Mutex::new(Vec::new());
        let cfg = TransmitConfig { size, workers: 3, max_inflight_bytes: 64 << 10, peer: "fuzz".into() };
        match transmit(&mut Cursor::new(input), &out, &*t, &cfg) {
            Ok(_) | Err(ConnError::Protocol(ProtocolError::BadRequestMagic(_))) | Err(ConnError::Truncated(_)) => {}
            Err(e) => panic!("unexpected transmission error {e}"),
        }
        if !dup {
            parse_replies(&out.into_inner().unwrap(), &read_len);
        }
    }
}

// ---------------------------------------------------------------------------
// The server over real sockets
// ---------------------------------------------------------------------------

fn start(
    target: Arc<dyn BlockTarget>,
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
