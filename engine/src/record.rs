//! One client's state, as a fixed-size little-endian record inside a shard.
//!
//! Layout (format version [`RECORD_FORMAT`]), [`RECORD_BYTES`] bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | key (seeded hash of the client; 0 = empty slot) |
//! | 8 | 8 | last_seen_ms |
//! | 16 | 8 | penalty_until_ms |
//! | 24 | 4 | penalty_reasons (bit set of [`Reason`](crate::reason::Reason)) |
//! | 28 | 4 | risk (f32, as of last_seen_ms) |
//! | 32 | 64 | rate windows, one per configured limit |
//!
//! Any change of this layout bumps [`RECORD_FORMAT`]; shards written with
//! another format are treated as empty, never misread.

use crate::config::MAX_RATE_LIMITS;
use crate::reason::ReasonSet;
use crate::window::{SlidingWindow, WINDOW_BYTES};

pub const RECORD_FORMAT: u16 = 1;
pub const RECORD_BYTES: usize = 32 + MAX_RATE_LIMITS * WINDOW_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClientRecord {
    pub key: u64,
    pub last_seen_ms: u64,
    pub penalty_until_ms: u64,
    pub penalty_reasons: ReasonSet,
    pub risk: f32,
    pub rate: [SlidingWindow; MAX_RATE_LIMITS],
}

impl ClientRecord {
    pub fn new(key: u64) -> ClientRecord {
        ClientRecord {
            key,
            ..ClientRecord::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.key == 0
    }

    pub fn penalized_at(&self, now_ms: u64) -> bool {
        self.penalty_until_ms > now_ms
    }

    pub fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut out = [0u8; RECORD_BYTES];
        let mut w = Writer { buf: &mut out, at: 0 };
        w.put(&self.key.to_le_bytes());
        w.put(&self.last_seen_ms.to_le_bytes());
        w.put(&self.penalty_until_ms.to_le_bytes());
        w.put(&self.penalty_reasons.bits().to_le_bytes());
        w.put(&self.risk.to_le_bytes());
        for window in &self.rate {
            let mut buf = [0u8; WINDOW_BYTES];
            window.encode(&mut buf);
            w.put(&buf);
        }
        out
    }

    pub fn decode(bytes: &[u8; RECORD_BYTES]) -> ClientRecord {
        let mut r = Reader { buf: bytes, at: 0 };
        let key = u64::from_le_bytes(r.take());
        let last_seen_ms = u64::from_le_bytes(r.take());
        let penalty_until_ms = u64::from_le_bytes(r.take());
        let penalty_reasons = ReasonSet::from_bits(u32::from_le_bytes(r.take()));
        let risk = f32::from_le_bytes(r.take());
        let mut rate = [SlidingWindow::default(); MAX_RATE_LIMITS];
        for window in &mut rate {
            *window = SlidingWindow::decode(&r.take());
        }
        ClientRecord {
            key,
            last_seen_ms,
            penalty_until_ms,
            penalty_reasons,
            // A corrupt float must not poison the score forever.
            risk: if risk.is_finite() && risk >= 0.0 { risk } else { 0.0 },
            rate,
        }
    }
}

/// Sequential writer over a fixed buffer; writes past the end are dropped
/// (cannot happen with the constant layout, and must not panic if it did).
struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.at.saturating_add(bytes.len());
        if let Some(dst) = self.buf.get_mut(self.at..end) {
            dst.copy_from_slice(bytes);
        }
        self.at = end;
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let end = self.at.saturating_add(N);
        if let Some(src) = self.buf.get(self.at..end) {
            out.copy_from_slice(src);
        }
        self.at = end;
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::reason::Reason;
    use proptest::prelude::*;

    #[test]
    fn layout_is_what_the_docs_say() {
        assert_eq!(RECORD_BYTES, 96);
        let mut r = ClientRecord::new(0x0102_0304_0506_0708);
        r.risk = 1.5;
        let bytes = r.encode();
        assert_eq!(&bytes[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&bytes[28..32], &1.5f32.to_le_bytes());
    }

    #[test]
    fn corrupt_risk_is_reset() {
        let mut r = ClientRecord::new(1);
        r.risk = f32::NAN;
        assert_eq!(ClientRecord::decode(&r.encode()).risk, 0.0);
        r.risk = -3.0;
        assert_eq!(ClientRecord::decode(&r.encode()).risk, 0.0);
    }

    proptest! {
        #[test]
        fn codec_round_trips(key in any::<u64>(), seen in any::<u64>(), until in any::<u64>(),
                             risk in 0f32..1e6, starts in proptest::array::uniform4(any::<u64>()),
                             counts in proptest::array::uniform4(any::<u32>())) {
            let mut r = ClientRecord::new(key);
            r.last_seen_ms = seen;
            r.penalty_until_ms = until;
            r.penalty_reasons.insert(Reason::RateLimit);
            r.risk = risk;
            for i in 0..MAX_RATE_LIMITS {
                r.rate[i] = SlidingWindow { start_ms: starts[i], current: counts[i], previous: counts[3 - i] };
            }
            prop_assert_eq!(ClientRecord::decode(&r.encode()), r);
        }

        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), RECORD_BYTES)) {
            let arr: [u8; RECORD_BYTES] = bytes.try_into().unwrap();
            let r = ClientRecord::decode(&arr);
            prop_assert!(r.risk.is_finite());
        }
    }
}
