//! Distributed harvesting of a private object route: hundreds of addresses,
//! each reading a few ids (`/api/users/{id}`), together walking the whole id
//! space while every one of them stays far under every per-client limit.
//! What the spread cannot hide is the route's own traffic: far more
//! distinct ids in a window than it normally has, asked mostly by clients
//! that have no history on the site, or next to ids just asked for by others.
//!
//! **Recognition** (the route). Over the last `window_s`, once the route had
//! `min_requests`, it is being harvested while its distinct ids `d` exceed
//! `max(attack_factor · b, min_distinct_ids)` — `b` the distinct ids per
//! window it normally has — and more than `min_share` of its requests came
//! from clients with no history or asked for an id next to one of the last
//! [`crate::object_route::RECENT_IDS`] asked for; and for `hold_s` after.
//! `b` is learned like the login endpoint's baseline: the prior
//! (`baseline_prior`) for the first [`WARM_UP`] requests while the mean of
//! the windows that were not a harvest is learned aside, then an
//! exponential average in time (τ = [`BASELINE_TAU_MS`]) outside harvests.
//! Requests the filter refuses during a harvest still count for the route
//! (they are the harvest's), never for a person's record.
//!
//! **Attribution** (the request), only while the route is harvested:
//!
//! | evidence | points |
//! |---|---|
//! | the client has no history on the site: no successful login, no credential the API accepted, and not seen for `history_s` with `history_requests` requests | 2 |
//! | the request carries no credential at all (private objects are someone's) | 1 |
//! | the id is next to (within ±2 of) an id just asked for by someone | 1 |
//! | the client made no request but object reads | 1 |
//! | the client read other private objects in the window already | 1 |
//!
//! At `refuse_at` (4) the request is refused and its client charged
//! `harvest` (`weight`). A person reading their own profile is logged in or
//! carries an accepted credential (history: at most 3 points); a harvester
//! on a fresh address with no credential reading an id scores 4 or 5.
//!
//! Public routes (a catalogue, `objects: "public"`) are not judged here:
//! reading many of them is what partners and shoppers do.
//!
//! Scenario, in short:
//! - counts: a private route's requests, distinct ids, requests from clients without history or next to recent ids;
//! - grouped by: object route (recognition); the request and its client (attribution);
//! - over: sliding `enumeration.harvest.window_s`, harvest held `hold_s`;
//! - over the threshold: during a harvest a request with evidence `>= refuse_at` is refused, `harvest` (`weight`) to its client.

use super::{Figure, Signal};
use crate::object_route::ObjectRouteRecord;
use crate::reason::Reason;
use crate::validate::{check_finite_range, check_range, ConfigError};
use serde::Deserialize;

// ---- configuration (`enumeration.harvest`) ----

/// Recognising a harvest of a private object route spread over many
/// clients (see `detectors::harvest`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct HarvestConfig {
    pub enabled: bool,
    pub window_s: u32,
    /// The route's requests in the window before it is judged.
    pub min_requests: u32,
    /// Distinct ids per window assumed before any traffic was seen, and the
    /// fixed baseline while the real one is learned.
    pub baseline_prior: f32,
    /// A harvest: more distinct ids than `attack_factor` x the baseline...
    pub attack_factor: f32,
    /// ...and more than this many...
    pub min_distinct_ids: u32,
    /// ...and more than this share of the window's requests from clients
    /// with no history, or for ids next to ids just asked for.
    pub min_share: f32,
    /// How long the route stays "harvested" after the last sign of it.
    pub hold_s: u32,
    /// A client has history once it was first seen this long ago...
    pub history_s: u32,
    /// ...and made at least this many requests (or logged in, or its
    /// credential was accepted).
    pub history_requests: u32,
    /// During a harvest, a request whose evidence adds up to this is refused.
    pub refuse_at: u32,
    /// Risk added to a client per refused request.
    pub weight: f32,
}

