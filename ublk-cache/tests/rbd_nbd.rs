//! End to end over RBD: the real `ublk-cache serve --backend rbd:POOL/IMAGE
//! --export nbd:unix:...` against the test cluster (scripts/ceph-cluster.sh),
//! driven by real clients: `fio --ioengine=nbd --verify=crc32c` and qemu-io
//! pattern writes and reads, in `back` and `through`, with a cache small enough
//! to force eviction (and write-back under backpressure). What the export
//! serves is copied out with nbdcopy; after a clean stop, `rbd export` of the
//! image must equal it byte for byte, and a warm restart must serve it again.
//!
//! Without a cluster it prints `SKIP:` (and fails under
//! `UBLK_CACHE_REQUIRE_CEPH=1`); a missing client tool prints `SKIP:` (and
//! fails under `UBLK_CACHE_REQUIRE_NBD_CLIENTS=1`).
#![cfg(feature = "rbd")]

use std::path::Path;
use std::process::Command;

use rbd_backend::RbdSpec;
use testkit::ceph::{rbd_test, TestCluster};
use testkit::serve::{self, fio_with_nbd, qemu_io, run, start, tool, Server};

const MIB: u64 = 1 << 20;

/// `serve` over the image in `mode`, exported on `sock`.
fn serve_rbd(c: &TestCluster, spec: &RbdSpec, mode: &str, dir: &Path, tag: &str) -> Server {
    let mut cmd = serve::rbd_serve_cmd(c, spec, dir);
    cmd.arg("--backend-timeout")
        .arg("60")
        .arg("--mode")
        .arg(mode)
        .arg("--cache")
        .arg(dir.join("cache.img"))
        .args(["--cache-size", "4M", "--line-size", "64K"])
        .arg("--export")
        .arg(format!("nbd:unix:{}", dir.join("nbd.sock").display()));
    start(cmd, 1, dir.join(format!("serve-{tag}.log")))
}

#[test]
fn rbd_over_nbd_with_fio_and_qemu_io() {
    let Some((c, _wd)) = rbd_test("rbd_nbd", 900) else {
        return;
    };
    let (Some(fio), Some(qio), Some(qimg), Some(nbdcopy)) = (
        fio_with_nbd(),
        tool("qemu-io"),
        tool("qemu-img"),
        tool("nbdcopy"),
    ) else {
        return;
    };
    for mode in ["back", "through"] {
        let d = tempfile::tempdir().expect("tempdir");
        let img = c.image(&format!("nbd-{mode}"), 32 * MIB);
        let srv = serve_rbd(&c, &img.spec, mode, d.path(), "1");
        let uri = srv.uris[0].clone();
        assert!(uri.starts_with("nbd+unix:///?socket="), "{uri}");

        // 24 MiB of random writes of 4-64 KiB through a 4 MiB cache, then
        // every block read back and checked.
        serve::fio_verify_24m(
            &fio,
            &uri,
            11,
            d.path(),
            &srv,
            &format!("over rbd in mode {mode}"),
        );

        // Patterns across object boundaries (4 MiB objects), FUA, discard,
        // write-zeroes, flush; the tail beyond fio's 24 MiB.
        let s = |x: &str| x.to_string();
        qemu_io(
            &qio,
            &uri,
            &[
                s("write -P 0xa1 24M 3M"),
                s("write -f -P 0xb2 29356032 8k"),
                s("write -P 0xc3 32506368 1536"),
                s("flush"),
                s("read -P 0xa1 24M 3M"),
                s("read -P 0xb2 29356032 8k"),
                s("read -P 0xc3 32506368 1536"),
                s("write -z 25M 1M"),
                s("read -P 0 25M 1M"),
                s("discard 26M 1M"),
                s("flush"),
            ],
        );
        // What the export serves, then a clean stop (write-back, lock release).
        let seen = d.path().join("seen.img");
        run(Command::new(&nbdcopy).arg(&uri).arg(&seen));
        srv.stop();

        let exported = d.path().join("export.img");
        let o = c.rbd(&[
            "export",
            &img.spec.to_string(),
            exported.to_str().expect("utf-8 path"),
        ]);
        assert!(
            o.status.success(),
            "rbd export: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let (a, b) = (
            std::fs::read(&seen).expect("read seen.img"),
            std::fs::read(&exported).expect("read export.img"),
        );
        assert_eq!(a.len(), 32 * MIB as usize);
        assert!(
            a == b,
            "{mode}: after a clean stop `rbd export` differs from what the NBD export served"
        );
        // The discarded range reads back as whatever it was, but the same in
        // both; the patterns are in the image itself.
        assert!(b[24 * MIB as usize..25 * MIB as usize]
            .iter()
            .all(|&x| x == 0xa1));
        assert!(b[25 * MIB as usize..26 * MIB as usize]
            .iter()
            .all(|&x| x == 0));

        // A warm restart on the same cache serves the same disk.
        let srv = serve_rbd(&c, &img.spec, mode, d.path(), "2");
        run(Command::new(&qimg)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&seen)
            .arg(&srv.uris[0]));
        srv.stop();
        eprintln!(
            "{mode}: fio verify, qemu-io patterns, rbd export == NBD export, warm restart: ok"
        );
    }
}

