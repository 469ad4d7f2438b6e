//! What runs beside the data path of a server: background preload and offline
//! hydration, the control socket and the metrics endpoint. Started once the
//! engine is attached (the control socket once the server's id is known) and
//! stopped before the engine is.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use policies::CacheMode;
use tracing::{error, info, warn};
use ublk_cache::engine::PreloadOptions;
use ublk_cache::Engine;

use crate::cli::ServeArgs;
use crate::control::metrics::MetricsServer;
use crate::control::server::{ControlContext, ControlServer};
use crate::progress::ProgressView;
use crate::ranges;

/// What to preload at start.
#[derive(Debug, Clone, Default)]
pub struct PreloadPlan {
    pub ranges: Vec<(u64, u64)>,
    pub rate: Option<u64>,
    pub wait: bool,
}

impl PreloadPlan {
    pub fn from_args(args: &ServeArgs) -> Result<Self> {
        let ranges = match (args.preload, &args.preload_ranges) {
            (Some(_), Some(_)) => {
                bail!("--preload and --preload-ranges exclude each other; give one")
            }
            (Some(0), None) => Vec::new(),
            (Some(n), None) => vec![(0, n)],
            (None, Some(f)) => ranges::parse_ranges_file(f)?,
            (None, None) => Vec::new(),
        };
        if args.preload_wait && ranges.is_empty() {
            bail!("--preload-wait needs --preload SIZE or --preload-ranges FILE");
        }
        if !ranges.is_empty() && !args.mode.uses_cache() {
            bail!(
                "--preload reads into the cache, but mode '{}' uses none",
                args.mode
            );
        }
        Ok(Self {
            ranges,
            rate: args.preload_rate,
            wait: args.preload_wait,
        })
    }

    fn opts(&self) -> PreloadOptions {
        PreloadOptions { rate: self.rate }
    }

    /// Preload in the foreground (`--preload-wait`), before any export is live.
    pub fn run_now(&self, engine: &Engine) -> Result<()> {
        let view = ProgressView::default();
        for &(off, len) in &self.ranges {
            let r = engine
                .preload(off, len, self.opts(), None, Some(&|p| view.show(p)))
                .with_context(|| format!("preloading {off}+{len}"))?;
            if r.interrupted {
                bail!("preload interrupted");
            }
        }
        Ok(())
    }
}

/// Background preload / hydration threads, cancelled at stop.
pub struct Background {
    cancel: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Background {
    pub fn start(engine: &Arc<Engine>, plan: &PreloadPlan, mode: CacheMode) -> Result<Self> {
        let cancel = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        if mode == CacheMode::Offline {
            let (e, c, opts) = (Arc::clone(engine), Arc::clone(&cancel), plan.opts());
            threads.push(
                std::thread::Builder::new()
                    .name("hydrate".into())
                    .spawn(move || {
                        let view = ProgressView::default();
                        match e.hydrate(opts, Some(&c), Some(&|p| view.show(p))) {
                            Ok(r) if r.interrupted => {
                                info!("hydration stopped early; the next start continues it")
                            }
                            Ok(r) => info!(
                                fetched = r.fetched,
                                "hydration complete: the whole image is in the cache"
                            ),
                            // The device keeps serving (misses read through); a
                            // restart continues where this stopped.
                            Err(e) => error!("hydration failed, misses keep reading through: {e}"),
                        }
                    })
                    .context("starting the hydration thread")?,
            );
        }
        if !plan.wait && !plan.ranges.is_empty() {
            let (e, c, p) = (Arc::clone(engine), Arc::clone(&cancel), plan.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("preload".into())
                    .spawn(move || {
                        let view = ProgressView::default();
                        for &(off, len) in &p.ranges {
                            match e.preload(off, len, p.opts(), Some(&c), Some(&|x| view.show(x))) {
                                Ok(r) if r.interrupted => return,
                                Ok(_) => {}
                                Err(err) => {
                                    warn!("preload of {off}+{len} failed (the device serves anyway): {err}");
                                    return;
                                }
                            }
                        }
                    })
                    .context("starting the preload thread")?,
            );
        }
        Ok(Self { cancel, threads })
    }

    pub fn stop(self) {
        self.cancel.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// The control socket and metrics endpoint of a server whose id is known.
pub struct Endpoints {
    pub ctx: Arc<ControlContext>,
    control: Option<ControlServer>,
    _metrics: Option<MetricsServer>,
}

impl Endpoints {
    /// Start both. A control socket that cannot be bound is logged loudly, not
    /// fatal: the disk is served either way, and `stop` works by signal.
    pub fn start(ctx: ControlContext, run_dir: &Path, metrics: Option<SocketAddr>) -> Result<Self> {
        let ctx = Arc::new(ctx);
        let path = crate::control::socket_path(run_dir, ctx.id);
        let control = match ControlServer::start(&path, Arc::clone(&ctx)) {
            Ok(c) => Some(c),
            Err(e) => {
                error!("no control socket, so `ublk-cache ctl` cannot reach this server: {e:#}");
                None
            }
        };
        let metrics = match metrics {
            Some(a) => Some(MetricsServer::start(a, Arc::clone(&ctx))?),
            None => None,
        };
        Ok(Self {
            ctx,
            control,
            _metrics: metrics,
        })
    }

    /// Stop answering; returns the context (which holds the backend lock until dropped).
    pub fn stop(self) -> Arc<ControlContext> {
        if let Some(c) = self.control {
            c.stop();
        }
        self.ctx
    }
}
