//! The daemon: a server from its configuration to its stop, as a library.
//!
//! [`Server::start`] checks a [`ServeConfig`], refuses what it can before
//! touching data (a missing ublk driver, a busy socket), opens the backend and
//! the cache (each holding its own lock), attaches the engine, starts the
//! background [`jobs`], the exports and the control socket, and returns a
//! [`Running`] server. [`Running::wait`] blocks until its [`StopToken`] is
//! triggered (a signal in the binary, `ublk-cache stop`, a ublk device stopped
//! from outside, a test) and takes everything down in one order, the order of
//! [`Running`]'s fields: exports → jobs → control → engine (write back or
//! detach) → device deletion and registry → backend and cache (their locks go
//! with them, after the engine is done).
//!
//! Nothing here reads the environment or parses a command line: `main.rs`
//! does, and passes what it found in the configuration.

pub mod boot_trace;
pub mod config;
pub mod control;
pub mod error;
pub mod export;
pub mod jobs;
pub mod open;
pub mod progress;
pub mod ranges;
pub mod registry;
pub mod size;
pub mod spec;
pub mod stop;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;

use tracing::{error, info, warn};

pub use config::{Plan, ServeConfig};
pub use error::{DaemonError, DaemonResult};
pub use stop::StopToken;

use crate::engine::EngineConfig;
use crate::frontend::nbd::ListenSpec;
use crate::frontend::ublk::{StopKind, UblkOptions};
use crate::io_trace::IoTrace;
use crate::Engine;
use boot_trace::BootTraceJob;
use control::metrics::MetricsServer;
use control::server::{ControlContext, ControlServer};
use export::{Export, ExportEnd, ExportKind, NbdExport, UblkExport};
use jobs::Jobs;
use registry::{Record, ServerState, NBD_ONLY_ID_BASE};
use spec::ExportSpec;

/// A server that has not started yet.
pub struct Server {
    cfg: ServeConfig,
    stop: StopToken,
    /// Devices given by the caller instead of opened from the configuration.
    devices: Option<Devices>,
}

/// A backend and a cache device opened by the caller (a library user, an
/// in-process test on `MemBackend`): they hold their own locks, if any.
pub struct Devices {
    pub backend: Arc<dyn rbd_backend::Backend>,
    pub cache: Option<Arc<dyn rbd_backend::BlockIo>>,
    /// How the backend is named in the registry and in `ctl stats`.
    pub label: String,
}

/// How a server ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything written back, the cache cleanly detached, the device removed.
    Stopped,
    /// Dirty data kept in the cache; `device` is the ublk device left for `recover`.
    Detached { device: Option<u32> },
}

/// The control socket and the metrics endpoint of a server whose id is known.
struct Endpoints {
    control: Option<ControlServer>,
    _metrics: Option<MetricsServer>,
}

impl Endpoints {
    /// Start both. A control socket that cannot be bound is logged loudly, not
    /// fatal: the disk is served either way, and `stop` works by signal.
    fn start(ctx: ControlContext, cfg: &ServeConfig, plan: &Plan) -> DaemonResult<Self> {
        let ctx = Arc::new(ctx);
        let path = control::socket_path(&cfg.run_dir, ctx.id);
        let control = match ControlServer::start(&path, Arc::clone(&ctx)) {
            Ok(c) => Some(c),
            Err(e) => {
                error!(
                    "no control socket, so `ublk-cache ctl` cannot reach this server: {}",
                    e.chain()
                );
                None
            }
        };
        let metrics = match plan.metrics {
            Some(a) => Some(MetricsServer::start(a, ctx)?),
            None => None,
        };
        Ok(Self {
            control,
            _metrics: metrics,
        })
    }

    /// Stop answering (requests in progress finish on their own threads).
    fn stop(self) {
        if let Some(c) = self.control {
            c.stop();
        }
    }
}

/// A serving server. Its fields are in teardown order.
pub struct Running {
    /// In `--export` order.
    exports: Vec<Box<dyn Export>>,
    jobs: Option<Jobs>,
    control: Option<Endpoints>,
    engine: Arc<Engine>,
    /// `--io-trace`: closed once the exports are.
    io_trace: Option<Arc<IoTrace>>,
    /// `--boot-trace record`: saved once the exports are closed (or its
    /// window ended before).
    boot_trace: Option<BootTraceJob>,
    /// The registry record, once written.
    record: Option<Record>,
    cfg: ServeConfig,
    plan: Plan,
    stop: StopToken,
    lines: Vec<String>,
    id: Option<u32>,
}

impl Server {
    pub fn new(cfg: ServeConfig) -> Self {
        Self {
            cfg,
            stop: StopToken::new(),
            devices: None,
        }
    }

