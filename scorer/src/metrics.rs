//! Prometheus metrics, served as text on `GET /metrics`.
//!
//! Every label takes values from a fixed set — actions, error kinds, route
//! names, and the reasons this project defines (anything else a request
//! names counts as `other`) — so no caller can grow the series count.

use crate::scoring::{REASON_ANOMALY, REASON_SHARING, REASON_STUFFING};
use abuse_engine::wire::ScoreAction;
use abuse_engine::Reason;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// `unauthorized`: a filter route without the right secret (401);
/// `operator_unauthorized`: the dashboard or /metrics without the right
/// operator token (401); `not_local`: those without a token configured,
/// from a peer that is not this machine (403).
/// `not_found`, `conflict`, `busy`: the operator API's unknown decision or
/// allow entry (404), a full allow list (409), too many export streams (503).
pub const ERROR_KINDS: [&str; 8] = [
    "unauthorized",
    "too_large",
    "bad_request",
    "operator_unauthorized",
    "not_local",
    "not_found",
    "conflict",
    "busy",
];
/// What the scorer refused, capped or clamped of what callers write (see
/// `validate`, `quota`, `profiles`): baselines skipped (bad name, value or
/// sample count) or clamped to their plausible range, a score request's
/// risk capped at `block_at`, blocks not published over a caller's quota,
/// stored blocks handed out with their end capped, known accounts and
/// profile updates over a caller's quota, profile times clamped to now,
/// new profile values past the per-update bound.
pub const REJECTED_KINDS: [&str; 12] = [
    "quiet_period",
    "decision_invalid",
    "decision_time_clamped",
    "baseline_invalid",
    "baseline_clamped",
    "risk_capped",
    "block_quota",
    "block_ttl_capped",
    "known_accounts_quota",
    "profiles_quota",
    "profile_time_clamped",
    "profile_new_values",
];
pub const ROUTES: [&str; 4] = ["score", "verdicts", "events", "warm"];
/// Who dropped batch items: the filter (the batch's `dropped`) or the scorer
/// (baselines finding no free name).
pub const DROPPED_BY: [&str; 2] = ["filter", "scorer"];
/// What became of a batch's feature samples: learned by the model,
/// excluded (penalized by the filter), gated (already anomalous), invalid.
/// What became of the batches' decision events: a new record, or penalty
/// hits added onto the decision they quote.
pub const DECISION_KINDS: [&str; 2] = ["stored", "aggregated"];
/// Operator changes (see `operator`).
pub const CHANGE_KINDS: [&str; 3] = ["unblock", "allow_add", "allow_remove"];
pub const SAMPLE_KINDS: [&str; 4] = ["learned", "excluded", "gated", "invalid"];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub score_requests: IntCounterVec,
    pub errors: IntCounterVec,
    pub latency: HistogramVec,
    pub model_samples: IntGauge,
    pub model_warm: IntGauge,
    pub store_errors: IntCounter,
    pub store_fallbacks: IntCounter,
    pub redis_up: IntGauge,
    pub fleet_verdicts: IntCounter,
    pub detections: IntCounterVec,
    pub batches: IntCounter,
    pub known_accounts_added: IntCounter,
    pub profiles_merged: IntCounter,
    pub batch_items_dropped: IntCounterVec,
    pub samples: IntCounterVec,
    pub anomaly_flags: IntCounter,
    pub rejected: IntCounterVec,
    pub decisions: IntCounterVec,
    pub decisions_dropped: IntCounterVec,
    pub operator_changes: IntCounterVec,
    pub export_lagged: IntCounter,
}

pub fn action_name(a: ScoreAction) -> &'static str {
    match a {
        ScoreAction::Allow => "allow",
        ScoreAction::Tag => "tag",
        ScoreAction::Block => "block",
    }
}

