//! One client's state, as a fixed-size little-endian record inside a shard.
//!
//! Layout (format version [`RECORD_FORMAT`]), [`RECORD_BYTES`] bytes, fields
//! in this order:
//!
//! | size | field |
//! |---|---|
//! | 8 | key (seeded hash of the client address; 0 = empty slot) |
//! | 8 | last_seen_ms |
//! | 8 | first_seen_ms |
//! | 8 | penalty_until_ms |
//! | 4 | penalty_reasons (bit set of [`Reason`](crate::reason::Reason)) |
//! | 4 | recent_reasons (reasons that fired since the risk was last zero) |
//! | 4 | risk (f32, as of last_seen_ms) |
//! | 4 | requests (saturating) |
//! | 4 × 16 | rate windows, one per configured limit |
//! | 16 | login failures (sliding window) |
//! | 16 | distinct usernames of failed logins (distinct window) |
//! | 16 | 404 answers (sliding window) |
//! | 16 | distinct paths answered 404 (distinct window) |
//! | 16 | object requests (sliding window) |
//! | 16 | object misses, 404/403 on object routes (sliding window) |
//! | 16 | distinct object ids (distinct window) |
//! | 8 | last object id |
//! | 4 | current run of consecutive object ids |
//! | 4 | successful logins (saturating) |
//! | 16 | distinct session identities used (distinct window) |
//! | 8 | last_request_ms (for request intervals) |
//! | 4 | mean request interval, ms (f32, exponentially weighted) |
//! | 4 | variance of the request interval, ms² (f32, exponentially weighted) |
//! | 4 | intervals observed (saturating) |
//! | 4 | last page number seen |
//! | 4 | current run of consecutive pages |
//! | 4 | session of the last object request (low 32 bits of its hash; 0 = none) |
//! | 8 | start of the current page run, ms |
//! | 16 | response KiB (sliding window) |
//! | 16 | recent requests, for spike attribution (sliding window) |
//! | 4 | login attempts (saturating; a client whose every request was one never browsed) |
//! | 16 | an address pool's crowd: returning identities seen lately (distinct sketch) |
//! | 8 | decision: the id of the decision that boxed the client (0 = none; see `engine/decisions.rs`) |
//! | 8 | lifted_at_ms: an operator lifted the client's block then (0 = never) |
//! | 8 | quiet_until_ms: until then, `quiet_reasons` cannot box the client again |
//! | 4 | quiet_reasons (bit set; empty = every reason) |
//! | 4 | reserved (0) |
//!
//! Any change of this layout bumps [`RECORD_FORMAT`]; shards written with
//! another format are never misread. The first [`STABLE_PREFIX_BYTES`]
//! (key to requests) never move, whatever the format: a reload that loads
//! another format carries the penalty box, risk and timestamps over
//! ([`migrate_client`](crate::state::layout::migrate_client)); a reload with the same format carries everything,
//! rate windows by what they count.

use crate::codec::{Reader, Writer};
use crate::reason::ReasonSet;
use crate::sketch::DistinctWindow;
use crate::window::SlidingWindow;

/// A fixed-size record kept in shards (clients, accounts, ...).
pub trait Record: Copy + Default {
    /// Encoded size.
    const BYTES: usize;
    fn new(key: u64) -> Self;
    /// Seeded hash of what the record is about; 0 = empty slot.
    fn key(&self) -> u64;
    fn encode(&self, out: &mut [u8]);
    /// Must accept any bytes without panicking.
    fn decode(bytes: &[u8]) -> Self;
    /// Records with lower ranks are evicted first.
    fn eviction_rank(&self, now_ms: u64) -> (bool, u64);

    /// The key of an encoded record, without decoding the rest: probing a
    /// window must not decode eight whole records. Every layout starts
    /// with the key.
    fn key_of(bytes: &[u8]) -> u64 {
        crate::codec::Reader::new(bytes).u64()
    }

    /// The eviction rank of an encoded record (decodes it unless overridden).
    fn rank_of(bytes: &[u8], now_ms: u64) -> (bool, u64) {
        Self::decode(bytes).eviction_rank(now_ms)
    }
}