    /// Serve these devices instead of opening `backend` and `cache` from the
    /// configuration (which then needs no `backend`).
    pub fn with_devices(mut self, devices: Devices) -> Self {
        self.devices = Some(devices);
        self
    }

    /// The token that stops the server once it runs (a stop asked for while it
    /// starts takes effect as soon as it is up).
    pub fn stop_token(&self) -> StopToken {
        self.stop.clone()
    }

    /// Start a server for `cfg` (see the module documentation).
    pub fn start(self) -> DaemonResult<Running> {
        let Server {
            mut cfg,
            stop,
            devices,
        } = self;
        if let Some(d) = &devices {
            // The caller's devices: what the configuration would open is theirs.
            if cfg.backend.is_none() {
                cfg.backend = Some(spec::BackendSpec::Given(d.label.clone()));
            }
            if d.cache.is_some() && cfg.cache.is_none() {
                cfg.cache = Some(PathBuf::from(format!("{} (cache)", d.label)));
            }
        }
        let plan = cfg.validate()?;
        // The kernel side and the sockets first, before touching any data.
        let mut exports = Self::exports(&cfg, &plan)?;
        let (backend, cache, created, undo) = match devices {
            Some(d) => (d.backend, d.cache, false, None),
            None => {
                let backend = open::open_backend(&plan.backend, &cfg)?;
                let cache = match &cfg.cache {
                    Some(path) => Some(open::open_cache(path, cfg.cache_size.map(|s| s.0), &cfg)?),
                    None => None,
                };
                let created = cache.as_ref().is_some_and(|c| c.created);
                let undo = cache.as_ref().map(|c| c.undo.clone());
                (backend, cache.map(|c| c.dev), created, undo)
            }
        };
        let ecfg = EngineConfig {
            mode: cfg.mode,
            order: cfg.writeback_order,
            writeback_limit: cfg.writeback_limit(),
            dirty_level: cfg.dirty_level()?,
            line_size: plan.line_size,
            cache_bytes: cfg.cache_size.map(|s| s.0),
            format: cfg.on_foreign_cache.is_on() || created,
            discard_dirty: cfg.dirty_data.is_on(),
            accept_backend_change: cfg.on_backend_change.is_on(),
            cold_start: cfg.start.is_on(),
            shadow_dir: cfg.shadow_dir(),
            eviction: cfg.eviction,
            ..EngineConfig::default()
        };
        let engine = match Engine::open(backend, cache, ecfg) {
            Ok(e) => e,
            Err(e) => {
                // Refused before serving anything: the cache goes back as it was.
                if let Some(u) = &undo {
                    u.undo();
                }
                return Err(DaemonError::engine("attaching the cache", e));
            }
        };
        let mut running = Running {
            exports: Vec::new(),
            jobs: None,
            control: None,
            engine,
            io_trace: None,
            boot_trace: None,
            record: None,
            cfg,
            plan,
            stop,
            lines: Vec::new(),
            id: None,
        };
        match running.bring_up(&mut exports) {
            Ok(()) => Ok(running),
            Err(e) => {
                // Nothing acknowledged may be lost: what was started stops, and
                // the engine writes back and persists. Only once that worked
                // does a cache file this start made go again.
                running.exports.append(&mut exports);
                match running.teardown(StopKind::Stop) {
                    Ok(_) => {
                        if let Some(u) = &undo {
                            u.remove_created();
                        }
                    }
                    Err(e2) => error!("stopping after a failed start: {}", e2.chain()),
                }
                Err(e)
            }
        }
    }

    /// One export per `--export` ublk, and one NBD export for all NBD listeners
    /// (placed where the first of them was given).
    fn exports(cfg: &ServeConfig, plan: &Plan) -> DaemonResult<Vec<Box<dyn Export>>> {
        let mut v: Vec<Box<dyn Export>> = Vec::new();
        let nbd: Vec<ListenSpec> = plan
            .exports
            .iter()
            .filter_map(|e| match e {
                ExportSpec::Nbd(l) => Some(l.clone()),
                ExportSpec::Ublk => None,
            })
            .collect();
        let mut nbd_placed = false;
        for e in &plan.exports {
            match e {
                ExportSpec::Ublk => {
                    let mut opts = UblkOptions {
                        depth: cfg.depth,
                        ..UblkOptions::default()
                    };
                    if let Some(q) = cfg.queues {
                        opts.queues = q;
                    }
                    opts.id = cfg.recover.or(cfg.id).map(|i| i as i32);
                    v.push(Box::new(UblkExport::new(opts, cfg.recover.is_some())?));
                }
                ExportSpec::Nbd(_) if !nbd_placed => {
                    nbd_placed = true;
                    // TLS credentials are loaded (and checked) before the bind.
                    let opts = tls::nbd_options(cfg)?;
                    v.push(Box::new(NbdExport::bind(&nbd, cfg.socket_mode, opts)?));
                }
                ExportSpec::Nbd(_) => {}
            }
        }
        Ok(v)
    }
}

