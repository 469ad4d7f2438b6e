//! What one disk is and how it is served, decided from the DISK attributes,
//! the image datastore, the system datastore and this host's config. All
//! checks happen here, before anything is created.
//!
//! Precedence for CACHE_MODE, CACHE_SIZE, PRELOAD_SIZE, CACHE_WRITEBACK_ORDER,
//! CACHE_PRELOAD_RATE, CACHE_WRITEBACK_RATE, CACHE_WRITEBACK_LOW and
//! CACHE_BOOT_TRACE: the DISK (which oned fills from the image and the
//! image datastore through INHERIT_IMAGE_ATTR / INHERIT_DATASTORE_ATTR), then
//! the image datastore's template (in case oned.conf lacks the INHERIT lines),
//! then the system datastore's template, then one.conf, then the built-in
//! default.

use std::path::PathBuf;

use crate::attrs::{
    parse_boot_trace, parse_mb, parse_rate, parse_writeback_low, BootTraceMode, CacheMode, OneMode,
    OneOrder, WritebackOrder,
};
use crate::bundle::{Attrs, Bundle};
use crate::conf::{HostConf, LsMad};
use crate::error::{Error, Result};
use crate::names::RbdName;

/// How to reach Ceph, from the DISK (inherited from the image datastore).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ceph {
    pub user: Option<String>,
    /// CEPH_KEY: a file with the bare key (`rbd --keyfile`).
    pub key: Option<PathBuf>,
    pub conf: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Which RBD image, and how to reach Ceph.
    pub image: BackendRef,
    pub size_mb: u64,
    pub original_size_mb: Option<u64>,
    pub read_only: bool,
    pub mode: CacheMode,
    /// MB of local cache (0 for CACHE_MODE=NONE).
    pub cache_mb: u64,
    pub preload_mb: u64,
    /// MB/s of preload and offline hydration (0: unlimited).
    pub preload_rate_mb: u64,
    pub order: WritebackOrder,
    /// MB/s that background write-back may send to the image (0: unlimited).
    pub writeback_rate_mb: u64,
    /// Percent of the cache write-back may leave dirty at its minimum rate
    /// (the dirty-level controller; `None`: off).
    pub writeback_low_pct: Option<u8>,
    /// Learned boot preload (`--boot-trace`), and the key of the trace: the
    /// image's, so that every VM's clone of one image learns and replays one
    /// trace (`None`: the server's default, its own RBD image).
    pub boot_trace: BootTraceMode,
    pub boot_trace_key: Option<String>,
}

/// MB of cache that hold a whole disk of `size_mb` (OFFLINE): the data, plus an
/// upper bound of ublk-cache's metadata at 64 KiB lines (superblocks and the
/// line table before the 1 MiB-aligned data area, at most 64 bytes a line),
/// plus one MiB of slack. Checked against the real layout in the tests.
pub fn whole_disk_cache_mb(size_mb: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    let lines = (size_mb * MIB).div_ceil(64 << 10);
    let table = (lines * 64).div_ceil(4096) * 4096;
    let data_offset = (64 * 1024 + table).div_ceil(MIB) * MIB;
    data_offset / MIB + size_mb + 1
}

/// Which RBD image a disk is and how to reach it: all that removing,
/// copying, snapshotting or resizing it needs. Unlike [`resolve`] it does not
/// look at the cache attributes, so a disk whose attach was refused for a bad
/// CACHE_MODE can still be deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRef {
    pub vm: u32,
    pub disk: u32,
    pub source: RbdName,
    pub clone: bool,
    pub backend: RbdName,
    pub ceph: Ceph,
    pub trash: bool,
    pub ec_pool: Option<String>,
}

