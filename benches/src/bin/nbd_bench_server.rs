//! An NBD server for the fio benchmarks (`benches/run.py`): the library's
//! `Engine` and `NbdServer`, as `ublk-cache serve` runs them, but over a file
//! backend wrapped in `FaultyBackend` with injected latency or a bandwidth
//! limit (a slow backend), in any mode, with or without a cache.
//!
//!   nbd-bench-server --backend PATH --socket PATH [--mode none|back|through|around]
//!       [--cache PATH --cache-size SIZE] [--read-delay-ms N] [--write-delay-ms N]
//!       [--flush-delay-ms N] [--bandwidth BYTES_PER_SEC]
//!       [--preload SIZE] [--boot-trace MODE --boot-trace-dir DIR
//!        --boot-trace-key KEY [--boot-trace-window SECS]]
//!
//! `--preload` fetches the first SIZE bytes in the background while serving
//! (as `serve --preload` does); `--boot-trace` runs the server's boot-trace
//! job itself (`benches/boot-prefetch.py`). At stop it prints what stays
//! cached, what was read from the backend, and the boot-trace counts.
//!
//! Prints the URI on stdout once the export is live. Stops when stdin reaches
//! end of file: the listeners close, requests already received are answered,
//! dirty data is written back (as at a clean `serve` stop), the cache detaches
//! warm, and the process exits 0. A cache file that does not exist is created
//! sparse with `--cache-size` bytes and formatted.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use policies::CacheMode;
use rbd_backend::{Backend, BlockIo, FaultyBackend, FileBackend, OpenOptions};
use ublk_cache::boot_trace::BootTraceMode;
use ublk_cache::daemon::boot_trace::BootTraceJob;
use ublk_cache::daemon::config::ServeConfig;
use ublk_cache::engine::PreloadOptions;
use ublk_cache::frontend::nbd::{ListenSpec, Listeners, NbdOptions, NbdServer};
use ublk_cache::{Engine, EngineConfig};
use ublk_cache_benches::{parse_ms, parse_size};

/// An NBD server over a slow file backend, for the fio benchmarks.
#[derive(Debug, clap::Parser)]
#[command(name = "nbd-bench-server")]
struct Opts {
    /// The backend file.
    #[arg(long)]
    backend: PathBuf,
    /// The unix socket to serve on.
    #[arg(long)]
    socket: PathBuf,
    /// none, around, through or back.
    #[arg(long, default_value = "back")]
    mode: CacheMode,
    /// The cache file (created if missing, with --cache-size bytes).
    #[arg(long)]
    cache: Option<PathBuf>,
    #[arg(long, value_parser = parse_size)]
    cache_size: Option<u64>,
    /// Milliseconds each backend read waits first.
    #[arg(long = "read-delay-ms", value_parser = parse_ms, default_value = "0")]
    read_delay: Duration,
    #[arg(long = "write-delay-ms", value_parser = parse_ms, default_value = "0")]
    write_delay: Duration,
    #[arg(long = "flush-delay-ms", value_parser = parse_ms, default_value = "0")]
    flush_delay: Duration,
    /// Bytes per second that reads and writes share (e.g. 80M; 0: unlimited).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    bandwidth: u64,
    /// Fetch the first SIZE bytes into the cache in the background.
    #[arg(long, value_parser = parse_size)]
    preload: Option<u64>,
    #[arg(long, default_value = "off")]
    boot_trace: BootTraceMode,
    #[arg(long)]
    boot_trace_dir: Option<PathBuf>,
    #[arg(long)]
    boot_trace_key: Option<String>,
    #[arg(long)]
    boot_trace_window: Option<u32>,
}

fn parse() -> Result<Opts, String> {
    let o = Opts::parse();
    if o.mode.uses_cache() && o.cache.is_none() {
        return Err(format!("--mode {} needs --cache", o.mode));
    }
    Ok(o)
}

fn open_cache(path: &PathBuf, size: Option<u64>) -> Result<Arc<dyn BlockIo>, String> {
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
            .bandwidth(o.bandwidth)
            .build(),
    );
    let cache = match (&o.cache, o.mode.uses_cache()) {
        (Some(p), true) => Some(open_cache(p, o.cache_size)?),
        _ => None,
    };
    let cfg = EngineConfig {
        mode: o.mode,
        cache_bytes: o.cache_size,
        // A binary may read the environment: benches/run.py gives each bench
        // server a private shadow directory.
        shadow_dir: std::env::var_os("UBLK_CACHE_SHADOW_DIR")
            .map_or_else(ublk_cache_benches::shadow_dir, Into::into),
        ..EngineConfig::default()
    };
    let engine = Engine::open(backend, cache, cfg).map_err(|e| format!("attaching: {e}"))?;
    let serve_cfg = ServeConfig {
        mode: o.mode,
        boot_trace: o.boot_trace,
        boot_trace_dir: o.boot_trace_dir.clone(),
        boot_trace_key: o.boot_trace_key.clone(),
        boot_trace_window: o.boot_trace_window,
        ..ServeConfig::default()
    };
    BootTraceJob::validate(&serve_cfg).map_err(|e| e.to_string())?;
    let boot = BootTraceJob::start(&serve_cfg, &engine).map_err(|e| e.to_string())?;
    let cancel = Arc::new(AtomicBool::new(false));
    let preload = o.preload.map(|n| {
        let (e, c) = (Arc::clone(&engine), Arc::clone(&cancel));
        std::thread::spawn(move || {
            if let Err(err) = e.preload(0, n, PreloadOptions { rate: None }, Some(&c), None) {
                eprintln!("nbd-bench-server: preload: {err}");
            }
        })
    });
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
    cancel.store(true, Ordering::Release);
    if let Some(t) = preload {
        let _ = t.join();
    }
    if let Some(b) = boot {
        b.stop();
    }
    let before = engine.stats();
    engine
        .shutdown()
        .map_err(|e| format!("stopping the engine: {e}"))?;
    // After the stop's write-back: what stays cached for the next run
    // (benches/run.py reads it from the log, as it reads `serve`'s).
    let st = engine.stats();
    let b = &before.boot_trace;
    eprintln!(
        "nbd-bench-server: stopped cached_lines={} cached_bytes={} dirty_lines={} backend_read_bytes={} preload_bytes={} boot_fetched_bytes={} boot_used_bytes={} boot_precision={:.3} boot_recall={:.3} boot_recorded_lines={}",
        st.cached_lines,
        st.valid_bytes,
        st.dirty_lines,
        before.backend_read_bytes,
        before.preload_bytes,
        b.fetched_bytes,
        b.used_bytes,
        b.precision,
        b.recall,
        b.recorded_lines
    );
    Ok(())
}

fn main() {
    let r = parse().and_then(run);
    if let Err(e) = r {
        eprintln!("nbd-bench-server: {e}");
        std::process::exit(1);
    }
}
