//! Per-caller write quotas. Every filter holds the same secret, so the
//! secret says "one of ours", not which one: a single compromised (or
//! buggy) Envoy could otherwise fill the fleet's known-accounts filter,
//! rewrite every profile or block any address fleet-wide. A caller is the
//! connection's peer address; each has a token bucket per [`Kind`] holding
//! one minute's allowance and refilled continuously. What is over quota is
//! dropped (accounts, profiles) or kept local (a block still answers the
//! caller, it is not published), and counted in
//! `abuse_scorer_rejected_total{kind}`.
//!
//! Bounded: at most [`CALLERS`] callers are tracked (the oldest untouched
//! go first). Behind a proxy that hides peers (a sidecar, a NAT), all
//! callers share one bucket: raise the limits there.

use crate::bounded::BoundedMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

/// Callers tracked at once.
pub const CALLERS: usize = 10_000;
const MINUTE_MS: f64 = 60_000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    KnownAccounts = 0,
    Profiles = 1,
    Blocks = 2,
}

/// Allowance per minute, by [`Kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub known_accounts_per_min: u32,
    pub profiles_per_min: u32,
    pub blocks_per_min: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            known_accounts_per_min: 12_000,
            profiles_per_min: 12_000,
            blocks_per_min: 600,
        }
    }
}

impl Limits {
    fn per_min(&self, kind: Kind) -> f64 {
        f64::from(match kind {
            Kind::KnownAccounts => self.known_accounts_per_min,
            Kind::Profiles => self.profiles_per_min,
            Kind::Blocks => self.blocks_per_min,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

pub struct Quotas {
    limits: Limits,
    callers: Mutex<BoundedMap<IpAddr, [Option<Bucket>; 3]>>,
}

impl Quotas {
    pub fn new(limits: Limits) -> Quotas {
        Quotas {
            limits,
            // A caller seen within the minute keeps its bucket.
            callers: Mutex::new(BoundedMap::new(CALLERS, 60_000)),
        }
    }

    /// Takes up to `want` units of `kind` for `caller`; how many it may use.
    pub fn take(&self, caller: IpAddr, kind: Kind, want: u64, now_ms: u64) -> u64 {
        if want == 0 {
            return 0;
        }
        let per_min = self.limits.per_min(kind);
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        let buckets = callers.entry_or_insert_with(caller, now_ms, || [None; 3]);
        let Some(slot) = buckets.get_mut(kind as usize) else {
            return 0;
        };
        let bucket = slot.get_or_insert(Bucket { tokens: per_min, at_ms: now_ms });
        let elapsed = now_ms.saturating_sub(bucket.at_ms) as f64;
        bucket.tokens = (bucket.tokens + elapsed * per_min / MINUTE_MS).min(per_min);
        bucket.at_ms = bucket.at_ms.max(now_ms);
        let granted = (bucket.tokens.floor().max(0.0) as u64).min(want);
        bucket.tokens -= granted as f64;
        granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minutes_allowance_then_a_steady_rate_per_caller() {
        let q = Quotas::new(Limits {
            known_accounts_per_min: 600,
            ..Limits::default()
        });
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let t = 1_700_000_000_000;
        assert_eq!(q.take(a, Kind::KnownAccounts, 500, t), 500);
        assert_eq!(q.take(a, Kind::KnownAccounts, 500, t), 100, "the minute's rest");
        assert_eq!(q.take(a, Kind::KnownAccounts, 500, t), 0);
        assert_eq!(q.take(b, Kind::KnownAccounts, 500, t), 500, "another caller has its own");
        assert_eq!(q.take(a, Kind::Blocks, 5, t), 5, "another kind too");
        assert_eq!(q.take(a, Kind::KnownAccounts, 500, t + 1_000), 10, "10 per second");
        assert_eq!(q.take(a, Kind::KnownAccounts, 5_000, t + 3_600_000), 600, "never more than a minute's");
        assert_eq!(q.take(a, Kind::KnownAccounts, 1, t), 0, "time going back adds nothing");
    }
}
