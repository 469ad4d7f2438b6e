//! The command line refuses bad input with messages that name the problem, and
//! exits non-zero without touching data. Runs the real binary.

use std::process::Output;

use testkit::nbd_client::Client;
use testkit::serve;

fn run(args: &[&str]) -> Output {
    serve::bin().args(args).output().expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command fails, and its error message contains `want`.
fn assert_refused(args: &[&str], want: &str) {
    let o = run(args);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(
        stderr(&o).contains(want),
        "{args:?}: stderr was {}",
        stderr(&o)
    );
}

#[test]
fn bad_arguments_are_named() {
    for (args, want) in [
        (vec!["serve", "--backend", "nfs:/x"], "unknown kind 'nfs'"),
        (vec!["serve", "--backend", "/x.img"], "expected file:PATH"),
        (
            vec!["serve", "--backend", "file:/x", "--cache-size", "12X"],
            "unknown unit",
        ),
        (
            vec!["serve", "--backend", "file:/x", "--mode", "writeback"],
            "unknown cache mode 'writeback'",
        ),
        (
            vec!["serve", "--backend", "file:/x", "--writeback-order", "fast"],
            "unknown write-back order",
        ),
        (
            vec!["serve", "--backend", "file:/x", "--eviction", "arc"],
            "unknown eviction policy 'arc'",
        ),
        (
            vec!["stop", "/dev/sda"],
            "neither a device id nor /dev/ublkbN",
        ),
        (
            vec!["serve", "--backend", "file:/x", "--mode", "offline"],
            "--mode offline needs --cache",
        ),
        (
            vec![
                "serve",
                "--backend",
                "file:/x",
                "--preload",
                "1M",
                "--preload-ranges",
                "/r",
            ],
            "--preload and --preload-ranges exclude each other",
        ),
        (
            vec!["serve", "--backend", "file:/x", "--preload-wait"],
            "--preload-wait needs --preload",
        ),
        (
            vec!["serve", "--backend", "file:/x", "--boot-trace", "always"],
            "boot-trace mode 'always': expected off, record, replay or auto",
        ),
        (
            vec![
                "serve",
                "--backend",
                "file:/x",
                "--mode",
                "none",
                "--boot-trace-dir",
                "/t",
            ],
            "need --boot-trace record",
        ),
        (
            vec![
                "serve",
                "--backend",
                "file:/x",
                "--mode",
                "none",
                "--boot-trace",
                "record",
                "--boot-trace-window",
                "0",
            ],
            "--boot-trace-window 0: give 1 to 3600 seconds",
        ),
        (
            vec![
                "serve",
                "--backend",
                "file:/x",
                "--mode",
                "none",
                "--preload",
                "1M",
            ],
            "mode 'none' uses none",
        ),
        (
            vec!["serve", "--backend", "file:/x", "--metrics", "no:such:addr"],
            "--metrics no:such:addr",
        ),
        (
            vec!["ctl", "7", "stats"],
            "cannot reach the server's control socket",
        ),
        (vec!["ctl", "7", "preload", "1X"], "unknown unit"),
        (
            vec!["migrate-out", "/dev/sda"],
            "neither a device id nor /dev/ublkbN",
        ),
        (
            vec![
                "serve",
                "--backend",
                "file:/x",
                "--config",
                "/nonexistent.toml",
            ],
            "config /nonexistent.toml: cannot read it",
        ),
    ] {
        assert_refused(&args, want);
    }
}

#[test]
fn backend_timeout_is_for_rbd_backends_only() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("nbd.sock");
    let export = format!("nbd:unix:{}", sock.display());
    let run_dir = d.path().join("run");
    let run_dir = run_dir.to_str().unwrap();
    assert_refused(
        &[
            "--run-dir",
            run_dir,
            "serve",
            "--backend",
            "file:/nonexistent.img",
            "--mode",
            "none",
            "--backend-timeout",
            "5",
            "--export",
            &export,
        ],
        "--backend-timeout applies to rbd: backends only",
    );
    assert_refused(
        &["serve", "--backend", "file:/x", "--backend-timeout", "soon"],
        "invalid value 'soon' for '--backend-timeout <SECS>'",
    );
}

