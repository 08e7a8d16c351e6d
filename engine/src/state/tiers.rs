//! The state tiers of a client record, and when a request uses which.
//!
//! 1. **Per-worker** (this file): each worker VM keeps the records of the
//!    clients it sees in a bounded local table (`state.worker_clients`
//!    entries, fixed memory): the shared record as last read (`base`) and
//!    its own view since (`local`). A request of a quiet client changes only
//!    `local`: no shared-data round trip.
//! 2. **Shared** ([`crate::state::store::ShardedTable`]): one process-wide table in
//!    Envoy shared data, the truth every worker merges into by CAS.
//! 3. **Scorer** (the scoring service): fleet-wide, asked for borderline
//!    clients and fed tick batches (see `engine/events.rs`).
//!
//! A request goes to shared data synchronously (merge the worker's delta,
//! then change the fresh shared record, as before) when:
//! - the worker has no view of the client, or its view is older than
//!   `state.worker_sync_ms` (T);
//! - the request changes anything but counts and times (a penalty, a risk,
//!   a reason, a new distinct value, a login, an object or page run), see
//!   [`crate::state::merge::only_free_fields_changed`] and [`client_stays_local`];
//! - the client is near a rate limit: its view is at half of a limit, or
//!   the worker holds a tenth of a limit not yet merged.
//!
//! Merge rules: [`crate::state::merge`] (counts summed, sketches OR-ed, penalties
//! and risk max-ed). On each tick a worker merges every view it changed and
//! that is T old, and forgets views unused for 2T (after merging them): a
//! busy client costs one shared-data round trip per T, not one per request.
//!
//! Bounds, with N workers and T = `state.worker_sync_ms`:
//! - no increment is lost: a delta stays in the worker until a merge of it
//!   succeeded (a table full of views merges the one it evicts);
//! - a worker's view is at most T old when a request uses it, so a block or
//!   penalty decided on one worker (always written at once) reaches every
//!   worker within T;
//! - a count reaches shared data within T + one tick (0.5 s) while at most
//!   [`MAX_TICK_MERGES`] views are due per tick; beyond that within T +
//!   ⌈due / MAX_TICK_MERGES⌉ ticks, or at the client's next request;
//! - a rate limit is overshot by less than N × 10 % of it: a worker holds
//!   less than a tenth of a limit unmerged, so a decision in shared data
//!   misses less than (N−1) tenths, and a worker on its own view allows
//!   less than a tenth more before it goes to shared data; limits of 10 or
//!   less are always counted in shared data, exactly.

use crate::record::ClientRecord;
use crate::record::Record;
use crate::state::store::{ShardedTable, SharedStore, UpdateFailed, UpdateStats};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Deref;
use std::sync::Mutex;

/// A record whose changes on one worker can be merged into the shared one.
pub trait Merge: Record {
    /// Applies what `local` changed since `base` to `shared`.
    fn merge(shared: &mut Self, base: &Self, local: &Self);
}

impl Merge for ClientRecord {
    fn merge(shared: &mut Self, base: &Self, local: &Self) {
        crate::state::merge::merge_client(shared, base, local);
    }
}

/// Whether a request's change to a client may stay in the worker's view:
/// nothing but counts and times changed, no risk or penalty, and no rate
/// limit near (see the module docs).
/// `far_from_limits` is the rate detector's part of the rule (the state
/// tiers sit below the detectors: they are told, not asked).
pub fn client_stays_local(
    base: &ClientRecord,
    next: &ClientRecord,
    now_ms: u64,
    far_from_limits: impl FnOnce(&ClientRecord, &ClientRecord) -> bool,
) -> bool {
    next.risk < 1.0
        && next.recent_reasons.is_empty()
        && !next.penalized_at(now_ms)
        && crate::state::merge::only_free_fields_changed(base, next)
        && far_from_limits(base, next)
}

/// Keys are seeded hashes already: no need to hash them again.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Debug, Clone, Copy)]
struct View<R> {
    key: u64,
    /// The shared record as last read or written.
    base: R,
    /// The worker's record (base + what this worker counted since).
    local: R,
    synced_ms: u64,
    used_ms: u64,
    dirty: bool,
}

/// The worker's views: at most `capacity`, found by key.
#[derive(Debug)]
struct Views<R> {
    capacity: usize,
    entries: Vec<View<R>>,
    index: HashMap<u64, usize, BuildHasherDefault<KeyHasher>>,
    /// Where the next eviction looks (a clock hand).
    hand: usize,
    /// Where the next tick starts merging (the last one ran out of budget there).
    tick_cursor: usize,
}

