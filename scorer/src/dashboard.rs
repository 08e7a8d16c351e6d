//! The dashboard: `GET /` is one static page (`dashboard.html`, plain HTML
//! and JavaScript, nothing fetched from elsewhere) that polls
//! `GET /v1/dashboard` every 2 s for the JSON built here.
//!
//! The data endpoint carries no secret — an operator opens it in a browser
//! — so it shows only client addresses, reasons, scores and counts: never
//! usernames, sessions or features. History is bounded: the last 1,000
//! clients and 60 ten-second buckets (10 minutes).

use crate::bounded::BoundedMap;
use crate::metrics::{action_name, reason_label};
use abuse_engine::wire::{ScoreAction, ScoreResponse};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};

pub const HTML: &str = include_str!("dashboard.html");
pub const BUCKET_MS: u64 = 10_000;
pub const BUCKETS: usize = 60;
pub const TOP_CLIENTS: usize = 20;
const CLIENT_CAP: usize = 1_000;
/// Callout rates are averaged over the last minute (six buckets).
const RATE_BUCKETS: u64 = 6;

#[derive(Debug, Clone)]
struct ClientRow {
    score: f32,
    action: ScoreAction,
    reasons: Vec<String>,
    /// The anomaly behind the row's score and reasons: the callout's, or
    /// the highest a flag was raised at. A later ordinary sample does not
    /// lower it (the row would then contradict its own `anomaly` reason).
    anomaly: Option<f32>,
    /// The latest sampled anomaly, flagged or not.
    last_anomaly: Option<f32>,
    last_seen_ms: u64,
    requests: u64,
}

#[derive(Debug)]
struct Bucket {
    start_ms: u64,
    by_reason: BTreeMap<&'static str, u64>,
    by_action: [u64; 3],
}

fn action_index(a: ScoreAction) -> usize {
    match a {
        ScoreAction::Allow => 0,
        ScoreAction::Tag => 1,
        ScoreAction::Block => 2,
    }
}

/// Sampled clients' anomalies kept for the distribution, at most.
const SAMPLE_SCORES: usize = 2_000;
/// Bins of the anomaly distribution over [0, 1].
pub const ANOMALY_BINS: usize = 20;

pub struct Dashboard {
    started_ms: u64,
    /// (ms, anomaly) of the latest sampled clients, oldest first.
    sample_scores: VecDeque<(u64, f32)>,
    clients: BoundedMap<String, ClientRow>,
    buckets: VecDeque<Bucket>,
    totals: [u64; 3],
}

#[derive(Debug, Serialize)]
pub struct ClientView {
    pub client: String,
    pub score: f32,
    pub action: &'static str,
    pub reasons: Vec<String>,
    pub anomaly: Option<f32>,
    pub last_anomaly: Option<f32>,
    pub last_seen_ms: u64,
    pub requests: u64,
}

#[derive(Debug, Serialize)]
pub struct Detections {
    /// Start of the first bucket; bucket `i` starts at `start_ms + i · bucket_s · 1000`.
    pub start_ms: u64,
    pub bucket_s: u64,
    /// Per reason, `BUCKETS` counts, oldest first; reasons never seen are absent.
    pub series: BTreeMap<&'static str, Vec<u64>>,
}

#[derive(Debug, Serialize, Default)]
pub struct PerAction<T> {
    pub allow: T,
    pub tag: T,
    pub block: T,
}

#[derive(Debug, Serialize)]
pub struct Callouts {
    /// Seconds the rates are averaged over.
    pub window_s: f64,
    pub per_s: PerAction<f64>,
    pub total: PerAction<u64>,
}

/// The models' state (see `models::ModelsView`).
pub type ModelView = crate::models::ModelsView;

#[derive(Debug, Serialize)]
pub struct StoreView {
    pub kind: &'static str,
    pub redis_ok: bool,
}

/// The anomaly of sampled clients (what the model learns from) over the
/// last 10 minutes: `counts[i]` clients in `[i/bins, (i+1)/bins)`.
#[derive(Debug, Serialize)]
pub struct AnomalyDistribution {
    pub bins: usize,
    pub counts: Vec<u64>,
    /// Share at or above 0.5 (on or beyond their group's tag line).
    pub above_half: f64,
    pub samples: u64,
}

