//! Block status: which parts of the disk hold data and which are holes, for
//! NBD's `base:allocation` (so that `qemu-img convert`, `nbdcopy` and
//! `nbdinfo --map` skip what was never written, without reading it).
//!
//! The answer joins two sources. The backend's allocation map (when it has one:
//! a sparse file, an RBD image; see `rbd_backend::allocation`) says where the
//! backend holds data. The cache adds its dirty sectors: data the guest wrote
//! that has not reached the backend yet is data, whatever the backend says.
//! Clean cached data is on the backend already, so it needs no second look.
//!
//! Order matters for correctness: the dirty sectors are taken first, then the
//! backend is asked. A line the flusher cleans in between was written to the
//! backend (and flushed) before it counted as clean, so the backend reports it.
//! The other order could miss it and call written data a hole.
//!
//! Reporting data where there is a hole only costs the client a read, so every
//! doubt (no map, a backend error, a timeout) is answered "data".

use std::sync::atomic::{AtomicBool, Ordering};

use rbd_backend::Allocation;
use tracing::warn;

use super::{bits, Engine, SECTOR};
use crate::error::EngineResult;
use crate::target::Extent;

/// Bytes looked at per query at most (the caller asks again for the rest).
pub const MAX_SPAN: u64 = 4 << 30;
/// Extents per answer at most.
pub const MAX_EXTENTS: usize = 1 << 16;
/// Extents are whole multiples of this (the NBD export's minimum block size).
const GRAIN: u64 = 512;

/// A backend allocation query failed: logged once, then at debug level.
static WARNED: AtomicBool = AtomicBool::new(false);

impl Engine {
    /// The status of `[offset, offset + len)`: consecutive extents from
    /// `offset` (none when `len` is 0), possibly covering less than asked.
    pub fn block_status(&self, offset: u64, len: u64) -> EngineResult<Vec<Extent>> {
        self.check_open()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len.min(MAX_SPAN);
        let dirty = self.dirty_ranges(offset, end);
        let alloc = match self.backend.allocation_map() {
            None => Allocation::all_data(offset, end - offset),
            Some(map) => match map.allocation(offset, end - offset) {
                Ok(a) if a.covered_to > offset && a.covered_to <= end => a,
                Ok(a) => {
                    warn!(
                        offset,
                        end,
                        covered_to = a.covered_to,
                        "the backend's allocation map answered outside the query (bug); reporting data"
                    );
                    Allocation::all_data(offset, end - offset)
                }
                Err(e) => {
                    if !WARNED.swap(true, Ordering::Relaxed) {
                        warn!("backend allocation query failed, reporting data there: {e} (further failures are logged at debug level)");
                    } else {
                        tracing::debug!("backend allocation query failed: {e}");
                    }
                    Allocation::all_data(offset, end - offset)
                }
            },
        };
        Ok(merge(offset, alloc, dirty))
    }

    /// `(offset, len)` of the sectors in `[offset, end)` that are dirty in the cache.
    fn dirty_ranges(&self, offset: u64, end: u64) -> Vec<(u64, u64)> {
        let Some(c) = &self.cache else {
            return Vec::new();
        };
        let ls = u64::from(c.layout.line_size);
        let per_line = (ls / SECTOR) as u32;
        let (t0, t1) = (offset / ls, (end - 1) / ls);
        let st = &c.st;
        let mut out = Vec::new();
        let mut visit = |slot: u32| {
            let r = st.slots.get(slot);
            if r.is_free() || !(t0..=t1).contains(&r.tag) || !r.is_dirty() {
                return;
            }
            for (s0, s1, set) in bits::runs(&r.dirty, 0, per_line) {
                if set {
                    out.push((
                        r.tag * ls + u64::from(s0) * SECTOR,
                        u64::from(s1 - s0) * SECTOR,
                    ));
                }
            }
        };
        if t1 - t0 < st.slots.len() as u64 {
            for t in t0..=t1 {
                let chain = {
                    let sh = st.map.shard(t).read();
                    st.chain(&sh, t)
                };
                for s in chain {
                    visit(s);
                }
            }
        } else {
            for s in 0..st.slots.len() as u32 {
                visit(s);
            }
        }
        out
    }
}

