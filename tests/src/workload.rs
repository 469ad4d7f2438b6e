//! The seeded guest workload and its history: what was written where, when each
//! request was issued and completed (on the shared clock), and which flushes
//! completed.
//!
//! Every 512-byte sector a write produces says what it is: bytes 0..8 are the
//! write's id, 8..16 the sector number, the rest a fill derived from both. A
//! sector read back after recovery therefore tells which write it came from,
//! and whether it belongs to this sector at all.

use std::sync::Arc;

use ublk_cache::target::BlockTarget;
use ublk_cache::Engine;

use crate::recording::Clock;
use testkit::Rng;

pub const SECTOR: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Write { fua: bool },
    Zero,
    Discard,
    Flush,
}

#[derive(Debug, Clone)]
pub struct GuestOp {
    pub kind: Kind,
    /// First sector and count (none for a flush).
    pub sector: u64,
    pub count: u64,
    /// Write id (0 for zeroes and discards).
    pub id: u64,
    pub issued: u64,
    pub done: u64,
}

pub fn sector_data(id: u64, sector: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    Rng::new(id ^ sector.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)).fill(&mut b[16..]);
    b
}

/// What a sector read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Zero,
    Write(u64),
    /// Data of write `id` that was meant for sector `sector`: misplaced.
    Misplaced {
        id: u64,
        sector: u64,
    },
    Garbage,
}

pub fn decode(sector: u64, b: &[u8]) -> Content {
    if b.iter().all(|&x| x == 0) {
        return Content::Zero;
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    let id = u64::from_le_bytes(a);
    a.copy_from_slice(&b[8..16]);
    let s = u64::from_le_bytes(a);
    if id == 0 || sector_data(id, s)[..] != b[..] {
        return Content::Garbage;
    }
    if s != sector {
        return Content::Misplaced { id, sector: s };
    }
    Content::Write(id)
}

/// What a read of a sector must return while the workload runs. It is
/// single-threaded, so a read sees every completed request and no other.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Exactly(Content),
    /// Discarded: unspecified (zeroes or what was there, as the backend
    /// chooses), but stable once read, until the next write.
    Discarded {
        before: Content,
    },
}

/// The requests issued and, from the reads among them, every read that did
/// not return what the guest wrote last (or that failed).
pub struct Workload {
    pub ops: Vec<GuestOp>,
    pub read_mismatches: Vec<String>,
}

/// Reported read mismatches per run, at most (one is enough to fail it).
const MAX_MISMATCHES: usize = 4;

pub struct WorkloadConfig {
    pub ops: usize,
    pub max_sectors: u64,
}

