//! `--metrics ADDR`: the `ctl stats` counters for Prometheus, in the
//! OpenMetrics text format (written by the `prometheus-client` crate from the
//! stats at each scrape), over a minimal HTTP/1.0 responder. Loopback unless
//! an address is given. Names: `ublk_cache_<what>[_<unit>][_total]`, every
//! series labelled `disk="ID"`; request latency is a histogram (so that the
//! many disks of a host can be aggregated); see the README's metrics table.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use super::server::ControlContext;
use super::StatsReply;
use crate::daemon::error::{DaemonError, DaemonResult};
use crate::engine::{bucket_upper_us, BootPhase, BootTraceStats, LatencySnapshot};

type Labels = Vec<(&'static str, String)>;

/// Upper edges of the exported latency buckets, in microseconds: every other
/// power of two from 1 µs to about 67 s (the engine's finer buckets re-bucket
/// exactly at powers of two), then +Inf.
const EXPORT_EDGES_US: [u64; 14] = {
    let mut e = [0u64; 14];
    let mut i = 0;
    while i < 14 {
        e[i] = 1 << (2 * i);
        i += 1;
    }
    e
};

/// The latency histogram of one operation with the exported edges: (upper
/// edge in seconds, count in that bucket), the last edge +Inf.
fn latency_buckets(l: &LatencySnapshot) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = EXPORT_EDGES_US
        .iter()
        .map(|&us| (us as f64 / 1e6, 0))
        .chain(std::iter::once((f64::MAX, 0)))
        .collect();
    for (i, &c) in l.buckets.iter().enumerate() {
        let upper = bucket_upper_us(i);
        let at = EXPORT_EDGES_US
            .iter()
            .position(|&e| upper <= e)
            .unwrap_or(EXPORT_EDGES_US.len());
        out[at].1 += c;
    }
    out
}

/// The stats of one server, encoded at each scrape.
#[derive(Debug)]
struct StatsCollector(StatsReply);

fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: Vec<(Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in &series {
        let e = m.encode_family(labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(*v).encode(e)?,
            _ => ConstGauge::new(*v as i64).encode(e)?,
        }
    }
    Ok(())
}

