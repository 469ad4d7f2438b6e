//! The host verbs, each a whole TM step on one host, run as root. Every verb
//! is idempotent (oned retries, `delete_both` runs DELETE twice, failmigrate
//! runs after a premigrate that failed anywhere), and `attach` undoes what it
//! did when a later step fails: no RBD clone, cache, unit, toml or link is
//! left behind by a failed attach.

use std::path::{Path, PathBuf};

use crate::attrs::OneMode;
use crate::bundle::Bundle;
use crate::conf::{Export, HostConf, LsMad};
use crate::disk::{self, BackendRef, DiskSpec};
use crate::error::{Error, Result};
use crate::links;
use crate::log::{info, warn};
use crate::ls::{self, Store};
use crate::names::{parse_disk_path, RbdName};
use crate::rbd::{Rbd, BASE_SNAP};
use crate::server::{Servers, Stopped};
use crate::state::{disk_name, now, DiskRecord, DiskState, LsAlloc, State};

/// How `attach` finds the RBD image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachAction {
    /// CLONE (non-persistent): create `POOL/one-IMG-VM-DISK` unless it exists.
    Clone,
    /// LN (persistent): serve the image itself; its `@snap` is removed first,
    /// as OpenNebula's ceph TM does.
    Ln,
    /// A cold move in (resume, cold migration): the image exists already.
    Resume,
    /// A live-migration destination: exists already; served cold, the image's
    /// lock taken at the first write.
    MigrateIn,
}

pub struct Host {
    pub conf: HostConf,
    pub state: State,
}

/// One step to take back: what it is (for the message) and how.
type UndoStep<'a> = (String, Box<dyn FnOnce() -> Result<()> + 'a>);

/// Steps to take back if a later one fails, newest first.
struct Undo<'a> {
    steps: Vec<UndoStep<'a>>,
}

impl<'a> Undo<'a> {
    fn new() -> Self {
        Undo { steps: Vec::new() }
    }

    fn push(&mut self, what: impl Into<String>, f: impl FnOnce() -> Result<()> + 'a) {
        self.steps.push((what.into(), Box::new(f)));
    }

    /// Run every step; the first failure is reported, the rest still run.
    fn run(self) {
        for (what, f) in self.steps.into_iter().rev() {
            if let Err(e) = f() {
                warn(&format!("undoing ({what}) failed: {e}; remove it by hand"));
            }
        }
    }

    fn forget(self) {}
}

impl Host {
    pub fn new(conf: HostConf) -> Result<Host> {
        let state = State::new(&conf)?;
        Ok(Host { conf, state })
    }