/// Drive `engine` single-threaded (the flusher runs beside it) and return the
/// history. Reads are issued too: they promote lines and race the flusher, and
/// each must return what was written last (checked here, as they happen).
pub fn run(engine: &Arc<Engine>, clock: &Clock, rng: &mut Rng, cfg: &WorkloadConfig) -> Workload {
    let sectors = engine.size() / SECTOR;
    let mut hist = Vec::with_capacity(cfg.ops);
    let mut expect = vec![Expect::Exactly(Content::Zero); sectors as usize];
    let mut mismatches = Vec::new();
    let mut next_id = 1u64;
    for _ in 0..cfg.ops {
        let count = 1 + rng.below(cfg.max_sectors);
        // Prefer a few hot regions so that overwrites across epochs are common.
        let sector = if rng.chance(50) {
            (rng.below(8) * sectors / 8 + rng.below(16)).min(sectors - count)
        } else {
            rng.below(sectors - count + 1)
        };
        let r = rng.below(100);
        let kind = match r {
            0..=49 => Kind::Write {
                fua: rng.chance(10),
            },
            50..=64 => Kind::Flush,
            65..=68 => Kind::Zero,
            69..=70 => Kind::Discard,
            _ => {
                let mut buf = vec![0u8; (count * SECTOR) as usize];
                let at = clock.now();
                if let Err(e) = engine.read(sector * SECTOR, &mut buf) {
                    mismatches.push(format!(
                        "live read of sectors {sector}+{count} at t={at} failed on healthy devices: {e}"
                    ));
                } else {
                    check_read(sector, &buf, &mut expect, at, &mut mismatches);
                }
                mismatches.truncate(MAX_MISMATCHES);
                continue;
            }
        };
        let issued = clock.tick();
        let mut id = 0;
        let res = match kind {
            Kind::Write { fua } => {
                id = next_id;
                next_id += 1;
                let mut data = Vec::with_capacity((count * SECTOR) as usize);
                for s in sector..sector + count {
                    data.extend_from_slice(&sector_data(id, s));
                }
                engine.write(sector * SECTOR, &data, fua)
            }
            Kind::Flush => engine.flush(),
            Kind::Zero => engine.write_zeroes(sector * SECTOR, count * SECTOR),
            Kind::Discard => engine.discard(sector * SECTOR, count * SECTOR),
        };
        let done = clock.tick();
        if let Err(e) = res {
            panic!("workload request failed on healthy in-memory devices: {e}");
        }
        for s in sector..sector + count {
            let e = &mut expect[s as usize];
            *e = match kind {
                Kind::Write { .. } => Expect::Exactly(Content::Write(id)),
                Kind::Zero => Expect::Exactly(Content::Zero),
                Kind::Discard => match *e {
                    Expect::Exactly(before) | Expect::Discarded { before } => {
                        Expect::Discarded { before }
                    }
                },
                Kind::Flush => break,
            };
        }
        let (sector, count) = if kind == Kind::Flush {
            (0, 0)
        } else {
            (sector, count)
        };
        hist.push(GuestOp {
            kind,
            sector,
            count,
            id,
            issued,
            done,
        });
    }
    Workload {
        ops: hist,
        read_mismatches: mismatches,
    }
}

/// Compare a live read of sectors from `first` with what each must hold, and
/// pin what a discarded sector was read as.
fn check_read(first: u64, buf: &[u8], expect: &mut [Expect], at: u64, out: &mut Vec<String>) {
    for (i, b) in buf.chunks(SECTOR as usize).enumerate() {
        let s = first + i as u64;
        let got = decode(s, b);
        let e = &mut expect[s as usize];
        match *e {
            Expect::Exactly(want) if got == want => {}
            Expect::Discarded { before } if got == Content::Zero || got == before => {
                *e = Expect::Exactly(got);
            }
            want => {
                out.push(format!(
                    "live read at t={at}: sector {s} holds {got:?}, but the guest's last request left it {want:?}"
                ));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sectors(ids: &[(u64, u64)]) -> Vec<u8> {
        ids.iter()
            .flat_map(|&(id, s)| {
                if id == 0 {
                    [0u8; 512]
                } else {
                    sector_data(id, s)
                }
            })
            .collect()
    }

    #[test]
    fn a_live_read_must_return_the_last_write_and_a_discard_stays_as_first_read() {
        let mut expect = vec![
            Expect::Exactly(Content::Write(4)),
            Expect::Discarded {
                before: Content::Write(2),
            },
            Expect::Exactly(Content::Zero),
        ];
        let mut out = Vec::new();
        check_read(
            0,
            &sectors(&[(4, 0), (2, 1), (0, 2)]),
            &mut expect,
            1,
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
        // The discarded sector read as its old data once: now it must stay so.
        check_read(1, &sectors(&[(0, 1)]), &mut expect, 2, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].contains("sector 1 holds Zero"), "{out:?}");
        // An older write, and data of another sector, are both caught.
        out.clear();
        check_read(0, &sectors(&[(3, 0)]), &mut expect, 3, &mut out);
        check_read(2, &sectors(&[(4, 0)]), &mut expect, 4, &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].contains("holds Write(3)") && out[0].contains("Exactly(Write(4))"));
        assert!(out[1].contains("Misplaced"), "{out:?}");
    }
}
