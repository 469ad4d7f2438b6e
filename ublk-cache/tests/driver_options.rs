//! The serve options the OpenNebula driver needs, on the real binary over NBD:
//! systemd readiness (`READY=1` on `$NOTIFY_SOCKET` once the export is live),
//! `--read-only` (shared, lock-free, every write refused) on a file and on an
//! RBD image, and `--ceph-keyfile` (a bare key, as OpenNebula's CEPH_KEY).
//!
//! The RBD parts print `SKIP:` without the test cluster (and fail under
//! `UBLK_CACHE_REQUIRE_CEPH=1`); a missing qemu-io prints `SKIP:` (and fails
//! under `UBLK_CACHE_REQUIRE_NBD_CLIENTS=1`).

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::serve::{qemu_io, start, tool, Disk};

const MIB: u64 = 1 << 20;

/// A qemu-io run that is expected to fail (a write on a read-only export):
/// returns its combined output.
fn qemu_io_fails(qio: &std::path::Path, uri: &str, cmd: &str) -> String {
    let o = Command::new(qio)
        .args(["-f", "raw", "-c", cmd, uri])
        .output()
        .expect("qemu-io runs");
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() || text.contains("failed"),
        "`{cmd}` on a read-only export succeeded:\n{text}"
    );
    text
}

#[test]
fn ready_is_notified_once_the_export_is_live() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 8 * MIB);
    let notify = d.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut cmd = disk.serve_cmd("through", "4M", &[]);
    cmd.env("NOTIFY_SOCKET", &notify);
    let srv = start(cmd, 1, d.path().join("serve.log"));
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within 60 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    let lines: Vec<&str> = msg.lines().collect();
    assert!(lines.contains(&"READY=1"), "{msg}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("STATUS=serving ") && l.contains(&srv.uris[0])),
        "the status names the export: {msg}"
    );
    // Ready means ready: the socket takes a connection now.
    std::os::unix::net::UnixStream::connect(&disk.sock).expect("the export accepts a connection");
    srv.stop();
}

#[test]
fn read_only_shares_a_file_and_refuses_writes() {
    let Some(qio) = tool("qemu-io") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 8 * MIB);
    std::fs::write(&disk.backend, vec![0x5au8; 8 * MIB as usize]).unwrap();
    // Two read-only servers on one file, each with its own cache.
    let a = start(
        disk.serve_cmd("through", "4M", &["--read-only"]),
        1,
        d.path().join("a.log"),
    );
    let d2 = tempfile::tempdir().unwrap();
    let mut other = Disk::new(d2.path(), MIB);
    other.backend = disk.backend.clone();
    let b = start(
        other.serve_cmd("around", "4M", &["--read-only"]),
        1,
        d2.path().join("b.log"),
    );
    for srv in [&a, &b] {
        let uri = &srv.uris[0];
        qemu_io(&qio, uri, &["read -P 0x5a 0 8M".into()]);
        qemu_io_fails(&qio, uri, "write -P 0x11 0 64k");
        qemu_io(&qio, uri, &["read -P 0x5a 0 64k".into()]);
    }
    // A read-write server is refused while readers share the file.
    let d3 = tempfile::tempdir().unwrap();
    let mut rw = Disk::new(d3.path(), MIB);
    rw.backend = disk.backend.clone();
    let o = rw
        .serve_cmd("through", "4M", &[])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a writer started beside readers");
    assert!(err.contains("in use by another ublk-cache server"), "{err}");
    a.stop();
    b.stop();
    assert!(
        std::fs::read(&disk.backend)
            .unwrap()
            .iter()
            .all(|&x| x == 0x5a),
        "the read-only backend changed"
    );
    // back and offline would keep writes that can never reach the backend.
    for mode in ["back", "offline"] {
        let o = disk
            .serve_cmd(mode, "16M", &["--read-only"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "--read-only --mode {mode} started");
        assert!(err.contains("--read-only cannot serve --mode"), "{err}");
    }
}

#[cfg(feature = "rbd")]
mod rbd {
    use super::*;
    use testkit::ceph::rbd_test;
    use testkit::serve::rbd_serve_cmd;

