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

pub struct WorkloadConfig {
    pub ops: usize,
    pub max_sectors: u64,
}

/// Drive `engine` single-threaded (the flusher runs beside it) and return the
/// history. Reads are issued too: they promote lines and race the flusher.
pub fn run(
    engine: &Arc<Engine>,
    clock: &Clock,
    rng: &mut Rng,
    cfg: &WorkloadConfig,
) -> Vec<GuestOp> {
    let sectors = engine.size() / SECTOR;
    let mut hist = Vec::with_capacity(cfg.ops);
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
                let _ = engine.read(sector * SECTOR, &mut buf);
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
    hist
}
