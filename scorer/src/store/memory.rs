//! Fleet state in this process: the whole store of a single scorer, and the
//! fallback of a Redis-backed one. Every map is a [`BoundedMap`] (100,000
//! entries by default), the verdict log a ring of the last 10,000; the
//! warm-start state (known accounts, baselines) is fixed in size (see
//! `known`) and behind its own lock, and saved to `STATE_DIR/warm.json`
//! (see `snapshot`).

use super::{
    sliding_estimate, FleetStore, StoreError, SESSION_ADDRESS_CAP, VERDICTS_PAGE, VERDICT_LOG_CAP,
    WINDOW_MS,
};
use crate::bounded::BoundedMap;
use crate::known::{Baselines, KnownFilter, Merged, ShardBits, ShardPage};
use abuse_engine::known_accounts::SHARDS;
use crate::profiles::Profiles;
use super::{lift_live, LogEntry};
use abuse_engine::wire::{BaselineSnapshot, FleetLift, FleetVerdict, FleetVerdicts, ProfileUpdate, WIRE_VERSION};
use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Entries per map: ~100 B each, so a few tens of MB at worst.
pub const MAP_CAP: usize = 100_000;

/// Two adjacent window buckets of one counter.
#[derive(Debug, Default)]
struct Buckets {
    bucket: u64,
    current: u64,
    previous: u64,
}

impl Buckets {
    fn roll(&mut self, now_bucket: u64) {
        if now_bucket == self.bucket + 1 {
            self.previous = self.current;
            self.current = 0;
        } else if now_bucket > self.bucket {
            self.previous = 0;
            self.current = 0;
        }
        self.bucket = self.bucket.max(now_bucket);
    }
}

struct Inner {
    users: BoundedMap<String, Buckets>,
    /// Per session: (address, last seen ms), at most `SESSION_ADDRESS_CAP`.
    sessions: BoundedMap<String, Vec<(String, u64)>>,
    blocks: BoundedMap<String, FleetVerdict>,
    /// (cursor, verdict or lift), cursors increasing: lifts share the
    /// verdicts' cursor so that a filter's one `since` pages through both.
    log: VecDeque<(u64, LogEntry)>,
    seq: u64,
}

/// What a fresh Envoy warms from.
#[derive(Default)]
struct Warm {
    known: KnownFilter,
    baselines: Baselines,
    profiles: Profiles,
    /// Bumped on every change that a snapshot should carry.
    changes: u64,
}

/// The warm-start state as saved: (changes, baselines with when they were
/// last mentioned, non-empty shards, account profiles most recent first).
pub type WarmExport = (u64, Vec<(BaselineSnapshot, u64)>, Vec<(usize, ShardBits)>, Vec<ProfileUpdate>);

