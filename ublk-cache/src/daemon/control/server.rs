//! The server side of the control socket: an accept thread, one short-lived
//! thread per connection (a long `flush` never blocks `stats`), and a sampler
//! that turns counters into rates once a second.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use policies::CacheMode;
use tracing::{info, warn};

use super::{
    FlushReply, InvalidateReply, Line, MigrateAbortReply, MigrateOutReply, ModeReply, PreloadReply,
    Rates, Reply, Request, StatsReply, WritebackLimitReply, MAX_REQUEST,
};
use crate::daemon::error::{DaemonError, DaemonResult};
use crate::engine::{PreloadOptions, Progress, StatsSnapshot};
use crate::Engine;

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;

/// What the control server knows about its server.
pub struct ControlContext {
    pub id: u32,
    pub engine: Arc<Engine>,
    pub backend: String,
    pub cache: String,
    /// What `ctl preload` without ranges preloads: the `--preload` ranges.
    pub preload_ranges: Vec<(u64, u64)>,
    pub preload_rate: Option<u64>,
    /// The mode to return to while migrated out (`migrate-out` done, no abort yet).
    migrated_from: Mutex<Option<CacheMode>>,
    started: Instant,
    rates: Mutex<Sampler>,
}

/// Turns counters into rates once a second.
#[derive(Debug, Default)]
struct Sampler {
    rates: Rates,
    last: Option<(Instant, [u64; 5])>,
}

impl Sampler {
    fn sample(&mut self, s: &StatsSnapshot) {
        let now = Instant::now();
        let cur = [
            s.writeback_bytes,
            s.backend_read_bytes,
            s.backend_write_bytes,
            s.read_hit_bytes + s.read_miss_bytes,
            s.write_bytes,
        ];
        if let Some((t, prev)) = self.last {
            let dt = now.duration_since(t).as_secs_f64().max(1e-3);
            let r = |i: usize| (cur[i].saturating_sub(prev[i]) as f64 / dt) as u64;
            self.rates = Rates {
                writeback_bps: r(0),
                backend_read_bps: r(1),
                backend_write_bps: r(2),
                read_bps: r(3),
                write_bps: r(4),
            };
        }
        self.last = Some((now, cur));
    }
}

impl ControlContext {
    pub fn new(
        id: u32,
        engine: Arc<Engine>,
        backend: String,
        cache: String,
        preload_ranges: Vec<(u64, u64)>,
        preload_rate: Option<u64>,
    ) -> Self {
        Self {
            id,
            engine,
            backend,
            cache,
            preload_ranges,
            preload_rate,
            migrated_from: Mutex::new(None),
            started: Instant::now(),
            rates: Mutex::new(Sampler::default()),
        }
    }

    pub fn stats(&self) -> StatsReply {
        StatsReply {
            id: self.id,
            backend: self.backend.clone(),
            cache: self.cache.clone(),
            uptime_s: self.started.elapsed().as_secs(),
            migrated_out: lock(&self.migrated_from).is_some(),
            hydrated: self.engine.hydration_done(),
            engine: self.engine.stats(),
            rates: lock(&self.rates).rates,
        }
    }

    fn sample(&self) {
        let s = self.engine.stats();
        lock(&self.rates).sample(&s);
    }

