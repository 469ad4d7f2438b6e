//! The RBD operations of OpenNebula's ceph TM (`tm/ceph/*` and
//! `datastore/ceph/ceph_utils.sh`), done the same way with the `rbd` CLI and
//! the same names: `@snap` as the protected base of non-persistent clones,
//! `POOL/one-IMG-VM-DISK` for the clone, `rbd_rm_r`'s order for removal.

use serde::Deserialize;

use crate::cmd::Tool;
use crate::disk::Ceph;
use crate::error::{Error, Result};
use crate::names::RbdName;

/// The base snapshot OpenNebula clones non-persistent disks from.
pub const BASE_SNAP: &str = "snap";

pub struct Rbd {
    tool: Tool,
    /// `--id U --keyfile K --conf C`, as ceph's TM builds `$RBD`.
    auth: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct Info {
    pub size: u64,
    pub format: u32,
    pub parent: Option<Parent>,
}

#[derive(Debug, Deserialize)]
pub struct Parent {
    pub pool: String,
    pub image: String,
    pub snapshot: String,
}

#[derive(Debug, Deserialize)]
pub struct Snap {
    pub name: String,
    /// "true"/"false" in rbd's JSON.
    pub protected: String,
}

#[derive(Debug, Deserialize)]
struct Child {
    pool: String,
    image: String,
}

impl Rbd {
    /// The `rbd` of one.conf with the disk's credentials, which must lie in
    /// one of the host's CEPH_PATHS.
    pub fn new(tool: &Tool, ceph: &Ceph, allowed: &[std::path::PathBuf]) -> Result<Rbd> {
        ceph.check_paths(allowed)?;
        Ok(Rbd {
            tool: tool.clone(),
            auth: auth_args(ceph),
        })
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let mut a: Vec<&str> = self.auth.iter().map(String::as_str).collect();
        a.extend_from_slice(args);
        self.tool.run(&a)
    }

    /// `None` when the image does not exist.
    pub fn info(&self, name: &RbdName) -> Result<Option<Info>> {
        let n = name.to_string();
        let mut a: Vec<&str> = self.auth.iter().map(String::as_str).collect();
        a.extend_from_slice(&["info", "--format", "json", &n]);
        let out = self.tool.output(&a)?;
        if !out.status.success() {
            if String::from_utf8_lossy(&out.stderr).contains("(2) No such file or directory") {
                return Ok(None);
            }
            return Err(self.tool.failure(&a, &out));
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| Error::Server(format!("rbd info {n}: unexpected output ({e})")))
    }

