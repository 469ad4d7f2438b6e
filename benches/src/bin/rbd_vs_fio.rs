//! Our NBD export over an RBD image (warm cache, `back`) against fio's own
//! `rbd` engine (librbd straight, no cache) on the same image, interleaved
//! (A B, then B A, ...), printing median, min and max IOPS and the ratio:
//!
//! - warm 4 KiB random reads at QD32;
//! - 70/30 random read/write, `random_distribution=zipf:1.2`, QD32;
//! - 4 KiB random writes at QD32 (ours: write-back into the cache).
//!
//! `cargo run --release -p ublk-cache-benches --bin rbd-vs-fio -- [ROUNDS] [SECS]`
//! (default 3 rounds of 8 s per job), with the cluster of
//! `scripts/ceph-cluster.sh env DIR` in the environment (`UBLK_CACHE_CEPH_CONF`,
//! `UBLK_CACHE_CEPH_KEYRING`); `benches/rbd-bench.sh` starts a throw-away
//! cluster, builds, and runs this. `UBLK_CACHE_BIN` names the server binary
//! (default: `ublk-cache` next to this one), `BENCH_DIR` the directory for the
//! cache file (default `/var/tmp`), `BENCH_IMAGE_MIB` the image size (256).
//!
//! Our server holds the image's exclusive lock while it runs, so fio's `rbd`
//! engine can write only while it is stopped: every A sample starts the server
//! (warm re-attach: the change-marker diff drops only what B wrote), warms the
//! cache with an untimed sequential read, runs the job, and stops the server
//! cleanly (write-back drain, timed separately). That clean stop leaves a
//! change-marker snapshot on the image, which would make fio's writes
//! copy-on-write (and slow the OSD down from then on), so it is removed before
//! every B sample: the next attach then drops the whole cache, and the untimed
//! warm-up reads it all in again.

use clap::Parser;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rbd_backend::{RbdAdmin, RbdOptions, RbdSpec};
use ublk_cache_benches::summary;

struct Workload {
    name: &'static str,
    writes: bool,
    args: &'static [&'static str],
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "warm 4k randread QD32",
        writes: false,
        args: &["--rw=randread", "--bs=4k", "--iodepth=32"],
    },
    Workload {
        name: "70/30 randrw zipf:1.2 QD32",
        writes: true,
        args: &[
            "--rw=randrw",
            "--rwmixread=70",
            "--random_distribution=zipf:1.2",
            "--bs=4k",
            "--iodepth=32",
        ],
    },
    Workload {
        name: "4k randwrite QD32 (ours: write-back)",
        writes: true,
        args: &["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    },
];

fn die(msg: &str) -> ! {
    eprintln!("rbd-vs-fio: {msg}");
    std::process::exit(1);
}

struct Env {
    conf: PathBuf,
    keyring: Option<PathBuf>,
    bin: PathBuf,
    dir: tempfile::TempDir,
    spec: RbdSpec,
    size: u64,
    secs: u64,
}

impl Env {
    /// fio with the job's common options; `engine` picks the target.
    fn fio(&self, engine: &[String], job: &[&str], timed: bool) -> (f64, f64) {
        let mut c = Command::new("fio");
        c.env("CEPH_CONF", &self.conf)
            .args([
                "--name=bench",
                "--output-format=json",
                "--direct=1",
                "--randrepeat=0",
                "--norandommap",
            ])
            .arg(format!("--size={}", self.size))
            .args(engine)
            .args(job)
            .current_dir(self.dir.path());
        if timed {
            c.args(["--time_based", "--ramp_time=1"])
                .arg(format!("--runtime={}", self.secs));
        }
        let o = c
            .output()
            .unwrap_or_else(|e| die(&format!("running fio: {e}")));
        let out = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            die(&format!(
                "fio {engine:?} {job:?} failed:\n{out}\n{}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        // fio may print warnings before the JSON document.
        let json = &out[out.find('{').unwrap_or(0)..];
        let v: serde_json::Value = serde_json::from_str(json)
            .unwrap_or_else(|e| die(&format!("fio printed no JSON ({e}):\n{out}")));
        let job = &v["jobs"][0];
        let iops = |d: &str| job[d]["iops"].as_f64().unwrap_or(0.0);
        (iops("read"), iops("write"))
    }

    fn rbd_engine(&self) -> Vec<String> {
        vec![
            "--ioengine=rbd".into(),
            "--clientname=admin".into(),
            format!("--pool={}", self.spec.pool),
            format!("--rbdname={}", self.spec.image),
        ]
    }

    fn serve(&self) -> (Child, String) {
        let sock = self.dir.path().join("nbd.sock");
        let mut c = Command::new(&self.bin);
        c.arg("--run-dir")
            .arg(self.dir.path().join("run"))
            .arg("serve")
            .arg(format!("--backend=rbd:{}", self.spec))
            .arg("--ceph-conf")
            .arg(&self.conf);
        if let Some(k) = &self.keyring {
            c.arg("--ceph-keyring").arg(k);
        }
        c.args(["--mode", "back", "--cache"])
            .arg(self.dir.path().join("cache.img"))
            .arg(format!("--cache-size={}", self.size + (64 << 20)))
            .arg(format!("--export=nbd:unix:{}", sock.display()))
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path().join("serve.log"))
                    .unwrap_or_else(|e| die(&format!("serve.log: {e}"))),
            );
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| die(&format!("starting {}: {e}", self.bin.display())));
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        if BufReader::new(stdout).read_line(&mut line).unwrap_or(0) == 0 {
            let _ = child.wait();
            die(&format!(
                "the server printed no URI; see {}",
                self.dir.path().join("serve.log").display()
            ));
        }
        (child, line.trim().to_string())
    }
}