impl Default for HarvestConfig {
    fn default() -> Self {
        HarvestConfig {
            enabled: true,
            window_s: 60,
            min_requests: 40,
            baseline_prior: 20.0,
            attack_factor: 3.0,
            min_distinct_ids: 60,
            min_share: 0.5,
            hold_s: 300,
            history_s: 60,
            history_requests: 5,
            refuse_at: 4,
            weight: 100.0,
        }
    }
}

impl HarvestConfig {
    /// `enumeration.harvest`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let h = self;
        check_range("enumeration.harvest.window_s", h.window_s, 5, 86_400)?;
        check_range("enumeration.harvest.min_requests", h.min_requests, 1, 1_000_000)?;
        check_finite_range("enumeration.harvest.baseline_prior", h.baseline_prior, 0.0, 100_000.0)?;
        check_finite_range("enumeration.harvest.attack_factor", h.attack_factor, 1.0, 100.0)?;
        check_range("enumeration.harvest.min_distinct_ids", h.min_distinct_ids, 2, 2_000)?;
        check_finite_range("enumeration.harvest.min_share", h.min_share, 0.0, 1.0)?;
        check_range("enumeration.harvest.hold_s", h.hold_s, 1, 86_400)?;
        check_range("enumeration.harvest.history_s", h.history_s, 0, 86_400)?;
        check_range("enumeration.harvest.history_requests", h.history_requests, 0, 1_000_000)?;
        check_range("enumeration.harvest.refuse_at", h.refuse_at, 1, 100)?;
        check_finite_range("enumeration.harvest.weight", h.weight, 0.0, 10_000.0)?;
        Ok(())
    }
}

/// Time constant of the baseline's exponential average.
pub const BASELINE_TAU_MS: f64 = 3_600_000.0;
/// Requests during which the baseline stays at the prior.
pub const WARM_UP: u32 = 200;
/// An id this close to a recent one is "next to" it.
pub const ADJACENT: u64 = 2;

/// What a request on a private object route showed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HarvestEvidence {
    pub no_history: bool,
    pub no_credential: bool,
    pub next_to_recent: bool,
    pub only_objects: bool,
    pub several_objects: bool,
}

impl HarvestEvidence {
    pub fn score(&self) -> u32 {
        let points = [
            (self.no_history, 2),
            (self.no_credential, 1),
            (self.next_to_recent, 1),
            (self.only_objects, 1),
            (self.several_objects, 1),
        ];
        points.iter().filter(|(on, _)| *on).map(|(_, p)| p).sum()
    }
}

#[derive(Debug, Clone)]
pub struct Harvest {
    config: HarvestConfig,
    window_ms: u64,
    hold_ms: u64,
}

impl Harvest {
    pub fn new(config: &HarvestConfig) -> Option<Harvest> {
        config.enabled.then(|| Harvest {
            config: config.clone(),
            window_ms: u64::from(config.window_s).saturating_mul(1000),
            hold_ms: u64::from(config.hold_s).saturating_mul(1000),
        })
    }

    /// Whether a client has history on the site (see the evidence table).
    pub fn has_history(&self, first_seen_ms: u64, requests: u32, logged_in: bool, accepted: bool, now_ms: u64) -> bool {
        let since_ms = u64::from(self.config.history_s).saturating_mul(1000);
        logged_in
            || accepted
            || (first_seen_ms != 0 && now_ms.saturating_sub(first_seen_ms) >= since_ms && requests >= self.config.history_requests)
    }

