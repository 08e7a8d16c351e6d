//! Distinct counting in 16 bytes: a 64-bit linear-counting bitmap that
//! restarts every window.
//!
//! Each value sets bit `hash % 64`. With `z` bits still zero, the number of
//! distinct values is estimated as `n ≈ -64 · ln(z / 64)` (Whang et al.,
//! linear counting): within a few percent up to ~40 values and good enough
//! to tell "a handful" from "dozens" up to ~150; a full bitmap reads as
//! [`SATURATED`]. That is all the detectors need ("more than N usernames"),
//! at a fixed size whatever the attacker sends.

/// Encoded size of a [`DistinctWindow`].
pub const DISTINCT_BYTES: usize = 16;
/// Estimate reported once every bit is set.
pub const SATURATED: f64 = 300.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DistinctWindow {
    /// Window start, ms since the epoch; 0 = never used.
    pub start_ms: u64,
    pub bits: u64,
}

impl DistinctWindow {
    fn roll(&mut self, now_ms: u64, window_ms: u64) {
        let expired = now_ms.saturating_sub(self.start_ms) >= window_ms.max(1);
        if self.start_ms == 0 || expired || now_ms < self.start_ms {
            *self = DistinctWindow { start_ms: now_ms.max(1), bits: 0 };
        }
    }

    /// Adds a value (by its hash) and returns the new estimate.
    pub fn insert(&mut self, hash: u64, now_ms: u64, window_ms: u64) -> f64 {
        self.roll(now_ms, window_ms);
        self.bits |= 1u64 << (hash % 64);
        self.estimate()
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.bits & (1u64 << (hash % 64)) != 0
    }

    /// The estimate as of `now_ms`, without recording (0 once the window is over).
    pub fn estimate_at(&self, now_ms: u64, window_ms: u64) -> f64 {
        let mut current = *self;
        current.roll(now_ms, window_ms);
        current.estimate()
    }

    pub fn estimate(&self) -> f64 {
        let zeros = f64::from(self.bits.count_zeros());
        if zeros == 0.0 {
            return SATURATED;
        }
        -64.0 * (zeros / 64.0).ln()
    }

    pub fn encode(&self) -> [u8; DISTINCT_BYTES] {
        let mut out = [0u8; DISTINCT_BYTES];
        let (a, b) = out.split_at_mut(8);
        a.copy_from_slice(&self.start_ms.to_le_bytes());
        b.copy_from_slice(&self.bits.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; DISTINCT_BYTES]) -> DistinctWindow {
        let (a, b) = bytes.split_at(8);
        let mut start = [0u8; 8];
        let mut bits = [0u8; 8];
        start.copy_from_slice(a);
        bits.copy_from_slice(b);
        DistinctWindow { start_ms: u64::from_le_bytes(start), bits: u64::from_le_bytes(bits) }
    }
}

/// Encoded size of a [`WideDistinct`].
pub const WIDE_DISTINCT_BYTES: usize = 8 + 2 * WIDE_WORDS * 8;
const WIDE_WORDS: usize = 8;
const WIDE_BITS: f64 = (WIDE_WORDS * 64) as f64;
/// A [`WideDistinct`]'s estimate once every bit is set.
pub const WIDE_SATURATED: f64 = 4000.0;

/// Distinct counting for a whole route (hundreds of ids a minute, where a
/// client's [`DistinctWindow`] saturates): 512-bit linear counting, within
/// ~5 % up to ~1,000 values. Sliding, not restarting: two half-window
/// bitmaps, the estimate over their union, so the count never drops to
/// zero at a window's turn (an attack in progress stays seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WideDistinct {
    /// Start of the current half window, ms since the epoch; 0 = never used.
    pub start_ms: u64,
    pub current: [u64; WIDE_WORDS],
    pub previous: [u64; WIDE_WORDS],
}

impl WideDistinct {
    fn roll(&mut self, now_ms: u64, window_ms: u64) {
        let half = (window_ms / 2).max(1);
        if self.start_ms == 0 || now_ms < self.start_ms || now_ms.saturating_sub(self.start_ms) >= 2 * half {
            *self = WideDistinct { start_ms: now_ms.max(1), ..WideDistinct::default() };
        } else if now_ms.saturating_sub(self.start_ms) >= half {
            self.previous = self.current;
            self.current = [0; WIDE_WORDS];
            self.start_ms = self.start_ms.saturating_add(half);
        }
    }

