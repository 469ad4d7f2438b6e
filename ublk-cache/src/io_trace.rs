//! `--io-trace FILE`: every guest request, with the time it was submitted and
//! the time it completed, for studying a workload and replaying it
//! (`io-replay` in the bench crate keeps its dependencies: see there).
//!
//! A debug tool, so it must never slow the guest down or stop it: requests go
//! to a writer thread through a bounded queue, and when the queue is full the
//! record is dropped and counted (the file's last line says how many). The
//! file is text, one request per line in completion order:
//!
//! ```text
//! # ublk-cache io-trace 1
//! # submit_us complete_us op offset len result
//! 1200 1890 R 0 4096 0
//! 1950 2400 W 4096 8192 0
//! 2410 5120 F 0 0 0
//! # dropped 0
//! ```
//! Times are microseconds since the trace started; `op` is `R` read, `W`
//! write, `WF` write with FUA, `F` flush, `D` discard, `Z` write-zeroes;
//! `result` is 0 or `-errno`.

use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

const HEADER: &str = "# ublk-cache io-trace 1";
/// Records queued for the writer at most; beyond, they are dropped.
const QUEUE: usize = 1 << 16;
/// How long a record may sit in the writer's buffer: a trace of a server
/// that is killed loses at most this much.
const WRITE_EVERY: Duration = Duration::from_millis(500);

/// What a guest asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceOp {
    Read,
    Write,
    WriteFua,
    Flush,
    Discard,
    WriteZeroes,
}

impl TraceOp {
    fn code(self) -> &'static str {
        match self {
            TraceOp::Read => "R",
            TraceOp::Write => "W",
            TraceOp::WriteFua => "WF",
            TraceOp::Flush => "F",
            TraceOp::Discard => "D",
            TraceOp::WriteZeroes => "Z",
        }
    }

    fn from_code(s: &str) -> Option<Self> {
        Some(match s {
            "R" => TraceOp::Read,
            "W" => TraceOp::Write,
            "WF" => TraceOp::WriteFua,
            "F" => TraceOp::Flush,
            "D" => TraceOp::Discard,
            "Z" => TraceOp::WriteZeroes,
            _ => return None,
        })
    }
}

/// One request of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRecord {
    pub submit_us: u64,
    pub complete_us: u64,
    pub op: TraceOp,
    pub offset: u64,
    pub len: u64,
    /// 0, or `-errno`.
    pub result: i32,
}

impl fmt::Display for TraceRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} {} {}",
            self.submit_us,
            self.complete_us,
            self.op.code(),
            self.offset,
            self.len,
            self.result
        )
    }
}

/// A trace file that cannot be read as one, naming the line and the problem.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: cannot read it: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not an io-trace of this version (its first line is not '{HEADER}')")]
    NotATrace { path: PathBuf },
    #[error("{path} line {line}: {problem}")]
    Line {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

/// A parsed trace: its records in the order of the file (completion order),
/// and the records the server dropped (the queue was full).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    pub records: Vec<TraceRecord>,
    pub dropped: u64,
}

impl Trace {
    pub fn read(path: &Path) -> Result<Trace, TraceError> {
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// `path` is only for the messages.
    pub fn parse(text: &str, path: &Path) -> Result<Trace, TraceError> {
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(TraceError::NotATrace {
                path: path.to_path_buf(),
            });
        }
        let mut t = Trace::default();
        for (i, raw) in lines.enumerate() {
            let line = i + 2;
            let bad = |problem: String| TraceError::Line {
                path: path.to_path_buf(),
                line,
                problem,
            };
            if let Some(rest) = raw.strip_prefix("# dropped ") {
                t.dropped = rest
                    .trim()
                    .parse()
                    .map_err(|e| bad(format!("dropped count '{rest}': {e}")))?;
                continue;
            }
            if raw.starts_with('#') || raw.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = raw.split_ascii_whitespace().collect();
            let [submit, complete, op, offset, len, result] = f[..] else {
                return Err(bad(format!(
                    "'{raw}': expected 6 fields (submit_us complete_us op offset len result), found {}",
                    f.len()
                )));
            };
            let num = |what: &str, s: &str| -> Result<u64, TraceError> {
                s.parse()
                    .map_err(|e| bad(format!("{what} '{s}' is not a number: {e}")))
            };
            let r = TraceRecord {
                submit_us: num("submit time", submit)?,
                complete_us: num("completion time", complete)?,
                op: TraceOp::from_code(op)
                    .ok_or_else(|| bad(format!("op '{op}' is none of R, W, WF, F, D, Z")))?,
                offset: num("offset", offset)?,
                len: num("length", len)?,
                result: result
                    .parse()
                    .map_err(|e| bad(format!("result '{result}' is not a number: {e}")))?,
            };
            if r.complete_us < r.submit_us {
                return Err(bad(format!("'{raw}': completed before it was submitted")));
            }
            t.records.push(r);
        }
        Ok(t)
    }
}

/// The recording side: cheap to call from any event loop.
pub struct IoTrace {
    start: Instant,
    path: PathBuf,
    /// `None` ends the writer (sent once, by `close`).
    tx: SyncSender<Option<TraceRecord>>,
    closed: AtomicBool,
    writer: Mutex<Option<JoinHandle<io::Result<()>>>>,
    dropped: std::sync::Arc<AtomicU64>,
}