    /// Counts one request on the route and updates its state. `fresh`: from
    /// a client with no history; `id_hash`: the id's keyed hash; `number`:
    /// the id's value when numeric.
    pub fn on_request(&self, route: &mut ObjectRouteRecord, id_hash: u64, number: Option<u64>, fresh: bool, now_ms: u64) {
        let since_ms = now_ms.saturating_sub(route.last_seen_ms) as f64;
        route.last_seen_ms = now_ms;
        if route.baseline_samples == 0 && route.baseline == 0.0 {
            route.baseline = self.config.baseline_prior;
        }
        let requests = route.requests.record(now_ms, self.window_ms);
        let next = number.is_some_and(|n| route.next_to_recent(n, ADJACENT));
        if let Some(n) = number {
            route.remember(n);
        }
        let fresh_count = if fresh { route.fresh.record(now_ms, self.window_ms) } else { route.fresh.estimate(now_ms, self.window_ms) };
        let adjacent = if next { route.adjacent.record(now_ms, self.window_ms) } else { route.adjacent.estimate(now_ms, self.window_ms) };
        let (_, distinct) = route.ids.insert(id_hash, now_ms, self.window_ms);
        if requests < f64::from(self.config.min_requests) {
            return;
        }
        let share = (fresh_count.max(adjacent) / requests.max(1.0)).clamp(0.0, 1.0) as f32;
        let limit = (f64::from(route.baseline) * f64::from(self.config.attack_factor)).max(f64::from(self.config.min_distinct_ids));
        if distinct > limit && share > self.config.min_share {
            route.harvest_until_ms = now_ms.saturating_add(self.hold_ms);
        } else if !route.harvested(now_ms) {
            self.learn(route, distinct as f32, since_ms);
        }
    }

    /// Learns one normal moment: aside while warming up, then into the baseline.
    fn learn(&self, route: &mut ObjectRouteRecord, distinct: f32, since_ms: f64) {
        route.baseline_samples = route.baseline_samples.saturating_add(1);
        let n = route.baseline_samples;
        if n <= WARM_UP {
            route.learning_mean += (distinct - route.learning_mean) / n as f32;
            if n == WARM_UP {
                route.baseline = route.learning_mean;
            }
            return;
        }
        let alpha = ((1.0 - (-since_ms / BASELINE_TAU_MS).exp()) as f32).clamp(0.0, 1.0);
        route.baseline += alpha * (distinct - route.baseline);
    }

