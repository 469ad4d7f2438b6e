//! The `serve` flow: open backend and cache, attach the engine, serve it as a
//! ublk device and/or over NBD until a signal, then stop cleanly (finish I/O,
//! write back, persist, remove the device) or detach (dirty data stays in the
//! cache; a ublk device stays for `recover`).

pub mod notify;
pub mod open;
pub mod registry;
pub mod services;
mod tls;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tracing::{error, info, warn};
use ublk_cache::frontend::nbd::{ListenSpec, Listeners, NbdServer};
use ublk_cache::frontend::ublk::{self as fe, ServeOutcome, StopHandle, StopKind, UblkOptions};
use ublk_cache::{Engine, EngineConfig};

use crate::cli::ServeArgs;
use crate::control::server::ControlContext;
use crate::spec::ExportSpec;
use registry::Record;
use services::{Background, Endpoints, PreloadPlan};

/// The exports of a `serve`, checked: `ublk` when none is given, at most one
/// `ublk`, no unix socket path twice.
fn exports_of(args: &ServeArgs) -> Result<Vec<ExportSpec>> {
    if args.exports.is_empty() {
        return Ok(vec![ExportSpec::Ublk]);
    }
    for (i, e) in args.exports.iter().enumerate() {
        if args.exports[..i].contains(e) {
            bail!("--export {e} is given twice");
        }
    }
    Ok(args.exports.clone())
}

/// The stdout lines: one per export, in `--export` order.
fn export_lines(exports: &[ExportSpec], device: &str, uris: &[String]) -> Vec<String> {
    let mut uris = uris.iter();
    exports
        .iter()
        .map(|e| match e {
            ExportSpec::Ublk => device.to_string(),
            ExportSpec::Nbd(_) => uris.next().cloned().unwrap_or_default(),
        })
        .collect()
}

/// Print what the drivers and tests wait for, all at once, and tell systemd
/// (`Type=notify`) that the server is ready.
fn announce(lines: &[String]) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
    let _ = out.flush();
    notify::ready(lines);
}

/// Run a server in the foreground until it is stopped.
pub fn serve(args: &ServeArgs, run_dir: &Path) -> Result<()> {
    let exports = exports_of(args)?;
    let plan = PreloadPlan::from_args(args)?;
    let metrics = args
        .metrics
        .as_deref()
        .map(crate::control::metrics::parse_addr)
        .transpose()?;
    let with_ublk = exports.contains(&ExportSpec::Ublk);
    if !with_ublk && args.recover.is_some() {
        bail!("recover re-attaches a ublk device; it needs --export ublk");
    }
    if !with_ublk && args.id.is_some() {
        bail!("--id is the ublk device id; it needs --export ublk");
    }
    let line_size = match args.line_size {
        Some(ls) if ls > u32::MAX as u64 => anyhow::bail!("--line-size {ls} is too large"),
        Some(ls) => Some(ls as u32),
        None => None,
    };
    if args.mode.uses_cache() && args.cache.is_none() {
        anyhow::bail!("--mode {} needs --cache", args.mode);
    }
    open::check_read_only(args.read_only, args.mode)?;
    // Check the kernel side and bind the sockets first, before touching any data.
    if with_ublk {
        fe::check_control()?;
    }
    let nbd_specs: Vec<ListenSpec> = exports
        .iter()
        .filter_map(|e| match e {
            ExportSpec::Nbd(l) => Some(l.clone()),
            ExportSpec::Ublk => None,
        })
        .collect();
    let nbd_opts = tls::nbd_options(&args.tls)?;
    let listeners = if nbd_specs.is_empty() {
        None
    } else {
        Some(Listeners::bind(&nbd_specs, args.socket_mode)?)
    };
    let (backend, backend_lock) =
        open::open_backend(&args.backend, &args.ceph, args.migrate_in, args.read_only)?;
    let mut cache = None;
    let mut _cache_lock = None;
    let mut created = false;
    if let Some(path) = &args.cache {
        let (c, l, new) = open::open_cache(path, args.cache_size)?;
        cache = Some(c);
        _cache_lock = Some(l);
        created = new;
    }
    let cfg = EngineConfig {
        mode: args.mode,
        order: args.writeback_order,
        line_size,
        cache_bytes: args.cache_size,
        format: args.format || created,
        discard_dirty: args.discard_dirty,
        accept_backend_change: args.accept_backend_change,
        cold_start: args.migrate_in,
        ..EngineConfig::default()
    };
    let engine = Engine::open(backend, cache, cfg).context("attaching the cache")?;
    if plan.wait {
        if let Err(e) = plan.run_now(&engine) {
            shutdown_after_failure(&engine, None);
            return Err(e.context("--preload-wait: the device was not started"));
        }
    }

    let stop = StopHandle::new();
    if let Err(e) = install_signals(stop.clone()) {
        shutdown_after_failure(&engine, None);
        return Err(e);
    }
    let nbd = match listeners {
        None => None,
        Some(l) => match NbdServer::start(l, Arc::clone(&engine), nbd_opts) {
            Ok(s) => Some(s),
            Err(e) => {
                shutdown_after_failure(&engine, None);
                return Err(e.into());
            }
        },
    };
    let background = match Background::start(&engine, &plan, args.mode) {
        Ok(b) => b,
        Err(e) => {
            shutdown_after_failure(&engine, nbd);
            return Err(e);
        }
    };
    let uris: Vec<String> = nbd.as_ref().map(|n| n.uris().to_vec()).unwrap_or_default();
    let record = Record {
        id: 0,
        device: String::new(),
        pid: std::process::id(),
        mode: args.mode.to_string(),
        backend: args.backend.to_string(),
        cache: args
            .cache
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        state: "serving".into(),
        exports: Vec::new(),
    };
    let running = Running {
        args,
        run_dir,
        engine,
        nbd,
        exports,
        uris,
        record,
        stop,
        extras: Extras {
            control: ControlPlan {
                plan,
                metrics,
                backend_lock,
            },
            background,
        },
    };
    if with_ublk {
        serve_with_ublk(running)
    } else {
        serve_nbd_only(running)
    }
}

