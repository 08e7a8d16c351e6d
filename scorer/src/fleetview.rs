//! The fleet as the dashboard shows it, from the filters' decision events:
//! decisions per reason, per endpoint and per Envoy instance in 10 s
//! buckets over 10 minutes, refused against tagged, the endpoints under
//! attack now and the top clients. This scorer's own view (the events its
//! filters posted to it); bounded: 60 buckets, at most [`NAMES_CAP`] names
//! per series kind per bucket (the rest count as `other`), at most
//! [`CLIENT_CAP`] clients.

use crate::bounded::BoundedMap;
use crate::dashboard::{BUCKETS, BUCKET_MS};
use abuse_engine::wire::DecisionEvent;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub const NAMES_CAP: usize = 32;
pub const CLIENT_CAP: usize = 1_000;
pub const TOP_CLIENTS: usize = 20;
/// "Now" for the endpoints under attack: the last minute.
const NOW_BUCKETS: u64 = 6;
const OTHER: &str = "other";

/// One 10 s bucket's counts.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Bucket {
    pub start_ms: u64,
    pub reasons: BTreeMap<String, u64>,
    /// Per endpoint: requests decided, and the reasons seen on it.
    pub endpoints: BTreeMap<String, (u64, BTreeSet<String>)>,
    pub instances: BTreeMap<String, u64>,
    pub refused: u64,
    pub tagged: u64,
    pub monitored: u64,
}

/// How many requests an event stands for: the filter aggregates penalty
/// refusals, sheds and tags per client per batch (`hits` of them).
pub fn requests_of(d: &DecisionEvent) -> u64 {
    u64::from(d.hits.max(1))
}

/// Whether an event refused its requests (block mode, not a tag).
pub fn refused(d: &DecisionEvent) -> bool {
    d.mode == "block" && d.action != "tag"
}

pub fn endpoint_of(d: &DecisionEvent) -> String {
    format!("{} {}", d.method, d.path)
}

/// Adds `n` under `name`, or under `other` once `NAMES_CAP` names are taken.
fn add(map: &mut BTreeMap<String, u64>, name: &str, n: u64) {
    let key = if map.contains_key(name) || map.len() < NAMES_CAP { name } else { OTHER };
    *map.entry(key.to_string()).or_default() += n;
}

struct ClientRow {
    address: String,
    decisions: u64,
    refusals: u64,
    reasons: Vec<String>,
    last_ms: u64,
    last_id: String,
    last_endpoint: String,
}

pub struct FleetView {
    buckets: VecDeque<Bucket>,
    clients: BoundedMap<String, ClientRow>,
}

#[derive(Debug, Serialize)]
pub struct Attacked {
    pub endpoint: String,
    pub decisions: u64,
    pub reasons: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct TopClient {
    pub client: String,
    pub address: String,
    pub decisions: u64,
    /// Requests refused: blocks, sheds and penalty-box refusals.
    pub refusals: u64,
    pub reasons: Vec<String>,
    pub last_ms: u64,
    pub last_id: String,
    pub last_endpoint: String,
}

#[derive(Debug, Serialize)]
pub struct FleetData {
    pub start_ms: u64,
    pub bucket_s: u64,
    /// Per name, `BUCKETS` counts, oldest first.
    pub reasons: BTreeMap<String, Vec<u64>>,
    pub endpoints: BTreeMap<String, Vec<u64>>,
    pub instances: BTreeMap<String, Vec<u64>>,
    pub refused: Vec<u64>,
    pub tagged: Vec<u64>,
    /// Refused (block mode) among the decided requests of the 10 minutes:
    /// refused / (refused + tagged + monitor-mode would-blocks); null
    /// without any.
    pub blocked_share: Option<f64>,
    pub under_attack: Vec<Attacked>,
    pub top_clients: Vec<TopClient>,
}

impl Default for FleetView {
    fn default() -> Self {
        FleetView::new()
    }
}

impl FleetView {
    pub fn new() -> FleetView {
        FleetView { buckets: VecDeque::new(), clients: BoundedMap::new(CLIENT_CAP, BUCKET_MS * BUCKETS as u64) }
    }

