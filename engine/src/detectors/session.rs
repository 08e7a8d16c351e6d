//! Anomalous sessions. A session (cookie, API key or JWT subject) belongs to
//! one person or one integration:
//! - used from more than `max_addresses` addresses or `max_user_agents`
//!   user agents within the window, it is shared or hijacked
//!   (`session_sharing`, charged to each address or user agent that joins
//!   beyond the limit, never to those that used the session before);
//! - a client that cycles through more than `max_sessions_per_client`
//!   sessions in the window is churning (`session_churn`, tags by default:
//!   an office behind one address legitimately holds many sessions);
//! - a request from another country than the session's home country while
//!   home was seen less than `min_travel_s` ago is `impossible_travel`
//!   (charged to the newcomer, not to the owner at home). A real journey
//!   takes longer: after `min_travel_s` without home, the new country
//!   becomes home.
//!
//! Scenario, in short:
//! - counts: addresses and user agents per session; sessions per client; the session's home country;
//! - grouped by: session (cookie, API key, JWT subject) and client;
//! - over: `sessions.window_s`; `min_travel_s` for travel;
//! - over the threshold: `session_sharing` (`weight`), `session_churn` (`churn_weight`, tags), `impossible_travel` (`travel_weight`).

use super::Signal;
pub use crate::profile::country_code;
use crate::reason::Reason;
use super::Figure;
use crate::record::ClientRecord;
use crate::session::SessionRecord;
use crate::validate::{check_finite_range, check_range, ConfigError};
use serde::Deserialize;

// ---- configuration (`sessions`) ----

/// Anomalous sessions (see `detectors::session`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    pub enabled: bool,
    pub window_s: u32,
    /// Addresses one session may use in the window (phone on Wi-Fi and LTE, laptop, ...).
    pub max_addresses: u32,
    pub max_user_agents: u32,
    pub max_sessions_per_client: u32,
    /// A session seen at home less than this long ago cannot be in another country.
    pub min_travel_s: u32,
    pub weight: f32,
    pub churn_weight: f32,
    pub travel_weight: f32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            enabled: true,
            window_s: 600,
            max_addresses: 4,
            max_user_agents: 3,
            max_sessions_per_client: 30,
            min_travel_s: 3600,
            weight: 100.0,
            churn_weight: 40.0,
            travel_weight: 100.0,
        }
    }
}

impl SessionConfig {
    /// `sessions`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let se = self;
        check_range("sessions.window_s", se.window_s, 10, 86_400)?;
        check_range("sessions.max_addresses", se.max_addresses, 1, 100)?;
        check_range("sessions.max_user_agents", se.max_user_agents, 1, 100)?;
        check_range("sessions.max_sessions_per_client", se.max_sessions_per_client, 1, 100)?;
        check_range("sessions.min_travel_s", se.min_travel_s, 60, 86_400 * 7)?;
        check_finite_range("sessions.weight", se.weight, 0.0, 10_000.0)?;
        check_finite_range("sessions.churn_weight", se.churn_weight, 0.0, 10_000.0)?;
        check_finite_range("sessions.travel_weight", se.travel_weight, 0.0, 10_000.0)?;
        Ok(())
    }
}


#[derive(Debug, Clone)]
pub struct Sessions {
    config: SessionConfig,
    window_ms: u64,
    min_travel_ms: u64,
}

impl Sessions {
    pub fn new(config: &SessionConfig) -> Option<Sessions> {
        config.enabled.then(|| Sessions {
            config: config.clone(),
            window_ms: u64::from(config.window_s).saturating_mul(1000),
            min_travel_ms: u64::from(config.min_travel_s).saturating_mul(1000),
        })
    }