pub fn backend_of(
    b: &Bundle,
    vm_id: u32,
    disk_id: u32,
    system_ds: Option<u32>,
) -> Result<BackendRef> {
    let d = disk_attrs(b, vm_id, disk_id)?;
    let attr = |msg: String| Error::Attribute(format!("DISK {disk_id}: {msg}"));
    let source = d.get("SOURCE").ok_or_else(|| {
        Error::Refused(format!(
            "DISK {disk_id} has no SOURCE: volatile disks are not supported by ublk_cache in this version"
        ))
    })?;
    let source = RbdName::parse_source(source)?;
    let clone = d.yes("CLONE");
    let backend = if clone {
        source.clone_for(vm_id, disk_id)
    } else {
        source.clone()
    };
    let path_attr = |k: &str| -> Result<Option<PathBuf>> {
        match d.get(k) {
            None => Ok(None),
            Some(v) if v.starts_with('/') && !v.contains("/../") && !v.contains('\n') => {
                Ok(Some(PathBuf::from(v)))
            }
            Some(v) => Err(attr(format!("{k}='{v}' must be an absolute path"))),
        }
    };
    let user = match d.get("CEPH_USER") {
        None => None,
        Some(u)
            if u.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) =>
        {
            Some(u.to_string())
        }
        Some(u) => return Err(attr(format!("CEPH_USER='{u}' is not a Ceph client name"))),
    };
    let ceph = Ceph {
        user,
        key: path_attr("CEPH_KEY")?,
        conf: path_attr("CEPH_CONF")?,
    };
    let trash = d
        .get("CEPH_TRASH")
        .is_some_and(|v| matches!(v, "yes" | "YES" | "true" | "TRUE"));
    let system = system_ds
        .and_then(|i| b.datastore(i))
        .map(|ds| &ds.template);
    let ec_pool = match system.and_then(|t| t.get("EC_POOL_NAME")) {
        None => None,
        Some(p) => Some(RbdName::parse("EC_POOL_NAME", &format!("{p}/x"))?.pool),
    };
    Ok(BackendRef {
        vm: vm_id,
        disk: disk_id,
        source,
        clone,
        backend,
        ceph,
        trash,
        ec_pool,
    })
}

/// The DISK of VM `vm_id` with DISK_ID `disk_id` in the bundle.
fn disk_attrs(b: &Bundle, vm_id: u32, disk_id: u32) -> Result<&Attrs> {
    let vm = b.vm()?;
    if vm.id != vm_id {
        return Err(Error::Xml(format!(
            "the XML describes VM {}, not VM {vm_id}",
            vm.id
        )));
    }
    vm.disk(disk_id)
        .ok_or_else(|| Error::Xml(format!("VM {vm_id} has no DISK with DISK_ID={disk_id}")))
}

impl Ceph {
    /// CEPH_CONF and CEPH_KEY must be files in one of `allowed` (after
    /// resolving links): the helper and the server read them as root.
    pub fn check_paths(&self, allowed: &[PathBuf]) -> Result<()> {
        for (name, p) in [("CEPH_CONF", &self.conf), ("CEPH_KEY", &self.key)] {
            let Some(p) = p else { continue };
            let real = std::fs::canonicalize(p)
                .map_err(|e| Error::Attribute(format!("{name}={}: {e}", p.display())))?;
            if !allowed.iter().any(|d| real.starts_with(d)) || !real.is_file() {
                return Err(Error::Refused(format!(
                    "{name}={} is not a file in this host's CEPH_PATHS ({}); the helper reads only those as root",
                    p.display(),
                    allowed.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" ")
                )));
            }
        }
        Ok(())
    }
}

/// The layered attribute lookup.
struct Layers<'a> {
    disk: &'a Attrs,
    image_ds: Option<&'a Attrs>,
    system_ds: Option<&'a Attrs>,
}

impl<'a> Layers<'a> {
    /// The value and where it came from.
    fn get(&self, k: &str) -> Option<(&'a str, &'static str)> {
        self.disk
            .get(k)
            .map(|v| (v, "DISK"))
            .or_else(|| {
                self.image_ds
                    .and_then(|t| t.get(k))
                    .map(|v| (v, "image datastore"))
            })
            .or_else(|| {
                self.system_ds
                    .and_then(|t| t.get(k))
                    .map(|v| (v, "system datastore"))
            })
    }
}