    fn servers(&self) -> Servers<'_> {
        Servers::new(&self.conf, &self.state)
    }

    fn store(&self) -> Store<'_> {
        Store::new(&self.conf)
    }

    /// Serve disk `disk` of VM `vm` and link `path` (SYSDIR/disk.N) to it.
    pub fn attach(
        &self,
        bundle: &Bundle,
        vm: u32,
        disk: u32,
        path: &str,
        action: AttachAction,
    ) -> Result<()> {
        let (sysdir, path_disk) = parse_disk_path(&self.conf.datastore_location, path)?;
        if sysdir.vm != vm || path_disk != disk {
            return Err(Error::Usage(format!(
                "{path} is not the path of VM {vm} disk {disk}"
            )));
        }
        let disk_link = sysdir.path.join(format!("disk.{disk}"));
        let mut notes = Vec::new();
        let spec = disk::resolve(bundle, &self.conf, vm, disk, Some(sysdir.ds), &mut notes)?;
        for n in &notes {
            info(n);
        }
        let _disk_lock = self.state.lock_disk(vm, disk)?;
        let name = disk_name(vm, disk);
        let servers = self.servers();

        // What this host already has for the disk.
        let mut reuse: Option<LsAlloc> = None;
        let mut old_id = None;
        let had_record = self.state.load(vm, disk)?;
        if let Some(rec) = had_record.clone() {
            if rec.backend != spec.image.backend.to_string() {
                return Err(Error::Refused(format!(
                    "{name} on this host serves {}, not {}; DELETE the old disk first",
                    rec.backend, spec.image.backend
                )));
            }
            old_id = rec.ublk_id;
            if rec.state == DiskState::Stale {
                let owner = self
                    .image_owner(&rec)
                    .unwrap_or_else(|| "another host".into());
                return Err(stale_error(&rec, &owner));
            }
            match rec.state {
                DiskState::Serving => {
                    let row = servers.find(&rec)?;
                    let migrated_out = match &row {
                        Some(_) => self.migrated_out(&rec)?,
                        None => false,
                    };
                    if row.is_some() && !migrated_out && action != AttachAction::MigrateIn {
                        // The same attach again (a retried prolog): nothing to do
                        // but the links.
                        self.link(&rec, &disk_link)?;
                        let mut rec = rec;
                        if !rec.disk_links.contains(&disk_link) {
                            rec.disk_links.push(disk_link.clone());
                            self.state.save(&rec)?;
                        }
                        info(&format!("{name} is already served on this host"));
                        self.print_attached(&rec)?;
                        return Ok(());
                    }
                    // A server left from an earlier stay (it was migrated away, or
                    // this is a migration destination again): stop it cleanly; its
                    // cache is kept, and ublk-cache drops its clean data at the next
                    // start (it handed the image over, or starts --migrate-in).
                    if row.is_some() {
                        info(&format!(
                            "stopping the server of {name} left from an earlier stay on this host"
                        ));
                        servers.stop(&rec, false)?;
                    } else if may_hold_dirty(&rec) {
                        if let Some(owner) = self.lost_to(&rec) {
                            return Err(self.mark_stale(&rec, &owner)?);
                        }
                        // Its server died: its cache may hold writes Ceph lacks. Serve
                        // it once as it was, so they are written back, before reuse.
                        info(&format!(
                            "the server of {name} is not running and its {} cache may hold writes not in \
                             Ceph: starting it once to write them back",
                            rec.mode.one()
                        ));
                        servers.start(&rec)?;
                        servers.stop(&rec, false)?;
                    }
                    reuse = self.keep_or_free(&rec, &spec)?;
                }
                DiskState::Parked => reuse = self.keep_or_free(&rec, &spec)?,
                DiskState::Stale => {
                    let owner = self
                        .image_owner(&rec)
                        .unwrap_or_else(|| "another host".into());
                    return Err(stale_error(&rec, &owner));
                }
                DiskState::Attaching => {
                    info(&format!(
                        "cleaning up an attach of {name} that did not finish (the helper was interrupted)"
                    ));
                    self.teardown(&rec, false, false)?;
                    self.release(&rec)?;
                }
            }
        }

        if had_record.is_some() && reuse.is_none() {
            // Its cache is freed: it must not count against the space below.
            self.state.remove(vm, disk)?;
        }

        // Accounting, allocation and the device id: briefly under the host lock.
        let mut rec = {
            let _host_lock = self.state.lock_host()?;
            let mut created = false;
            let ls = if !spec.mode.uses_cache() {
                None
            } else if let Some(l) = reuse.clone() {
                Some(l)
            } else {
                self.ensure_space(spec.cache_mb, vm, disk)?;
                let path = self.store().create(&name, spec.cache_mb)?;
                created = true;
                Some(LsAlloc {
                    mad: self.conf.ls_mad.as_str().into(),
                    name: name.clone(),
                    mb: spec.cache_mb,
                    path,
                })
            };
            let ublk_id = match self.conf.export {
                Export::Ublk => Some(match old_id {
                    Some(id) => id,
                    None => self.free_ublk_id()?,
                }),
                Export::Nbd => None,
            };
            let rec = DiskRecord {
                vm,
                disk,
                state: DiskState::Attaching,
                backend: spec.image.backend.to_string(),
                clone_created: false,
                read_only: spec.read_only,
                mode: spec.mode,
                ls,
                export: self.conf.export,
                ublk_id,
                socket: match self.conf.export {
                    Export::Nbd => Some(self.state.sock_dir().join(format!("{name}.sock"))),
                    Export::Ublk => None,
                },
                launcher: self.conf.launcher,
                toml: self.conf.conf_dir.join(format!("{name}.toml")),
                link: links::middle_link(&self.conf.link_dir, vm, disk),
                disk_links: vec![disk_link.clone()],
                migrate_in: action == AttachAction::MigrateIn,
                since: now(),
            };
            if let Err(e) = self.state.save(&rec) {
                if created {
                    let _ = self.store().remove(&name);
                }
                return Err(e);
            }
            if created {
                info(&format!(
                    "reserved {} MB of local cache for {name} ({})",
                    spec.cache_mb,
                    self.conf.ls_mad.as_str()
                ));
            }
            rec
        };
        let mut undo = Undo::new();
        {
            let rec0 = rec.clone();
            let reused = reuse.is_some();
            undo.push("the local cache and record", move || {
                if reused {
                    let mut r = rec0.clone();
                    r.state = DiskState::Parked;
                    r.disk_links.clear();
                    self.state.save(&r)
                } else {
                    if let Some(l) = &rec0.ls {
                        self.store().remove(&l.name)?;
                    }
                    self.state.remove(vm, disk)
                }
            });
        }

        match self.attach_steps(&spec, &mut rec, action, reuse.is_some(), &mut undo) {
            Ok(()) => {
                undo.forget();
                self.print_attached(&rec)?;
                Ok(())
            }
            Err(e) => {
                undo.run();
                Err(e)
            }
        }
    }

    fn attach_steps<'s>(
        &'s self,
        spec: &DiskSpec,
        rec: &mut DiskRecord,
        action: AttachAction,
        reused: bool,
        undo: &mut Undo<'s>,
    ) -> Result<()> {
        let name = rec.name();
        let rbd = Rbd::new(&self.conf.rbd, &spec.image.ceph, &self.conf.ceph_paths)?;
        match action {
            AttachAction::Clone => {
                if rbd.info(&spec.image.backend)?.is_some() {
                    info(&format!(
                        "{} exists already; serving it",
                        spec.image.backend
                    ));
                } else {
                    let grow = spec
                        .original_size_mb
                        .filter(|o| spec.size_mb > *o)
                        .map(|_| spec.size_mb);
                    rbd.clone_image(
                        &spec.image.source,
                        &spec.image.backend,
                        spec.image.ec_pool.as_deref(),
                        grow,
                    )?;
                    info(&format!(
                        "cloned {}@{BASE_SNAP} to {}",
                        spec.image.source, spec.image.backend
                    ));
                    rec.clone_created = true;
                    self.state.save(rec)?;
                    let backend = spec.image.backend.clone();
                    let ceph = spec.image.ceph.clone();
                    undo.push(format!("the RBD clone {backend}"), move || {
                        Rbd::new(&self.conf.rbd, &ceph, &self.conf.ceph_paths)?
                            .remove_recursive(&backend, false)
                    });
                }
            }
            AttachAction::Ln => {
                if rbd.info(&spec.image.source)?.is_none() {
                    return Err(Error::Refused(format!(
                        "the image {} does not exist in Ceph",
                        spec.image.source
                    )));
                }
                // tm/ceph/ln: "snapshot delete is mandatory as it could lead to data
                // loss after persistent/nonpersistent image switch".
                rbd.snap_remove(&spec.image.source, BASE_SNAP).map_err(|e| {
                    Error::Refused(format!(
                        "cannot remove {}@{BASE_SNAP} before serving the persistent image (clones of \
                         it still exist?): {e}",
                        spec.image.source
                    ))
                })?;
            }
            AttachAction::Resume | AttachAction::MigrateIn => {
                if rbd.info(&spec.image.backend)?.is_none() {
                    return Err(Error::Refused(format!(
                        "the RBD image {} of VM {} disk {} does not exist",
                        spec.image.backend, spec.image.vm, spec.image.disk
                    )));
                }
            }
        }
        if !reused && action != AttachAction::MigrateIn {
            // Change markers of caches kept on other hosts: this host serves the
            // disk now, so they could only cost copy-on-write; without them a kept
            // cache elsewhere starts cold if it is ever used again (never stale).
            for s in rbd.snaps(&spec.image.backend)? {
                if s.name.starts_with("ublk-cache-") && s.protected != "true" {
                    let _ = rbd.snap_remove(&spec.image.backend, &s.name);
                }
            }
        }
        crate::server::write_toml(&self.conf, spec, rec)?;
        {
            let toml = rec.toml.clone();
            undo.push(format!("{}", toml.display()), move || remove_file(&toml));
        }
        let servers = self.servers();
        let started = servers.start(rec);
        let started = match (started, reused, &rec.ls) {
            (Err(e), true, Some(ls)) if !rec.migrate_in => {
                // A kept cache that the server refuses (the image was resized or
                // recreated meanwhile): it held nothing dirty (parked after a clean
                // stop), so start afresh.
                info(&format!(
                    "the kept cache of {name} was refused ({e}); starting with an empty cache"
                ));
                ls::wipe_head(&ls.path)?;
                servers.start(rec)
            }
            (r, _, _) => r,
        };
        {
            let r = rec.clone();
            undo.push(format!("the server of {name}"), move || {
                self.servers().stop(&r, true).map(|_| ())
            });
        }
        started?;
        let target = Servers::target_of(rec)?;
        links::replace(&target, &rec.link)?;
        {
            let (l, t) = (rec.link.clone(), target.clone());
            undo.push(format!("{}", l.display()), move || {
                links::remove_if_to(&l, &t)
            });
        }
        for dl in rec.disk_links.clone() {
            links::replace(&rec.link, &dl)?;
            let (l, t) = (dl.clone(), rec.link.clone());
            undo.push(format!("{}", l.display()), move || {
                links::remove_if_to(&l, &t)
            });
        }
        rec.state = DiskState::Serving;
        rec.since = now();
        self.state.save(rec)?;
        // tm/ceph/clone's disable_local_monitoring: the datastore is monitored
        // centrally (SHARED=YES), not from this host.
        if let Some(ds_dir) = rec
            .disk_links
            .first()
            .and_then(|p| p.parent())
            .and_then(Path::parent)
        {
            let _ = std::fs::remove_file(ds_dir.join(".monitor"));
        }
        info(&format!(
            "{name}: {} served {} ({}{}), {} -> {}",
            spec.image.backend,
            spec.mode.one(),
            match &rec.ls {
                Some(l) => format!("{} MB cache", l.mb),
                None => "no cache".into(),
            },
            if spec.read_only { ", read-only" } else { "" },
            rec.link.display(),
            target.display()
        ));
        Ok(())
    }

    fn print_attached(&self, rec: &DiskRecord) -> Result<()> {
        println!(
            "DEVICE={} LINK={}{}",
            Servers::target_of(rec)?.display(),
            rec.link.display(),
            rec.ublk_id.map(|i| format!(" ID={i}")).unwrap_or_default()
        );
        Ok(())
    }

    /// Whether the running server of `rec` has run migrate-out.
    fn migrated_out(&self, rec: &DiskRecord) -> Result<bool> {
        let v = self.servers().control(rec, &["ctl", "stats"])?;
        Ok(v.get("migrated_out")
            .and_then(|m| m.as_bool())
            .unwrap_or(false))
    }

    /// A cleanly stopped disk's cache: kept when it fits the disk as now
    /// configured, freed otherwise (it holds nothing the image lacks).
    fn keep_or_free(&self, rec: &DiskRecord, spec: &DiskSpec) -> Result<Option<LsAlloc>> {
        let Some(ls) = &rec.ls else {
            return Ok(None);
        };
        let fits =
            spec.mode.uses_cache() && ls.mb == spec.cache_mb && ls.mad == self.conf.ls_mad.as_str();
        if fits {
            return Ok(Some(ls.clone()));
        }
        self.store().remove(&ls.name)?;
        info(&format!(
            "freed the old {} MB cache of {}",
            ls.mb,
            rec.name()
        ));
        Ok(None)
    }

    /// Under the host lock: is there `need` MB for a new cache? Parked caches
    /// (clean, kept for a warm return) are reclaimed, oldest first, if not.
    fn ensure_space(&self, need: u64, vm: u32, disk: u32) -> Result<()> {
        loop {
            let recs = self.state.all()?;
            let free = self.free_mb(&recs)?;
            if free >= need {
                return Ok(());
            }
            let victim = recs
                .iter()
                .filter(|r| r.state == DiskState::Parked && !(r.vm == vm && r.disk == disk))
                .filter(|r| r.ls.is_some())
                .min_by_key(|r| r.since);
            let Some(v) = victim else {
                return Err(Error::Refused(format!(
                    "not enough local cache space on this host for VM {vm} disk {disk}: {need} MB needed, \
                     {free} MB free (LS_MAD={}, LS_PATH={}{})",
                    self.conf.ls_mad.as_str(),
                    self.conf.ls_path,
                    if self.conf.ls_total_max_mb > 0 {
                        format!(", LS_TOTAL_MAX_MB={}", self.conf.ls_total_max_mb)
                    } else {
                        String::new()
                    }
                )));
            };
            info(&format!(
                "reclaiming the kept cache of {} ({} MB, parked since {})",
                v.name(),
                v.ls.as_ref().map_or(0, |l| l.mb),
                v.since
            ));
            self.release(v)?;
        }
    }

    /// MB a new cache can take now (parked caches not counted as free).
    fn free_mb(&self, recs: &[DiskRecord]) -> Result<u64> {
        let cap = self.store().capacity()?;
        let used: u64 = recs
            .iter()
            .filter_map(|r| r.ls.as_ref())
            .map(|l| l.mb)
            .sum();
        let mut free = cap.free_mb;
        if self.conf.ls_total_max_mb > 0 {
            free = free.min(self.conf.ls_total_max_mb.saturating_sub(used));
        }
        Ok(free)
    }

    /// The lowest ublk device id nobody uses (under the host lock).
    fn free_ublk_id(&self) -> Result<u32> {
        let recs = self.state.all()?;
        (0..1024u32)
            .find(|n| {
                !Path::new(&format!("/dev/ublkc{n}")).exists()
                    && !Path::new(&format!("/dev/ublkb{n}")).exists()
                    && !self.conf.run_dir.join(format!("{n}.json")).exists()
                    && !recs.iter().any(|r| r.ublk_id == Some(*n))
            })
            .ok_or_else(|| Error::Refused("no free ublk device id below 1024 on this host".into()))
    }

    fn link(&self, rec: &DiskRecord, disk_link: &Path) -> Result<()> {
        let target = Servers::target_of(rec)?;
        links::replace(&target, &rec.link)?;
        links::replace(&rec.link, disk_link)
    }

    /// Stop the server cleanly (restarting a crashed one first when its cache
    /// may hold writes the image lacks), then remove links, toml and unit.
    /// The cache and record stay. Errors leave everything in place. A crashed
    /// cache whose disk another host has served since is not restarted: it is
    /// kept as stale (`Ok(false)`).
    fn teardown(&self, rec: &DiskRecord, quiet: bool, keep_links: bool) -> Result<bool> {
        let servers = self.servers();
        if rec.state == DiskState::Stale {
            return Ok(false);
        }
        if rec.state != DiskState::Parked {
            let stopped = servers.stop(rec, true)?;
            if stopped == Stopped::NotRunning && may_hold_dirty(rec) {
                if let Some(owner) = self.lost_to(rec) {
                    warn(&self.mark_stale(rec, &owner)?.to_string());
                    return Ok(false);
                }
                info(&format!(
                    "the server of {} is not running and its {} cache may hold writes not in Ceph: starting \
                     it once to write them back",
                    rec.name(),
                    rec.mode.one()
                ));
                servers.start(rec)?;
                servers.stop(rec, true)?;
            } else if stopped == Stopped::Clean && !quiet {
                info(&format!(
                    "stopped the server of {} (everything written back to {})",
                    rec.name(),
                    rec.backend
                ));
            }
        }
        self.unlink(rec, keep_links)?;
        remove_file(&rec.toml)?;
        Ok(true)
    }

    /// The unit, the middle link and (unless kept) the disk links.
    fn unlink(&self, rec: &DiskRecord, keep_links: bool) -> Result<()> {
        self.servers().disable(rec);
        if let Ok(target) = Servers::target_of(rec) {
            links::remove_if_to(&rec.link, &target)?;
        }
        if !keep_links {
            for dl in &rec.disk_links {
                links::remove_if_to(dl, &rec.link)?;
            }
        }
        Ok(())
    }

    /// The host ublk-cache's owner record of the image names (`ublk-cache.owner`
    /// image metadata: `attached host=H ...` or `detached host=H ...`, written
    /// at every attach). `None`: it cannot be read.
    fn image_owner(&self, rec: &DiskRecord) -> Option<String> {
        let t: toml::Table = std::fs::read_to_string(&rec.toml).ok()?.parse().ok()?;
        let get = |k: &str| t.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let name = RbdName::parse("backend", get("backend")?.strip_prefix("rbd:")?).ok()?;
        let ceph = disk::Ceph {
            user: get("ceph-id"),
            key: get("ceph-keyfile").map(PathBuf::from),
            conf: get("ceph-conf").map(PathBuf::from),
        };
        let rbd = Rbd::new(&self.conf.rbd, &ceph, &self.conf.ceph_paths).ok()?;
        let owner = rbd.image_meta(&name, "ublk-cache.owner").ok()??;
        owner
            .split_whitespace()
            .find_map(|w| w.strip_prefix("host="))
            .map(str::to_string)
    }

    /// The other host that has served the disk since this host's server of it
    /// died. Only a positive answer counts: if the owner cannot be read, the
    /// image's exclusive lock still keeps an old cache off a disk in use.
    fn lost_to(&self, rec: &DiskRecord) -> Option<String> {
        let owner = self.image_owner(rec)?;
        (owner != this_host()).then_some(owner)
    }

    /// Keep `rec`'s cache, never to be served or written back, and say so.
    fn mark_stale(&self, rec: &DiskRecord, owner: &str) -> Result<Error> {
        let mut r = rec.clone();
        self.unlink(&r, true)?;
        r.state = DiskState::Stale;
        r.since = now();
        self.state.save(&r)?;
        Ok(stale_error(&r, owner))
    }

    /// Before a unit starts (ExecStartPre, a reboot included): refuse when the
    /// disk's cache is stale, or may hold writes while another host has served
    /// the disk since.
    pub fn boot_check(&self, vm: u32, disk: u32) -> Result<()> {
        // An action of the helper that holds the disk's lock is starting the
        // unit itself, and has made this check already.
        let Some(_disk_lock) = self.state.try_lock_disk(vm, disk)? else {
            return Ok(());
        };
        let Some(rec) = self.state.load(vm, disk)? else {
            return Ok(());
        };
        if rec.state == DiskState::Stale {
            return Err(stale_error(
                &rec,
                &self
                    .image_owner(&rec)
                    .unwrap_or_else(|| "another host".into()),
            ));
        }
        if may_hold_dirty(&rec) {
            if let Some(owner) = self.lost_to(&rec) {
                return Err(self.mark_stale(&rec, &owner)?);
            }
        }
        Ok(())
    }

    /// Drop a disk's cache without writing it back (a stale one, on the
    /// operator's word): the writes it holds are lost.
    pub fn discard(&self, vm: u32, disk: u32) -> Result<()> {
        let _disk_lock = self.state.lock_disk(vm, disk)?;
        let Some(rec) = self.state.load(vm, disk)? else {
            info(&format!(
                "{} has no cache on this host",
                disk_name(vm, disk)
            ));
            return Ok(());
        };
        if rec.state == DiskState::Serving && self.servers().find(&rec)?.is_some() {
            return Err(Error::Refused(format!(
                "{} is served on this host; detach it (its data is written back) instead of discarding",
                rec.name()
            )));
        }
        self.unlink(&rec, false)?;
        remove_file(&rec.toml)?;
        self.release(&rec)?;
        warn(&format!(
            "dropped the {} MB cache of {} without writing it back: the writes it held are lost",
            rec.ls.as_ref().map_or(0, |l| l.mb),
            rec.name()
        ));
        Ok(())
    }

    /// Free the cache and forget the disk.
    fn release(&self, rec: &DiskRecord) -> Result<()> {
        if let Some(l) = &rec.ls {
            self.store().remove(&l.name)?;
        }
        self.state.remove(rec.vm, rec.disk)
    }

    /// Stop serving the disk on this host. `park`: keep the cache for a warm
    /// return (undeploy, stop); otherwise it is freed. `keep_links`: leave
    /// SYSDIR/disk.N (the VM directory moves on with it).
    pub fn detach(&self, vm: u32, disk: u32, park: bool, keep_links: bool) -> Result<()> {
        let _disk_lock = self.state.lock_disk(vm, disk)?;
        let Some(mut rec) = self.state.load(vm, disk)? else {
            info(&format!(
                "{} is not attached on this host",
                disk_name(vm, disk)
            ));
            return Ok(());
        };
        if !self.teardown(&rec, false, keep_links)? {
            return Ok(());
        }
        if park && rec.ls.is_some() {
            rec.state = DiskState::Parked;
            rec.disk_links.clear();
            rec.migrate_in = false;
            rec.since = now();
            self.state.save(&rec)?;
            info(&format!(
                "kept the {} MB cache of {} for a warm return",
                rec.ls.as_ref().map_or(0, |l| l.mb),
                rec.name()
            ));
        } else {
            self.release(&rec)?;
            if let Some(l) = &rec.ls {
                info(&format!("freed the {} MB cache of {}", l.mb, rec.name()));
            }
        }
        Ok(())
    }

    /// Every disk of a VM on this host (DELETE of the VM directory).
    pub fn vm_cleanup(&self, vm: u32) -> Result<()> {
        let mut first_err = None;
        for r in self.state.all()?.into_iter().filter(|r| r.vm == vm) {
            if let Err(e) = self.detach(r.vm, r.disk, false, false) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Remove a non-persistent disk's clone (DELETE). Never a persistent image.
    pub fn delete_clone(&self, bundle: &Bundle, vm: u32, disk: u32) -> Result<()> {
        let r = disk::backend_of(bundle, vm, disk, None)?;
        if !r.clone {
            info(&format!("{} is persistent (CLONE=NO): kept", r.backend));
            return Ok(());
        }
        let _disk_lock = self.state.lock_disk(vm, disk)?;
        if let Some(rec) = self.state.load(vm, disk)? {
            if rec.state != DiskState::Parked {
                return Err(Error::Refused(format!(
                    "{} is still served on this host; it must be detached before its clone is removed",
                    rec.name()
                )));
            }
            self.release(&rec)?;
        }
        let rbd = match Rbd::new(&self.conf.rbd, &r.ceph, &self.conf.ceph_paths) {
            Ok(rbd) => rbd,
            Err(e) => {
                // The DISK's credentials never change during the VM's life, and an
                // attach refuses them before any clone is made: there is none.
                warn(&format!(
                    "{e}: no clone of {} was made with them; nothing to remove",
                    r.backend
                ));
                return Ok(());
            }
        };
        rbd.remove_recursive(&r.backend, r.trash)?;
        info(&format!(
            "removed {}{}",
            r.backend,
            if r.trash { " (to the trash)" } else { "" }
        ));
        // tm/ceph/delete: `rbd_rm_snap $SRC ||:`, the base snapshot when no
        // other clone needs it.
        if rbd.snap_remove(&r.source, BASE_SNAP).is_ok() {
            info(&format!(
                "removed {}@{BASE_SNAP} (no other clone uses it)",
                r.source
            ));
        }
        Ok(())
    }

    fn serving(&self, vm: u32, disk: u32) -> Result<DiskRecord> {
        match self.state.load(vm, disk)? {
            Some(r) if r.state == DiskState::Serving => Ok(r),
            _ => Err(Error::Refused(format!(
                "{} is not served on this host",
                disk_name(vm, disk)
            ))),
        }
    }

    /// Live migration, source side: write everything back, lend the image's lock.
    pub fn migrate_out(&self, vm: u32, disk: u32) -> Result<()> {
        let _disk_lock = self.state.lock_disk(vm, disk)?;
        let rec = self.serving(vm, disk)?;
        let v = self.servers().control(&rec, &["migrate-out"])?;
        info(&format!("{}: migrated out ({v})", rec.name()));
        Ok(())
    }

    /// Undo migrate-out (failmigrate); nothing to do if it was not run.
    pub fn migrate_abort(&self, vm: u32, disk: u32) -> Result<()> {
        let _disk_lock = self.state.lock_disk(vm, disk)?;
        let Some(rec) = self.state.load(vm, disk)? else {
            info(&format!(
                "{} is not attached on this host: nothing to abort",
                disk_name(vm, disk)
            ));
            return Ok(());
        };
        if self.servers().find(&rec)?.is_none() {
            return Err(Error::Server(format!(
                "{} has no running server on this host to take the image back",
                rec.name()
            )));
        }
        if !self.migrated_out(&rec)? {
            info(&format!(
                "{} was not migrated out: nothing to abort",
                rec.name()
            ));
            return Ok(());
        }
        let v = self.servers().control(&rec, &["migrate-abort"])?;
        info(&format!(
            "{}: migration aborted, serving as before ({v})",
            rec.name()
        ));
        Ok(())
    }

    /// After a live migration, the destination's config loses `migrate-in`, so a
    /// restart (crash, reboot) attaches warm and takes the lock at once.
    pub fn settle(&self, vm: u32, disk: u32) -> Result<()> {
        let _disk_lock = self.state.lock_disk(vm, disk)?;
        let Some(mut rec) = self.state.load(vm, disk)? else {
            return Ok(());
        };
        if !rec.migrate_in {
            return Ok(());
        }
        let text = std::fs::read_to_string(&rec.toml)
            .map_err(|e| Error::io(format!("reading {}", rec.toml.display()), e))?;
        let mut t: toml::Table = text
            .parse()
            .map_err(|e| Error::Server(format!("{}: {e}", rec.toml.display())))?;
        t.remove("migrate-in");
        let tmp = rec.toml.with_extension("toml.tmp");
        crate::state::write_atomic(
            &tmp,
            &rec.toml,
            format!(
                "# Written by ublk-cache-one for OpenNebula VM {vm} disk {disk}; do not edit.\n{}",
                toml::to_string(&t).unwrap_or_default()
            )
            .as_bytes(),
            0o600,
        )?;
        rec.migrate_in = false;
        self.state.save(&rec)?;
        Ok(())
    }

    /// Write back everything and flush the image (before a copy of it).
    pub fn flush(&self, vm: u32, disk: u32) -> Result<()> {
        let rec = self.serving(vm, disk)?;
        self.servers().control(&rec, &["ctl", "flush"])?;
        Ok(())
    }

    /// disk-saveas: copy the disk (or one of its snapshots) to a new image.
    pub fn cpds(
        &self,
        bundle: &Bundle,
        vm: u32,
        disk: u32,
        dst: &str,
        snap: Option<u32>,
    ) -> Result<()> {
        let r = disk::backend_of(bundle, vm, disk, None)?;
        let dst = RbdName::parse_source(dst)?;
        let _disk_lock = self.state.lock_disk(vm, disk)?;
        if let Some(rec) = self.state.load(vm, disk)? {
            if rec.state == DiskState::Serving && self.servers().find(&rec)?.is_some() {
                // As stock ceph, a copy of a running disk is crash-consistent; the
                // cache's dirty data must be in the image first.
                self.servers().control(&rec, &["ctl", "flush"])?;
                info(&format!(
                    "{}: flushed to {} before the copy",
                    rec.name(),
                    r.backend
                ));
            }
        }
        let rbd = Rbd::new(&self.conf.rbd, &r.ceph, &self.conf.ceph_paths)?;
        let src = match snap {
            Some(s) => {
                if !rbd.has_snap(&r.backend, &s.to_string())? {
                    return Err(Error::Refused(format!("{} has no snapshot {s}", r.backend)));
                }
                r.backend.with_snap(&s.to_string())
            }
            None => r.backend.to_string(),
        };
        rbd.copy(&src, &dst, r.ec_pool.as_deref())?;
        info(&format!("copied {src} to {dst}"));
        Ok(())
    }

    /// Run `op` on the image with this host's server (if any) stopped, and
    /// start it again afterwards whatever happened (the VM needs its disk).
    fn with_server_stopped(
        &self,
        vm: u32,
        disk: u32,
        op: impl FnOnce(Option<&DiskRecord>) -> Result<()>,
    ) -> Result<()> {
        let _disk_lock = self.state.lock_disk(vm, disk)?;
        let rec = self
            .state
            .load(vm, disk)?
            .filter(|r| r.state == DiskState::Serving);
        let servers = self.servers();
        let was_running = match &rec {
            Some(r) => servers.stop(r, false)? == Stopped::Clean,
            None => false,
        };
        let res = op(rec.as_ref());
        if let (Some(r), true) = (&rec, was_running) {
            if let Err(e) = servers.start(r) {
                return Err(match res {
                    Ok(()) => e,
                    Err(first) => {
                        Error::Server(format!("{first}; then restarting the server failed: {e}"))
                    }
                });
            }
        }
        res
    }

    fn image_of(&self, bundle: &Bundle, vm: u32, disk: u32) -> Result<(BackendRef, Rbd)> {
        let r = disk::backend_of(bundle, vm, disk, None)?;
        let rbd = Rbd::new(&self.conf.rbd, &r.ceph, &self.conf.ceph_paths)?;
        Ok((r, rbd))
    }

    /// Disk snapshots of a powered-off VM, as RBD snapshots of the disk's image.
    pub fn snap(&self, bundle: &Bundle, vm: u32, disk: u32, op: SnapOp, snap: u32) -> Result<()> {
        let (r, rbd) = self.image_of(bundle, vm, disk)?;
        let s = snap.to_string();
        self.with_server_stopped(vm, disk, |_| match op {
            SnapOp::Create => {
                rbd.snap_create(&r.backend, &s, true)?;
                info(&format!("created snapshot {}", r.backend.with_snap(&s)));
                Ok(())
            }
            SnapOp::Delete => {
                rbd.snap_remove(&r.backend, &s)?;
                info(&format!("removed snapshot {}", r.backend.with_snap(&s)));
                Ok(())
            }
            SnapOp::Revert => {
                if !rbd.has_snap(&r.backend, &s)? {
                    return Err(Error::Refused(format!("{} has no snapshot {s}", r.backend)));
                }
                // The cache's change marker makes the restarted server drop every
                // line the rollback changed.
                rbd.rollback(&r.backend, &s)?;
                info(&format!("reverted {} to snapshot {s}", r.backend));
                Ok(())
            }
        })
    }

    /// Grow a powered-off VM's disk. The cache records the image size, so it
    /// starts empty afterwards (it held nothing dirty after the clean stop).
    pub fn resize(&self, bundle: &Bundle, vm: u32, disk: u32, size_mb: u64) -> Result<()> {
        let (r, rbd) = self.image_of(bundle, vm, disk)?;
        let info_now = rbd
            .info(&r.backend)?
            .ok_or_else(|| Error::Refused(format!("the image {} does not exist", r.backend)))?;
        if size_mb << 20 < info_now.size {
            return Err(Error::Refused(format!(
                "{} is {} MB; shrinking a disk is not supported",
                r.backend,
                info_now.size >> 20
            )));
        }
        self.with_server_stopped(vm, disk, |rec| {
            rbd.resize(&r.backend, size_mb)?;
            info(&format!("resized {} to {size_mb} MB", r.backend));
            if let Some(ls) = rec.and_then(|r| r.ls.as_ref()) {
                ls::wipe_head(&ls.path)?;
                info("the local cache starts empty (it recorded the old size)");
            }
            Ok(())
        })
    }

    /// Records and server states, for operators and tests.
    pub fn list_json(&self) -> Result<String> {
        let servers = self.servers();
        let mut out = Vec::new();
        for r in self.state.all()? {
            let row = if r.state == DiskState::Serving {
                servers.find(&r).ok().flatten()
            } else {
                None
            };
            let mut v =
                serde_json::to_value(&r).map_err(|e| Error::Server(format!("encoding: {e}")))?;
            v["server"] = match row {
                Some(row) => serde_json::json!({"id": row.id, "pid": row.pid, "mode": row.mode,
                    "state": row.state, "exports": row.exports}),
                None => serde_json::Value::Null,
            };
            out.push(v);
        }
        serde_json::to_string_pretty(&out).map_err(|e| Error::Server(format!("encoding: {e}")))
    }

    /// Space figures for the probe: (total, used by served disks, parked, free
    /// for a new cache including what parked caches would give back).
    pub fn space(&self) -> Result<(u64, u64, u64, u64)> {
        let recs = self.state.all()?;
        let cap = self.store().capacity()?;
        let mb = |f: &dyn Fn(&DiskRecord) -> bool| -> u64 {
            recs.iter()
                .filter(|r| f(r))
                .filter_map(|r| r.ls.as_ref())
                .map(|l| l.mb)
                .sum()
        };
        let parked = mb(&|r| r.state == DiskState::Parked);
        let used = mb(&|r| r.state != DiskState::Parked);
        let mut total = cap.total_mb;
        if self.conf.ls_total_max_mb > 0 {
            total = total.min(self.conf.ls_total_max_mb);
        }
        let free = self.free_mb(&recs)? + parked;
        Ok((total, used, parked, free.min(total.saturating_sub(used))))
    }

    pub fn disks(&self) -> Result<usize> {
        Ok(self
            .state
            .all()?
            .iter()
            .filter(|r| r.state == DiskState::Serving)
            .count())
    }

    /// Caches kept as stale (see [`DiskState::Stale`]).
    pub fn stale(&self) -> Result<usize> {
        Ok(self
            .state
            .all()?
            .iter()
            .filter(|r| r.state == DiskState::Stale)
            .count())
    }

    pub fn ls_mad(&self) -> LsMad {
        self.conf.ls_mad
    }
}

/// A served disk whose server is gone may have left writes only in its cache.
fn may_hold_dirty(rec: &DiskRecord) -> bool {
    rec.state == DiskState::Serving && rec.mode.holds_dirty() && rec.ls.is_some()
}

/// This host's name, as ublk-cache records it in the image's owner metadata.
fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn stale_error(rec: &DiskRecord, owner: &str) -> Error {
    Error::Refused(format!(
        "{} on this host holds a {} cache from before its server died, and the disk is now served by {owner}: \
         it is not served or written back here (that would overwrite newer data). Inspect {} if its writes \
         matter, then drop it with `ublk-cache-one discard --vm {} --disk {}`",
        rec.name(),
        rec.mode.one(),
        rec.ls.as_ref().map_or_else(|| "it".to_string(), |l| l.path.display().to_string()),
        rec.vm,
        rec.disk
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapOp {
    Create,
    Delete,
    Revert,
}

fn remove_file(p: &PathBuf) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", p.display()), e)),
    }
}