/// The label a reason is counted under.
pub fn reason_label(reason: &str) -> &'static str {
    Reason::ALL
        .iter()
        .map(|r| r.name())
        .chain([REASON_ANOMALY, REASON_STUFFING, REASON_SHARING])
        .find(|known| *known == reason)
        .unwrap_or("other")
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let score_requests = IntCounterVec::new(
            Opts::new(
                "abuse_scorer_score_requests_total",
                "Score requests answered, by resulting action",
            ),
            &["action"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "abuse_scorer_errors_total",
                "Requests refused, by kind (unauthorized, too_large, bad_request)",
            ),
            &["kind"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "abuse_scorer_request_duration_seconds",
                "Time to answer, by route",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ]),
            &["route"],
        )?;
        let model_samples = IntGauge::new(
            "abuse_scorer_model_samples",
            "Vectors the model has learned",
        )?;
        let model_warm = IntGauge::new(
            "abuse_scorer_model_warm",
            "1 once the model is past warm-up and scores",
        )?;
        let store_errors =
            IntCounter::new("abuse_scorer_store_errors_total", "Failed Redis calls")?;
        let store_fallbacks = IntCounter::new(
            "abuse_scorer_store_fallbacks_total",
            "Store calls answered by the local memory store because Redis failed",
        )?;
        let redis_up = IntGauge::new(
            "abuse_scorer_redis_up",
            "1 while the last Redis call worked (0 without Redis)",
        )?;
        let fleet_verdicts = IntCounter::new(
            "abuse_scorer_fleet_verdicts_total",
            "Blocks published to the fleet",
        )?;
        let detections = IntCounterVec::new(
            Opts::new(
                "abuse_scorer_detections_total",
                "Reasons in score answers, one count per reason per answer",
            ),
            &["reason"],
        )?;
        let batches = IntCounter::new(
            "abuse_scorer_batches_total",
            "Event batches accepted on /v1/events",
        )?;
        let known_accounts_added = IntCounter::new(
            "abuse_scorer_known_accounts_added_total",
            "Accounts from event batches that were new to the known-accounts filter",
        )?;
        let profiles_merged = IntCounter::new(
            "abuse_scorer_profiles_merged_total",
            "Account profiles from event batches that changed the fleet's",
        )?;
        let batch_items_dropped = IntCounterVec::new(
            Opts::new(
                "abuse_scorer_batch_items_dropped_total",
                "Batch items lost: by=filter as the batches report, by=scorer for baselines without a free name",
            ),
            &["by"],
        )?;
        let samples = IntCounterVec::new(
            Opts::new(
                "abuse_scorer_samples_total",
                "Feature samples from the batches, by what became of them (learned, excluded, gated, invalid)",
            ),
            &["kind"],
        )?;
        let anomaly_flags = IntCounter::new(
            "abuse_scorer_anomaly_flags_total",
            "Sampled clients the model flagged for the filter to tag",
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "abuse_scorer_rejected_total",
                "What callers wrote that the scorer refused, capped or clamped, by kind",
            ),
            &["kind"],
        )?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "abuse_scorer_decisions_total",
                "Decision events from the batches: stored as records, or aggregated (penalty hits onto their decision)",
            ),
            &["kind"],
        )?;
        let decisions_dropped = IntCounterVec::new(
            Opts::new(
                "abuse_scorer_decisions_dropped_total",
                "Decision events lost: by=filter as the batches report (buffer full, scorer away), by=scorer invalid ones",
            ),
            &["by"],
        )?;
        let operator_changes = IntCounterVec::new(
            Opts::new(
                "abuse_scorer_operator_changes_total",
                "Operator changes: unblock, allow_add, allow_remove",
            ),
            &["kind"],
        )?;
        let export_lagged = IntCounter::new(
            "abuse_scorer_decisions_export_lagged_total",
            "Decision records an export stream's reader was too slow to receive",
        )?;
        for c in [
            Box::new(rejected.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(decisions.clone()),
            Box::new(decisions_dropped.clone()),
            Box::new(operator_changes.clone()),
            Box::new(export_lagged.clone()),
            Box::new(samples.clone()),
            Box::new(anomaly_flags.clone()),
            Box::new(score_requests.clone()),
            Box::new(errors.clone()),
            Box::new(latency.clone()),
            Box::new(model_samples.clone()),
            Box::new(model_warm.clone()),
            Box::new(store_errors.clone()),
            Box::new(store_fallbacks.clone()),
            Box::new(redis_up.clone()),
            Box::new(fleet_verdicts.clone()),
            Box::new(detections.clone()),
            Box::new(batches.clone()),
            Box::new(known_accounts_added.clone()),
            Box::new(profiles_merged.clone()),
            Box::new(batch_items_dropped.clone()),
        ] {
            registry.register(c)?;
        }
        // Every series exists from the start, at 0: a dashboard or alert on
        // `rate(...)` should not have to wait for the first event.
        for k in SAMPLE_KINDS {
            samples.with_label_values(&[k]);
        }
        for a in ["allow", "tag", "block"] {
            score_requests.with_label_values(&[a]);
        }
        for k in ERROR_KINDS {
            errors.with_label_values(&[k]);
        }
        for r in ROUTES {
            latency.with_label_values(&[r]);
        }
        for k in REJECTED_KINDS {
            rejected.with_label_values(&[k]);
        }
        for by in DROPPED_BY {
            batch_items_dropped.with_label_values(&[by]);
            decisions_dropped.with_label_values(&[by]);
        }
        for k in DECISION_KINDS {
            decisions.with_label_values(&[k]);
        }
        for k in CHANGE_KINDS {
            operator_changes.with_label_values(&[k]);
        }
        Ok(Metrics {
            registry,
            score_requests,
            errors,
            latency,
            model_samples,
            model_warm,
            store_errors,
            store_fallbacks,
            redis_up,
            fleet_verdicts,
            detections,
            batches,
            known_accounts_added,
            profiles_merged,
            batch_items_dropped,
            samples,
            anomaly_flags,
            rejected,
            decisions,
            decisions_dropped,
            operator_changes,
            export_lagged,
        })
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    /// Counts `n` of what callers wrote as refused, capped or clamped
    /// (`kind` from [`REJECTED_KINDS`]).
    pub fn rejected(&self, kind: &'static str, n: u64) {
        if n > 0 {
            self.rejected.with_label_values(&[kind]).inc_by(n);
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series_and_bounds_reason_labels() {
        let m = Metrics::new().unwrap();
        m.detections
            .with_label_values(&[reason_label("credential_stuffing")])
            .inc();
        m.detections
            .with_label_values(&[reason_label("made_up_by_a_caller")])
            .inc();
        m.error("too_large");
        let text = m.render();
        for needle in [
            "abuse_scorer_score_requests_total{action=\"block\"} 0",
            "abuse_scorer_errors_total{kind=\"too_large\"} 1",
            "abuse_scorer_request_duration_seconds_bucket",
            "abuse_scorer_model_warm 0",
            "abuse_scorer_store_fallbacks_total 0",
            "abuse_scorer_fleet_verdicts_total 0",
            "abuse_scorer_detections_total{reason=\"credential_stuffing\"} 1",
            "abuse_scorer_detections_total{reason=\"other\"} 1",
            "abuse_scorer_batches_total 0",
            "abuse_scorer_known_accounts_added_total 0",
            "abuse_scorer_profiles_merged_total 0",
            "abuse_scorer_batch_items_dropped_total{by=\"filter\"} 0",
            "abuse_scorer_batch_items_dropped_total{by=\"scorer\"} 0",
            "abuse_scorer_request_duration_seconds_count{route=\"warm\"} 0",
            "abuse_scorer_rejected_total{kind=\"baseline_clamped\"} 0",
            "abuse_scorer_errors_total{kind=\"not_local\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert_eq!(reason_label("anomaly"), "anomaly");
        assert_eq!(reason_label("rate_limit"), "rate_limit");
    }
}
