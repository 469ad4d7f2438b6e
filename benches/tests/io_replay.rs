//! `io-replay` end to end: a trace recorded by a real server (`--io-trace`)
//! from two clients at once is replayed against a fresh server and against
//! a plain file, every request of it, and a damaged trace is refused.

use std::process::Command;
use std::thread;

use testkit::nbd_client::Client;
use testkit::serve::{sparse_file, Disk};
use ublk_cache::io_trace::Trace;

const MIB: u64 = 1 << 20;

fn replay(trace: &std::path::Path, target: &str, json: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_io-replay"))
        .arg("--trace")
        .arg(trace)
        .args(["--target", target, "--workers", "4", "--json"])
        .arg(json)
        .output()
        .expect("running io-replay")
}

#[test]
fn a_recorded_trace_replays_against_a_server_and_a_file() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let trace = d.path().join("io.trace");
    let disk = Disk::new(&a, 16 * MIB);
    let srv = disk.serve_with("back", "8M", 0, &["--io-trace", trace.to_str().unwrap()]);
    let uri = srv.uris[0].clone();
    let clients: Vec<_> = (0..2u64)
        .map(|t| {
            let uri = uri.clone();
            thread::spawn(move || {
                let mut c = Client::connect_uri(&uri).unwrap();
                for i in 0..32u64 {
                    let off = (i * 2 + t) * 65536;
                    c.write(off, &[t as u8 + 1; 4096], false).unwrap().unwrap();
                }
                c.flush().unwrap().unwrap();
                for i in 0..32u64 {
                    c.read((i * 2 + t) * 65536, 4096).unwrap().unwrap();
                }
                c.disconnect().unwrap();
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    srv.stop();
    let recorded = Trace::read(&trace).unwrap();
    assert_eq!(
        recorded.records.len(),
        130,
        "2 x (32 writes, a flush, 32 reads)"
    );

    let json = d.path().join("out.json");
    let fresh = Disk::new(&b, 16 * MIB);
    let srv = fresh.serve("back", "8M", &[]);
    let o = replay(&trace, &srv.uris[0], &json);
    srv.stop();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        (&j["requests"], &j["reads"], &j["failed"]),
        (&130.into(), &64.into(), &0.into()),
        "{j}"
    );
    // The replay wrote what the trace wrote, where it wrote it.
    let back = std::fs::read(&fresh.backend).unwrap();
    for i in 0..64u64 {
        let at = (i * 65536) as usize;
        assert!(
            back[at..at + 4096].iter().any(|&x| x != 0),
            "write at {at} not replayed"
        );
    }

    let file = d.path().join("plain.img");
    sparse_file(&file, 16 * MIB);
    let o = replay(&trace, file.to_str().unwrap(), &json);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let text = std::fs::read_to_string(&trace).unwrap();
    let bad = d.path().join("bad.trace");
    std::fs::write(&bad, text.replacen(" R ", " X ", 1)).unwrap();
    let o = replay(&bad, file.to_str().unwrap(), &json);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("op 'X'"), "{err}");
}
