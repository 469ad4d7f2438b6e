//! The `serve` flow: open backend and cache, attach the engine, run the ublk
//! frontend until a signal, then stop cleanly (write back, persist, remove the
//! device) or detach (leave the device for `recover`).

pub mod open;
pub mod registry;

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tracing::{error, info, warn};
use ublk_cache::frontend::ublk::{self as fe, ServeOutcome, StopHandle, UblkOptions};
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};

use crate::cli::ServeArgs;
use registry::Record;

/// Run a server in the foreground until it is stopped.
pub fn serve(args: &ServeArgs, run_dir: &Path) -> Result<()> {
    let line_size = match args.line_size {
        Some(ls) if ls > u32::MAX as u64 => anyhow::bail!("--line-size {ls} is too large"),
        Some(ls) => Some(ls as u32),
        None => None,
    };
    if args.mode == policies::CacheMode::Offline {
        // Offline mode needs whole-image hydration at start and write-back of only
        // the dirty extents at stop; until that exists, refuse rather than serve a
        // mode that does not do what its name promises.
        anyhow::bail!(
            "--mode offline is not available in this version (whole-image hydration is not built yet); \
             use --mode back"
        );
    }
    if args.mode.uses_cache() && args.cache.is_none() {
        anyhow::bail!("--mode {} needs --cache", args.mode);
    }
    // Check the kernel side first, before touching any data.
    fe::check_control()?;
    let (backend, _backend_lock) = open::open_backend(&args.backend, &args.ceph)?;
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
    };
    let engine = Engine::open(backend, cache, cfg).context("attaching the cache")?;
    let mut opts = UblkOptions {
        depth: args.depth,
        ..UblkOptions::default()
    };
    if let Some(q) = args.queues {
        opts.queues = q;
    }
    opts.id = args.recover.or(args.id).map(|i| i as i32);

    let stop = StopHandle::new();
    install_signals(stop.clone())?;
    let target: Arc<dyn BlockTarget> = engine.clone();
    let mut record = Record {
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
    };
    let on_live = |info: &fe::DeviceInfo| {
        record.id = info.id;
        record.device = info.bdev.display().to_string();
        if let Err(e) = registry::write(run_dir, &record) {
            warn!(
                "could not write the registry record in {}: {e}",
                run_dir.display()
            );
        }
        // The one line on stdout: what the drivers wait for.
        println!("{}", info.bdev.display());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        info!(device = %info.bdev.display(), mode = %args.mode, "serving");
    };
    let outcome = match args.recover {
        Some(_) => fe::recover(target, &opts, on_live, stop),
        None => fe::serve(target, &opts, on_live, stop),
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            // Nothing was served (or the device is gone): keep the cache consistent.
            if let Err(se) = engine.shutdown() {
                error!("stopping the engine after a frontend failure: {se}");
            }
            return Err(e.into());
        }
    };
    match outcome {
        ServeOutcome::Stopped { device, reason } => {
            info!(
                ?reason,
                "device stopped; writing back and detaching the cache"
            );
            record.state = "stopping".into();
            let _ = registry::write(run_dir, &record);
            let res = engine.shutdown();
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
            engine
                .detach_keep_dirty()
                .context("detaching the cache for a successor")?;
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
