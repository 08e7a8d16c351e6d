//! Stage 1, **identify**: who the client is (its address, and its user
//! agent's tag when `client.key_by_user_agent`), the key of its record,
//! and whether the request carries credentials (`anonymous_only` limits).

use super::{Engine, DOMAIN_CLIENT};
use crate::detectors::rate::RequestRate;
use crate::identity::{ClientAddr, ClientIdentity, IdentityInput};

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

    /// The key of the client a scorer's label names (`addr` or `addr#tag`,
    /// as [`crate::identity::client_label`] writes it); None if the label
    /// names no address.
    pub(super) fn key_of_label(&self, label: &str) -> Option<u64> {
        let (addr, agent) = match label.split_once('#') {
            Some((addr, tag)) => (addr, u32::from_str_radix(tag, 16).ok()),
            None => (label, None),
        };
        match self.identity.client_addr(Some(addr.as_bytes()), None) {
            ClientAddr::Unknown => None,
            client => Some(self.client_key(client, agent)),
        }
    }

    pub fn identify(&self, input: &IdentityInput<'_>) -> ClientIdentity {
        self.identity.identify(input)
    }

    pub(super) fn has_anonymous_limits(&self) -> bool {
        self.rate.as_ref().is_some_and(RequestRate::has_anonymous_limits)
    }

    /// A request without credentials: no `Authorization`, no API key, no
    /// session cookie (for `anonymous_only` rate limits).
    pub(super) fn is_anonymous(&self, input: &IdentityInput<'_>) -> bool {
        let session_cookie = match (input.cookie, &self.identity.session_cookie) {
            (Some(cookie), Some(name)) => crate::identity::cookie_value(cookie, name).is_some(),
            _ => false,
        };
        input.authorization.is_none() && input.api_key.is_none() && !session_cookie
    }
}
