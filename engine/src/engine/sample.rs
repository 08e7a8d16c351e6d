//! A uniform random sample of a worker's clients per window, for the
//! scorer's model to learn "normal" from — off the request path.
//!
//! **Why bottom-k.** A reservoir over *requests* would be a sample of
//! traffic volume: one busy scraper would fill it. The model must learn
//! what an ordinary *client* looks like, so each window keeps the
//! [`RESERVOIR_CAP`] clients with the smallest rank, where the rank is a
//! hash of the client's (already seeded) key and the window number: a
//! uniform sample without replacement of the distinct clients of the
//! window, whatever their request counts, and one an attacker cannot steer
//! (the seed is secret and changes per process; the rank changes per
//! window). A client in the sample keeps the feature summary of its latest
//! request of the window, its route group, and whether it was penalized or
//! blocked at any point of the window (then the scorer scores it but does
//! not learn from it).
//!
//! **Cost.** Per request one hash and one comparison with the sample's
//! largest rank; only a client that ranks in the sample pays for the scan
//! of [`RESERVOIR_CAP`] entries and the feature summary. Nothing here does
//! a host call: the sample leaves with the worker's tick batch.
//!
//! **Bounds.** At most [`RESERVOIR_CAP`] entries per window and worker, and
//! one finished window waiting for the tick: a window that ends before the
//! previous one was sent replaces it, and the replaced samples are counted
//! as dropped (as are the samples of a batch the scorer did not take).
//!
//! **One engine for many workers.** The wasm build has an engine per worker,
//! so an Envoy samples `RESERVOIR_CAP` × workers clients a window. The
//! dynamic module shares one engine among its workers: it asks for the same
//! per-Envoy sample ([`Reservoir::set_workers`], at most [`MAX_WORKERS`]
//! workers' worth), and the finished window leaves over several ticks, at
//! most `MAX_BATCH_SAMPLES` a batch.

use crate::wire::FeatureSample;

/// Length of a sample window.
pub const SAMPLE_WINDOW_MS: u64 = 5_000;
/// Clients sampled per worker per window, at most (≤ `MAX_BATCH_SAMPLES`):
/// with ~500 clients a window, a client is in some worker's sample of a window
/// with a chance of ~1 in 4 (a rule-evading client is scored within ~20 s).
pub const RESERVOIR_CAP: usize = 64;

const _: () = assert!(RESERVOIR_CAP <= crate::wire::MAX_BATCH_SAMPLES);

/// Workers one shared reservoir samples for, at most: a window's sample
/// must leave within the window (~10 ticks), `MAX_BATCH_SAMPLES` per batch.
pub const MAX_WORKERS: u32 = 8;

/// SplitMix64's finaliser: the rank of `key` in window `window`.
fn rank(key: u64, window: u64) -> u64 {
    let mut z = key ^ window.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What the sample keeps of one client.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    rank: u64,
    key: u64,
    pub client: String,
    pub group: Option<usize>,
    pub features: [f32; 18],
    pub penalized: bool,
}

/// What a request brings to the sample, built only when it ranks in.
pub struct Observation {
    pub client: String,
    pub group: Option<usize>,
    pub features: [f32; 18],
}

#[derive(Debug, Default)]
pub struct Reservoir {
    /// Workers this reservoir samples for (0 = 1).
    workers: u32,
    window: u64,
    entries: Vec<Entry>,
    /// Largest rank in `entries` once full (requests above it skip at once).
    threshold: u64,
    /// The last finished window, waiting for the tick.
    ready: Vec<Entry>,
    /// Samples replaced before they were sent.
    pub dropped: u64,
}

impl Reservoir {
    /// Samples for `workers` workers (clamped to 1..=[`MAX_WORKERS`]).
    pub fn set_workers(&mut self, workers: u32) {
        self.workers = workers.clamp(1, MAX_WORKERS);
    }

    fn cap(&self) -> usize {
        RESERVOIR_CAP * self.workers.max(1) as usize
    }