pub struct MemoryStore {
    inner: Mutex<Inner>,
    warm: Mutex<Warm>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::with_cap(MAP_CAP)
    }

    pub fn with_cap(cap: usize) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner {
                users: BoundedMap::new(cap, WINDOW_MS),
                sessions: BoundedMap::new(cap, WINDOW_MS),
                blocks: BoundedMap::new(cap, WINDOW_MS),
                log: VecDeque::new(),
                seq: 0,
            }),
            warm: Mutex::new(Warm::default()),
        }
    }

    fn warm(&self) -> MutexGuard<'_, Warm> {
        self.warm.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets each account's bits; how many were new.
    pub fn add_known(&self, accounts: &[u64]) -> u64 {
        let mut warm = self.warm();
        let new = accounts.iter().filter(|a| warm.known.add(**a)).count() as u64;
        if new > 0 {
            warm.changes += 1;
        }
        new
    }

    pub fn known_page(&self, from: usize, max: usize) -> ShardPage {
        self.warm().known.page(from, max)
    }

    /// Merges the baselines; how many were dropped for want of a free name.
    pub fn merge_baseline_list(&self, baselines: &[BaselineSnapshot], now_ms: u64) -> u64 {
        let mut warm = self.warm();
        let mut dropped = 0;
        for b in baselines {
            match warm.baselines.merge(b, now_ms) {
                Merged::Stored => warm.changes += 1,
                Merged::Kept => {}
                Merged::Dropped => dropped += 1,
            }
        }
        dropped
    }

    /// Merges account profiles (`profiles::merge_bounded`); how many
    /// changed, and how many new values the bound dropped.
    pub fn merge_profile_list(&self, updates: &[ProfileUpdate], now_ms: u64) -> (u64, u64) {
        let mut warm = self.warm();
        let (mut changed, mut dropped) = (0, 0);
        for u in updates {
            let (c, d) = warm.profiles.merge(u, now_ms);
            changed += u64::from(c);
            dropped += d;
        }
        if changed > 0 {
            warm.changes += 1;
        }
        (changed, dropped)
    }

    pub fn profiles_page(&self, k: usize) -> (Vec<ProfileUpdate>, bool) {
        self.warm().profiles.page(k)
    }

    pub fn baseline_list(&self) -> Vec<BaselineSnapshot> {
        self.warm().baselines.list()
    }

    /// Changes to the warm-start state so far (snapshots compare it).
    pub fn warm_changes(&self) -> u64 {
        self.warm().changes
    }

    pub fn export_warm(&self) -> WarmExport {
        let warm = self.warm();
        let baselines = warm
            .baselines
            .entries()
            .map(|(b, seen)| (b.clone(), seen))
            .collect();
        let mut shards = Vec::new();
        let mut from = Some(0);
        while let Some(start) = from {
            let page = warm.known.page(start, SHARDS);
            shards.extend(page.shards);
            from = page.next;
        }
        (warm.changes, baselines, shards, warm.profiles.all())
    }

    /// Puts back saved state (at start): bits are ORed in, baselines merged
    /// by their saved time. Leaves `warm_changes` at 0: what was just read
    /// need not be written again.
    pub fn restore_warm(
        &self,
        baselines: Vec<(BaselineSnapshot, u64)>,
        shards: &[(usize, ShardBits)],
        profiles: &[ProfileUpdate],
    ) {
        let mut warm = self.warm();
        // Oldest first, so that the most recent are the last evicted.
        for p in profiles.iter().rev() {
            warm.profiles.merge(p, 0);
        }
        for (b, seen) in baselines {
            warm.baselines.restore(b, seen);
        }
        for (index, bits) in shards {
            warm.known.merge(*index, bits.as_slice());
        }
    }

    /// A panic elsewhere while holding the lock cannot leave these maps
    /// half-updated in a way that matters, so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn attempt(&self, user: &str, now_ms: u64) -> f64 {
        let mut inner = self.lock();
        let b = inner
            .users
            .entry_or_insert_with(user.to_string(), now_ms, Buckets::default);
        b.roll(now_ms / WINDOW_MS);
        b.current += 1;
        sliding_estimate(b.current, b.previous, now_ms)
    }

    pub fn session(&self, session: &str, client: &str, now_ms: u64) -> u64 {
        let mut inner = self.lock();
        let seen = inner
            .sessions
            .entry_or_insert_with(session.to_string(), now_ms, Vec::new);
        seen.retain(|(_, t)| now_ms.saturating_sub(*t) < WINDOW_MS);
        match seen.iter_mut().find(|(c, _)| c == client) {
            Some((_, t)) => *t = now_ms,
            None => {
                if seen.len() >= SESSION_ADDRESS_CAP {
                    // Forget the address seen longest ago.
                    if let Some(oldest) = seen
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, (_, t))| *t)
                        .map(|(i, _)| i)
                    {
                        seen.swap_remove(oldest);
                    }
                }
                seen.push((client.to_string(), now_ms));
            }
        }
        seen.len() as u64
    }

    pub fn block_of(&self, client: &str, now_ms: u64) -> Option<FleetVerdict> {
        self.lock()
            .blocks
            .get(&client.to_string())
            .filter(|v| v.until_ms >= now_ms)
            .cloned()
    }

    pub fn push_verdict(&self, verdict: &FleetVerdict) -> u64 {
        let mut inner = self.lock();
        inner.seq += 1;
        let seq = inner.seq;
        // "Touched" at its end: a live block is never evicted for being old,
        // and an expired one becomes evictable a window after it ended.
        let slot =
            inner
                .blocks
                .entry_or_insert_with(verdict.client.clone(), verdict.until_ms, || verdict.clone());
        *slot = verdict.clone();
        inner.log.push_back((seq, LogEntry::Verdict(verdict.clone())));
        while inner.log.len() > VERDICT_LOG_CAP {
            inner.log.pop_front();
        }
        seq
    }

    /// Logs an operator's lift after every verdict so far; its cursor.
    pub fn push_lift(&self, lift: &FleetLift, now_ms: u64) -> u64 {
        let mut inner = self.lock();
        inner.seq += 1;
        let seq = inner.seq;
        inner.log.push_back((seq, LogEntry::Lift { lift: lift.clone(), logged_ms: now_ms }));
        while inner.log.len() > VERDICT_LOG_CAP {
            inner.log.pop_front();
        }
        seq
    }

    /// Forgets the live blocks of `clients` and their verdicts in the log:
    /// a filter that reads the log from the start (a fresh Envoy) must not
    /// box a client an operator lifted.
    pub fn forget_blocks(&self, clients: &[String]) {
        let mut inner = self.lock();
        for c in clients {
            inner.blocks.remove(c);
        }
        inner
            .log
            .retain(|(_, e)| !matches!(e, LogEntry::Verdict(v) if clients.contains(&v.client)));
    }

    pub fn verdicts_after(&self, since: u64, now_ms: u64) -> FleetVerdicts {
        let inner = self.lock();
        let since = if since > inner.seq { 0 } else { since };
        let start = inner.log.partition_point(|(s, _)| *s <= since);
        let mut verdicts = Vec::new();
        let mut lifts = Vec::new();
        let mut next = inner.seq;
        let mut taken = 0;
        for (seq, e) in inner.log.iter().skip(start) {
            if taken >= VERDICTS_PAGE {
                break;
            }
            taken += 1;
            next = *seq;
            match e {
                LogEntry::Verdict(v) if v.until_ms >= now_ms => verdicts.push(v.clone()),
                LogEntry::Lift { lift, logged_ms } if lift_live(*logged_ms, lift, now_ms) => {
                    lifts.push(lift.clone());
                }
                _ => {}
            }
        }
        if taken < VERDICTS_PAGE {
            next = inner.seq;
        }
        FleetVerdicts {
            version: WIRE_VERSION,
            next,
            verdicts,
            lifts,
            ..FleetVerdicts::default()
        }
    }
}

