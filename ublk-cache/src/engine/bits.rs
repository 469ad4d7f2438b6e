//! Sector bitmaps of one line and the runs they form.

use crate::format::entry::SectorBits;

pub fn none() -> SectorBits {
    [0; 4]
}

pub fn is_empty(b: &SectorBits) -> bool {
    b.iter().all(|w| *w == 0)
}

pub fn test(b: &SectorBits, s: u32) -> bool {
    b[(s / 64) as usize] & (1u64 << (s % 64)) != 0
}

/// Bits `s0..s1`.
pub fn range(s0: u32, s1: u32) -> SectorBits {
    let mut b = none();
    for s in s0..s1 {
        b[(s / 64) as usize] |= 1u64 << (s % 64);
    }
    b
}

pub fn or(a: &SectorBits, b: &SectorBits) -> SectorBits {
    std::array::from_fn(|i| a[i] | b[i])
}

pub fn and(a: &SectorBits, b: &SectorBits) -> SectorBits {
    std::array::from_fn(|i| a[i] & b[i])
}

pub fn and_not(a: &SectorBits, b: &SectorBits) -> SectorBits {
    std::array::from_fn(|i| a[i] & !b[i])
}

pub fn count(b: &SectorBits) -> u32 {
    b.iter().map(|w| w.count_ones()).sum()
}

/// Maximal runs `(start, end, set)` of equal bits within `s0..s1`.
pub fn runs(b: &SectorBits, s0: u32, s1: u32) -> Vec<(u32, u32, bool)> {
    let mut out = Vec::new();
    let mut s = s0;
    while s < s1 {
        let v = test(b, s);
        let mut e = s + 1;
        while e < s1 && test(b, e) == v {
            e += 1;
        }
        out.push((s, e, v));
        s = e;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_the_range_exactly() {
        let b = or(&range(2, 5), &range(70, 130));
        assert_eq!(
            runs(&b, 0, 140),
            vec![
                (0, 2, false),
                (2, 5, true),
                (5, 70, false),
                (70, 130, true),
                (130, 140, false)
            ]
        );
        assert_eq!(count(&b), 63);
        assert!(test(&b, 129) && !test(&b, 130));
        assert!(is_empty(&and_not(&b, &b)));
        assert_eq!(runs(&b, 3, 3), vec![]);
    }
}
