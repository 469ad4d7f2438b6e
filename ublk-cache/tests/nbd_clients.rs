//! Conformance of the NBD export with real clients (qemu-io, qemu-img, nbdinfo,
//! nbdcopy, fio), run against the real binary. This is how the whole engine is
//! exercised end to end on a kernel without ublk.
//!
//! A missing client prints `SKIP:` (or fails under
//! `UBLK_CACHE_REQUIRE_NBD_CLIENTS=1`, which scripts/test.sh sets).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use testkit::nbd_client::Client;
use testkit::serve::{self, fio_with_nbd, qemu_io, run, tool, Disk};
use testkit::Rng;

const MIB: u64 = 1 << 20;

#[test]
fn nbdinfo_shows_size_flags_and_the_export_list() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 64 * MIB);
    let srv = disk.serve("back", "16M", &["nbd:tcp::0"]);
    assert_eq!(srv.uris[0], disk.uri());
    for uri in &srv.uris {
        let out = run(Command::new(&nbdinfo).arg(uri));
        for want in [
            "export-size: 67108864",
            "can_flush: true",
            "can_fua: true",
            "can_trim: true",
            "can_zero: true",
            "can_multi_conn: true",
            "is_read_only: false",
            "block_size_minimum: 512",
            "block_size_preferred: 4096",
            "block_size_maximum: 33554432",
        ] {
            assert!(out.contains(want), "nbdinfo {uri}: no '{want}' in:\n{out}");
        }
    }
    // NBD_OPT_LIST: one export, the default one.
    let out = run(Command::new(&nbdinfo).arg("--list").arg(disk.uri()));
    assert!(out.contains("export=\"\""), "{out}");
    let out = run(Command::new(&nbdinfo).arg("--size").arg(disk.uri()));
    assert_eq!(out.trim(), "67108864");
    srv.stop();
}

#[test]
fn qemu_io_patterns_discard_write_zeroes_flush_over_unix_and_tcp() {
    let Some(qio) = tool("qemu-io") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 64 * MIB);
    let srv = disk.serve("back", "8M", &["nbd:tcp::0"]);
    let s = |x: &str| x.to_string();
    qemu_io(
        &qio,
        &srv.uris[0],
        &[
            s("write -P 0xab 0 4M"),
            s("write -f -P 0xcd 4M 1M"), // FUA
            s("read -P 0xab 0 4M"),
            s("read -P 0xcd 4M 1M"),
            s("discard 1M 1M"),
            s("read -P 0 1M 1M"),
            s("write -z 2M 512k"),
            s("read -P 0 2M 512k"),
            s("write -z -u 3M 64k"),
            s("read -P 0 3M 64k"),
            s("flush"),
            s("read -P 0xab 0 1M"),
            s("write -P 0x11 63M 1M"),
            s("read -P 0x11 63M 1M"),
            s("write -P 0x22 1536 512"), // 512-byte granularity
            s("read -P 0x22 1536 512"),
            s("read -P 0xab 2560k 512k"),
        ],
    );
    // The other connection (TCP) sees the same data.
    qemu_io(
        &qio,
        &srv.uris[1],
        &[s("read -P 0xcd 4M 1M"), s("read -P 0 2M 512k")],
    );
    // Writes past the end are refused (qemu-io reports an error).
    let o = Command::new(&qio)
        .args(["-f", "raw", "-c", "write -P 1 64M 512"])
        .arg(&srv.uris[0])
        .output()
        .unwrap();
    let all = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        all.contains("error") || all.contains("out of bounds") || !o.status.success(),
        "{all}"
    );
    srv.stop();
}

/// One step of the random workload.
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Flush,
}

