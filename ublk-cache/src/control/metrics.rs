//! `--metrics ADDR`: the `ctl stats` counters in Prometheus text exposition
//! format (version 0.0.4) over a minimal HTTP/1.0 responder. Loopback unless
//! an address is given. Names: `ublk_cache_<what>[_<unit>][_total]`, every
//! series labelled `disk="ID"`; see the README's metrics table.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tracing::{info, warn};

use super::server::{ControlContext, ServerStats};

/// Parse `PORT`, `:PORT` or `HOST:PORT` (HOST defaults to 127.0.0.1).
pub fn parse_addr(s: &str) -> Result<SocketAddr> {
    let s = s.trim();
    let full = if let Ok(port) = s.trim_start_matches(':').parse::<u16>() {
        format!("127.0.0.1:{port}")
    } else {
        s.to_string()
    };
    full.to_socket_addrs()
        .map_err(|e| anyhow!("--metrics {s}: not PORT or HOST:PORT ({e})"))?
        .next()
        .ok_or_else(|| anyhow!("--metrics {s}: resolves to no address"))
}

pub fn render(s: &ServerStats) -> String {
    let mut o = String::new();
    let d = s.id;
    let e = &s.engine;
    let mut metric = |name: &str, kind: &str, help: &str, series: &[(&str, u64)]| {
        let _ = writeln!(o, "# HELP ublk_cache_{name} {help}");
        let _ = writeln!(o, "# TYPE ublk_cache_{name} {kind}");
        for (labels, v) in series {
            let sep = if labels.is_empty() { "" } else { "," };
            let _ = writeln!(o, "ublk_cache_{name}{{disk=\"{d}\"{sep}{labels}}} {v}");
        }
    };
    metric("up", "gauge", "1 while the server runs.", &[("", 1)]);
    let mode_series: Vec<(String, u64)> = policies::CacheMode::ALL
        .iter()
        .map(|m| (format!("mode=\"{m}\""), (m.as_str() == e.mode) as u64))
        .collect();
    let ms: Vec<(&str, u64)> = mode_series.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "mode",
        "gauge",
        "The current cache mode (1 for the current one).",
        &ms,
    );
    metric(
        "device_size_bytes",
        "gauge",
        "Size of the served disk.",
        &[("", e.size)],
    );
    metric(
        "capacity_bytes",
        "gauge",
        "Bytes of cache data space.",
        &[("", e.cache_lines * e.line_size)],
    );
    metric(
        "valid_bytes",
        "gauge",
        "Bytes of data held in the cache (clean and dirty).",
        &[("", e.valid_bytes)],
    );
    metric(
        "dirty_bytes",
        "gauge",
        "Bytes in the cache not yet written back.",
        &[("", e.dirty_bytes)],
    );
    metric(
        "requests_total",
        "counter",
        "Guest requests by operation and cache result.",
        &[
            ("op=\"read\",result=\"hit\"", e.read_hits),
            ("op=\"read\",result=\"miss\"", e.read_misses),
            ("op=\"read\",result=\"partial\"", e.read_partial),
            ("op=\"write\",result=\"hit\"", e.write_hits),
            ("op=\"write\",result=\"miss\"", e.write_misses),
            ("op=\"write\",result=\"partial\"", e.write_partial),
        ],
    );
    metric(
        "guest_bytes_total",
        "counter",
        "Bytes the guest read (by where they came from) and wrote.",
        &[
            ("op=\"read\",source=\"cache\"", e.read_hit_bytes),
            ("op=\"read\",source=\"backend\"", e.read_miss_bytes),
            ("op=\"write\",source=\"guest\"", e.write_bytes),
        ],
    );
    metric(
        "backend_bytes_total",
        "counter",
        "Bytes read from and written to the backend (all causes).",
        &[
            ("op=\"read\"", e.backend_read_bytes),
            ("op=\"write\"", e.backend_write_bytes),
        ],
    );
    metric(
        "cache_device_bytes_total",
        "counter",
        "Line data bytes read from and written to the cache device.",
        &[
            ("op=\"read\"", e.cache_read_bytes),
            ("op=\"write\"", e.cache_write_bytes),
        ],
    );
    metric(
        "writeback_bytes_total",
        "counter",
        "Dirty bytes written back.",
        &[("", e.writeback_bytes)],
    );
    metric(
        "writeback_retries_total",
        "counter",
        "Write-back batches the backend failed (retried with backoff).",
        &[("", e.writeback_retries)],
    );
    metric(
        "ordered_overwrites_in_place_total",
        "counter",
        "Ordered overwrites that went in place because write-back was failing or stalled.",
        &[("", e.ordered_overwrites_in_place)],
    );
    metric(
        "preload_bytes_total",
        "counter",
        "Bytes fetched by preload and hydration.",
        &[("", e.preload_bytes)],
    );
    metric(
        "errors_total",
        "counter",
        "Failed requests to the backend and to the cache device.",
        &[
            ("device=\"backend\"", e.backend_errors),
            ("device=\"cache\"", e.cache_errors),
        ],
    );
    metric(
        "flushes_total",
        "counter",
        "Guest flushes and FUA writes.",
        &[("", e.flushes)],
    );
    metric(
        "writeback_epoch",
        "gauge",
        "The write-back epoch new writes join.",
        &[("", e.epoch)],
    );
    metric(
        "cache_device_flushes_total",
        "counter",
        "Flushes of the cache device (format v2: one per guest FLUSH that had something new).",
        &[("", e.cache_flushes)],
    );
    metric(
        "metadata_write_bytes_total",
        "counter",
        "Bytes of metadata (log records, tables, superblocks) written to the cache device.",
        &[("", e.meta_write_bytes)],
    );
    metric(
        "writeback_flushed_epoch",
        "gauge",
        "Every epoch up to this one is on the backend and flushed there (format v2).",
        &[("", e.flushed_epoch)],
    );
    metric(
        "writeback_order_broken_since_epoch",
        "gauge",
        "0, or the epoch since which overwrites went in place: the backend alone is not a flush-point state until write-back catches up.",
        &[("", e.order_broken_since)],
    );
    metric(
        "migrated_out",
        "gauge",
        "1 between migrate-out and stop or migrate-abort.",
        &[("", s.migrated_out as u64)],
    );
    let _ = writeln!(
        o,
        "# HELP ublk_cache_request_latency_seconds Guest request latency (upper bucket bounds)."
    );
    let _ = writeln!(o, "# TYPE ublk_cache_request_latency_seconds summary");
    for l in &e.latency {
        for (q, v) in [
            ("0.5", l.p50_us),
            ("0.9", l.p90_us),
            ("0.99", l.p99_us),
            ("0.999", l.p999_us),
        ] {
            let _ = writeln!(
                o,
                "ublk_cache_request_latency_seconds{{disk=\"{d}\",op=\"{}\",quantile=\"{q}\"}} {}",
                l.op,
                v as f64 / 1e6
            );
        }
        let _ = writeln!(
            o,
            "ublk_cache_request_latency_seconds_sum{{disk=\"{d}\",op=\"{}\"}} {}",
            l.op,
            (l.mean_us as f64 * l.count as f64) / 1e6
        );
        let _ = writeln!(
            o,
            "ublk_cache_request_latency_seconds_count{{disk=\"{d}\",op=\"{}\"}} {}",
            l.op, l.count
        );
    }
    o
}

pub struct MetricsServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(addr: SocketAddr, ctx: Arc<ControlContext>) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("--metrics: cannot listen on {addr}"))?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            if let Err(e) = answer(conn, &ctx) {
                                warn!("metrics request: {e}");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50))
                        }
                        Err(e) => {
                            warn!("metrics accept: {e}");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })?;
        info!(%addr, "metrics at http://{addr}/metrics");
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answer one request: `GET /metrics` gets the exposition, anything else 404.
/// One request per connection; a client that sends nothing is cut off.
fn answer(mut conn: TcpStream, ctx: &ControlContext) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 4096];
    let mut got = 0;
    while got < buf.len() {
        let n = conn.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
        if buf[..got].windows(4).any(|w| w == b"\r\n\r\n")
            || buf[..got].windows(2).any(|w| w == b"\n\n")
        {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..got]);
    let first = head.lines().next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) =
        if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                render(&ctx.stats()),
            )
        } else {
            (
                "404 Not Found",
                "text/plain; charset=utf-8",
                "only GET /metrics is served\n".to_string(),
            )
        };
    write!(
        conn,
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
