//! `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]` and the connection options.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Which image (or snapshot) to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    pub pool: String,
    /// A RADOS namespace inside the pool, if any.
    pub namespace: Option<String>,
    pub image: String,
    /// A snapshot: served read-only.
    pub snap: Option<String>,
}

impl RbdSpec {
    /// Parses `POOL/IMAGE`, `POOL/NAMESPACE/IMAGE`, each optionally with `@SNAP`
    /// (without the `rbd:` prefix).
    pub fn parse(s: &str) -> Result<RbdSpec, String> {
        let (path, snap) = match s.split_once('@') {
            Some((p, snap)) => {
                if snap.is_empty() || snap.contains(['@', '/']) {
                    return Err(format!("rbd:{s}: bad snapshot name '{snap}'"));
                }
                (p, Some(snap.to_string()))
            }
            None => (s, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) || !(2..=3).contains(&parts.len()) {
            return Err(format!(
                "rbd:{s}: expected rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE, optionally with @SNAP"
            ));
        }
        if s.contains('\0') {
            return Err(format!("rbd:{s}: contains a NUL byte"));
        }
        let (pool, namespace, image) = match parts[..] {
            [p, i] => (p, None, i),
            [p, n, i] => (p, Some(n.to_string()), i),
            _ => unreachable!("length checked above"),
        };
        Ok(RbdSpec {
            pool: pool.to_string(),
            namespace,
            image: image.to_string(),
            snap,
        })
    }

    /// `pool/[namespace/]image`, without the snapshot.
    pub fn image_path(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}/{}", self.pool, self.image),
            None => format!("{}/{}", self.pool, self.image),
        }
    }
}

impl fmt::Display for RbdSpec {
    /// `pool/[namespace/]image[@snap]`: the backend's name in the cache superblock.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.image_path())?;
        if let Some(s) = &self.snap {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

/// How to reach the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdOptions {
    /// ceph.conf to read; `None` uses librados' search ($CEPH_CONF, /etc/ceph/ceph.conf).
    pub conf: Option<PathBuf>,
    /// Client name without `client.` (default `admin`).
    pub id: String,
    /// Keyring file; `None` takes the one ceph.conf names (or the default places).
    pub keyring: Option<PathBuf>,
    /// A file holding only the client's key (librados' `keyfile`, what
    /// `rbd --keyfile` and OpenNebula's CEPH_KEY name), instead of a keyring.
    pub keyfile: Option<PathBuf>,
    /// Seconds to wait for the monitors at connect (librados' client_mount_timeout).
    pub connect_timeout_secs: u32,
    /// How long one I/O request (read, write, flush, discard, write-zeroes) may
    /// wait for the cluster before it fails with EIO; `None` waits forever.
    /// A request that times out is abandoned, not cancelled: it may still
    /// complete later (see the ffi module).
    pub io_timeout: Option<Duration>,
    /// How long to wait at open for the image's exclusive lock (a dead holder
    /// loses it when its watch expires, `osd_client_watch_timeout`, 30 s by
    /// default); `None` waits forever.
    pub lock_timeout: Option<Duration>,
    /// Live-migration destination: do not take the exclusive lock at open (the
    /// source still writes); take it at the first write instead, waiting up to
    /// `lock_timeout` for the source to stop writing.
    pub defer_lock: bool,
    /// Open the image read-only, without its exclusive lock and without the
    /// owner record (CD-ROMs and images several VMs read at once): every
    /// modifying request fails with `ErrorKind::ReadOnly`.
    pub read_only: bool,
}

/// The default of [`RbdOptions::io_timeout`] (and of `--backend-timeout`).
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The default of [`RbdOptions::lock_timeout`]: twice the default watch timeout.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for RbdOptions {
    fn default() -> Self {
        Self {
            conf: None,
            id: "admin".into(),
            keyring: None,
            keyfile: None,
            connect_timeout_secs: 30,
            io_timeout: Some(DEFAULT_IO_TIMEOUT),
            lock_timeout: Some(DEFAULT_LOCK_TIMEOUT),
            defer_lock: false,
            read_only: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let s = RbdSpec::parse("rbd/one-7").unwrap();
        assert_eq!((s.pool.as_str(), s.image.as_str()), ("rbd", "one-7"));
        assert_eq!(s.namespace, None);
        assert_eq!(s.snap, None);
        assert_eq!(s.to_string(), "rbd/one-7");
        let s = RbdSpec::parse("pool/ns/img@snap1").unwrap();
        assert_eq!(s.namespace.as_deref(), Some("ns"));
        assert_eq!(s.snap.as_deref(), Some("snap1"));
        assert_eq!(s.to_string(), "pool/ns/img@snap1");
        assert_eq!(s.image_path(), "pool/ns/img");
        for bad in ["img", "/img", "pool/", "a/b/c/d", "p/i@", "p/i@a@b", "p//i"] {
            assert!(RbdSpec::parse(bad).is_err(), "{bad} must be refused");
        }
    }
}