impl Collector for StatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let s = &self.0;
        let e = &s.engine;
        let disk = s.id.to_string();
        let one = |v: u64| vec![(vec![("disk", disk.clone())], v)];
        let with = |pairs: &[(&[(&'static str, &str)], u64)]| -> Vec<(Labels, u64)> {
            pairs
                .iter()
                .map(|(extra, v)| {
                    let mut l: Labels = vec![("disk", disk.clone())];
                    l.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
                    (l, *v)
                })
                .collect()
        };
        family(
            &mut enc,
            "ublk_cache_up",
            "1 while the server runs.",
            Gauge,
            one(1),
        )?;
        let modes: Vec<(Labels, u64)> = policies::CacheMode::ALL
            .iter()
            .map(|m| {
                (
                    vec![("disk", disk.clone()), ("mode", m.to_string())],
                    (m.as_str() == e.mode) as u64,
                )
            })
            .collect();
        family(
            &mut enc,
            "ublk_cache_mode",
            "The current cache mode (1 for the current one).",
            Gauge,
            modes,
        )?;
        for (name, help, v) in [
            (
                "ublk_cache_device_size_bytes",
                "Size of the served disk.",
                e.size,
            ),
            (
                "ublk_cache_capacity_bytes",
                "Bytes of cache data space.",
                e.cache_lines * e.line_size,
            ),
            (
                "ublk_cache_valid_bytes",
                "Bytes of data held in the cache (clean and dirty).",
                e.valid_bytes,
            ),
            (
                "ublk_cache_dirty_bytes",
                "Bytes in the cache not yet written back.",
                e.dirty_bytes,
            ),
        ] {
            family(&mut enc, name, help, Gauge, one(v))?;
        }
        if e.writeback_controlled() {
            let capacity = e.cache_lines * e.line_size;
            for (name, help, v) in [
                (
                    "ublk_cache_writeback_pi_rate_bytes_per_second",
                    "The dirty-level controller's write-back rate (0: unpaced).",
                    e.writeback_control_rate,
                ),
                (
                    "ublk_cache_writeback_pi_integral_rate_bytes_per_second",
                    "The part of the controller's rate that its integral term gives.",
                    e.writeback_control_integral_rate,
                ),
                (
                    "ublk_cache_writeback_target_bytes",
                    "The low watermark in use: dirty line bytes up to which write-back runs at its minimum rate (0 while the guest is idle).",
                    e.writeback_control_low_bytes,
                ),
                (
                    "ublk_cache_writeback_high_bytes",
                    "The high watermark: dirty line bytes from which write-back runs unpaced.",
                    capacity * e.writeback_high_pct / 100,
                ),
                (
                    "ublk_cache_dirty_line_bytes",
                    "Bytes of the cache lines that hold dirty data (what the watermarks measure).",
                    e.dirty_lines * e.line_size,
                ),
            ] {
                family(&mut enc, name, help, Gauge, one(v))?;
            }
            let regimes: Vec<(Labels, u64)> = policies::Regime::ALL
                .iter()
                .map(|r| {
                    (
                        vec![("disk", disk.clone()), ("state", r.as_str().to_string())],
                        (r.as_str() == e.writeback_control) as u64,
                    )
                })
                .collect();
            family(
                &mut enc,
                "ublk_cache_writeback_control",
                "What the dirty-level controller does now (1 for the current state).",
                Gauge,
                regimes,
            )?;
        }
        family(
            &mut enc,
            "ublk_cache_requests",
            "Guest requests by operation and cache result.",
            Counter,
            with(&[
                (&[("op", "read"), ("result", "hit")], e.read_hits),
                (&[("op", "read"), ("result", "miss")], e.read_misses),
                (&[("op", "read"), ("result", "partial")], e.read_partial),
                (&[("op", "write"), ("result", "hit")], e.write_hits),
                (&[("op", "write"), ("result", "miss")], e.write_misses),
                (&[("op", "write"), ("result", "partial")], e.write_partial),
            ]),
        )?;
        family(
            &mut enc,
            "ublk_cache_guest_bytes",
            "Bytes the guest read (by where they came from) and wrote.",
            Counter,
            with(&[
                (&[("op", "read"), ("source", "cache")], e.read_hit_bytes),
                (&[("op", "read"), ("source", "backend")], e.read_miss_bytes),
                (&[("op", "write"), ("source", "guest")], e.write_bytes),
            ]),
        )?;
        family(
            &mut enc,
            "ublk_cache_backend_bytes",
            "Bytes read from and written to the backend (all causes).",
            Counter,
            with(&[
                (&[("op", "read")], e.backend_read_bytes),
                (&[("op", "write")], e.backend_write_bytes),
            ]),
        )?;
        family(
            &mut enc,
            "ublk_cache_cache_device_bytes",
            "Line data bytes read from and written to the cache device.",
            Counter,
            with(&[
                (&[("op", "read")], e.cache_read_bytes),
                (&[("op", "write")], e.cache_write_bytes),
            ]),
        )?;
        for (name, help, v) in [
            (
                "ublk_cache_writeback_bytes",
                "Dirty bytes written back.",
                e.writeback_bytes,
            ),
            (
                "ublk_cache_writeback_retries",
                "Write-back batches the backend failed (retried with backoff).",
                e.writeback_retries,
            ),
            (
                "ublk_cache_ordered_overwrites_in_place",
                "Ordered overwrites that went in place because write-back was failing or stalled.",
                e.ordered_overwrites_in_place,
            ),
            (
                "ublk_cache_versions_superseded",
                "Relaxed write-back: older versions of a line dropped unwritten because a durable newer version holds all their data.",
                e.versions_superseded,
            ),
            (
                "ublk_cache_versions_merged",
                "Lines whose newer clean version was merged into the older one after write-back, keeping the older one's data cached.",
                e.versions_merged,
            ),
            (
                "ublk_cache_offline_writebacks_for_space",
                "Offline mode: write-backs before stop because a line not cached yet needed a slot that only older versions of other lines held.",
                e.offline_writebacks_for_space,
            ),
            (
                "ublk_cache_writeback_paced_milliseconds",
                "Milliseconds background write-back waited for its rate or write limit (--writeback-rate, --writeback-iops).",
                e.writeback_paced_ms,
            ),
            (
                "ublk_cache_preload_bytes",
                "Bytes fetched by preload and hydration.",
                e.preload_bytes,
            ),
            (
                "ublk_cache_cache_device_flushes",
                "Flushes of the cache device (format v2: one per metadata round; a guest FLUSH with nothing new needs none, and write-back's watermarks mostly ride in the guest's rounds).",
                e.cache_flushes,
            ),
            (
                "ublk_cache_writeback_watermark_shared_rounds",
                "Format v2: write-back watermarks made durable by a metadata round run for something else (a guest FLUSH or FUA write, eviction, a mode switch): no cache-device flush of their own.",
                e.watermark_shared_rounds,
            ),
            (
                "ublk_cache_writeback_watermark_own_rounds",
                "Format v2: write-back watermarks that needed a metadata round (and a cache-device flush) of their own.",
                e.watermark_own_rounds,
            ),
            (
                "ublk_cache_flushes_with_nothing_new",
                "Guest flushes that found everything durable already and cost no flush of the cache device (format v2).",
                e.flushes_with_nothing_new,
            ),
            (
                "ublk_cache_fua_one_pass",
                "FUA writes made durable in one pass (format v2): the data and one log record written durable, no flush of the cache device.",
                e.fua_one_pass,
            ),
            (
                "ublk_cache_metadata_write_bytes",
                "Bytes of metadata (log records, tables, superblocks) written to the cache device.",
                e.meta_write_bytes,
            ),
        ] {
            family(&mut enc, name, help, Counter, one(v))?;
        }
        family(
            &mut enc,
            "ublk_cache_errors",
            "Failed requests to the backend and to the cache device.",
            Counter,
            with(&[
                (&[("device", "backend")], e.backend_errors),
                (&[("device", "cache")], e.cache_errors),
            ]),
        )?;
        family(
            &mut enc,
            "ublk_cache_flushes",
            "Guest flushes and FUA writes.",
            Counter,
            one(e.flushes),
        )?;
        family(
            &mut enc,
            "ublk_cache_writeback_epoch",
            "The write-back epoch new writes join.",
            Gauge,
            one(e.epoch),
        )?;
        family(
            &mut enc,
            "ublk_cache_writeback_flushed_epoch",
            "Every epoch up to this one is on the backend and flushed there (format v2).",
            Gauge,
            one(e.flushed_epoch),
        )?;
        family(
            &mut enc,
            "ublk_cache_writeback_order_broken_since_epoch",
            "0, or the epoch since which overwrites went in place: the backend alone is not a flush-point state until write-back catches up.",
            Gauge,
            one(e.order_broken_since),
        )?;
        boot_trace(&mut enc, &disk, &e.boot_trace)?;
        family(
            &mut enc,
            "ublk_cache_migrated_out",
            "1 between migrate-out and stop or migrate-abort.",
            Gauge,
            one(s.migrated_out as u64),
        )?;
        let mut m = enc.encode_descriptor(
            "ublk_cache_request_latency_seconds",
            "Guest request latency.",
            None,
            MetricType::Histogram,
        )?;
        for l in &e.latency {
            let labels: Labels = vec![("disk", disk.clone()), ("op", l.op.clone())];
            let sum = l.mean_us as f64 * l.count as f64 / 1e6;
            m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                sum,
                l.count,
                &latency_buckets(l),
                None,
            )?;
        }
        Ok(())
    }
}