impl FleetStore for MemoryStore {
    async fn username_attempt(&self, user: &str, now_ms: u64) -> Result<f64, StoreError> {
        Ok(self.attempt(user, now_ms))
    }

    async fn session_seen(
        &self,
        session: &str,
        client: &str,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        Ok(self.session(session, client, now_ms))
    }

    async fn blocked(&self, client: &str, now_ms: u64) -> Result<Option<FleetVerdict>, StoreError> {
        Ok(self.block_of(client, now_ms))
    }

    async fn record_verdict(
        &self,
        verdict: &FleetVerdict,
        _now_ms: u64,
    ) -> Result<u64, StoreError> {
        Ok(self.push_verdict(verdict))
    }

    async fn verdicts_since(&self, since: u64, now_ms: u64) -> Result<FleetVerdicts, StoreError> {
        Ok(self.verdicts_after(since, now_ms))
    }

    async fn record_lift(&self, lift: &FleetLift, now_ms: u64) -> Result<u64, StoreError> {
        Ok(self.push_lift(lift, now_ms))
    }

    async fn forget(&self, clients: &[String]) -> Result<(), StoreError> {
        self.forget_blocks(clients);
        Ok(())
    }

    async fn add_known_accounts(&self, accounts: &[u64]) -> Result<u64, StoreError> {
        Ok(self.add_known(accounts))
    }

    async fn known_shards(&self, from: usize, max: usize) -> Result<ShardPage, StoreError> {
        Ok(self.known_page(from, max))
    }

    async fn merge_baselines(
        &self,
        baselines: &[BaselineSnapshot],
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        Ok(self.merge_baseline_list(baselines, now_ms))
    }

    async fn merge_profiles(&self, updates: &[ProfileUpdate], now_ms: u64) -> Result<u64, StoreError> {
        Ok(self.merge_profile_list(updates, now_ms).0)
    }

    async fn profile_page(&self, k: usize) -> Result<(Vec<ProfileUpdate>, bool), StoreError> {
        Ok(self.profiles_page(k))
    }

