//! Block status, sparse copies, TLS and multi-conn of the NBD export, with the
//! real binary and real clients (nbdinfo, qemu-img, qemu-io, nbdcopy, openssl).
//!
//! A missing client prints `SKIP:` (or fails under
//! `UBLK_CACHE_REQUIRE_NBD_CLIENTS=1`, which scripts/test.sh sets).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use testkit::nbd_client::Client;
use testkit::serve::{bin, qemu_io, run, start, tool, Disk, Server};

const MIB: u64 = 1 << 20;

/// The data written straight into the backend file before serving: a few
/// scattered extents (MiB offset, KiB length).
const PRELOADED: [(u64, u64); 4] = [(3, 64), (100, 1024), (517, 256), (900, 4096)];

fn fill(disk: &Disk, off: u64, len: u64, seed: u8) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk.backend)
        .unwrap();
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed | 1)
        .collect();
    f.write_all_at(&data, off).unwrap();
    f.sync_all().unwrap();
}

/// A 1 GiB sparse backend holding [`PRELOADED`].
fn sparse_disk(dir: &Path) -> Disk {
    let disk = Disk::new(dir, 1024 * MIB);
    for (i, &(m, k)) in PRELOADED.iter().enumerate() {
        fill(&disk, m * MIB, k << 10, i as u8);
    }
    disk
}

fn server_id(run_dir: &Path) -> u64 {
    let out = run(bin().arg("--run-dir").arg(run_dir).args(["list", "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array().unwrap()[0]["id"].as_u64().unwrap()
}

fn stats(run_dir: &Path) -> Value {
    let id = server_id(run_dir);
    let out =
        run(bin()
            .arg("--run-dir")
            .arg(run_dir)
            .args(["ctl", &id.to_string(), "stats", "--json"]));
    serde_json::from_str(out.trim()).unwrap()
}

fn backend_read_bytes(run_dir: &Path) -> u64 {
    stats(run_dir)["backend_read_bytes"].as_u64().unwrap()
}

/// `nbdinfo --map`: (offset, length, hole) per line.
fn nbdinfo_map(nbdinfo: &Path, uri: &str) -> Vec<(u64, u64, bool)> {
    let out = run(Command::new(nbdinfo).arg("--map").arg(uri));
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (o, n, t) = (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2]);
            (o, n, t == "3")
        })
        .collect()
}

/// Data extents of a map must cover every written range, and hold little else.
fn check_map(map: &[(u64, u64, bool)], written: &[(u64, u64)], size: u64, slack: u64) {
    let mut pos = 0;
    for &(o, n, _) in map {
        assert_eq!(o, pos, "extents are consecutive: {map:?}");
        pos = o + n;
    }
    assert_eq!(pos, size, "the map covers the disk: {map:?}");
    for &(wo, wn) in written {
        assert!(
            map.iter()
                .any(|&(o, n, hole)| !hole && o <= wo && wo + wn <= o + n),
            "{wo}+{wn} is data in {map:?}"
        );
    }
    let data: u64 = map.iter().filter(|m| !m.2).map(|m| m.1).sum();
    let want: u64 = written.iter().map(|w| w.1).sum();
    assert!(
        data <= want + slack,
        "{data} bytes of data for {want} written: {map:?}"
    );
}

fn written_with(extra: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut w: Vec<(u64, u64)> = PRELOADED.iter().map(|&(m, k)| (m * MIB, k << 10)).collect();
    w.extend_from_slice(extra);
    w
}