/// The [`Record`] impl every record type shares, written once: `BYTES`,
/// `new` (an empty record with its key), `key`, and `encode` / `decode`
/// through the type's own `encode_fields` / `decode_fields` (its layout,
/// field by field). Eviction is by `last_seen_ms` (oldest first) unless the
/// record brings its own `eviction_rank` (and `rank_of`) in braces.
macro_rules! impl_record {
    ($ty:ident, $bytes:expr) => {
        $crate::record::impl_record!($ty, $bytes, {
            fn eviction_rank(&self, _now_ms: u64) -> (bool, u64) {
                (false, self.last_seen_ms)
            }
        });
    };
    ($ty:ident, $bytes:expr, { $($item:item)* }) => {
        impl $crate::record::Record for $ty {
            const BYTES: usize = $bytes;

            fn new(key: u64) -> $ty {
                $ty { key, ..$ty::default() }
            }

            fn key(&self) -> u64 {
                self.key
            }

            fn encode(&self, out: &mut [u8]) {
                self.encode_fields(&mut $crate::codec::Writer::new(out));
            }

            fn decode(bytes: &[u8]) -> $ty {
                $ty::decode_fields(&mut $crate::codec::Reader::new(bytes))
            }

            $($item)*
        }
    };
}
pub(crate) use impl_record;

/// Most rate limits (`rate.limits`); each one owns a window in every client record.
pub const MAX_RATE_LIMITS: usize = 4;

pub const RECORD_FORMAT: u16 = 7;
pub const RECORD_BYTES: usize = 48 + MAX_RATE_LIMITS * 16 + 7 * 16 + 16 + 16 + 8 + 16 + 8 + 8 + 32 + 4 + 16 + 32;

/// Bytes at the start of every record format that never change meaning.
pub const STABLE_PREFIX_BYTES: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClientRecord {
    pub key: u64,
    pub last_seen_ms: u64,
    pub first_seen_ms: u64,
    pub penalty_until_ms: u64,
    pub penalty_reasons: ReasonSet,
    pub recent_reasons: ReasonSet,
    pub risk: f32,
    pub requests: u32,
    pub rate: [SlidingWindow; MAX_RATE_LIMITS],
    pub login_failures: SlidingWindow,
    pub failed_usernames: DistinctWindow,
    pub not_found: SlidingWindow,
    pub not_found_paths: DistinctWindow,
    pub object_requests: SlidingWindow,
    pub object_misses: SlidingWindow,
    pub object_ids: DistinctWindow,
    pub last_object_id: u64,
    pub object_run: u32,
    pub login_successes: u32,
    pub sessions: DistinctWindow,
    pub last_request_ms: u64,
    pub interval_mean_ms: f32,
    pub interval_var: f32,
    pub intervals: u32,
    pub last_page: u32,
    pub page_run: u32,
    pub object_session: u32,
    pub page_run_start_ms: u64,
    pub response_kib: SlidingWindow,
    pub recent_requests: SlidingWindow,
    pub login_attempts: u32,
    /// On an address's pool record (the address without a user agent, see
    /// `engine/identify.rs`): the returning identities seen at the address
    /// lately — the evidence of a real crowd behind it.
    pub crowd: DistinctWindow,
    /// The decision that boxed the client (what its refusals quote).
    pub decision: u64,
    /// An operator lifted the client's block at this time: whatever a
    /// worker's view held from before it is dropped when it merges.
    pub lifted_at_ms: u64,
    /// After a lift: until then, `quiet_reasons` cannot box the client again.
    pub quiet_until_ms: u64,
    pub quiet_reasons: ReasonSet,
}

/// Corrupt or negative floats read as 0.
fn finite(v: f32) -> f32 {
    if v.is_finite() && v >= 0.0 {
        v
    } else {
        0.0
    }
}

impl ClientRecord {
    pub fn is_empty(&self) -> bool {
        self.key == 0
    }

    pub fn penalized_at(&self, now_ms: u64) -> bool {
        self.penalty_until_ms > now_ms
    }

    /// Whether an operator's quiet period keeps `reason` from boxing the
    /// client now (after a lift: the same evidence must not re-block it).
    pub fn quiet_for(&self, reason: crate::reason::Reason, now_ms: u64) -> bool {
        now_ms < self.quiet_until_ms && (self.quiet_reasons.is_empty() || self.quiet_reasons.contains(reason))
    }

