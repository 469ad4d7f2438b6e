//! The command line refuses bad input with messages that name the problem, and
//! exits non-zero without touching data. Runs the real binary.

use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ublk-cache"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn has_ublk() -> bool {
    std::path::Path::new("/dev/ublk-control").exists()
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
            vec!["stop", "/dev/sda"],
            "neither a device id nor /dev/ublkbN",
        ),
        (
            vec!["serve", "--backend", "file:/x", "--mode", "offline"],
            "--mode offline is not available",
        ),
    ] {
        let o = run(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(
            stderr(&o).contains(want),
            "{args:?}: stderr was {}",
            stderr(&o)
        );
    }
}

#[test]
fn serve_without_the_ublk_driver_says_what_to_do_and_creates_nothing() {
    if has_ublk() {
        println!(
            "SKIP: /dev/ublk-control exists here; this checks the message on kernels without it"
        );
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
fn demo_without_the_ublk_driver_explains_why() {
    if has_ublk() {
        println!("SKIP: /dev/ublk-control exists here; the demo would really serve");
        return;
    }
    let o = run(&["demo"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("modprobe ublk_drv") && e.contains("tests/vm"),
        "{e}"
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
