//! Enumeration (BOLA, harvesting): a client walking through object ids.
//!
//! Object ids come from configured path templates (`/api/users/{id}`) and,
//! with `auto_normalize`, from any numeric, UUID or long hex path segment.
//! Signals per client and window: many distinct ids, a long run of
//! consecutive ids (n, n+1, n+2, ...), and a high share of 404/403 answers on
//! object routes (guessing ids that mostly do not exist).
//!
//! Many people behind one address (an office NAT) must not add up to one
//! harvester: a run of consecutive ids only continues within one session
//! (cookie, API key or JWT subject; none counts as one), and the distinct-id
//! limit scales with the number of sessions the address holds.
//!
//! Scenario, in short:
//! - counts: object ids (distinct, consecutive runs) and the 404/403 share of object answers;
//! - grouped by: client; a consecutive run within one session;
//! - over: sliding `enumeration.window_s`;
//! - over the threshold: `enumeration`, `weight`, past `max_distinct_ids` (× sessions), `max_sequential_run`, or `max_miss_ratio` once `min_requests`.

use super::Signal;
use crate::reason::Reason;
use super::Figure;
use crate::record::ClientRecord;
use crate::validate::{check_finite_range, check_range, err, ConfigError};
use serde::Deserialize;

// ---- configuration (`enumeration`) ----

/// Iterating through object ids (BOLA, harvesting).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, default)]
pub struct EnumerationConfig {
    pub enabled: bool,
    /// Object routes: a path template whose `{...}` segment is an object id
    /// (`"/api/users/{id}"`), or `{"path": ..., "objects": "public" | "private"}`
    /// saying whose objects they are (see [`Objects`]).
    pub object_routes: Vec<ObjectRouteSpec>,
    /// Also treat numeric, UUID and long hex path segments as object ids.
    pub auto_normalize: bool,
    pub window_s: u32,
    pub max_distinct_ids: u32,
    /// Distinct ids of a private route (`objects: "private"`) a client may
    /// read in the window, whoever it is: reading many of other people's
    /// objects is BOLA.
    pub max_distinct_private_ids: u32,
    /// Consecutive ids (n, n+1, n+2, ...) in a row.
    pub max_sequential_run: u32,
    /// Share of 404/403 answers on object routes, once `min_requests` were made.
    pub max_miss_ratio: f32,
    pub min_requests: u32,
    pub weight: f32,
    /// A harvest of a private route spread over many clients.
    pub harvest: super::harvest::HarvestConfig,
}

/// Whose objects a route serves.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Objects {
    /// Not said (a plain template): every client is held to
    /// `max_distinct_ids` and `max_sequential_run`.
    #[default]
    Unspecified,
    /// A catalogue anyone may read: a client whose credential the API
    /// accepted (a partner's key) may read as many as its rate limits allow;
    /// only its misses (404/403) count. Anonymous clients are held to
    /// `max_distinct_ids` and `max_sequential_run`.
    Public,
    /// Each object is someone's (users, orders, invoices): every client is
    /// held to `max_distinct_private_ids` and `max_sequential_run`, and the
    /// route is watched for a harvest spread over many clients (`harvest`).
    Private,
}

/// An object route: a template, or a template and whose objects it serves.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(untagged)]
pub enum ObjectRouteSpec {
    Template(String),
    Route {
        path: String,
        #[serde(default)]
        objects: Objects,
    },
}

impl ObjectRouteSpec {
    pub fn path(&self) -> &str {
        match self {
            ObjectRouteSpec::Template(p) | ObjectRouteSpec::Route { path: p, .. } => p,
        }
    }

    pub fn objects(&self) -> Objects {
        match self {
            ObjectRouteSpec::Template(_) => Objects::Unspecified,
            ObjectRouteSpec::Route { objects, .. } => *objects,
        }
    }
}

impl From<&str> for ObjectRouteSpec {
    fn from(path: &str) -> Self {
        ObjectRouteSpec::Template(path.to_string())
    }
}

impl Default for EnumerationConfig {
    fn default() -> Self {
        EnumerationConfig {
            enabled: true,
            object_routes: Vec::new(),
            auto_normalize: true,
            window_s: 60,
            max_distinct_ids: 100,
            max_distinct_private_ids: 20,
            max_sequential_run: 15,
            max_miss_ratio: 0.5,
            min_requests: 10,
            weight: 100.0,
            harvest: super::harvest::HarvestConfig::default(),
        }
    }
}