/// A server with its engine attached and its NBD listeners (if any) accepting.
struct Running<'a> {
    args: &'a ServeArgs,
    run_dir: &'a Path,
    engine: Arc<Engine>,
    nbd: Option<NbdServer>,
    exports: Vec<ExportSpec>,
    /// The NBD URIs, in `--export` order.
    uris: Vec<String>,
    record: Record,
    stop: StopHandle,
    extras: Extras,
}

/// What runs beside the data path, and what the control socket needs.
struct Extras {
    control: ControlPlan,
    background: Background,
}

/// What the control socket and metrics need once the server's id is known.
struct ControlPlan {
    plan: PreloadPlan,
    metrics: Option<std::net::SocketAddr>,
    backend_lock: Option<open::PathLock>,
}

impl ControlPlan {
    /// Start the control socket and metrics for server `id`.
    fn start(
        self,
        args: &ServeArgs,
        run_dir: &Path,
        engine: &Arc<Engine>,
        id: u32,
    ) -> Option<Endpoints> {
        let ctx = ControlContext::new(
            id,
            Arc::clone(engine),
            args.backend.to_string(),
            args.cache
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            self.plan.ranges,
            self.plan.rate,
            self.backend_lock,
        );
        match Endpoints::start(ctx, run_dir, self.metrics) {
            Ok(e) => Some(e),
            Err(e) => {
                error!("{e:#}");
                None
            }
        }
    }
}

/// Stop what runs beside the data path before the engine stops. Returns what
/// must live until the engine is detached (it holds the backend's lock).
fn stop_extras(
    background: Background,
    endpoints: Option<Endpoints>,
) -> Option<Arc<ControlContext>> {
    background.stop();
    endpoints.map(Endpoints::stop)
}

/// Take down what was started when serving failed: NBD connections finish, then
/// the engine writes back and persists (nothing acknowledged is lost).
fn shutdown_after_failure(engine: &Engine, nbd: Option<NbdServer>) {
    if let Some(n) = nbd {
        n.stop();
    }
    if let Err(e) = engine.shutdown() {
        error!("stopping the engine after a failure: {e}");
    }
}

