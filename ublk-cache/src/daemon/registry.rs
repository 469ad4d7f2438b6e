//! The run-time registry: one JSON record per served device under the run
//! directory, so that `list` and `stop` (and the OpenNebula drivers) can find the
//! server of a device without asking the kernel.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use policies::CacheMode;
use serde::{Deserialize, Serialize};

use super::config::{text, ServeConfig};

pub const DEFAULT_RUN_DIR: &str = "/run/ublk-cache";
/// Servers without a ublk device (NBD only) are registered under ids from here
/// on. The kernel's ublk device ids are below 2^20 (its minor number space), so
/// the two never collide.
pub const NBD_ONLY_ID_BASE: u32 = 1 << 20;

/// Where a server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerState {
    Serving,
    /// Writing back and detaching after a stop request.
    Stopping,
    /// Gone, the ublk device left for `recover`.
    Detached,
}

impl ServerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Serving => "serving",
            ServerState::Stopping => "stopping",
            ServerState::Detached => "detached",
        }
    }
}

impl std::fmt::Display for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub id: u32,
    pub device: String,
    pub pid: u32,
    /// The mode the server was started in.
    #[serde(with = "text")]
    pub mode: CacheMode,
    pub backend: String,
    pub cache: String,
    pub state: ServerState,
    /// Where the disk is served: the device path and/or NBD URIs, in `--export` order.
    #[serde(default)]
    pub exports: Vec<String>,
    /// How the server was started, so that `recover ID` needs nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ServeConfig>,
}

impl Record {
    /// Whether this server has a ublk device (else it is NBD only).
    pub fn has_device(&self) -> bool {
        self.id < NBD_ONLY_ID_BASE
    }
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

/// Claim the lowest free id from `base` for a server without a ublk device and
/// write `rec` under it. A record whose server is gone is taken over.
pub fn claim(dir: &Path, base: u32, rec: &mut Record) -> io::Result<u32> {
    fs::create_dir_all(dir)?;
    for id in base..base.saturating_add(100_000) {
        let path = path_of(dir, id);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(_) => {
                rec.id = id;
                write(dir, rec)?;
                return Ok(id);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Taken, unless its server is gone. (An unreadable or empty file
                // may be a claim in progress: left alone.)
                if let Ok(Some(old)) = read(dir, id) {
                    if !pid_alive(old.pid) {
                        let _ = fs::remove_file(&path);
                        if fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&path)
                            .is_ok()
                        {
                            rec.id = id;
                            write(dir, rec)?;
                            return Ok(id);
                        }
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "no free registry id from {base} in {}",
        dir.display()
    )))
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
    // Signal 0 only checks that the process exists (and may be signalled).
    let exists = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok());
    // A zombie has exited; only its parent has not collected it yet.
    exists && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    // /proc/PID/stat: "PID (comm) STATE ..."; comm may contain spaces or ')'.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false)
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
            mode: CacheMode::Back,
            backend: "file:/x".into(),
            cache: "/c".into(),
            state: ServerState::Serving,
            exports: vec!["/dev/ublkb3".into()],
            config: Some(ServeConfig {
                backend: Some("file:/x".parse().unwrap()),
                cache: Some("/c".into()),
                id: Some(3),
                ..ServeConfig::default()
            }),
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

    #[test]
    fn claim_takes_free_or_stale_ids_and_old_records_still_parse() {
        let d = tempfile::tempdir().unwrap();
        let mut r = Record {
            id: 0,
            device: String::new(),
            pid: std::process::id(),
            mode: CacheMode::Back,
            backend: "file:/x".into(),
            cache: "/c".into(),
            state: ServerState::Serving,
            exports: vec!["nbd+unix:///?socket=/s".into()],
            config: None,
        };
        assert_eq!(
            claim(d.path(), NBD_ONLY_ID_BASE, &mut r).unwrap(),
            NBD_ONLY_ID_BASE
        );
        assert!(!r.has_device());
        let mut r2 = r.clone();
        assert_eq!(
            claim(d.path(), NBD_ONLY_ID_BASE, &mut r2).unwrap(),
            NBD_ONLY_ID_BASE + 1
        );
        // A record of a dead server is taken over.
        let mut dead = r.clone();
        dead.id = NBD_ONLY_ID_BASE + 2;
        dead.pid = 999_999_999;
        write(d.path(), &dead).unwrap();
        let mut r3 = r.clone();
        assert_eq!(
            claim(d.path(), NBD_ONLY_ID_BASE + 2, &mut r3).unwrap(),
            NBD_ONLY_ID_BASE + 2
        );
        assert_eq!(
            read(d.path(), NBD_ONLY_ID_BASE + 2).unwrap().unwrap().pid,
            std::process::id()
        );
        // Records written before `exports` existed still parse.
        fs::write(
            d.path().join("5.json"),
            r#"{"id":5,"device":"/dev/ublkb5","pid":1,"mode":"back","backend":"file:/b","cache":"/c","state":"serving"}"#,
        )
        .unwrap();
        let old = read(d.path(), 5).unwrap().unwrap();
        assert_eq!(old.exports, Vec::<String>::new());
        assert_eq!(old.config, None);
    }
}
