//! Request rate per client over sliding windows, per route group.
//!
//! Scenario, in short:
//! - counts: requests (for an `anonymous_only` limit, only those without a verified or accepted credential);
//! - grouped by: client (address, + user-agent tag when configured), per limit and its route group;
//! - over: sliding `rate.limits[].window_s`;
//! - over the threshold: `rate_limit`, `weight` per request over `requests` (`shed` by default: the excess is refused with 429, no penalty box).

use super::Signal;
use crate::record::MAX_RATE_LIMITS;
use crate::routes::RouteGroup;
use crate::reason::Reason;
use super::Figure;
use crate::record::ClientRecord;
use crate::routes::{RouteMatch, RouteTable};
use crate::validate::{check_finite_range, check_range, err, ConfigError};
use serde::Deserialize;

// ---- configuration (`rate`) ----

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RateConfig {
    pub enabled: bool,
    pub limits: Vec<RateLimit>,
}

impl Default for RateConfig {
    fn default() -> Self {
        // Generous on purpose: a NATed office of 100 people behind one
        // address, or a partner at 50 requests/s, stays below 100/s.
        RateConfig {
            enabled: true,
            limits: vec![RateLimit {
                route_group: None,
                requests: 6000,
                window_s: 60,
                weight: 100.0,
                anonymous_only: false,
            }],
        }
    }
}

/// At most `requests` per client in any sliding `window_s`, on `route_group`
/// (all requests when absent).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default)]
    pub route_group: Option<String>,
    pub requests: u32,
    pub window_s: u32,
    /// Risk added for each request over the limit.
    #[serde(default = "default_weight")]
    pub weight: f32,
    /// Count only requests without a credential the API verified or
    /// accepted (`client.verified_subject_header`,
    /// `client.accepted_credential_header`, or one its client just logged in
    /// to get; an invented `Authorization`, API key or cookie counts): a
    /// tight limit for anonymous floods that logged-in users behind one NAT
    /// address never share.
    #[serde(default)]
    pub anonymous_only: bool,
}

fn default_weight() -> f32 {
    100.0
}

impl RateConfig {
    /// `rate.limits`: at most [`MAX_RATE_LIMITS`], each on a declared route group.
    pub fn validate(&self, route_groups: &[RouteGroup]) -> Result<(), ConfigError> {
        if self.limits.len() > MAX_RATE_LIMITS {
            return Err(err("rate.limits", format!("at most {MAX_RATE_LIMITS} limits")));
        }
        for (i, l) in self.limits.iter().enumerate() {
            let key = format!("rate.limits[{i}]");
            if let Some(group) = &l.route_group {
                if !route_groups.iter().any(|g| &g.name == group) {
                    return Err(err(
                        format!("{key}.route_group"),
                        format!("no route group named {group:?} in route_groups"),
                    ));
                }
            }
            check_range(&format!("{key}.requests"), l.requests, 1, 10_000_000)?;
            check_range(&format!("{key}.window_s"), l.window_s, 1, 86_400)?;
            check_finite_range(&format!("{key}.weight"), l.weight, 0.0, 10_000.0)?;
        }
        Ok(())
    }
}


#[derive(Debug, Clone, PartialEq)]
struct Limit {
    /// Route group index; None = every request.
    group: Option<usize>,
    requests: f64,
    window_ms: u64,
    weight: f32,
    anonymous_only: bool,
    /// What the limit's window counts (group name, window, anonymous only):
    /// a reload keeps a window whose tag it finds again, at any position.
    tag: String,
}

/// Counts each request in the window of every limit whose route group it
/// matches, and fires `rate_limit` for each limit it goes over.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRate {
    limits: Vec<Limit>,
}

impl RequestRate {
    /// None when disabled or without limits. Route group names were checked
    /// by config validation; an unknown one here disables that limit.
    pub fn new(config: &RateConfig, routes: &RouteTable) -> Option<RequestRate> {
        if !config.enabled {
            return None;
        }
        let limits: Vec<Limit> = config
            .limits
            .iter()
            .take(MAX_RATE_LIMITS)
            .filter_map(|l| {
                let group = match &l.route_group {
                    Some(name) => Some(routes.index_of(name)?),
                    None => None,
                };
                Some(Limit {
                    tag: format!(
                        "{}/{}s{}",
                        l.route_group.as_deref().unwrap_or("*"),
                        l.window_s,
                        if l.anonymous_only { "/anonymous" } else { "" }
                    ),
                    group,
                    requests: f64::from(l.requests),
                    window_ms: u64::from(l.window_s).saturating_mul(1000),
                    weight: l.weight,
                    anonymous_only: l.anonymous_only,
                })
            })
            .collect();
        (!limits.is_empty()).then_some(RequestRate { limits })
    }