#[derive(Debug, Serialize)]
pub struct DashboardData {
    pub now_ms: u64,
    pub top_clients: Vec<ClientView>,
    pub detections: Detections,
    pub callouts: Callouts,
    pub model: ModelView,
    pub store: StoreView,
    pub anomaly_distribution: AnomalyDistribution,
}

impl Dashboard {
    pub fn new(now_ms: u64) -> Dashboard {
        Dashboard {
            started_ms: now_ms,
            sample_scores: VecDeque::new(),
            clients: BoundedMap::new(CLIENT_CAP, BUCKET_MS * BUCKETS as u64),
            buckets: VecDeque::new(),
            totals: [0; 3],
        }
    }

    fn bucket(&mut self, now_ms: u64) -> Option<&mut Bucket> {
        let start_ms = now_ms - now_ms % BUCKET_MS;
        if self.buckets.back().is_none_or(|b| b.start_ms < start_ms) {
            self.buckets.push_back(Bucket {
                start_ms,
                by_reason: BTreeMap::new(),
                by_action: [0; 3],
            });
        }
        let oldest = start_ms.saturating_sub(BUCKET_MS * (BUCKETS as u64 - 1));
        while self.buckets.len() > BUCKETS
            || self.buckets.front().is_some_and(|b| b.start_ms < oldest)
        {
            self.buckets.pop_front();
        }
        self.buckets.back_mut()
    }

    pub fn record(&mut self, now_ms: u64, client: &str, answer: &ScoreResponse) {
        let row = self
            .clients
            .entry_or_insert_with(client.to_string(), now_ms, || ClientRow {
                score: 0.0,
                action: ScoreAction::Allow,
                reasons: Vec::new(),
                anomaly: None,
                last_anomaly: None,
                last_seen_ms: now_ms,
                requests: 0,
            });
        row.score = answer.score;
        row.action = answer.action;
        row.reasons.clone_from(&answer.reasons);
        row.anomaly = answer.anomaly;
        if answer.anomaly.is_some() {
            row.last_anomaly = answer.anomaly;
        }
        row.last_seen_ms = now_ms;
        row.requests += 1;
        let i = action_index(answer.action);
        if let Some(t) = self.totals.get_mut(i) {
            *t += 1;
        }
        if let Some(bucket) = self.bucket(now_ms) {
            if let Some(n) = bucket.by_action.get_mut(i) {
                *n += 1;
            }
            for r in &answer.reasons {
                *bucket.by_reason.entry(reason_label(r)).or_insert(0) += 1;
            }
        }
    }

    /// A sampled client's anomaly; `flag`, the tag the model asks for it:
    /// then the client gets (or updates) its row, with the score and
    /// reason. A client already listed gets its latest anomaly either way
    /// (`last_anomaly`); its `anomaly` stays the one its reasons rest on.
    pub fn record_sample(&mut self, now_ms: u64, client: &str, anomaly: f32, flag: Option<&ScoreResponse>) {
        if self.sample_scores.len() >= SAMPLE_SCORES {
            self.sample_scores.pop_front();
        }
        self.sample_scores.push_back((now_ms, anomaly));
        if let Some(answer) = flag {
            let row = self
                .clients
                .entry_or_insert_with(client.to_string(), now_ms, || ClientRow {
                    score: 0.0,
                    action: ScoreAction::Allow,
                    reasons: Vec::new(),
                    anomaly: None,
                    last_anomaly: None,
                    last_seen_ms: now_ms,
                    requests: 0,
                });
            row.score = row.score.max(answer.score);
            if action_index(answer.action) > action_index(row.action) {
                row.action = answer.action;
            }
            for r in &answer.reasons {
                if !row.reasons.contains(r) {
                    row.reasons.push(r.clone());
                }
            }
            row.anomaly = Some(row.anomaly.map_or(anomaly, |a| a.max(anomaly)));
            row.last_anomaly = Some(anomaly);
            row.last_seen_ms = now_ms;
            if let Some(bucket) = self.bucket(now_ms) {
                for r in &answer.reasons {
                    *bucket.by_reason.entry(reason_label(r)).or_insert(0) += 1;
                }
            }
        } else if let Some(row) = self.clients.get_mut(&client.to_string()) {
            row.last_anomaly = Some(anomaly);
        }
    }

