//! The link chain libvirt follows: `SYSDIR/disk.N -> LINK_DIR/V-N -> /dev/ublkbM`
//! (or the NBD socket). The middle link is host-local and at the same path on
//! every host, so the VM directory (with its disk.N links) can be copied
//! between hosts unchanged; only the middle link differs per host.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{io_at, Error, Result};

/// `LINK_DIR/V-N`.
pub fn middle_link(link_dir: &Path, vm: u32, disk: u32) -> PathBuf {
    link_dir.join(format!("{vm}-{disk}"))
}

/// Make `link` point to `target`, replacing what is there, atomically (a
/// reader sees the old or the new link, never none).
pub fn replace(target: &Path, link: &Path) -> Result<()> {
    let dir = link
        .parent()
        .ok_or_else(|| Error::Usage(format!("{} has no parent directory", link.display())))?;
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(io_at(format!("creating {}", dir.display())))?;
    }
    let tmp = dir.join(format!(
        ".{}.ublkc-tmp",
        link.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io_at(format!(
        "linking {} to {}",
        tmp.display(),
        target.display()
    )))?;
    // The VM directory belongs to oneadmin: so does the link (it can then
    // remove the directory, e.g. in `mv`, without root).
    if let Ok(m) = std::fs::metadata(dir) {
        let _ = std::os::unix::fs::lchown(&tmp, Some(m.uid()), Some(m.gid()));
    }
    std::fs::rename(&tmp, link).map_err(io_at(format!("replacing {}", link.display())))
}

/// Remove `link` if it is a symlink to `target` (anything else is left alone:
/// it is not ours).
pub fn remove_if_to(link: &Path, target: &Path) -> Result<()> {
    match std::fs::read_link(link) {
        Ok(t) if t == target => {
            std::fs::remove_file(link).map_err(io_at(format!("removing {}", link.display())))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_and_remove() {
        let d = tempfile::tempdir().unwrap();
        let l = d.path().join("vm/disk.0");
        replace(Path::new("/dev/ublkb3"), &l).unwrap();
        assert_eq!(
            std::fs::read_link(&l).unwrap(),
            PathBuf::from("/dev/ublkb3")
        );
        replace(Path::new("/dev/ublkb4"), &l).unwrap();
        assert_eq!(
            std::fs::read_link(&l).unwrap(),
            PathBuf::from("/dev/ublkb4")
        );
        remove_if_to(&l, Path::new("/dev/ublkb3")).unwrap();
        assert!(l.symlink_metadata().is_ok(), "not ours: kept");
        remove_if_to(&l, Path::new("/dev/ublkb4")).unwrap();
        assert!(l.symlink_metadata().is_err());
        remove_if_to(&l, Path::new("/dev/ublkb4")).unwrap();
    }
}
