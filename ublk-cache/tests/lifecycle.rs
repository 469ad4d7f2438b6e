//! The lifecycle commands against the real binary, served over NBD (this kernel
//! has no ublk; the VM suite covers /dev/ublkbN): the control socket and its
//! verbs, metrics, preload, offline mode, the config file, and a live migration
//! between two servers on one backend (two hosts sharing storage), completed
//! and aborted.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use testkit::nbd_client::Client;
use testkit::pattern;
use testkit::serve::{bin, free_port, run, Disk};

const MIB: u64 = 1 << 20;

/// The id of the one server registered in `run_dir`.
fn server_id(run_dir: &Path) -> u64 {
    let out = run(bin().arg("--run-dir").arg(run_dir).args(["list", "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("list --json: {e}: {out}"));
    let rows = v.as_array().expect("a list");
    assert_eq!(rows.len(), 1, "{out}");
    rows[0]["id"].as_u64().unwrap()
}

/// `ublk-cache ctl ID ARGS --json`; returns the result (the command must succeed).
fn ctl(run_dir: &Path, id: u64, args: &[&str]) -> Value {
    let out = run(bin()
        .arg("--run-dir")
        .arg(run_dir)
        .arg("ctl")
        .arg(id.to_string())
        .args(args)
        .arg("--json"));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {out}"))
}

/// `ublk-cache ctl ID ARGS`, which must fail; returns what it said on stderr.
fn ctl_refused(run_dir: &Path, id: u64, args: &[&str]) -> String {
    let o = bin()
        .arg("--run-dir")
        .arg(run_dir)
        .arg("ctl")
        .arg(id.to_string())
        .args(args)
        .output()
        .unwrap();
    assert!(!o.status.success(), "ctl {args:?} succeeded: {o:?}");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn cmd_json(run_dir: &Path, verb: &str, id: u64) -> Value {
    let out = run(bin()
        .arg("--run-dir")
        .arg(run_dir)
        .arg(verb)
        .arg(id.to_string())
        .arg("--json"));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{verb}: {e}: {out}"))
}

fn file_range(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let all = std::fs::read(p).unwrap();
    all[off as usize..off as usize + len].to_vec()
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn control_socket_verbs_stats_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk::new(dir.path(), 16 * MIB);
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let srv = disk.serve_with(
        "back",
        "8M",
        0,
        &["--metrics", &metrics, "--writeback-iops", "100000"],
    );
    let id = server_id(&disk.run_dir);
    let sock = disk.run_dir.join(format!("{id}.ctl"));
    let perm = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(perm, 0o600, "the control socket is private");

    let mut c = Client::connect_uri(&srv.uris[0]).unwrap();
    let p1 = pattern(1, 2 * MIB as usize);
    c.write_all(0, &p1);
    c.flush().unwrap().unwrap();
    let s = ctl(&disk.run_dir, id, &["stats"]);
    assert_eq!(s["mode"], "back");
    assert_eq!(
        s["writeback_iops_limit"].as_u64(),
        Some(100000),
        "--writeback-iops"
    );
    assert_eq!(s["writeback_rate_limit"].as_u64(), Some(0));
    assert_eq!(s["write_bytes"].as_u64(), Some(2 * MIB));
    assert_eq!(s["id"].as_u64(), Some(id));
    assert!(s["latency"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["op"] == "write" && l["count"].as_u64() > Some(0)));

    // Live switch to through: everything is written back first.
    let r = ctl(&disk.run_dir, id, &["mode", "through"]);
    assert_eq!(r["previous"], "back");
    assert_eq!(r["mode"], "through");
    let s = ctl(&disk.run_dir, id, &["stats"]);
    assert_eq!(
        (s["mode"].as_str(), s["dirty_bytes"].as_u64()),
        (Some("through"), Some(0))
    );
    assert_eq!(
        file_range(&disk.backend, 0, p1.len()),
        p1,
        "the backend holds the data after the switch"
    );

    // Back to back; flush writes back and flushes the backend.
    ctl(&disk.run_dir, id, &["mode", "back"]);
    let p2 = pattern(2, MIB as usize);
    c.write_all(4 * MIB, &p2);
    let r = ctl(&disk.run_dir, id, &["flush"]);
    assert_eq!(r["dirty_bytes"].as_u64(), Some(0));
    assert_eq!(file_range(&disk.backend, 4 * MIB, p2.len()), p2);

    // Invalidate, then preload: the preloaded range is then read from the cache.
    let r = ctl(&disk.run_dir, id, &["invalidate"]);
    assert!(r["dropped_bytes"].as_u64().unwrap() >= 3 * MIB, "{r}");
    assert_eq!(
        ctl(&disk.run_dir, id, &["stats"])["valid_bytes"].as_u64(),
        Some(0)
    );
    let r = ctl(&disk.run_dir, id, &["preload", "2M"]);
    assert_eq!(r["fetched"].as_u64(), Some(2 * MIB));
    let before = ctl(&disk.run_dir, id, &["stats"]);
    assert_eq!(c.read_all(0, p1.len()), p1);
    let after = ctl(&disk.run_dir, id, &["stats"]);
    assert_eq!(
        after["backend_read_bytes"], before["backend_read_bytes"],
        "preloaded data is read from the cache"
    );

    // The write-back limit changes while serving, part by part; 0 lifts it.
    let r = ctl(&disk.run_dir, id, &["writeback-limit", "--rate", "50M"]);
    assert_eq!(
        (r["bytes_per_sec"].as_u64(), r["writes_per_sec"].as_u64()),
        (Some(50 * MIB), Some(100000))
    );
    let r = ctl(&disk.run_dir, id, &["writeback-limit", "--iops", "300"]);
    assert_eq!(
        (r["bytes_per_sec"].as_u64(), r["writes_per_sec"].as_u64()),
        (Some(50 * MIB), Some(300)),
        "an absent part stays"
    );
    let s = ctl(&disk.run_dir, id, &["stats"]);
    assert_eq!(s["writeback_rate_limit"].as_u64(), Some(50 * MIB));
    assert_eq!(s["writeback_iops_limit"].as_u64(), Some(300));
    let r = ctl(
        &disk.run_dir,
        id,
        &["writeback-limit", "--rate", "0", "--iops", "0"],
    );
    assert_eq!(
        (r["bytes_per_sec"].as_u64(), r["writes_per_sec"].as_u64()),
        (Some(0), Some(0))
    );
    let r = ctl(&disk.run_dir, id, &["writeback-limit"]);
    assert_eq!(
        r["bytes_per_sec"].as_u64(),
        Some(0),
        "no option only shows it"
    );

    // Refusals name the problem and leave I/O alone.
    let e = ctl_refused(&disk.run_dir, id, &["preload"]);
    assert!(e.contains("give a RANGE"), "{e}");
    let e = ctl_refused(&disk.run_dir, id, &["writeback-limit", "--rate", "64K"]);
    assert!(e.contains("below the lowest allowed, 1M"), "{e}");
    let mut raw = UnixStream::connect(&sock).unwrap();
    raw.write_all(b"{\"verb\": \"format-the-disk\"}\n").unwrap();
    let mut reply = String::new();
    raw.read_to_string(&mut reply).unwrap();
    assert!(
        reply.contains("\"ok\":false") && reply.contains("malformed request"),
        "{reply}"
    );
    let mut raw = UnixStream::connect(&sock).unwrap();
    raw.write_all(&vec![b'x'; 70_000]).unwrap();
    let mut reply = String::new();
    let _ = raw.read_to_string(&mut reply);
    assert!(reply.contains("longer than"), "{reply}");
    assert_eq!(
        c.read_all(4 * MIB, p2.len()),
        p2,
        "I/O goes on after bad control requests"
    );

    // Metrics in Prometheus text format.
    let m = http_get(port, "/metrics");
    assert!(m.starts_with("HTTP/1.0 200"), "{m}");
    let d = format!("disk=\"{id}\"");
    for want in [
        format!("ublk_cache_mode{{{d},mode=\"back\"}} 1"),
        format!(
            "ublk_cache_guest_bytes_total{{{d},op=\"write\",source=\"guest\"}} {}",
            3 * MIB
        ),
        format!("ublk_cache_request_latency_seconds_count{{{d},op=\"read\"}}"),
        "# TYPE ublk_cache_requests counter".to_string(),
        "# TYPE ublk_cache_request_latency_seconds histogram".to_string(),
        format!("ublk_cache_request_latency_seconds_bucket{{le=\"+Inf\",{d},op=\"write\"}}"),
    ] {
        assert!(m.contains(&want), "metrics lack {want}:\n{m}");
    }
    assert!(http_get(port, "/other").starts_with("HTTP/1.0 404"));

    // The human-readable stats print too.
    let out =
        run(bin()
            .arg("--run-dir")
            .arg(&disk.run_dir)
            .args(["ctl", &id.to_string(), "stats"]));
    assert!(
        out.contains("mode back") && out.contains("latency"),
        "{out}"
    );
    c.disconnect().unwrap();
    srv.stop();
    assert!(!sock.exists(), "the control socket is removed at stop");
}

/// A second "host": its own cache, socket and run directory, the same backend.
fn other_host(base: &Path, backend: &Path) -> Disk {
    std::fs::create_dir_all(base).unwrap();
    Disk {
        dir: base.to_path_buf(),
        backend: backend.to_path_buf(),
        cache: base.join("cache.img"),
        sock: base.join("nbd.sock"),
        run_dir: base.join("run"),
    }
}

#[test]
fn live_migration_hands_the_disk_over_and_never_serves_stale_data() {
    let dir = tempfile::tempdir().unwrap();
    let a = Disk::new(&dir.path().join("a-host").tap_mkdir(), 16 * MIB);
    let b = other_host(&dir.path().join("b-host"), &a.backend);
    let mut reference = vec![0u8; 16 * MIB as usize];

    // Source on host A in offline mode (on the first hop its dirty data is sure
    // to be in the cache at migrate-out; back mode's flusher is too quick here).
    let src = a.serve("offline", "24M", &[]);
    let src_id = server_id(&a.run_dir);
    let mut c = Client::connect_uri(&src.uris[0]).unwrap();
    let p1 = pattern(1, 4 * MIB as usize);
    c.write_all(0, &p1);
    reference[..p1.len()].copy_from_slice(&p1);
    let dirty = ctl(&a.run_dir, src_id, &["stats"])["dirty_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(dirty, 4 * MIB);
    assert_eq!(
        std::fs::read(&a.backend).unwrap(),
        vec![0u8; 16 * MIB as usize]
    );

    // premigrate: write-through, nothing dirty, the backend released.
    let r = cmd_json(&a.run_dir, "migrate-out", src_id);
    assert_eq!(r["ready"], true);
    assert_eq!(r["previous"], "offline");
    assert_eq!(
        file_range(&a.backend, 0, p1.len()),
        p1,
        "migrate-out wrote the dirty data back"
    );
    let s = ctl(&a.run_dir, src_id, &["stats"]);
    assert_eq!(
        (s["mode"].as_str(), s["dirty_bytes"].as_u64()),
        (Some("through"), Some(0))
    );
    assert_eq!(s["migrated_out"], true);
    // A mode change now would break the handover: refused.
    let o = bin()
        .arg("--run-dir")
        .arg(&a.run_dir)
        .args(["ctl", &src_id.to_string(), "mode", "offline"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("migrate-abort"),
        "{o:?}"
    );
    // The guest still runs on A during the memory copy: its writes go through.
    let p2 = pattern(2, MIB as usize);
    c.write_all(8 * MIB, &p2);
    reference[8 * MIB as usize..9 * MIB as usize].copy_from_slice(&p2);

    // The destination starts (cold) while the source still serves.
    let dst = b.serve_with("back", "8M", 0, &["--migrate-in"]);
    assert!(dst.log().contains("cold cache"), "{}", dst.log());
    // Switchover: the source stops (postmigrate); nothing is dirty, so it is quick.
    c.disconnect().unwrap();
    src.stop();
    let dst_id = server_id(&b.run_dir);
    let mut d = Client::connect_uri(&dst.uris[0]).unwrap();
    assert_eq!(
        d.read_all(0, reference.len()),
        reference,
        "the destination serves everything the source wrote"
    );
    let p3 = pattern(3, MIB as usize);
    d.write_all(0, &p3);
    reference[..p3.len()].copy_from_slice(&p3);
    d.flush().unwrap().unwrap();

    // Migrate back to A, whose cache still holds p1 (clean, now stale).
    let r = cmd_json(&b.run_dir, "migrate-out", dst_id);
    assert_eq!(r["previous"], "back");
    let back = a.serve_with("back", "24M", 0, &["--migrate-in"]);
    d.disconnect().unwrap();
    dst.stop();
    let mut c = Client::connect_uri(&back.uris[0]).unwrap();
    assert_eq!(
        c.read_all(0, reference.len()),
        reference,
        "nothing cached before the other host's writes is served"
    );
    c.disconnect().unwrap();
    let back_id = server_id(&a.run_dir);

    // An aborted migration: back to the previous mode, the backend held again.
    let r = cmd_json(&a.run_dir, "migrate-out", back_id);
    assert_eq!(r["previous"], "back");
    let r = cmd_json(&a.run_dir, "migrate-abort", back_id);
    assert_eq!(r["mode"], "back");
    let s = ctl(&a.run_dir, back_id, &["stats"]);
    assert_eq!(
        (s["mode"].as_str(), s["migrated_out"].as_bool()),
        (Some("back"), Some(false))
    );
    let o = b
        .serve_cmd("back", "8M", &["--migrate-in"])
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "a destination must not start after the abort"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use by another ublk-cache server"),
        "{o:?}"
    );
    let o = bin()
        .arg("--run-dir")
        .arg(&a.run_dir)
        .args(["migrate-abort", &back_id.to_string()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no migration to abort"),
        "{o:?}"
    );
    back.stop();
    assert_eq!(std::fs::read(&a.backend).unwrap(), reference);
}

trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn offline_mode_hydrates_in_the_background_and_writes_back_only_at_stop() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk::new(dir.path(), 8 * MIB);
    let base = pattern(7, 8 * MIB as usize);
    std::fs::write(&disk.backend, &base).unwrap();
    let srv = disk.serve_with("offline", "16M", 0, &[]);
    let id = server_id(&disk.run_dir);
    let mut c = Client::connect_uri(&srv.uris[0]).unwrap();
    let p = pattern(9, MIB as usize);
    c.write_all(2 * MIB, &p);
    c.flush().unwrap().unwrap();
    // Hydration finishes in the background.
    let mut s = ctl(&disk.run_dir, id, &["stats"]);
    for _ in 0..200 {
        if s["hydrated"] == true {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        s = ctl(&disk.run_dir, id, &["stats"]);
    }
    assert_eq!(s["hydrated"], true, "{s}");
    assert_eq!(s["valid_bytes"].as_u64(), Some(8 * MIB));
    assert_eq!(s["dirty_bytes"].as_u64(), Some(MIB));
    assert_eq!(
        std::fs::read(&disk.backend).unwrap(),
        base,
        "nothing is written back while running"
    );
    let mut expect = base.clone();
    expect[2 * MIB as usize..3 * MIB as usize].copy_from_slice(&p);
    assert_eq!(c.read_all(0, expect.len()), expect);
    c.disconnect().unwrap();
    srv.stop();
    assert_eq!(
        std::fs::read(&disk.backend).unwrap(),
        expect,
        "stop wrote the dirty data back"
    );

    // A cache smaller than the image is refused by name.
    let o = Disk::new(&dir.path().join("small").tap_mkdir(), 8 * MIB)
        .serve_cmd("offline", "4M", &[])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("offline mode keeps the whole image"),
        "{o:?}"
    );
}

#[test]
fn preload_wait_and_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk::new(dir.path(), 8 * MIB);
    let base = pattern(4, 8 * MIB as usize);
    std::fs::write(&disk.backend, &base).unwrap();
    let ranges = dir.path().join("boot.ranges");
    std::fs::write(&ranges, "# boot blocks\n0 1M\n4M+512K\n").unwrap();
    let conf = dir.path().join("disk.toml");
    std::fs::write(
        &conf,
        format!(
            "preload-ranges = \"{}\"\npreload-wait = true\npreload-rate = \"100M\"\nmode = \"around\"\n",
            ranges.display()
        ),
    )
    .unwrap();
    // The command line says back; the file's `mode` is ignored for it.
    let srv = disk.serve_with("back", "8M", 0, &["--config", conf.to_str().unwrap()]);
    let id = server_id(&disk.run_dir);
    let s = ctl(&disk.run_dir, id, &["stats"]);
    assert_eq!(
        s["mode"], "back",
        "the command line wins over the config file"
    );
    assert_eq!(
        s["preload_bytes"].as_u64(),
        Some(MIB + 512 * 1024),
        "preloaded before the export appeared"
    );
    let mut c = Client::connect_uri(&srv.uris[0]).unwrap();
    assert_eq!(
        c.read_all(4 * MIB, 512 * 1024),
        base[4 * MIB as usize..4 * MIB as usize + 512 * 1024]
    );
    let s2 = ctl(&disk.run_dir, id, &["stats"]);
    assert_eq!(
        s2["backend_read_bytes"], s["backend_read_bytes"],
        "served from the preloaded cache"
    );
    c.disconnect().unwrap();
    srv.stop();

    // A bad key in the config file is named.
    std::fs::write(&conf, "cache_size = \"1G\"\n").unwrap();
    let o = disk
        .serve_cmd("back", "8M", &["--config", conf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cache-size"),
        "{o:?}"
    );
    std::fs::write(&conf, "no-such-option = 1\n").unwrap();
    let o = disk
        .serve_cmd("back", "8M", &["--config", conf.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no-such-option") && err.contains("disk.toml"),
        "{err}"
    );
}
