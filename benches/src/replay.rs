//! Replaying an io-trace (`ublk-cache serve --io-trace FILE`) with its
//! dependencies kept: request *i* is issued its recorded think time after
//! the completion, in this run, of the last request that had completed
//! before *i* was submitted in the recording. A faster device then makes the
//! replay faster where the guest waited for I/O, and not where it computed
//! (its think times stay), which is what a boot or application trace
//! measures. Requests with no such predecessor start their recorded time
//! after the replay starts.
//!
//! This module plans (pure, tested here) and runs a plan on any number of
//! workers, each with its own connection to the target.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ublk_cache::io_trace::{TraceOp, TraceRecord};

/// One request of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub op: TraceOp,
    pub offset: u64,
    pub len: u64,
    /// The step (index in the plan) whose completion this one waits for.
    pub after: Option<usize>,
    /// How long after that (or after the replay's start).
    pub think: Duration,
    /// How long it took in the recording, and its result there (0 or -errno).
    pub recorded: Duration,
    pub recorded_result: i32,
}

/// The steps of `records` in submit order, each with its predecessor.
pub fn plan(records: &[TraceRecord]) -> Vec<Step> {
    let mut by_submit: Vec<&TraceRecord> = records.iter().collect();
    by_submit.sort_by_key(|r| (r.submit_us, r.complete_us));
    let t0 = by_submit.first().map_or(0, |r| r.submit_us);
    // Indices into `by_submit`, by completion time.
    let mut by_complete: Vec<usize> = (0..by_submit.len()).collect();
    by_complete.sort_by_key(|&i| (by_submit[i].complete_us, i));
    let mut next = 0;
    let mut last: Option<usize> = None;
    by_submit
        .iter()
        .enumerate()
        .map(|(i, r)| {
            // Every request completed by the time `r` was submitted; the last
            // of them (the latest completion) is what `r` waited for.
            while next < by_complete.len() {
                let j = by_complete[next];
                // Only an earlier step: two requests that took no time at
                // the same microsecond must not wait for each other.
                if by_submit[j].complete_us > r.submit_us || j >= i {
                    break;
                }
                last = Some(j);
                next += 1;
            }
            let from = last.map_or(t0, |j| by_submit[j].complete_us);
            Step {
                op: r.op,
                offset: r.offset,
                len: r.len,
                after: last,
                think: Duration::from_micros(r.submit_us - from),
                recorded: Duration::from_micros(r.complete_us - r.submit_us),
                recorded_result: r.result,
            }
        })
        .collect()
}

/// How long the recording took, first submit to last completion.
pub fn recorded_span(records: &[TraceRecord]) -> Duration {
    let first = records.iter().map(|r| r.submit_us).min().unwrap_or(0);
    let last = records.iter().map(|r| r.complete_us).max().unwrap_or(0);
    Duration::from_micros(last - first)
}

/// Runs one request on a target; a worker has one of its own.
pub trait Device: Send {
    fn run(&mut self, step: &Step) -> Result<(), String>;
}

/// What a replay measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Replay start to the last completion.
    pub span: Duration,
    /// Each step's time on its device (not its wait for a free worker), in
    /// plan order.
    pub latency: Vec<Duration>,
    /// Steps that failed, with the first error; and of them, those that
    /// had failed in the recording too.
    pub failed: usize,
    pub failed_as_recorded: usize,
    pub first_error: Option<String>,
}

