//! RbdBackend against the real single-node cluster of scripts/ceph-cluster.sh:
//! round trips, concurrent AIO, the exclusive lock, errors that name the
//! problem, snapshots, change markers, resize notification and clones.
#![cfg(feature = "rbd")]

use std::time::{Duration, Instant};

use rbd_backend::rbd::{META_GENERATION, META_OWNER};
use rbd_backend::{
    Backend, BackendChanges, BlockIo, ChangeTracking, ErrorKind, RbdAdmin, RbdBackend, RbdOptions,
    RbdSpec, ResizeWatch,
};
use testkit::ceph::{rbd_test, TestCluster};
use testkit::pattern;

const MIB: u64 = 1 << 20;

fn open(c: &TestCluster, spec: &RbdSpec) -> RbdBackend {
    RbdBackend::open(spec, &c.opts()).unwrap_or_else(|e| panic!("open rbd:{spec}: {e}"))
}

#[test]
fn round_trip_zeroes_discard_and_range_checks() {
    let Some((c, _wd)) = rbd_test("round_trip", 120) else {
        return;
    };
    let img = c.image("rt", 16 * MIB);
    let b = open(&c, &img.spec);
    assert_eq!(b.size(), 16 * MIB);
    assert_eq!(b.block_size(), 512);
    let id = b.identity();
    assert_eq!(id.kind, "rbd");
    assert_eq!(id.name, img.spec.to_string());
    assert!(id.fingerprint.starts_with("id="), "{id:?}");

    // Across object boundaries (4 MiB objects), odd sector counts, large and small.
    let cases: [(u64, usize); 5] = [
        (0, 512),
        (4096 * 3, 4096 * 5),
        (4 * MIB - 1536, 8192),
        (7 * MIB + 512, 3 * MIB as usize),
        (16 * MIB - 512, 512),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        b.write_at(off, &data).expect("write");
        let mut got = vec![0u8; len];
        b.read_at(off, &mut got).expect("read");
        assert!(got == data, "case {i}: read back differs");
    }
    b.flush().expect("flush");

    // write_zeroes reads back as zeroes, whole objects and partial ones.
    b.write_zeroes(4096 * 3, 4096 * 5).expect("write_zeroes");
    b.write_zeroes(7 * MIB, 2 * MIB).expect("write_zeroes");
    let mut got = vec![1u8; 2 * MIB as usize];
    b.read_at(7 * MIB, &mut got).expect("read");
    assert!(got.iter().all(|&x| x == 0));
    let mut got = vec![1u8; 4096 * 5];
    b.read_at(4096 * 3, &mut got).expect("read");
    assert!(got.iter().all(|&x| x == 0));

    // Discard succeeds; its contents are unspecified (small ones are no-ops), but
    // must stay stable.
    b.discard(4 * MIB - 1536, 8192).expect("discard");
    let mut a1 = vec![0u8; 8192];
    let mut a2 = vec![0u8; 8192];
    b.read_at(4 * MIB - 1536, &mut a1).expect("read");
    b.read_at(4 * MIB - 1536, &mut a2).expect("read");
    assert_eq!(a1, a2);

    let e = b
        .read_at(16 * MIB - 512, &mut [0u8; 1024])
        .expect_err("past the end");
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    let e = b
        .write_at(u64::MAX - 10, &[0u8; 512])
        .expect_err("overflow");
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    b.read_at(0, &mut []).expect("empty read");
}