impl IoTrace {
    /// Create (or truncate) `path` and start its writer thread.
    pub fn create(path: &Path) -> io::Result<IoTrace> {
        let file = File::create(path)?;
        let (tx, rx) = mpsc::sync_channel::<Option<TraceRecord>>(QUEUE);
        let dropped = std::sync::Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        let shown = path.display().to_string();
        let write_all = move || -> io::Result<()> {
            let mut w = BufWriter::with_capacity(1 << 20, file);
            writeln!(w, "{HEADER}")?;
            writeln!(w, "# submit_us complete_us op offset len result")?;
            let mut flushed = Instant::now();
            loop {
                match rx.recv_timeout(WRITE_EVERY) {
                    Ok(Some(r)) => writeln!(w, "{r}")?,
                    Ok(None) | Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => {}
                }
                if flushed.elapsed() >= WRITE_EVERY {
                    w.flush()?;
                    flushed = Instant::now();
                }
            }
            writeln!(w, "# dropped {}", d.load(Ordering::Acquire))?;
            w.flush()?;
            w.get_ref().sync_all()
        };
        let writer = std::thread::Builder::new()
            .name("io-trace".into())
            .spawn(move || {
                let r = write_all();
                if let Err(e) = &r {
                    // Later records are counted as dropped (nothing takes them).
                    tracing::warn!("io-trace {shown}: writing stopped: {e}");
                }
                r
            })?;
        Ok(IoTrace {
            start: Instant::now(),
            path: path.to_path_buf(),
            tx,
            closed: AtomicBool::new(false),
            writer: Mutex::new(Some(writer)),
            dropped,
        })
    }

    /// Microseconds since the trace started (a request's submit time).
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// A request that completed now.
    pub fn record(&self, submit_us: u64, op: TraceOp, offset: u64, len: u64, result: i32) {
        let r = TraceRecord {
            submit_us,
            complete_us: self.now_us().max(submit_us),
            op,
            offset,
            len,
            result,
        };
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        match self.tx.try_send(Some(r)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records dropped so far (the writer fell behind).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Write out what is queued and close the file; later records are
    /// ignored. Idempotent.
    pub fn close(&self) -> io::Result<()> {
        let Some(h) = self.writer.lock().take() else {
            return Ok(());
        };
        self.closed.store(true, Ordering::Release);
        // Behind every record queued before it; fails only if the writer
        // stopped already (its error is what the join returns).
        let _ = self.tx.send(None);
        match h.join() {
            Ok(r) => r.map_err(|e| {
                io::Error::new(e.kind(), format!("io-trace {}: {e}", self.path.display()))
            }),
            Err(_) => Err(io::Error::other(format!(
                "io-trace {}: its writer thread panicked",
                self.path.display()
            ))),
        }
    }
}

impl Drop for IoTrace {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let t = IoTrace::create(&p).unwrap();
        let s = t.now_us();
        t.record(s, TraceOp::Read, 4096, 8192, 0);
        t.record(s, TraceOp::WriteFua, 0, 512, -5);
        t.record(s, TraceOp::Flush, 0, 0, 0);
        t.close().unwrap();
        t.record(s, TraceOp::Read, 0, 1, 0);
        let got = Trace::read(&p).unwrap();
        let ops: Vec<_> = got
            .records
            .iter()
            .map(|r| (r.op, r.offset, r.len, r.result))
            .collect();
        assert_eq!(
            ops,
            [
                (TraceOp::Read, 4096, 8192, 0),
                (TraceOp::WriteFua, 0, 512, -5),
                (TraceOp::Flush, 0, 0, 0)
            ]
        );
        assert!(got.records.iter().all(|r| r.complete_us >= r.submit_us));
        assert_eq!(got.dropped, 0);
    }

    #[test]
    fn records_reach_the_file_while_requests_keep_coming() {
        // One every 50 ms for 1.5 s, never a 500 ms pause: the writer must
        // still write them out every 500 ms, not only when idle or closed.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let t = IoTrace::create(&p).unwrap();
        for i in 0..30 {
            t.record(t.now_us(), TraceOp::Read, i * 4096, 4096, 0);
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let lines = text.lines().filter(|l| !l.starts_with('#')).count();
        assert!(
            lines >= 10,
            "only {lines} records on disk after 1.5 s of requests"
        );
        t.close().unwrap();
    }

    #[test]
    fn a_bad_trace_is_refused_naming_the_line() {
        let p = Path::new("x.trace");
        let err = |text: &str| Trace::parse(text, p).unwrap_err().to_string();
        assert!(err("1 2 R 0 4096 0\n").contains("not an io-trace"));
        let h = format!("{HEADER}\n");
        assert!(err(&format!("{h}1 2 R 0 4096\n")).contains("line 2"));
        assert!(err(&format!("{h}# c\n1 2 Q 0 4096 0\n")).contains("line 3: op 'Q'"));
        assert!(err(&format!("{h}5 2 R 0 4096 0\n")).contains("completed before"));
        assert!(err(&format!("{h}1 2 R -1 4096 0\n")).contains("offset '-1'"));
        let ok = Trace::parse(&format!("{h}1 2 D 0 4096 0\n# dropped 3\n"), p).unwrap();
        assert_eq!((ok.records.len(), ok.dropped), (1, 3));
    }
}