fn workload(seed: u64, size: u64, n: usize) -> Vec<Op> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|_| {
            let off = r.below(size / 512) * 512;
            let len = ((1 + r.below(256)) * 512).min(size - off);
            match r.below(20) {
                0..=13 => Op::Write {
                    off,
                    len,
                    pat: 1 + r.below(254) as u8,
                },
                14..=16 => Op::Zero { off, len },
                17..=18 => {
                    // Whole 4 KiB blocks, so the file backend's hole reads back as zeroes.
                    let off = off / 4096 * 4096;
                    let len = (len.div_ceil(4096) * 4096).min(size - off);
                    Op::Discard { off, len }
                }
                _ => Op::Flush,
            }
        })
        .collect()
}

#[test]
fn qemu_img_compare_after_a_random_workload_in_every_mode() {
    let (Some(qio), Some(qimg)) = (tool("qemu-io"), tool("qemu-img")) else {
        return;
    };
    let size = 32 * MIB;
    for (i, mode) in ["none", "around", "through", "back"].iter().enumerate() {
        let d = tempfile::tempdir().unwrap();
        let disk = Disk::new(d.path(), size);
        let ops = workload(0x5eed + i as u64, size, 300);
        let mut reference = vec![0u8; size as usize];
        let mut cmds = Vec::new();
        for op in &ops {
            match *op {
                Op::Write { off, len, pat } => {
                    cmds.push(format!("write -P {pat} {off} {len}"));
                    reference[off as usize..(off + len) as usize].fill(pat);
                }
                Op::Zero { off, len } => {
                    cmds.push(format!("write -z {off} {len}"));
                    reference[off as usize..(off + len) as usize].fill(0);
                }
                Op::Discard { off, len } => {
                    cmds.push(format!("discard {off} {len}"));
                    reference[off as usize..(off + len) as usize].fill(0);
                }
                Op::Flush => cmds.push("flush".into()),
            }
        }
        let ref_img = d.path().join("reference.img");
        std::fs::write(&ref_img, &reference).unwrap();
        // A cache of 3 MiB of data lines against 32 MiB of disk: eviction and
        // (in back mode) write-back under pressure.
        let srv = disk.serve(mode, "4M", &[]);
        for chunk in cmds.chunks(100) {
            qemu_io(&qio, &srv.uris[0], chunk);
        }
        run(Command::new(&qimg)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&ref_img)
            .arg(&srv.uris[0]));
        srv.stop();
        // After a clean stop the backend alone holds the disk.
        run(Command::new(&qimg)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&ref_img)
            .arg(&disk.backend));
    }
}

#[test]
fn nbdcopy_a_file_in_and_back_out() {
    let Some(nbdcopy) = tool("nbdcopy") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 32 * MIB);
    let mut r = Rng::new(42);
    let src: Vec<u8> = r.bytes(32 * MIB as usize);
    let src_path = d.path().join("src.bin");
    std::fs::write(&src_path, &src).unwrap();
    let srv = disk.serve("back", "8M", &[]);
    // nbdcopy uses several connections (multi-conn is advertised) and flushes.
    run(Command::new(&nbdcopy).arg(&src_path).arg(&srv.uris[0]));
    let out_path = d.path().join("out.bin");
    std::fs::File::create(&out_path).unwrap();
    run(Command::new(&nbdcopy).arg(&srv.uris[0]).arg(&out_path));
    let out = std::fs::read(&out_path).unwrap();
    assert_eq!(out.len(), src.len());
    assert!(out == src, "nbdcopy round trip differs");
    srv.stop();
    assert!(
        std::fs::read(&disk.backend).unwrap() == src,
        "backend after stop"
    );
}

#[test]
fn fio_writes_and_verifies_in_every_mode() {
    let Some(fio) = fio_with_nbd() else {
        return;
    };
    for mode in ["none", "around", "through", "back"] {
        let d = tempfile::tempdir().unwrap();
        let disk = Disk::new(d.path(), 32 * MIB);
        // 3 MiB of cache lines for 24 MiB written: eviction, and in back mode
        // write-back under backpressure.
        let srv = disk.serve(mode, "4M", &[]);
        serve::fio_verify_24m(
            &fio,
            &srv.uris[0],
            7,
            d.path(),
            &srv,
            &format!("in mode {mode}"),
        );
        srv.stop();
    }
}

