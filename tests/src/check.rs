//! The guarantees, as checks on one crash state.
//!
//! - G1/G2 (after recovery, for every sector): the content is the latest
//!   *covered* write (completed before a completed FLUSH was issued, or a
//!   completed FUA write), or any write to that sector issued after it. Never
//!   zeroes nobody wrote, never another sector's data, never garbage.
//! - G3 (ordered write-back, the backend alone): there is a flush point k such
//!   that every sector holds its value at k or a value written to it in the
//!   epoch after k.

use crate::workload::{decode, Content, GuestOp, Kind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Val {
    Zero,
    Id(u64),
    /// A discard: anything this sector's writes could hold, or zeroes.
    Any,
}

pub struct History {
    /// Per sector, the operations touching it, in guest order: (op index, value).
    per_sector: Vec<Vec<(usize, Val)>>,
    ops: Vec<GuestOp>,
    /// Indices of flush ops in `ops`.
    flushes: Vec<usize>,
    /// Per op: the time from which it is durable (u64::MAX if never).
    durable_at: Vec<u64>,
}

impl History {
    pub fn new(ops: Vec<GuestOp>, sectors: u64) -> Self {
        let mut per_sector = vec![Vec::new(); sectors as usize];
        let mut flushes = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let v = match op.kind {
                Kind::Flush => {
                    flushes.push(i);
                    continue;
                }
                Kind::Write { .. } => Val::Id(op.id),
                Kind::Zero => Val::Zero,
                Kind::Discard => Val::Any,
            };
            for s in op.sector..op.sector + op.count {
                per_sector[s as usize].push((i, v));
            }
        }
        // A flush covers what completed before it was issued; with one request
        // at a time that is every earlier op. A FUA write is durable when done.
        let mut durable_at = vec![u64::MAX; ops.len()];
        let mut next_flush_done = u64::MAX;
        for i in (0..ops.len()).rev() {
            if ops[i].kind == Kind::Flush {
                next_flush_done = ops[i].done;
                continue;
            }
            durable_at[i] = if ops[i].kind == (Kind::Write { fua: true }) {
                ops[i].done.min(next_flush_done)
            } else {
                next_flush_done
            };
        }
        Self {
            per_sector,
            ops,
            flushes,
            durable_at,
        }
    }

    /// Is op `i` durable at time `t`?
    fn covered(&self, i: usize, t: u64) -> bool {
        self.durable_at[i] <= t
    }

    fn accepts(allowed: &[Val], got: Content) -> bool {
        match got {
            Content::Garbage | Content::Misplaced { .. } => false,
            Content::Zero => allowed.iter().any(|v| matches!(v, Val::Zero | Val::Any)),
            Content::Write(id) => allowed.iter().any(|v| *v == Val::Id(id) || *v == Val::Any),
        }
    }

    /// G1/G2 for sector `s` of the recovered device at crash time `t`.
    pub fn check_recovered(&self, s: u64, t: u64, bytes: &[u8]) -> Result<(), String> {
        let hist = &self.per_sector[s as usize];
        let last_cov = hist.iter().rposition(|&(i, _)| self.covered(i, t));
        let mut allowed = vec![match last_cov {
            Some(k) => hist[k].1,
            None => Val::Zero,
        }];
        let from = last_cov.map_or(0, |k| k + 1);
        allowed.extend(
            hist[from..]
                .iter()
                .filter(|&&(i, _)| self.ops[i].issued <= t)
                .map(|&(_, v)| v),
        );
        let got = decode(s, bytes);
        if Self::accepts(&allowed, got) {
            Ok(())
        } else {
            Err(format!(
                "sector {s} at t={t}: read {got:?}, allowed {allowed:?}"
            ))
        }
    }

    /// The operations that touched sector `s`, and the flushes, for a report.
    pub fn describe(&self, s: u64) -> String {
        let mut out = format!("history of sector {s}:\n");
        for &(i, v) in &self.per_sector[s as usize] {
            let op = &self.ops[i];
            out += &format!(
                "  op {i} {:?} {v:?} sectors {}+{} issued {} done {} durable {}\n",
                op.kind, op.sector, op.count, op.issued, op.done, self.durable_at[i]
            );
        }
        for &f in &self.flushes {
            out += &format!(
                "  flush op {f} issued {} done {}\n",
                self.ops[f].issued, self.ops[f].done
            );
        }
        out
    }

    /// G3 on the backend image alone at time `t` (ordered write-back).
    pub fn check_backend_consistent(
        &self,
        t: u64,
        read_sector: impl Fn(u64) -> Vec<u8>,
    ) -> Result<(), String> {
        let contents: Vec<Content> = (0..self.per_sector.len() as u64)
            .map(|s| decode(s, &read_sector(s)))
            .collect();
        // Flush points that completed by t; k = 0 is the initial disk.
        let done: Vec<usize> = self
            .flushes
            .iter()
            .copied()
            .filter(|&f| self.ops[f].done <= t)
            .collect();
        let mut last_err = String::new();
        for k in (0..=done.len()).rev() {
            let start = if k == 0 { 0 } else { done[k - 1] + 1 };
            let end = done.get(k).copied().unwrap_or(self.ops.len());
            let bad = contents.iter().enumerate().find(|&(s, got)| {
                let hist = &self.per_sector[s];
                let at_k = hist
                    .iter()
                    .rev()
                    .find(|&&(i, _)| i < start)
                    .map_or(Val::Zero, |&(_, v)| v);
                let mut allowed = vec![at_k];
                allowed.extend(
                    hist.iter()
                        .filter(|&&(i, _)| i >= start && i < end && self.ops[i].issued <= t)
                        .map(|&(_, v)| v),
                );
                !Self::accepts(&allowed, *got)
            });
            match bad {
                None => return Ok(()),
                Some((s, got)) if k == done.len() => last_err = format!("sector {s} holds {got:?}"),
                Some(_) => {}
            }
        }
        Err(format!(
            "backend at t={t} is not the disk at any flush point plus writes of the next epoch ({last_err})"
        ))
    }
}
