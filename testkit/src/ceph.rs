//! Helpers for tests that need the real Ceph cluster of `scripts/ceph-cluster.sh`
//! (rbd-backend's and ublk-cache's integration tests, and the rbd row of the
//! backend factory).
//!
//! The cluster is found through `UBLK_CACHE_CEPH_CONF` (and
//! `UBLK_CACHE_CEPH_KEYRING`, `UBLK_CACHE_CEPH_DIR`), which
//! `scripts/ceph-cluster.sh env DIR` prints and `scripts/test.sh` exports.
//! Without them a test prints `SKIP:` and passes, unless
//! `UBLK_CACHE_REQUIRE_CEPH=1` (set by scripts/test.sh, so CI never skips):
//! the rule of [`crate::skip`].

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use rbd_backend::{RbdAdmin, RbdOptions, RbdSpec};
use rustix::process::Signal;

use crate::skip::{missing, Bed};

pub struct TestCluster {
    pub conf: PathBuf,
    pub keyring: Option<PathBuf>,
    /// The cluster's directory (pid files), when known.
    pub dir: Option<PathBuf>,
    admin: RbdAdmin,
}

/// The test cluster, or `None` after printing a loud SKIP line.
pub fn cluster(test: &str) -> Option<TestCluster> {
    let Some(conf) = std::env::var_os("UBLK_CACHE_CEPH_CONF").map(PathBuf::from) else {
        return missing(
            Bed::Ceph,
            &format!(
                "{test}: no Ceph test cluster, UBLK_CACHE_CEPH_CONF is not set (run \
                 `scripts/ceph-cluster.sh start DIR` and `eval \"$(scripts/ceph-cluster.sh env DIR)\"`, \
                 or scripts/test.sh): the RBD backend was NOT tested"
            ),
        );
    };
    let keyring = std::env::var_os("UBLK_CACHE_CEPH_KEYRING").map(PathBuf::from);
    let dir = std::env::var_os("UBLK_CACHE_CEPH_DIR").map(PathBuf::from);
    let opts = RbdOptions {
        conf: Some(conf.clone()),
        keyring: keyring.clone(),
        ..RbdOptions::default()
    };
    let admin = RbdAdmin::connect(&opts).unwrap_or_else(|e| {
        panic!(
            "{test}: the Ceph test cluster at {} does not answer: {e}",
            conf.display()
        )
    });
    Some(TestCluster {
        conf,
        keyring,
        dir,
        admin,
    })
}