#[test]
fn a_killed_server_restarts_on_its_cache_and_keeps_flushed_data() {
    let Some(qio) = tool("qemu-io") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 64 * MIB);
    let srv = disk.serve("back", "16M", &[]);
    let s = |x: &str| x.to_string();
    qemu_io(
        &qio,
        &srv.uris[0],
        &[
            s("write -P 0x5a 0 4M"),
            s("write -P 0x6b 8M 2M"),
            s("flush"),
            s("write -f -P 0x7c 20M 1M"), // FUA: durable without a flush
        ],
    );
    srv.kill9();
    // The socket file and the registry record are stale now; serve again.
    assert!(disk.sock.exists());
    let srv = disk.serve("back", "16M", &[]);
    assert!(
        srv.log().contains("stale NBD socket"),
        "log:\n{}",
        srv.log()
    );
    qemu_io(
        &qio,
        &srv.uris[0],
        &[
            s("read -P 0x5a 0 4M"),
            s("read -P 0x6b 8M 2M"),
            s("read -P 0x7c 20M 1M"),
            s("read -P 0 4M 4M"),
        ],
    );
    srv.stop();
    let b = std::fs::read(&disk.backend).unwrap();
    assert!(b[..4 << 20].iter().all(|&x| x == 0x5a));
    assert!(b[8 << 20..10 << 20].iter().all(|&x| x == 0x6b));
    assert!(b[20 << 20..21 << 20].iter().all(|&x| x == 0x7c));
}

/// A `kill -9` keeps every acknowledged write, flushed or not: the crash
/// shadow (a shared mapping of a tmpfs file) holds them when the process dies
/// in the middle of its work. Write-back is slowed to 1 MiB/s so that the
/// backend cannot hold most of them before the kill.
#[test]
fn a_killed_server_keeps_every_acknowledged_write_from_its_crash_shadow() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 64 * MIB);
    let srv = disk.serve_with("back", "32M", 0, &["--writeback-rate", "1M"]);
    let mut c = Client::connect_uri(&srv.uris[0]).unwrap();
    let mut rng = Rng::new(17);
    let mut written = Vec::new();
    for i in 0..2048u64 {
        // 4 KiB each, scattered over 48 MiB: most go to lines of their own.
        let off = rng.below(48 * MIB / 4096) * 4096;
        let data = testkit::rng::pattern(i, 4096);
        c.write(off, &data, false).unwrap().unwrap();
        written.push((off, data));
    }
    // Every write above was acknowledged; none was flushed.
    srv.kill9();
    let srv = disk.serve("back", "32M", &[]);
    assert!(
        srv.log().contains("with the crash shadow"),
        "log:\n{}",
        srv.log()
    );
    let mut c = Client::connect_uri(&srv.uris[0]).unwrap();
    // A later write of the same place replaces an earlier one.
    let mut last = std::collections::HashMap::new();
    for (off, data) in written {
        last.insert(off, data);
    }
    for (off, data) in &last {
        let got = c.read(*off, 4096).unwrap().unwrap();
        assert!(got == *data, "the acknowledged write at {off} was lost");
    }
    c.disconnect().unwrap();
    srv.stop();
    let b = std::fs::read(&disk.backend).unwrap();
    for (off, data) in &last {
        assert!(
            b[*off as usize..*off as usize + 4096] == data[..],
            "the write at {off} did not reach the backend at stop"
        );
    }
}

