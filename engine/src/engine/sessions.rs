//! Stage 3 (**count**), sessions: the request's session (cookie, API key or
//! JWT subject) updates the session's footprint in the `sessions` table.

use super::{Engine, Exchange, RequestFacts, DOMAIN_SESSION, DOMAIN_USER_AGENT};
use crate::detectors::Signal;
use crate::detectors::session::country_code;
use crate::identity::ClientIdentity;
use crate::state::store::SharedStore;

impl Engine {
    /// Updates the session's footprint; returns its hash, what it showed,
    /// and whether its credential is accepted (verified, or accepted by the
    /// upstream: see [`Engine::on_credential_accepted`]).
    pub(super) fn observe_session(
        &self,
        store: &dyn SharedStore,
        facts: &RequestFacts<'_>,
        client_key: u64,
        now_ms: u64,
    ) -> SessionSeen {
        let id = self.identity.identify(&facts.identity);
        let verified = id.verified_subject.is_some();
        let Some(sessions) = &self.sessions else {
            return SessionSeen { accepted: verified, ..SessionSeen::default() };
        };
        let Some(session) = session_name(&id) else {
            return SessionSeen::default();
        };
        let hash = self.hasher.key(DOMAIN_SESSION, session.as_bytes());
        let ua_hash = self.hasher.key(DOMAIN_USER_AGENT, facts.user_agent.unwrap_or("").as_bytes());
        let country = facts.country.and_then(country_code);
        let (signal, accepted) = self
            .session_table
            .update(store, hash, now_ms, |s| {
                s.accepted |= verified;
                (( sessions.on_request(s, client_key, ua_hash, country, now_ms), s.accepted), true)
            })
            .map(|(seen, _)| seen)
            .unwrap_or((Signal::default(), verified));
        SessionSeen { hash: Some(hash), signal, accepted }
    }

    /// The upstream accepted the credential of a request whose session was
    /// not yet (its answer carried `client.accepted_credential_header`):
    /// the session now lifts its clients from the anonymous limits.
    pub fn on_credential_accepted(&self, store: &dyn SharedStore, exchange: &Exchange, now_ms: u64) {
        if let Some(hash) = exchange.session_to_accept {
            let _ = self.session_table.update(store, hash, now_ms, |s| {
                s.accepted = true;
                ((), true)
            });
        }
    }

    /// The response header the host must read for this exchange (None: none).
    pub fn credential_header_for(&self, exchange: &Exchange) -> Option<&str> {
        exchange.session_to_accept.and(self.identity.accepted_credential_header.as_deref())
    }

    /// The session as the scorer names it: hashed with the fleet's key
    /// (the scorer's secret), so every Envoy names one cookie alike and the
    /// scorer can count its addresses across the fleet. The session table's
    /// own hash uses this process's random key, which no other Envoy shares.
    /// The request's session as the fleet names it, and its kind (for
    /// decision events: searchable by the hash an operator computes).
    pub(super) fn fleet_session_of(&self, facts: &RequestFacts<'_>) -> Option<(u64, &'static str)> {
        let id = self.identity.identify(&facts.identity);
        let name = session_name(&id)?;
        let kind = name.split(':').next().map(|k| match k {
            "cookie" => "cookie",
            "key" => "key",
            "sub" => "sub",
            _ => "bearer",
        })?;
        Some((self.account_hasher.key(DOMAIN_SESSION, name.as_bytes()), kind))
    }

    pub(super) fn fleet_session(&self, id: &ClientIdentity) -> Option<String> {
        session_name(id).map(|s| format!("{:016x}", self.account_hasher.key(DOMAIN_SESSION, s.as_bytes())))
    }
}

/// What the count stage learned of the request's session.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct SessionSeen {
    pub hash: Option<u64>,
    pub signal: Signal,
    pub accepted: bool,
}

/// One identity per request: the most specific one present. Never the
/// unverified JWT claim (anyone can write one): a bearer token is its own
/// session, and only a subject `jwt_authn` verified names one.
fn session_name(id: &ClientIdentity) -> Option<String> {
    if let Some(s) = &id.session {
        return Some(format!("cookie:{s}"));
    }
    if let Some(k) = &id.api_key {
        return Some(format!("key:{k}"));
    }
    if let Some(sub) = &id.verified_subject {
        return Some(format!("sub:{sub}"));
    }
    id.bearer.as_ref().map(|t| format!("bearer:{t}"))
}