#[test]
fn concurrent_aio_without_a_thread_per_request() {
    let Some((c, _wd)) = rbd_test("concurrent_aio", 180) else {
        return;
    };
    let img = c.image("aio", 32 * MIB);
    let b = open(&c, &img.spec);
    let threads_before = thread_count();
    let peak = std::sync::atomic::AtomicUsize::new(0);
    let workers = 16u64;
    let region = 2 * MIB;
    std::thread::scope(|s| {
        for t in 0..workers {
            let b = &b;
            let peak = &peak;
            s.spawn(move || {
                let base = t * region;
                for i in 0..40u64 {
                    let off = base + (i * 37 % 64) * 16384;
                    let data = pattern(t * 1000 + i, 16384);
                    b.write_at(off, &data).expect("write");
                    let mut got = vec![0u8; 16384];
                    b.read_at(off, &mut got).expect("read");
                    assert!(got == data, "worker {t} op {i}: read back differs");
                    peak.fetch_max(thread_count(), std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    b.flush().expect("flush");
    let peak = peak.into_inner();
    // 16 workers with a request each in flight; librbd's own pools are fixed.
    // A thread per request would add hundreds over the 640 requests.
    assert!(
        peak <= threads_before + workers as usize + 16,
        "threads grew from {threads_before} to {peak}"
    );
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn exclusive_lock_keeps_other_writers_out() {
    let Some((c, _wd)) = rbd_test("exclusive_lock", 180) else {
        return;
    };
    let img = c.image("lock", 8 * MIB);
    let a = open(&c, &img.spec);
    assert!(a.owns_lock());
    a.write_at(0, &pattern(1, 4096)).expect("owner writes");

    // A second server cannot open the image for writing.
    let e = RbdBackend::open(&img.spec, &c.opts()).expect_err("second writer must be refused");
    assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e}");
    let msg = e.to_string();
    eprintln!("refused as expected: {msg}");
    assert!(
        msg.contains("exclusive lock is held by another client"),
        "{msg}"
    );
    assert!(msg.contains("ublk-cache owner: attached"), "{msg}");
    assert!(
        matches!(e.errno(), libc::EROFS | libc::EBUSY),
        "{e}: errno {}",
        e.errno()
    );

    // A plain librbd client (as QEMU) gets EROFS on write; reads work.
    let raw = c.admin().open_raw(&img.spec).expect("raw open");
    let e = raw
        .write(4096, &pattern(2, 4096))
        .expect_err("plain client write must fail");
    assert_eq!(e.errno(), libc::EROFS, "{e}");
    let mut got = vec![0u8; 4096];
    raw.read(0, &mut got).expect("plain client read");
    assert_eq!(got, pattern(1, 4096));
    drop(raw);

    // And so does the rbd CLI.
    let out = c.rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "4096",
        "--io-total",
        "4096",
        &img.spec.to_string(),
    ]);
    assert!(!out.status.success(), "rbd bench wrote behind our lock");

    // Our writes still work, and after we let go the next server gets the lock.
    a.write_at(8192, &pattern(3, 4096))
        .expect("owner still writes");
    drop(a);
    let b = open(&c, &img.spec);
    assert!(b.owns_lock());
    let mut got = vec![0u8; 4096];
    b.read_at(8192, &mut got).expect("read");
    assert_eq!(got, pattern(3, 4096));
    let owner = c
        .admin()
        .metadata(&img.spec, META_OWNER)
        .expect("meta")
        .expect("owner set");
    assert!(owner.starts_with("attached host="), "{owner}");
}

#[test]
fn images_without_exclusive_lock_are_refused() {
    let Some((c, _wd)) = rbd_test("no_exclusive_lock", 60) else {
        return;
    };
    let img = c.image_with("nolock", 4 * MIB, Some(RbdAdmin::FEATURES_NO_LOCK));
    let e = RbdBackend::open(&img.spec, &c.opts()).expect_err("must refuse");
    assert!(e.to_string().contains("rbd feature enable"), "{e}");
}

#[test]
fn errors_name_the_problem() {
    let Some((c, _wd)) = rbd_test("errors", 120) else {
        return;
    };
    let spec = |s: &str| RbdSpec::parse(s).unwrap();
    let img = c.image("err", 4 * MIB);
    let msg = |s: &RbdSpec, o: &RbdOptions| {
        let m = RbdBackend::open(s, o).expect_err("must fail").to_string();
        eprintln!("refused as expected: {m}");
        m
    };

    let m = msg(&spec("nosuchpool/x"), &c.opts());
    assert!(m.contains("no such pool 'nosuchpool'"), "{m}");
    let m = msg(&spec("rbd/no-such-image-here"), &c.opts());
    assert!(m.contains("no such image rbd/no-such-image-here"), "{m}");
    let m = msg(&img.at("nosnap"), &c.opts());
    assert!(m.contains("has no snapshot 'nosnap'"), "{m}");

    let m = msg(
        &img.spec,
        &RbdOptions {
            conf: Some("/nonexistent/ceph.conf".into()),
            ..c.opts()
        },
    );
    assert!(
        m.contains("ceph config /nonexistent/ceph.conf does not exist"),
        "{m}"
    );

    // A keyring with a key the cluster does not know.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.keyring");
    std::fs::write(
        &bad,
        "[client.admin]\n\tkey = AQBvaBVnAAAAABAAH0HUq3EqNeVTeOb8eolEBg==\n",
    )
    .expect("write keyring");
    let t0 = Instant::now();
    let m = msg(
        &img.spec,
        &RbdOptions {
            keyring: Some(bad),
            connect_timeout_secs: 10,
            ..c.opts()
        },
    );
    assert!(m.contains("authentication as client.admin failed"), "{m}");
    assert!(t0.elapsed() < Duration::from_secs(30));

    let m = msg(
        &img.spec,
        &RbdOptions {
            id: "nobody".into(),
            connect_timeout_secs: 10,
            ..c.opts()
        },
    );
    assert!(m.contains("client.nobody"), "{m}");
}

#[test]
fn snapshots_open_read_only_and_never_change() {
    let Some((c, _wd)) = rbd_test("snapshot", 120) else {
        return;
    };
    let img = c.image("snap", 8 * MIB);
    {
        let b = open(&c, &img.spec);
        b.write_at(MIB, &pattern(7, 65536)).expect("write");
        b.flush().expect("flush");
    }
    c.admin().snap_create(&img.spec, "s1").expect("snap");
    {
        let b = open(&c, &img.spec);
        b.write_at(MIB, &pattern(8, 65536)).expect("overwrite HEAD");
    }
    let s = open(&c, &img.at("s1"));
    assert!(s.is_read_only());
    let mut got = vec![0u8; 65536];
    s.read_at(MIB, &mut got).expect("read snapshot");
    assert_eq!(
        got,
        pattern(7, 65536),
        "the snapshot shows its own content, not HEAD's"
    );
    let e = s.write_at(0, &[0u8; 512]).expect_err("read-only");
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    assert!(s.identity().fingerprint.contains("snap_id="));
    let m = s.change_marker().expect("marker").expect("some marker");
    assert_eq!(
        s.changes_since(&m).expect("changes"),
        BackendChanges::Unchanged
    );
    // A snapshot open takes no lock: HEAD stays writable by its server.
    let head = open(&c, &img.spec);
    head.write_at(0, &[1u8; 512])
        .expect("HEAD writable while the snapshot is served");
}

#[test]
fn change_marker_reports_exactly_what_changed_behind_us() {
    let Some((c, _wd)) = rbd_test("change_marker", 180) else {
        return;
    };
    let img = c.image("marker", 16 * MIB);
    let marker = {
        let b = open(&c, &img.spec);
        b.write_at(0, &pattern(1, 2 * MIB as usize)).expect("write");
        let g0 = b.found_generation();
        let m = b.change_marker().expect("marker").expect("rbd has markers");
        assert!(m.starts_with("rbd-snap:ublk-cache-"), "{m}");
        assert_eq!(b.marker_snapshots().expect("list").len(), 1);
        // A second marker replaces the first.
        let m2 = b.change_marker().expect("marker").expect("rbd has markers");
        assert_eq!(b.marker_snapshots().expect("list").len(), 1);
        assert_ne!(m, m2);
        let gen: u64 = c
            .admin()
            .metadata(&img.spec, META_GENERATION)
            .expect("meta")
            .expect("generation")
            .parse()
            .expect("number");
        assert_eq!(gen, g0.unwrap_or(0) + 3, "attach + two clean detaches");
        let owner = c
            .admin()
            .metadata(&img.spec, META_OWNER)
            .expect("meta")
            .expect("owner");
        assert!(owner.starts_with("detached "), "{owner}");
        m2
    };
    // Nothing changed: the diff is empty, and the snapshot goes away.
    let marker = {
        let b = open(&c, &img.spec);
        assert_eq!(
            b.changes_since(&marker).expect("diff"),
            BackendChanges::Unchanged
        );
        assert!(b.marker_snapshots().expect("list").is_empty());
        b.change_marker().expect("marker").expect("marker")
    };
    // Another client writes two ranges behind our back.
    {
        let raw = c.admin().open_raw(&img.spec).expect("raw");
        raw.write(5 * MIB + 4096, &pattern(9, 8192))
            .expect("write behind");
        raw.write(12 * MIB, &pattern(10, 512))
            .expect("write behind");
        raw.flush().expect("flush");
    }
    let b = open(&c, &img.spec);
    let ch = b.changes_since(&marker).expect("diff");
    let BackendChanges::Ranges(r) = ch else {
        panic!("expected ranges, got {ch:?}")
    };
    eprintln!("changed ranges: {r:?}");
    let covers = |o: u64, n: u64| r.iter().any(|&(ro, rn)| ro <= o && o + n <= ro + rn);
    assert!(
        covers(5 * MIB + 4096, 8192) && covers(12 * MIB, 512),
        "{r:?}"
    );
    let total: u64 = r.iter().map(|x| x.1).sum();
    assert!(
        total <= 2 * 4 * MIB,
        "the diff must name the changed ranges, not everything: {r:?}"
    );
    assert!(
        !covers(0, 4096),
        "untouched data reported as changed: {r:?}"
    );
    assert!(
        b.marker_snapshots().expect("list").is_empty(),
        "marker removed after attach"
    );
    // The marker is gone now: asking again is Unknown, never Unchanged.
    assert_eq!(
        b.changes_since(&marker).expect("diff"),
        BackendChanges::Unknown
    );
    assert_eq!(
        b.changes_since("garbage").expect("diff"),
        BackendChanges::Unknown
    );
}

#[test]
fn resize_is_noticed() {
    let Some((c, _wd)) = rbd_test("resize", 120) else {
        return;
    };
    let img = c.image("resize", 8 * MIB);
    let b = open(&c, &img.spec);
    assert_eq!(b.current_size(), 8 * MIB);
    // A resize needs the lock: librbd asks the owner (us) to perform it.
    c.admin().resize(&img.spec, 12 * MIB).expect("resize");
    let t0 = Instant::now();
    while b.current_size() != 12 * MIB {
        assert!(t0.elapsed() < Duration::from_secs(30), "resize not noticed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.size(), 8 * MIB, "the served size stays until restart");
}

#[test]
fn clones_of_protected_snapshots_work_as_backends() {
    let Some((c, _wd)) = rbd_test("clone", 180) else {
        return;
    };
    let base = c.image("base", 8 * MIB);
    {
        let b = open(&c, &base.spec);
        b.write_at(0, &pattern(21, 8 * MIB as usize))
            .expect("fill base");
    }
    c.admin()
        .snap_create(&base.spec, "snap")
        .expect("snap create");
    c.admin()
        .snap_protect(&base.spec, "snap")
        .expect("snap protect");
    let child =
        base.adopt(RbdSpec::parse(&format!("rbd/{}", TestCluster::unique_name("clone"))).unwrap());
    c.admin()
        .clone_image(&base.at("snap"), &child.spec)
        .expect("clone");
    {
        let b = open(&c, &child.spec);
        assert_eq!(b.size(), 8 * MIB);
        let mut got = vec![0u8; 8 * MIB as usize];
        b.read_at(0, &mut got).expect("read clone");
        assert!(
            got == pattern(21, 8 * MIB as usize),
            "the clone shows its parent's data"
        );
        b.write_at(MIB, &pattern(22, 65536)).expect("write clone");
        let m = b.change_marker().expect("marker").expect("marker");
        drop(b);
        let b = open(&c, &child.spec);
        assert_eq!(
            b.changes_since(&m).expect("diff"),
            BackendChanges::Unchanged
        );
        let mut got = vec![0u8; 65536];
        b.read_at(MIB, &mut got).expect("read");
        assert_eq!(got, pattern(22, 65536));
    }
    let parent = c.admin().open_raw(&base.spec).expect("raw");
    let mut got = vec![0u8; 65536];
    parent.read(MIB, &mut got).expect("read parent");
    assert!(
        got == pattern(21, 8 * MIB as usize)[MIB as usize..MIB as usize + 65536],
        "parent untouched"
    );
    drop(parent);
    drop(child); // the clone goes before its parent
}

/// Leave the image's exclusive lock with a client that died holding it: `rbd
/// bench` takes the lock for its writes, and is killed without letting it go.
fn leave_a_dead_lock_holder(c: &TestCluster, spec: &RbdSpec) {
    let mut cmd = std::process::Command::new("rbd");
    cmd.arg("-c").arg(&c.conf);
    if let Some(k) = &c.keyring {
        cmd.arg("--keyring").arg(k);
    }
    let mut child = cmd
        .args([
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4096",
            "--io-total",
            "64G",
        ])
        .arg(spec.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("rbd bench");
    let t0 = Instant::now();
    loop {
        match c.admin().lock_owners(spec) {
            Ok(o) if !o.is_empty() => break,
            Ok(_) => {}
            Err(e) => eprintln!("lock owners: {e}"),
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("rbd bench never took the lock");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().expect("kill -9");
    child.wait().expect("reap");
}

#[test]
fn a_dead_holders_lock_is_taken_over() {
    let Some((c, _wd)) = rbd_test("dead_holder", 180) else {
        return;
    };
    let img = c.image("dead", 8 * MIB);
    leave_a_dead_lock_holder(&c, &img.spec);
    let t0 = Instant::now();
    let b = open(&c, &img.spec);
    eprintln!("took over a dead client's lock in {:?}", t0.elapsed());
    assert!(b.owns_lock());
    b.write_at(0, &[5u8; 4096]).expect("write after takeover");
}

/// The wait for a dead holder's lock is bounded (`RbdOptions::lock_timeout`):
/// before the holder's watch expires (10 s in the test cluster) the open gives
/// up, naming the holder and what to do. The abandoned attempt gives a late
/// lock straight back, so a later open takes it over.
#[test]
fn the_wait_for_a_dead_holders_lock_is_bounded() {
    let Some((c, _wd)) = rbd_test("dead_holder_bounded", 180) else {
        return;
    };
    let img = c.image("deadb", 8 * MIB);
    leave_a_dead_lock_holder(&c, &img.spec);

    let opts = RbdOptions {
        lock_timeout: Some(Duration::from_secs(2)),
        ..c.opts()
    };
    let t0 = Instant::now();
    let err = RbdBackend::open(&img.spec, &opts)
        .expect_err("the dead holder's watch has not expired yet");
    let waited = t0.elapsed();
    let msg = err.to_string();
    eprintln!("gave up after {waited:?}: {msg}");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{msg}");
    assert!(
        waited < Duration::from_secs(8),
        "the wait was not bounded: {waited:?}"
    );
    for want in [
        "gave up waiting for the image's exclusive lock after 2 s",
        "another client holds it (at 127.0.0.1:",
        "rbd lock rm",
        "rbd status",
    ] {
        assert!(msg.contains(want), "the message lacks '{want}': {msg}");
    }
    // Once the watch expires the lock is free again (the abandoned attempt may
    // have taken it and given it back meanwhile): a plain open takes it.
    let t0 = Instant::now();
    let b = loop {
        match RbdBackend::open(&img.spec, &c.opts()) {
            Ok(b) => break b,
            Err(e) if t0.elapsed() < Duration::from_secs(60) => {
                eprintln!("open after the bounded wait: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => panic!("the lock was never free again: {e}"),
        }
    };
    assert!(b.owns_lock());
    b.write_at(0, &[6u8; 4096]).expect("write after takeover");
}
