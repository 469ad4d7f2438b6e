//! `/etc/ublk-cache/one.conf`: what this host offers (local cache space, how
//! servers are launched and exported, defaults). Root owns it; the probe
//! mirrors it into the host's monitoring so the scheduler can use it. Paths
//! of local storage only ever come from here, never from oneadmin's input.
//!
//! Shell-style `KEY=VALUE` lines (optionally quoted), `#` comments. Unknown
//! keys are refused, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::attrs::{CacheMode, OneMode, OneOrder, WritebackOrder};
use crate::cmd::Tool;
use crate::error::{Error, Result};

/// Where the file is unless `$UBLKC_CONF` names another (sudo resets the
/// environment, so oneadmin cannot point root at a file of its own).
pub const DEFAULT_PATH: &str = "/etc/ublk-cache/one.conf";

/// How the local cache space is provisioned (the feature request's LS_MAD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LsMad {
    /// A file per cache under LS_PATH (a directory), made sparse, then fallocated.
    File,
    /// A logical volume per cache in the volume group LS_PATH.
    Lvm,
    /// No local storage: every disk is served with CACHE_MODE=NONE.
    Dummy,
}

impl LsMad {
    pub fn as_str(self) -> &'static str {
        match self {
            LsMad::File => "file",
            LsMad::Lvm => "lvm",
            LsMad::Dummy => "dummy",
        }
    }
}

/// How a per-disk server is started and kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Launcher {
    /// `ublk-cache@one-V-N.service`, enabled: back after a reboot.
    Systemd,
    /// A detached process (tests, hosts without systemd): not back after a reboot.
    Exec,
}

/// What the device is exported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Export {
    /// `/dev/ublkbN`: what libvirt's `<disk type='block'>` opens (production).
    Ublk,
    /// An NBD unix socket per disk (kernels without ublk; the CI harness).
    /// `disk.N` then leads to the socket, which libvirt cannot open as a block
    /// device: this is a test mode, not a production one.
    Nbd,
}

#[derive(Debug, Clone)]
pub struct HostConf {
    /// The file this came from (for messages).
    pub path: PathBuf,
    pub ls_mad: LsMad,
    pub ls_path: String,
    /// MB one cache may take at most (0: no limit beyond the store).
    pub ls_max_mb: u64,
    /// MB all caches may take together (0: the whole filesystem or VG).
    pub ls_total_max_mb: u64,
    pub launcher: Launcher,
    pub export: Export,
    pub datastore_location: PathBuf,
    pub state_dir: PathBuf,
    pub link_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Where the helper writes each unit's drop-in (its boot check).
    pub systemd_dir: PathBuf,
    pub ublk_cache: Tool,
    pub default_mode: CacheMode,
    pub default_cache_mb: u64,
    pub default_preload_mb: u64,
    pub preload_rate_mb: u64,
    /// MB/s of background write-back per disk (0: unlimited).
    pub writeback_rate_mb: u64,
    pub writeback_order: WritebackOrder,
    /// CACHE_WRITEBACK_LOW for disks that set none (`None`: the controller off).
    pub writeback_low_pct: Option<u8>,
    pub wait_live_s: u64,
    pub stop_timeout_s: u64,
    /// Directories CEPH_CONF and CEPH_KEY may be in: root reads them on
    /// oneadmin's (or a VM owner's) word, so nothing else is opened.
    pub ceph_paths: Vec<PathBuf>,
    pub rbd: Tool,
    pub ceph: Tool,
    pub lvcreate: Tool,
    pub lvremove: Tool,
    pub lvs: Tool,
    pub vgs: Tool,
    pub systemctl: Tool,
    pub journalctl: Tool,
}

const KEYS: &[&str] = &[
    "LS_MAD",
    "LS_PATH",
    "LS_MAX",
    "LS_TOTAL_MAX_MB",
    "LAUNCHER",
    "EXPORT",
    "DATASTORE_LOCATION",
    "STATE_DIR",
    "LINK_DIR",
    "CONF_DIR",
    "RUN_DIR",
    "SYSTEMD_DIR",
    "UBLK_CACHE",
    "DEFAULT_MODE",
    "DEFAULT_CACHE_MB",
    "DEFAULT_PRELOAD_MB",
    "PRELOAD_RATE_MB",
    "WRITEBACK_RATE_MB",
    "WRITEBACK_ORDER",
    "WRITEBACK_LOW",
    "WAIT_LIVE_S",
    "STOP_TIMEOUT_S",
    "CEPH_PATHS",
    "RBD",
    "CEPH",
    "LVCREATE",
    "LVREMOVE",
    "LVS",
    "VGS",
    "SYSTEMCTL",
    "JOURNALCTL",
];