/// The stdout lines: one per `--export`, in their order: the device path for
/// ublk, the next URI of the NBD export for each NBD listener.
fn export_lines(specs: &[ExportSpec], per_export: &[(ExportKind, Vec<String>)]) -> Vec<String> {
    let of = |k: ExportKind| {
        per_export
            .iter()
            .filter(move |(kind, _)| *kind == k)
            .flat_map(|(_, lines)| lines.iter().cloned())
    };
    let (mut ublk, mut nbd) = (of(ExportKind::Ublk), of(ExportKind::Nbd));
    specs
        .iter()
        .map(|e| match e {
            ExportSpec::Ublk => ublk.next(),
            ExportSpec::Nbd(_) => nbd.next(),
        })
        .map(Option::unwrap_or_default)
        .collect()
}

impl Running {
    fn bring_up(&mut self, exports: &mut Vec<Box<dyn Export>>) -> DaemonResult<()> {
        // After the attach (a refused start leaves an earlier trace alone),
        // before the exports (every guest request is in it).
        if let Some(path) = &self.cfg.io_trace {
            let t = Arc::new(IoTrace::create(path).map_err(|e| {
                DaemonError::io(
                    format!("--io-trace {}: cannot create it", path.display()),
                    e,
                )
            })?);
            self.engine.trace_requests(t.clone());
            self.io_trace = Some(t);
        }
        self.boot_trace = BootTraceJob::start(&self.cfg, &self.engine)?;
        if self.plan.preload.wait {
            self.plan.preload.run_now(&self.engine).map_err(|e| {
                DaemonError::refused(format!(
                    "--preload-wait: the device was not started: {}",
                    e.chain()
                ))
            })?;
        }
        self.jobs = Some(Jobs::start(&self.engine, &self.plan.preload)?);
        let mut per_export = Vec::new();
        for mut e in exports.drain(..) {
            let r = e.start(Arc::clone(&self.engine), &self.stop);
            let kind = e.kind();
            self.exports.push(e);
            per_export.push((kind, r?));
        }
        // Lines in --export order: a ublk export gives one, the NBD export one per listener.
        self.lines = export_lines(&self.plan.exports, &per_export);
        let device = self.exports.iter().find_map(|e| e.device_id());
        let mut record = Record {
            id: device.unwrap_or(0),
            device: device
                .map(|id| format!("/dev/ublkb{id}"))
                .unwrap_or_default(),
            pid: std::process::id(),
            mode: self.cfg.mode,
            backend: self.plan.backend.to_string(),
            cache: self
                .cfg
                .cache
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            state: ServerState::Serving,
            exports: self.lines.clone(),
            // How to start it again: `recover ID` reads this. (Not for devices
            // the caller opened: there is nothing to open them by.)
            config: (!matches!(self.plan.backend, spec::BackendSpec::Given(_))).then(|| {
                ServeConfig {
                    recover: None,
                    ..self.cfg.clone()
                }
            }),
        };
        let run_dir = &self.cfg.run_dir;
        let registered = match device {
            Some(_) => registry::write(run_dir, &record).map(|()| record.id),
            None => registry::claim(run_dir, NBD_ONLY_ID_BASE, &mut record),
        };
        match registered {
            Ok(id) => {
                if device.is_none() {
                    info!(id, "registered (NBD only; `ublk-cache stop {id}` stops it)");
                }
                self.id = Some(id);
                self.record = Some(record);
            }
            Err(e) => warn!(
                "could not write the registry record in {}: {e}",
                run_dir.display()
            ),
        }
        // Without an id there is no control socket (nobody could find it).
        if let Some(id) = self.id {
            let ctx = ControlContext::new(
                id,
                Arc::clone(&self.engine),
                self.plan.backend.to_string(),
                self.cfg
                    .cache
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                self.plan.preload.ranges.clone(),
                self.plan.preload.rate,
            );
            self.control = Some(Endpoints::start(ctx, &self.cfg, &self.plan)?);
        }
        match device {
            Some(_) => info!(mode = %self.cfg.mode, "serving"),
            None => info!(mode = %self.cfg.mode, "serving over NBD only (no ublk device)"),
        }
        Ok(())
    }

    /// The lines for stdout, one per export in `--export` order: the device
    /// path for ublk, the URI for NBD (what drivers and tests wait for).
    pub fn export_lines(&self) -> &[String] {
        &self.lines
    }