/// Entries compared to choose one to evict (the least recently used of them).
const EVICTION_SAMPLE: usize = 8;

impl<R: Copy> Views<R> {
    fn get(&self, key: u64) -> Option<&View<R>> {
        self.index.get(&key).and_then(|&i| self.entries.get(i))
    }

    fn get_mut(&mut self, key: u64) -> Option<&mut View<R>> {
        let i = *self.index.get(&key)?;
        self.entries.get_mut(i)
    }

    fn remove_at(&mut self, i: usize) -> Option<View<R>> {
        if i >= self.entries.len() {
            return None;
        }
        let gone = self.entries.swap_remove(i);
        self.index.remove(&gone.key);
        if let Some(moved) = self.entries.get(i) {
            self.index.insert(moved.key, i);
        }
        Some(gone)
    }

    /// Stores a view; returns the one evicted to make room, if any.
    fn put(&mut self, view: View<R>) -> Option<View<R>> {
        if let Some(v) = self.get_mut(view.key) {
            *v = view;
            return None;
        }
        if self.capacity == 0 {
            return None;
        }
        let mut evicted = None;
        if self.entries.len() >= self.capacity {
            let len = self.entries.len();
            let victim = (0..EVICTION_SAMPLE.min(len))
                .map(|k| (self.hand.wrapping_add(k)) % len)
                .min_by_key(|&i| self.entries.get(i).map(|v| v.used_ms).unwrap_or(0));
            self.hand = self.hand.wrapping_add(EVICTION_SAMPLE) % len.max(1);
            evicted = victim.and_then(|i| self.remove_at(i));
        }
        self.index.insert(view.key, self.entries.len());
        self.entries.push(view);
        evicted
    }
}

/// Merges one tick may do per table: each is a shared-data round trip
/// (a few µs on V8), and the tick runs on the worker between requests, so
/// an unbounded tick holds every request behind it (10,000 busy clients
/// due at once are 10,000 round trips, tens of milliseconds on V8).
pub const MAX_TICK_MERGES: u32 = 256;

/// What a tick did, for stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TickStats {
    pub merged: u32,
    pub dropped: u32,
    pub failed: u32,
}

/// A shared table with a per-worker tier in front (see the module docs).
/// Derefs to the shared table for everything but updates.
#[derive(Debug)]
pub struct TieredTable<R> {
    shared: ShardedTable<R>,
    views: Mutex<Views<R>>,
    sync_ms: u64,
}

impl<R> Deref for TieredTable<R> {
    type Target = ShardedTable<R>;
    fn deref(&self) -> &ShardedTable<R> {
        &self.shared
    }
}

impl<R: Merge + std::fmt::Debug> TieredTable<R> {
    /// `capacity` 0: no worker tier (every update goes to shared data).
    pub fn new(shared: ShardedTable<R>, capacity: usize, sync_ms: u64) -> TieredTable<R> {
        TieredTable {
            shared,
            views: Mutex::new(Views {
                capacity,
                entries: Vec::new(),
                index: HashMap::default(),
                hand: 0,
                tick_cursor: 0,
            }),
            sync_ms: sync_ms.max(1),
        }
    }

    pub fn shared(&self) -> &ShardedTable<R> {
        &self.shared
    }

    /// Views held by this worker now.
    pub fn local_len(&self) -> usize {
        self.views.lock().map(|v| v.entries.len()).unwrap_or(0)
    }

    /// Fixed memory of the worker tier, bytes (at capacity).
    pub fn local_bytes(&self) -> usize {
        let capacity = self.views.lock().map(|v| v.capacity).unwrap_or(0);
        capacity.saturating_mul(std::mem::size_of::<View<R>>() + 2 * std::mem::size_of::<(u64, usize)>())
    }

    /// Changes the client's shared record at once (as
    /// [`ShardedTable::update`]), merging first what this worker counted
    /// and not yet merged; the worker's view is then the written record.
    pub fn update<T>(
        &self,
        store: &dyn SharedStore,
        key: u64,
        now_ms: u64,
        mut change: impl FnMut(&mut R) -> (T, bool),
    ) -> Result<(T, UpdateStats), UpdateFailed> {
        match self.views.lock() {
            Ok(mut views) => self.update_shared(&mut views, store, key, now_ms, &mut change),
            Err(_) => self.shared.update(store, key, now_ms, change),
        }
    }

