//! The daemon in-process, on in-memory devices: start, serve over NBD, the
//! registry record and the control socket with typed requests and replies,
//! a live mode switch, a migration handover, preload, then a clean stop and a
//! detach, each taking everything down in order. And refused starts: a bad
//! configuration, a cache of another backend.

use std::path::Path;
use std::sync::Arc;

use policies::CacheMode;
use rbd_backend::{Backend, MemBackend};
use testkit::nbd_client::Client;
use testkit::pattern;
use testkit::rig::{mems, MIB};
use ublk_cache::daemon::config::{ByteSize, ServeConfig};
use ublk_cache::daemon::control::{self, client, Reply, Request};
use ublk_cache::daemon::registry::{self, ServerState};
use ublk_cache::daemon::{Devices, Outcome, Server};
use ublk_cache::EngineErrorKind;

fn config(dir: &Path, mode: CacheMode) -> ServeConfig {
    ServeConfig {
        exports: vec![format!("nbd:unix:{}", dir.join("nbd.sock").display())
            .parse()
            .unwrap()],
        mode,
        line_size: Some(ByteSize(64 * 1024)),
        shadow_dir: Some(testkit::rig::shadow_dir()),
        run_dir: dir.join("run"),
        ..ServeConfig::default()
    }
}

fn devices(b: &Arc<MemBackend>, c: &Arc<MemBackend>) -> Devices {
    Devices {
        backend: b.clone(),
        cache: Some(c.clone() as Arc<dyn Backend>),
        label: "mem".into(),
    }
}

fn call(dir: &Path, id: u32, req: Request) -> Reply {
    let path = control::socket_path(&dir.join("run"), id);
    client::call(&path, &req, |_| {})
        .unwrap_or_else(|e| panic!("{req:?}: {}", e.chain()))
        .reply
}

#[test]
fn a_server_runs_in_process_and_stops_in_order() {
    let d = tempfile::tempdir().unwrap();
    let (b, c) = mems(8, 4);
    let running = Server::new(config(d.path(), CacheMode::Back))
        .with_devices(devices(&b, &c))
        .start()
        .unwrap_or_else(|e| panic!("start: {}", e.chain()));
    let id = running.id().expect("registered");
    assert!(id >= registry::NBD_ONLY_ID_BASE, "an NBD-only id");
    let lines = running.export_lines().to_vec();
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("nbd+unix:///?socket="), "{lines:?}");
    let rec = registry::read(&d.path().join("run"), id).unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.mode, rec.exports.clone()),
        (ServerState::Serving, CacheMode::Back, lines.clone())
    );

    let mut nbd = Client::connect_uri(&lines[0]).unwrap();
    let data = pattern(1, MIB as usize);
    nbd.write_all(0, &data);
    nbd.flush().unwrap().unwrap();

    let Reply::Stats(s) = call(d.path(), id, Request::Stats) else {
        panic!("not a stats reply")
    };
    assert_eq!((s.id, s.engine.write_bytes), (id, MIB));
    assert_eq!(s.backend, "given:mem");
    let Reply::Mode(m) = call(
        d.path(),
        id,
        Request::Mode {
            mode: CacheMode::Through,
        },
    ) else {
        panic!("not a mode reply")
    };
    assert_eq!((m.previous, m.mode), (CacheMode::Back, CacheMode::Through));
    assert!(
        b.snapshot()[..MIB as usize] == data[..],
        "written back by the switch"
    );
    // A migration out and back: the mode returns.
    let Reply::MigrateOut(o) = call(d.path(), id, Request::MigrateOut) else {
        panic!("not a migrate-out reply")
    };
    assert!(o.ready && !o.already);
    let err = client::call(
        &control::socket_path(&d.path().join("run"), id),
        &Request::Mode {
            mode: CacheMode::Back,
        },
        |_| {},
    )
    .expect_err("no mode switch while migrated out");
    assert!(err.to_string().contains("migrate-abort"), "{err}");
    let Reply::MigrateAbort(a) = call(d.path(), id, Request::MigrateAbort) else {
        panic!("not a migrate-abort reply")
    };
    assert_eq!(a.mode, CacheMode::Through);
    let Reply::Preload(p) = call(
        d.path(),
        id,
        Request::Preload {
            ranges: Some(vec![(2 * MIB, MIB)]),
        },
    ) else {
        panic!("not a preload reply")
    };
    assert_eq!((p.total, p.fetched), (MIB, MIB));
    let more = pattern(2, 4096);
    nbd.write_all(5 * MIB, &more);
    nbd.disconnect().unwrap();

    let stop = running.stop_token();
    stop.stop();
    assert_eq!(running.wait().unwrap(), Outcome::Stopped);
    assert!(b.snapshot()[5 * MIB as usize..5 * MIB as usize + 4096] == more[..]);
    assert!(
        registry::read(&d.path().join("run"), id).unwrap().is_none(),
        "no record is left after a clean stop"
    );
    assert!(!control::socket_path(&d.path().join("run"), id).exists());
    assert!(!d.path().join("nbd.sock").exists());
}

