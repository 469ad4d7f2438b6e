//! Replay an io-trace (`ublk-cache serve --io-trace FILE`) against an NBD
//! export or a file or block device, keeping its dependencies (see
//! `ublk_cache_benches::replay`), and print how long it took against how
//! long the recording took. Writes carry a fixed pattern (a replay rewrites
//! what it writes); reads are not checked.
//!   io-replay --trace FILE --target nbd+unix:///?socket=S | nbd://HOST:PORT | PATH
//!             [--workers 32] [--json OUT]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use testkit::nbd_client::Client;
use ublk_cache::io_trace::{Trace, TraceOp};
use ublk_cache_benches::replay::{self, Device, Step};

#[derive(Parser)]
#[command(about = "Replay an io-trace with its dependencies kept")]
struct Args {
    /// The trace (`ublk-cache serve --io-trace FILE`).
    #[arg(long)]
    trace: PathBuf,
    /// `nbd+unix:///?socket=PATH`, `nbd://HOST:PORT`, or a file or device path.
    #[arg(long)]
    target: String,
    /// Connections (requests in flight at most).
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The largest request a worker's buffer holds (a trace's larger ones are
/// refused at start, not half replayed).
const MAX_REQUEST: u64 = 32 << 20;

struct Nbd {
    c: Client,
    buf: Vec<u8>,
}

impl Device for Nbd {
    fn run(&mut self, s: &Step) -> Result<(), String> {
        let r = match s.op {
            TraceOp::Read => self.c.read(s.offset, s.len as u32).map(|r| r.map(drop)),
            TraceOp::Write | TraceOp::WriteFua => {
                let fua = s.op == TraceOp::WriteFua;
                self.c.write(s.offset, &self.buf[..s.len as usize], fua)
            }
            TraceOp::Flush => self.c.flush(),
            TraceOp::Discard | TraceOp::WriteZeroes => {
                // NBD lengths are 32-bit: larger ranges go in pieces.
                let mut r = Ok(Ok(()));
                let (mut at, end) = (s.offset, s.offset + s.len);
                while at < end && matches!(r, Ok(Ok(()))) {
                    let n = (end - at).min(1 << 30) as u32;
                    r = if s.op == TraceOp::Discard {
                        self.c.trim(at, n)
                    } else {
                        self.c.write_zeroes(at, n, 0)
                    };
                    at += n as u64;
                }
                r
            }
        };
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(errno)) => Err(format!(
                "{:?} {}+{}: NBD error {errno}",
                s.op, s.offset, s.len
            )),
            Err(e) => Err(format!("{:?} {}+{}: {e}", s.op, s.offset, s.len)),
        }
    }
}

struct Path {
    f: File,
    buf: Vec<u8>,
}

impl Device for Path {
    fn run(&mut self, s: &Step) -> Result<(), String> {
        let n = s.len as usize;
        let r = match s.op {
            TraceOp::Read => self.f.read_exact_at(&mut self.buf[..n], s.offset),
            TraceOp::Write => self.f.write_all_at(&self.buf[..n], s.offset),
            TraceOp::WriteFua => self
                .f
                .write_all_at(&self.buf[..n], s.offset)
                .and_then(|()| self.f.sync_data()),
            TraceOp::Flush => self.f.sync_data(),
            // Advisory: nothing to replay on a plain file.
            TraceOp::Discard => Ok(()),
            TraceOp::WriteZeroes => {
                // In pieces of at most 1 MiB.
                let z = vec![0u8; n.clamp(1, 1 << 20)];
                let mut r = Ok(());
                let mut at = 0;
                while at < n && r.is_ok() {
                    let k = z.len().min(n - at);
                    r = self.f.write_all_at(&z[..k], s.offset + at as u64);
                    at += k;
                }
                r
            }
        };
        r.map_err(|e| format!("{:?} {}+{}: {e}", s.op, s.offset, s.len))
    }
}

fn devices(target: &str, workers: usize, max_len: usize) -> Result<Vec<Box<dyn Device>>> {
    let pattern: Vec<u8> = (0..max_len).map(|i| (i % 251) as u8).collect();
    let mut out: Vec<Box<dyn Device>> = Vec::with_capacity(workers);
    for _ in 0..workers {
        if target.starts_with("nbd") {
            let c =
                Client::connect_uri(target).with_context(|| format!("connecting to {target}"))?;
            out.push(Box::new(Nbd {
                c,
                buf: pattern.clone(),
            }));
        } else {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(target)
                .with_context(|| format!("opening {target}"))?;
            out.push(Box::new(Path {
                f,
                buf: pattern.clone(),
            }));
        }
    }
    Ok(out)
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let trace = Trace::read(&args.trace)?;
    if trace.records.is_empty() {
        bail!("{}: no requests in it", args.trace.display());
    }
    // Reads and writes carry data through a worker's buffer; discards and
    // write-zeroes do not.
    let max_len = trace
        .records
        .iter()
        .filter(|r| matches!(r.op, TraceOp::Read | TraceOp::Write | TraceOp::WriteFua))
        .map(|r| r.len)
        .max()
        .unwrap_or(0);
    if max_len > MAX_REQUEST {
        bail!(
            "{}: a read or write of {max_len} bytes, larger than the {MAX_REQUEST} this replayer handles",
            args.trace.display()
        );
    }
    if trace.dropped > 0 {
        eprintln!(
            "io-replay: warning: the trace lost {} requests (its writer fell behind); they are not replayed",
            trace.dropped
        );
    }
    let plan = replay::plan(&trace.records);
    let devs = devices(&args.target, args.workers, max_len as usize)?;
    let out = replay::run(&plan, devs);
    let recorded = replay::recorded_span(&trace.records);
    let reads: Vec<Duration> = plan
        .iter()
        .zip(&out.latency)
        .filter(|(s, _)| s.op == TraceOp::Read)
        .map(|(_, &l)| l)
        .collect();
    let read_bytes: u64 = plan
        .iter()
        .filter(|s| s.op == TraceOp::Read)
        .map(|s| s.len)
        .sum();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "io-replay: {} requests ({} reads, {} MiB read) with {} workers against {}",
        plan.len(),
        reads.len(),
        read_bytes >> 20,
        args.workers,
        args.target
    );
    println!(
        "io-replay: replay {:.1} ms, recording {:.1} ms, ratio {:.3}; read latency p50 {:.3} ms p99 {:.3} ms; {} failed ({} as in the recording)",
        ms(out.span),
        ms(recorded),
        out.span.as_secs_f64() / recorded.as_secs_f64().max(1e-9),
        ms(percentile(reads.clone(), 0.5)),
        ms(percentile(reads.clone(), 0.99)),
        out.failed,
        out.failed_as_recorded
    );
    if let Some(p) = &args.json {
        let j = serde_json::json!({
            "requests": plan.len(),
            "reads": reads.len(),
            "read_bytes": read_bytes,
            "workers": args.workers,
            "replay_ms": ms(out.span),
            "recorded_ms": ms(recorded),
            "read_p50_ms": ms(percentile(reads.clone(), 0.5)),
            "read_p99_ms": ms(percentile(reads, 0.99)),
            "failed": out.failed,
            "failed_as_recorded": out.failed_as_recorded,
        });
        std::fs::write(p, serde_json::to_string_pretty(&j)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(e) = out.first_error {
        bail!(
            "{} requests failed that the recording had done; the first: {e}",
            out.failed - out.failed_as_recorded
        );
    }
    Ok(())
}
