//! Stage 3 (**count**), sessions: the request's session (cookie, API key or
//! JWT subject) updates the session's footprint in the `sessions` table.

use super::{Engine, RequestFacts, DOMAIN_SESSION, DOMAIN_USER_AGENT};
use crate::detectors::Signal;
use crate::detectors::session::country_code;
use crate::identity::ClientIdentity;
use crate::state::store::SharedStore;

impl Engine {
    /// Updates the session's footprint; returns its hash and what it showed.
    pub(super) fn observe_session(
        &self,
        store: &dyn SharedStore,
        facts: &RequestFacts<'_>,
        client_key: u64,
        now_ms: u64,
    ) -> (Option<u64>, Signal) {
        let Some(sessions) = &self.sessions else {
            return (None, Signal::default());
        };
        let id = self.identity.identify(&facts.identity);
        let Some(session) = session_name(&id) else {
            return (None, Signal::default());
        };
        let hash = self.hasher.key(DOMAIN_SESSION, session.as_bytes());
        let ua_hash = self.hasher.key(DOMAIN_USER_AGENT, facts.user_agent.unwrap_or("").as_bytes());
        let country = facts.country.and_then(country_code);
        let signal = self
            .session_table
            .update(store, hash, now_ms, |s| (sessions.on_request(s, client_key, ua_hash, country, now_ms), true))
            .map(|(signal, _)| signal)
            .unwrap_or_default();
        (Some(hash), signal)
    }

    /// The session as the scorer names it: hashed with the fleet's key
    /// (the scorer's secret), so every Envoy names one cookie alike and the
    /// scorer can count its addresses across the fleet. The session table's
    /// own hash uses this process's random key, which no other Envoy shares.
    pub(super) fn fleet_session(&self, id: &ClientIdentity) -> Option<String> {
        session_name(id).map(|s| format!("{:016x}", self.account_hasher.key(DOMAIN_SESSION, s.as_bytes())))
    }
}

/// One identity per request: the most specific one present.
fn session_name(id: &ClientIdentity) -> Option<String> {
    match (&id.session, &id.api_key, &id.subject) {
        (Some(s), _, _) => Some(format!("cookie:{s}")),
        (None, Some(k), _) => Some(format!("key:{k}")),
        (None, None, Some(sub)) => Some(format!("sub:{sub}")),
        _ => None,
    }
}