/// SIGTERM and wait: in `back` the server writes everything back first.
fn stop(mut child: Child) -> Duration {
    let t = Instant::now();
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    );
    match child.wait() {
        Ok(st) if st.success() => t.elapsed(),
        st => die(&format!("the server did not stop cleanly: {st:?}")),
    }
}

/// fio through our NBD export over RBD against fio's rbd engine.
#[derive(Debug, clap::Parser)]
#[command(name = "rbd-vs-fio")]
struct Opts {
    /// Interleaved rounds.
    #[arg(default_value_t = 3)]
    rounds: u64,
    /// Seconds per sample.
    #[arg(default_value_t = 8)]
    secs: u64,
}

fn main() {
    let Opts { rounds, secs } = Opts::parse();
    let (rounds, secs) = (rounds.max(1), secs.max(1));
    let Some(conf) = std::env::var_os("UBLK_CACHE_CEPH_CONF").map(PathBuf::from) else {
        die(
            "UBLK_CACHE_CEPH_CONF is not set: run benches/rbd-bench.sh, or start a cluster with \
             scripts/ceph-cluster.sh and eval its `env`",
        );
    };
    let keyring = std::env::var_os("UBLK_CACHE_CEPH_KEYRING").map(PathBuf::from);
    let help = Command::new("fio")
        .arg("--enghelp")
        .output()
        .unwrap_or_else(|e| die(&format!("fio: {e}")));
    let engines = String::from_utf8_lossy(&help.stdout).into_owned();
    if !engines.contains("rbd") || !engines.contains("nbd") {
        die("this fio lacks the rbd or nbd engine");
    }
    let bin = std::env::var_os("UBLK_CACHE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("ublk-cache")))
                .unwrap_or_else(|| PathBuf::from("ublk-cache"))
        });
    if !bin.exists() {
        die(&format!(
            "{} does not exist: build it (cargo build --release -p ublk-cache) or set UBLK_CACHE_BIN",
            bin.display()
        ));
    }
    let base =
        std::env::var_os("BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let dir = tempfile::Builder::new()
        .prefix("rbd-vs-fio.")
        .tempdir_in(&base)
        .unwrap_or_else(|e| die(&format!("temporary directory in {}: {e}", base.display())));
    let mib: u64 = std::env::var("BENCH_IMAGE_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let opts = RbdOptions {
        conf: Some(conf.clone()),
        keyring: keyring.clone(),
        ..RbdOptions::default()
    };
    let admin = RbdAdmin::connect(&opts).unwrap_or_else(|e| die(&format!("{e}")));
    let spec =
        RbdSpec::parse(&format!("rbd/bench-{}", std::process::id())).unwrap_or_else(|e| die(&e));
    admin
        .create(&spec, mib << 20, None)
        .unwrap_or_else(|e| die(&format!("{e}")));
    let env = Env {
        conf,
        keyring,
        bin,
        dir,
        spec,
        size: mib << 20,
        secs,
    };
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&env, &admin, rounds)));
    // Remove the image and our change-marker snapshots, whatever happened.
    if let Ok(snaps) = admin.snaps(&env.spec) {
        for s in snaps {
            let _ = admin.snap_remove(&env.spec, &s);
        }
    }
    if let Err(e) = admin.remove(&env.spec) {
        eprintln!("rbd-vs-fio: removing rbd:{}: {e}", env.spec);
    }
    if result.is_err() {
        std::process::exit(1);
    }
}