/// `--io-trace FILE` records every request a client made, in order, with
/// its length and result, and times that a replay can take its think times
/// from; the file is complete once the server stopped.
#[test]
fn io_trace_records_every_request_with_its_times() {
    use ublk_cache::io_trace::{Trace, TraceOp};
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    let trace = d.path().join("io.trace");
    let srv = disk.serve_with("back", "8M", 0, &["--io-trace", trace.to_str().unwrap()]);
    let mut c = Client::connect_uri(&srv.uris[0]).unwrap();
    c.write(8192, &[7u8; 4096], false).unwrap().unwrap();
    c.write(0, &[8u8; 512], true).unwrap().unwrap();
    assert_eq!(c.read(8192, 4096).unwrap().unwrap(), vec![7u8; 4096]);
    c.flush().unwrap().unwrap();
    c.trim(MIB, 65536).unwrap().unwrap();
    c.write_zeroes(2 * MIB, 4096, 0).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(2));
    c.read(4 * MIB, 65536).unwrap().unwrap();
    c.disconnect().unwrap();
    srv.stop();
    let t = Trace::read(&trace).unwrap();
    let got: Vec<_> = t
        .records
        .iter()
        .map(|r| (r.op, r.offset, r.len, r.result))
        .collect();
    assert_eq!(
        got,
        [
            (TraceOp::Write, 8192, 4096, 0),
            (TraceOp::WriteFua, 0, 512, 0),
            (TraceOp::Read, 8192, 4096, 0),
            (TraceOp::Flush, 0, 0, 0),
            (TraceOp::Discard, MIB, 65536, 0),
            (TraceOp::WriteZeroes, 2 * MIB, 4096, 0),
            (TraceOp::Read, 4 * MIB, 65536, 0),
        ]
    );
    assert_eq!(t.dropped, 0);
    for w in t.records.windows(2) {
        assert!(
            w[0].complete_us <= w[1].submit_us,
            "one client waiting for each reply: each request starts after the one before ended: {w:?}"
        );
    }
    let last = t.records.len() - 1;
    assert!(
        t.records[last].submit_us >= t.records[last - 1].complete_us + 2000,
        "the 2 ms pause before the last request is in the times: {:?}",
        &t.records[last - 1..]
    );
}

/// `--boot-trace record`: the lines a guest reads before writing them are
/// saved, at stop, into the disk's trace, which the next boot's reads age
/// (a `seen` bit per boot) rather than replace; a damaged trace is moved
/// aside and recording starts anew.
#[test]
fn boot_traces_record_each_boot_and_age_across_boots() {
    use ublk_cache::boot_trace::{store, BootTrace};
    const LINE: u64 = 65536;
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    let traces = d.path().join("traces");
    let dir = traces.to_str().unwrap();
    let args = [
        "--boot-trace",
        "record",
        "--boot-trace-dir",
        dir,
        "--boot-trace-key",
        "image-7",
    ];
    let boot = |reads: &[u64], write: Option<u64>| {
        let srv = disk.serve_with("back", "8M", 0, &args);
        let mut c = Client::connect_uri(&srv.uris[0]).unwrap();
        if let Some(l) = write {
            c.write(l * LINE, &vec![1u8; LINE as usize], false)
                .unwrap()
                .unwrap();
        }
        for &l in reads {
            c.read(l * LINE + 512, 4096).unwrap().unwrap();
        }
        c.disconnect().unwrap();
        // The trace is saved at stop: its messages are in the log after.
        let log = srv.log.clone();
        srv.stop();
        std::fs::read_to_string(log).unwrap()
    };
    let path = store::path_for(&traces, "image-7");
    let trace = || BootTrace::decode(&std::fs::read(&path).unwrap()).unwrap();
    let seen = |t: &BootTrace, l: u64| {
        t.extents
            .iter()
            .find(|e| e.offset() <= l * LINE && l * LINE < e.offset() + e.len())
            .map_or(0, |e| e.seen)
    };
    // Boot 1 reads lines 0, 3 and 10, and line 2 after writing it whole.
    boot(&[3, 0, 2, 10], Some(2));
    let t = trace();
    assert_eq!((t.key.as_str(), t.boots), ("image-7", 1));
    assert_eq!(
        (seen(&t, 0), seen(&t, 2), seen(&t, 3), seen(&t, 10)),
        (1, 0, 1, 1),
        "{:?}",
        t.extents
    );
    assert!(
        t.extents[0].offset() == 3 * LINE,
        "in first-read order: {:?}",
        t.extents
    );
    // Boot 2 reads lines 10 and 20.
    boot(&[10, 20], None);
    let t = trace();
    assert_eq!(t.boots, 2);
    assert_eq!(
        (seen(&t, 0), seen(&t, 10), seen(&t, 20)),
        (0b10, 0b11, 0b01),
        "{:?}",
        t.extents
    );
    // A damaged trace is not used.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let log = boot(&[5], None);
    assert!(log.contains("not used"), "log:\n{log}");
    assert!(path.with_extension("trace.bad").exists());
    let t = trace();
    assert_eq!((t.boots, seen(&t, 5), seen(&t, 10)), (1, 1, 0));
    // The trace is saved when the boot window ends, while the server runs,
    // and once only.
    let mut longer = args.to_vec();
    longer.extend(["--boot-trace-window", "1"]);
    let srv = disk.serve_with("back", "8M", 0, &longer);
    let mut c = Client::connect_uri(&srv.uris[0]).unwrap();
    c.read(30 * LINE, 4096).unwrap().unwrap();
    let saved = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        trace().boots == 2
    });
    assert!(saved, "not saved at the end of a 1 s window");
    c.read(40 * LINE, 4096).unwrap().unwrap();
    c.disconnect().unwrap();
    srv.stop();
    let t = trace();
    assert_eq!((t.boots, seen(&t, 30), seen(&t, 40)), (2, 1, 0));
}

