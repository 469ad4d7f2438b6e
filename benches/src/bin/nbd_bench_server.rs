//! An NBD server for the fio benchmarks (`benches/run.py`): the library's
//! `Engine` and `NbdServer`, as `ublk-cache serve` runs them, but over a file
//! backend wrapped in `FaultyBackend` with injected latency (a slow backend),
//! in any mode, with or without a cache.
//!
//!   nbd-bench-server --backend PATH --socket PATH [--mode none|back|through|around]
//!       [--cache PATH --cache-size SIZE] [--read-delay-ms N] [--write-delay-ms N]
//!       [--flush-delay-ms N]
//!
//! Prints the URI on stdout once the export is live. Stops when stdin reaches
//! end of file: the listeners close, requests already received are answered,
//! dirty data is written back (as at a clean `serve` stop), the cache detaches
//! warm, and the process exits 0. A cache file that does not exist is created
//! sparse with `--cache-size` bytes and formatted.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use policies::CacheMode;
use rbd_backend::{Backend, FaultyBackend, FileBackend, OpenOptions};
use ublk_cache::frontend::nbd::{ListenSpec, Listeners, NbdOptions, NbdServer};
use ublk_cache::{Engine, EngineConfig};
use ublk_cache_benches::{parse_size, Args};

struct Opts {
    backend: PathBuf,
    socket: PathBuf,
    mode: CacheMode,
    cache: Option<PathBuf>,
    cache_size: Option<u64>,
    read_delay: Duration,
    write_delay: Duration,
    flush_delay: Duration,
}

fn parse() -> Result<Opts, String> {
    let mut a = Args::from_env(
        "nbd-bench-server --backend PATH --socket PATH [--mode none|back|through|around] \
         [--cache PATH --cache-size SIZE] [--read-delay-ms N] [--write-delay-ms N] [--flush-delay-ms N]",
    )?;
    let backend = PathBuf::from(a.required("--backend")?);
    let socket = PathBuf::from(a.required("--socket")?);
    let mode: CacheMode = match a.optional("--mode")? {
        Some(m) => m.parse().map_err(|e| format!("--mode {m}: {e}"))?,
        None => CacheMode::Back,
    };
    let cache = a.optional("--cache")?.map(PathBuf::from);
    let cache_size = a
        .optional("--cache-size")?
        .map(|s| parse_size(&s))
        .transpose()?;
    let ms = |v: Option<String>, name: &str| -> Result<Duration, String> {
        match v {
            None => Ok(Duration::ZERO),
            Some(s) => s
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .map(|x| Duration::from_secs_f64(x / 1000.0))
                .ok_or_else(|| format!("{name} {s}: not a number of milliseconds")),
        }
    };
    let read_delay = ms(a.optional("--read-delay-ms")?, "--read-delay-ms")?;
    let write_delay = ms(a.optional("--write-delay-ms")?, "--write-delay-ms")?;
    let flush_delay = ms(a.optional("--flush-delay-ms")?, "--flush-delay-ms")?;
    a.finish()?;
    if mode.uses_cache() && cache.is_none() {
        return Err(format!("--mode {mode} needs --cache"));
    }
    Ok(Opts {
        backend,
        socket,
        mode,
        cache,
        cache_size,
        read_delay,
        write_delay,
        flush_delay,
    })
}

fn open_cache(path: &PathBuf, size: Option<u64>) -> Result<Arc<dyn Backend>, String> {
    if !path.exists() {
        let size = size.ok_or_else(|| {
            format!(
                "cache {} does not exist; --cache-size says how large to create it",
                path.display()
            )
        })?;
        std::fs::File::create(path)
            .and_then(|f| f.set_len(size))
            .map_err(|e| format!("cache {}: cannot create: {e}", path.display()))?;
    }
    let c = FileBackend::open(path, OpenOptions::default())
        .map_err(|e| format!("cache {}: {e}", path.display()))?;
    Ok(Arc::new(c))
}

fn run(o: Opts) -> Result<(), String> {
    let file = FileBackend::open(&o.backend, OpenOptions::default())
        .map_err(|e| format!("backend {}: {e}", o.backend.display()))?;
    let backend: Arc<dyn Backend> = Arc::new(
        FaultyBackend::builder(file)
            .read_delay(o.read_delay)
            .write_delay(o.write_delay)
            .flush_delay(o.flush_delay)
            .build(),
    );
    let cache = match (&o.cache, o.mode.uses_cache()) {
        (Some(p), true) => Some(open_cache(p, o.cache_size)?),
        _ => None,
    };
    let cfg = EngineConfig {
        mode: o.mode,
        cache_bytes: o.cache_size,
        ..EngineConfig::default()
    };
    let engine = Engine::open(backend, cache, cfg).map_err(|e| format!("attaching: {e}"))?;
    let listeners =
        Listeners::bind(&[ListenSpec::Unix(o.socket.clone())], 0o600).map_err(|e| e.to_string())?;
    let server = match NbdServer::start(listeners, Arc::clone(&engine), NbdOptions::default()) {
        Ok(s) => s,
        Err(e) => {
            let _ = engine.shutdown();
            return Err(e.to_string());
        }
    };
    {
        let mut out = std::io::stdout().lock();
        for u in server.uris() {
            let _ = writeln!(out, "{u}");
        }
        let _ = out.flush();
    }
    // Serve until stdin closes (the runner holds it open).
    let mut sink = [0u8; 256];
    let mut stdin = std::io::stdin().lock();
    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
    server.stop();
    engine
        .shutdown()
        .map_err(|e| format!("stopping the engine: {e}"))
}

fn main() {
    let r = parse().and_then(run);
    if let Err(e) = r {
        eprintln!("nbd-bench-server: {e}");
        std::process::exit(1);
    }
}