    async fn baselines(&self) -> Result<Vec<BaselineSnapshot>, StoreError> {
        Ok(self.baseline_list())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn verdict(client: &str, until_ms: u64) -> FleetVerdict {
        FleetVerdict {
            client: client.into(),
            reasons: vec!["credential_stuffing".into()],
            until_ms,
        }
    }

    /// The behaviour every store must have; also run against Redis (see
    /// `redis::tests`) so both stores answer the same.
    pub(crate) async fn contract<S: FleetStore>(store: &S, t0: u64) {
        // Attempts add up within a window, and decay out of it.
        for i in 1..=5 {
            assert_eq!(
                store.username_attempt("u1", t0 + i).await.unwrap(),
                i as f64
            );
        }
        let next_window = (t0 / WINDOW_MS + 1) * WINDOW_MS;
        let half = store
            .username_attempt("u1", next_window + WINDOW_MS / 2)
            .await
            .unwrap();
        assert!(
            (half - (1.0 + 5.0 * 0.5)).abs() < 0.01,
            "sliding estimate {half}"
        );
        assert_eq!(
            store
                .username_attempt("u1", next_window + 3 * WINDOW_MS)
                .await
                .unwrap(),
            1.0
        );
        assert_eq!(store.username_attempt("u2", t0).await.unwrap(), 1.0);

        // Distinct addresses per session, in the window.
        for (i, c) in ["a", "b", "a", "c"].iter().enumerate() {
            store.session_seen("s1", c, t0 + i as u64).await.unwrap();
        }
        assert_eq!(store.session_seen("s1", "d", t0 + 10).await.unwrap(), 4);
        assert_eq!(
            store
                .session_seen("s1", "e", t0 + WINDOW_MS + 20)
                .await
                .unwrap(),
            1
        );

        // Verdicts: blocks, cursor, paging, expiry.
        assert!(store.blocked("x", t0).await.unwrap().is_none());
        let first = store.verdicts_since(0, t0).await.unwrap();
        let c1 = store
            .record_verdict(&verdict("x", t0 + 60_000), t0)
            .await
            .unwrap();
        let c2 = store
            .record_verdict(&verdict("y", t0 + 10), t0)
            .await
            .unwrap();
        assert!(c2 > c1 && c1 > first.next);
        assert_eq!(
            store.blocked("x", t0 + 1).await.unwrap().unwrap().client,
            "x"
        );
        assert!(
            store.blocked("y", t0 + 11).await.unwrap().is_none(),
            "expired"
        );
        let all = store.verdicts_since(first.next, t0).await.unwrap();
        assert_eq!(all.verdicts.len(), 2);
        assert_eq!(all.next, c2);
        let later = store.verdicts_since(first.next, t0 + 11).await.unwrap();
        assert_eq!(
            later
                .verdicts
                .iter()
                .map(|v| v.client.as_str())
                .collect::<Vec<_>>(),
            ["x"]
        );
        let none = store.verdicts_since(c2, t0).await.unwrap();
        assert!(none.verdicts.is_empty() && none.next == c2);
        // A cursor from the future (the store was reset) starts over.
        let reset = store.verdicts_since(c2 + 1_000_000, t0).await.unwrap();
        assert_eq!(
            reset.verdicts.len(),
            all.verdicts.len() + first.verdicts.len()
        );

        // Lifts ride the same cursor, after the verdicts; forgetting a
        // client removes its block and its verdicts from the log.
        let lift = FleetLift { client: "x".into(), reasons: vec![], quiet_until_ms: t0 + 120_000 };
        let c3 = store.record_lift(&lift, t0).await.unwrap();
        assert!(c3 > c2);
        let polled = store.verdicts_since(c2, t0).await.unwrap();
        assert_eq!((polled.lifts.clone(), polled.next), (vec![lift.clone()], c3));
        assert!(polled.verdicts.is_empty());
        store.forget(&["x".to_string()]).await.unwrap();
        assert!(store.blocked("x", t0 + 1).await.unwrap().is_none());
        let from_start = store.verdicts_since(first.next, t0).await.unwrap();
        assert!(from_start.verdicts.iter().all(|v| v.client != "x"), "{from_start:?}");
        assert_eq!(from_start.lifts, vec![lift.clone()]);
        // A lift is handed out for a day, or to its quiet period's end.
        let day = super::super::LIFT_KEEP_MS;
        assert!(store.verdicts_since(c2, t0 + day + 1).await.unwrap().lifts.is_empty());

        warm_contract(store, t0).await;
        profile_contract(store, t0).await;
    }

    fn profile(account: u64, device: u32, at_ms: u64) -> ProfileUpdate {
        let mut profile = abuse_engine::profile::AccountProfile::default();
        let place = abuse_engine::profile::LoginPlace { device, country: 17735, asn: 5089, network: 0 };
        profile.learn(&place, at_ms);
        ProfileUpdate { account, profile }
    }

    /// Profiles merge per account, page most recent first, and a merge
    /// that adds nothing changes nothing.
    async fn profile_contract<S: FleetStore>(store: &S, t0: u64) {
        use abuse_engine::wire::MAX_BATCH_PROFILES;
        let base = u64::MAX - 1_000;
        assert_eq!(store.merge_profiles(&[profile(base, 7, t0), profile(base + 1, 7, t0 + 5)], t0).await.unwrap(), 2);
        assert_eq!(store.merge_profiles(&[profile(base, 8, t0 + 10)], t0).await.unwrap(), 1, "another Envoy's view");
        assert_eq!(store.merge_profiles(&[profile(base, 8, t0 + 10)], t0).await.unwrap(), 0);
        let (page, more) = store.profile_page(0).await.unwrap();
        assert!(!more);
        let mine: Vec<&ProfileUpdate> = page.iter().filter(|p| p.account >= base).collect();
        assert_eq!(mine.len(), 2);
        assert_eq!(mine[0].account, base, "the most recent success first");
        assert!(mine[0].profile.devices.contains(7) && mine[0].profile.devices.contains(8));
        let many: Vec<ProfileUpdate> = (0..MAX_BATCH_PROFILES as u64).map(|i| profile(base + 10 + i, 1, t0 + 100 + i)).collect();
        store.merge_profiles(&many, t0).await.unwrap();
        let (first, more) = store.profile_page(0).await.unwrap();
        assert_eq!((first.len(), more), (MAX_BATCH_PROFILES, true));
        assert_eq!(first[0].account, base + 10 + MAX_BATCH_PROFILES as u64 - 1);
        let (second, more) = store.profile_page(1).await.unwrap();
        assert!(!more && second.iter().any(|p| p.account == base));
    }

    fn baseline(name: &str, samples: u32, value: f32) -> BaselineSnapshot {
        BaselineSnapshot {
            name: name.into(),
            baseline: value,
            unknown_baseline: 0.25,
            samples,
            successes_seen: 3,
        }
    }

    async fn warm_contract<S: FleetStore>(store: &S, t0: u64) {
        use crate::known::{BASELINE_NAMES, BASELINE_STALE_MS};
        use abuse_engine::known_accounts::bit_positions;

        // Known accounts: shards 5 and 700, two accounts each.
        let accounts = [5u64, 5 + 1024 * 3, 700, 700 + 1024];
        assert_eq!(store.add_known_accounts(&accounts).await.unwrap(), 4);
        assert_eq!(store.add_known_accounts(&accounts[..1]).await.unwrap(), 0);
        assert_eq!(store.add_known_accounts(&[]).await.unwrap(), 0);
        let first = store.known_shards(0, 1).await.unwrap();
        assert_eq!(first.shards.len(), 1);
        assert_eq!((first.shards[0].0, first.next), (5, Some(6)));
        let second = store.known_shards(6, 1).await.unwrap();
        assert_eq!((second.shards.len(), second.next), (1, None));
        assert_eq!(second.shards[0].0, 700);
        for a in accounts {
            let (shard, bits) = bit_positions(a);
            let page = if shard == 5 { &first } else { &second };
            let got = &page.shards[0].1;
            assert!(bits
                .iter()
                .all(|b| got[(b / 8) as usize] & (1 << (b % 8)) != 0));
        }
        let ones: u32 = [&first, &second]
            .iter()
            .map(|p| p.shards[0].1.iter().map(|b| b.count_ones()).sum::<u32>())
            .sum();
        assert_eq!(ones, 7 + 5, "exactly the accounts' bits (shared ones once)");
        let both = store.known_shards(0, 64).await.unwrap();
        assert_eq!((both.shards.len(), both.next), (2, None));
        assert!(store.known_shards(701, 64).await.unwrap().shards.is_empty());
        assert_eq!(
            store.known_shards(5_000, 64).await.unwrap(),
            ShardPage::default()
        );

        // Baselines: the warmer per name, the newer on a tie.
        let sorted = |mut v: Vec<BaselineSnapshot>| {
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v
        };
        let batch = [baseline("login:/x", 10, 0.1), baseline("group:g", 3, 5.0)];
        assert_eq!(store.merge_baselines(&batch, t0).await.unwrap(), 0);
        store
            .merge_baselines(&[baseline("login:/x", 9, 0.9)], t0)
            .await
            .unwrap();
        assert_eq!(
            sorted(store.baselines().await.unwrap()),
            [baseline("group:g", 3, 5.0), baseline("login:/x", 10, 0.1)]
        );
        store
            .merge_baselines(&[baseline("login:/x", 10, 0.2)], t0)
            .await
            .unwrap();
        assert_eq!(
            sorted(store.baselines().await.unwrap())[1],
            baseline("login:/x", 10, 0.2)
        );
        // At most BASELINE_NAMES names: two of these find no room.
        let many: Vec<BaselineSnapshot> = (0..BASELINE_NAMES)
            .map(|i| baseline(&format!("group:{i}"), 1, i as f32))
            .collect();
        assert_eq!(store.merge_baselines(&many, t0).await.unwrap(), 2);
        assert_eq!(store.baselines().await.unwrap().len(), BASELINE_NAMES);
        // A day later, a name nobody mentioned since makes room.
        let later = t0 + BASELINE_STALE_MS;
        let mut mentioned: Vec<BaselineSnapshot> =
            many.iter().take(BASELINE_NAMES - 2).cloned().collect();
        mentioned.push(baseline("group:g", 1, 0.0));
        store.merge_baselines(&mentioned, later).await.unwrap();
        assert_eq!(
            store
                .merge_baselines(&[baseline("group:new", 1, 1.0)], later)
                .await
                .unwrap(),
            0
        );
        let names: Vec<String> = store
            .baselines()
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert!(names.contains(&"group:new".to_string()));
        assert!(!names.contains(&"login:/x".to_string()), "{names:?}");
        assert_eq!(names.len(), BASELINE_NAMES);
        assert_eq!(
            store
                .merge_baselines(&[baseline("group:newer", 1, 1.0)], later)
                .await
                .unwrap(),
            1,
            "every other name is in use"
        );
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn memory_store_keeps_the_contract() {
        run(contract(&MemoryStore::new(), 1_700_000_000_000));
    }

    #[test]
    fn maps_stay_bounded() {
        let store = MemoryStore::with_cap(1_000);
        for i in 0..20_000u64 {
            store.attempt(&format!("user{i}"), 1_000 + i);
            store.session(&format!("s{i}"), "1.2.3.4", 1_000 + i);
            store.push_verdict(&verdict(
                &format!("10.0.{}.{}", i / 256, i % 256),
                10_000_000,
            ));
        }
        let inner = store.lock();
        assert_eq!(inner.users.len(), 1_000);
        assert_eq!(inner.sessions.len(), 1_000);
        assert_eq!(inner.blocks.len(), 1_000);
        assert_eq!(inner.log.len(), VERDICT_LOG_CAP);
        drop(inner);
        for i in 0..100 {
            store.session("shared", &format!("10.1.0.{i}"), 5_000);
        }
        assert_eq!(
            store.session("shared", "10.2.0.0", 5_000),
            SESSION_ADDRESS_CAP as u64
        );
    }

    #[test]
    fn cursor_pages_through_a_long_log() {
        let store = MemoryStore::new();
        for i in 0..2_500u64 {
            store.push_verdict(&verdict(&format!("c{i}"), 1_000_000));
        }
        let mut since = 0;
        let mut seen = 0;
        for _ in 0..10 {
            let page = store.verdicts_after(since, 0);
            assert!(page.verdicts.len() <= VERDICTS_PAGE);
            seen += page.verdicts.len();
            if page.next == since {
                break;
            }
            since = page.next;
        }
        assert_eq!(seen, 2_500);
        assert_eq!(since, 2_500);
    }
}