/// `--boot-trace replay` prefetches a trace a bounded distance ahead of the
/// guest: extents near the guest's position in the trace at once, a far one
/// only once the guest's reads reach its neighbourhood; reads of prefetched
/// lines count as prefetch hits, and the report at stop says so.
#[test]
fn boot_trace_replay_follows_the_guest() {
    use ublk_cache::boot_trace::{BootTrace, Extent};
    const LINE: u64 = 65536;
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    let traces = d.path().join("traces");
    // A, B at 0 s; D at 59.5 s; C at 60 s (lines 3, 8, 40, 50).
    let ext = |line: u64, t_ms: u32| Extent {
        sector: line * LINE / 512,
        sectors: (LINE / 512) as u32,
        t_ms,
        seen: 1,
        flags: 0,
    };
    let t = BootTrace {
        key: "image-9".into(),
        disk_size: 16 * MIB,
        boots: 1,
        window_ms: 100_000,
        poor_boots: 0,
        created_s: 1,
        updated_s: 1,
        extents: vec![ext(3, 0), ext(8, 0), ext(40, 59_500), ext(50, 60_000)],
    };
    save_trace(&traces, &t);
    let mut cmd = replay_cmd(&disk, &traces, &t.key, &["--boot-trace-ahead", "1"]);
    cmd.env(
        "UBLK_CACHE_LOG",
        "info,ublk_cache::daemon::boot_trace=debug",
    );
    let srv = serve::start(cmd, 1, d.path().join("replay.log"));
    let done = |n: usize| {
        (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(25));
            srv.log().matches("boot prefetch: extent done").count() >= n
        })
    };
    assert!(
        done(2),
        "A and B were not prefetched at start: {}",
        srv.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        srv.log().matches("boot prefetch: extent done").count(),
        2,
        "D and C are far ahead of the guest: {}",
        srv.log()
    );
    let mut c = Client::connect_uri(&srv.uris[0]).unwrap();
    c.read(3 * LINE, 4096).unwrap().unwrap(); // A: a prefetch hit
    c.read(40 * LINE, 4096).unwrap().unwrap(); // D: the guest's own, moves it to 59.5 s
    assert!(
        done(4),
        "C was not prefetched once the guest got near: {}",
        srv.log()
    );
    c.read(50 * LINE, 4096).unwrap().unwrap(); // C: a hit
    c.disconnect().unwrap();
    // The same counts, live, in `ctl stats`. Unused: all of B, and the
    // rest of D that prefetch read after the guest's 4 KiB of it.
    let b = &ctl_stats(&disk.run_dir)["boot_trace"];
    assert_eq!(b["replay"], "running", "{b}");
    assert_eq!(b["record"], "off", "{b}");
    for (k, want) in [
        ("planned_lines", 4),
        ("fetched_lines", 3),
        ("used_lines", 2),
        ("read_lines", 3),
        ("used_bytes", 2 * LINE),
        ("unused_bytes", LINE + LINE - 4096),
        ("fetched_bytes", 4 * LINE - 4096),
    ] {
        assert_eq!(b[k].as_u64(), Some(want), "{k}: {b}");
    }
    let text = run(serve::bin().arg("--run-dir").arg(&disk.run_dir).args([
        "ctl",
        &server_id(&disk.run_dir).to_string(),
        "stats",
    ]));
    assert!(
        text.contains("boot prefetch: running; 3 of 4 lines fetched"),
        "{text}"
    );
    let log = srv.log.clone();
    srv.stop();
    let log = std::fs::read_to_string(log).unwrap();
    let report = log
        .lines()
        .find(|l| l.contains("boot prefetch: precision"))
        .unwrap_or_else(|| panic!("no report at stop: {log}"));
    for want in [
        "precision 0.67 recall 0.67",
        "fetched_lines=3",
        "used_lines=2",
        "read_lines=3",
    ] {
        assert!(report.contains(want), "'{want}' not in: {report}");
    }
}

