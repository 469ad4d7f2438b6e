//! The crash shadow has an owner: it is private (0600 in a 0700 directory,
//! also when the directory existed more open), a clean stop (and a detach)
//! removes it, and a stale or damaged shadow found at start is not trusted:
//! the on-disk table of the last flush is used, as after a power cut, and a
//! new shadow replaces it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use policies::CacheMode;
use rbd_backend::MemBackend;
use testkit::rig::{cfg, fill, mems, open, read, MIB};
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};

fn shadows(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "shadow"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn private(dir: &Path) -> EngineConfig {
    EngineConfig {
        shadow_dir: dir.to_path_buf(),
        ..cfg(CacheMode::Back)
    }
}

fn engine(b: &Arc<MemBackend>, c: &Arc<MemBackend>, dir: &Path) -> Arc<Engine> {
    open(b.clone(), c.clone(), private(dir))
}

#[test]
fn shadows_are_private_and_a_clean_stop_removes_them() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("shadows");
    let (b, c) = mems(8, 4);
    let e = engine(&b, &c, &dir);
    assert_eq!(mode_of(&dir), 0o700, "the shadow directory is private");
    let s = shadows(&dir);
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(mode_of(&s[0]), 0o600, "the shadow is private");
    e.write(0, &fill(1, 65536), false).unwrap();
    e.shutdown().unwrap();
    assert!(shadows(&dir).is_empty(), "a clean stop leaves its shadow");
    // A detach (dirty data kept in the cache) is clean too.
    let e = engine(&b, &c, &dir);
    e.write(MIB, &fill(2, 4096), false).unwrap();
    e.detach_keep_dirty().unwrap();
    assert!(shadows(&dir).is_empty(), "a detach leaves its shadow");
    let e = engine(&b, &c, &dir);
    assert!(read(&e, MIB, 4096) == fill(2, 4096));
    e.shutdown().unwrap();
    assert!(shadows(&dir).is_empty());
}

#[test]
fn a_more_open_directory_and_an_old_shadow_are_made_private() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("shadows");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (b, c) = mems(8, 4);
    let e = engine(&b, &c, &dir);
    e.write(0, &fill(3, 4096), false).unwrap();
    e.abandon();
    let s = shadows(&dir);
    assert_eq!(s.len(), 1, "a crash leaves the shadow for the next start");
    std::fs::set_permissions(&s[0], std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = engine(&b, &c, &dir);
    assert_eq!(mode_of(&dir), 0o700);
    assert_eq!(mode_of(&s[0]), 0o600);
    assert!(
        read(&e, 0, 4096) == fill(3, 4096),
        "the crash shadow kept the acknowledged write"
    );
    e.shutdown().unwrap();
    assert!(shadows(&dir).is_empty());
}

#[test]
fn a_damaged_shadow_at_start_is_not_trusted_and_is_replaced() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("shadows");
    let (b, c) = mems(8, 4);
    let e = engine(&b, &c, &dir);
    e.write(0, &fill(4, 4096), false).unwrap();
    e.flush().unwrap();
    // Written after the last flush: only the shadow knows it.
    e.write(MIB, &fill(5, 4096), false).unwrap();
    e.abandon();
    let s = shadows(&dir);
    assert_eq!(s.len(), 1);
    // Damage the header: the shadow no longer proves it belongs to this attach.
    let mut raw = std::fs::read(&s[0]).unwrap();
    raw[20] ^= 0xff;
    std::fs::write(&s[0], &raw).unwrap();
    let e = engine(&b, &c, &dir);
    assert!(
        read(&e, 0, 4096) == fill(4, 4096),
        "flushed data comes from the on-disk table"
    );
    let after = read(&e, MIB, 4096);
    assert!(
        after == fill(5, 4096) || after == fill(0, 4096),
        "an unflushed sector holds garbage"
    );
    let s2 = shadows(&dir);
    assert_eq!(s2, s, "a new shadow replaced the damaged one");
    assert_ne!(std::fs::read(&s2[0]).unwrap(), raw);
    e.shutdown().unwrap();
    assert!(shadows(&dir).is_empty());
}
