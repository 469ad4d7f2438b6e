//! What runs in the background beside the data path: the start preload and
//! offline mode's hydration today (boot-trace replay and write-back pacing
//! later). All jobs share one [`StopToken`]; stopping the jobs cancels it and
//! joins every thread, before the engine stops.

use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{error, info, warn};

use super::config::{PreloadStart, ServeConfig};
use super::error::{DaemonError, DaemonResult};
use super::progress::ProgressView;
use super::ranges;
use super::stop::StopToken;
use crate::engine::PreloadOptions;
use crate::Engine;

/// What to preload at start.
#[derive(Debug, Clone, Default)]
pub struct PreloadPlan {
    pub ranges: Vec<(u64, u64)>,
    pub rate: Option<u64>,
    /// The exports appear only after the preload.
    pub wait: bool,
}

impl PreloadPlan {
    pub fn from_config(c: &ServeConfig) -> DaemonResult<Self> {
        let ranges = match (c.preload, &c.preload_ranges) {
            (Some(_), Some(_)) => {
                return Err(DaemonError::config(
                    "--preload and --preload-ranges exclude each other; give one",
                ))
            }
            (Some(n), None) if n.0 == 0 => Vec::new(),
            (Some(n), None) => vec![(0, n.0)],
            (None, Some(f)) => ranges::parse_ranges_file(f)?,
            (None, None) => Vec::new(),
        };
        let wait = c.preload_start == PreloadStart::BeforeExports;
        if wait && ranges.is_empty() {
            return Err(DaemonError::config(
                "--preload-wait needs --preload SIZE or --preload-ranges FILE",
            ));
        }
        if !ranges.is_empty() && !c.mode.uses_cache() {
            return Err(DaemonError::config(format!(
                "--preload reads into the cache, but mode '{}' uses none",
                c.mode
            )));
        }
        Ok(Self {
            ranges,
            rate: c.preload_rate.map(|r| r.0),
            wait,
        })
    }

    pub fn opts(&self) -> PreloadOptions {
        PreloadOptions { rate: self.rate }
    }

    /// Preload in the foreground (`--preload-wait`), before any export is live.
    pub fn run_now(&self, engine: &Engine) -> DaemonResult<()> {
        let view = ProgressView::default();
        for &(off, len) in &self.ranges {
            let r = engine
                .preload(off, len, self.opts(), None, Some(&|p| view.show(p)))
                .map_err(|e| DaemonError::engine(format!("preloading {off}+{len}"), e))?;
            if r.interrupted {
                return Err(DaemonError::refused("preload interrupted"));
            }
        }
        Ok(())
    }
}

/// The background jobs of one server.
pub struct Jobs {
    stop: StopToken,
    threads: Vec<JoinHandle<()>>,
}

impl Jobs {
    /// Start what `mode` and `plan` ask for: hydration when the mode hydrates
    /// at start, the preload unless it already ran in the foreground.
    pub fn start(engine: &Arc<Engine>, plan: &PreloadPlan) -> DaemonResult<Self> {
        let mut jobs = Jobs {
            stop: StopToken::new(),
            threads: Vec::new(),
        };
        if engine.mode().hydrates_at_start() {
            let (e, opts) = (Arc::clone(engine), plan.opts());
            jobs.spawn("hydrate", move |stop| {
                let view = ProgressView::default();
                match e.hydrate(opts, Some(stop.flag()), Some(&|p| view.show(p))) {
                    Ok(r) if r.interrupted => {
                        info!("hydration stopped early; the next start continues it")
                    }
                    Ok(r) => info!(
                        fetched = r.fetched,
                        "hydration complete: the whole image is in the cache"
                    ),
                    // The device keeps serving (misses read through); a restart
                    // continues where this stopped.
                    Err(e) => error!("hydration failed, misses keep reading through: {e}"),
                }
            })?;
        }
        if !plan.wait && !plan.ranges.is_empty() {
            let (e, p) = (Arc::clone(engine), plan.clone());
            jobs.spawn("preload", move |stop| {
                let view = ProgressView::default();
                for &(off, len) in &p.ranges {
                    match e.preload(
                        off,
                        len,
                        p.opts(),
                        Some(stop.flag()),
                        Some(&|x| view.show(x)),
                    ) {
                        Ok(r) if r.interrupted => return,
                        Ok(_) => {}
                        Err(err) => {
                            warn!(
                                "preload of {off}+{len} failed (the device serves anyway): {err}"
                            );
                            return;
                        }
                    }
                }
            })?;
        }
        Ok(jobs)
    }

    /// Run `job` on a thread of its own; it should return soon once `stop` is set.
    pub fn spawn(
        &mut self,
        name: &str,
        job: impl FnOnce(&StopToken) + Send + 'static,
    ) -> DaemonResult<()> {
        let stop = self.stop.clone();
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || job(&stop))
            .map_err(|e| DaemonError::io(format!("starting the {name} thread"), e))?;
        self.threads.push(t);
        Ok(())
    }

    /// Cancel every job and wait for them.
    pub fn stop(self) {
        self.stop.stop();
        for t in self.threads {
            let _ = t.join();
        }
    }
}