/// Save `t` as the trace of its key in `traces`; returns its path.
fn save_trace(
    traces: &std::path::Path,
    t: &ublk_cache::boot_trace::BootTrace,
) -> std::path::PathBuf {
    use ublk_cache::boot_trace::store;
    let path = store::path_for(traces, &t.key);
    store::prepare(traces, &path).unwrap();
    store::save(&path, t).unwrap();
    path
}

/// The `serve` command that replays the trace of `key` in `traces`, with `extra`.
fn replay_cmd(disk: &Disk, traces: &std::path::Path, key: &str, extra: &[&str]) -> Command {
    boot_trace_cmd(disk, traces, "replay", key, extra)
}

/// The `serve` command with `--boot-trace MODE` on the trace of `key` in
/// `traces`, with `extra`.
fn boot_trace_cmd(
    disk: &Disk,
    traces: &std::path::Path,
    mode: &str,
    key: &str,
    extra: &[&str],
) -> Command {
    let mut args = vec![
        "--boot-trace",
        mode,
        "--boot-trace-dir",
        traces.to_str().unwrap(),
        "--boot-trace-key",
        key,
    ];
    args.extend_from_slice(extra);
    disk.serve_cmd("back", "8M", &args)
}

/// The id of the one server in `run_dir`.
fn server_id(run_dir: &std::path::Path) -> u64 {
    let out = run(serve::bin()
        .arg("--run-dir")
        .arg(run_dir)
        .args(["list", "--json"]));
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    rows[0]["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no server: {out}"))
}

