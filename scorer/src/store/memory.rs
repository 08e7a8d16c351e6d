//! Fleet state in this process: the whole store of a single scorer, and the
//! fallback of a Redis-backed one. Every map is a [`BoundedMap`] (100,000
//! entries by default), the verdict log a ring of the last 10,000.

use super::{
    sliding_estimate, FleetStore, StoreError, SESSION_ADDRESS_CAP, VERDICTS_PAGE, VERDICT_LOG_CAP,
    WINDOW_MS,
};
use crate::bounded::BoundedMap;
use abuse_engine::wire::{FleetVerdict, FleetVerdicts, WIRE_VERSION};
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
    /// (cursor, verdict), cursors increasing.
    log: VecDeque<(u64, FleetVerdict)>,
    seq: u64,
}

pub struct MemoryStore {
    inner: Mutex<Inner>,
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
        inner.log.push_back((seq, verdict.clone()));
        while inner.log.len() > VERDICT_LOG_CAP {
            inner.log.pop_front();
        }
        seq
    }

    pub fn verdicts_after(&self, since: u64, now_ms: u64) -> FleetVerdicts {
        let inner = self.lock();
        let since = if since > inner.seq { 0 } else { since };
        let start = inner.log.partition_point(|(s, _)| *s <= since);
        let mut verdicts = Vec::new();
        let mut next = inner.seq;
        for (seq, v) in inner.log.iter().skip(start) {
            if verdicts.len() >= VERDICTS_PAGE {
                break;
            }
            next = *seq;
            if v.until_ms >= now_ms {
                verdicts.push(v.clone());
            }
        }
        if verdicts.len() < VERDICTS_PAGE {
            next = inner.seq;
        }
        FleetVerdicts {
            version: WIRE_VERSION,
            next,
            verdicts,
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