    fn anomaly_distribution(&self, now_ms: u64) -> AnomalyDistribution {
        let window_ms = BUCKET_MS * BUCKETS as u64;
        let mut counts = vec![0u64; ANOMALY_BINS];
        let (mut n, mut above) = (0u64, 0u64);
        for (t, a) in &self.sample_scores {
            if now_ms.saturating_sub(*t) >= window_ms {
                continue;
            }
            let a = if a.is_finite() { a.clamp(0.0, 1.0) } else { 0.0 };
            let i = ((a * ANOMALY_BINS as f32) as usize).min(ANOMALY_BINS - 1);
            if let Some(c) = counts.get_mut(i) {
                *c += 1;
            }
            n += 1;
            above += u64::from(a >= 0.5);
        }
        AnomalyDistribution {
            bins: ANOMALY_BINS,
            counts,
            above_half: if n == 0 { 0.0 } else { ((above as f64 / n as f64) * 1000.0).round() / 1000.0 },
            samples: n,
        }
    }

    pub fn data(&self, now_ms: u64, model: ModelView, store: StoreView) -> DashboardData {
        let window_ms = BUCKET_MS * BUCKETS as u64;
        let mut rows: Vec<(&String, &ClientRow)> = self
            .clients
            .values()
            .filter(|(_, r)| now_ms.saturating_sub(r.last_seen_ms) < window_ms)
            .collect();
        rows.sort_by(|a, b| {
            b.1.score
                .total_cmp(&a.1.score)
                .then(b.1.last_seen_ms.cmp(&a.1.last_seen_ms))
        });
        let top_clients = rows
            .into_iter()
            .take(TOP_CLIENTS)
            .map(|(client, r)| ClientView {
                client: client.clone(),
                score: r.score,
                action: action_name(r.action),
                reasons: r.reasons.clone(),
                anomaly: r.anomaly,
                last_anomaly: r.last_anomaly,
                last_seen_ms: r.last_seen_ms,
                requests: r.requests,
            })
            .collect();

        let current = now_ms - now_ms % BUCKET_MS;
        let start_ms = current.saturating_sub(BUCKET_MS * (BUCKETS as u64 - 1));
        let mut series: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
        let rate_from = current.saturating_sub(BUCKET_MS * (RATE_BUCKETS - 1));
        let mut recent = [0u64; 3];
        for b in self
            .buckets
            .iter()
            .filter(|b| b.start_ms >= start_ms && b.start_ms <= current)
        {
            let i = ((b.start_ms - start_ms) / BUCKET_MS) as usize;
            for (reason, n) in &b.by_reason {
                if let Some(slot) = series
                    .entry(reason)
                    .or_insert_with(|| vec![0; BUCKETS])
                    .get_mut(i)
                {
                    *slot += n;
                }
            }
            if b.start_ms >= rate_from {
                for (r, n) in recent.iter_mut().zip(b.by_action) {
                    *r += n;
                }
            }
        }
        let since = rate_from.max(self.started_ms);
        let window_s = (now_ms.saturating_sub(since) as f64 / 1000.0).max(1.0);
        let [allow, tag, block] = recent.map(|n| ((n as f64 / window_s) * 1000.0).round() / 1000.0);
        let [t_allow, t_tag, t_block] = self.totals;
        DashboardData {
            now_ms,
            top_clients,
            detections: Detections {
                start_ms,
                bucket_s: BUCKET_MS / 1000,
                series,
            },
            callouts: Callouts {
                window_s: (window_s * 10.0).round() / 10.0,
                per_s: PerAction { allow, tag, block },
                total: PerAction {
                    allow: t_allow,
                    tag: t_tag,
                    block: t_block,
                },
            },
            model,
            store,
            anomaly_distribution: self.anomaly_distribution(now_ms),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use abuse_engine::wire::WIRE_VERSION;

    fn answer(score: f32, action: ScoreAction, reasons: &[&str]) -> ScoreResponse {
        ScoreResponse {
            version: WIRE_VERSION,
            score,
            action,
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
            ttl_s: 30,
            anomaly: None,
            explanation: vec![],
        }
    }

    fn views() -> (ModelView, StoreView) {
        (
            ModelView {
                trained: 0,
                warm: false,
                warm_up: 200,
                excluded: 0,
                gated: 0,
                calibration: None,
                groups: Vec::new(),
            },
            StoreView {
                kind: "memory",
                redis_ok: false,
            },
        )
    }

    #[test]
    fn top_clients_series_and_rates() {
        let t0 = 1_700_000_000_000;
        let mut d = Dashboard::new(t0);
        for i in 0..30u64 {
            d.record(
                t0 + i * 1000,
                &format!("10.0.0.{i}"),
                &answer(i as f32, ScoreAction::Allow, &[]),
            );
        }
        d.record(
            t0 + 30_000,
            "203.0.113.7",
            &answer(
                130.0,
                ScoreAction::Block,
                &["credential_stuffing", "anomaly"],
            ),
        );
        d.record(
            t0 + 31_000,
            "203.0.113.7",
            &answer(140.0, ScoreAction::Block, &["credential_stuffing"]),
        );
        let (m, s) = views();
        let data = d.data(t0 + 31_000, m, s);
        assert_eq!(data.top_clients.len(), TOP_CLIENTS);
        assert_eq!(data.top_clients[0].client, "203.0.113.7");
        assert_eq!(
            (data.top_clients[0].score, data.top_clients[0].requests),
            (140.0, 2)
        );
        assert_eq!(data.top_clients[1].client, "10.0.0.29");
        let stuffing = &data.detections.series["credential_stuffing"];
        assert_eq!(stuffing.len(), BUCKETS);
        assert_eq!(stuffing.iter().sum::<u64>(), 2);
        assert_eq!(stuffing[BUCKETS - 1], 2, "the newest bucket is last");
        assert_eq!(data.detections.series["anomaly"].iter().sum::<u64>(), 1);
        assert_eq!(
            (data.callouts.total.allow, data.callouts.total.block),
            (30, 2)
        );
        assert!(data.callouts.per_s.block > 0.0 && data.callouts.per_s.allow > 0.0);

        // Ten minutes later it is all history.
        let (m, s) = views();
        let later = d.data(t0 + 700_000, m, s);
        assert!(later.top_clients.is_empty());
        assert!(later
            .detections
            .series
            .values()
            .all(|v| v.iter().all(|&n| n == 0)));
        assert_eq!(later.callouts.per_s.block, 0.0);
    }

    #[test]
    fn a_flagged_row_keeps_the_anomaly_it_was_flagged_at() {
        // A clean-clone CI run once read 0.485 on a row tagged `anomaly`:
        // the client's next, ordinary sample had overwritten the figure.
        let t0 = 1_700_000_000_000;
        let mut d = Dashboard::new(t0);
        let flag = answer(55.0, ScoreAction::Tag, &["anomaly"]);
        d.record_sample(t0, "203.0.113.150", 0.97, Some(&flag));
        d.record_sample(t0 + 5_000, "203.0.113.150", 0.485, None);
        let (m, s) = views();
        let data = d.data(t0 + 5_000, m, s);
        let row = &data.top_clients[0];
        assert_eq!((row.action, row.anomaly, row.last_anomaly), ("tag", Some(0.97), Some(0.485)));
        assert_eq!(row.reasons, ["anomaly"]);
    }

    #[test]
    fn history_stays_bounded() {
        let t0 = 1_700_000_000_000;
        let mut d = Dashboard::new(t0);
        for i in 0..20_000u64 {
            d.record(
                t0 + i * 500,
                &format!("c{i}"),
                &answer(1.0, ScoreAction::Tag, &["some_new_reason"]),
            );
        }
        assert!(d.buckets.len() <= BUCKETS);
        assert!(d.clients.len() <= CLIENT_CAP);
        let (m, s) = views();
        assert_eq!(
            d.data(t0 + 20_000 * 500, m, s)
                .detections
                .series
                .keys()
                .copied()
                .collect::<Vec<&str>>(),
            ["other"]
        );
    }
}
