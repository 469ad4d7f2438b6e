//! Local cache space (the feature request's LS_MAD): one cache per disk, a
//! file under LS_PATH (`file`) or a logical volume in the volume group LS_PATH
//! (`lvm`). A new cache's first MiB is zero, so `ublk-cache serve` formats it
//! without `--format` (and a restart by systemd never re-formats it).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::conf::{HostConf, LsMad};
use crate::error::{io_at, Error, Result};

const MIB: u64 = 1 << 20;

/// What the store offers now, in MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub total_mb: u64,
    /// Free in the filesystem or volume group (allocations already taken).
    pub free_mb: u64,
}

pub struct Store<'a> {
    conf: &'a HostConf,
}

impl<'a> Store<'a> {
    pub fn new(conf: &'a HostConf) -> Self {
        Store { conf }
    }

    pub fn mad(&self) -> LsMad {
        self.conf.ls_mad
    }

    pub fn capacity(&self) -> Result<Capacity> {
        match self.conf.ls_mad {
            LsMad::Dummy => Ok(Capacity {
                total_mb: 0,
                free_mb: 0,
            }),
            LsMad::File => {
                let dir = Path::new(&self.conf.ls_path);
                let st = rustix::fs::statvfs(dir)
                    .map_err(|e| Error::io(format!("LS_PATH {}", dir.display()), e.into()))?;
                let frsize = st.f_frsize.max(1);
                Ok(Capacity {
                    total_mb: st.f_blocks * frsize / MIB,
                    free_mb: st.f_bavail * frsize / MIB,
                })
            }
            LsMad::Lvm => {
                let vg = &self.conf.ls_path;
                let out = self.conf.vgs.run(&[
                    "--noheadings",
                    "--units",
                    "m",
                    "--nosuffix",
                    "-o",
                    "vg_size,vg_free",
                    vg.as_str(),
                ])?;
                parse_vgs(&out).ok_or_else(|| {
                    Error::Server(format!(
                        "vgs {vg}: cannot read the size and free space from '{}'",
                        out.trim()
                    ))
                })
            }
        }
    }

    /// Create a cache of `mb` MB named `name`. On failure nothing is left.
    pub fn create(&self, name: &str, mb: u64) -> Result<PathBuf> {
        match self.conf.ls_mad {
            LsMad::Dummy => Err(Error::Refused(
                "LS_MAD=dummy: this host has no local cache storage".into(),
            )),
            LsMad::File => {
                let dir = Path::new(&self.conf.ls_path);
                std::fs::create_dir_all(dir)
                    .map_err(io_at(format!("LS_PATH {}", dir.display())))?;
                let path = dir.join(format!("{name}.cache"));
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_at(format!("creating the cache file {}", path.display())))?;
                let done = (|| -> Result<()> {
                    // Sparse first, then the blocks reserved, so a full store fails here
                    // and not later under the guest's writes.
                    f.set_len(mb * MIB)
                        .map_err(io_at(format!("sizing {} to {mb} MB", path.display())))?;
                    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, mb * MIB)
                        .map_err(|e| {
                            Error::Refused(format!(
                                "LS_PATH {}: cannot reserve {mb} MB for {name} ({e})",
                                dir.display()
                            ))
                        })?;
                    f.sync_all()
                        .map_err(io_at(format!("syncing {}", path.display())))
                })();
                if let Err(e) = done {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
                Ok(path)
            }
            LsMad::Lvm => {
                let vg = self.conf.ls_path.as_str();
                let size = format!("{mb}m");
                self.conf
                    .lvcreate
                    .run(&["-y", "-W", "y", "-Z", "y", "-n", name, "-L", &size, vg])?;
                let made = self.lv_path(name).and_then(|p| wipe_head(&p).map(|()| p));
                match made {
                    Ok(p) => Ok(p),
                    Err(e) => {
                        let _ = self.remove(name);
                        Err(e)
                    }
                }
            }
        }
    }

    /// Where the cache `name` is (it must exist for lvm).
    pub fn path_of(&self, name: &str) -> Result<PathBuf> {
        match self.conf.ls_mad {
            LsMad::Lvm => self.lv_path(name),
            _ => Ok(Path::new(&self.conf.ls_path).join(format!("{name}.cache"))),
        }
    }

    fn lv_path(&self, name: &str) -> Result<PathBuf> {
        let lv = format!("{}/{name}", self.conf.ls_path);
        let out = self
            .conf
            .lvs
            .run(&["--noheadings", "-o", "lv_path", lv.as_str()])?;
        let p = out.trim();
        if !p.starts_with('/') {
            return Err(Error::Server(format!("lvs {lv}: no path in '{p}'")));
        }
        Ok(PathBuf::from(p))
    }

    /// Remove the cache `name`; a missing one is fine.
    pub fn remove(&self, name: &str) -> Result<()> {
        match self.conf.ls_mad {
            LsMad::Dummy => Ok(()),
            LsMad::File => {
                let p = Path::new(&self.conf.ls_path).join(format!("{name}.cache"));
                match std::fs::remove_file(&p) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(Error::io(format!("removing {}", p.display()), e)),
                }
            }
            LsMad::Lvm => {
                let lv = format!("{}/{name}", self.conf.ls_path);
                let out = self.conf.lvremove.output(&["-f", lv.as_str()])?;
                if out.status.success() {
                    return Ok(());
                }
                let err = String::from_utf8_lossy(&out.stderr);
                if err.contains("Failed to find logical volume") || err.contains("not found") {
                    return Ok(());
                }
                Err(self.conf.lvremove.failure(&["-f", lv.as_str()], &out))
            }
        }
    }
}

/// Zero the first MiB: ublk-cache formats a cache whose first MiB is empty
/// without being asked, and refuses one that holds something else.
pub fn wipe_head(path: &Path) -> Result<()> {
    let mut f: File = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_at(format!(
            "opening {} to clear its head",
            path.display()
        )))?;
    f.write_all(&vec![0u8; MIB as usize])
        .and_then(|()| f.sync_all())
        .map_err(io_at(format!(
            "clearing the first MiB of {}",
            path.display()
        )))
}

/// `  1020.00   512.00` (vg_size vg_free in MB).
fn parse_vgs(out: &str) -> Option<Capacity> {
    let mut it = out.split_whitespace();
    let size: f64 = it.next()?.replace(',', ".").parse().ok()?;
    let free: f64 = it.next()?.replace(',', ".").parse().ok()?;
    Some(Capacity {
        total_mb: size as u64,
        free_mb: free as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(ls: &Path) -> HostConf {
        HostConf::parse(
            Path::new("/t"),
            &format!("LS_MAD=file\nLS_PATH={}\n", ls.display()),
        )
        .unwrap()
    }

    #[test]
    fn file_caches_are_reserved_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let c = conf(d.path());
        let s = Store::new(&c);
        let before = s.capacity().unwrap();
        assert!(before.total_mb > 0);
        let p = s.create("one-1-0", 8).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 8 * MIB);
        use std::os::unix::fs::MetadataExt;
        assert!(m.blocks() * 512 >= 8 * MIB, "fallocated, not sparse");
        assert!(
            s.create("one-1-0", 8).is_err(),
            "an existing cache is never overwritten"
        );
        s.remove("one-1-0").unwrap();
        s.remove("one-1-0").unwrap();
        assert!(!p.exists());
    }

    #[test]
    fn vgs_output() {
        assert_eq!(
            parse_vgs("  1020.00   512,50\n"),
            Some(Capacity {
                total_mb: 1020,
                free_mb: 512
            })
        );
        assert_eq!(parse_vgs("garbage"), None);
    }
}