    /// Changes the client's record in this worker's view when `stays_local(base,
    /// changed)` says the change may wait for the next merge, else as
    /// [`TieredTable::update`]. `change` may run twice (on the view, then on
    /// the shared record): it must depend only on the record it is given.
    pub fn update_local<T>(
        &self,
        store: &dyn SharedStore,
        key: u64,
        now_ms: u64,
        stays_local: impl Fn(&R, &R) -> bool,
        mut change: impl FnMut(&mut R) -> (T, bool),
    ) -> Result<(T, UpdateStats), UpdateFailed> {
        let Ok(mut views) = self.views.lock() else {
            return self.shared.update(store, key, now_ms, change);
        };
        let fresh = |v: &View<R>| now_ms >= v.synced_ms && now_ms < v.synced_ms.saturating_add(self.sync_ms);
        if let Some(view) = views.get_mut(key).filter(|v| fresh(v)) {
            let mut next = view.local;
            let (result, write) = change(&mut next);
            if !write {
                // Read-only outcome (a penalty box hit on the view): nothing to keep.
                view.used_ms = now_ms;
                return Ok((result, UpdateStats::default()));
            }
            if stays_local(&view.base, &next) {
                view.local = next;
                view.dirty = true;
                view.used_ms = now_ms;
                return Ok((result, UpdateStats::default()));
            }
        }
        self.update_shared(&mut views, store, key, now_ms, &mut change)
    }

    fn update_shared<T>(
        &self,
        views: &mut Views<R>,
        store: &dyn SharedStore,
        key: u64,
        now_ms: u64,
        change: &mut impl FnMut(&mut R) -> (T, bool),
    ) -> Result<(T, UpdateStats), UpdateFailed> {
        if views.capacity == 0 {
            return self.shared.update(store, key, now_ms, change);
        }
        let pending = views.get(key).filter(|v| v.dirty).map(|v| (v.base, v.local));
        let mut seen: Option<(R, R, R, bool)> = None; // (read, merged, written, wrote)
        let updated = self.shared.update(store, key, now_ms, |s| {
            let read = *s;
            if let Some((base, local)) = &pending {
                R::merge(s, base, local);
            }
            let merged = *s;
            let (result, write) = change(s);
            seen = Some((read, merged, *s, write));
            (result, write)
        })?;
        if let Some((read, merged, written, wrote)) = seen {
            let view = if wrote {
                View { key, base: written, local: written, synced_ms: now_ms, used_ms: now_ms, dirty: false }
            } else {
                // Nothing written: the worker's delta is still its own.
                View { key, base: read, local: merged, synced_ms: now_ms, used_ms: now_ms, dirty: pending.is_some() }
            };
            if let Some(evicted) = views.put(view) {
                if evicted.dirty {
                    let _ = self.merge_view(store, &evicted, now_ms);
                }
            }
        }
        Ok(updated)
    }

    /// Writes a view's delta into the shared record; returns the record written.
    fn merge_view(&self, store: &dyn SharedStore, view: &View<R>, now_ms: u64) -> Result<R, UpdateFailed> {
        let (base, local) = (view.base, view.local);
        self.shared
            .update(store, view.key, now_ms, |s| {
                R::merge(s, &base, &local);
                (*s, true)
            })
            .map(|(written, _)| written)
    }