    /// An operator's lift: out of the box, risk forgotten, and for a while
    /// the same reasons cannot box it again.
    pub fn lift(&mut self, now_ms: u64, quiet_until_ms: u64, quiet_reasons: ReasonSet) {
        self.penalty_until_ms = 0;
        self.penalty_reasons = ReasonSet::default();
        self.recent_reasons = ReasonSet::default();
        self.risk = 0.0;
        self.decision = 0;
        self.lifted_at_ms = self.lifted_at_ms.max(now_ms).max(1);
        self.quiet_until_ms = quiet_until_ms;
        self.quiet_reasons = quiet_reasons;
    }
}

impl ClientRecord {
    /// Every field, in the order of the layout above.
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.u64(self.key);
        w.u64(self.last_seen_ms);
        w.u64(self.first_seen_ms);
        w.u64(self.penalty_until_ms);
        w.u32(self.penalty_reasons.bits());
        w.u32(self.recent_reasons.bits());
        w.f32(self.risk);
        w.u32(self.requests);
        for window in &self.rate {
            w.window(window);
        }
        w.window(&self.login_failures);
        w.distinct(&self.failed_usernames);
        w.window(&self.not_found);
        w.distinct(&self.not_found_paths);
        w.window(&self.object_requests);
        w.window(&self.object_misses);
        w.distinct(&self.object_ids);
        w.u64(self.last_object_id);
        w.u32(self.object_run);
        w.u32(self.login_successes);
        w.distinct(&self.sessions);
        w.u64(self.last_request_ms);
        w.f32(self.interval_mean_ms);
        w.f32(self.interval_var);
        w.u32(self.intervals);
        w.u32(self.last_page);
        w.u32(self.page_run);
        w.u32(self.object_session);
        w.u64(self.page_run_start_ms);
        w.window(&self.response_kib);
        w.window(&self.recent_requests);
        w.u32(self.login_attempts);
        w.distinct(&self.crowd);
        w.u64(self.decision);
        w.u64(self.lifted_at_ms);
        w.u64(self.quiet_until_ms);
        w.u32(self.quiet_reasons.bits());
        w.u32(0);
    }

    fn decode_fields(r: &mut Reader<'_>) -> ClientRecord {
        let key = r.u64();
        let last_seen_ms = r.u64();
        let first_seen_ms = r.u64();
        let penalty_until_ms = r.u64();
        let penalty_reasons = ReasonSet::from_bits(r.u32());
        let recent_reasons = ReasonSet::from_bits(r.u32());
        let risk = r.f32();
        let requests = r.u32();
        let mut rate = [SlidingWindow::default(); MAX_RATE_LIMITS];
        for window in &mut rate {
            *window = r.window();
        }
        ClientRecord {
            key,
            last_seen_ms,
            first_seen_ms,
            penalty_until_ms,
            penalty_reasons,
            recent_reasons,
            // A corrupt float must not poison the score forever.
            risk: finite(risk),
            requests,
            rate,
            login_failures: r.window(),
            failed_usernames: r.distinct(),
            not_found: r.window(),
            not_found_paths: r.distinct(),
            object_requests: r.window(),
            object_misses: r.window(),
            object_ids: r.distinct(),
            last_object_id: r.u64(),
            object_run: r.u32(),
            login_successes: r.u32(),
            sessions: r.distinct(),
            last_request_ms: r.u64(),
            interval_mean_ms: finite(r.f32()),
            interval_var: finite(r.f32()),
            intervals: r.u32(),
            last_page: r.u32(),
            page_run: r.u32(),
            object_session: r.u32(),
            page_run_start_ms: r.u64(),
            response_kib: r.window(),
            recent_requests: r.window(),
            login_attempts: r.u32(),
            crowd: r.distinct(),
            decision: r.u64(),
            lifted_at_ms: r.u64(),
            quiet_until_ms: r.u64(),
            quiet_reasons: {
                let bits = ReasonSet::from_bits(r.u32());
                let _reserved = r.u32();
                bits
            },
        }
    }
}

