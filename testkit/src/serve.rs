//! Running the real `ublk-cache` binary in tests (a `serve` process with NBD
//! exports, and the CLI), and the real NBD clients (qemu-io, qemu-img,
//! nbdinfo, nbdcopy, fio) against it. A missing client tool follows the SKIP
//! rule of [`crate::skip`].

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub use crate::skip::{fio_with_nbd, tool};

/// fio's NBD engine at `uri`: 24 MiB of random writes of 4-64 KiB at QD8
/// (`seed`), then every block read back and checked (crc32c). Fails the test
/// with fio's output and `srv`'s log, naming `what`, on an error or a bad
/// block. fio leaves a verify state file in `workdir`.
pub fn fio_verify_24m(fio: &Path, uri: &str, seed: u32, workdir: &Path, srv: &Server, what: &str) {
    let o = Command::new(fio)
        .args([
            "--name=verify",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--size=24m",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ])
        .arg(format!("--randseed={seed}"))
        .arg(format!("--uri={uri}"))
        .current_dir(workdir)
        .output()
        .expect("fio runs");
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !text.contains("verify: bad"),
        "fio {what} failed:\n{text}\nserver log:\n{}",
        srv.log()
    );
}

/// The `ublk-cache` binary cargo built for this test run. Integration test
/// binaries live in `target/PROFILE/deps/`, the crate's binaries one up.
pub fn bin_path() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("the target directory");
    let p = dir.join("ublk-cache");
    assert!(
        p.is_file(),
        "{} is missing: run the tests through cargo (it builds the binary for the ublk-cache package's tests)",
        p.display()
    );
    p
}

/// A sparse file of `size` bytes at `path` (a backend), replacing what is there.
pub fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
}

/// A TCP port nobody listens on right now (for `--metrics`, `nbd:tcp:`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Whether this host has the ublk driver; tests of the driverless behaviour
/// print a SKIP line and return when it has.
pub fn skip_with_ublk(test: &str) -> bool {
    let has = Path::new("/dev/ublk-control").exists();
    if has {
        crate::skip::note(&format!(
            "{test}: /dev/ublk-control exists here; this checks a host without it"
        ));
    }
    has
}

/// A command running the `ublk-cache` binary, its crash shadows kept out of
/// production's directory.
pub fn bin() -> Command {
    let mut c = Command::new(bin_path());
    c.env("UBLK_CACHE_SHADOW_DIR", crate::rig::shadow_dir());
    c
}

/// Run a command; fail the test with its output if it fails. Returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    check(cmd, &o);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn check(cmd: &Command, o: &Output) {
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
}

/// qemu-io on `uri` with these commands; fails on any error or pattern mismatch.
pub fn qemu_io(qemu_io: &Path, uri: &str, cmds: &[String]) -> String {
    let mut c = Command::new(qemu_io);
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri);
    let out = run(&mut c);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

/// A `ublk-cache serve` process with NBD exports.
pub struct Server {
    pub child: Child,
    /// The lines it printed on stdout (one per export).
    pub uris: Vec<String>,
    pub log: PathBuf,
}

/// Files of one test disk.
pub struct Disk {
    pub dir: PathBuf,
    pub backend: PathBuf,
    pub cache: PathBuf,
    pub sock: PathBuf,
    pub run_dir: PathBuf,
}

impl Disk {
    pub fn new(dir: &Path, size: u64) -> Self {
        let backend = dir.join("backend.img");
        sparse_file(&backend, size);
        Self {
            dir: dir.to_path_buf(),
            backend,
            cache: dir.join("cache.img"),
            sock: dir.join("nbd.sock"),
            run_dir: dir.join("run"),
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// `serve` in `mode` with a cache of `cache_size`, exported on the unix
    /// socket plus `extra` exports; waits until it printed its URIs.
    pub fn serve(&self, mode: &str, cache_size: &str, extra: &[&str]) -> Server {
        let mut args = Vec::new();
        for e in extra {
            args.push("--export");
            args.push(*e);
        }
        self.serve_with(mode, cache_size, extra.len(), &args)
    }

    /// The `serve` command line of `serve_with`, not started.
    pub fn serve_cmd(&self, mode: &str, cache_size: &str, args: &[&str]) -> Command {
        let mut cmd = bin();
        cmd.arg("--run-dir")
            .arg(&self.run_dir)
            .arg("serve")
            .arg("--backend")
            .arg(format!("file:{}", self.backend.display()))
            .arg("--mode")
            .arg(mode)
            .arg("--export")
            .arg(format!("nbd:unix:{}", self.sock.display()));
        if mode != "none" {
            cmd.arg("--cache")
                .arg(&self.cache)
                .arg("--cache-size")
                .arg(cache_size)
                .args(["--line-size", "64K"]);
        }
        cmd.args(args);
        cmd
    }

    /// `serve` with more options; `extra_exports` of them add exports (each
    /// prints one more line).
    pub fn serve_with(
        &self,
        mode: &str,
        cache_size: &str,
        extra_exports: usize,
        args: &[&str],
    ) -> Server {
        let log = self.dir.join(format!("serve-{}.log", std::process::id()));
        let log = unique(log);
        start(
            self.serve_cmd(mode, cache_size, args),
            1 + extra_exports,
            log,
        )
    }
}

fn unique(p: PathBuf) -> PathBuf {
    let mut n = 0;
    loop {
        let q = p.with_extension(format!("{n}.log"));
        if !q.exists() {
            return q;
        }
        n += 1;
    }
}

/// Spawn `cmd` (stderr to `log`) and wait for `lines` lines on its stdout.
pub fn start(mut cmd: Command, lines: usize, log: PathBuf) -> Server {
    let err = std::fs::File::create(&log).unwrap();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .expect("spawn ublk-cache");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        for _ in 0..lines {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap_or(0) == 0 {
                break;
            }
            let _ = tx.send(l.trim_end().to_string());
        }
        // Keep reading so the server never blocks on a full pipe.
        let mut sink = String::new();
        while r.read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    });
    let mut uris = Vec::new();
    for _ in 0..lines {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(l) => uris.push(l),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server printed no URI; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }
    Server { child, uris, log }
}

impl Server {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, sig).expect("signalling the server");
    }

    /// SIGTERM; the server must exit 0 (write-back done).
    pub fn stop(mut self) {
        self.signal(rustix::process::Signal::TERM);
        let st = self.child.wait().unwrap();
        assert!(
            st.success(),
            "server exited with {st}; log:\n{}",
            self.log()
        );
    }

    /// kill -9: a crash.
    pub fn kill9(mut self) {
        self.signal(rustix::process::Signal::KILL);
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A failing test must not leave a server behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `ublk-cache --run-dir DIR/run serve --backend rbd:SPEC` with the test
/// cluster's conf and keyring; the caller adds the rest.
#[cfg(feature = "rbd")]
pub fn rbd_serve_cmd(
    c: &crate::ceph::TestCluster,
    spec: &rbd_backend::RbdSpec,
    dir: &Path,
) -> Command {
    let mut cmd = bin();
    cmd.arg("--run-dir")
        .arg(dir.join("run"))
        .arg("serve")
        .arg("--backend")
        .arg(format!("rbd:{spec}"))
        .arg("--ceph-conf")
        .arg(&c.conf);
    if let Some(k) = &c.keyring {
        cmd.arg("--ceph-keyring").arg(k);
    }
    cmd
}