/// Run `plan` on `devices` (one worker thread each; at most that many
/// requests are in flight, a ready request beyond waits for a free one).
pub fn run(plan: &[Step], devices: Vec<Box<dyn Device>>) -> Outcome {
    let n = plan.len();
    let mut out = Outcome {
        latency: vec![Duration::ZERO; n],
        ..Outcome::default()
    };
    if n == 0 || devices.is_empty() {
        return out;
    }
    let plan: Arc<Vec<Step>> = Arc::new(plan.to_vec());
    let (job_tx, job_rx) = mpsc::channel::<usize>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    type Done = (usize, Instant, Instant, Result<(), String>);
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    let mut workers = Vec::new();
    for mut dev in devices {
        let (plan, rx, tx) = (plan.clone(), job_rx.clone(), done_tx.clone());
        workers.push(std::thread::spawn(move || loop {
            let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
            let Ok(i) = job else { return };
            let began = Instant::now();
            // A device that panics fails its step; the replay goes on.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dev.run(&plan[i])))
                .unwrap_or_else(|_| Err(format!("step {i}: the device panicked")));
            if tx.send((i, began, Instant::now(), r)).is_err() {
                return;
            }
        }));
    }
    drop(done_tx);
    let mut waiting: Vec<Vec<usize>> = vec![Vec::new(); n];
    let start = Instant::now();
    let mut ready = BinaryHeap::new();
    for (i, s) in plan.iter().enumerate() {
        match s.after {
            Some(j) => waiting[j].push(i),
            None => ready.push(Reverse((start + s.think, i))),
        }
    }
    let mut done = 0;
    let mut last_end = start;
    while done < n {
        let now = Instant::now();
        while let Some(&Reverse((at, i))) = ready.peek() {
            if at > now {
                break;
            }
            ready.pop();
            job_tx.send(i).expect("replay workers are running");
        }
        let wait = ready
            .peek()
            .map_or(Duration::from_secs(3600), |&Reverse((at, _))| {
                at.saturating_duration_since(now)
            });
        let (i, began, end, r) = match done_rx.recv_timeout(wait) {
            Ok(d) => d,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        done += 1;
        out.latency[i] = end - began;
        last_end = last_end.max(end);
        if let Err(e) = r {
            out.failed += 1;
            if plan[i].recorded_result < 0 {
                out.failed_as_recorded += 1;
            } else {
                out.first_error.get_or_insert(e);
            }
        }
        for &k in &waiting[i] {
            ready.push(Reverse((end + plan[k].think, k)));
        }
    }
    drop(job_tx);
    for w in workers {
        let _ = w.join();
    }
    out.span = last_end - start;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(submit_us: u64, complete_us: u64) -> TraceRecord {
        TraceRecord {
            submit_us,
            complete_us,
            op: TraceOp::Read,
            offset: submit_us * 4096,
            len: 4096,
            result: 0,
        }
    }

    #[test]
    fn each_request_waits_for_the_last_completion_before_its_submit() {
        // 0: 100-200; 1: 150-400 (in parallel with 0); 2: 250-300 (after 0);
        // 3: 450-500 (after 1, which ended last before it); 4: 1000 after 3.
        let p = plan(&[
            rec(450, 500),
            rec(100, 200),
            rec(250, 300),
            rec(150, 400),
            rec(1000, 1100),
        ]);
        let got: Vec<_> = p
            .iter()
            .map(|s| (s.offset / 4096, s.after, s.think.as_micros()))
            .collect();
        assert_eq!(
            got,
            [
                (100, None, 0),
                (150, None, 50),
                (250, Some(0), 50),
                (450, Some(1), 50),
                (1000, Some(3), 500),
            ]
        );
        assert_eq!(p[1].recorded, Duration::from_micros(250));
        assert_eq!(
            recorded_span(&[rec(100, 200), rec(150, 400)]).as_micros(),
            300
        );
    }

    #[test]
    fn a_request_submitted_as_another_completed_waits_for_it() {
        let p = plan(&[rec(0, 10), rec(10, 20)]);
        assert_eq!(p[1].after, Some(0));
        assert_eq!(p[1].think, Duration::ZERO);
    }

    #[test]
    fn two_instant_requests_at_one_microsecond_do_not_wait_for_each_other() {
        let p = plan(&[rec(5, 5), rec(5, 5)]);
        assert_eq!((p[0].after, p[1].after), (None, Some(0)));
    }

    /// Sleeps per request and counts the most requests in flight at once.
    struct Slow {
        each: Duration,
        now: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
    }
    impl Device for Slow {
        fn run(&mut self, s: &Step) -> Result<(), String> {
            use std::sync::atomic::Ordering::SeqCst;
            let n = self.now.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(n, SeqCst);
            std::thread::sleep(self.each);
            self.now.fetch_sub(1, SeqCst);
            if s.offset == 7 * 4096 {
                return Err("injected".into());
            }
            Ok(())
        }
    }

    fn most_in_flight(records: &[TraceRecord]) -> (usize, Outcome) {
        let (now, most) = (
            Arc::default(),
            Arc::<std::sync::atomic::AtomicUsize>::default(),
        );
        let devs = (0..4)
            .map(|_| {
                Box::new(Slow {
                    each: Duration::from_millis(100),
                    now: Arc::clone(&now),
                    most: Arc::clone(&most),
                }) as Box<dyn Device>
            })
            .collect();
        let o = run(&plan(records), devs);
        (most.load(std::sync::atomic::Ordering::SeqCst), o)
    }

    #[test]
    fn dependent_requests_run_one_after_another_and_independent_ones_together() {
        // Each submitted as the one before completed: one at a time.
        let chain: Vec<_> = (0..4).map(|i| rec(i * 10, i * 10 + 10)).collect();
        let (most, o) = most_in_flight(&chain);
        assert_eq!(most, 1);
        assert!(o.span >= Duration::from_millis(400), "{:?}", o.span);
        assert_eq!((o.failed, o.latency.len()), (0, 4));
        // Submitted together: all four in flight at once; a failure is
        // counted, not fatal.
        let par: Vec<_> = (4..8).map(|i| rec(i, 1000)).collect();
        let (most, o) = most_in_flight(&par);
        assert_eq!(most, 4);
        assert_eq!((o.failed, o.first_error.as_deref()), (1, Some("injected")));
    }
}