/// `ctl ID stats --json` of the one server in `run_dir`.
fn ctl_stats(run_dir: &std::path::Path) -> serde_json::Value {
    let id = server_id(run_dir).to_string();
    let out = run(serve::bin()
        .arg("--run-dir")
        .arg(run_dir)
        .args(["ctl", &id, "stats", "--json"]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl stats: {e}: {out}"))
}

/// A trace of ten lines (0-9) all first read at 0 s of a 0.5 s boot, read
/// in each of its 3 boots, with `poor_boots` poor replays behind it.
fn ten_lines_at_0(key: &str, poor_boots: u8) -> ublk_cache::boot_trace::BootTrace {
    ublk_cache::boot_trace::BootTrace {
        key: key.into(),
        disk_size: 16 * MIB,
        boots: 3,
        window_ms: 500,
        poor_boots,
        created_s: 1,
        updated_s: 1,
        extents: vec![ublk_cache::boot_trace::Extent {
            sector: 0,
            sectors: (10 * 65536 / 512) as u32,
            t_ms: 0,
            seen: 0b111,
            flags: 0,
        }],
    }
}

#[test]
fn a_trace_whose_prefetch_goes_unused_two_boots_in_a_row_is_put_aside() {
    use ublk_cache::boot_trace::{store, BootTrace};
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    let traces = d.path().join("traces");
    // Ten lines at 0 s of a 0.5 s boot: all fetched at once, none read.
    let t = ten_lines_at_0("image-4", 0);
    let path = save_trace(&traces, &t);
    let boot = |n: usize, want: &str| {
        let cmd = replay_cmd(&disk, &traces, "image-4", &["--boot-trace-window", "1"]);
        let srv = serve::start(cmd, 1, d.path().join(format!("boot-{n}.log")));
        // The replay ends 1 s after start (twice 0.5 s, at least the window).
        let judged = (0..400).any(|_| {
            std::thread::sleep(Duration::from_millis(25));
            srv.log().contains(want)
        });
        assert!(judged, "boot {n}: no '{want}' in: {}", srv.log());
        assert_eq!(ctl_stats(&disk.run_dir)["boot_trace"]["replay"], "done");
        srv.stop();
        // Wipe the cache: the next boot is cold again.
        std::fs::remove_file(&disk.cache).unwrap();
    };
    boot(
        1,
        "the guest used 0 % of what prefetch fetched; the trace is put aside after 2",
    );
    let kept = store::load(&path, "image-4", 16 * MIB).expect("kept after one poor boot");
    assert_eq!(
        (kept.poor_boots, kept.extents),
        (1, t.extents.clone()),
        "only its count changed"
    );
    boot(2, "the trace is stale, moved to");
    assert!(!path.exists(), "a stale trace is not replayed again");
    let stale = std::fs::read(path.with_extension("trace.stale")).unwrap();
    assert_eq!(BootTrace::decode(&stale).unwrap().poor_boots, 1);
}

#[test]
fn in_auto_a_stale_trace_is_replaced_by_this_boot_alone() {
    use ublk_cache::boot_trace::store;
    const LINE: u64 = 65536;
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    let traces = d.path().join("traces");
    // One poor replay behind it already; ten lines this boot will not read.
    let t = ten_lines_at_0("image-6", 1);
    let path = save_trace(&traces, &t);
    let cmd = boot_trace_cmd(
        &disk,
        &traces,
        "auto",
        "image-6",
        &["--boot-trace-window", "1"],
    );
    let srv = serve::start(cmd, 1, d.path().join("auto.log"));
    let mut c = Client::connect_uri(&srv.uris[0]).unwrap();
    c.read(100 * LINE, 4096).unwrap().unwrap();
    c.read(120 * LINE, 4096).unwrap().unwrap();
    let settled = (0..400).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        let l = srv.log();
        l.contains("the trace is stale") && l.contains("boot trace saved")
    });
    assert!(settled, "{}", srv.log());
    c.disconnect().unwrap();
    srv.stop();
    let fresh = store::load(&path, "image-6", 16 * MIB).expect("a trace of this boot");
    let lines: Vec<u64> = fresh.extents.iter().map(|e| e.offset() / LINE).collect();
    assert_eq!(lines, [100, 120], "{fresh:?}");
    assert_eq!((fresh.boots, fresh.poor_boots), (1, 0));
    assert!(path.with_extension("trace.stale").exists());
}