/// The test cluster and a watchdog of `secs` for the test, or `None` (SKIP).
pub fn rbd_test(test: &str, secs: u64) -> Option<(TestCluster, Watchdog)> {
    let c = cluster(test)?;
    Some((c, watchdog(test, secs)))
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl TestCluster {
    pub fn opts(&self) -> RbdOptions {
        RbdOptions {
            conf: Some(self.conf.clone()),
            keyring: self.keyring.clone(),
            ..RbdOptions::default()
        }
    }

    pub fn admin(&self) -> &RbdAdmin {
        &self.admin
    }

    /// A unique image name for this process.
    pub fn unique_name(tag: &str) -> String {
        format!(
            "t-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A new image in pool `rbd`, removed (with its snapshots) when dropped.
    pub fn image(&self, tag: &str, size: u64) -> TestImage<'_> {
        self.image_with(tag, size, None)
    }

    pub fn image_with(&self, tag: &str, size: u64, features: Option<u64>) -> TestImage<'_> {
        let spec = RbdSpec::parse(&format!("rbd/{}", Self::unique_name(tag))).expect("spec");
        self.admin
            .create(&spec, size, features)
            .unwrap_or_else(|e| panic!("creating test image: {e}"));
        TestImage {
            cluster: self,
            spec,
        }
    }

    /// Runs the `rbd` CLI against the cluster (bounded to 60 s).
    pub fn rbd(&self, args: &[&str]) -> Output {
        let mut c = Command::new("timeout");
        c.arg("60").arg("rbd").arg("-c").arg(&self.conf);
        if let Some(k) = &self.keyring {
            c.arg("--keyring").arg(k);
        }
        c.args(args)
            .output()
            .unwrap_or_else(|e| panic!("running rbd {args:?}: {e}"))
    }

    /// `rbd bench --io-type write` of `bytes` from offset 0, 4 KiB at a time,
    /// sequentially: another client writing the image. Returns the CLI's output.
    pub fn bench_write(&self, spec: &RbdSpec, bytes: u64) -> Output {
        let total = bytes.to_string();
        let image = spec.to_string();
        self.rbd(&[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4096",
            "--io-threads",
            "1",
            "--io-pattern",
            "seq",
            "--io-total",
            &total,
            &image,
        ])
    }

    /// The whole image as another client reads it.
    pub fn read_image(&self, spec: &RbdSpec) -> Vec<u8> {
        self.admin
            .open_raw(spec)
            .and_then(|r| r.read_all())
            .unwrap_or_else(|e| panic!("reading rbd:{spec}: {e}"))
    }

    /// The OSD's pid (for SIGSTOP/SIGCONT outage tests).
    pub fn osd_pid(&self) -> Option<i32> {
        let dir = self.dir.as_ref()?;
        std::fs::read_to_string(dir.join("run/osd.0.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Freezes a process (the test cluster's OSD) with SIGSTOP; thaws it on drop
/// (even when the test panics) and after 10 s at the latest (even when the test
/// process is aborted). Longer freezes leave the single OSD's placement groups
/// stuck (their read leases lapse).
pub struct Frozen {
    pid: i32,
    /// The dead man's switch: a shell that thaws the process after 10 s. It
    /// outlives an aborted test process; a normal drop kills it, so that it
    /// cannot thaw a later test's freeze.
    switch: Option<std::process::Child>,
}

impl Frozen {
    pub fn new(pid: i32) -> Frozen {
        let switch = Command::new("sh")
            .args(["-c", &format!("sleep 10; kill -CONT {pid}")])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok();
        kill(pid, Signal::STOP).expect("SIGSTOP osd");
        // kill(2) returns before every thread has stopped: wait until they
        // have, or a request sent now could still be served.
        let t = std::time::Instant::now();
        while !all_threads_stopped(pid) && t.elapsed() < std::time::Duration::from_secs(2) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Frozen { pid, switch }
    }
}

fn kill(pid: i32, sig: Signal) -> std::io::Result<()> {
    let p = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| std::io::Error::other(format!("{pid} is not a process id")))?;
    Ok(rustix::process::kill_process(p, sig)?)
}

/// Whether every thread of `pid` is in the stopped state (`T`).
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|st| {
                // The state follows the parenthesised command name.
                st.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next())
            })
            .is_some_and(|c| c == 'T' || c == 't')
    })
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(mut sw) = self.switch.take() {
            let _ = sw.kill();
            let _ = sw.wait();
        }
        // SIGCONT on a running process is harmless.
        let _ = kill(self.pid, Signal::CONT);
    }
}

/// A test image; removed with all its snapshots on drop.
pub struct TestImage<'a> {
    cluster: &'a TestCluster,
    pub spec: RbdSpec,
}

impl TestImage<'_> {
    /// This image at snapshot `snap`.
    pub fn at(&self, snap: &str) -> RbdSpec {
        RbdSpec {
            snap: Some(snap.to_string()),
            ..self.spec.clone()
        }
    }

    /// A child spec in the same pool (for clones), removed by the caller's own TestImage.
    pub fn adopt(&self, spec: RbdSpec) -> TestImage<'_> {
        TestImage {
            cluster: self.cluster,
            spec,
        }
    }
}

impl Drop for TestImage<'_> {
    fn drop(&mut self) {
        let a = &self.cluster.admin;
        if let Ok(snaps) = a.snaps(&self.spec) {
            for s in snaps {
                let _ = a.snap_unprotect(&self.spec, &s);
                if let Err(e) = a.snap_remove(&self.spec, &s) {
                    eprintln!("test cleanup: {e}");
                }
            }
        }
        if let Err(e) = a.remove(&self.spec) {
            eprintln!("test cleanup: {e}");
        }
    }
}

pub use crate::watchdog::{watchdog, Watchdog};