impl EnumerationConfig {
    /// `enumeration`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let en = self;
        if en.object_routes.len() > 32 {
            return Err(err("enumeration.object_routes", "at most 32 object routes"));
        }
        for (i, t) in en.object_routes.iter().map(ObjectRouteSpec::path).enumerate() {
            if !t.starts_with('/') || !t.contains('{') {
                return Err(err(format!("enumeration.object_routes[{i}]"), "must start with '/' and contain an {id} segment"));
            }
        }
        check_range("enumeration.window_s", en.window_s, 1, 86_400)?;
        check_range("enumeration.max_distinct_ids", en.max_distinct_ids, 2, 150)?;
        check_range("enumeration.max_distinct_private_ids", en.max_distinct_private_ids, 2, 150)?;
        check_range("enumeration.max_sequential_run", en.max_sequential_run, 2, 1_000_000)?;
        check_finite_range("enumeration.max_miss_ratio", en.max_miss_ratio, 0.01, 1.0)?;
        check_range("enumeration.min_requests", en.min_requests, 1, 1_000_000)?;
        check_finite_range("enumeration.weight", en.weight, 0.0, 10_000.0)?;
        en.harvest.validate()?;
        Ok(())
    }

    /// Whether some route's objects are private (a harvest can be watched).
    pub fn has_private_routes(&self) -> bool {
        self.object_routes.iter().any(|r| r.objects() == Objects::Private)
    }
}


/// An object id found in a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectId<'a> {
    /// The id segment as written.
    pub text: &'a str,
    /// Its value when it is a decimal number.
    pub number: Option<u64>,
    /// The configured route it matched (None: found by `auto_normalize`).
    pub route: Option<usize>,
    /// Whose objects the route serves.
    pub objects: Objects,
}

#[derive(Debug, Clone)]
pub struct Enumeration {
    templates: Vec<(Vec<String>, Objects)>,
    auto_normalize: bool,
    window_ms: u64,
    max_distinct_ids: f64,
    max_distinct_private_ids: f64,
    max_sequential_run: u32,
    max_miss_ratio: f64,
    min_requests: f64,
    weight: f32,
}

impl Enumeration {
    pub fn new(config: &EnumerationConfig) -> Option<Enumeration> {
        if !config.enabled || (config.object_routes.is_empty() && !config.auto_normalize) {
            return None;
        }
        Some(Enumeration {
            templates: config
                .object_routes
                .iter()
                .map(|t| (segments(t.path()).map(str::to_string).collect(), t.objects()))
                .collect(),
            auto_normalize: config.auto_normalize,
            window_ms: u64::from(config.window_s).saturating_mul(1000),
            max_distinct_ids: f64::from(config.max_distinct_ids),
            max_distinct_private_ids: f64::from(config.max_distinct_private_ids),
            max_sequential_run: config.max_sequential_run,
            max_miss_ratio: f64::from(config.max_miss_ratio),
            min_requests: f64::from(config.min_requests),
            weight: config.weight,
        })
    }