    /// The server's id in the registry (the ublk device id, or one from 2^20
    /// up for a server with NBD exports only), if it could register.
    pub fn id(&self) -> Option<u32> {
        self.id
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn stop_token(&self) -> StopToken {
        self.stop.clone()
    }

    /// Serve until the stop token is triggered, then take everything down.
    pub fn wait(self) -> DaemonResult<Outcome> {
        let kind = self.stop.wait();
        self.teardown(kind)
    }

    /// Take everything down now, in field order.
    pub fn teardown(mut self, requested: StopKind) -> DaemonResult<Outcome> {
        self.stop.request_kind(requested);
        let mut first_err = None;
        let mut stopped_devices = Vec::new();
        let mut kept_device = None;
        let mut device_stopped = false;
        // 1. Exports: nothing new comes in; requests already received complete.
        for e in std::mem::take(&mut self.exports) {
            match e.stop(requested) {
                Ok(ExportEnd::Closed) => {}
                Ok(ExportEnd::DeviceStopped(d)) => {
                    device_stopped = true;
                    stopped_devices.push(d);
                }
                Ok(ExportEnd::DeviceKept { id }) => kept_device = Some(id),
                Err(e) => {
                    device_stopped = true;
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(b) = self.boot_trace.take() {
            b.stop();
        }
        if let Some(t) = self.io_trace.take() {
            if let Err(e) = t.close() {
                warn!("{e}");
            }
        }
        // What happened to a ublk device decides: a device kept for `recover`
        // keeps the dirty data in the cache; a stopped device is written back.
        let kind = match (kept_device, device_stopped) {
            (Some(_), _) => StopKind::Detach,
            (None, true) => StopKind::Stop,
            (None, false) => requested,
        };
        // 2. Jobs, 3. control: nothing preloads or answers any more.
        if let Some(j) = self.jobs.take() {
            j.stop();
        }
        if let Some(c) = self.control.take() {
            c.stop();
        }
        // 4. The engine.
        let res = match kind {
            StopKind::Stop => {
                info!("writing back and detaching the cache");
                if let Some(r) = self.record.as_mut() {
                    r.state = ServerState::Stopping;
                    let _ = registry::write(&self.cfg.run_dir, r);
                }
                self.engine.shutdown().map_err(|e| {
                    DaemonError::engine(
                        "clean stop: dirty data stays in the cache and is written back at the next start",
                        e,
                    )
                })
            }
            StopKind::Detach => self
                .engine
                .detach_keep_dirty()
                .map_err(|e| DaemonError::engine("detaching the cache", e)),
        };
        // 5. Devices and the registry.
        for d in stopped_devices {
            if let Err(e) = d.delete() {
                warn!("removing the ublk device: {e}");
            }
        }
        if let Some(r) = self.record.as_mut() {
            match kept_device {
                Some(_) => {
                    r.state = ServerState::Detached;
                    let _ = registry::write(&self.cfg.run_dir, r);
                }
                // No device is left behind, so no record either.
                None => {
                    let _ = registry::remove(&self.cfg.run_dir, r.id);
                }
            }
        }
        if let Err(e) = res {
            first_err.get_or_insert(e);
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(match kind {
            StopKind::Stop => {
                info!("stopped cleanly");
                Outcome::Stopped
            }
            StopKind::Detach => {
                match kept_device {
                    Some(id) => info!(
                        id,
                        "detached; the device stays for `ublk-cache recover {id}`"
                    ),
                    None => info!(
                        "detached: dirty data stays in the cache; the next `serve` on it continues"
                    ),
                }
                Outcome::Detached {
                    device: kept_device,
                }
            }
        })
        // 6. The engine, and with it the backend and the cache and their locks,
        // go when `self` is dropped here.
    }

    /// The run directory of this server.
    pub fn run_dir(&self) -> &PathBuf {
        &self.cfg.run_dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_lines_follow_the_export_order() {
        let specs: Vec<ExportSpec> = ["nbd:unix:/a", "ublk", "nbd:tcp::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        // The NBD export stands where the first NBD listener was given.
        let per = vec![
            (
                ExportKind::Nbd,
                vec![
                    "nbd+unix:///?socket=/a".to_string(),
                    "nbd://127.0.0.1:1/".into(),
                ],
            ),
            (ExportKind::Ublk, vec!["/dev/ublkb3".to_string()]),
        ];
        assert_eq!(
            export_lines(&specs, &per),
            [
                "nbd+unix:///?socket=/a",
                "/dev/ublkb3",
                "nbd://127.0.0.1:1/"
            ]
        );
    }
}
