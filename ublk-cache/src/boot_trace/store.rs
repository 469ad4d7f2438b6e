//! Where traces live: one file per key in a directory of the host (0700,
//! files 0600), written whole to a temporary file, synced, renamed over the
//! old one and the directory synced, so that a crash leaves the old trace or
//! the new one, never a mix. A trace that fails its checks, or is of another
//! key or disk size, is moved aside as `.bad` (kept for a look, never used).
//!
//! Several servers may share a key (clones of one image on one host), so a
//! change of a trace (load, change, save or move aside) happens under an
//! exclusive flock of `KEY.lock` beside it ([`lock`]); that also keeps the one
//! temporary file to one writer. Reading needs no lock: a rename is atomic.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{BootTrace, BootTraceError};

/// The file of `key` in `dir`: the key made safe for a file name, and its
/// crc32c so that two keys that look alike once made safe stay apart.
pub fn path_for(dir: &Path, key: &str) -> PathBuf {
    let safe: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(96)
        .collect();
    dir.join(format!(
        "{safe}-{:08x}.trace",
        crc32c::crc32c(key.as_bytes())
    ))
}

fn io<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> BootTraceError + 'a {
    move |source| BootTraceError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Held while a trace changes: an exclusive flock of its `.lock` file
/// (released when dropped; the file stays, empty).
pub struct TraceLock {
    _file: fs::File,
}

/// Wait for the lock of the trace at `path`.
pub fn lock(path: &Path) -> Result<TraceLock, BootTraceError> {
    let at = path.with_extension("lock");
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&at)
        .map_err(io(&at, "cannot open the lock file"))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io(&at, "cannot lock")(e.into()))?;
    Ok(TraceLock { _file: f })
}

/// Make `dir` (0700) if it is missing, and delete a temporary file of `path`
/// that a crash left behind.
pub fn prepare(dir: &Path, path: &Path) -> Result<(), BootTraceError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir, "cannot create the trace directory"))?;
    // Not one another server is writing.
    let _one = lock(path)?;
    let tmp = tmp_of(path);
    match fs::remove_file(&tmp) {
        Ok(()) => tracing::info!("removed {}, left by an interrupted save", tmp.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&tmp, "cannot remove a leftover temporary file")(e)),
    }
    Ok(())
}

fn tmp_of(path: &Path) -> PathBuf {
    path.with_extension("trace.tmp")
}

/// The trace at `path` if there is a usable one for `key` and `disk_size`.
/// An unusable one is moved aside (`.bad`) with a warning that says why.
pub fn load(path: &Path, key: &str, disk_size: u64) -> Option<BootTrace> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(
                "boot trace {}: cannot read it ({e}); recording anew",
                path.display()
            );
            return None;
        }
    };
    let why = match BootTrace::decode(&bytes) {
        Ok(t) if t.key != key => format!("it is the trace of '{}', not of '{key}'", t.key),
        Ok(t) if t.disk_size > disk_size => format!(
            "it is of a disk of {} bytes, and this one has {disk_size} (shrunk)",
            t.disk_size
        ),
        Ok(t) => return Some(t),
        Err(e) => e.to_string(),
    };
    let bad = path.with_extension("trace.bad");
    tracing::warn!(
        "boot trace {}: not used: {why}; moved to {} and recording anew",
        path.display(),
        bad.display()
    );
    if let Err(e) = fs::rename(path, &bad) {
        tracing::warn!("boot trace {}: cannot move it aside: {e}", path.display());
    }
    None
}

/// Put the trace at `path` aside as `.stale` (replacing an older one): it
/// predicted badly. Returns where it went. Under the trace's [`lock`].
pub fn retire(path: &Path) -> Result<PathBuf, BootTraceError> {
    let stale = path.with_extension("trace.stale");
    fs::rename(path, &stale).map_err(io(path, "cannot move the stale trace aside"))?;
    sync_dir(path)?;
    Ok(stale)
}

fn sync_dir(path: &Path) -> Result<(), BootTraceError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "cannot sync the trace directory"))
}

/// Write `t` as the trace at `path`, atomically and durably. Under the
/// trace's [`lock`].
pub fn save(path: &Path, t: &BootTrace) -> Result<(), BootTraceError> {
    let tmp = tmp_of(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp, "cannot create"))?;
    f.write_all(&t.encode()).map_err(io(&tmp, "cannot write"))?;
    f.sync_all().map_err(io(&tmp, "cannot sync"))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path, "cannot rename the new trace into place"))?;
    sync_dir(path)
}

#[cfg(test)]
mod tests {
    use super::super::{merge, BootSet};
    use super::*;

    #[test]
    fn a_saved_trace_loads_and_a_damaged_or_foreign_one_is_moved_aside() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("traces");
        let p = path_for(&dir, "rbd:one/one-7@snap");
        assert!(p
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("rbd_one_one-7_snap-"));
        prepare(&dir, &p).unwrap();
        let b = BootSet {
            line_size: 65536,
            lines: vec![(1, 5), (7, 9)],
            window_ms: 100,
        };
        let t = merge(None, &b, "rbd:one/one-7@snap", 1 << 20, 1);
        save(&p, &t).unwrap();
        assert_eq!(load(&p, "rbd:one/one-7@snap", 1 << 20), Some(t.clone()));
        assert_eq!(load(&p, "rbd:one/other", 1 << 20), None, "another key's");
        assert!(!p.exists() && p.with_extension("trace.bad").exists());
        save(&p, &t).unwrap();
        let mut bytes = fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 1;
        fs::write(&p, &bytes).unwrap();
        assert_eq!(load(&p, "rbd:one/one-7@snap", 1 << 20), None, "damaged");
        fs::write(tmp_of(&p), b"half").unwrap();
        prepare(&dir, &p).unwrap();
        assert!(!tmp_of(&p).exists(), "a leftover temporary file is removed");
    }
}
