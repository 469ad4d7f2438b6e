//! Which parts of a backend hold data: the optional capability behind NBD's
//! `base:allocation` block status (and so behind `qemu-img convert`, `nbdcopy`
//! and `nbdinfo --map` skipping holes).
//!
//! A backend that can tell (a sparse file through `SEEK_DATA`/`SEEK_HOLE`, an RBD
//! image through `rbd_diff_iterate2` against nothing) returns itself from
//! [`Backend::allocation_map`](crate::Backend::allocation_map); every other
//! backend returns `None`, which means "all data". Reporting data where there is
//! a hole is always safe (it only costs a read); the reverse loses data, so an
//! implementation reports a hole only where the backend itself says the range
//! reads as zeroes.

use crate::error::Result;

/// The data extents of one range of a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// `(offset, len)` of the extents that hold data, ascending, not overlapping,
    /// within `[start, covered_to)`. Everything else in that range reads as zeroes.
    pub data: Vec<(u64, u64)>,
    /// The answer is complete up to here (past the start of the query, at most
    /// its end): a backend may answer less than it was asked when the rest would
    /// cost too much; the caller asks again from here.
    pub covered_to: u64,
}

impl Allocation {
    /// Everything in `[offset, offset + len)` is data.
    pub fn all_data(offset: u64, len: u64) -> Self {
        Self {
            data: if len == 0 {
                Vec::new()
            } else {
                vec![(offset, len)]
            },
            covered_to: offset + len,
        }
    }

    /// Build from unsorted, possibly overlapping or out-of-range extents:
    /// clipped to `[offset, end)`, sorted and merged.
    pub fn from_extents(offset: u64, end: u64, mut extents: Vec<(u64, u64)>) -> Self {
        extents.retain(|&(o, n)| n > 0 && o < end && o.saturating_add(n) > offset);
        extents.sort_unstable();
        let mut data: Vec<(u64, u64)> = Vec::with_capacity(extents.len());
        for (o, n) in extents {
            let (a, b) = (o.max(offset), o.saturating_add(n).min(end));
            match data.last_mut() {
                Some((lo, ln)) if *lo + *ln >= a => *ln = (*ln).max(b - *lo),
                _ => data.push((a, b - a)),
            }
        }
        Self {
            data,
            covered_to: end,
        }
    }
}

/// A backend that knows where its data is.
pub trait AllocationMap: Send + Sync {
    /// The data extents within `[offset, offset + len)` (`len` > 0, within the
    /// backend's size). The answer must cover at least one byte.
    fn allocation(&self, offset: u64, len: u64) -> Result<Allocation>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_clipped_sorted_and_merged() {
        let a = Allocation::from_extents(
            100,
            1000,
            vec![
                (900, 500),
                (0, 150),
                (140, 20),
                (500, 0),
                (300, 10),
                (1000, 5),
            ],
        );
        assert_eq!(a.data, vec![(100, 60), (300, 10), (900, 100)]);
        assert_eq!(a.covered_to, 1000);
        assert_eq!(Allocation::all_data(5, 0).data, vec![]);
        assert_eq!(Allocation::all_data(5, 7).data, vec![(5, 7)]);
    }
}