#[test]
fn nbdinfo_and_qemu_img_map_show_holes_and_data() {
    let (Some(nbdinfo), Some(qimg), Some(qio)) =
        (tool("nbdinfo"), tool("qemu-img"), tool("qemu-io"))
    else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let disk = sparse_disk(d.path());
    let srv = disk.serve("back", "64M", &[]);
    // Dirty data in the cache (not yet on the backend) is data too.
    qemu_io(&qio, &srv.uris[0], &["write -P 0x42 700M 2M".into()]);
    let written = written_with(&[(700 * MIB, 2 * MIB)]);
    let before = backend_read_bytes(&disk.run_dir);
    let map = nbdinfo_map(&nbdinfo, &srv.uris[0]);
    check_map(&map, &written, 1024 * MIB, 4 * MIB);
    // qemu-img map agrees.
    let out = run(Command::new(&qimg)
        .args(["map", "--output=json", "-f", "raw"])
        .arg(&srv.uris[0]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let qmap: Vec<(u64, u64, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                !e["data"].as_bool().unwrap(),
            )
        })
        .collect();
    check_map(&qmap, &written, 1024 * MIB, 4 * MIB);
    assert_eq!(
        backend_read_bytes(&disk.run_dir),
        before,
        "mapping reads no data from the backend"
    );
    // A discard makes a hole again (it reaches the backend in every mode).
    qemu_io(&qio, &srv.uris[0], &["discard 100M 1M".into()]);
    let map = nbdinfo_map(&nbdinfo, &srv.uris[0]);
    assert!(
        map.iter()
            .any(|&(o, n, hole)| hole && o <= 100 * MIB && 101 * MIB <= o + n),
        "{map:?}"
    );
    srv.stop();
}

#[test]
fn copying_a_sparse_export_reads_little_from_the_backend() {
    let (Some(qimg), Some(nbdcopy)) = (tool("qemu-img"), tool("nbdcopy")) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let disk = sparse_disk(d.path());
    let data: u64 = PRELOADED.iter().map(|p| p.1 << 10).sum();
    for (name, copier) in [("qemu-img", &qimg), ("nbdcopy", &nbdcopy)] {
        // A cold cache each time, so every byte of data comes from the backend.
        let _ = std::fs::remove_file(&disk.cache);
        let srv = disk.serve("back", "64M", &[]);
        let before = backend_read_bytes(&disk.run_dir);
        let out = d.path().join(format!("{name}.img"));
        let mut c = Command::new(copier);
        if name == "qemu-img" {
            c.args(["convert", "-f", "raw", "-O", "raw"])
                .arg(&srv.uris[0])
                .arg(&out);
        } else {
            c.arg(&srv.uris[0]).arg(&out);
        }
        run(&mut c);
        let read = backend_read_bytes(&disk.run_dir) - before;
        println!("{name}: read {read} bytes of the 1 GiB backend for {data} bytes of data");
        assert!(
            read >= data && read <= data + 16 * MIB,
            "{name} read {read} bytes from the backend ({data} hold data)"
        );
        srv.stop();
        run(Command::new(&qimg)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&disk.backend)
            .arg(&out));
    }
}

/// Certificates for the TLS tests, made with openssl: a CA, a server
/// certificate for localhost, a client certificate from that CA, and a
/// second, unrelated CA with its own client certificate.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path, openssl: &Path) -> Self {
        let o = |args: &[&str]| {
            run(Command::new(openssl).current_dir(dir).args(args));
        };
        for ca in ["ca", "other-ca"] {
            o(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, ca, ext) in [
            ("server", "ca", "server.ext"),
            ("client", "ca", "client.ext"),
            ("stranger", "other-ca", "client.ext"),
        ] {
            o(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]);
            o(&[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-extfile",
                ext,
                "-out",
                &format!("{name}.pem"),
            ]);
        }
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }

    /// A client credentials directory as libnbd and QEMU read it: ca-cert.pem
    /// (whom to trust), client-cert.pem and client-key.pem (who we are).
    fn client_dir(&self, name: &str, trust: &str, who: Option<&str>) -> PathBuf {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(self.dir.join(format!("{trust}.pem")), d.join("ca-cert.pem")).unwrap();
        if let Some(w) = who {
            std::fs::copy(self.dir.join(format!("{w}.pem")), d.join("client-cert.pem")).unwrap();
            std::fs::copy(self.dir.join(format!("{w}.key")), d.join("client-key.pem")).unwrap();
        }
        d
    }
}