#[test]
fn a_detached_server_keeps_dirty_data_for_the_next_one() {
    let d = tempfile::tempdir().unwrap();
    let (b, c) = mems(8, 4);
    // Write-back held off: the backend refuses writes.
    let refusing = testkit::rig::refusing(&b);
    let running = Server::new(config(d.path(), CacheMode::Back))
        .with_devices(Devices {
            backend: refusing.clone(),
            cache: Some(c.clone() as Arc<dyn Backend>),
            label: "mem".into(),
        })
        .start()
        .unwrap();
    let mut nbd = Client::connect_uri(&running.export_lines()[0]).unwrap();
    let data = pattern(3, 256 * 1024);
    nbd.write_all(MIB, &data);
    nbd.flush().unwrap().unwrap();
    nbd.disconnect().unwrap();
    running.stop_token().detach();
    assert_eq!(running.wait().unwrap(), Outcome::Detached { device: None });
    assert!(b.snapshot()[MIB as usize..].iter().all(|&x| x == 0));
    // The next server on the same cache serves the dirty data and writes it back.
    refusing.set_read_only(false);
    let running = Server::new(config(d.path(), CacheMode::Back))
        .with_devices(devices(&b, &c))
        .start()
        .unwrap();
    let mut nbd = Client::connect_uri(&running.export_lines()[0]).unwrap();
    assert_eq!(nbd.read_all(MIB, data.len()), data);
    nbd.disconnect().unwrap();
    running.stop_token().stop();
    running.wait().unwrap();
    assert!(b.snapshot()[MIB as usize..MIB as usize + data.len()] == data[..]);
}

#[test]
fn refused_starts_name_the_problem_and_leave_the_devices_as_they_were() {
    let d = tempfile::tempdir().unwrap();
    // No backend at all.
    let e = Server::new(config(d.path(), CacheMode::Back))
        .start()
        .err()
        .expect("refused");
    assert!(e.to_string().contains("no backend"), "{e}");
    // A cache of another backend.
    let (b, c) = mems(8, 4);
    let running = Server::new(config(d.path(), CacheMode::Back))
        .with_devices(devices(&b, &c))
        .start()
        .unwrap();
    running.stop_token().stop();
    running.wait().unwrap();
    let before = c.snapshot();
    let other = Arc::new(MemBackend::new(16 * MIB as usize));
    let e = Server::new(config(d.path(), CacheMode::Back))
        .with_devices(devices(&other, &c))
        .start()
        .err()
        .expect("a cache of another backend is refused");
    assert_eq!(
        e.engine_error().map(|e| e.kind()),
        Some(EngineErrorKind::Mismatch),
        "{}",
        e.chain()
    );
    assert!(
        e.chain().contains("belongs to another backend"),
        "{}",
        e.chain()
    );
    assert!(c.snapshot() == before, "the refused cache was changed");
    assert!(registry::all(&d.path().join("run")).0.is_empty());
    assert!(
        !d.path().join("nbd.sock").exists(),
        "the socket was removed"
    );
}
