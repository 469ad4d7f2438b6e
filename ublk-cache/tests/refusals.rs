//! A refused start leaves nothing behind: for every way `serve` can refuse,
//! the directory holds afterwards exactly what it held before (no cache file
//! it created, a cache it grew back at its old size, no registry record,
//! control socket or NBD socket), and what was there is unchanged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::serve::{self, sparse_file, Disk};

const MIB: u64 = 1 << 20;

/// Every file below `dir`: its path relative to `dir`, and its bytes.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if ft.is_dir() {
                todo.push(p);
            } else if ft.is_file() {
                out.insert(rel, std::fs::read(&p).unwrap());
            } else {
                out.insert(rel, b"(not a regular file)".to_vec());
            }
        }
    }
    out
}

/// Runs `cmd`, which must fail naming `want`, and checks that `dir` is as it was.
fn refused_leaving_nothing(dir: &Path, mut cmd: Command, want: &str) {
    let before = tree(dir);
    let o = cmd.output().expect("the binary runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{cmd:?} was not refused:\n{err}");
    assert!(err.contains(want), "{cmd:?} did not say '{want}':\n{err}");
    let msg = err
        .lines()
        .find(|l| l.starts_with("ublk-cache: error:"))
        .unwrap_or_else(|| panic!("no error line:\n{err}"));
    assert!(!msg.contains("  "), "a run of spaces in the message: {msg}");
    let after = tree(dir);
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(
        changed.is_empty(),
        "{cmd:?} left {changed:?} behind or changed it:\n{err}"
    );
}

#[test]
fn a_cache_too_small_to_hold_a_line_is_not_left_behind() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    refused_leaving_nothing(d.path(), disk.serve_cmd("back", "1M", &[]), "cache");
}

#[test]
fn an_offline_cache_smaller_than_the_image_is_not_left_behind() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    refused_leaving_nothing(
        d.path(),
        disk.serve_cmd("offline", "8M", &[]),
        "offline mode keeps the whole image in the cache, but the cache holds",
    );
}

#[test]
fn a_busy_metrics_port_leaves_no_cache_record_or_socket() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    // Held by the test itself, so no other process can take (or free) it in between.
    let busy = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let metrics = busy.local_addr().unwrap().to_string();
    refused_leaving_nothing(
        d.path(),
        disk.serve_cmd("back", "8M", &["--metrics", &metrics]),
        "--metrics: cannot listen",
    );
}

#[test]
fn a_missing_backend_creates_no_cache() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    std::fs::remove_file(&disk.backend).unwrap();
    refused_leaving_nothing(d.path(), disk.serve_cmd("back", "8M", &[]), "cannot stat");
}

#[test]
fn a_cache_of_another_backend_is_left_as_it_was() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    disk.serve("back", "8M", &[]).stop();
    // Another disk on the same cache.
    std::fs::remove_file(&disk.backend).unwrap();
    std::fs::File::create(&disk.backend)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    refused_leaving_nothing(
        d.path(),
        disk.serve_cmd("back", "8M", &[]),
        "belongs to another backend",
    );
}

#[test]
fn a_cache_grown_for_a_refused_start_gets_its_old_size_back() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    disk.serve("back", "8M", &[]).stop();
    // Asking for 12M grows the 8M file first; the cache then refuses the size.
    refused_leaving_nothing(
        d.path(),
        disk.serve_cmd("back", "12M", &[]),
        "was formatted with a size of",
    );
}

#[test]
fn a_cache_in_use_by_another_server_is_left_to_it() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    let srv = disk.serve("back", "8M", &[]);
    // A second server for another disk, on the first one's cache.
    let other = d.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let backend = other.join("b.img");
    sparse_file(&backend, 16 * MIB);
    let mut cmd = serve::bin();
    cmd.arg("--run-dir")
        .arg(other.join("run"))
        .arg("serve")
        .arg("--backend")
        .arg(format!("file:{}", backend.display()))
        .arg("--cache")
        .arg(&disk.cache)
        .arg("--export")
        .arg(format!("nbd:unix:{}", other.join("nbd.sock").display()));
    refused_leaving_nothing(&other, cmd, "in use by another ublk-cache server");
    srv.stop();
}

#[test]
fn bad_configuration_touches_nothing() {
    let d = tempfile::tempdir().unwrap();
    let disk = Disk::new(d.path(), 16 * MIB);
    refused_leaving_nothing(
        d.path(),
        disk.serve_cmd("back", "8M", &["--preload-wait"]),
        "--preload-wait needs --preload",
    );
    let conf = d.path().join("bad.toml");
    std::fs::write(&conf, "cache_size = 1\n").unwrap();
    refused_leaving_nothing(
        d.path(),
        disk.serve_cmd("back", "8M", &["--config", conf.to_str().unwrap()]),
        "cache-size",
    );
}