    /// Carry out one request. Long ones report progress through `progress`.
    pub fn handle(
        &self,
        req: Request,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> DaemonResult<Reply> {
        let e = &self.engine;
        let engine_err = |what: &str| {
            let what = what.to_string();
            move |err| DaemonError::engine(what, err)
        };
        Ok(match req {
            Request::Stats => Reply::Stats(Box::new(self.stats())),
            Request::Mode { mode: new } => {
                if lock(&self.migrated_from).is_some() {
                    return Err(DaemonError::refused(
                        "the disk is migrated out (serving write-through for the destination); run migrate-abort first",
                    ));
                }
                let old = e
                    .set_mode(new, Some(progress))
                    .map_err(engine_err("mode switch"))?;
                Reply::Mode(ModeReply {
                    previous: old,
                    mode: new,
                })
            }
            Request::Flush => {
                e.flush_to_backend(Some(progress))
                    .map_err(engine_err("flush"))?;
                Reply::Flush(FlushReply {
                    dirty_bytes: e.stats().dirty_bytes,
                })
            }
            Request::Preload { ranges } => {
                let ranges =
                    match ranges {
                        Some(r) => r,
                        None if !self.preload_ranges.is_empty() => self.preload_ranges.clone(),
                        None => return Err(DaemonError::refused(
                            "give a RANGE to preload (this server was started without --preload)",
                        )),
                    };
                let opts = PreloadOptions {
                    rate: self.preload_rate,
                };
                let mut total = 0;
                let mut fetched = 0;
                for (off, len) in ranges {
                    let r = e
                        .preload(off, len, opts, None, Some(progress))
                        .map_err(engine_err("preload"))?;
                    total += r.total;
                    fetched += r.fetched;
                    if r.interrupted {
                        return Err(DaemonError::refused(
                            "preload interrupted (the server is stopping or the mode changed)",
                        ));
                    }
                }
                Reply::Preload(PreloadReply { total, fetched })
            }
            Request::WritebackLimit {
                bytes_per_sec,
                writes_per_sec,
            } => {
                if let Some(r) = bytes_per_sec {
                    policies::pacing::check_rate(r)
                        .map_err(|e| DaemonError::refused(format!("--rate {e}")))?;
                }
                let mut l = e.writeback_limit();
                let some = |v: u64| (v > 0).then_some(v);
                if let Some(v) = bytes_per_sec {
                    l.bytes_per_sec = some(v);
                }
                if let Some(v) = writes_per_sec {
                    l.writes_per_sec = some(v);
                }
                if bytes_per_sec.is_some() || writes_per_sec.is_some() {
                    e.set_writeback_limit(l);
                    info!(
                        bytes_per_sec = l.bytes_per_sec.unwrap_or(0),
                        writes_per_sec = l.writes_per_sec.unwrap_or(0),
                        "write-back limit changed (0: none)"
                    );
                }
                Reply::WritebackLimit(WritebackLimitReply {
                    bytes_per_sec: l.bytes_per_sec.unwrap_or(0),
                    writes_per_sec: l.writes_per_sec.unwrap_or(0),
                })
            }
            Request::Invalidate => {
                let dropped = e.invalidate_clean().map_err(engine_err("invalidate"))?;
                Reply::Invalidate(InvalidateReply {
                    dropped_bytes: dropped,
                })
            }
            Request::MigrateOut => {
                let mut m = lock(&self.migrated_from);
                if let Some(prev) = *m {
                    // Idempotent: a retried premigrate hook must not lose the mode to go back to.
                    Reply::MigrateOut(MigrateOutReply {
                        ready: true,
                        previous: prev,
                        already: true,
                    })
                } else {
                    // Nothing dirty, the backend flushed, its lock released (the
                    // backend lets it go itself: an flock or an RBD lock).
                    let prev = e
                        .migrate_out(Some(progress))
                        .map_err(engine_err("migrate-out"))?;
                    *m = Some(prev);
                    Reply::MigrateOut(MigrateOutReply {
                        ready: true,
                        previous: prev,
                        already: false,
                    })
                }
            }
            Request::MigrateAbort => {
                let mut m = lock(&self.migrated_from);
                let Some(prev) = *m else {
                    return Err(DaemonError::refused(
                        "no migration to abort: migrate-out was not run on this server",
                    ));
                };
                e.migrate_abort(prev).map_err(engine_err(
                    "migrate-abort (if the destination server runs, stop it, or migrate back, first)",
                ))?;
                *m = None;
                Reply::MigrateAbort(MigrateAbortReply { mode: prev })
            }
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl ControlServer {
    /// Bind `path` (0600) and start answering requests for `ctx`.
    pub fn start(path: &Path, ctx: Arc<ControlContext>) -> DaemonResult<Self> {
        let (listener, path) = crate::unix_socket::bind(path, 0o600, "control")
            .map_err(|e| DaemonError::refused(format!("control socket {}: {e}", path.display())))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| DaemonError::io("control socket: set_nonblocking", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (c, s) = (Arc::clone(&ctx), Arc::clone(&stop));
        threads.push(
            std::thread::Builder::new()
                .name("ctl-accept".into())
                .spawn(move || accept_loop(listener, c, s))
                .map_err(|e| DaemonError::io("starting the control thread", e))?,
        );
        let (c, s) = (ctx, Arc::clone(&stop));
        threads.push(
            std::thread::Builder::new()
                .name("ctl-sampler".into())
                .spawn(move || {
                    while !s.load(Ordering::Acquire) {
                        c.sample();
                        std::thread::sleep(Duration::from_secs(1));
                    }
                })
                .map_err(|e| DaemonError::io("starting the stats sampler", e))?,
        );
        info!(path = %path.display(), "control socket ready");
        Ok(Self {
            path,
            stop,
            threads,
        })
    }

    /// Stop accepting and remove the socket. Requests in progress finish on
    /// their own threads. (Dropping it does the same, so a start that fails
    /// after the socket was bound leaves no socket behind.)
    pub fn stop(self) {}
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, ctx: Arc<ControlContext>, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((conn, _)) => {
                if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                    let _ = reply_error(&conn, "too many control connections at once; try again");
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (c, a) = (Arc::clone(&ctx), Arc::clone(&active));
                let spawned =
                    std::thread::Builder::new()
                        .name("ctl-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve_conn(conn, &c) {
                                warn!("control connection: {e}");
                            }
                            a.fetch_sub(1, Ordering::AcqRel);
                        });
                if let Err(e) = spawned {
                    active.fetch_sub(1, Ordering::AcqRel);
                    warn!("control connection dropped: cannot start a thread: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Sleep until a client connects, waking once a second to see a
                // stop (the sampler beside it sleeps as long): an idle server
                // costs one wakeup a second, not twenty.
                use std::os::fd::AsFd;
                let fds = [listener.as_fd()];
                if let Err(e) = crate::unix_socket::poll_readable(&fds, Duration::from_secs(1)) {
                    warn!("control socket poll: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            Err(e) => {
                warn!("control socket accept: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn write_line(mut conn: &UnixStream, r: &Line) -> std::io::Result<()> {
    let mut s = serde_json::to_string(r).map_err(std::io::Error::other)?;
    s.push('\n');
    conn.write_all(s.as_bytes())
}

fn reply_error(conn: &UnixStream, msg: &str) -> std::io::Result<()> {
    write_line(
        conn,
        &Line::Done {
            ok: false,
            result: None,
            error: Some(msg.to_string()),
            remedies: Vec::new(),
        },
    )
}

fn serve_conn(conn: UnixStream, ctx: &ControlContext) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    // A client that connects and says nothing must not hold a thread forever.
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = Vec::new();
    let n = BufReader::new((&conn).take(MAX_REQUEST as u64 + 1)).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(());
    }
    if line.len() > MAX_REQUEST {
        reply_error(&conn, &format!("request longer than {MAX_REQUEST} bytes"))?;
        return Ok(());
    }
    let req: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            reply_error(&conn, &format!("malformed request: {e}"))?;
            return Ok(());
        }
    };
    info!(id = ctx.id, request = ?req, "control request");
    let progress = |p: &Progress| {
        // A client that went away only loses its progress lines.
        let _ = write_line(
            &conn,
            &Line::Progress {
                progress: p.clone(),
            },
        );
    };
    let done = match ctx.handle(req, &progress) {
        Ok(r) => Line::Done {
            ok: true,
            result: Some(serde_json::to_value(r).map_err(std::io::Error::other)?),
            error: None,
            remedies: Vec::new(),
        },
        Err(e) => Line::Done {
            ok: false,
            result: None,
            error: Some(e.chain()),
            remedies: e
                .engine_error()
                .map(|e| e.remedies().to_vec())
                .unwrap_or_default(),
        },
    };
    write_line(&conn, &done)?;
    Ok(())
}