    /// The evidence's verdict: refused at `refuse_at` during a harvest.
    pub fn refusal(&self, harvested: bool, evidence: &HarvestEvidence, route: &ObjectRouteRecord, now_ms: u64) -> Signal {
        let mut signal = Signal::default();
        if harvested && evidence.score() >= self.config.refuse_at {
            let distinct = route.ids.estimate_at(now_ms, self.window_ms);
            let figure = Figure::new("distinct ids of a private route harvested by many clients", distinct, f64::from(self.config.min_distinct_ids), self.window_ms);
            signal.fire_with(Reason::Harvest, self.config.weight, figure);
        }
        signal
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn detector() -> Harvest {
        Harvest::new(&HarvestConfig::default()).unwrap()
    }

    fn mix(x: u64) -> u64 {
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    const T0: u64 = 1_700_000_000_000;

    /// People reading their own profiles: 2 a second, 150 users, most of
    /// them logged in.
    fn own_profiles(d: &Harvest, r: &mut ObjectRouteRecord, from: u64, n: u64) -> u64 {
        let mut t = from;
        for i in 0..n {
            t += 500;
            let user = mix(i) % 150;
            d.on_request(r, mix(user + 1_000_000), Some(user * 7 + 3), i % 10 == 0, t);
            assert!(!r.harvested(t), "false alarm at {i}");
        }
        t
    }

    #[test]
    fn a_walk_over_the_id_space_by_fresh_addresses_is_recognised_within_300_requests() {
        let d = detector();
        let mut r = ObjectRouteRecord::default();
        let t = own_profiles(&d, &mut r, T0, 600);
        // 250 addresses x 4 consecutive ids, 25 a second, users going on.
        let mut recognised = None;
        for i in 0..1000u64 {
            let t = t + i * 40;
            d.on_request(&mut r, mix(i + 1), Some(i + 1), true, t);
            if i % 12 == 0 {
                let user = mix(i) % 150;
                d.on_request(&mut r, mix(user + 1_000_000), Some(user * 7 + 3), false, t + 1);
            }
            if recognised.is_none() && r.harvested(t + 1) {
                recognised = Some(i);
            }
        }
        assert!(recognised.is_some_and(|i| i < 300), "{recognised:?}");
    }

    #[test]
    fn a_random_order_harvest_is_recognised_by_its_fresh_clients() {
        let d = detector();
        let mut r = ObjectRouteRecord::default();
        let t = own_profiles(&d, &mut r, T0, 600);
        let mut recognised = None;
        for i in 0..1000u64 {
            let id = mix(i) % 100_000;
            d.on_request(&mut r, mix(id + 7), Some(id), true, t + i * 100);
            if recognised.is_none() && r.harvested(t + i * 100) {
                recognised = Some(i);
            }
        }
        assert!(recognised.is_some_and(|i| i < 300), "{recognised:?}");
    }

    #[test]
    fn a_surge_of_logged_in_users_reading_their_profiles_is_no_harvest() {
        let d = detector();
        let mut r = ObjectRouteRecord::default();
        let t = own_profiles(&d, &mut r, T0, 600);
        // A launch: 2,000 users, 20 a second, each reading their own
        // profile, most logged in; ids scattered.
        for i in 0..2000u64 {
            let id = mix(i + 9) % 1_000_000;
            d.on_request(&mut r, mix(id), Some(id), i % 5 == 0, t + i * 50);
            assert!(!r.harvested(t + i * 50), "false alarm at {i}");
        }
    }

    #[test]
    fn a_harvest_at_cold_start_cannot_drag_the_baseline() {
        let d = detector();
        let mut r = ObjectRouteRecord::default();
        let mut recognised = None;
        for i in 0..600u64 {
            d.on_request(&mut r, mix(i), Some(i), true, T0 + i * 40);
            if recognised.is_none() && r.harvested(T0 + i * 40) {
                recognised = Some(i);
            }
        }
        assert!(recognised.is_some_and(|i| i < 100), "{recognised:?}");
        assert!((r.baseline - 20.0).abs() < 1e-6, "still the prior: {}", r.baseline);
    }

    #[test]
    fn evidence_adds_up() {
        let harvester = HarvestEvidence { no_history: true, no_credential: true, only_objects: true, ..HarvestEvidence::default() };
        assert_eq!(harvester.score(), 4);
        let d = detector();
        let mut r = ObjectRouteRecord::default();
        assert!(d.refusal(true, &harvester, &r, T0).reasons.contains(Reason::Harvest));
        assert!(d.refusal(false, &harvester, &r, T0).reasons.is_empty(), "never outside a harvest");
        // A logged-in person reading their own profile next to a harvested id.
        let owner = HarvestEvidence { next_to_recent: true, only_objects: true, ..HarvestEvidence::default() };
        assert!(d.refusal(true, &owner, &r, T0).reasons.is_empty());
        // A new visitor with a session who browsed, then read one profile.
        let visitor = HarvestEvidence { no_history: true, next_to_recent: true, ..HarvestEvidence::default() };
        assert!(d.refusal(true, &visitor, &r, T0).reasons.is_empty());
        r.harvest_until_ms = T0 + 1;
        assert!(r.harvested(T0));
    }

    #[test]
    fn history_is_earned() {
        let d = detector();
        assert!(!d.has_history(T0, 100, false, false, T0 + 30_000), "many requests, too recent");
        assert!(!d.has_history(T0, 2, false, false, T0 + 600_000), "long ago, two requests");
        assert!(d.has_history(T0, 5, false, false, T0 + 60_000));
        assert!(d.has_history(0, 0, true, false, T0) && d.has_history(0, 0, false, true, T0));
    }
}
