//! What the helper has set up on this host, one JSON record per disk under
//! STATE_DIR/disks, and the locks that keep parallel TM actions apart: one per
//! disk for a whole action, one per host for the short accounting steps
//! (capacity check, allocation, ublk id). oned runs up to 15 transfers at once,
//! several of them may target one host.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::attrs::CacheMode;
use crate::conf::{Export, HostConf, Launcher};
use crate::error::{io_at, Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskState {
    /// Being set up (a record left in this state means the helper died midway).
    Attaching,
    /// Its server runs.
    Serving,
    /// Stopped cleanly (nothing dirty) with its cache kept for a warm return:
    /// after undeploy or stop. Reclaimable when space is needed.
    Parked,
    /// Its server died with writes possibly only in the cache, and the image
    /// has been served by another host since: never served, written back or
    /// freed automatically (it would overwrite newer data). `ublk-cache-one
    /// discard` drops it.
    Stale,
}

/// The local cache of a disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LsAlloc {
    pub mad: String,
    pub name: String,
    pub mb: u64,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskRecord {
    pub vm: u32,
    pub disk: u32,
    pub state: DiskState,
    /// `pool/image` served.
    pub backend: String,
    /// We created this RBD clone in this attach (undone on failure).
    pub clone_created: bool,
    pub read_only: bool,
    #[serde(with = "crate::attrs::mode_serde")]
    pub mode: CacheMode,
    pub ls: Option<LsAlloc>,
    pub export: Export,
    /// The ublk device id (EXPORT=ublk).
    pub ublk_id: Option<u32>,
    /// The NBD socket (EXPORT=nbd).
    pub socket: Option<PathBuf>,
    pub launcher: Launcher,
    pub toml: PathBuf,
    /// LINK_DIR/V-N.
    pub link: PathBuf,
    /// SYSDIR/disk.N links made to `link`.
    pub disk_links: Vec<PathBuf>,
    /// Served as a live-migration destination (`migrate-in = true` in the toml).
    pub migrate_in: bool,
    /// Unix seconds of the last state change.
    pub since: u64,
}

impl DiskRecord {
    pub fn name(&self) -> String {
        disk_name(self.vm, self.disk)
    }
}

/// `one-V-N`: the unit instance, toml, LV and cache file name of a disk.
pub fn disk_name(vm: u32, disk: u32) -> String {
    format!("one-{vm}-{disk}")
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The helper's directories on this host.
pub struct State {
    dir: PathBuf,
}

/// An exclusive `flock`, released when dropped.
pub struct Lock {
    _file: File,
}

impl State {
    pub fn new(conf: &HostConf) -> Result<State> {
        let s = State {
            dir: conf.state_dir.clone(),
        };
        for d in [s.disks_dir(), s.locks_dir(), s.run_dir(), s.sock_dir()] {
            std::fs::create_dir_all(&d).map_err(io_at(format!("creating {}", d.display())))?;
        }
        Ok(s)
    }

    fn disks_dir(&self) -> PathBuf {
        self.dir.join("disks")
    }

    fn locks_dir(&self) -> PathBuf {
        self.dir.join("locks")
    }

    /// Output and exit status of servers started by the exec launcher.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// NBD sockets (EXPORT=nbd).
    pub fn sock_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }

    fn record_path(&self, vm: u32, disk: u32) -> PathBuf {
        self.disks_dir()
            .join(format!("{}.json", disk_name(vm, disk)))
    }

    fn open_lock(path: &Path) -> Result<File> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(io_at(format!("opening the lock {}", path.display())))
    }

    fn lock_file(path: &Path) -> Result<Lock> {
        let f = Self::open_lock(path)?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io(format!("locking {}", path.display()), e.into()))?;
        Ok(Lock { _file: f })
    }

    /// The disk's lock if nobody holds it, `None` if an action holds it.
    pub fn try_lock_disk(&self, vm: u32, disk: u32) -> Result<Option<Lock>> {
        let path = self
            .locks_dir()
            .join(format!("{}.lock", disk_name(vm, disk)));
        let f = Self::open_lock(&path)?;
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(Lock { _file: f })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::io(format!("locking {}", path.display()), e.into())),
        }
    }

    /// Held for a whole action on one disk.
    pub fn lock_disk(&self, vm: u32, disk: u32) -> Result<Lock> {
        Self::lock_file(
            &self
                .locks_dir()
                .join(format!("{}.lock", disk_name(vm, disk))),
        )
    }

    /// Held briefly for accounting (capacity, allocation, ublk ids).
    pub fn lock_host(&self) -> Result<Lock> {
        Self::lock_file(&self.dir.join(".lock"))
    }

    pub fn load(&self, vm: u32, disk: u32) -> Result<Option<DiskRecord>> {
        let p = self.record_path(vm, disk);
        match std::fs::read_to_string(&p) {
            Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| {
                Error::Server(format!(
                    "the record {} is unreadable ({e}); inspect it, then remove it by hand",
                    p.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", p.display()), e)),
        }
    }

    /// Atomically (rename), so a crash never leaves half a record.
    pub fn save(&self, r: &DiskRecord) -> Result<()> {
        let p = self.record_path(r.vm, r.disk);
        let tmp = p.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(r)
            .map_err(|e| Error::Server(format!("encoding the record: {e}")))?;
        write_atomic(&tmp, &p, text.as_bytes(), 0o600)
    }

    pub fn remove(&self, vm: u32, disk: u32) -> Result<()> {
        let p = self.record_path(vm, disk);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", p.display()), e)),
        }
    }

    /// Every record on this host. An unreadable one is an error: accounting
    /// must not silently forget a cache.
    pub fn all(&self) -> Result<Vec<DiskRecord>> {
        let mut out = Vec::new();
        let dir = self.disks_dir();
        let rd = std::fs::read_dir(&dir).map_err(io_at(format!("listing {}", dir.display())))?;
        for e in rd {
            let e = e.map_err(io_at(format!("listing {}", dir.display())))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            let mut it = stem.strip_prefix("one-").unwrap_or("").split('-');
            let (Some(v), Some(d), None) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            let (Ok(v), Ok(d)) = (v.parse(), d.parse()) else {
                continue;
            };
            if let Some(r) = self.load(v, d)? {
                out.push(r);
            }
        }
        out.sort_by_key(|r| (r.vm, r.disk));
        Ok(out)
    }
}

/// Write `data` to `tmp`, fsync, rename over `dst`.
pub fn write_atomic(tmp: &Path, dst: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)
        .map_err(io_at(format!("writing {}", tmp.display())))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(io_at(format!("writing {}", tmp.display())))?;
    std::fs::rename(tmp, dst).map_err(io_at(format!(
        "renaming {} to {}",
        tmp.display(),
        dst.display()
    )))
}