    /// `rbd image-meta get`; `None` when the key is not set.
    pub fn image_meta(&self, name: &RbdName, key: &str) -> Result<Option<String>> {
        let n = name.to_string();
        let mut a: Vec<&str> = self.auth.iter().map(String::as_str).collect();
        a.extend_from_slice(&["image-meta", "get", &n, key]);
        let out = self.tool.output(&a)?;
        if !out.status.success() {
            if String::from_utf8_lossy(&out.stderr).contains("(2) No such file or directory") {
                return Ok(None);
            }
            return Err(self.tool.failure(&a, &out));
        }
        Ok(Some(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }

    pub fn snaps(&self, name: &RbdName) -> Result<Vec<Snap>> {
        let out = self.run(&["snap", "ls", "--format", "json", &name.to_string()])?;
        serde_json::from_str(&out)
            .map_err(|e| Error::Server(format!("rbd snap ls {name}: unexpected output ({e})")))
    }

    pub fn has_snap(&self, name: &RbdName, snap: &str) -> Result<bool> {
        Ok(self.snaps(name)?.iter().any(|s| s.name == snap))
    }

    pub fn snap_create(&self, name: &RbdName, snap: &str, protect: bool) -> Result<()> {
        let s = name.with_snap(snap);
        self.run(&["snap", "create", "--no-progress", &s])?;
        if protect {
            self.run(&["snap", "protect", &s])?;
        }
        Ok(())
    }

    /// Unprotect (if protected) and remove; a missing snapshot is fine.
    pub fn snap_remove(&self, name: &RbdName, snap: &str) -> Result<()> {
        let Some(s) = self.snaps(name)?.into_iter().find(|s| s.name == snap) else {
            return Ok(());
        };
        let full = name.with_snap(snap);
        if s.protected == "true" {
            self.run(&["snap", "unprotect", &full])?;
        }
        self.run(&["snap", "rm", "--no-progress", &full])?;
        Ok(())
    }

    pub fn rollback(&self, name: &RbdName, snap: &str) -> Result<()> {
        self.run(&["snap", "rollback", "--no-progress", &name.with_snap(snap)])?;
        Ok(())
    }

    /// ceph_utils.sh `rbd_make_snap`: a protected `@snap` on a format-2 image.
    /// Clones of one image may be made at once (parallel deploys, on one host
    /// or several): losing the race to create or protect it is fine.
    pub fn make_base_snap(&self, src: &RbdName, info: &Info) -> Result<()> {
        if info.format != 2 {
            return Ok(());
        }
        let full = src.with_snap(BASE_SNAP);
        let find = || -> Result<Option<Snap>> {
            Ok(self.snaps(src)?.into_iter().find(|s| s.name == BASE_SNAP))
        };
        if find()?.is_none() {
            if let Err(e) = self.run(&["snap", "create", "--no-progress", &full]) {
                if find()?.is_none() {
                    return Err(e);
                }
            }
        }
        if find()?.is_some_and(|s| s.protected != "true") {
            if let Err(e) = self.run(&["snap", "protect", &full]) {
                if find()?.is_none_or(|s| s.protected != "true") {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// ceph/clone: `rbd clone SRC@snap DST` (format 2) or `rbd copy`, then
    /// `rbd resize` when the disk was made larger than the image.
    pub fn clone_image(
        &self,
        src: &RbdName,
        dst: &RbdName,
        data_pool: Option<&str>,
        resize_mb: Option<u64>,
    ) -> Result<()> {
        let info = self
            .info(src)?
            .ok_or_else(|| Error::Refused(format!("the image {src} does not exist in Ceph")))?;
        self.make_base_snap(src, &info)?;
        let d = dst.to_string();
        let mut args: Vec<String> = Vec::new();
        if let Some(p) = data_pool {
            args.extend(["--data-pool".to_string(), p.to_string()]);
        }
        if info.format == 2 {
            args.extend(["clone".into(), src.with_snap(BASE_SNAP), d.clone()]);
        } else {
            args.extend([
                "copy".into(),
                "--no-progress".into(),
                src.to_string(),
                d.clone(),
            ]);
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&a)?;
        if let Some(mb) = resize_mb {
            if let Err(e) = self.resize(dst, mb) {
                let _ = self.remove_recursive(dst, false);
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn resize(&self, name: &RbdName, mb: u64) -> Result<()> {
        self.run(&[
            "resize",
            "--no-progress",
            "--size",
            &format!("{mb}M"),
            &name.to_string(),
        ])?;
        Ok(())
    }

    pub fn copy(&self, src: &str, dst: &RbdName, data_pool: Option<&str>) -> Result<()> {
        let d = dst.to_string();
        let mut a = vec!["copy", "--no-progress"];
        if let Some(p) = data_pool {
            a.extend(["--data-pool", p]);
        }
        a.extend([src, d.as_str()]);
        self.run(&a)?;
        Ok(())
    }

    fn children(&self, name: &RbdName, snap: &str) -> Result<Vec<RbdName>> {
        let out = self.run(&["children", "--format", "json", &name.with_snap(snap)])?;
        let c: Vec<Child> = serde_json::from_str(&out)
            .map_err(|e| Error::Server(format!("rbd children: unexpected output ({e})")))?;
        Ok(c.into_iter()
            .map(|c| RbdName {
                pool: c.pool,
                image: c.image,
            })
            .collect())
    }

    /// ceph_utils.sh `rbd_rm_r`: children of every snapshot first, then every
    /// snapshot (OpenNebula's protected ones and ublk-cache's change markers),
    /// then the image; with CEPH_TRASH it is flattened and moved to the trash.
    /// A missing image is fine (DELETE runs again after a failure).
    pub fn remove_recursive(&self, name: &RbdName, trash: bool) -> Result<()> {
        if self.info(name)?.is_none() {
            return Ok(());
        }
        if trash {
            self.run(&["flatten", "--no-progress", &name.to_string()])?;
            self.run(&["trash", "move", &name.to_string()])?;
            return Ok(());
        }
        for s in self.snaps(name)? {
            if s.protected == "true" {
                for c in self.children(name, &s.name)? {
                    self.remove_recursive(&c, false)?;
                }
            }
            self.snap_remove(name, &s.name)?;
        }
        self.run(&["rm", "--no-progress", &name.to_string()])?;
        Ok(())
    }
}

pub fn auth_args(ceph: &Ceph) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(u) = &ceph.user {
        a.extend(["--id".to_string(), u.clone()]);
    }
    if let Some(k) = &ceph.key {
        a.extend(["--keyfile".to_string(), k.display().to_string()]);
    }
    if let Some(c) = &ceph.conf {
        a.extend(["--conf".to_string(), c.display().to_string()]);
    }
    a
}