#[test]
fn serve_without_the_ublk_driver_says_what_to_do_and_creates_nothing() {
    if serve::skip_with_ublk("serve_without_the_ublk_driver_says_what_to_do_and_creates_nothing") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache.img");
    let o = run(&[
        "serve",
        "--backend",
        "file:/nonexistent.img",
        "--cache",
        cache.to_str().unwrap(),
        "--cache-size",
        "64M",
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("/dev/ublk-control") && e.contains("modprobe ublk_drv"),
        "{e}"
    );
    assert!(
        !cache.exists(),
        "a cache file was created although nothing can be served"
    );
}

#[test]
fn demo_without_the_ublk_driver_serves_over_nbd() {
    if serve::skip_with_ublk("demo_without_the_ublk_driver_serves_over_nbd") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("demo");
    let mut cmd = serve::bin();
    cmd.arg("--run-dir")
        .arg(d.path().join("run"))
        .args(["demo", "--size", "64M", "--cache-size", "16M", "--dir"])
        .arg(&dir);
    let srv = serve::start(cmd, 1, d.path().join("demo.log"));
    let sock = dir.join("nbd.sock");
    assert_eq!(
        srv.uris[0],
        format!("nbd+unix:///?socket={}", sock.display())
    );
    let log = srv.log();
    assert!(
        log.contains("/dev/ublk-control is missing")
            && log.contains("nbdinfo")
            && log.contains("qemu-io"),
        "the demo says how to connect:\n{log}"
    );
    // A client connects, writes and reads back.
    let mut c = Client::connect_uri(&srv.uris[0]).unwrap();
    assert_eq!(c.size, 64 << 20);
    c.write(1 << 20, &[0xab; 65536], false).unwrap().unwrap();
    c.flush().unwrap().unwrap();
    assert_eq!(c.read(1 << 20, 65536).unwrap().unwrap(), vec![0xab; 65536]);
    c.disconnect().unwrap();
    if let Some(nbdinfo) = serve::tool("nbdinfo") {
        let out = serve::run(std::process::Command::new(nbdinfo).arg(&srv.uris[0]));
        assert!(out.contains("export-size: 67108864"), "{out}");
    }
    // SIGTERM: clean stop, exit 0, data written back, socket gone.
    srv.stop();
    assert!(!sock.exists());
    let b = std::fs::read(dir.join("backend.img")).unwrap();
    assert!(b[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0xab));
}

#[test]
fn export_options_are_checked() {
    for (args, want) in [
        (
            vec!["serve", "--backend", "file:/x", "--export", "nbd:udp:1"],
            "expected ublk, nbd:unix:PATH or nbd:tcp",
        ),
        (
            vec![
                "serve",
                "--backend",
                "file:/x",
                "--export",
                "nbd:tcp::99999",
            ],
            "bad port",
        ),
        (
            vec!["serve", "--backend", "file:/x", "--socket-mode", "999"],
            "octal mode",
        ),
        (
            vec![
                "serve",
                "--backend",
                "file:/x",
                "--export",
                "nbd:unix:/tmp/x.sock",
                "--id",
                "3",
            ],
            "--id is the ublk device id",
        ),
        (
            vec![
                "serve",
                "--backend",
                "file:/x",
                "--export",
                "nbd:unix:/tmp/x.sock",
                "--export",
                "nbd:unix:/tmp/x.sock",
            ],
            "given twice",
        ),
        (
            vec![
                "recover",
                "3",
                "--backend",
                "file:/x",
                "--export",
                "nbd:tcp::0",
            ],
            "needs --export ublk",
        ),
    ] {
        assert_refused(&args, want);
    }
}

#[test]
fn nbd_serve_refuses_a_busy_socket_before_touching_data() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("busy.sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let backend = d.path().join("b.img");
    serve::sparse_file(&backend, 16 << 20);
    let cache = d.path().join("c.img");
    let o = run(&[
        "serve",
        "--backend",
        &format!("file:{}", backend.display()),
        "--cache",
        cache.to_str().unwrap(),
        "--cache-size",
        "4M",
        "--export",
        &format!("nbd:unix:{}", sock.display()),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("another server is listening"),
        "{}",
        stderr(&o)
    );
    assert!(
        !cache.exists(),
        "the cache was created although nothing is served"
    );
}

#[test]
fn list_and_stop_use_the_registry() {
    let d = tempfile::tempdir().unwrap();
    let rd = d.path().to_str().unwrap();
    let o = run(&["--run-dir", rd, "list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows, serde_json::json!([]));
    let o = run(&["--run-dir", rd, "stop", "7"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no server for device 7"),
        "{}",
        stderr(&o)
    );
    // A record whose server is gone: stop says so and points at recover.
    std::fs::write(
        d.path().join("7.json"),
        r#"{"id":7,"device":"/dev/ublkb7","pid":999999999,"mode":"back","backend":"file:/b","cache":"/c","state":"serving"}"#,
    )
    .unwrap();
    let o = run(&["--run-dir", rd, "stop", "/dev/ublkb7"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("ublk-cache recover 7"),
        "{}",
        stderr(&o)
    );
    let o = run(&["--run-dir", rd, "list"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("/dev/ublkb7") && out.contains("false"),
        "{out}"
    );
}

/// `UBLK_CACHE_IO_ENGINE` forces the file backends' I/O engine; a misspelt
/// value is refused naming the variable (the binary reads it, not the library).
#[test]
fn the_io_engine_variable_is_read_by_the_binary() {
    let d = tempfile::tempdir().unwrap();
    let backend = d.path().join("b.img");
    serve::sparse_file(&backend, 16 << 20);
    let sock = d.path().join("nbd.sock");
    let args = [
        "--run-dir".to_string(),
        d.path().join("run").display().to_string(),
        "serve".into(),
        "--backend".into(),
        format!("file:{}", backend.display()),
        "--mode".into(),
        "none".into(),
        "--export".into(),
        format!("nbd:unix:{}", sock.display()),
    ];
    let o = serve::bin()
        .args(&args)
        .env("UBLK_CACHE_IO_ENGINE", "posix-aio")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("UBLK_CACHE_IO_ENGINE") && e.contains("posix-aio"),
        "{e}"
    );
    let mut cmd = serve::bin();
    cmd.args(&args)
        .env("UBLK_CACHE_IO_ENGINE", "sync")
        .env("UBLK_CACHE_LOG", "debug");
    let srv = serve::start(cmd, 1, d.path().join("serve.log"));
    let log = srv.log();
    srv.stop();
    assert!(log.contains("engine=sync"), "{log}");
}

/// `recover ID` takes how the server was started from its registry record:
/// nothing else is needed; options given still win, but not another backend.
#[test]
fn recover_reuses_the_recorded_configuration() {
    use ublk_cache::daemon::config::ServeConfig;
    use ublk_cache::daemon::registry::{self, Record, ServerState};
    if serve::skip_with_ublk("recover_reuses_the_recorded_configuration") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let run_dir = d.path().join("run");
    let backend = d.path().join("b.img");
    serve::sparse_file(&backend, 16 << 20);
    let cache = d.path().join("c.img");
    std::fs::write(&cache, b"").unwrap();
    registry::write(
        &run_dir,
        &Record {
            id: 7,
            device: "/dev/ublkb7".into(),
            pid: 999_999_999,
            mode: policies::CacheMode::Back,
            backend: format!("file:{}", backend.display()),
            cache: cache.display().to_string(),
            state: ServerState::Serving,
            exports: vec!["/dev/ublkb7".into()],
            config: Some(ServeConfig {
                backend: Some(format!("file:{}", backend.display()).parse().unwrap()),
                cache: Some(cache.clone()),
                ..ServeConfig::default()
            }),
        },
    )
    .unwrap();
    let rd = run_dir.to_str().unwrap();
    // Everything validated from the record; what stops it here is the kernel.
    assert_refused(&["--run-dir", rd, "recover", "7"], "/dev/ublk-control");
    assert_refused(
        &["--run-dir", rd, "recover", "7", "--mode", "none"],
        "/dev/ublk-control",
    );
    assert_refused(
        &[
            "--run-dir",
            rd,
            "recover",
            "7",
            "--backend",
            "file:/other.img",
        ],
        "and this names backend file:/other.img",
    );
    let other = d.path().join("other-cache.img");
    std::fs::write(&other, b"").unwrap();
    assert_refused(
        &[
            "--run-dir",
            rd,
            "recover",
            "7",
            "--cache",
            other.to_str().unwrap(),
        ],
        "the device was served with cache",
    );
    // No record: the options are needed, as for serve.
    assert_refused(&["--run-dir", rd, "recover", "8"], "no backend");
}
