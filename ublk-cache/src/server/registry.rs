//! The run-time registry: one JSON record per served device under the run
//! directory, so that `list` and `stop` (and the OpenNebula drivers) can find the
//! server of a device without asking the kernel.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_RUN_DIR: &str = "/run/ublk-cache";
pub const RUN_DIR_ENV: &str = "UBLK_CACHE_RUN_DIR";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub id: u32,
    pub device: String,
    pub pid: u32,
    pub mode: String,
    pub backend: String,
    pub cache: String,
    /// "serving", "stopping" or "detached".
    pub state: String,
}

pub fn run_dir(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(RUN_DIR_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}

fn path_of(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Write atomically (temp file + rename) so readers never see half a record.
pub fn write(dir: &Path, rec: &Record) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.json.tmp", rec.id));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string_pretty(rec)?.as_bytes())?;
    f.sync_all()?;
    fs::rename(tmp, path_of(dir, rec.id))
}

pub fn remove(dir: &Path, id: u32) -> io::Result<()> {
    match fs::remove_file(path_of(dir, id)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub fn read(dir: &Path, id: u32) -> io::Result<Option<Record>> {
    match fs::read(path_of(dir, id)) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path_of(dir, id).display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every readable record; unreadable ones are reported, not fatal.
pub fn all(dir: &Path) -> (Vec<Record>, Vec<String>) {
    let mut recs = Vec::new();
    let mut problems = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return (recs, problems);
    };
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().to_string();
        let Some(id) = name
            .strip_suffix(".json")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        match read(dir, id) {
            Ok(Some(r)) => recs.push(r),
            Ok(None) => {}
            Err(e) => problems.push(e.to_string()),
        }
    }
    recs.sort_by_key(|r| r.id);
    (recs, problems)
}

pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid as i32, 0) } == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_list_remove() {
        let d = tempfile::tempdir().unwrap();
        let r = Record {
            id: 3,
            device: "/dev/ublkb3".into(),
            pid: std::process::id(),
            mode: "back".into(),
            backend: "file:/x".into(),
            cache: "/c".into(),
            state: "serving".into(),
        };
        write(d.path(), &r).unwrap();
        assert_eq!(read(d.path(), 3).unwrap(), Some(r.clone()));
        fs::write(d.path().join("9.json"), b"{not json").unwrap();
        let (recs, problems) = all(d.path());
        assert_eq!(recs, vec![r]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("9.json"));
        remove(d.path(), 3).unwrap();
        remove(d.path(), 3).unwrap();
        assert_eq!(read(d.path(), 3).unwrap(), None);
        assert!(pid_alive(std::process::id()));
    }
}