    /// The object id of this path, if it addresses one object.
    pub fn object_id<'a>(&self, path: &'a str) -> Option<ObjectId<'a>> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        for (route, (template, objects)) in self.templates.iter().enumerate() {
            let mut parts = segments(path);
            let mut id = None;
            let mut matched = true;
            for t in template {
                match parts.next() {
                    Some(p) if t.starts_with('{') && t.ends_with('}') && !p.is_empty() => id = Some(p),
                    Some(p) if p == t => {}
                    _ => {
                        matched = false;
                        break;
                    }
                }
            }
            if matched && parts.next().is_none() {
                if let Some(text) = id {
                    return Some(ObjectId { text, number: text.parse().ok(), route: Some(route), objects: *objects });
                }
            }
        }
        if self.auto_normalize {
            let text = segments(path).filter(|s| looks_like_id(s)).last()?;
            return Some(ObjectId { text, number: text.parse().ok(), route: None, objects: Objects::Unspecified });
        }
        None
    }

    /// A request for an object; `id_hash` is the keyed hash of its text;
    /// `session` the low 32 bits of the request's session hash (0 = none)
    /// and `sessions` the client's distinct sessions in the window;
    /// `accepted`: the client's credential is one the API accepted.
    #[allow(clippy::too_many_arguments)]
    pub fn on_request(
        &self,
        client: &mut ClientRecord,
        id: &ObjectId<'_>,
        id_hash: u64,
        session: u32,
        sessions: f64,
        accepted: bool,
        now_ms: u64,
    ) -> Signal {
        let mut signal = Signal::default();
        client.object_requests.record(now_ms, self.window_ms);
        let distinct = client.object_ids.insert(id_hash, now_ms, self.window_ms);
        // An accepted client reading a public catalogue is held to its rate
        // limits, not to a count of ids: that is what a partner does.
        let counted = !(accepted && id.objects == Objects::Public);
        // Many people behind one address each read their own: the limit
        // grows with the sessions the address holds.
        let per_session = match id.objects {
            Objects::Private => self.max_distinct_private_ids,
            _ => self.max_distinct_ids,
        };
        let allowed = per_session * sessions.max(1.0);
        if counted && distinct > allowed {
            signal.fire_with(Reason::Enumeration, self.weight, Figure::new("distinct object ids", distinct, allowed, self.window_ms));
        }
        let same_session = client.object_session == session;
        client.object_session = session;
        if let Some(n) = id.number {
            let last = client.last_object_id;
            let next = same_session && (last.checked_add(1) == Some(n) || n.checked_add(1) == Some(last));
            if next {
                client.object_run = client.object_run.saturating_add(1);
            } else if n != last {
                client.object_run = 0;
            }
            client.last_object_id = n;
            if counted && client.object_run >= self.max_sequential_run {
                let figure = Figure::new("consecutive object ids", client.object_run.into(), self.max_sequential_run.into(), 0);
                signal.fire_with(Reason::Enumeration, self.weight, figure);
            }
        }
        signal
    }

    /// The answer to an object request: 404 and 403 are misses.
    pub fn on_answer(&self, client: &mut ClientRecord, status: u32, now_ms: u64) -> Signal {
        let mut signal = Signal::default();
        if status != 404 && status != 403 {
            return signal;
        }
        let misses = client.object_misses.record(now_ms, self.window_ms);
        let requests = client.object_requests.estimate(now_ms, self.window_ms);
        if requests >= self.min_requests && misses / requests.max(1.0) > self.max_miss_ratio {
            let figure = Figure::new("share of object requests missed (404/403)", misses / requests.max(1.0), self.max_miss_ratio, self.window_ms);
            signal.fire_with(Reason::Enumeration, self.weight, figure);
        }
        signal
    }
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// Numeric, UUID, or hex of 16+ characters: names an object, not a route.
fn looks_like_id(segment: &str) -> bool {
    let len = segment.len();
    let all = |f: fn(u8) -> bool| segment.bytes().all(f);
    if len > 0 && len <= 19 && all(|b| b.is_ascii_digit()) {
        return true;
    }
    if len == 36 {
        let dashes = segment.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) { b == b'-' } else { b.is_ascii_hexdigit() }
        });
        if dashes {
            return true;
        }
    }
    (16..=64).contains(&len) && all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn detector(auto: bool) -> Enumeration {
        Enumeration::new(&EnumerationConfig {
            object_routes: vec!["/api/users/{id}".into(), "/shop/{sku}/reviews".into()],
            auto_normalize: auto,
            max_distinct_ids: 30,
            max_sequential_run: 10,
            min_requests: 10,
            ..EnumerationConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn ids_from_templates_and_shapes() {
        let d = detector(true);
        assert_eq!(
            d.object_id("/api/users/42?x=1"),
            Some(ObjectId { text: "42", number: Some(42), route: Some(0), objects: Objects::Unspecified })
        );
        assert_eq!(d.object_id("/shop/ab-1/reviews").unwrap().text, "ab-1");
        assert_eq!(d.object_id("/shop/ab-1/reviews/x").map(|i| i.text), None);
        assert_eq!(d.object_id("/orders/550e8400-e29b-41d4-a716-446655440000").unwrap().number, None);
        assert_eq!(d.object_id("/blobs/0123456789abcdef0123").unwrap().text, "0123456789abcdef0123");
        assert_eq!(d.object_id("/api/products?page=2"), None);
        assert_eq!(d.object_id("/api/v2/things"), None);
        let strict = detector(false);
        assert_eq!(strict.object_id("/orders/17"), None);
        assert!(strict.object_id("/api/users/17").is_some());
    }

    #[test]
    fn sequential_walk_fires() {
        let d = detector(true);
        let mut c = ClientRecord::default();
        let mut fired_at = None;
        for n in 100..130u64 {
            let text = n.to_string();
            let id = ObjectId { text: &text, number: Some(n), route: Some(0), objects: Objects::Unspecified };
            let s = d.on_request(&mut c, &id, n * 7919, 0, 1.0, false, 1000);
            if !s.reasons.is_empty() && fired_at.is_none() {
                fired_at = Some(n - 100);
            }
        }
        assert_eq!(fired_at, Some(10));
    }

    #[test]
    fn an_office_of_sessions_walking_ids_together_is_not_one_walker() {
        let d = detector(true);
        let mut c = ClientRecord::default();
        for n in 1..=100u64 {
            let text = n.to_string();
            // Each id asked by another person (session) behind the same address.
            let s = d.on_request(&mut c, &ObjectId { text: &text, number: Some(n), route: Some(0), objects: Objects::Unspecified }, n * 7919, n as u32, n as f64, false, 1000);
            assert!(s.reasons.is_empty(), "{n}");
        }
    }

    #[test]
    fn revisiting_a_few_objects_is_fine() {
        let d = detector(true);
        let mut c = ClientRecord::default();
        for round in 0..20u64 {
            for n in [5u64, 9, 13] {
                let text = n.to_string();
                let s = d.on_request(&mut c, &ObjectId { text: &text, number: Some(n), route: Some(0), objects: Objects::Unspecified }, n * 31, 0, 1.0, false, 1000 + round);
                assert!(s.reasons.is_empty());
            }
        }
    }

    #[test]
    fn mostly_missing_objects_fire() {
        let d = detector(true);
        let mut c = ClientRecord::default();
        let mut fired = false;
        for n in 0..20u64 {
            let text = (n * 1000).to_string();
            d.on_request(&mut c, &ObjectId { text: &text, number: Some(n * 1000), route: Some(0), objects: Objects::Unspecified }, n, 0, 1.0, false, 1000);
            fired |= !d.on_answer(&mut c, 404, 1000).reasons.is_empty();
        }
        assert!(fired);
    }

    fn visible() -> Enumeration {
        Enumeration::new(&EnumerationConfig {
            object_routes: vec![
                ObjectRouteSpec::Route { path: "/api/products/{id}".into(), objects: Objects::Public },
                ObjectRouteSpec::Route { path: "/api/users/{id}".into(), objects: Objects::Private },
            ],
            ..EnumerationConfig::default()
        })
        .unwrap()
    }

    fn walk(d: &Enumeration, path: &str, ids: impl Iterator<Item = u64>, accepted: bool) -> Option<u64> {
        let mut c = ClientRecord::default();
        for (i, n) in ids.enumerate() {
            let p = format!("{path}/{n}");
            let id = d.object_id(&p).unwrap();
            let s = d.on_request(&mut c, &id, n.wrapping_mul(0x9E37_79B9_7F4A_7C15), 0, 1.0, accepted, 1000 + i as u64 * 25);
            if !s.reasons.is_empty() {
                return Some(i as u64 + 1);
            }
        }
        None
    }

    #[test]
    fn a_partner_reads_the_catalogue_and_a_walker_of_private_objects_is_stopped() {
        let d = visible();
        assert_eq!(d.object_id("/api/products/3").unwrap().objects, Objects::Public);
        // A keyed partner syncing the whole catalogue, in order: its rate limits govern.
        assert_eq!(walk(&d, "/api/products", 1..=500, true), None);
        // An anonymous client doing the same is held to the limits.
        assert_eq!(walk(&d, "/api/products", 1..=500, false), Some(15));
        // A keyed client walking other people's profiles, in order or not.
        assert!(walk(&d, "/api/users", 1..=100, true).is_some_and(|n| n <= 30));
        let scattered = (1..=100u64).map(|i| (i * 37) % 1000);
        assert!(walk(&d, "/api/users", scattered, true).is_some_and(|n| n <= 30));
    }

    #[test]
    fn object_routes_read_as_templates_or_with_whose_objects() {
        let c: EnumerationConfig = serde_json::from_str(
            r#"{"object_routes":["/a/{id}",{"path":"/b/{id}","objects":"private"},{"path":"/c/{id}"}]}"#,
        )
        .unwrap();
        let objects: Vec<Objects> = c.object_routes.iter().map(ObjectRouteSpec::objects).collect();
        assert_eq!(objects, [Objects::Unspecified, Objects::Private, Objects::Unspecified]);
        assert!(c.has_private_routes());
        let bad: Result<EnumerationConfig, _> = serde_json::from_str(r#"{"object_routes":[{"path":"/b/{id}","objects":"secret"}]}"#);
        assert!(bad.is_err());
    }
}
