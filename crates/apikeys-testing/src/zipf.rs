//! Zipf-distributed draws in constant time, for the benchmarks' and the soak's key traffic.
#![allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, SeedableRng};

/// Zipf(s) over ranks `0..n` (rank r drawn with probability proportional to 1 / (r + 1)^s,
/// rank 0 the hottest), sampled in constant time by Vose's alias method from the exact
/// probabilities. `rand_distr::Zipf` draws by rejection, with `powf` and `ln` per draw: about
/// 180 ns a draw on this machine, as much as a cached check, and it would be counted in every
/// check's time; a draw from this table is one random number and one or two table reads.
#[derive(Debug, Clone)]
pub struct ZipfTable {
    /// Per slot: below this (of 2^32) the slot's own rank is drawn, else its alias.
    threshold: Vec<u64>,
    alias: Vec<u32>,
}

impl ZipfTable {
    /// The probability of each rank.
    #[must_use]
    pub fn probabilities(n: usize, s: f64) -> Vec<f64> {
        let weights: Vec<f64> = (1..=n).map(|k| (k as f64).powf(-s)).collect();
        let sum: f64 = weights.iter().sum();
        weights.into_iter().map(|w| w / sum).collect()
    }

    /// The table for Zipf(`s`) over `n` ranks.
    ///
    /// # Panics
    /// If `n` is 0 or above `u32::MAX`, or `s` is negative.
    #[must_use]
    pub fn new(n: usize, s: f64) -> ZipfTable {
        assert!(n > 0 && u32::try_from(n).is_ok() && s >= 0.0);
        let mut scaled: Vec<f64> =
            Self::probabilities(n, s).into_iter().map(|p| p * n as f64).collect();
        let mut threshold = vec![1u64 << 32; n];
        let mut alias: Vec<u32> = (0..n).map(|i| u32::try_from(i).unwrap()).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| scaled[i] < 1.0);
        while let (Some(&lo), Some(&hi)) = (small.last(), large.last()) {
            small.pop();
            // The slot of `lo`: its own rank with probability scaled[lo], else `hi`.
            threshold[lo] = (scaled[lo] * 4_294_967_296.0) as u64;
            alias[lo] = u32::try_from(hi).unwrap();
            scaled[hi] -= 1.0 - scaled[lo];
            if scaled[hi] < 1.0 {
                large.pop();
                small.push(hi);
            }
        }
        // What is left (rounding) keeps its own rank with certainty.
        ZipfTable { threshold, alias }
    }

    /// A rank, drawn with `rng`.
    ///
    /// # Panics
    /// Never: the slot is below `n`, which fits a `usize`.
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let x = rng.next_u64();
        let n = self.threshold.len() as u64;
        // The high half picks a slot (bias below n / 2^32), the low half decides within it.
        let slot = usize::try_from(((x >> 32) * n) >> 32).unwrap();
        if (x & 0xFFFF_FFFF) < self.threshold[slot] { slot } else { self.alias[slot] as usize }
    }

    /// Draws a million ranks and compares the ten hottest ranks' counts with their
    /// probabilities (within 6 standard deviations): the table samples what it says.
    ///
    /// # Panics
    /// If it does not.
    pub fn check(&self, n: usize, s: f64) {
        let draws = 1_000_000;
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
        let mut counts = vec![0u64; n.min(10)];
        for _ in 0..draws {
            let r = self.sample(&mut rng);
            if r < counts.len() {
                counts[r] += 1;
            }
        }
        for (r, (&c, p)) in counts.iter().zip(Self::probabilities(n, s)).enumerate() {
            let expected = p * f64::from(draws);
            let sd = (expected * (1.0 - p)).sqrt().max(1.0);
            assert!(
                (c as f64 - expected).abs() <= 6.0 * sd,
                "the Zipf table drew rank {r} {c} times in {draws}, expected {expected:.0}"
            );
        }
    }
}