impl HostConf {
    /// The host's config: `$UBLKC_CONF` or /etc/ublk-cache/one.conf.
    pub fn load() -> Result<HostConf> {
        let path = std::env::var_os("UBLKC_CONF")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Config {
            path: path.clone(),
            msg: format!(
                "cannot read it ({e}); every ublk_cache host needs one (contrib/opennebula/host/one.conf.example)"
            ),
        })?;
        Self::parse(&path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<HostConf> {
        let bad = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let mut kv: BTreeMap<String, String> = BTreeMap::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(bad(format!(
                    "line {}: expected KEY=VALUE, got '{line}'",
                    n + 1
                )));
            };
            let k = k.trim();
            if !KEYS.contains(&k) {
                return Err(bad(format!(
                    "line {}: unknown key {k} (known: {})",
                    n + 1,
                    KEYS.join(", ")
                )));
            }
            let v = unquote(v.trim()).ok_or_else(|| {
                bad(format!(
                    "line {}: unbalanced quotes in the value of {k}",
                    n + 1
                ))
            })?;
            kv.insert(k.to_string(), v);
        }
        let get = |k: &str| kv.get(k).map(String::as_str);
        let num = |k: &str, default: u64| -> Result<u64> {
            match get(k) {
                None | Some("") => Ok(default),
                Some(v) => v
                    .parse()
                    .map_err(|_| bad(format!("{k}={v} is not a whole number"))),
            }
        };
        let ls_mad = match get("LS_MAD")
            .unwrap_or("dummy")
            .to_ascii_lowercase()
            .as_str()
        {
            "file" => LsMad::File,
            "lvm" => LsMad::Lvm,
            "dummy" => LsMad::Dummy,
            other => return Err(bad(format!("LS_MAD={other}: use file, lvm or dummy"))),
        };
        let ls_path = get("LS_PATH").unwrap_or("").to_string();
        match ls_mad {
            LsMad::File if !ls_path.starts_with('/') => {
                return Err(bad(format!(
                    "LS_MAD=file needs LS_PATH, an absolute directory (got '{ls_path}')"
                )))
            }
            LsMad::Lvm if !valid_vg(&ls_path) => {
                return Err(bad(format!(
                    "LS_MAD=lvm needs LS_PATH, a volume group name (got '{ls_path}')"
                )))
            }
            _ => {}
        }
        let launcher = match get("LAUNCHER").unwrap_or("systemd") {
            "systemd" => Launcher::Systemd,
            "exec" => Launcher::Exec,
            other => return Err(bad(format!("LAUNCHER={other}: use systemd or exec"))),
        };
        let export = match get("EXPORT").unwrap_or("ublk") {
            "ublk" => Export::Ublk,
            "nbd" => Export::Nbd,
            other => return Err(bad(format!("EXPORT={other}: use ublk or nbd"))),
        };
        let abs = |k: &str, default: &str| -> Result<PathBuf> {
            let v = get(k).filter(|v| !v.is_empty()).unwrap_or(default);
            if !v.starts_with('/') || v.contains("/../") || v.ends_with("/..") {
                return Err(bad(format!(
                    "{k}={v} must be an absolute path without '..'"
                )));
            }
            Ok(PathBuf::from(v.trim_end_matches('/')))
        };
        let state_dir = abs("STATE_DIR", "/var/lib/ublk-cache/one")?;
        let link_default = format!("{}/dev", state_dir.display());
        let tool =
            |k: &str, default: &str| Tool::new(get(k).filter(|v| !v.is_empty()).unwrap_or(default));
        let default_mode = match get("DEFAULT_MODE") {
            None | Some("") => CacheMode::Through,
            Some(v) => CacheMode::parse(v).map_err(|e| bad(format!("DEFAULT_MODE: {e}")))?,
        };
        let writeback_order = match get("WRITEBACK_ORDER") {
            None | Some("") => WritebackOrder::Ordered,
            Some(v) => {
                WritebackOrder::parse(v).map_err(|e| bad(format!("WRITEBACK_ORDER: {e}")))?
            }
        };
        let writeback_low_pct = match get("WRITEBACK_LOW") {
            None | Some("") => None,
            Some(v) => crate::attrs::parse_writeback_low("WRITEBACK_LOW", v)
                .map_err(|e| bad(e.to_string()))?,
        };
        Ok(HostConf {
            path: path.to_path_buf(),
            ls_mad,
            ls_path,
            ls_max_mb: num("LS_MAX", 0)?,
            ls_total_max_mb: num("LS_TOTAL_MAX_MB", 0)?,
            launcher,
            export,
            datastore_location: abs("DATASTORE_LOCATION", "/var/lib/one/datastores")?,
            link_dir: abs("LINK_DIR", &link_default)?,
            state_dir,
            conf_dir: abs("CONF_DIR", "/etc/ublk-cache")?,
            run_dir: abs("RUN_DIR", "/run/ublk-cache")?,
            systemd_dir: abs("SYSTEMD_DIR", "/etc/systemd/system")?,
            ublk_cache: tool("UBLK_CACHE", default_ublk_cache()),
            default_mode,
            default_cache_mb: num("DEFAULT_CACHE_MB", 10240)?,
            default_preload_mb: num("DEFAULT_PRELOAD_MB", 0)?,
            preload_rate_mb: num("PRELOAD_RATE_MB", 100)?,
            writeback_rate_mb: num("WRITEBACK_RATE_MB", 0)?,
            writeback_order,
            writeback_low_pct,
            wait_live_s: num("WAIT_LIVE_S", 150)?.max(1),
            stop_timeout_s: num("STOP_TIMEOUT_S", 0)?,
            ceph_paths: get("CEPH_PATHS")
                .unwrap_or("/etc/ceph")
                .split_whitespace()
                .map(|d| {
                    if d.starts_with('/') && !d.split('/').any(|c| c == "..") {
                        Ok(PathBuf::from(d))
                    } else {
                        Err(bad(format!(
                            "CEPH_PATHS: '{d}' is not an absolute directory"
                        )))
                    }
                })
                .collect::<Result<Vec<_>>>()?,
            rbd: tool("RBD", "rbd"),
            ceph: tool("CEPH", "ceph"),
            lvcreate: tool("LVCREATE", "lvcreate"),
            lvremove: tool("LVREMOVE", "lvremove"),
            lvs: tool("LVS", "lvs"),
            vgs: tool("VGS", "vgs"),
            systemctl: tool("SYSTEMCTL", "systemctl"),
            journalctl: tool("JOURNALCTL", "journalctl"),
        })
    }
}