crate::record::impl_record!(ClientRecord, RECORD_BYTES, {
    /// Idle clients go first, oldest first; clients in the penalty box last,
    /// those whose penalty ends soonest first.
    fn eviction_rank(&self, now_ms: u64) -> (bool, u64) {
        if self.penalized_at(now_ms) {
            (true, self.penalty_until_ms)
        } else {
            (false, self.last_seen_ms)
        }
    }

    fn rank_of(bytes: &[u8], now_ms: u64) -> (bool, u64) {
        // key, last_seen_ms, first_seen_ms, penalty_until_ms: the first 32 bytes.
        let mut r = Reader::new(bytes);
        let (_key, last_seen_ms, _first, penalty_until_ms) = (r.u64(), r.u64(), r.u64(), r.u64());
        if penalty_until_ms > now_ms {
            (true, penalty_until_ms)
        } else {
            (false, last_seen_ms)
        }
    }
});

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::reason::Reason;
    use proptest::prelude::*;

    fn round_trip(r: &ClientRecord) -> ClientRecord {
        let mut buf = [0u8; RECORD_BYTES];
        r.encode(&mut buf);
        ClientRecord::decode(&buf)
    }

    #[test]
    fn layout_is_what_the_docs_say() {
        assert_eq!(RECORD_BYTES, 380);
        let mut r = ClientRecord::new(0x0102_0304_0506_0708);
        r.risk = 1.5;
        r.login_successes = 9;
        let mut bytes = [0u8; RECORD_BYTES];
        r.encode(&mut bytes);
        assert_eq!(&bytes[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&bytes[40..44], &1.5f32.to_le_bytes());
        assert_eq!(&bytes[236..240], &9u32.to_le_bytes());
    }

    #[test]
    fn corrupt_risk_is_reset() {
        let mut r = ClientRecord::new(1);
        r.risk = f32::NAN;
        assert_eq!(round_trip(&r).risk, 0.0);
        r.risk = -3.0;
        assert_eq!(round_trip(&r).risk, 0.0);
    }

    #[test]
    fn short_input_decodes_to_zeros() {
        assert_eq!(ClientRecord::decode(&[1, 2, 3]).key, 0x0003_0201);
        assert_eq!(ClientRecord::decode(&[]), ClientRecord::default());
    }

    proptest! {
        #[test]
        fn codec_round_trips(key in any::<u64>(), seen in any::<u64>(), until in any::<u64>(),
                             risk in 0f32..1e6, starts in proptest::array::uniform4(any::<u64>()),
                             counts in proptest::array::uniform4(any::<u32>()), id in any::<u64>()) {
            let mut r = ClientRecord::new(key);
            r.last_seen_ms = seen;
            r.first_seen_ms = seen / 2;
            r.penalty_until_ms = until;
            r.penalty_reasons.insert(Reason::RateLimit);
            r.recent_reasons.insert(Reason::Probing);
            r.risk = risk;
            r.requests = counts[0];
            for i in 0..MAX_RATE_LIMITS {
                r.rate[i] = SlidingWindow { start_ms: starts[i], current: counts[i], previous: counts[3 - i] };
            }
            r.login_failures = SlidingWindow { start_ms: starts[1], current: 3, previous: 4 };
            r.failed_usernames = DistinctWindow { start_ms: starts[2], bits: id };
            r.not_found = SlidingWindow { start_ms: 5, current: 6, previous: 7 };
            r.not_found_paths = DistinctWindow { start_ms: 8, bits: !id };
            r.object_requests = SlidingWindow { start_ms: 9, current: 10, previous: 11 };
            r.object_misses = SlidingWindow { start_ms: 12, current: 13, previous: 14 };
            r.object_ids = DistinctWindow { start_ms: 15, bits: id ^ 0xff };
            r.last_object_id = id;
            r.object_run = counts[1];
            r.login_successes = counts[2];
            r.sessions = DistinctWindow { start_ms: 16, bits: id.rotate_left(3) };
            r.last_request_ms = seen;
            r.interval_mean_ms = risk;
            r.interval_var = risk / 2.0;
            r.intervals = counts[3];
            r.last_page = counts[0];
            r.page_run = counts[1];
            r.object_session = counts[2];
            r.page_run_start_ms = until;
            r.response_kib = SlidingWindow { start_ms: 17, current: 18, previous: 19 };
            r.recent_requests = SlidingWindow { start_ms: 20, current: 21, previous: 22 };
            prop_assert_eq!(round_trip(&r), r);
        }

        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..RECORD_BYTES + 10)) {
            let r = ClientRecord::decode(&bytes);
            prop_assert!(r.risk.is_finite());
        }
    }
}
