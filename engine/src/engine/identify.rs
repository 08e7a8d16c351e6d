//! Stage 1, **identify**: who the client is (its address, and its user
//! agent's tag when `client.key_by_user_agent`), the key of its record,
//! and whether the request carries credentials (`anonymous_only` limits).
//!
//! **New identities share their address's pool.** Keying by user agent
//! keeps the people behind one NAT apart, but a user agent is a string the
//! client writes: a new one per request would be a new client with a fresh
//! budget each time. So an identity (address + user agent) is judged on
//! its own record only once it is *returning* — it came back at least
//! `client.returning_after_s` after its first request. Until then its
//! requests are judged on the address's **pool** record (the address
//! without a user agent, the same key a request without one gets): one
//! client for all the address's new identities, with its own limits,
//! detectors and penalty box. (Its key is of its own domain: neither a
//! client without a user agent nor any tag names it.) An identity counts in
//! the pool for its first [`NEWCOMER_REQUESTS`] requests; while it is not
//! yet returning it also meets the pool's penalty box. The pool's rate limits grow only with the
//! evidence of a real crowd: `client.pool_budget` plus one slot per eight
//! returning identities seen at the address in the last two minutes (at
//! most `client.max_crowd` counted) — invented strings never return, so
//! they add none. A pool over its budget is boxed (new identities in a
//! burst no crowd makes); its returning identities go on.

use super::{Engine, DOMAIN_CLIENT, DOMAIN_POOL};
use crate::detectors::rate::RequestRate;
use crate::identity::{ClientAddr, ClientIdentity, IdentityInput};
use crate::record::ClientRecord;

/// An identity with fewer requests than this, and not yet returning, is
/// counted in its address's pool; a younger one with more only meets the
/// pool's penalty box. A steady client's first requests cannot box the pool
/// by themselves, an identity invented per request (or reused a few times)
/// is all pool.
pub(super) const NEWCOMER_REQUESTS: u32 = 2;
/// A returning identity marks its address's crowd at most once per this
/// clock bucket (one extra write per identity per bucket, not per request).
pub(super) const CROWD_MARK_MS: u64 = 10_000;
/// Returning identities per extra budget slot: a crowd's newcomers arrive
/// far more slowly than its members come back.
const CROWD_PER_SLOT: f64 = 8.0;
/// The crowd counts returning identities over this window.
pub(super) const CROWD_WINDOW_MS: u64 = 120_000;

impl Engine {
    /// The user-agent tag that is part of the client's key (when configured).
    pub(super) fn agent_of(&self, user_agent: Option<&str>) -> Option<u32> {
        if !self.config.client.key_by_user_agent {
            return None;
        }
        user_agent.map(crate::identity::agent_tag)
    }

    /// The key of a client's record: its address and, when configured, its
    /// user agent's tag (seeded, so nobody can aim at one shard).
    pub(super) fn client_key(&self, client: ClientAddr, agent: Option<u32>) -> u64 {
        let mut bytes = [0u8; 21];
        let (addr, tag) = bytes.split_at_mut(17);
        addr.copy_from_slice(&client.key_bytes());
        match agent {
            Some(a) => tag.copy_from_slice(&a.to_le_bytes()),
            None => return self.hasher.key(DOMAIN_CLIENT, &client.key_bytes()),
        }
        self.hasher.key(DOMAIN_CLIENT, &bytes)
    }

    /// The key of the address's pool record, when the request's identity
    /// has a user agent of its own (see the module doc).
    pub(super) fn pool_key(&self, client: ClientAddr, agent: Option<u32>) -> Option<u64> {
        let prefix = client.v4_prefix(self.config.client.pool_prefix_v4);
        agent.map(|_| self.hasher.key(DOMAIN_POOL, &prefix.key_bytes()))
    }

    /// Whether an identity's record shows it returning: seen before, at
    /// least `client.returning_after_s` ago, or it logged in.
    pub(super) fn returning(&self, record: &ClientRecord, now_ms: u64) -> bool {
        let after_ms = u64::from(self.config.client.returning_after_s).saturating_mul(1000);
        record.login_successes > 0
            || (record.first_seen_ms != 0 && record.requests > 0 && now_ms.saturating_sub(record.first_seen_ms) >= after_ms)
    }

    /// What a pool's rate limits are multiplied by: its base budget plus its
    /// crowd of returning identities.
    pub(super) fn pool_scale(&self, pool: &ClientRecord, now_ms: u64) -> f64 {
        let crowd = pool.crowd.estimate_at(now_ms, CROWD_WINDOW_MS).min(f64::from(self.config.client.max_crowd));
        f64::from(self.config.client.pool_budget) + crowd / CROWD_PER_SLOT
    }

    /// The key of the client a scorer's label names (`addr`, `addr#tag` or
    /// an address's pool `addr#pool`, as [`crate::identity::client_label`]
    /// writes it); None if the label names no address.
    pub(super) fn key_of_label(&self, label: &str) -> Option<u64> {
        let (addr, tag) = match label.split_once('#') {
            Some((addr, tag)) => (addr, Some(tag)),
            None => (label, None),
        };
        let client = match self.identity.client_addr(Some(addr.as_bytes()), None) {
            ClientAddr::Unknown => return None,
            client => client,
        };
        match tag {
            Some(crate::identity::POOL_TAG) => self.pool_key(client, Some(0)),
            Some(tag) => Some(self.client_key(client, u32::from_str_radix(tag, 16).ok())),
            None => Some(self.client_key(client, None)),
        }
    }

    pub fn identify(&self, input: &IdentityInput<'_>) -> ClientIdentity {
        self.identity.identify(input)
    }

    pub(super) fn has_anonymous_limits(&self) -> bool {
        self.rate.as_ref().is_some_and(RequestRate::has_anonymous_limits)
    }
}