#[test]
fn a_live_migration_destination_neither_records_nor_replays_a_boot() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    let traces = d.path().join("traces");
    let path = save_trace(&traces, &ten_lines_at_0("image-8", 0));
    let cmd = boot_trace_cmd(&disk, &traces, "auto", "image-8", &["--migrate-in"]);
    let srv = serve::start(cmd, 1, d.path().join("migrate-in.log"));
    let mut c = Client::connect_uri(&srv.uris[0]).unwrap();
    c.read(100 * 65536, 4096).unwrap().unwrap();
    c.disconnect().unwrap();
    let log = srv.log();
    srv.stop();
    assert!(
        log.contains("boot trace: off for this start, a live-migration destination"),
        "{log}"
    );
    assert!(!log.contains("prefetching ahead of the guest"), "{log}");
    let kept = ublk_cache::boot_trace::store::load(&path, "image-8", 16 * MIB);
    assert_eq!(
        kept.map(|t| (t.boots, t.extents.len())),
        Some((3, 1)),
        "the trace is as it was"
    );
}

#[test]
fn a_malformed_handshake_gets_closed_and_a_good_connection_still_works() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    let srv = disk.serve("through", "4M", &[]);
    let mut good = Client::connect_uri(&srv.uris[0]).unwrap();
    good.write(0, &[3; 4096], true).unwrap().unwrap();
    // `printf garbage | nc -U SOCKET`, in Rust.
    let mut s = UnixStream::connect(&disk.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"garbage\n").unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert!(got.starts_with(b"NBDMAGICIHAVEOPT"), "{got:?}");
    // The log names the problem.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !srv.log().contains("client flags") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        srv.log().contains("protocol error: client flags"),
        "log:\n{}",
        srv.log()
    );
    // The open connection and a new one are unaffected.
    assert_eq!(good.read(0, 4096).unwrap().unwrap(), vec![3; 4096]);
    let mut again = Client::connect_uri(&srv.uris[0]).unwrap();
    assert_eq!(again.read(0, 4096).unwrap().unwrap(), vec![3; 4096]);
    if let Some(qio) = tool("qemu-io") {
        qemu_io(&qio, &srv.uris[0], &["read -P 3 0 4k".to_string()]);
    }
    good.disconnect().unwrap();
    again.disconnect().unwrap();
    srv.stop();
}

#[test]
fn list_shows_the_nbd_export_and_stop_by_id_works() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    let srv = disk.serve("back", "4M", &[]);
    let out = run(serve::bin()
        .arg("--run-dir")
        .arg(&disk.run_dir)
        .args(["list", "--json"]));
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let row = &rows[0];
    assert_eq!(row["exports"][0], disk.uri().as_str(), "{rows}");
    assert_eq!(row["alive"], true);
    assert_eq!(row["kernel_state"], "-");
    let id = row["id"].as_u64().unwrap();
    assert!(
        id >= 1 << 20,
        "NBD-only ids do not collide with ublk ids: {id}"
    );
    let text = run(serve::bin().arg("--run-dir").arg(&disk.run_dir).arg("list"));
    assert!(text.contains(&disk.uri()), "{text}");
    // The record says how the server was started (what `recover ID` reuses).
    let rec = ublk_cache::daemon::registry::read(&disk.run_dir, id as u32)
        .unwrap()
        .expect("a record");
    let cfg = rec.config.expect("the record holds the configuration");
    assert_eq!(
        cfg.backend.map(|b| b.to_string()),
        Some(format!("file:{}", disk.backend.display()))
    );
    assert_eq!(cfg.cache.as_deref(), Some(disk.cache.as_path()));
    assert_eq!(cfg.mode, policies::CacheMode::Back);
    // `stop ID` signals the server, which exits 0 after write-back.
    let mut srv = srv;
    run(serve::bin()
        .arg("--run-dir")
        .arg(&disk.run_dir)
        .args(["stop", &id.to_string()]));
    let st = srv.child.wait().unwrap();
    assert!(st.success(), "{st}; log:\n{}", srv.log());
    assert!(!disk.sock.exists(), "socket removed");
    let out = run(serve::bin()
        .arg("--run-dir")
        .arg(&disk.run_dir)
        .args(["list", "--json"]));
    assert_eq!(out.trim(), "[]");
}