    /// Describes the limits for the shard layout fingerprint: records written
    /// under other limits must not be read as these.
    pub fn layout_tag(&self) -> String {
        self.window_tags().join(",")
    }

    /// What each rate window of a record counts, in record order.
    pub fn window_tags(&self) -> Vec<String> {
        self.limits.iter().map(|l| l.tag.clone()).collect()
    }

    /// Whether some limit counts only anonymous requests (the host must then
    /// read the credential headers).
    pub fn has_anonymous_limits(&self) -> bool {
        self.limits.iter().any(|l| l.anonymous_only)
    }

    /// Counts one request (`anonymous`: it carried no credentials) against
    /// the limits times `scale` (1 for a client; more for an address's pool
    /// of new identities with a crowd behind it, see `engine/identify.rs`).
    pub fn observe(&self, routes: RouteMatch, anonymous: bool, record: &mut ClientRecord, now_ms: u64, scale: f64) -> Signal {
        let mut signal = Signal::default();
        for (limit, window) in self.limits.iter().zip(record.rate.iter_mut()) {
            let applies = match limit.group {
                None => true,
                Some(g) => routes.contains(g),
            } && (anonymous || !limit.anonymous_only);
            if !applies {
                continue;
            }
            let count = window.record(now_ms, limit.window_ms);
            let allowed = limit.requests * scale.max(1.0);
            if count > allowed {
                let figure = Figure::new("requests", count, allowed, limit.window_ms);
                signal.fire_with(Reason::RateLimit, limit.weight, figure);
            }
        }
        signal
    }

    /// Whether a change from `base` to `next` may stay in a worker's view
    /// (see `tiers`): for every limit, the worker holds less than a tenth
    /// of it not yet merged, and its view is under half of it. So another
    /// worker's unmerged share of a limit is always under a tenth, and a
    /// limit of 10 or less is always counted in shared data.
    pub fn far_from_limits(&self, base: &ClientRecord, next: &ClientRecord, now_ms: u64) -> bool {
        self.limits.iter().zip(base.rate.iter().zip(next.rate.iter())).all(|(limit, (b, n))| {
            let unmerged = f64::from(crate::state::merge::window_delta(b, n));
            unmerged == 0.0 || (unmerged < limit.requests / 10.0 && n.estimate(now_ms, limit.window_ms) < limit.requests / 2.0)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use super::RateLimit;
    use crate::record::Record;

    #[test]
    fn fires_only_over_the_limit_and_only_on_its_group() {
        let routes = RouteTable::new(&[RouteGroup {
            name: "login".into(),
            path_prefix: "/login".into(),
            methods: vec!["POST".into()],
            mode: None,
        }]);
        let config = RateConfig {
            enabled: true,
            limits: vec![RateLimit { route_group: Some("login".into()), requests: 3, window_s: 60, weight: 40.0, anonymous_only: false }],
        };
        let rate = RequestRate::new(&config, &routes).unwrap();
        let mut rec = ClientRecord::new(1);
        let login = routes.matches("POST", "/login");
        let other = routes.matches("GET", "/login");
        for i in 0..3 {
            assert_eq!(rate.observe(login, true, &mut rec, 1000 + i, 1.0), Signal::default());
        }
        for i in 0..10 {
            assert_eq!(rate.observe(other, true, &mut rec, 1000 + i, 1.0), Signal::default());
        }
        let s = rate.observe(login, true, &mut rec, 2000, 1.0);
        assert_eq!(s.risk, 40.0);
        assert_eq!(s.reasons.names(), vec!["rate_limit"]);
    }

    #[test]
    fn anonymous_limits_count_only_requests_without_credentials() {
        let config = RateConfig {
            enabled: true,
            limits: vec![RateLimit { route_group: None, requests: 2, window_s: 1, weight: 100.0, anonymous_only: true }],
        };
        let rate = RequestRate::new(&config, &RouteTable::new(&[])).unwrap();
        assert!(rate.has_anonymous_limits());
        let mut rec = ClientRecord::new(1);
        let any = RouteTable::new(&[]).matches("GET", "/");
        for i in 0..10 {
            assert_eq!(rate.observe(any, false, &mut rec, 1000 + i, 1.0), Signal::default(), "logged-in request {i}");
        }
        assert_eq!(rate.observe(any, true, &mut rec, 1100, 1.0), Signal::default());
        assert_eq!(rate.observe(any, true, &mut rec, 1101, 1.0), Signal::default());
        assert_eq!(rate.observe(any, true, &mut rec, 1102, 1.0).reasons.names(), vec!["rate_limit"]);
    }

    #[test]
    fn disabled_means_absent() {
        let config = RateConfig { enabled: false, ..RateConfig::default() };
        assert!(RequestRate::new(&config, &RouteTable::new(&[])).is_none());
    }
}
