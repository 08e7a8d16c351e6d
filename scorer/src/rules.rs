//! Fleet-wide counts of the filters' `fleet` rules (`rules[].fleet`): each
//! Envoy worker sends, on its tick batch, what it counted per rule key
//! since its last batch ([`RuleCount`]); the scorer sums them per key over
//! the rule's sliding window and answers every batch with the keys over
//! their threshold ([`RuleKeyOver`]), which each Envoy then refuses (or
//! tags) itself. A distributed client is counted as one, whichever Envoy
//! and worker its requests reach.
//!
//! Fixed memory: at most [`MAX_FLEET_RULE_KEYS`] keys (the least recently
//! counted one is evicted), each about 100 bytes. The counts live in this
//! scorer's memory: the Envoys of a fleet must share one scorer (or its
//! counts are per scorer, like any per-data-centre counter).

use abuse_engine::window::SlidingWindow;
use abuse_engine::wire::{RuleCount, RuleKeyOver, MAX_RULE_KEYS_OVER};
use std::collections::HashMap;
use std::sync::Mutex;

/// Rule keys tracked at most.
pub const MAX_FLEET_RULE_KEYS: usize = 16_384;
/// A key over a rule without a penalty stays over this long (the next
/// batches re-judge it).
const OVER_WITHOUT_PENALTY_MS: u64 = 2_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    window: SlidingWindow,
    last_ms: u64,
    over_until_ms: u64,
}

#[derive(Debug, Default)]
pub struct FleetRules {
    keys: Mutex<HashMap<(String, String), Entry>>,
}

/// A count the scorer takes: a rule name of the filter's charset, a
/// 16-hex-digit key, sane window and threshold.
pub fn valid(c: &RuleCount) -> bool {
    let name_ok = !c.rule.is_empty()
        && c.rule.len() <= 48
        && c.rule.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    let key_ok = c.key.len() == 16 && c.key.bytes().all(|b| b.is_ascii_hexdigit());
    name_ok && key_ok && (1..=86_400).contains(&c.window_s) && c.threshold.is_finite() && c.threshold >= 1.0
}

impl FleetRules {
    /// Adds a batch's counts; returns how many were refused as invalid.
    pub fn add(&self, counts: &[RuleCount], now_ms: u64) -> u64 {
        let Ok(mut keys) = self.keys.lock() else {
            return counts.len() as u64;
        };
        let mut refused = 0;
        for c in counts {
            if !valid(c) {
                refused += 1;
                continue;
            }
            let id = (c.rule.clone(), c.key.to_ascii_lowercase());
            if !keys.contains_key(&id) && keys.len() >= MAX_FLEET_RULE_KEYS {
                // Full: the least recently counted key goes.
                if let Some(old) = keys.iter().min_by_key(|(_, e)| e.last_ms).map(|(k, _)| k.clone()) {
                    keys.remove(&old);
                }
            }
            let entry =
                keys.entry(id).or_insert(Entry { window: SlidingWindow::default(), last_ms: now_ms, over_until_ms: 0 });
            let window_ms = u64::from(c.window_s) * 1000;
            let n = u32::try_from(c.count).unwrap_or(u32::MAX);
            let estimate = entry.window.record_n(n, now_ms, window_ms);
            entry.last_ms = now_ms;
            if estimate >= c.threshold {
                let hold = (u64::from(c.penalty_s) * 1000).max(OVER_WITHOUT_PENALTY_MS);
                entry.over_until_ms = entry.over_until_ms.max(now_ms.saturating_add(hold));
            }
        }
        refused
    }

    /// Every key over its threshold now (the latest first, at most [`MAX_RULE_KEYS_OVER`]).
    pub fn over(&self, now_ms: u64) -> Vec<RuleKeyOver> {
        let Ok(keys) = self.keys.lock() else {
            return Vec::new();
        };
        let mut out: Vec<RuleKeyOver> = keys
            .iter()
            .filter(|(_, e)| e.over_until_ms > now_ms)
            .map(|((rule, key), e)| RuleKeyOver { rule: rule.clone(), key: key.clone(), until_ms: e.over_until_ms })
            .collect();
        out.sort_by_key(|o| std::cmp::Reverse(o.until_ms));
        out.truncate(MAX_RULE_KEYS_OVER);
        out
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.keys.lock().map(|k| k.len()).unwrap_or(0)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn count(key: &str, n: u64) -> RuleCount {
        RuleCount { rule: "sms_pumping".into(), key: key.into(), count: n, window_s: 600, threshold: 5.0, penalty_s: 600 }
    }

    #[test]
    fn sums_across_envoys_and_answers_the_keys_over() {
        let f = FleetRules::default();
        assert_eq!(f.add(&[count("00000000000000aa", 3)], T0), 0);
        assert!(f.over(T0).is_empty(), "3 of 5");
        f.add(&[count("00000000000000aa", 3), count("00000000000000bb", 2)], T0 + 1000);
        let over = f.over(T0 + 1000);
        assert_eq!(over.len(), 1);
        assert_eq!((over[0].key.as_str(), over[0].until_ms), ("00000000000000aa", T0 + 1000 + 600_000));
        assert!(f.over(T0 + 1000 + 600_001).is_empty(), "the penalty ends");
    }

    #[test]
    fn refuses_bad_counts_and_stays_bounded() {
        let f = FleetRules::default();
        let bad = [
            RuleCount { rule: "Bad".into(), ..count("00000000000000aa", 1) },
            count("zz", 1),
            RuleCount { window_s: 0, ..count("00000000000000aa", 1) },
            RuleCount { threshold: f64::NAN, ..count("00000000000000aa", 1) },
        ];
        assert_eq!(f.add(&bad, T0), 4);
        for i in 0..(MAX_FLEET_RULE_KEYS as u64 + 100) {
            f.add(&[count(&format!("{i:016x}"), 1)], T0 + i);
        }
        assert_eq!(f.len(), MAX_FLEET_RULE_KEYS);
    }
}
