//! Checks of every name and path that reaches root from oneadmin's input
//! (arguments and XML): VM and disk ids, host names, RBD image names, the
//! system datastore path of a disk. Anything else is refused.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `pool/image`, both of `[A-Za-z0-9._-]`, not starting with `-` or `.`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdName {
    pub pool: String,
    pub image: String,
}

fn rbd_word(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(['-', '.'])
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

impl RbdName {
    pub fn parse(what: &str, s: &str) -> Result<RbdName> {
        match s.split_once('/') {
            Some((p, i)) if rbd_word(p) && rbd_word(i) => Ok(RbdName {
                pool: p.to_string(),
                image: i.to_string(),
            }),
            _ => Err(Error::Attribute(format!(
                "{what}='{s}' is not an RBD image name POOL/IMAGE (letters, digits, '.', '_', '-')"
            ))),
        }
    }

    /// An OpenNebula image of the ceph datastore: `POOL/one-ID`.
    pub fn parse_source(s: &str) -> Result<RbdName> {
        let n = Self::parse("SOURCE", s)?;
        let ok = n
            .image
            .strip_prefix("one-")
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err(Error::Attribute(format!(
                "SOURCE='{s}' is not an image of OpenNebula's ceph datastore (POOL/one-ID)"
            )));
        }
        Ok(n)
    }

    /// The non-persistent copy, named as OpenNebula's ceph TM names it:
    /// `POOL/one-IMG-VMID-DISKID`.
    pub fn clone_for(&self, vm: u32, disk: u32) -> RbdName {
        RbdName {
            pool: self.pool.clone(),
            image: format!("{}-{vm}-{disk}", self.image),
        }
    }

    pub fn with_snap(&self, snap: &str) -> String {
        format!("{self}@{snap}")
    }
}

impl std::fmt::Display for RbdName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pool, self.image)
    }
}

/// A host name as OpenNebula and ssh take it.
pub fn check_host(h: &str) -> Result<&str> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && !h.starts_with(['-', '.'])
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(h)
    } else {
        Err(Error::Usage(format!("'{h}' is not a host name")))
    }
}

/// An OpenNebula id (VM, disk, datastore, snapshot).
pub fn check_id(what: &str, s: &str) -> Result<u32> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::Usage(format!("{what} '{s}' is not an id")));
    }
    s.parse()
        .map_err(|_| Error::Usage(format!("{what} '{s}' is not an id")))
}

/// `host:path` as oned writes transfer arguments; a bare path has no host.
pub fn split_host_path(arg: &str) -> (Option<&str>, &str) {
    match arg.split_once(':') {
        Some((h, p)) if !h.contains('/') => (Some(h), p),
        _ => (None, arg),
    }
}

/// Squeezes `//` (oned writes `/var/lib/one//datastores/...`) and drops a
/// trailing `/`, like OpenNebula's `fix_dir_slashes`.
pub fn fix_slashes(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    if out.len() > 1 && out.ends_with('/') {
        out.pop();
    }
    out
}

/// A VM's directory in a system datastore, `DSLOC/<ds>/<vm>`, parsed and
/// checked against the datastore location of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysDir {
    pub path: PathBuf,
    pub ds: u32,
    pub vm: u32,
}

impl SysDir {
    /// `path` must be exactly `<location>/<ds>/<vm>` (after `//` squeezing).
    pub fn parse(location: &Path, path: &str) -> Result<SysDir> {
        let p = fix_slashes(path);
        let loc = location.to_string_lossy();
        let bad = || {
            Error::Usage(format!(
                "'{path}' is not a VM directory {loc}/<datastore>/<vm>"
            ))
        };
        let rest = p
            .strip_prefix(loc.as_ref())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [ds, vm] = parts[..] else {
            return Err(bad());
        };
        Ok(SysDir {
            path: PathBuf::from(&p),
            ds: check_id("datastore", ds).map_err(|_| bad())?,
            vm: check_id("VM", vm).map_err(|_| bad())?,
        })
    }
}

/// A disk's path `<sysdir>/disk.<n>`: the system dir and the disk id.
pub fn parse_disk_path(location: &Path, path: &str) -> Result<(SysDir, u32)> {
    let p = fix_slashes(path);
    let bad = || Error::Usage(format!("'{path}' is not a disk path <VM dir>/disk.<id>"));
    let (dir, file) = p.rsplit_once('/').ok_or_else(bad)?;
    let id = file.strip_prefix("disk.").ok_or_else(bad)?;
    let id = check_id("disk", id).map_err(|_| bad())?;
    Ok((SysDir::parse(location, dir)?, id))
}

/// Whether a path argument names a disk (`.../disk.N`), as tm_common's `is_disk`.
pub fn is_disk_path(path: &str) -> bool {
    fix_slashes(path)
        .rsplit_once('/')
        .and_then(|(_, f)| f.strip_prefix("disk."))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbd_names() {
        let s = RbdName::parse_source("one/one-5").unwrap();
        assert_eq!(s.clone_for(42, 0).to_string(), "one/one-5-42-0");
        for bad in [
            "one",
            "one/",
            "/one-5",
            "one/one-x",
            "one/two-5",
            "o ne/one-5",
            "one/one-5;rm",
        ] {
            assert!(RbdName::parse_source(bad).is_err(), "{bad}");
        }
        assert!(RbdName::parse("POOL_NAME", "-x/y").is_err());
    }

    #[test]
    fn paths() {
        let loc = Path::new("/var/lib/one/datastores");
        let (d, n) = parse_disk_path(loc, "/var/lib/one//datastores/100/42/disk.3").unwrap();
        assert_eq!((d.ds, d.vm, n), (100, 42, 3));
        assert_eq!(d.path, PathBuf::from("/var/lib/one/datastores/100/42"));
        for bad in [
            "/var/lib/one/datastores/100/42/disk.x",
            "/var/lib/one/datastores/100/42/../disk.0",
            "/etc/100/42/disk.0",
            "/var/lib/one/datastores/100/disk.0",
            "/var/lib/one/datastores/100/42/x/disk.0",
        ] {
            assert!(parse_disk_path(loc, bad).is_err(), "{bad}");
        }
        assert_eq!(split_host_path("host1:/a/b"), (Some("host1"), "/a/b"));
        assert_eq!(split_host_path("one/one-5"), (None, "one/one-5"));
        assert!(
            is_disk_path("/x/42/disk.0") && !is_disk_path("/x/42") && !is_disk_path("/x/disk.")
        );
        assert!(check_host("host-1.example").is_ok() && check_host("a;b").is_err());
        assert!(check_id("VM", "12").is_ok() && check_id("VM", "-1").is_err());
    }
}