    /// Adds a value (by its hash); returns whether it was (probably) seen in
    /// the last window already, and the new estimate.
    pub fn insert(&mut self, hash: u64, now_ms: u64, window_ms: u64) -> (bool, f64) {
        self.roll(now_ms, window_ms);
        let bit = hash % (WIDE_BITS as u64);
        let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
        let seen = self.current.get(word).zip(self.previous.get(word)).is_some_and(|(c, p)| (c | p) & mask != 0);
        if let Some(w) = self.current.get_mut(word) {
            *w |= mask;
        }
        (seen, self.estimate())
    }

    /// The estimate as of `now_ms`, without recording.
    pub fn estimate_at(&self, now_ms: u64, window_ms: u64) -> f64 {
        let mut current = *self;
        current.roll(now_ms, window_ms);
        current.estimate()
    }

    pub fn estimate(&self) -> f64 {
        let ones: u32 = self.current.iter().zip(self.previous.iter()).map(|(c, p)| (c | p).count_ones()).sum();
        let zeros = WIDE_BITS - f64::from(ones);
        if zeros <= 0.0 {
            return WIDE_SATURATED;
        }
        (-WIDE_BITS * (zeros / WIDE_BITS).ln()).min(WIDE_SATURATED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mix(x: u64) -> u64 {
        // splitmix64: spreads test values like the keyed hash does.
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn repeats_do_not_count() {
        let mut d = DistinctWindow::default();
        for _ in 0..100 {
            d.insert(mix(1), 1000, 60_000);
        }
        assert!((d.estimate() - 1.0).abs() < 0.1);
        assert!(d.contains(mix(1)));
    }

    #[test]
    fn windows_restart() {
        let mut d = DistinctWindow::default();
        for i in 0..30 {
            d.insert(mix(i), 1000, 60_000);
        }
        assert!(d.estimate() > 15.0);
        assert!(d.insert(mix(99), 61_000, 60_000) < 1.5);
    }

    #[test]
    fn codec_round_trips() {
        let d = DistinctWindow { start_ms: 77, bits: 0xdead_beef };
        assert_eq!(DistinctWindow::decode(&d.encode()), d);
    }

    proptest! {
        /// Reasonable accuracy where the detectors' thresholds live.
        #[test]
        fn estimate_tracks_truth(n in 1u64..40, salt in any::<u64>()) {
            let mut d = DistinctWindow::default();
            for i in 0..n {
                d.insert(mix(i ^ salt.rotate_left(17)), 1000, 60_000);
            }
            let est = d.estimate();
            let truth = n as f64;
            prop_assert!(est <= truth * 1.6 + 3.0 && est >= truth * 0.5, "n={} est={}", n, est);
        }
    }

    #[test]
    fn a_wide_window_counts_hundreds_and_slides() {
        let mut d = WideDistinct::default();
        for i in 0..600 {
            d.insert(mix(i), 1000 + i, 60_000);
        }
        let est = d.estimate();
        assert!((540.0..=660.0).contains(&est), "{est}");
        // Repeats add nothing and are reported as seen.
        let (seen, again) = d.insert(mix(5), 2000, 60_000);
        assert!(seen && (again - est).abs() < 1e-9);
        // Half a window on, the first half is still counted...
        assert!(d.estimate_at(31_500, 60_000) > 500.0);
        // ...and a window after the last insert, nothing is.
        assert!(d.estimate_at(1000 + 600 + 60_000, 60_000) < 1.0);
    }

    proptest! {
        #[test]
        fn wide_estimate_tracks_truth(n in 1u64..1000, salt in any::<u64>()) {
            let mut d = WideDistinct::default();
            for i in 0..n {
                d.insert(mix(i ^ salt.rotate_left(17)), 1000, 60_000);
            }
            let (est, truth) = (d.estimate(), n as f64);
            prop_assert!(est <= truth * 1.35 + 3.0 && est >= truth * 0.7 - 3.0, "n={} est={}", n, est);
        }
    }
}