/// `--boot-trace`'s families, when it records or replays in this start.
fn boot_trace(
    enc: &mut DescriptorEncoder,
    disk: &str,
    b: &BootTraceStats,
) -> Result<(), std::fmt::Error> {
    use MetricType::Gauge;
    if b.record == BootPhase::Off && b.replay == BootPhase::Off {
        return Ok(());
    }
    let labelled = |pairs: &[(&'static str, &str, u64)]| -> Vec<(Labels, u64)> {
        pairs
            .iter()
            .map(|&(k, v, n)| (vec![("disk", disk.to_string()), (k, v.to_string())], n))
            .collect()
    };
    let mut states = Vec::new();
    for (what, phase) in [("record", b.record), ("replay", b.replay)] {
        for p in BootPhase::ALL {
            states.push((
                vec![
                    ("disk", disk.to_string()),
                    ("what", what.to_string()),
                    ("state", p.as_str().to_string()),
                ],
                (p == phase) as u64,
            ));
        }
    }
    family(
        enc,
        "ublk_cache_boot_trace_state",
        "Where boot recording and boot prefetch are (1 for the current state).",
        Gauge,
        states,
    )?;
    family(
        enc,
        "ublk_cache_boot_recorded_lines",
        "Cache lines the guest read first in its boot window (recording).",
        Gauge,
        vec![(vec![("disk", disk.to_string())], b.recorded_lines)],
    )?;
    family(
        enc,
        "ublk_cache_boot_prefetch_lines",
        "Boot prefetch: lines of the replay set (planned), read from the backend by prefetch (fetched), of those read by the guest then (used), and of the set read by the guest by anyone's fetch (read).",
        Gauge,
        labelled(&[
            ("what", "planned", b.planned_lines),
            ("what", "fetched", b.fetched_lines),
            ("what", "used", b.used_lines),
            ("what", "read", b.read_lines),
        ]),
    )?;
    family(
        enc,
        "ublk_cache_boot_prefetch_bytes",
        "Bytes boot prefetch read from the backend, of lines the guest then read (used) and of the rest (unused so far: a gauge, as bytes move to used when the guest reads their line).",
        Gauge,
        labelled(&[
            ("result", "used", b.used_bytes),
            ("result", "unused", b.unused_bytes),
        ]),
    )?;
    for (name, help, v) in [
        (
            "ublk_cache_boot_prefetch_precision",
            "Share of the lines boot prefetch fetched that the guest then read.",
            b.precision,
        ),
        (
            "ublk_cache_boot_prefetch_recall",
            "Share of the replay set's lines the guest read that boot prefetch had fetched.",
            b.recall,
        ),
        (
            "ublk_cache_boot_prefetch_max_lead_seconds",
            "How far ahead of the guest (in the trace's time) boot prefetch ran at most.",
            b.max_lead_ms as f64 / 1000.0,
        ),
    ] {
        let mut m = enc.encode_descriptor(name, help, None, Gauge)?;
        let labels: Labels = vec![("disk", disk.to_string())];
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The OpenMetrics text of `s`.
pub fn render(s: &StatsReply) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatsCollector(s.clone())));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

pub struct MetricsServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(addr: SocketAddr, ctx: Arc<ControlContext>) -> DaemonResult<Self> {
        let io = |what: String| move |e| DaemonError::io(what, e);
        let listener =
            TcpListener::bind(addr).map_err(io(format!("--metrics: cannot listen on {addr}")))?;
        let addr = listener.local_addr().map_err(io("--metrics".into()))?;
        listener
            .set_nonblocking(true)
            .map_err(io("--metrics".into()))?;
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
            })
            .map_err(io("starting the metrics thread".into()))?;
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
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Op, StatsSnapshot};

    fn reply() -> StatsReply {
        let lat = crate::engine::latency::Latencies::default();
        for us in [3u64, 90, 5_000, 70_000_000, 200_000_000] {
            lat.record(Op::Read, Duration::from_micros(us));
        }
        StatsReply {
            id: 7,
            backend: "file:/b".into(),
            cache: "/c".into(),
            uptime_s: 1,
            migrated_out: false,
            hydrated: false,
            engine: StatsSnapshot {
                mode: "back".into(),
                read_hits: 5,
                write_bytes: 4096,
                latency: lat.snapshot(),
                ..StatsSnapshot::default()
            },
            rates: Default::default(),
        }
    }

    #[test]
    fn the_stats_are_openmetrics_with_latency_as_a_histogram() {
        let text = render(&reply());
        for want in [
            "# TYPE ublk_cache_requests counter",
            "ublk_cache_requests_total{disk=\"7\",op=\"read\",result=\"hit\"} 5",
            "ublk_cache_guest_bytes_total{disk=\"7\",op=\"write\",source=\"guest\"} 4096",
            "ublk_cache_mode{disk=\"7\",mode=\"back\"} 1",
            "ublk_cache_mode{disk=\"7\",mode=\"none\"} 0",
            "# TYPE ublk_cache_request_latency_seconds histogram",
            "ublk_cache_request_latency_seconds_count{disk=\"7\",op=\"read\"} 5",
            "ublk_cache_request_latency_seconds_bucket{le=\"+Inf\",disk=\"7\",op=\"read\"} 5",
            "# EOF",
        ] {
            assert!(text.contains(want), "no '{want}' in:\n{text}");
        }
        // Cumulative and exact at the exported edges: 3 µs is below 4 µs, 90 µs
        // below 256 µs, 5 ms below 16.4 ms; 70 s and 200 s are above the last edge.
        let bucket = |le: &str| -> u64 {
            let line = format!(
                "ublk_cache_request_latency_seconds_bucket{{le=\"{le}\",disk=\"7\",op=\"read\"}} "
            );
            let l = text
                .lines()
                .find(|l| l.starts_with(&line))
                .unwrap_or_else(|| panic!("no {line}"));
            l[line.len()..].parse().unwrap()
        };
        assert_eq!(bucket("0.000001"), 0);
        assert_eq!(bucket("0.000004"), 1);
        assert_eq!(bucket("0.000256"), 2);
        assert_eq!(bucket("0.016384"), 3);
        assert_eq!(bucket("67.108864"), 3);
        assert!(
            !text.contains("ublk_cache_writeback_control"),
            "no controller, no controller metrics:\n{text}"
        );
        assert!(
            !text.contains("ublk_cache_boot_"),
            "no --boot-trace, no boot metrics:\n{text}"
        );
    }

    #[test]
    fn boot_prefetch_shows_its_state_hits_waste_and_quality() {
        let mut r = reply();
        r.engine.boot_trace = BootTraceStats {
            record: BootPhase::Done,
            recorded_lines: 40,
            replay: BootPhase::Running,
            planned_lines: 10,
            fetched_lines: 8,
            used_lines: 6,
            read_lines: 9,
            fetched_bytes: 8 << 16,
            used_bytes: 6 << 16,
            unused_bytes: 2 << 16,
            precision: 0.75,
            recall: 6.0 / 9.0,
            max_lead_ms: 2500,
        };
        let text = render(&r);
        for want in [
            "ublk_cache_boot_trace_state{disk=\"7\",what=\"record\",state=\"done\"} 1",
            "ublk_cache_boot_trace_state{disk=\"7\",what=\"replay\",state=\"running\"} 1",
            "ublk_cache_boot_trace_state{disk=\"7\",what=\"replay\",state=\"off\"} 0",
            "ublk_cache_boot_recorded_lines{disk=\"7\"} 40",
            "ublk_cache_boot_prefetch_lines{disk=\"7\",what=\"used\"} 6",
            "ublk_cache_boot_prefetch_bytes{disk=\"7\",result=\"unused\"} 131072",
            "ublk_cache_boot_prefetch_precision{disk=\"7\"} 0.75",
            "ublk_cache_boot_prefetch_max_lead_seconds{disk=\"7\"} 2.5",
        ] {
            assert!(text.contains(want), "no '{want}' in:\n{text}");
        }
    }

    #[test]
    fn the_dirty_level_controller_shows_its_state_rate_and_watermarks() {
        let mut r = reply();
        r.engine.writeback_control = "paced".into();
        r.engine.writeback_control_rate = 3 << 20;
        r.engine.writeback_low_pct = 10;
        r.engine.writeback_control_low_bytes = 10 << 20;
        r.engine.writeback_high_pct = 70;
        r.engine.cache_lines = 100;
        r.engine.line_size = 1 << 20;
        r.engine.dirty_lines = 25;
        let text = render(&r);
        for want in [
            "ublk_cache_writeback_control{disk=\"7\",state=\"paced\"} 1",
            "ublk_cache_writeback_control{disk=\"7\",state=\"above-high\"} 0",
            "ublk_cache_writeback_pi_rate_bytes_per_second{disk=\"7\"} 3145728",
            "ublk_cache_writeback_target_bytes{disk=\"7\"} 10485760",
            "ublk_cache_writeback_high_bytes{disk=\"7\"} 73400320",
            "ublk_cache_dirty_line_bytes{disk=\"7\"} 26214400",
        ] {
            assert!(text.contains(want), "no '{want}' in:\n{text}");
        }
    }
}