/// `nbdinfo --map` over RBD: the allocation comes from `rbd_diff_iterate2`
/// against nothing, joined with the cache's dirty data.
#[test]
fn rbd_block_status_shows_holes_and_data() {
    let Some((c, _wd)) = rbd_test("rbd_block_status", 300) else {
        return;
    };
    let (Some(qio), Some(nbdinfo)) = (tool("qemu-io"), tool("nbdinfo")) else {
        return;
    };
    let d = tempfile::tempdir().expect("tempdir");
    let img = c.image("status", 64 * MIB);
    let map = |uri: &str| -> Vec<(u64, u64, bool)> {
        let out = run(Command::new(&nbdinfo).arg("--map").arg(uri));
        out.lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2] == "3")
            })
            .collect()
    };
    let is_data = |m: &[(u64, u64, bool)], off: u64, len: u64| {
        m.iter()
            .any(|&(o, n, hole)| !hole && o <= off && off + len <= o + n)
    };
    let is_hole = |m: &[(u64, u64, bool)], off: u64, len: u64| {
        m.iter()
            .any(|&(o, n, hole)| hole && o <= off && off + len <= o + n)
    };
    // Through: the writes are on the image at once.
    let srv = serve_rbd(&c, &img.spec, "through", d.path(), "t");
    qemu_io(
        &qio,
        &srv.uris[0],
        &["write -P 0x11 4M 1M".into(), "write -P 0x22 40M 64k".into()],
    );
    let m = map(&srv.uris[0]);
    assert!(
        is_data(&m, 4 * MIB, MIB) && is_data(&m, 40 * MIB, 65536),
        "{m:?}"
    );
    assert!(
        is_hole(&m, 0, 4 * MIB) && is_hole(&m, 48 * MIB, 16 * MIB),
        "{m:?}"
    );
    let data: u64 = m.iter().filter(|e| !e.2).map(|e| e.1).sum();
    assert!(data <= 8 * MIB, "{data} bytes of data: {m:?}");
    srv.stop();
    // Back: a write still dirty in the cache is data before it reaches the image.
    let srv = serve_rbd(&c, &img.spec, "back", d.path(), "b");
    qemu_io(&qio, &srv.uris[0], &["write -P 0x33 20M 128k".into()]);
    let m = map(&srv.uris[0]);
    assert!(is_data(&m, 20 * MIB, 128 << 10), "{m:?}");
    assert!(
        is_data(&m, 4 * MIB, MIB) && is_hole(&m, 56 * MIB, 8 * MIB),
        "{m:?}"
    );
    srv.stop();
    println!("rbd block status: holes and data, dirty data included: ok");
}