/// `notes` collects what the VM log should say (INFO lines).
pub fn resolve(
    b: &Bundle,
    conf: &HostConf,
    vm_id: u32,
    disk_id: u32,
    system_ds: Option<u32>,
    notes: &mut Vec<String>,
) -> Result<DiskSpec> {
    let d = disk_attrs(b, vm_id, disk_id)?;
    let attr = |msg: String| Error::Attribute(format!("DISK {disk_id}: {msg}"));
    let ty = d.get("TYPE").unwrap_or("").to_ascii_uppercase();
    if d.get("SOURCE").is_none() {
        return Err(Error::Refused(format!(
            "DISK {disk_id} has no SOURCE: volatile disks (TYPE={ty}) are not supported by ublk_cache in this version"
        )));
    }
    let cdrom = ty == "CDROM";
    match ty.as_str() {
        "BLOCK" => {}
        "CDROM"
            if d.get("DISK_TYPE")
                .is_some_and(|t| t.eq_ignore_ascii_case("BLOCK")) => {}
        _ => {
            return Err(Error::Refused(format!(
            "DISK {disk_id} has TYPE={ty}{}: ublk_cache serves disks that libvirt opens as block \
                 devices (TYPE=BLOCK). Give the image datastore TM_MAD=ublk_cache with TM_MAD_CONF \
                 DISK_TYPE=\"BLOCK\" in oned.conf (or DISK_TYPE=BLOCK in the datastore), so that \
                 libvirt never bypasses the cache",
            d.get("DISK_TYPE")
                .map(|t| format!(" (DISK_TYPE={t})"))
                .unwrap_or_default()
        )))
        }
    }
    let image = backend_of(b, vm_id, disk_id, system_ds)?;
    let size_mb: u64 = d
        .get("SIZE")
        .ok_or_else(|| attr("no SIZE".into()))?
        .parse()
        .map_err(|_| {
            attr(format!(
                "SIZE='{}' is not a number of MB",
                d.get("SIZE").unwrap_or("")
            ))
        })?;
    if size_mb == 0 {
        return Err(attr("SIZE=0".into()));
    }
    let original_size_mb = match d.get("ORIGINAL_SIZE") {
        Some(v) => Some(
            v.parse()
                .map_err(|_| attr(format!("ORIGINAL_SIZE='{v}' is not a number of MB")))?,
        ),
        None => None,
    };
    let read_only = cdrom || d.yes("READONLY");
    if d.yes("SHAREABLE") && !read_only {
        return Err(Error::Refused(format!(
            "DISK {disk_id} is SHAREABLE and writable: a local cache on each host of the VMs that \
             share it could not stay coherent; use it READONLY=YES, or from a ceph datastore"
        )));
    }
    let image_ds = d
        .get("DATASTORE_ID")
        .and_then(|i| i.parse::<u32>().ok())
        .and_then(|i| b.datastore(i))
        .map(|ds| &ds.template);
    let system = system_ds
        .and_then(|i| b.datastore(i))
        .map(|ds| &ds.template);
    let layers = Layers {
        disk: d,
        image_ds,
        system_ds: system,
    };

    // The mode.
    let (mut mode, mode_from) = match layers.get("CACHE_MODE") {
        Some((v, from)) => (
            CacheMode::parse(v).map_err(|e| attr(format!("CACHE_MODE {e} (from the {from})")))?,
            from,
        ),
        None => (conf.default_mode, "host default"),
    };
    if read_only && mode.holds_dirty() {
        notes.push(format!(
            "DISK {disk_id} is read-only: CACHE_MODE={} ({mode_from}) served as THRU (writes cannot be kept)",
            mode.one()
        ));
        mode = CacheMode::Through;
    }
    if conf.ls_mad == LsMad::Dummy && mode.uses_cache() {
        notes.push(format!(
            "DISK {disk_id}: this host has no local cache storage (LS_MAD=dummy): CACHE_MODE={} served as NONE",
            mode.one()
        ));
        mode = CacheMode::None;
    }

    // The cache size.
    let whole = whole_disk_cache_mb(size_mb);
    let asked = match layers.get("CACHE_SIZE") {
        Some((v, from)) => Some((
            parse_mb("CACHE_SIZE", v, false).map_err(|e| attr(format!("{e} (from the {from})")))?,
            from,
        )),
        None => None,
    };
    let ls_max = conf.ls_max_mb;
    let cache_mb = if !mode.uses_cache() {
        0
    } else if mode == CacheMode::Offline {
        if let Some((mb, from)) = asked {
            if mb < size_mb {
                return Err(attr(format!(
                    "CACHE_MODE=OFFLINE keeps the whole disk in the cache, but CACHE_SIZE={mb} MB (from the \
                     {from}) is smaller than the disk (SIZE={size_mb} MB); give CACHE_SIZE of at least \
                     {whole} MB (disk plus metadata) or leave it unset"
                )));
            }
        }
        let mb = asked.map_or(whole, |(mb, _)| mb.max(whole));
        if ls_max > 0 && mb > ls_max {
            return Err(Error::Refused(format!(
                "DISK {disk_id}: CACHE_MODE=OFFLINE needs {mb} MB of cache for a {size_mb} MB disk, more than \
                 this host's LS_MAX={ls_max} MB"
            )));
        }
        mb
    } else {
        match asked {
            Some((mb, from)) => {
                if ls_max > 0 && mb > ls_max {
                    return Err(Error::Refused(format!(
                        "DISK {disk_id}: CACHE_SIZE={mb} MB (from the {from}) exceeds this host's LS_MAX={ls_max} MB"
                    )));
                }
                if mb > whole {
                    notes.push(format!(
                        "DISK {disk_id}: CACHE_SIZE={mb} MB is more than the {size_mb} MB disk needs; using {whole} MB"
                    ));
                }
                mb.min(whole)
            }
            None => {
                let mut mb = conf.default_cache_mb.min(whole);
                if ls_max > 0 {
                    mb = mb.min(ls_max);
                }
                mb.max(2)
            }
        }
    };

    let preload_mb = match layers.get("PRELOAD_SIZE") {
        Some((v, from)) => {
            parse_mb("PRELOAD_SIZE", v, true).map_err(|e| attr(format!("{e} (from the {from})")))?
        }
        None => conf.default_preload_mb,
    };
    let preload_mb = if mode.uses_cache() {
        if preload_mb > size_mb {
            notes.push(format!(
                "DISK {disk_id}: PRELOAD_SIZE={preload_mb} MB is more than the disk; preloading all {size_mb} MB"
            ));
        }
        preload_mb.min(size_mb).min(cache_mb)
    } else {
        0
    };
    let preload_rate_mb = match layers.get("CACHE_PRELOAD_RATE") {
        Some((v, from)) => parse_rate("CACHE_PRELOAD_RATE", v)
            .map_err(|e| attr(format!("{e} (from the {from})")))?,
        None => conf.preload_rate_mb,
    };
    let order = match layers.get("CACHE_WRITEBACK_ORDER") {
        Some((v, from)) => WritebackOrder::parse(v)
            .map_err(|e| attr(format!("CACHE_WRITEBACK_ORDER {e} (from the {from})")))?,
        None => conf.writeback_order,
    };
    let writeback_rate_mb = match layers.get("CACHE_WRITEBACK_RATE") {
        Some((v, from)) => parse_rate("CACHE_WRITEBACK_RATE", v)
            .map_err(|e| attr(format!("{e} (from the {from})")))?,
        None => conf.writeback_rate_mb,
    };
    let writeback_low_pct = match layers.get("CACHE_WRITEBACK_LOW") {
        Some((v, from)) => parse_writeback_low("CACHE_WRITEBACK_LOW", v)
            .map_err(|e| attr(format!("{e} (from the {from})")))?,
        None => conf.writeback_low_pct,
    };
    let asked = match layers.get("CACHE_BOOT_TRACE") {
        Some((v, from)) => parse_boot_trace("CACHE_BOOT_TRACE", v)
            .map_err(|e| attr(format!("{e} (from the {from})")))?,
        None => BootTraceMode::Off,
    };
    // Prefetch needs a cache to fetch into; recording does not.
    let boot_trace = match asked {
        BootTraceMode::Replay | BootTraceMode::Auto if !mode.uses_cache() => {
            let served = if asked == BootTraceMode::Auto {
                BootTraceMode::Record
            } else {
                BootTraceMode::Off
            };
            notes.push(format!(
                "DISK {disk_id}: CACHE_BOOT_TRACE={} prefetches into the cache, and CACHE_MODE={} has none: served as {}",
                asked.to_string().to_ascii_uppercase(),
                mode.one(),
                served.to_string().to_ascii_uppercase()
            ));
            served
        }
        m => m,
    };
    let boot_trace_key = match layers.disk.get("IMAGE_ID").map(str::parse::<u32>) {
        // And its size: clones are grown to their DISK's SIZE, and a trace of
        // a larger disk is not used (it would be set aside at every boot).
        Some(Ok(id)) if boot_trace != BootTraceMode::Off => {
            Some(format!("one-image-{id}-{size_mb}M"))
        }
        _ => None,
    };
    Ok(DiskSpec {
        image,
        size_mb,
        original_size_mb,
        read_only,
        mode,
        cache_mb,
        preload_mb,
        preload_rate_mb,
        order,
        writeback_rate_mb,
        writeback_low_pct,
        boot_trace,
        boot_trace_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn conf(extra: &str) -> HostConf {
        HostConf::parse(
            Path::new("/t/one.conf"),
            &format!("LS_MAD=file\nLS_PATH=/srv/ls\nLS_MAX=1000\n{extra}"),
        )
        .unwrap()
    }

    fn bundle(disk: &str, image_ds: &str, system_ds: &str) -> Bundle {
        Bundle::parse(&format!(
            "<ONE><VM><ID>7</ID><STATE>3</STATE><LCM_STATE>1</LCM_STATE><TEMPLATE>\
             <DISK><DISK_ID>0</DISK_ID><SOURCE>one/one-5</SOURCE><SIZE>256</SIZE>\
             <ORIGINAL_SIZE>256</ORIGINAL_SIZE><DATASTORE_ID>101</DATASTORE_ID>{disk}</DISK>\
             </TEMPLATE></VM>\
             <DATASTORE><ID>101</ID><TEMPLATE>{image_ds}</TEMPLATE></DATASTORE>\
             <DATASTORE><ID>100</ID><TEMPLATE>{system_ds}</TEMPLATE></DATASTORE></ONE>"
        ))
        .unwrap()
    }

    fn spec(disk: &str, c: &HostConf) -> Result<(DiskSpec, Vec<String>)> {
        let mut notes = Vec::new();
        let b = bundle(&format!("<TYPE>BLOCK</TYPE>{disk}"), "", "");
        resolve(&b, c, 7, 0, Some(100), &mut notes).map(|s| (s, notes))
    }

    #[test]
    fn whole_disk_size_covers_the_real_layout() {
        for size_mb in [1u64, 2, 63, 64, 65, 256, 1000, 4096, 20480, 102400] {
            let mb = whole_disk_cache_mb(size_mb);
            let l = ublk_cache::format::Layout::for_cache(64 << 10, mb << 20).unwrap();
            assert!(
                l.nr_lines * (64 << 10) >= size_mb << 20,
                "{size_mb} MB disk: {mb} MB cache holds only {} lines",
                l.nr_lines
            );
            assert!(
                mb <= size_mb + size_mb / 100 + 3,
                "{size_mb}: {mb} is too generous"
            );
        }
    }

    #[test]
    fn clone_names_and_defaults() {
        let c = conf("DEFAULT_CACHE_MB=128");
        let (s, notes) = spec("<CLONE>YES</CLONE>", &c).unwrap();
        assert_eq!(s.image.backend.to_string(), "one/one-5-7-0");
        assert_eq!(s.mode, CacheMode::Through);
        assert_eq!(s.cache_mb, 128);
        assert!(notes.is_empty());
        let (s, _) = spec("<CLONE>NO</CLONE><CACHE_MODE>back</CACHE_MODE>", &c).unwrap();
        assert_eq!(s.image.backend.to_string(), "one/one-5");
        assert_eq!(s.mode, CacheMode::Back);
    }

    #[test]
    fn precedence_disk_image_ds_system_ds_host() {
        let c = conf("DEFAULT_MODE=AROUND");
        let mut n = Vec::new();
        for (disk, image_ds, system_ds, want) in [
            (
                "",
                "<CACHE_MODE>BACK</CACHE_MODE>",
                "<CACHE_MODE>NONE</CACHE_MODE>",
                CacheMode::Back,
            ),
            ("", "", "<CACHE_MODE>NONE</CACHE_MODE>", CacheMode::None),
            (
                "<CACHE_MODE>OFFLINE</CACHE_MODE>",
                "<CACHE_MODE>BACK</CACHE_MODE>",
                "",
                CacheMode::Offline,
            ),
            ("", "", "", CacheMode::Around),
        ] {
            let b = bundle(&format!("<TYPE>BLOCK</TYPE>{disk}"), image_ds, system_ds);
            let s = resolve(&b, &c, 7, 0, Some(100), &mut n).unwrap();
            assert_eq!(s.mode, want, "{disk} {image_ds} {system_ds}");
            assert_eq!(s.cache_mb == 0, want == CacheMode::None);
        }
    }

    /// A BACK disk resolved on a host with `host` in its one.conf, the DISK
    /// and the image datastore adding `disk` and `image_ds`.
    fn back_disk(host: &str, disk: &str, image_ds: &str) -> (HostConf, DiskSpec) {
        let c = conf(host);
        let b = bundle(
            &format!("<TYPE>BLOCK</TYPE><CACHE_MODE>BACK</CACHE_MODE>{disk}"),
            image_ds,
            "",
        );
        let s = resolve(&b, &c, 7, 0, Some(100), &mut Vec::new()).unwrap();
        (c, s)
    }

    #[test]
    fn the_write_back_rate_comes_from_the_disk_or_the_host() {
        for (host, disk, image_ds, want) in [
            ("", "", "", 0),
            ("WRITEBACK_RATE_MB=40", "", "", 40),
            (
                "WRITEBACK_RATE_MB=40",
                "",
                "<CACHE_WRITEBACK_RATE>25</CACHE_WRITEBACK_RATE>",
                25,
            ),
            (
                "WRITEBACK_RATE_MB=40",
                "<CACHE_WRITEBACK_RATE>50M/s</CACHE_WRITEBACK_RATE>",
                "<CACHE_WRITEBACK_RATE>25</CACHE_WRITEBACK_RATE>",
                50,
            ),
            (
                "WRITEBACK_RATE_MB=40",
                "<CACHE_WRITEBACK_RATE>0</CACHE_WRITEBACK_RATE>",
                "",
                0,
            ),
        ] {
            let (_, s) = back_disk(host, disk, image_ds);
            assert_eq!(s.writeback_rate_mb, want, "{host} {disk} {image_ds}");
        }
    }

    /// The record of VM 7's disk 0 as attach writes it, with a file cache.
    fn record(c: &HostConf, s: &DiskSpec) -> crate::state::DiskRecord {
        crate::state::DiskRecord {
            vm: 7,
            disk: 0,
            state: crate::state::DiskState::Attaching,
            backend: s.image.backend.to_string(),
            clone_created: false,
            read_only: false,
            mode: s.mode,
            ls: Some(crate::state::LsAlloc {
                mad: "file".into(),
                name: "one-7-0".into(),
                mb: s.cache_mb,
                path: "/srv/ls/one-7-0".into(),
            }),
            export: c.export,
            ublk_id: Some(3),
            socket: None,
            launcher: c.launcher,
            toml: "/etc/ublk-cache/one-7-0.toml".into(),
            link: "/l".into(),
            disk_links: Vec::new(),
            migrate_in: false,
            since: 0,
        }
    }

    #[test]
    fn the_dirty_level_controller_comes_from_the_disk_or_the_host() {
        for (host, disk, image_ds, want) in [
            ("", "", "", None),
            ("WRITEBACK_LOW=10%", "", "", Some(10)),
            (
                "WRITEBACK_LOW=10",
                "",
                "<CACHE_WRITEBACK_LOW>30</CACHE_WRITEBACK_LOW>",
                Some(30),
            ),
            (
                "WRITEBACK_LOW=10",
                "<CACHE_WRITEBACK_LOW>OFF</CACHE_WRITEBACK_LOW>",
                "<CACHE_WRITEBACK_LOW>30</CACHE_WRITEBACK_LOW>",
                None,
            ),
        ] {
            let (c, s) = back_disk(host, disk, image_ds);
            assert_eq!(s.writeback_low_pct, want, "{host} {disk} {image_ds}");
            // The server's config says so, in ublk-cache's own terms. This
            // test's ublk-cache is built without its RBD backend, which
            // refuses an rbd: backend by name; the rest is what is checked.
            let text = crate::server::server_toml(&c, &s, &record(&c, &s))
                .replace("\"rbd:one/one-5\"", "\"file:/one-5\"");
            let served = ublk_cache::daemon::config::ServeConfig::from_toml(&text, "t")
                .unwrap_or_else(|e| panic!("{e}:\n{text}"));
            assert_eq!(
                served
                    .dirty_level()
                    .unwrap()
                    .map(|l| (l.low_pct, l.high_pct)),
                want.map(|p| (p, 70)),
                "{text}"
            );
        }
    }

    #[test]
    fn boot_trace_is_keyed_by_the_image_and_needs_a_cache_to_prefetch() {
        let c = conf("");
        let on = "<IMAGE_ID>5</IMAGE_ID><CACHE_BOOT_TRACE>auto</CACHE_BOOT_TRACE>";
        let (s, _) = spec(&format!("{on}<CACHE_MODE>BACK</CACHE_MODE>"), &c).unwrap();
        assert_eq!(
            (s.boot_trace, s.boot_trace_key.as_deref()),
            (BootTraceMode::Auto, Some("one-image-5-256M"))
        );
        let (s, notes) = spec(&format!("{on}<CACHE_MODE>NONE</CACHE_MODE>"), &c).unwrap();
        assert_eq!(s.boot_trace, BootTraceMode::Record, "no cache: record only");
        assert!(
            notes
                .iter()
                .any(|n| n.contains("CACHE_BOOT_TRACE=AUTO prefetches into the cache")),
            "{notes:?}"
        );
        let (s, _) = spec("<IMAGE_ID>5</IMAGE_ID>", &c).unwrap();
        assert_eq!((s.boot_trace, s.boot_trace_key), (BootTraceMode::Off, None));
        // The server's config says so, in ublk-cache's own terms.
        let (c, s) = back_disk(
            "",
            "<IMAGE_ID>9</IMAGE_ID><CACHE_BOOT_TRACE>REPLAY</CACHE_BOOT_TRACE>",
            "",
        );
        let text = crate::server::server_toml(&c, &s, &record(&c, &s))
            .replace("\"rbd:one/one-5\"", "\"file:/one-5\"");
        let served = ublk_cache::daemon::config::ServeConfig::from_toml(&text, "t")
            .unwrap_or_else(|e| panic!("{e}:\n{text}"));
        assert_eq!(
            (served.boot_trace, served.boot_trace_key.as_deref()),
            (BootTraceMode::Replay, Some("one-image-9-256M")),
            "{text}"
        );
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let c = conf("");
        for (disk, want) in [
            (
                "<CACHE_MODE>FAST</CACHE_MODE>",
                "CACHE_MODE 'FAST' is not a cache mode",
            ),
            (
                "<CACHE_SIZE>2000</CACHE_SIZE>",
                "CACHE_SIZE=2000 MB (from the DISK) exceeds this host's LS_MAX=1000 MB",
            ),
            ("<CACHE_SIZE>lots</CACHE_SIZE>", "CACHE_SIZE='lots'"),
            (
                "<CACHE_MODE>OFFLINE</CACHE_MODE><CACHE_SIZE>100</CACHE_SIZE>",
                "smaller than the disk (SIZE=256 MB)",
            ),
            ("<PRELOAD_SIZE>-5</PRELOAD_SIZE>", "PRELOAD_SIZE='-5'"),
            (
                "<CACHE_WRITEBACK_ORDER>x</CACHE_WRITEBACK_ORDER>",
                "CACHE_WRITEBACK_ORDER",
            ),
            (
                "<CACHE_PRELOAD_RATE>fast</CACHE_PRELOAD_RATE>",
                "CACHE_PRELOAD_RATE",
            ),
            (
                "<CACHE_WRITEBACK_RATE>-1</CACHE_WRITEBACK_RATE>",
                "CACHE_WRITEBACK_RATE='-1'",
            ),
            (
                "<CACHE_WRITEBACK_LOW>80%</CACHE_WRITEBACK_LOW>",
                "CACHE_WRITEBACK_LOW='80%' is not OFF or a percentage of the cache below 70",
            ),
            ("<SHAREABLE>YES</SHAREABLE>", "SHAREABLE"),
            (
                "<CEPH_KEY>key</CEPH_KEY>",
                "CEPH_KEY='key' must be an absolute path",
            ),
        ] {
            let e = spec(disk, &c).unwrap_err().to_string();
            assert!(e.contains(want), "{disk}: {e}");
        }
        let c = conf("LS_MAX=200");
        let e = spec("<CACHE_MODE>OFFLINE</CACHE_MODE>", &c)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs 258 MB") && e.contains("LS_MAX=200"),
            "{e}"
        );
        let mut n = Vec::new();
        for (ty, want) in [
            ("<TYPE>RBD</TYPE>", "TYPE=RBD"),
            ("<TYPE>FILE</TYPE>", "TYPE=FILE"),
        ] {
            let b = bundle(ty, "", "");
            let e = resolve(&b, &c, 7, 0, None, &mut n).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("DISK_TYPE"), "{e}");
        }
    }

    #[test]
    fn ceph_files_only_from_the_allowed_directories() {
        let d = tempfile::tempdir().unwrap();
        let ok = d.path().join("ceph.conf");
        std::fs::write(&ok, "[global]\n").unwrap();
        let link = d.path().join("sneaky.conf");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let allowed = [d.path().to_path_buf()];
        let c = |conf: &Path| Ceph {
            conf: Some(conf.to_path_buf()),
            ..Ceph::default()
        };
        c(&ok).check_paths(&allowed).unwrap();
        for bad in [Path::new("/etc/passwd"), link.as_path(), d.path()] {
            let e = c(bad).check_paths(&allowed).unwrap_err().to_string();
            assert!(
                e.contains("CEPH_PATHS") || e.contains("No such"),
                "{bad:?}: {e}"
            );
        }
        let e = c(Path::new("/nonexistent/x"))
            .check_paths(&allowed)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CEPH_CONF=/nonexistent/x"), "{e}");
    }

    #[test]
    fn offline_read_only_dummy_and_preload() {
        let c = conf("");
        let (s, _) = spec("<CACHE_MODE>OFFLINE</CACHE_MODE>", &c).unwrap();
        assert_eq!(s.cache_mb, whole_disk_cache_mb(256));
        let (s, notes) = spec("<READONLY>YES</READONLY><CACHE_MODE>BACK</CACHE_MODE>", &c).unwrap();
        assert!(s.read_only && s.mode == CacheMode::Through, "{s:?}");
        assert!(notes[0].contains("read-only"), "{notes:?}");
        let d = conf("LS_MAD=dummy");
        let (s, notes) = spec("<CACHE_MODE>BACK</CACHE_MODE>", &d).unwrap();
        assert_eq!((s.mode, s.cache_mb), (CacheMode::None, 0));
        assert!(notes[0].contains("LS_MAD=dummy"));
        let (s, notes) = spec(
            "<PRELOAD_SIZE>1G</PRELOAD_SIZE><CACHE_SIZE>100</CACHE_SIZE>",
            &c,
        )
        .unwrap();
        assert_eq!(s.preload_mb, 100);
        assert!(notes[0].contains("PRELOAD_SIZE"));
        let mut n = Vec::new();
        let b = bundle("<TYPE>CDROM</TYPE><DISK_TYPE>BLOCK</DISK_TYPE>", "", "");
        assert!(resolve(&b, &c, 7, 0, None, &mut n).unwrap().read_only);
    }
}
