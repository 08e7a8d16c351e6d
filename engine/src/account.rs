//! One account's (username's) login history across all clients, so that an
//! attack on one account spread over many addresses is still seen, and its
//! owner's profile (where and on what they log in: [`crate::profile`]).
//!
//! Layout, [`ACCOUNT_BYTES`] bytes: key (seeded hash of the username) 8 ·
//! last_seen_ms 8 · failures (sliding window) 16 · distinct failing clients
//! (distinct window) 16 · last_failure_ms 8 · the profile
//! ([`PROFILE_BYTES`]).

use crate::codec::{Reader, Writer};
use crate::profile::{AccountProfile, PROFILE_BYTES};
use crate::sketch::DistinctWindow;
use crate::window::SlidingWindow;

pub const ACCOUNT_BYTES: usize = 56 + PROFILE_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AccountRecord {
    pub key: u64,
    pub last_seen_ms: u64,
    pub failures: SlidingWindow,
    pub failing_clients: DistinctWindow,
    pub last_failure_ms: u64,
    pub profile: AccountProfile,
}

impl AccountRecord {
    /// Every field, in the order of the layout above.
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.u64(self.key);
        w.u64(self.last_seen_ms);
        w.window(&self.failures);
        w.distinct(&self.failing_clients);
        w.u64(self.last_failure_ms);
        self.profile.encode(w);
    }

    fn decode_fields(r: &mut Reader<'_>) -> AccountRecord {
        AccountRecord {
            key: r.u64(),
            last_seen_ms: r.u64(),
            failures: r.window(),
            failing_clients: r.distinct(),
            last_failure_ms: r.u64(),
            profile: AccountProfile::decode(r),
        }
    }
}

crate::record::impl_record!(AccountRecord, ACCOUNT_BYTES);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;
    use crate::profile::LoginPlace;

    #[test]
    fn codec_round_trips() {
        let mut a = AccountRecord {
            key: 5,
            last_seen_ms: 6,
            failures: SlidingWindow { start_ms: 7, current: 8, previous: 9 },
            failing_clients: DistinctWindow { start_ms: 10, bits: 11 },
            last_failure_ms: 12,
            profile: AccountProfile::default(),
        };
        a.profile.learn(&LoginPlace { device: 3, country: 4, asn: 5, network: 6 }, 13_000);
        let mut buf = [0u8; ACCOUNT_BYTES];
        a.encode(&mut buf);
        assert_eq!(AccountRecord::decode(&buf), a);
    }
}