/// Removes our change-marker snapshots, so fio's side writes an image without
/// snapshots, as a VM on plain librbd would.
fn drop_markers(admin: &RbdAdmin, spec: &RbdSpec) {
    for s in admin.snaps(spec).unwrap_or_default() {
        if s.starts_with(rbd_backend::rbd::MARKER_SNAP_PREFIX) {
            admin
                .snap_remove(spec, &s)
                .unwrap_or_else(|e| die(&format!("{e}")));
        }
    }
}

fn run(env: &Env, admin: &RbdAdmin, rounds: u64) {
    eprintln!(
        "rbd-vs-fio: image rbd:{} of {} MiB; {rounds} rounds of {} s per job and side",
        env.spec,
        env.size >> 20,
        env.secs
    );
    // Fill the image, so reads return data rather than holes.
    env.fio(
        &env.rbd_engine(),
        &["--rw=write", "--bs=1M", "--iodepth=8"],
        false,
    );
    let n = WORKLOADS.len();
    let mut ours: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut theirs: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut drains: Vec<f64> = Vec::new();
    for round in 0..rounds {
        for (i, w) in WORKLOADS.iter().enumerate() {
            let order: [bool; 2] = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for a in order {
                if a {
                    let (child, uri) = env.serve();
                    let nbd = vec!["--ioengine=nbd".to_string(), format!("--uri={uri}")];
                    // Warm the cache (untimed): everything fio's rbd side wrote
                    // since the last detach was dropped from it at attach.
                    env.fio(&nbd, &["--rw=read", "--bs=1M", "--iodepth=4"], false);
                    let (r, wr) = env.fio(&nbd, w.args, true);
                    let drain = stop(child);
                    if w.writes {
                        drains.push(drain.as_secs_f64());
                    }
                    ours[i].push(r + wr);
                    eprintln!(
                        "round {round} {}: ours {:.0} IOPS (stop {:.1} s)",
                        w.name,
                        r + wr,
                        drain.as_secs_f64()
                    );
                } else {
                    drop_markers(admin, &env.spec);
                    let (r, wr) = env.fio(&env.rbd_engine(), w.args, true);
                    theirs[i].push(r + wr);
                    eprintln!("round {round} {}: fio rbd {:.0} IOPS", w.name, r + wr);
                }
            }
        }
    }
    println!(
        "| load (4 KiB, QD32, {} MiB image, {} s x {rounds}) | ours: NBD export, warm cache, back (IOPS median, min-max) | fio rbd engine (librbd, no cache) | ours / rbd |",
        env.size >> 20,
        env.secs
    );
    println!("|---|---|---|---|");
    for (i, w) in WORKLOADS.iter().enumerate() {
        let (om, olo, ohi) = summary(ours[i].clone());
        let (tm, tlo, thi) = summary(theirs[i].clone());
        println!(
            "| {} | {om:.0} ({olo:.0}-{ohi:.0}) | {tm:.0} ({tlo:.0}-{thi:.0}) | {:.2} |",
            w.name,
            if tm > 0.0 { om / tm } else { 0.0 }
        );
    }
    let (dm, dlo, dhi) = summary(drains);
    println!(
        "\nclean stop after a write job (write-back drain, snapshot marker): median {dm:.1} s ({dlo:.1}-{dhi:.1})"
    );
}