    /// One request of the session, from `client_key` with `user_agent_hash`
    /// in `country` (when the GeoIP filter knew it).
    pub fn on_request(
        &self,
        session: &mut SessionRecord,
        client_key: u64,
        user_agent_hash: u64,
        country: Option<[u8; 2]>,
        now_ms: u64,
    ) -> Signal {
        let mut signal = Signal::default();
        let c = &self.config;
        session.last_seen_ms = now_ms;
        // Charged to newcomers only: whoever held the session before (its
        // owner) keeps using it while the thief's addresses are refused.
        let known = session.clients.contains(client_key) && session.user_agents.contains(user_agent_hash);
        let addresses = session.clients.insert(client_key, now_ms, self.window_ms);
        let agents = session.user_agents.insert(user_agent_hash, now_ms, self.window_ms);
        if !known && (addresses > f64::from(c.max_addresses) + 0.5 || agents > f64::from(c.max_user_agents) + 0.5) {
            let figure = match addresses > f64::from(c.max_addresses) + 0.5 {
                true => Figure::new("clients on one session", addresses, c.max_addresses.into(), self.window_ms),
                false => Figure::new("user agents on one session", agents, c.max_user_agents.into(), self.window_ms),
            };
            signal.fire_with(Reason::SessionSharing, c.weight, figure);
        }
        if let Some(country) = country {
            if session.home_country == [0, 0] || session.home_country == country {
                session.home_country = country;
                session.home_seen_ms = now_ms;
            } else if now_ms.saturating_sub(session.home_seen_ms) < self.min_travel_ms {
                let away_s = now_ms.saturating_sub(session.home_seen_ms) as f64 / 1000.0;
                let figure = Figure::new("s between two countries", away_s, self.min_travel_ms as f64 / 1000.0, 0);
                signal.fire_with(Reason::ImpossibleTravel, c.travel_weight, figure);
            } else {
                // Long enough away: the session moved.
                session.home_country = country;
                session.home_seen_ms = now_ms;
            }
        }
        signal
    }

    /// The client used session `session_hash`: counts its distinct sessions.
    pub fn on_client(&self, client: &mut ClientRecord, session_hash: u64, now_ms: u64) -> Signal {
        let mut signal = Signal::default();
        let sessions = client.sessions.insert(session_hash, now_ms, self.window_ms);
        if sessions > f64::from(self.config.max_sessions_per_client) + 0.5 {
            let figure = Figure::new("sessions", sessions, self.config.max_sessions_per_client.into(), self.window_ms);
            signal.fire_with(Reason::SessionChurn, self.config.churn_weight, figure);
        }
        signal
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new(&SessionConfig {
            max_addresses: 3,
            max_user_agents: 2,
            max_sessions_per_client: 5,
            ..SessionConfig::default()
        })
        .unwrap()
    }

    fn mix(x: u64) -> u64 {
        x.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
    }

    #[test]
    fn countries_parse() {
        assert_eq!(country_code("gb"), Some(*b"GB"));
        assert_eq!(country_code(" SE "), Some(*b"SE"));
        assert_eq!(country_code("GBR"), None);
        assert_eq!(country_code("1A"), None);
        assert_eq!(country_code(""), None);
    }

    #[test]
    fn wifi_to_lte_in_one_country_is_fine() {
        let d = sessions();
        let mut s = SessionRecord::default();
        for (i, client) in [1u64, 2, 1, 2, 1].iter().enumerate() {
            let sig = d.on_request(&mut s, mix(*client), mix(9), Some(*b"GB"), 1000 + i as u64 * 60_000);
            assert!(sig.reasons.is_empty());
        }
    }

    #[test]
    fn a_token_on_many_addresses_is_shared() {
        let d = sessions();
        let mut s = SessionRecord::default();
        let fired: Vec<bool> = (0..6u64)
            .map(|c| !d.on_request(&mut s, mix(c + 100), mix(9), None, 1000).reasons.is_empty())
            .collect();
        assert!(!fired[0] && !fired[2] && fired[5], "{fired:?}");
        // The owner (first address) keeps using it: the thieves are charged.
        assert!(d.on_request(&mut s, mix(100), mix(9), None, 2000).reasons.is_empty());
        assert!(!d.on_request(&mut s, mix(200), mix(9), None, 2000).reasons.is_empty());
    }

    #[test]
    fn travel_faster_than_possible_is_flagged_for_the_newcomer() {
        let d = sessions();
        let mut s = SessionRecord::default();
        assert!(d.on_request(&mut s, mix(1), mix(9), Some(*b"GB"), 1_000).reasons.is_empty());
        let thief = d.on_request(&mut s, mix(2), mix(9), Some(*b"CN"), 600_000);
        assert!(thief.reasons.contains(Reason::ImpossibleTravel));
        // The owner at home is not flagged.
        assert!(d.on_request(&mut s, mix(1), mix(9), Some(*b"GB"), 601_000).reasons.is_empty());
        // A real trip: 10 hours later from the US, home moves.
        let trip = d.on_request(&mut s, mix(3), mix(9), Some(*b"US"), 601_000 + 36_000_000);
        assert!(!trip.reasons.contains(Reason::ImpossibleTravel));
        assert_eq!(s.home_country, *b"US");
    }

    #[test]
    fn churning_clients() {
        let d = sessions();
        let mut c = ClientRecord::default();
        let fired: Vec<bool> = (0..8u64).map(|n| !d.on_client(&mut c, mix(n), 1000).reasons.is_empty()).collect();
        assert!(!fired[3] && fired[7], "{fired:?}");
    }
}
