//! One seeded generator and one data pattern for every test, bench and
//! harness, so that a failure prints a seed that reproduces it.
//!
//! The generator is xorshift64* with the crash harness's seeding: the harness
//! checks a fixed set of seeds, and its state counts stay what they were. A
//! crate (`rand_xorshift`, `fastrand`) would change every sequence for ten
//! lines of arithmetic.

/// A small deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`0` for `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with `percent` % probability.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Deterministic test data for `seed`: a pseudo-random stream with no zero
/// byte, so that it is never mistaken for unwritten, discarded or zeroed data,
/// and two seeds never agree on a whole sector.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ 0x7061_7474_6572_6e00);
    let mut v = rng.bytes(len);
    for b in &mut v {
        *b |= 1;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_the_crash_harness_one() {
        // The first values for seed 1, as the crash harness has always drawn them.
        let mut r = Rng::new(1);
        let mut x = 0x9E37_79B9_7F4A_7C15u64 | 1;
        for _ in 0..4 {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            assert_eq!(r.next_u64(), x.wrapping_mul(0x2545_F491_4F6C_DD1D));
        }
    }

    #[test]
    fn patterns_are_stable_nonzero_and_differ_by_seed() {
        assert_eq!(pattern(3, 4096), pattern(3, 4096));
        assert!(pattern(3, 4096).iter().all(|&b| b != 0));
        assert_ne!(pattern(3, 512), pattern(4, 512));
        assert_eq!(pattern(5, 100)[..], pattern(5, 1000)[..100]);
        let mut r = Rng::new(9);
        assert!((0..1000).all(|_| r.below(7) < 7));
        assert_eq!(r.below(0), 0);
    }
}