    fn bucket(&mut self, at_ms: u64) -> Option<&mut Bucket> {
        let start_ms = at_ms - at_ms % BUCKET_MS;
        let oldest = start_ms.saturating_sub(BUCKET_MS * (BUCKETS as u64 - 1));
        if self.buckets.back().is_none_or(|b| b.start_ms < start_ms) {
            self.buckets.push_back(Bucket { start_ms, ..Bucket::default() });
        }
        while self.buckets.len() > BUCKETS || self.buckets.front().is_some_and(|b| b.start_ms < oldest) {
            self.buckets.pop_front();
        }
        self.buckets.back_mut()
    }

    /// Counts one decision event, received at `now_ms` (the scorer's
    /// clock: filters' clocks may differ).
    pub fn record(&mut self, now_ms: u64, d: &DecisionEvent) {
        let n = requests_of(d);
        let endpoint = endpoint_of(d);
        let reasons: Vec<String> = d.reasons.iter().map(|r| r.reason.clone()).collect();
        let refused = refused(d);
        if let Some(b) = self.bucket(now_ms) {
            for r in &reasons {
                add(&mut b.reasons, r, n);
            }
            let key = if b.endpoints.contains_key(&endpoint) || b.endpoints.len() < NAMES_CAP {
                endpoint.clone()
            } else {
                OTHER.to_string()
            };
            let slot = b.endpoints.entry(key).or_default();
            slot.0 += n;
            slot.1.extend(reasons.iter().take(NAMES_CAP).cloned());
            add(&mut b.instances, &d.instance, n);
            if d.mode == "monitor" {
                b.monitored += n;
            } else if refused {
                b.refused += n;
            } else {
                b.tagged += n;
            }
        }
        let row = self.clients.entry_or_insert_with(d.client.clone(), now_ms, || ClientRow {
            address: d.address.clone(),
            decisions: 0,
            refusals: 0,
            reasons: Vec::new(),
            last_ms: now_ms,
            last_id: String::new(),
            last_endpoint: String::new(),
        });
        if d.action == "penalty" {
            row.refusals += n;
        } else {
            row.decisions += 1;
            if refused {
                row.refusals += n;
            }
            row.last_id.clone_from(&d.id);
            row.reasons = reasons;
        }
        row.last_ms = now_ms;
        row.last_endpoint = endpoint;
    }

