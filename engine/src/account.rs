//! One account's (username's) login history across all clients, so that an
//! attack on one account spread over many addresses is still seen.
//!
//! Layout, [`ACCOUNT_BYTES`] bytes: key (seeded hash of the username) 8 ·
//! last_seen_ms 8 · failures (sliding window) 16 · distinct failing clients
//! (distinct window) 16 · last_failure_ms 8 · the owner's profile: tags of
//! the client fingerprints of its last [`PROFILE_SLOTS`] successful logins
//! (u16 each, 0 = none) 8 · their countries (ISO code as u16) 8 ·
//! last_success_ms 8.

use crate::codec::{Reader, Writer};
use crate::shard::Record;
use crate::sketch::DistinctWindow;
use crate::window::SlidingWindow;

pub const ACCOUNT_BYTES: usize = 80;
/// Successful logins remembered per account (fingerprint and country).
pub const PROFILE_SLOTS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AccountRecord {
    pub key: u64,
    pub last_seen_ms: u64,
    pub failures: SlidingWindow,
    pub failing_clients: DistinctWindow,
    pub last_failure_ms: u64,
    pub fingerprints: [u16; PROFILE_SLOTS],
    pub countries: [u16; PROFILE_SLOTS],
    pub last_success_ms: u64,
}

impl AccountRecord {
    /// Whether the owner's recent successful logins are known.
    pub fn has_profile(&self) -> bool {
        self.fingerprints.iter().any(|f| *f != 0)
    }

    /// Whether an attempt looks like the owner: a fingerprint of one of its
    /// successful logins, from one of their countries when both are known.
    pub fn looks_like_owner(&self, fingerprint: u16, country: u16) -> bool {
        self.fingerprints.iter().zip(self.countries).any(|(f, c)| *f == fingerprint && (c == 0 || country == 0 || c == country))
    }

    /// Learns a successful login (a failure never teaches the profile).
    pub fn learn_success(&mut self, fingerprint: u16, country: u16, now_ms: u64) {
        self.last_seen_ms = now_ms;
        self.last_success_ms = now_ms;
        let slot = self
            .fingerprints
            .iter()
            .zip(self.countries)
            .position(|(f, c)| *f == fingerprint && c == country)
            .unwrap_or(PROFILE_SLOTS - 1);
        // Most recent first; the oldest falls off.
        let (mut fps, mut cs) = (self.fingerprints, self.countries);
        for i in (1..=slot).rev() {
            if let (Some(f), Some(c)) = (fps.get(i - 1).copied(), cs.get(i - 1).copied()) {
                if let (Some(df), Some(dc)) = (fps.get_mut(i), cs.get_mut(i)) {
                    *df = f;
                    *dc = c;
                }
            }
        }
        if let (Some(f), Some(c)) = (fps.first_mut(), cs.first_mut()) {
            *f = fingerprint.max(1);
            *c = country;
        }
        self.fingerprints = fps;
        self.countries = cs;
    }
}

impl Record for AccountRecord {
    const BYTES: usize = ACCOUNT_BYTES;

    fn new(key: u64) -> AccountRecord {
        AccountRecord { key, ..AccountRecord::default() }
    }

    fn key(&self) -> u64 {
        self.key
    }

    fn encode(&self, out: &mut [u8]) {
        let mut w = Writer::new(out);
        w.u64(self.key);
        w.u64(self.last_seen_ms);
        w.window(&self.failures);
        w.distinct(&self.failing_clients);
        w.u64(self.last_failure_ms);
        for f in self.fingerprints {
            w.u16(f);
        }
        for c in self.countries {
            w.u16(c);
        }
        w.u64(self.last_success_ms);
    }

    fn decode(bytes: &[u8]) -> AccountRecord {
        let mut r = Reader::new(bytes);
        AccountRecord {
            key: r.u64(),
            last_seen_ms: r.u64(),
            failures: r.window(),
            failing_clients: r.distinct(),
            last_failure_ms: r.u64(),
            fingerprints: [r.u16(), r.u16(), r.u16(), r.u16()],
            countries: [r.u16(), r.u16(), r.u16(), r.u16()],
            last_success_ms: r.u64(),
        }
    }

    fn eviction_rank(&self, _now_ms: u64) -> (bool, u64) {
        (false, self.last_seen_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_round_trips() {
        let a = AccountRecord {
            key: 5,
            last_seen_ms: 6,
            failures: SlidingWindow { start_ms: 7, current: 8, previous: 9 },
            failing_clients: DistinctWindow { start_ms: 10, bits: 11 },
            last_failure_ms: 12,
            fingerprints: [1, 2, 3, 4],
            countries: [5, 6, 7, 8],
            last_success_ms: 13,
        };
        let mut buf = [0u8; ACCOUNT_BYTES];
        a.encode(&mut buf);
        assert_eq!(AccountRecord::decode(&buf), a);
    }

    #[test]
    fn the_profile_learns_successes_most_recent_first() {
        let mut a = AccountRecord::default();
        assert!(!a.has_profile());
        a.learn_success(10, 1, 1);
        a.learn_success(20, 1, 2);
        assert!(a.looks_like_owner(10, 1) && a.looks_like_owner(20, 1));
        assert!(!a.looks_like_owner(10, 2), "the owner's device from another country");
        assert!(!a.looks_like_owner(30, 1));
        a.learn_success(10, 1, 3);
        assert_eq!(a.fingerprints, [10, 20, 0, 0], "a repeat moves to the front, no duplicate");
        for f in 30..36 {
            a.learn_success(f, 1, 4);
        }
        assert_eq!(a.fingerprints, [35, 34, 33, 32], "bounded: the oldest fall off");
    }
}
