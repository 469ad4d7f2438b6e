//! A live migration of an RBD disk between two servers (two "hosts": own
//! caches, sockets and run directories) on one image of the test cluster,
//! with the real binary over NBD: the source in `back` with data, migrate-out
//! (write-through, lock lent per write), the source keeps writing while the
//! destination starts (`--migrate-in`, no lock yet), switchover (the source
//! stops), the destination takes the lock at its first write and serves all
//! the source wrote; `rbd export` equals the reference. Then an aborted
//! migration: the lock is held for good again and a second server is refused.
//!
//! Without a cluster it prints `SKIP:` (and fails under UBLK_CACHE_REQUIRE_CEPH=1).
#![cfg(feature = "rbd")]

use std::path::Path;
use std::process::Command;

use rbd_backend::RbdSpec;
use serde_json::Value;
use testkit::ceph::{rbd_test, TestCluster};
use testkit::nbd_client::Client;
use testkit::pattern;
use testkit::serve::{self, run, start, Server};

const MIB: u64 = 1 << 20;

fn serve_cmd(c: &TestCluster, spec: &RbdSpec, dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = serve::rbd_serve_cmd(c, spec, dir);
    cmd.args([
        "--mode",
        "back",
        "--cache-size",
        "16M",
        "--line-size",
        "64K",
    ])
    .arg("--cache")
    .arg(dir.join("cache.img"))
    .arg("--export")
    .arg(format!("nbd:unix:{}", dir.join("nbd.sock").display()))
    .args(extra);
    cmd
}

fn serve_on(c: &TestCluster, spec: &RbdSpec, dir: &Path, extra: &[&str], tag: &str) -> Server {
    std::fs::create_dir_all(dir).unwrap();
    start(
        serve_cmd(c, spec, dir, extra),
        1,
        dir.join(format!("serve-{tag}.log")),
    )
}

fn id_of(dir: &Path) -> String {
    let out = run(serve::bin()
        .arg("--run-dir")
        .arg(dir.join("run"))
        .args(["list", "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0]["id"].as_u64().expect("one server").to_string()
}

fn cli(dir: &Path, args: &[&str]) -> Value {
    let out = run(serve::bin()
        .arg("--run-dir")
        .arg(dir.join("run"))
        .args(args)
        .arg("--json"));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

#[test]
fn rbd_live_migration_lends_the_lock_and_serves_nothing_stale() {
    let Some((c, _wd)) = rbd_test("rbd_migration", 600) else {
        return;
    };
    let img = c.image("migrate", 16 * MIB);
    let d = tempfile::tempdir().unwrap();
    let (ha, hb) = (d.path().join("host-a"), d.path().join("host-b"));
    let mut reference = vec![0u8; 16 * MIB as usize];

    let src = serve_on(&c, &img.spec, &ha, &[], "src");
    let src_id = id_of(&ha);
    let mut a = Client::connect_uri(&src.uris[0]).unwrap();
    let p1 = pattern(1, 4 * MIB as usize);
    a.write_all(0, &p1);
    reference[..p1.len()].copy_from_slice(&p1);

    // A second plain server is refused while the source holds the lock.
    std::fs::create_dir_all(&hb).unwrap();
    let o = serve_cmd(&c, &img.spec, &hb, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("exclusive lock"),
        "a second server beside the source: {err}"
    );

    let r = cli(&ha, &["migrate-out", &src_id]);
    assert_eq!(
        (r["ready"].as_bool(), r["previous"].as_str()),
        (Some(true), Some("back"))
    );
    assert_eq!(
        c.read_image(&img.spec)[..p1.len()],
        p1[..],
        "migrate-out wrote everything back"
    );

    // The destination starts while the source still serves and writes.
    let dst = serve_on(&c, &img.spec, &hb, &["--migrate-in"], "dst");
    let p2 = pattern(2, 2 * MIB as usize);
    a.write_all(8 * MIB, &p2);
    reference[8 * MIB as usize..10 * MIB as usize].copy_from_slice(&p2);
    a.flush().unwrap().expect("flush while lending");
    assert_eq!(
        c.read_image(&img.spec)[8 * MIB as usize..10 * MIB as usize],
        p2[..]
    );

    // Switchover: the source stops (quick: nothing dirty, the lock is lent).
    a.disconnect().unwrap();
    src.stop();
    let mut b = Client::connect_uri(&dst.uris[0]).unwrap();
    assert_eq!(b.read_all(0, reference.len()), reference);
    let p3 = pattern(3, MIB as usize);
    b.write_all(12 * MIB, &p3);
    reference[12 * MIB as usize..13 * MIB as usize].copy_from_slice(&p3);
    b.flush().unwrap().expect("flush on the destination");
    // In back mode the write reaches the image (and takes the lock) when it is
    // written back: make that happen now.
    let dst_id = id_of(&hb);
    cli(&hb, &["ctl", &dst_id, "flush"]);
    assert!(
        dst.log()
            .contains("took the image's exclusive lock at the first write"),
        "{}",
        dst.log()
    );

    // The destination now holds the lock for good: a plain server is refused.
    let o = serve_cmd(&c, &img.spec, &ha, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("exclusive lock"),
        "a server beside the new owner: {err}"
    );

    // An aborted migration: migrate-out, then abort; the lock is ours again.
    cli(&hb, &["migrate-out", &dst_id]);
    let r = cli(&hb, &["migrate-abort", &dst_id]);
    assert_eq!(r["mode"], "back");
    let p4 = pattern(4, MIB as usize);
    b.write_all(14 * MIB, &p4);
    reference[14 * MIB as usize..15 * MIB as usize].copy_from_slice(&p4);
    let o = serve_cmd(&c, &img.spec, &ha, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("exclusive lock"),
        "{err}"
    );
    b.disconnect().unwrap();
    dst.stop();
    assert_eq!(
        c.read_image(&img.spec),
        reference,
        "the image holds every write"
    );

    // Back on host A, whose cache held p1 from before: served from the image, not stale.
    let again = serve_on(&c, &img.spec, &ha, &[], "again");
    let mut a = Client::connect_uri(&again.uris[0]).unwrap();
    assert_eq!(a.read_all(0, reference.len()), reference);
    a.disconnect().unwrap();
    again.stop();
}
