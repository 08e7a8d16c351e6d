//! One session's footprint (a session cookie, API key or JWT subject):
//! which addresses and user agents use it, and the country it lives in.
//!
//! Layout, [`SESSION_BYTES`] bytes: key 8 · last_seen_ms 8 · distinct
//! clients (distinct window) 16 · distinct user agents (distinct window) 16 ·
//! home country (2 ASCII letters) 2 · accepted 1 · reserved 5 · home_seen_ms 8.

use crate::codec::{Reader, Writer};
use crate::sketch::DistinctWindow;

pub const SESSION_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionRecord {
    pub key: u64,
    pub last_seen_ms: u64,
    pub clients: DistinctWindow,
    pub user_agents: DistinctWindow,
    /// Where the session normally is; `[0, 0]` until a country was seen.
    pub home_country: [u8; 2],
    /// Last time the session was seen from its home country.
    pub home_seen_ms: u64,
    /// The credential is the API's: verified (a `jwt_authn` subject) or
    /// accepted by the upstream (`client.accepted_credential_header`). Only
    /// then does it lift a client from the anonymous limits.
    pub accepted: bool,
}

impl SessionRecord {
    /// Every field, in the order of the layout above.
    fn encode_fields(&self, w: &mut Writer<'_>) {
        w.u64(self.key);
        w.u64(self.last_seen_ms);
        w.distinct(&self.clients);
        w.distinct(&self.user_agents);
        w.bytes(&self.home_country);
        w.bytes(&[u8::from(self.accepted), 0, 0, 0, 0, 0]);
        w.u64(self.home_seen_ms);
    }

    fn decode_fields(r: &mut Reader<'_>) -> SessionRecord {
        let key = r.u64();
        let last_seen_ms = r.u64();
        let clients = r.distinct();
        let user_agents = r.distinct();
        let home_country: [u8; 2] = r.take();
        let [accepted, ..]: [u8; 6] = r.take();
        let accepted = accepted == 1;
        SessionRecord { key, last_seen_ms, clients, user_agents, home_country, home_seen_ms: r.u64(), accepted }
    }
}

crate::record::impl_record!(SessionRecord, SESSION_BYTES);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;

    #[test]
    fn codec_round_trips() {
        let s = SessionRecord {
            key: 1,
            last_seen_ms: 2,
            clients: DistinctWindow { start_ms: 3, bits: 4 },
            user_agents: DistinctWindow { start_ms: 5, bits: 6 },
            home_country: *b"GB",
            home_seen_ms: 7,
            accepted: true,
        };
        let mut buf = [0u8; SESSION_BYTES];
        s.encode(&mut buf);
        assert_eq!(SessionRecord::decode(&buf), s);
    }
}