/// Join the backend's data extents and the cache's dirty ranges into
/// consecutive extents from `offset`: data grown outward to [`GRAIN`], at most
/// [`MAX_EXTENTS`], covering `[offset, alloc.covered_to)` (rounded up to the
/// grain; the part the backend did not answer for counts as data).
pub(crate) fn merge(offset: u64, alloc: Allocation, dirty: Vec<(u64, u64)>) -> Vec<Extent> {
    let backend_end = alloc.covered_to;
    let end = backend_end.div_ceil(GRAIN) * GRAIN;
    let mut data = alloc.data;
    data.extend(dirty);
    if end > backend_end {
        data.push((backend_end, end - backend_end));
    }
    // Outward to the grain, then clipped, sorted and merged.
    let data: Vec<(u64, u64)> = data
        .into_iter()
        .map(|(o, n)| {
            let a = o / GRAIN * GRAIN;
            let b = (o + n).div_ceil(GRAIN) * GRAIN;
            (a, b - a)
        })
        .collect();
    let data = Allocation::from_extents(offset, end, data).data;
    let mut out = Vec::new();
    let mut pos = offset;
    for (o, n) in data {
        if out.len() + 2 > MAX_EXTENTS {
            return out;
        }
        if o > pos {
            out.push(Extent {
                len: o - pos,
                hole: true,
            });
        }
        out.push(Extent {
            len: n,
            hole: false,
        });
        pos = o + n;
    }
    if pos < end && out.len() < MAX_EXTENTS {
        out.push(Extent {
            len: end - pos,
            hole: true,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(v: &[(u64, bool)]) -> Vec<Extent> {
        v.iter().map(|&(len, hole)| Extent { len, hole }).collect()
    }

    #[test]
    fn dirty_data_fills_backend_holes_and_extents_are_consecutive() {
        let alloc = Allocation {
            data: vec![(8192, 4096)],
            covered_to: 65536,
        };
        // Dirty 4 KiB at 32 KiB and one adjacent to the backend's data.
        let got = merge(0, alloc, vec![(32768, 4096), (12288, 4096)]);
        assert_eq!(
            got,
            ext(&[
                (8192, true),
                (8192, false),
                (16384, true),
                (4096, false),
                (28672, true)
            ])
        );
        assert_eq!(got.iter().map(|e| e.len).sum::<u64>(), 65536);
    }

    #[test]
    fn unaligned_backend_answers_grow_data_outward() {
        let alloc = Allocation {
            data: vec![(1000, 10)],
            covered_to: 5000,
        };
        // 512..1024 is data; the answer ends at 5120, its last 120 bytes unknown: data.
        assert_eq!(
            merge(0, alloc, vec![]),
            ext(&[(512, true), (512, false), (3584, true), (512, false)])
        );
        assert_eq!(
            merge(4096, Allocation::all_data(4096, 4096), vec![]),
            ext(&[(4096, false)])
        );
        assert_eq!(
            merge(
                0,
                Allocation {
                    data: vec![],
                    covered_to: 1 << 20
                },
                vec![]
            ),
            ext(&[(1 << 20, true)])
        );
    }

    #[test]
    fn the_extent_count_is_bounded() {
        let data: Vec<(u64, u64)> = (0..200_000u64).map(|i| (i * 1024, 512)).collect();
        let alloc = Allocation {
            data,
            covered_to: 200_000 * 1024,
        };
        let got = merge(0, alloc, vec![]);
        assert!(got.len() <= MAX_EXTENTS);
        assert!(!got.is_empty());
        assert!(got.windows(2).all(|w| w[0].hole != w[1].hole));
    }
}