    #[test]
    fn read_only_rbd_takes_no_lock_and_refuses_writes() {
        let Some((c, _wd)) = rbd_test("driver_options_ro", 600) else {
            return;
        };
        let Some(qio) = tool("qemu-io") else {
            return;
        };
        let img = c.image("ro", 8 * MIB);
        // Content to read: a writer fills it and stops.
        let d0 = tempfile::tempdir().unwrap();
        let mut w = rbd_serve_cmd(&c, &img.spec, d0.path());
        w.args(["--mode", "none", "--export"])
            .arg(format!("nbd:unix:{}", d0.path().join("w.sock").display()));
        let w = start(w, 1, d0.path().join("w.log"));
        qemu_io(&qio, &w.uris[0], &["write -P 0xc7 0 8M".into()]);
        w.stop();

        let serve_ro = |dir: &std::path::Path, tag: &str| {
            let mut cmd = rbd_serve_cmd(&c, &img.spec, dir);
            cmd.args(["--mode", "through", "--read-only", "--cache-size", "4M"])
                .arg("--cache")
                .arg(dir.join("cache.img"))
                .arg("--export")
                .arg(format!("nbd:unix:{}", dir.join("ro.sock").display()));
            start(cmd, 1, dir.join(format!("{tag}.log")))
        };
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = serve_ro(d1.path(), "a");
        let b = serve_ro(d2.path(), "b");
        let locks = c.rbd(&["lock", "ls", &img.spec.to_string()]);
        assert!(
            String::from_utf8_lossy(&locks.stdout).trim().is_empty(),
            "a read-only server holds a lock: {}",
            String::from_utf8_lossy(&locks.stdout)
        );
        for srv in [&a, &b] {
            qemu_io(&qio, &srv.uris[0], &["read -P 0xc7 0 8M".into()]);
            qemu_io_fails(&qio, &srv.uris[0], "write -P 0x01 4M 4k");
        }
        a.stop();
        b.stop();
        assert!(
            c.read_image(&img.spec).iter().all(|&x| x == 0xc7),
            "the image changed under read-only servers"
        );
    }

    #[test]
    fn ceph_keyfile_is_a_bare_key() {
        let Some((c, _wd)) = rbd_test("driver_options_keyfile", 600) else {
            return;
        };
        let Some(qio) = tool("qemu-io") else {
            return;
        };
        let img = c.image("keyfile", 4 * MIB);
        let d = tempfile::tempdir().unwrap();
        // A ceph.conf that names no keyring, and the admin key alone in a file.
        let conf = std::fs::read_to_string(&c.conf).unwrap();
        let bare: String = conf
            .lines()
            .filter(|l| !l.trim_start().starts_with("keyring"))
            .map(|l| format!("{l}\n"))
            .collect();
        let conf2 = d.path().join("ceph.conf");
        std::fs::write(&conf2, bare).unwrap();
        let out = Command::new("ceph")
            .arg("-c")
            .arg(&c.conf)
            .args(["auth", "get-key", "client.admin"])
            .output()
            .expect("ceph auth get-key");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let keyfile = d.path().join("client.admin.key");
        std::fs::write(&keyfile, &out.stdout).unwrap();

        let cmd = |extra: &[&str]| {
            let mut cmd = testkit::serve::bin();
            cmd.arg("--run-dir")
                .arg(d.path().join("run"))
                .arg("serve")
                .arg("--backend")
                .arg(format!("rbd:{}", img.spec))
                .arg("--ceph-conf")
                .arg(&conf2)
                .args(["--mode", "none", "--export"])
                .arg(format!("nbd:unix:{}", d.path().join("k.sock").display()))
                .args(extra);
            cmd
        };
        // Without the key: refused, naming authentication.
        let o = cmd(&[]).output().unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("client.admin"), "{err}");
        // A key file that is not there.
        let o = cmd(&["--ceph-keyfile", "/nonexistent/key"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("ceph key file /nonexistent/key does not exist"),
            "{err}"
        );
        // Keyring and key file together are refused by the command line.
        let o = cmd(&["--ceph-keyfile", "/x", "--ceph-keyring", "/y"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("cannot be used with"),
            "{err}"
        );
        // With the key file it serves.
        let k = keyfile.to_string_lossy().into_owned();
        let srv = start(cmd(&["--ceph-keyfile", &k]), 1, d.path().join("k.log"));
        qemu_io(
            &qio,
            &srv.uris[0],
            &["write -P 0x3d 0 1M".into(), "read -P 0x3d 0 1M".into()],
        );
        srv.stop();
    }
}

/// `serve --config FILE` alone, as the systemd unit runs it: the file gives
/// even the options clap requires (`backend`).
#[test]
fn a_config_file_alone_is_enough() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 4 * MIB);
    let conf = d.path().join("disk.toml");
    std::fs::write(
        &conf,
        format!(
            "backend = \"file:{}\"\nmode = \"none\"\nexport = [\"nbd:unix:{}\"]\nrun-dir = \"{}\"\n",
            disk.backend.display(),
            disk.sock.display(),
            disk.run_dir.display()
        ),
    )
    .unwrap();
    let mut cmd = testkit::serve::bin();
    cmd.arg("serve").arg("--config").arg(&conf);
    let srv = start(cmd, 1, d.path().join("serve.log"));
    assert_eq!(srv.uris[0], disk.uri());
    srv.stop();
}
