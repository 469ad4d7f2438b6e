//! Metadata RAM per GiB of cache at 64 KiB lines: the daemon's anonymous
//! memory (RssAnon) before attach, after attach, with every cache line
//! mapped and clean, and with every line dirty, plus the crash shadow's size
//! (a tmpfs file, so RAM too). Caches and backends are sparse files, read and
//! written with O_DIRECT, so their data never shows up in the process's memory.
//!
//!   metadata-ram [--json] [GIB...]   (default: 1 4; BENCH_DIR picks the directory)
//!
//! With `--json`, one JSON object per size on stdout instead of the table.
//!
//! The numbers are RSS growth, so they include the allocator's slack; the
//! in-memory per-line record's own size is printed beside them.

use clap::Parser;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use policies::CacheMode;
use rbd_backend::{Backend, FaultyBackend, FileBackend, OpenOptions};
use ublk_cache::target::BlockTarget;
use ublk_cache::{Engine, EngineConfig};

const KIB: f64 = 1024.0;
const LINE: u64 = 64 << 10;

/// RssAnon of this process, in bytes.
fn rss_anon() -> Result<u64, String> {
    let s = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| "no RssAnon in /proc/self/status".to_string())
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn sparse(p: &Path, n: u64) -> Result<(), String> {
    std::fs::File::create(p)
        .and_then(|f| f.set_len(n))
        .map_err(|e| format!("{}: {e}", p.display()))
}

struct Row {
    gib: u64,
    lines: u64,
    attach: u64,
    clean: u64,
    dirty: u64,
    shadow: u64,
}

fn measure(gib: u64, base: &Path, shadow_dir: &Path) -> Result<Row, String> {
    let dir = tempfile::tempdir_in(base).map_err(|e| format!("bench dir: {e}"))?;
    let data = gib << 30;
    // The cache holds `data` bytes of lines plus its metadata; the backend is
    // exactly as large as the cache's lines, so every line can be mapped.
    let cache_bytes = data + (16 << 20);
    let (bp, cp) = (dir.path().join("backend.img"), dir.path().join("cache.img"));
    sparse(&bp, data)?;
    sparse(&cp, cache_bytes)?;
    let o = OpenOptions::default();
    let backend = Arc::new(FaultyBackend::new(
        FileBackend::open(&bp, o).map_err(|e| format!("backend: {e}"))?,
    ));
    let cache: Arc<dyn Backend> =
        Arc::new(FileBackend::open(&cp, o).map_err(|e| format!("cache: {e}"))?);
    let cfg = EngineConfig {
        mode: CacheMode::Back,
        cache_bytes: Some(cache_bytes),
        line_size: Some(LINE as u32),
        shadow_dir: ublk_cache_benches::shadow_dir(),
        ..EngineConfig::default()
    };
    let before = rss_anon()?;
    let e = Engine::open(backend.clone() as Arc<dyn Backend>, Some(cache), cfg)
        .map_err(|e| format!("attaching: {e}"))?;
    let r = (|| {
        let attach = rss_anon()?.saturating_sub(before);
        let lines = e.stats().cache_lines;
        let mapped = lines.min(data / LINE);
        let mut buf = vec![0u8; 4096];
        for l in 0..mapped {
            e.read(l * LINE, &mut buf)
                .map_err(|err| format!("read: {err}"))?;
        }
        let clean = rss_anon()?.saturating_sub(before);
        // Hold the backend so the lines stay dirty while we look.
        backend.stall();
        for l in 0..mapped {
            e.write(l * LINE + 4096, &buf, false)
                .map_err(|err| format!("write: {err}"))?;
        }
        let dirty = rss_anon()?.saturating_sub(before);
        Ok(Row {
            gib,
            lines,
            attach,
            clean,
            dirty,
            shadow: dir_bytes(shadow_dir),
        })
    })();
    backend.release();
    // Let the flusher's stalled batch finish before dropping everything.
    std::thread::sleep(Duration::from_millis(10));
    e.abandon();
    e.forget_crash_shadow();
    r
}

/// Metadata RAM per GiB of cache.
#[derive(Debug, clap::Parser)]
#[command(name = "metadata-ram")]
struct Opts {
    /// Cache sizes in GiB.
    #[arg(default_values_t = [1u64, 4], value_parser = clap::value_parser!(u64).range(1..))]
    gib: Vec<u64>,
    /// One JSON object per size instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() {
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    // The shadow lives in tmpfs in production (/dev/shm); measure it there too.
    let shm = Path::new("/dev/shm");
    let shadow = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    };
    let shadow = match shadow {
        Ok(s) => s,
        Err(e) => {
            eprintln!("metadata-ram: shadow dir: {e}");
            std::process::exit(1);
        }
    };
    ublk_cache_benches::use_shadow_dir(shadow.path());
    let Opts { gib: sizes, json } = Opts::parse();
    let line_rec = ublk_cache::engine::slot_record_bytes(64 * 1024);
    if !json {
        print_header(line_rec);
    }
    for gib in sizes {
        match measure(gib, Path::new(&base), shadow.path()) {
            Ok(r) if json => println!(
                "{{\"cache_gib\": {}, \"lines\": {}, \"line_record_bytes\": {line_rec}, \"attach_bytes\": {}, \"clean_bytes\": {}, \"dirty_bytes\": {}, \"shadow_bytes\": {}}}",
                r.gib, r.lines, r.attach, r.clean, r.dirty, r.shadow
            ),
            Ok(r) => print_row(&r),
            Err(e) => {
                eprintln!("metadata-ram: {gib} GiB: {e}");
                std::process::exit(1);
            }
        }
    }
}

fn print_header(line_rec: usize) {
    println!("In-memory slot record (`engine::slots`): {line_rec} bytes per line, {:.0} KiB per GiB at 64 KiB lines.", line_rec as f64 * 16384.0 / KIB);
    println!();
    println!("| cache | lines (64 KiB) | after attach | all lines clean | all lines dirty | crash shadow (tmpfs) | per GiB: clean + shadow | per GiB: dirty + shadow |");
    println!("|---|---|---|---|---|---|---|---|");
}

fn print_row(r: &Row) {
    let per = |x: u64| (x + r.shadow) as f64 / KIB / KIB / r.gib as f64;
    println!(
        "| {} GiB | {} | {:.0} KiB | {:.0} KiB | {:.0} KiB | {:.0} KiB | {:.2} MiB | {:.2} MiB |",
        r.gib,
        r.lines,
        r.attach as f64 / KIB,
        r.clean as f64 / KIB,
        r.dirty as f64 / KIB,
        r.shadow as f64 / KIB,
        per(r.clean),
        per(r.dirty),
    );
}