    pub fn data(&self, now_ms: u64) -> FleetData {
        let window_ms = BUCKET_MS * BUCKETS as u64;
        let mut rows: Vec<(&String, &ClientRow)> =
            self.clients.values().filter(|(_, r)| now_ms.saturating_sub(r.last_ms) < window_ms).collect();
        rows.sort_by(|a, b| {
            (b.1.refusals + b.1.decisions)
                .cmp(&(a.1.refusals + a.1.decisions))
                .then(b.1.last_ms.cmp(&a.1.last_ms))
        });
        let top_clients = rows
            .into_iter()
            .take(TOP_CLIENTS)
            .map(|(client, r)| TopClient {
                client: client.clone(),
                address: r.address.clone(),
                decisions: r.decisions,
                refusals: r.refusals,
                reasons: r.reasons.clone(),
                last_ms: r.last_ms,
                last_id: r.last_id.clone(),
                last_endpoint: r.last_endpoint.clone(),
            })
            .collect();
        data_of(self.buckets.iter(), top_clients, now_ms)
    }
}

/// The dashboard's fleet data from buckets (any order) and the top clients.
pub fn data_of<'a>(buckets: impl Iterator<Item = &'a Bucket>, top_clients: Vec<TopClient>, now_ms: u64) -> FleetData {
    {
        let current = now_ms - now_ms % BUCKET_MS;
        let start_ms = current.saturating_sub(BUCKET_MS * (BUCKETS as u64 - 1));
        let mut reasons: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut endpoints: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut instances: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut refused = vec![0; BUCKETS];
        let mut tagged = vec![0; BUCKETS];
        let (mut r_all, mut all) = (0u64, 0u64);
        let mut now: BTreeMap<&str, (u64, BTreeSet<&str>)> = BTreeMap::new();
        let now_from = current.saturating_sub(BUCKET_MS * (NOW_BUCKETS - 1));
        for b in buckets.filter(|b| b.start_ms >= start_ms && b.start_ms <= current) {
            let Ok(i) = usize::try_from((b.start_ms - start_ms) / BUCKET_MS) else { continue };
            let put = |series: &mut BTreeMap<String, Vec<u64>>, name: &str, n: u64| {
                if let Some(slot) = series.entry(name.to_string()).or_insert_with(|| vec![0; BUCKETS]).get_mut(i) {
                    *slot += n;
                }
            };
            for (name, n) in &b.reasons {
                put(&mut reasons, name, *n);
            }
            for (name, (n, _)) in &b.endpoints {
                put(&mut endpoints, name, *n);
            }
            for (name, n) in &b.instances {
                put(&mut instances, name, *n);
            }
            if let Some(s) = refused.get_mut(i) {
                *s += b.refused;
            }
            if let Some(s) = tagged.get_mut(i) {
                *s += b.tagged;
            }
            r_all += b.refused;
            all += b.refused + b.tagged + b.monitored;
            if b.start_ms >= now_from {
                for (name, (n, rs)) in &b.endpoints {
                    let slot = now.entry(name.as_str()).or_default();
                    slot.0 += n;
                    slot.1.extend(rs.iter().map(String::as_str));
                }
            }
        }
        let mut under_attack: Vec<Attacked> = now
            .into_iter()
            .map(|(endpoint, (decisions, rs))| Attacked {
                endpoint: endpoint.to_string(),
                decisions,
                reasons: rs.into_iter().map(str::to_string).collect(),
            })
            .collect();
        under_attack.sort_by(|a, b| b.decisions.cmp(&a.decisions).then(a.endpoint.cmp(&b.endpoint)));
        under_attack.truncate(10);
        FleetData {
            start_ms,
            bucket_s: BUCKET_MS / 1000,
            reasons,
            endpoints,
            instances,
            refused,
            tagged,
            blocked_share: (all > 0).then(|| ((r_all as f64 / all as f64) * 1000.0).round() / 1000.0),
            under_attack,
            top_clients,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::decisions::tests::event;

    #[test]
    fn counts_per_reason_endpoint_and_instance() {
        let mut v = FleetView::new();
        let t = 1_700_000_000_000 - 1_700_000_000_000 % BUCKET_MS;
        v.record(t, &event("a", "203.0.113.7", "block", t));
        v.record(t + 1, &event("a", "203.0.113.7", "penalty", t));
        let mut tag = event("b", "198.51.100.1", "tag", t);
        tag.path = "/api/products".into();
        tag.method = "GET".into();
        v.record(t + 2, &tag);
        let d = v.data(t + 5);
        assert_eq!(d.reasons["credential_stuffing"][BUCKETS - 1], 1 + 7 + 1);
        assert_eq!(d.endpoints["POST /api/login"][BUCKETS - 1], 8);
        assert_eq!(d.instances["envoy-a"][BUCKETS - 1], 9);
        assert_eq!((d.refused[BUCKETS - 1], d.tagged[BUCKETS - 1]), (8, 1));
        assert_eq!(d.blocked_share, Some(0.889));
        assert_eq!(d.under_attack[0].endpoint, "POST /api/login");
        assert_eq!(d.under_attack[0].reasons, vec!["credential_stuffing"]);
        assert_eq!(d.top_clients[0].client, "203.0.113.7");
        assert_eq!((d.top_clients[0].decisions, d.top_clients[0].refusals), (1, 8));
        // Ten minutes later it is all gone; "now" is the last minute only.
        let later = v.data(t + 70_000);
        assert!(later.under_attack.is_empty());
        assert_eq!(later.reasons["credential_stuffing"].iter().sum::<u64>(), 9);
        assert!(v.data(t + BUCKET_MS * BUCKETS as u64 + 1).reasons.is_empty());
    }

    #[test]
    fn names_are_bounded() {
        let mut v = FleetView::new();
        let t = 1_700_000_000_000;
        for i in 0..100 {
            let mut e = event(&format!("x{i}"), &format!("10.0.0.{i}"), "block", t);
            e.path = format!("/p{i}");
            e.instance = format!("envoy-{i}");
            v.record(t, &e);
        }
        let d = v.data(t);
        assert_eq!(d.endpoints.len(), NAMES_CAP + 1);
        assert_eq!(d.instances.len(), NAMES_CAP + 1);
        assert_eq!(d.endpoints[OTHER].iter().sum::<u64>(), 100 - NAMES_CAP as u64);
        assert_eq!(d.top_clients.len(), TOP_CLIENTS);
    }
}