fn serve_tls(disk: &Disk, pki: &Pki, extra: &[&str]) -> Server {
    let cert = pki.path("server.pem");
    let key = pki.path("server.key");
    let mut args = vec![
        "--export",
        "nbd:tcp:127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    args.extend_from_slice(extra);
    disk.serve_with("back", "16M", 1, &args)
}

/// `nbds://localhost:PORT/?tls-certificates=DIR` from `nbd://127.0.0.1:PORT/`.
fn nbds(uri: &str, dir: &Path) -> String {
    let port = uri.trim_end_matches('/').rsplit(':').next().unwrap();
    format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        dir.display()
    )
}

fn port(uri: &str) -> String {
    uri.trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .to_string()
}

fn qemu_io_tls(qio: &Path, uri: &str, dir: &Path, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new(qio);
    c.arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,host=localhost,port={},tls-creds=tls0",
            port(uri)
        ));
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.output().unwrap()
}

fn ok_io(o: &std::process::Output) -> bool {
    let all = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    o.status.success() && !all.contains("failed") && !all.contains("rror")
}

#[test]
fn tls_with_x509_certificates() {
    let (Some(nbdinfo), Some(qio), Some(openssl)) =
        (tool("nbdinfo"), tool("qemu-io"), tool("openssl"))
    else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let pki_dir = d.path().join("pki");
    std::fs::create_dir(&pki_dir).unwrap();
    let pki = Pki::new(&pki_dir, &openssl);
    let disk = Disk::new(d.path(), 64 * MIB);
    let trusting = pki.client_dir("trusting", "ca", None);
    let distrusting = pki.client_dir("distrusting", "other-ca", None);

    // --tls require (the default with a certificate), no client certificates.
    let srv = serve_tls(&disk, &pki, &[]);
    let tcp = &srv.uris[1];
    let out = run(Command::new(&nbdinfo).arg(nbds(tcp, &trusting)));
    assert!(out.contains("with TLS"), "{out}");
    assert!(out.contains("export-size: 67108864"), "{out}");
    let o = qemu_io_tls(
        &qio,
        tcp,
        &trusting,
        &["write -P 0x3c 1M 2M", "read -P 0x3c 1M 2M", "flush"],
    );
    assert!(ok_io(&o), "qemu-io over TLS: {o:?}");
    // A client that does not upgrade is refused, on TCP and on the unix socket.
    for uri in [tcp.as_str(), srv.uris[0].as_str()] {
        let o = Command::new(&nbdinfo).arg(uri).output().unwrap();
        assert!(!o.status.success(), "plain nbdinfo {uri} got in: {o:?}");
        assert!(
            Client::connect_uri(uri).is_err(),
            "plain client {uri} got in"
        );
    }
    let o = Command::new(&qio)
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(tcp)
        .output()
        .unwrap();
    assert!(!ok_io(&o), "plain qemu-io got in: {o:?}");
    // A client that does not trust the server's certificate gives up.
    let o = Command::new(&nbdinfo)
        .arg(nbds(tcp, &distrusting))
        .output()
        .unwrap();
    assert!(!o.status.success(), "a wrong CA was accepted: {o:?}");
    // Data written over TLS is there for the next client.
    let out = run(Command::new(&nbdinfo)
        .arg("--map")
        .arg(nbds(tcp, &trusting)));
    assert!(out.contains("1048576     2097152    0  data"), "{out}");
    srv.stop();

    // Client certificates required: ours from the CA gets in, none or a
    // stranger's (another CA) does not.
    let ca = pki.path("ca.pem");
    let srv = serve_tls(&disk, &pki, &["--tls-ca", &ca]);
    let tcp = &srv.uris[1];
    let client = pki.client_dir("client", "ca", Some("client"));
    let stranger = pki.client_dir("stranger", "ca", Some("stranger"));
    let o = qemu_io_tls(&qio, tcp, &client, &["read -P 0x3c 1M 2M"]);
    assert!(ok_io(&o), "qemu-io with a client certificate: {o:?}");
    run(Command::new(&nbdinfo).arg(nbds(tcp, &client)));
    for dir in [&trusting, &stranger] {
        let o = Command::new(&nbdinfo).arg(nbds(tcp, dir)).output().unwrap();
        assert!(
            !o.status.success(),
            "{} got in without a valid client certificate: {o:?}",
            dir.display()
        );
        let o = qemu_io_tls(&qio, tcp, dir, &["read 0 4k"]);
        assert!(!ok_io(&o), "qemu-io {} got in: {o:?}", dir.display());
    }
    assert!(srv.log().contains("TLS"), "{}", srv.log());
    srv.stop();

    // --tls optional: both kinds of client.
    let srv = serve_tls(&disk, &pki, &["--tls", "optional"]);
    let tcp = &srv.uris[1];
    run(Command::new(&nbdinfo).arg(nbds(tcp, &trusting)));
    let out = run(Command::new(&nbdinfo).arg(tcp));
    assert!(out.contains("without TLS"), "{out}");
    srv.stop();

    // Bad TLS options are refused before anything is served.
    for args in [
        vec!["--tls", "require"],
        vec![
            "--tls-cert",
            "/nonexistent.pem",
            "--tls-key",
            "/nonexistent.key",
        ],
        vec!["--tls-cert", &ca, "--tls-key", &ca],
    ] {
        let o = disk.serve_cmd("back", "16M", &args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("tls"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn multi_conn_flush_on_one_connection_covers_writes_on_another() {
    let (Some(nbdcopy), Some(qimg)) = (tool("nbdcopy"), tool("qemu-img")) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 64 * MIB);
    let shadow = d.path().join("shadow");
    std::fs::create_dir(&shadow).unwrap();
    let serve = |disk: &Disk| {
        let mut cmd = disk.serve_cmd("back", "32M", &[]);
        cmd.env("UBLK_CACHE_SHADOW_DIR", &shadow);
        start(
            cmd,
            1,
            d.path().join(format!("serve-{}.log", rand_suffix())),
        )
    };
    let srv = serve(&disk);
    let mut a = Client::connect_uri(&srv.uris[0]).unwrap();
    let mut b = Client::connect_uri(&srv.uris[0]).unwrap();
    assert_ne!(a.flags & (1 << 8), 0, "CAN_MULTI_CONN advertised");
    let pa = vec![0xa1u8; 1 << 20];
    a.write_all(0, &pa);
    // B sees A's completed write at once, and B's FLUSH makes it durable.
    assert_eq!(b.read_all(0, 4096), pa[..4096]);
    b.flush().unwrap().unwrap();
    // A power cut now: kill -9, and the crash shadow (tmpfs) is gone too, so
    // only what a FLUSH made durable on the cache device survives.
    drop((a, b));
    srv.kill9();
    for f in std::fs::read_dir(&shadow).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let srv = serve(&disk);
    let mut c = Client::connect_uri(&srv.uris[0]).unwrap();
    assert!(
        c.read_all(0, 1 << 20) == pa,
        "A's write, flushed on B, survived the power cut; log:\n{}",
        srv.log()
    );
    c.disconnect().unwrap();

    // nbdcopy with several connections in and out, byte for byte.
    let src = d.path().join("src.img");
    let mut data = Vec::with_capacity(64 << 20);
    for i in 0..(64u64 << 20) / 4096 {
        let v = if i % 3 == 0 { 0 } else { (i % 251) as u8 | 1 };
        data.extend(std::iter::repeat_n(v, 4096));
    }
    std::fs::write(&src, &data).unwrap();
    run(Command::new(&nbdcopy)
        .args(["--connections=4", "--requests=16", "--flush"])
        .arg(&src)
        .arg(&srv.uris[0]));
    let back = d.path().join("back.img");
    run(Command::new(&nbdcopy)
        .args(["--connections=4"])
        .arg(&srv.uris[0])
        .arg(&back));
    run(Command::new(&qimg)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&back));
    srv.stop();
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
