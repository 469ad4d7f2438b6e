//! Recording what a guest reads while it boots, cheaply enough to run on
//! every request: two bits per cache line (read first, written whole first)
//! in atomic words, and a short lock only the first time a line is read.
//! Recording ends at the end of its window (from the guest's first request),
//! once it has seen its line budget, or when asked.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::merge::BootSet;

pub struct BootRecorder {
    line_size: u64,
    disk_size: u64,
    window: Duration,
    /// Lines recorded at most (a boot reads a few percent of a disk; a guest
    /// that reads all of it is not booting).
    max_lines: u64,
    read: Vec<AtomicU64>,
    written: Vec<AtomicU64>,
    first_reads: Mutex<Vec<(u64, u32)>>,
    born: Instant,
    /// µs after `born` of the guest's first request, plus one (0: none yet).
    started_us: AtomicU64,
    on: AtomicBool,
}

fn bit(words: &[AtomicU64], line: u64) -> (&AtomicU64, u64) {
    (&words[(line / 64) as usize], 1u64 << (line % 64))
}

impl BootRecorder {
    /// `max_lines`: 10 % of the disk or 4 GiB of lines, whichever is less.
    pub fn new(disk_size: u64, line_size: u64, window: Duration) -> Self {
        let line_size = line_size.max(512);
        let lines = disk_size.div_ceil(line_size);
        let words = lines.div_ceil(64) as usize;
        let max_lines = (lines / 10).min((4u64 << 30) / line_size).max(1);
        Self {
            line_size,
            disk_size,
            window,
            max_lines,
            read: (0..words).map(|_| AtomicU64::new(0)).collect(),
            written: (0..words).map(|_| AtomicU64::new(0)).collect(),
            first_reads: Mutex::new(Vec::new()),
            born: Instant::now(),
            started_us: AtomicU64::new(0),
            on: AtomicBool::new(true),
        }
    }

    /// ms since the guest's first request (which starts the window).
    fn elapsed_ms(&self) -> u64 {
        let now = self.born.elapsed().as_micros() as u64 + 1;
        // A load on every request, a compare-and-swap only at the first.
        let mut start = self.started_us.load(Ordering::Acquire);
        if start == 0 {
            start =
                match self
                    .started_us
                    .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => now,
                    Err(s) => s,
                };
        }
        // Two first requests racing may set a start after this one's clock.
        now.saturating_sub(start) / 1000
    }

    /// A guest request (a read when `read`, else something that changes data).
    pub fn note(&self, read: bool, offset: u64, len: u64) {
        if !self.on.load(Ordering::Relaxed) || len == 0 || offset >= self.disk_size {
            return;
        }
        let t = self.elapsed_ms();
        if t > self.window.as_millis() as u64 {
            self.on.store(false, Ordering::Release);
            return;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        let ls = self.line_size;
        if !read {
            // Only lines the write covers whole: a read of the rest of a
            // partly written line still needs the backend's data.
            let (first, last) = (offset.div_ceil(ls), end / ls);
            for l in first..last {
                let (w, b) = bit(&self.written, l);
                w.fetch_or(b, Ordering::Relaxed);
            }
            return;
        }
        for l in offset / ls..end.div_ceil(ls) {
            let (w, b) = bit(&self.written, l);
            if w.load(Ordering::Relaxed) & b != 0 {
                continue;
            }
            let (r, b) = bit(&self.read, l);
            if r.load(Ordering::Relaxed) & b != 0 || r.fetch_or(b, Ordering::Relaxed) & b != 0 {
                continue;
            }
            let mut f = self.first_reads.lock();
            if f.len() as u64 >= self.max_lines {
                self.on.store(false, Ordering::Release);
                return;
            }
            f.push((l, t as u32));
        }
    }

    /// Lines recorded so far (read first, before any write covered them).
    pub fn recorded_lines(&self) -> u64 {
        self.first_reads.lock().len() as u64
    }

    /// Whether recording ended (its window passed, or its line budget).
    pub fn ended(&self) -> bool {
        if !self.on.load(Ordering::Acquire) {
            return true;
        }
        let s = self.started_us.load(Ordering::Acquire);
        s != 0 && self.born.elapsed() > Duration::from_micros(s) + self.window
    }

    /// Stop recording; what this boot read, in first-read order.
    pub fn finish(&self) -> BootSet {
        self.on.store(false, Ordering::Release);
        let s = self.started_us.load(Ordering::Acquire);
        let window_ms = if s == 0 {
            0
        } else {
            let ran = self.born.elapsed().saturating_sub(Duration::from_micros(s));
            ran.min(self.window).as_millis() as u32
        };
        BootSet {
            line_size: self.line_size,
            lines: self.first_reads.lock().clone(),
            window_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LS: u64 = 65536;

    #[test]
    fn lines_first_read_are_recorded_once_and_whole_written_lines_never() {
        let r = BootRecorder::new(1 << 30, LS, Duration::from_secs(60));
        r.note(false, 2 * LS, LS); // line 2 written whole first
        r.note(false, 3 * LS + 512, 4096); // line 3 written in part
        r.note(true, 5 * LS + 100, 2 * LS); // lines 5, 6, 7
        r.note(true, 0, 4 * LS); // 0, 1, 3 (2 was written)
        r.note(true, 6 * LS, 10); // seen already
        let lines: Vec<u64> = r.finish().lines.iter().map(|x| x.0).collect();
        assert_eq!(lines, [5, 6, 7, 0, 1, 3]);
        r.note(true, 9 * LS, 1);
        assert_eq!(r.finish().lines.len(), 6, "nothing after finish");
        assert!(r.ended());
    }

    #[test]
    fn recording_stops_at_its_line_budget_and_at_the_end_of_its_window() {
        let r = BootRecorder::new(100 * LS, LS, Duration::from_secs(60));
        r.note(true, 0, 100 * LS);
        assert_eq!(r.finish().lines.len(), 10, "10 % of the disk");
        let r = BootRecorder::new(100 * LS, LS, Duration::from_millis(30));
        assert!(!r.ended(), "the window starts at the first request");
        r.note(true, 0, 1);
        std::thread::sleep(Duration::from_millis(60));
        assert!(r.ended());
        r.note(true, LS, 1);
        let b = r.finish();
        assert_eq!((b.lines.len(), b.window_ms), (1, 30));
    }
}