    /// Closes the window when `now_ms` is past it.
    fn roll(&mut self, now_ms: u64) {
        let window = now_ms / SAMPLE_WINDOW_MS;
        if window == self.window {
            return;
        }
        self.window = window;
        self.threshold = u64::MAX;
        let finished = std::mem::take(&mut self.entries);
        if !finished.is_empty() {
            self.dropped = self.dropped.saturating_add(self.ready.len() as u64);
            self.ready = finished;
        }
    }

    /// Offers a request's client. `observe` builds its summary and is only
    /// called when the client is (or enters) the sample; `penalized` marks
    /// the client even when there is no summary (a refused request).
    pub fn offer(&mut self, key: u64, penalized: bool, now_ms: u64, observe: impl FnOnce() -> Option<Observation>) {
        self.roll(now_ms);
        let r = rank(key, self.window);
        let cap = self.cap();
        let full = self.entries.len() >= cap;
        if full && r > self.threshold {
            return;
        }
        if let Some(e) = self.entries.iter_mut().find(|e| e.key == key) {
            e.penalized |= penalized;
            if let Some(o) = observe() {
                e.group = o.group;
                e.features = o.features;
            }
            return;
        }
        let Some(o) = observe() else {
            return;
        };
        let entry = Entry { rank: r, key, client: o.client, group: o.group, features: o.features, penalized };
        if full {
            // Replace the largest rank (its rank is the threshold).
            if let Some(slot) = self.entries.iter_mut().max_by_key(|e| e.rank) {
                *slot = entry;
            }
        } else {
            self.entries.push(entry);
        }
        if self.entries.len() >= cap {
            self.threshold = self.entries.iter().map(|e| e.rank).max().unwrap_or(u64::MAX);
        }
    }

    /// The finished window's sample, once, at most `MAX_BATCH_SAMPLES` at a
    /// time (the rest waits for the next tick). Rolls the window first, so a
    /// quiet worker still delivers what it saw.
    pub fn take_ready(&mut self, now_ms: u64) -> Vec<Entry> {
        self.roll(now_ms);
        let n = self.ready.len().min(crate::wire::MAX_BATCH_SAMPLES);
        self.ready.drain(..n).collect()
    }

    /// Samples of the window being filled.
    #[cfg(test)]
    pub fn filling(&self) -> usize {
        self.entries.len()
    }
}