    /// The tick: merges changed views at least T old — at most
    /// [`MAX_TICK_MERGES`], from where the last tick stopped — and forgets
    /// views unused for 2T once merged. A failed merge keeps the view (and
    /// its delta) for the next tick. A view left for a later tick is merged
    /// by its client's next request if that comes first (its view is then
    /// older than T): the work is spread, never lost.
    pub fn on_tick(&self, store: &dyn SharedStore, now_ms: u64) -> TickStats {
        let mut stats = TickStats::default();
        let Ok(mut views) = self.views.lock() else {
            return stats;
        };
        let len = views.entries.len();
        let start = views.tick_cursor % len.max(1);
        let mut budget = MAX_TICK_MERGES;
        let mut resume_at = None;
        let mut forget: Vec<usize> = Vec::new();
        for k in 0..len {
            let i = (start + k) % len;
            // Look before copying: a view is two whole records, and most
            // views need nothing on a given tick.
            let Some((dirty, used_ms, synced_ms)) = views.entries.get(i).map(|v| (v.dirty, v.used_ms, v.synced_ms)) else {
                break;
            };
            let idle = now_ms.saturating_sub(used_ms) >= self.sync_ms.saturating_mul(2);
            let due = dirty && (idle || now_ms.saturating_sub(synced_ms) >= self.sync_ms);
            if due && budget == 0 {
                resume_at.get_or_insert(i);
                continue;
            }
            let mut clean = !dirty;
            if due {
                budget -= 1;
                match views.entries.get(i).map(|view| self.merge_view(store, view, now_ms)) {
                    Some(Ok(written)) => {
                        stats.merged += 1;
                        clean = true;
                        if let Some(v) = views.entries.get_mut(i) {
                            v.base = written;
                            v.local = written;
                            v.synced_ms = now_ms;
                            v.dirty = false;
                        }
                    }
                    _ => stats.failed += 1,
                }
            }
            if idle && clean {
                forget.push(i);
            }
        }
        views.tick_cursor = resume_at.unwrap_or(0);
        // Highest index first: swap_remove moves the last entry, which is
        // then never one still to remove.
        forget.sort_unstable_by(|a, b| b.cmp(a));
        for i in forget {
            views.remove_at(i);
            stats.dropped += 1;
        }
        stats
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::state::store::MemoryStore;

    const W: u64 = 60_000;
    const T: u64 = 1000;

    fn table(capacity: usize) -> TieredTable<ClientRecord> {
        TieredTable::new(ShardedTable::new("t", "c", 8, 16, 1), capacity, T)
    }

    /// Room in shared data for a few thousand clients.
    fn big_table(capacity: usize) -> TieredTable<ClientRecord> {
        TieredTable::new(ShardedTable::new("t", "c", 512, 16, 1), capacity, T)
    }

    /// One request: counts it in window 0; stays local while under `limit / 2`
    /// and a tenth of `limit` unmerged (the rule of client_stays_local).
    fn count(t: &TieredTable<ClientRecord>, s: &MemoryStore, key: u64, limit: u32, now: u64) -> f64 {
        let stays = |b: &ClientRecord, n: &ClientRecord| {
            let delta = crate::state::merge::window_delta(&b.rate[0], &n.rate[0]);
            f64::from(delta) < f64::from(limit) / 10.0 && n.rate[0].estimate(now, W) < f64::from(limit) / 2.0
        };
        t.update_local(s, key, now, stays, |r| {
            r.requests += 1;
            (r.rate[0].record(now, W), true)
        })
        .unwrap()
        .0
    }

    fn shared_count(t: &TieredTable<ClientRecord>, s: &MemoryStore, key: u64, now: u64) -> f64 {
        t.peek(s, key).unwrap().map(|r| r.rate[0].estimate(now, W)).unwrap_or(0.0)
    }

    #[test]
    fn quiet_clients_stay_local_and_reach_shared_data_on_the_tick() {
        let (t, s) = (table(64), MemoryStore::new());
        t.create_shards(&s).unwrap();
        let key = 0xabcd_0000_0001;
        for i in 0..50 {
            count(&t, &s, key, 1_000_000, 10 + i);
        }
        // The first request read the shared record; the other 49 stayed local.
        assert_eq!(shared_count(&t, &s, key, 100), 1.0);
        let stats = t.on_tick(&s, 10 + T);
        assert_eq!(stats.merged, 1);
        assert_eq!(shared_count(&t, &s, key, 600), 50.0);
        assert_eq!(t.peek(&s, key).unwrap().unwrap().requests, 50);
    }

    /// N workers (one table each, one shared store), a client spread over
    /// them, ticks every 500 ms: no increment is lost, and the limit is
    /// overshot (requests judged under it while the true count is over) by
    /// less than N tenths of it.
    #[test]
    fn n_workers_lose_nothing_and_overshoot_within_the_bound() {
        for (rate_ms, limit) in [(3u64, 400u32), (1, 400), (20, 100), (2, 40)] {
            let s = MemoryStore::new();
            let workers: Vec<_> = (0..4).map(|_| table(64)).collect();
            workers[0].create_shards(&s).unwrap();
            let key = 0x77_0000_0003u64;
            let (mut true_count, mut overshoot) = (0u32, 0u32);
            let mut now = 1_000u64;
            let mut next_tick = now + 500;
            for i in 0..2_000u32 {
                let w = &workers[(i as usize * 7 + i as usize / 3) % 4];
                let seen = count(w, &s, key, limit, now);
                true_count += 1;
                if true_count > limit && seen <= f64::from(limit) {
                    overshoot += 1;
                }
                now += rate_ms;
                if now >= next_tick {
                    next_tick += 500;
                    for w in &workers {
                        w.on_tick(&s, now);
                    }
                }
                if true_count > 2 * limit {
                    break;
                }
            }
            for w in &workers {
                w.on_tick(&s, now + 10 * T);
            }
            assert_eq!(t_requests(&workers[0], &s, key), true_count, "an increment was lost or doubled");
            let bound = 4 * limit / 10;
            assert!(overshoot < bound, "{limit} per window at one per {rate_ms} ms: overshoot {overshoot}, bound {bound}");
        }
    }

    fn t_requests(t: &TieredTable<ClientRecord>, s: &MemoryStore, key: u64) -> u32 {
        t.peek(s, key).unwrap().unwrap().requests
    }

    /// A penalty written on one worker is seen by another within T, even
    /// if that worker held a fresh view of the client.
    #[test]
    fn a_penalty_reaches_every_worker_within_t() {
        let s = MemoryStore::new();
        let (a, b) = (table(64), table(64));
        a.create_shards(&s).unwrap();
        let key = 0x55_0000_0009u64;
        count(&b, &s, key, 1_000_000, 1_000); // b holds a view from t = 1000
        a.update(&s, key, 1_100, |r| {
            r.penalty_until_ms = 100_000;
            ((), true)
        })
        .unwrap();
        let penalized = |now| {
            b.update_local(&s, key, now, |_, n| !n.penalized_at(now), |r| (r.penalized_at(now), !r.penalized_at(now)))
                .unwrap()
                .0
        };
        // Within T of b's last read it may still allow; from then on never.
        assert!(penalized(1_000 + T));
        assert!(penalized(1_000 + T + 1));
    }

    #[test]
    fn a_tick_merges_a_bounded_number_of_views_and_the_next_ones_go_on_from_there() {
        let (t, s) = (big_table(2_000), MemoryStore::new());
        t.create_shards(&s).unwrap();
        let keys: Vec<u64> = (1..=1_000u64).map(|k| k << 33 | k).collect();
        // Each view read once (shared), then counted locally twice.
        for round in 0..3 {
            for &k in &keys {
                count(&t, &s, k, 1_000_000, 100 + round);
            }
        }
        let total = |t: &TieredTable<ClientRecord>| keys.iter().map(|&k| t.peek(&s, k).unwrap().map(|r| r.requests).unwrap_or(0)).sum::<u32>();
        assert_eq!(total(&t), 1_000);
        let mut merged = Vec::new();
        for tick in 1..=4u64 {
            merged.push(t.on_tick(&s, 100 + T + tick).merged);
        }
        let budget = MAX_TICK_MERGES;
        assert_eq!(merged, vec![budget, budget, budget, 1_000 - 3 * budget]);
        assert_eq!(total(&t), 3_000, "every increment reached shared data");
    }

    #[test]
    fn a_view_left_by_the_tick_is_merged_by_its_clients_next_request() {
        let (t, s) = (big_table(2_000), MemoryStore::new());
        t.create_shards(&s).unwrap();
        let keys: Vec<u64> = (1..=600u64).map(|k| k << 33 | k).collect();
        for round in 0..2 {
            for &k in &keys {
                count(&t, &s, k, 1_000_000, 100 + round);
            }
        }
        assert_eq!(t.on_tick(&s, 100 + T).merged, MAX_TICK_MERGES);
        // The next request of every client: stale views merge their delta on the way.
        for &k in &keys {
            count(&t, &s, k, 1_000_000, 100 + T + 1);
        }
        // The 344 views the tick left were stale: their request went to
        // shared data with their delta (3 each); the 256 merged ones were
        // fresh and counted it locally (2 each in shared data).
        let shared = |t: &TieredTable<ClientRecord>| keys.iter().map(|&k| t_requests(t, &s, k)).sum::<u32>();
        let left = 600 - MAX_TICK_MERGES;
        assert_eq!(shared(&t), 3 * left + 2 * MAX_TICK_MERGES);
        t.on_tick(&s, 100 + 3 * T);
        assert_eq!(shared(&t), 3 * 600, "nothing lost");
    }

    #[test]
    fn evicted_views_are_merged_first() {
        let (t, s) = (table(4), MemoryStore::new());
        t.create_shards(&s).unwrap();
        let keys: Vec<u64> = (1..=20u64).map(|k| k << 33 | k).collect();
        for round in 0..3 {
            for &k in &keys {
                count(&t, &s, k, 1_000_000, 100 + round);
            }
        }
        assert!(t.local_len() <= 4);
        t.on_tick(&s, 100_000);
        let total: u32 = keys.iter().map(|&k| t_requests(&t, &s, k)).sum();
        assert_eq!(total, 60);
    }

    #[test]
    fn without_a_worker_tier_every_update_is_shared() {
        let (t, s) = (table(0), MemoryStore::new());
        t.create_shards(&s).unwrap();
        for i in 0..5 {
            count(&t, &s, 42 << 32, 1_000_000, 10 + i);
        }
        assert_eq!(shared_count(&t, &s, 42 << 32, 20), 5.0);
        assert_eq!(t.local_len(), 0);
    }
}
