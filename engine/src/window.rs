//! A sliding-window counter in 16 bytes.
//!
//! Two adjacent windows of length `w` are kept: `previous` (complete) and
//! `current` (started at `start`). At time `t` with `e = t - start` (`0 <= e < w`)
//! the number of events in the last `w` is estimated as
//!
//! ```text
//!     estimate(t) = previous * (w - e) / w + current
//! ```
//!
//! i.e. the previous window is assumed uniform and only the part of it still
//! inside `[t - w, t]` is counted. Unlike a fixed window there is no reset
//! that lets a client send `2 * limit` across a boundary: a burst at the end of
//! one window still weighs fully at the start of the next and fades out
//! linearly over `w`. The estimate is exact while the client's traffic is
//! inside its first window, and never exceeds the true count of the last `2w`.
//!
//! Windows are aligned on each client's first event (not on the clock), so
//! a new client's first `limit` requests are counted exactly.

/// Encoded size of a [`SlidingWindow`].
pub const WINDOW_BYTES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlidingWindow {
    /// Start of the current window, ms since the epoch; 0 = never used.
    pub start_ms: u64,
    pub current: u32,
    pub previous: u32,
}

impl SlidingWindow {
    /// Moves the window forward to `now_ms` without counting anything.
    fn roll(&mut self, now_ms: u64, window_ms: u64) {
        let window_ms = window_ms.max(1);
        if self.start_ms == 0 || now_ms < self.start_ms {
            // Unused, or the clock went backwards: start afresh rather than
            // trusting counts from the future.
            if self.start_ms == 0 || self.start_ms.saturating_sub(now_ms) > window_ms {
                *self = SlidingWindow {
                    start_ms: now_ms.max(1),
                    current: 0,
                    previous: 0,
                };
            }
            return;
        }
        let elapsed = now_ms.saturating_sub(self.start_ms);
        if elapsed < window_ms {
            return;
        }
        if elapsed < window_ms.saturating_mul(2) {
            self.previous = self.current;
            self.start_ms = self.start_ms.saturating_add(window_ms);
        } else {
            self.previous = 0;
            self.start_ms = now_ms.max(1);
        }
        self.current = 0;
    }

    /// Estimated events in the last `window_ms` (see the module docs).
    pub fn estimate(&self, now_ms: u64, window_ms: u64) -> f64 {
        let mut w = *self;
        w.roll(now_ms, window_ms);
        let window = window_ms.max(1) as f64;
        let elapsed = now_ms.saturating_sub(w.start_ms).min(window_ms) as f64;
        f64::from(w.previous) * (window - elapsed) / window + f64::from(w.current)
    }

    /// Counts one event at `now_ms` and returns the new estimate.
    pub fn record(&mut self, now_ms: u64, window_ms: u64) -> f64 {
        self.record_n(1, now_ms, window_ms)
    }

    /// Counts `n` events at `now_ms` and returns the new estimate.
    pub fn record_n(&mut self, n: u32, now_ms: u64, window_ms: u64) -> f64 {
        self.roll(now_ms, window_ms);
        self.current = self.current.saturating_add(n);
        self.estimate(now_ms, window_ms)
    }

    pub fn encode(&self, out: &mut [u8; WINDOW_BYTES]) {
        let (a, rest) = out.split_at_mut(8);
        a.copy_from_slice(&self.start_ms.to_le_bytes());
        let (b, c) = rest.split_at_mut(4);
        b.copy_from_slice(&self.current.to_le_bytes());
        c.copy_from_slice(&self.previous.to_le_bytes());
    }

    pub fn decode(bytes: &[u8; WINDOW_BYTES]) -> SlidingWindow {
        let mut start = [0u8; 8];
        let mut current = [0u8; 4];
        let mut previous = [0u8; 4];
        let (a, rest) = bytes.split_at(8);
        let (b, c) = rest.split_at(4);
        start.copy_from_slice(a);
        current.copy_from_slice(b);
        previous.copy_from_slice(c);
        SlidingWindow {
            start_ms: u64::from_le_bytes(start),
            current: u32::from_le_bytes(current),
            previous: u32::from_le_bytes(previous),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: u64 = 10_000;
    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn counts_exactly_inside_the_first_window() {
        let mut w = SlidingWindow::default();
        for i in 1..=50u32 {
            assert_eq!(w.record(T0 + u64::from(i) * 100, W), f64::from(i));
        }
    }

    #[test]
    fn previous_window_fades_linearly() {
        let mut w = SlidingWindow::default();
        for _ in 0..100 {
            w.record(T0, W);
        }
        // Half-way through the next window, half of the old burst still counts.
        assert_eq!(w.estimate(T0 + W + W / 2, W), 50.0);
        assert_eq!(w.estimate(T0 + W, W), 100.0);
        assert_eq!(w.estimate(T0 + 2 * W, W), 0.0);
    }

    #[test]
    fn no_double_limit_across_a_boundary() {
        // A fixed window would allow 100 at the end of one window and 100 at
        // the start of the next; the sliding estimate sees ~200.
        let mut w = SlidingWindow::default();
        w.record(T0, W);
        for _ in 0..99 {
            w.record(T0 + W - 1, W);
        }
        let mut last = 0.0;
        for _ in 0..100 {
            last = w.record(T0 + W + 1, W);
        }
        assert!(last > 199.0, "{last}");
    }

    #[test]
    fn long_idle_forgets() {
        let mut w = SlidingWindow::default();
        for _ in 0..10 {
            w.record(T0, W);
        }
        assert_eq!(w.record(T0 + 5 * W, W), 1.0);
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let mut w = SlidingWindow::default();
        w.record(T0, W);
        assert_eq!(w.record(T0 - 10, W), 2.0);
        assert_eq!(w.record(T0 - 10 * W, W), 1.0);
    }

    #[test]
    fn codec_round_trips() {
        let w = SlidingWindow { start_ms: T0, current: 7, previous: u32::MAX };
        let mut buf = [0u8; WINDOW_BYTES];
        w.encode(&mut buf);
        assert_eq!(SlidingWindow::decode(&buf), w);
    }

    proptest! {
        /// The estimate never exceeds the true number of events in the last
        /// 2w and is never below the true number in the current window part.
        #[test]
        fn estimate_is_bounded_by_truth(gaps in proptest::collection::vec(0u64..3_000, 1..200)) {
            let mut w = SlidingWindow::default();
            let mut times = Vec::new();
            let mut t = T0;
            for g in gaps {
                t += g;
                times.push(t);
                let est = w.record(t, W);
                let in_2w = times.iter().filter(|&&x| x + 2 * W > t).count() as f64;
                let in_w = times.iter().filter(|&&x| x + W > t && x >= w.start_ms).count() as f64;
                prop_assert!(est <= in_2w + 1e-9, "est {} > 2w count {}", est, in_2w);
                prop_assert!(est + 1e-9 >= in_w.min(f64::from(w.current)), "est {} < {}", est, in_w);
            }
        }
    }
}