fn serve_with_ublk(r: Running<'_>) -> Result<()> {
    let Running {
        args,
        run_dir,
        engine,
        nbd,
        exports,
        uris,
        mut record,
        stop,
        extras,
    } = r;
    let Extras {
        control,
        background,
    } = extras;
    let mut opts = UblkOptions {
        depth: args.depth,
        ..UblkOptions::default()
    };
    if let Some(q) = args.queues {
        opts.queues = q;
    }
    opts.id = args.recover.or(args.id).map(|i| i as i32);
    let mut endpoints = None;
    // Until the control socket takes it over, the backend lock lives here (so a
    // device that never came live still holds it while the engine shuts down).
    let mut control = Some(control);
    let on_live = |info: &fe::DeviceInfo| {
        record.id = info.id;
        record.device = info.bdev.display().to_string();
        record.exports = export_lines(&exports, &record.device, &uris);
        if let Err(e) = registry::write(run_dir, &record) {
            warn!(
                "could not write the registry record in {}: {e}",
                run_dir.display()
            );
        }
        endpoints = control
            .take()
            .and_then(|c| c.start(args, run_dir, &engine, info.id));
        // The lines on stdout: what the drivers wait for.
        announce(&record.exports);
        info!(device = %info.bdev.display(), mode = %args.mode, "serving");
    };
    let outcome = match args.recover {
        Some(_) => fe::recover(Arc::clone(&engine), &opts, on_live, stop),
        None => fe::serve(Arc::clone(&engine), &opts, on_live, stop),
    };
    // Whatever happened, nothing preloads or answers control requests any more.
    let ctx = stop_extras(background, endpoints.take());
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            // Nothing was served over ublk (or the device is gone): keep the cache
            // consistent.
            shutdown_after_failure(&engine, nbd);
            drop(ctx);
            return Err(e.into());
        }
    };
    // The device no longer takes requests; NBD clients finish theirs too.
    if let Some(n) = nbd {
        n.stop();
    }
    match outcome {
        ServeOutcome::Stopped { device, reason } => {
            info!(
                ?reason,
                "device stopped; writing back and detaching the cache"
            );
            record.state = "stopping".into();
            let _ = registry::write(run_dir, &record);
            let res = engine.shutdown();
            drop(ctx);
            if let Err(e) = device.delete() {
                warn!("removing the ublk device: {e}");
            }
            let _ = registry::remove(run_dir, record.id);
            res.context(
                "clean stop: dirty data stays in the cache and is written back at the next start",
            )?;
            info!("stopped cleanly");
        }
        ServeOutcome::Detached { id } => {
            let res = engine.detach_keep_dirty();
            drop(ctx);
            res.context("detaching the cache for a successor")?;
            record.state = "detached".into();
            let _ = registry::write(run_dir, &record);
            info!(
                id,
                "detached; the device stays for `ublk-cache recover {id}`"
            );
        }
    }
    Ok(())
}

fn serve_nbd_only(r: Running<'_>) -> Result<()> {
    let Running {
        args,
        run_dir,
        engine,
        nbd,
        exports,
        uris,
        mut record,
        stop,
        extras,
    } = r;
    record.exports = export_lines(&exports, "", &uris);
    let registered = match registry::claim(run_dir, registry::NBD_ONLY_ID_BASE, &mut record) {
        Ok(id) => {
            info!(id, "registered (NBD only; `ublk-cache stop {id}` stops it)");
            true
        }
        Err(e) => {
            warn!(
                "could not write the registry record in {}: {e}",
                run_dir.display()
            );
            false
        }
    };
    let Extras {
        control,
        background,
    } = extras;
    // Without a record there is no id for the control socket; the backend
    // lock then lives here until the engine is detached.
    let (endpoints, kept_lock) = if registered {
        (control.start(args, run_dir, &engine, record.id), None)
    } else {
        (None, Some(control))
    };
    announce(&record.exports);
    info!(mode = %args.mode, "serving over NBD only (no ublk device)");
    let kind = loop {
        if let Some(k) = stop.requested() {
            break k;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some(n) = nbd {
        n.stop();
    }
    let ctx = stop_extras(background, endpoints);
    let res = match kind {
        StopKind::Stop => {
            info!("NBD stopped; writing back and detaching the cache");
            record.state = "stopping".into();
            if registered {
                let _ = registry::write(run_dir, &record);
            }
            engine.shutdown().context(
                "clean stop: dirty data stays in the cache and is written back at the next start",
            )
        }
        StopKind::Detach => engine
            .detach_keep_dirty()
            .context("detaching the cache")
            .map(|()| {
                info!("detached: dirty data stays in the cache; the next `serve` on it continues")
            }),
    };
    drop(ctx);
    drop(kept_lock);
    // No device is left behind, so no record either.
    if registered {
        let _ = registry::remove(run_dir, record.id);
    }
    res?;
    info!("stopped cleanly");
    Ok(())
}

/// SIGTERM/SIGINT: clean stop. SIGUSR1: detach for an upgrade.
fn install_signals(stop: StopHandle) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGUSR1 {
                    info!("SIGUSR1: detaching, the device stays for recover");
                    stop.detach();
                } else {
                    info!(signal = sig, "stop requested");
                    stop.stop();
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}