/// `"x"`, `'x'` or `x`; `None` for unbalanced quotes.
fn unquote(v: &str) -> Option<String> {
    for q in ['"', '\''] {
        if let Some(rest) = v.strip_prefix(q) {
            return rest.strip_suffix(q).map(str::to_string);
        }
    }
    if v.ends_with(['"', '\'']) {
        return None;
    }
    Some(v.to_string())
}

/// A volume group name as LVM accepts it.
pub fn valid_vg(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.len() <= 127
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c))
}

/// The server binary when one.conf names none: a hand-installed one
/// (contrib/opennebula/install.sh --host puts it in /usr/local/bin) before the
/// Debian package's, the order of sudo's secure_path.
fn default_ublk_cache() -> &'static str {
    const LOCAL: &str = "/usr/local/bin/ublk-cache";
    if Path::new(LOCAL).exists() {
        LOCAL
    } else {
        "/usr/bin/ublk-cache"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<HostConf> {
        HostConf::parse(Path::new("/etc/ublk-cache/one.conf"), t)
    }

    #[test]
    fn defaults_and_values() {
        let c = parse("# host 1\nLS_MAD=file\nLS_PATH=\"/srv/cache\"\nLS_MAX=40960\nEXPORT=nbd\nLAUNCHER='exec'\nRBD=/opt/rbd --cluster x\n").unwrap();
        assert_eq!(c.ls_mad, LsMad::File);
        assert_eq!(c.ls_path, "/srv/cache");
        assert_eq!(c.ls_max_mb, 40960);
        assert_eq!(c.export, Export::Nbd);
        assert_eq!(c.launcher, Launcher::Exec);
        assert_eq!(c.rbd.0, ["/opt/rbd", "--cluster", "x"]);
        assert_eq!(c.link_dir, PathBuf::from("/var/lib/ublk-cache/one/dev"));
        assert_eq!(c.default_mode, CacheMode::Through);
        assert_eq!(c.ceph_paths, [PathBuf::from("/etc/ceph")]);
        let d = parse("").unwrap();
        assert_eq!(d.ls_mad, LsMad::Dummy);
        assert_eq!(d.launcher, Launcher::Systemd);
        assert_eq!(d.export, Export::Ublk);
    }

    #[test]
    fn mistakes_are_named() {
        for (t, want) in [
            ("LS_MAD=zfs", "LS_MAD=zfs"),
            ("LS_MAD=file", "needs LS_PATH"),
            ("LS_MAD=lvm\nLS_PATH=/dev/vg", "volume group"),
            ("LS_MAX=10G", "LS_MAX=10G is not a whole number"),
            ("LS_MAXX=1", "unknown key LS_MAXX"),
            ("STATE_DIR=rel", "absolute"),
            ("LS_PATH=\"/x", "unbalanced"),
            ("junk", "expected KEY=VALUE"),
            ("DEFAULT_MODE=fast", "DEFAULT_MODE"),
        ] {
            let e = parse(t).unwrap_err().to_string();
            assert!(e.contains(want), "{t}: {e}");
        }
    }
}
