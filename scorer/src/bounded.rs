//! A hash map with a hard cap on its entries, for state keyed by what
//! clients send (usernames, sessions, addresses): however many distinct
//! keys an attacker makes up, memory stays fixed.
//!
//! Eviction is CLOCK-like FIFO: keys queue in insertion order; when the map
//! is full the oldest key goes, unless it was touched within `keep_ms` — then
//! it gets a second chance at the back of the queue, at most a few times per
//! insertion so that an insert stays O(1) even when everything is recent.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Second chances per insertion before the oldest key is evicted anyway.
const SECOND_CHANCES: usize = 8;

#[derive(Debug)]
pub struct BoundedMap<K, V> {
    cap: usize,
    keep_ms: u64,
    entries: HashMap<K, (V, u64)>,
    /// Every key of `entries` exactly once, oldest first.
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Clone, V> BoundedMap<K, V> {
    pub fn new(cap: usize, keep_ms: u64) -> Self {
        BoundedMap {
            cap: cap.max(1),
            keep_ms,
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|(v, _)| v)
    }

    /// The value for `key` to change in place, without touching it.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.get_mut(key).map(|(v, _)| v)
    }

    /// The value for `key`, created with `make` (evicting if full) if absent;
    /// either way marked as touched at `now_ms`.
    pub fn entry_or_insert_with(
        &mut self,
        key: K,
        now_ms: u64,
        make: impl FnOnce() -> V,
    ) -> &mut V {
        if !self.entries.contains_key(&key) {
            while self.entries.len() >= self.cap {
                if !self.evict_one(now_ms) {
                    break;
                }
            }
            self.order.push_back(key.clone());
        }
        let slot = self.entries.entry(key).or_insert_with(|| (make(), now_ms));
        slot.1 = now_ms;
        &mut slot.0
    }

    /// Removes one entry; false only if there was none to remove.
    fn evict_one(&mut self, now_ms: u64) -> bool {
        for _ in 0..SECOND_CHANCES {
            let Some(key) = self.order.pop_front() else {
                return false;
            };
            let recent = self
                .entries
                .get(&key)
                .is_some_and(|(_, t)| now_ms.saturating_sub(*t) < self.keep_ms);
            if recent {
                self.order.push_back(key);
            } else {
                self.entries.remove(&key);
                return true;
            }
        }
        match self.order.pop_front() {
            Some(key) => self.entries.remove(&key).is_some(),
            None => false,
        }
    }

    /// Removes `key`. O(entries): for rare operator actions only (the
    /// queue must lose it too, or a key removed and inserted again would
    /// sit in it twice and grow it past the cap).
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (v, _) = self.entries.remove(key)?;
        self.order.retain(|k| k != key);
        Some(v)
    }

    pub fn values(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, (v, _))| (k, v))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn never_exceeds_its_cap() {
        let mut m = BoundedMap::new(100, 1_000);
        for i in 0..10_000u64 {
            *m.entry_or_insert_with(i, i, || 0) += 1;
            assert!(m.len() <= 100);
        }
        assert_eq!(m.len(), 100);
        assert_eq!(m.order.len(), 100);
        assert!(m.get(&9_999).is_some());
        assert!(m.get(&0).is_none());
    }

    #[test]
    fn recently_touched_keys_get_a_second_chance() {
        let mut m = BoundedMap::new(3, 1_000);
        m.entry_or_insert_with("old-but-busy", 0, || 1);
        m.entry_or_insert_with("b", 0, || 1);
        m.entry_or_insert_with("c", 0, || 1);
        m.entry_or_insert_with("old-but-busy", 5_000, || 1);
        m.entry_or_insert_with("d", 5_000, || 1);
        assert!(m.get(&"old-but-busy").is_some());
        assert!(m.get(&"b").is_none());
        assert_eq!(m.len(), 3);
    }
}
