//! Write-back drain throughput: fill a fresh cache in `back` mode with dirty
//! whole lines while the backend is held (so nothing drains early), then let
//! the flusher go and time until no line is dirty. `benches/run.py` runs it
//! interleaved with fio's sequential 1 MiB write on the backend file (the
//! backend's sequential bandwidth) and prints the ratio.
//!
//!   writeback-drain --backend PATH --cache PATH [--bytes 256M] [--write-delay-ms N]
//!
//! Besides the rate it prints what the drain asked of the backend (writes,
//! their mean size, flushes) and how many durable watermark rounds the cache
//! device ran, so that a slow drain shows where its time went.
//!
//! The backend file must exist and be at least `--bytes` long; its content is
//! overwritten. The cache file is created (replacing any file there) and
//! removed afterwards. Prints one JSON object on stdout.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use policies::CacheMode;
use rbd_backend::{Backend, BlockIo, FaultyBackend, FileBackend, OpenOptions};
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};
use ublk_cache_benches::{parse_millis, parse_size};

const MIB: u64 = 1 << 20;

/// Write-back drain throughput.
#[derive(Debug, clap::Parser)]
#[command(name = "writeback-drain")]
struct Opts {
    /// The backend file (at least --bytes long; overwritten).
    #[arg(long)]
    backend: PathBuf,
    /// The cache file (created, replacing any file there, and removed afterwards).
    #[arg(long)]
    cache: PathBuf,
    /// Dirty data to drain.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    bytes: u64,
    /// Milliseconds each backend write and flush waits first.
    #[arg(long = "write-delay-ms", value_parser = parse_millis, default_value = "0")]
    write_delay_ms: f64,
}

fn run() -> Result<(), String> {
    let o = Opts::parse();
    let (backend_path, cache_path, bytes) = (o.backend, o.cache, o.bytes);
    let delay_ms = o.write_delay_ms;
    if bytes < MIB || !bytes.is_multiple_of(MIB) {
        return Err(format!(
            "--bytes {bytes}: must be a positive multiple of 1 MiB"
        ));
    }

    let shadow = tempfile::tempdir().map_err(|e| format!("shadow dir: {e}"))?;
    ublk_cache_benches::use_shadow_dir(shadow.path());

    let file = FileBackend::open(&backend_path, OpenOptions::default())
        .map_err(|e| format!("backend {}: {e}", backend_path.display()))?;
    if file.size() < bytes {
        return Err(format!(
            "backend {} holds {} bytes, less than --bytes {bytes}",
            backend_path.display(),
            file.size()
        ));
    }
    let backend = Arc::new(
        FaultyBackend::builder(file)
            .write_delay(Duration::from_secs_f64(delay_ms / 1000.0))
            .flush_delay(Duration::from_secs_f64(delay_ms / 1000.0))
            .build(),
    );
    let _ = std::fs::remove_file(&cache_path);
    let cache_bytes = bytes + bytes / 8 + 8 * MIB;
    std::fs::File::create(&cache_path)
        .and_then(|f| f.set_len(cache_bytes))
        .map_err(|e| format!("cache {}: cannot create: {e}", cache_path.display()))?;
    let cache = FileBackend::open(&cache_path, OpenOptions::default())
        .map_err(|e| format!("cache {}: {e}", cache_path.display()))?;
    let cfg = EngineConfig {
        mode: CacheMode::Back,
        cache_bytes: Some(cache_bytes),
        shadow_dir: ublk_cache_benches::shadow_dir(),
        ..EngineConfig::default()
    };
    let e = Engine::open(
        backend.clone() as Arc<dyn Backend>,
        Some(Arc::new(cache) as Arc<dyn Backend>),
        cfg,
    )
    .map_err(|e| format!("attaching: {e}"))?;

    let result = (|| {
        // Hold the backend; fill with whole 1 MiB pieces in a scattered order.
        backend.stall();
        let chunks = bytes / MIB;
        let data = vec![0xa5u8; MIB as usize];
        // A stride coprime with the chunk count visits every chunk once.
        let stride = (0..)
            .map(|k| chunks / 2 + 1 + k)
            .find(|s| gcd(*s, chunks) == 1)
            .unwrap_or(1);
        for i in 0..chunks {
            let c = (i * stride) % chunks;
            e.write(c * MIB, &data, false)
                .map_err(|err| format!("filling the cache: {err}"))?;
        }
        e.flush().map_err(|err| format!("flush: {err}"))?;
        let st = e.stats();
        let dirty = st.dirty_lines * st.line_size;
        let rounds_before = st.watermark_own_rounds + st.watermark_shared_rounds;
        backend.reset_stats();
        let t = Instant::now();
        backend.release();
        while e.stats().dirty_lines > 0 {
            if t.elapsed() > Duration::from_secs(3600) {
                return Err("write-back did not finish within an hour".to_string());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let secs = t.elapsed().as_secs_f64();
        let st = e.stats();
        let rounds = st.watermark_own_rounds + st.watermark_shared_rounds - rounds_before;
        Ok((dirty, secs, st.line_size, backend.stats(), rounds))
    })();
    backend.release();
    let stop = e.shutdown();
    let _ = std::fs::remove_file(&cache_path);
    let (dirty, secs, line_size, ops, rounds) = result?;
    stop.map_err(|err| format!("stopping the engine: {err}"))?;
    println!(
        "{{\"bytes\": {dirty}, \"seconds\": {secs:.6}, \"mib_s\": {:.3}, \"line_size\": {line_size}, \"write_delay_ms\": {delay_ms}, \"backend_writes\": {}, \"backend_write_bytes\": {}, \"backend_flushes\": {}, \"watermark_rounds\": {rounds}}}",
        dirty as f64 / MIB as f64 / secs,
        ops.writes,
        ops.bytes_written,
        ops.flushes,
    );
    Ok(())
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("writeback-drain: {e}");
        std::process::exit(1);
    }
}