/// The wire form, with the route group named from the configuration.
pub fn to_wire(entry: Entry, groups: &[crate::config::RouteGroup]) -> FeatureSample {
    FeatureSample {
        client: entry.client,
        route_group: entry.group.and_then(|g| groups.get(g)).map(|g| g.name.clone()),
        features: entry.features.to_vec(),
        penalized: entry.penalized,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000 / SAMPLE_WINDOW_MS * SAMPLE_WINDOW_MS;

    fn obs(key: u64) -> Option<Observation> {
        Some(Observation { client: format!("c{key}"), group: None, features: [key as f32; 18] })
    }

    #[test]
    fn keeps_at_most_the_cap_of_distinct_clients_per_window() {
        let mut r = Reservoir::default();
        // 1,000 clients, the first one very busy: it is still one client.
        for i in 0..5_000u64 {
            let key = if i % 5 == 0 { 1 } else { 1 + i };
            r.offer(key, false, T0 + i % 1000, || obs(key));
        }
        assert_eq!(r.filling(), RESERVOIR_CAP);
        let sample = r.take_ready(T0 + SAMPLE_WINDOW_MS);
        assert_eq!(sample.len(), RESERVOIR_CAP);
        let mut keys: Vec<u64> = sample.iter().map(|e| e.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), RESERVOIR_CAP, "distinct clients");
        assert!(r.take_ready(T0 + SAMPLE_WINDOW_MS + 1).is_empty(), "once");
    }

    #[test]
    fn the_sample_is_the_bottom_k_whatever_the_request_volume() {
        // Bottom-k is exact: the kept keys are those of smallest rank.
        let mut r = Reservoir::default();
        let keys: Vec<u64> = (1..=400).collect();
        for round in 0..3 {
            for &k in &keys {
                // Every 7th client sends 50× more.
                for _ in 0..if k % 7 == 0 { 50 } else { 1 } {
                    r.offer(k, false, T0 + round, || obs(k));
                }
            }
        }
        let window = T0 / SAMPLE_WINDOW_MS;
        let mut expected: Vec<u64> = keys.clone();
        expected.sort_by_key(|&k| rank(k, window));
        expected.truncate(RESERVOIR_CAP);
        expected.sort_unstable();
        let mut got: Vec<u64> = r.take_ready(T0 + SAMPLE_WINDOW_MS).iter().map(|e| e.key).collect();
        got.sort_unstable();
        assert_eq!(got, expected);
        // The busy clients are sampled about as often as anyone (1 in 7), not 50×.
        let busy = got.iter().filter(|k| *k % 7 == 0).count();
        assert!(busy <= RESERVOIR_CAP / 3, "{busy} busy clients of {RESERVOIR_CAP}");
    }

    #[test]
    fn keeps_the_latest_summary_and_a_penalty_sticks() {
        let mut r = Reservoir::default();
        r.offer(9, false, T0, || obs(9));
        r.offer(9, true, T0 + 10, || None); // refused: no summary, but marked
        r.offer(9, false, T0 + 20, || Some(Observation { client: "c9".into(), group: Some(1), features: [2.0; 18] }));
        let s = r.take_ready(T0 + SAMPLE_WINDOW_MS);
        assert_eq!(s.len(), 1);
        assert!(s[0].penalized);
        assert_eq!((s[0].group, s[0].features[0]), (Some(1), 2.0));
        // A refused request of a client not in the sample adds nothing.
        r.offer(10, true, T0 + SAMPLE_WINDOW_MS + 1, || None);
        assert!(r.take_ready(T0 + 2 * SAMPLE_WINDOW_MS).is_empty());
    }

    #[test]
    fn an_unsent_window_is_replaced_and_counted() {
        let mut r = Reservoir::default();
        for k in 1..=5 {
            r.offer(k, false, T0, || obs(k));
        }
        for k in 1..=3 {
            r.offer(k, false, T0 + SAMPLE_WINDOW_MS, || obs(k));
        }
        r.offer(4, false, T0 + 2 * SAMPLE_WINDOW_MS, || obs(4));
        assert_eq!(r.dropped, 5, "the first window never went out");
        assert_eq!(r.take_ready(T0 + 2 * SAMPLE_WINDOW_MS).len(), 3);
    }

    #[test]
    fn ranks_change_per_window() {
        let a: Vec<u64> = (0..64).map(|k| rank(k, 1)).collect();
        let b: Vec<u64> = (0..64).map(|k| rank(k, 2)).collect();
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
    }

    #[test]
    fn a_reservoir_shared_by_workers_samples_for_each_and_leaves_over_several_ticks() {
        let mut r = Reservoir::default();
        r.set_workers(3);
        for key in 1..=1_000u64 {
            r.offer(key, false, T0 + key % 1000, || obs(key));
        }
        assert_eq!(r.filling(), 3 * RESERVOIR_CAP);
        let mut sent = Vec::new();
        for tick in 0..3 {
            let batch = r.take_ready(T0 + SAMPLE_WINDOW_MS + tick);
            assert_eq!(batch.len(), crate::wire::MAX_BATCH_SAMPLES, "one batch's worth per tick");
            sent.extend(batch.into_iter().map(|e| e.key));
        }
        assert!(r.take_ready(T0 + SAMPLE_WINDOW_MS + 3).is_empty());
        sent.sort_unstable();
        sent.dedup();
        assert_eq!(sent.len(), 3 * RESERVOIR_CAP, "distinct clients, none lost");
        r.set_workers(1_000);
        assert_eq!(r.cap(), MAX_WORKERS as usize * RESERVOIR_CAP, "bounded");
        r.set_workers(0);
        assert_eq!(r.cap(), RESERVOIR_CAP);
    }
}
