//! Stage 3 (**count**), sessions: the request's session (cookie, API key or
//! JWT subject) updates the session's footprint in the `sessions` table.

use super::{Engine, RequestFacts, DOMAIN_SESSION, DOMAIN_USER_AGENT};
use crate::detectors::Signal;
use crate::detectors::session::country_code;
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
        // One identity per request: the most specific one present.
        let session = match (&id.session, &id.api_key, &id.subject) {
            (Some(s), _, _) => format!("cookie:{s}"),
            (None, Some(k), _) => format!("key:{k}"),
            (None, None, Some(sub)) => format!("sub:{sub}"),
            _ => return (None, Signal::default()),
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
}
