//! Filter stats, visible in Envoy's `/stats` and `/stats/prometheus` as
//! `wasmcustom.abuse_filter.*` counters.
//!
//! Every host call costs microseconds (`make bench-hostcalls`), so requests only bump
//! plain per-VM counters; `flush` (on each tick) hands the deltas to Envoy.

use abuse_engine::detectors::login_profile::{Level, REASONS as PROFILE_REASONS};
use abuse_engine::{Action, CalloutPlan, Reason, Verdict};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::cell::RefCell;

#[derive(Debug, Clone, Copy)]
pub enum Counter {
    Requests,
    Allow,
    Tag,
    Block,
    WouldBlock,
    PenaltyBoxHits,
    CasRetries,
    Evictions,
    StoreErrors,
    Exempt,
    BodiesSkipped,
    CalloutsSent,
    CalloutsAnswered,
    CalloutsFailed,
    CalloutsTimedOut,
    CalloutCacheHits,
    CalloutsCoalesced,
    CalloutsSkippedBreakerOpen,
    FleetPolls,
    FleetVerdictsApplied,
    BatchesSent,
    BatchItemsDropped,
    WarmShards,
    SamplesSent,
    AnomalyFlags,
    DecisionsSent,
    DecisionsDropped,
    LiftsApplied,
    RuleKeysApplied,
}

const FIXED: [(Counter, &str); 29] = [
    (Counter::Requests, "abuse_filter.requests"),
    (Counter::Allow, "abuse_filter.decisions.allow"),
    (Counter::Tag, "abuse_filter.decisions.tag"),
    (Counter::Block, "abuse_filter.decisions.block"),
    (Counter::WouldBlock, "abuse_filter.decisions.would_block"),
    (Counter::PenaltyBoxHits, "abuse_filter.penalty_box.hits"),
    (Counter::CasRetries, "abuse_filter.shared_data.cas_retries"),
    (Counter::Evictions, "abuse_filter.shared_data.evictions"),
    (Counter::StoreErrors, "abuse_filter.shared_data.errors"),
    (Counter::Exempt, "abuse_filter.decisions.allowlisted"),
    (Counter::BodiesSkipped, "abuse_filter.login_bodies_skipped"),
    (Counter::CalloutsSent, "abuse_filter.scorer.callouts_sent"),
    (Counter::CalloutsAnswered, "abuse_filter.scorer.answered"),
    (Counter::CalloutsFailed, "abuse_filter.scorer.failed"),
    (Counter::CalloutsTimedOut, "abuse_filter.scorer.timed_out"),
    (Counter::CalloutCacheHits, "abuse_filter.scorer.cache_hits"),
    (Counter::CalloutsCoalesced, "abuse_filter.scorer.coalesced"),
    (Counter::CalloutsSkippedBreakerOpen, "abuse_filter.scorer.skipped_breaker_open"),
    (Counter::FleetPolls, "abuse_filter.scorer.fleet_polls"),
    (Counter::FleetVerdictsApplied, "abuse_filter.scorer.fleet_verdicts_applied"),
    (Counter::BatchesSent, "abuse_filter.scorer.batches_sent"),
    (Counter::BatchItemsDropped, "abuse_filter.scorer.batch_items_dropped"),
    (Counter::WarmShards, "abuse_filter.scorer.warm_shards"),
    (Counter::SamplesSent, "abuse_filter.scorer.samples_sent"),
    (Counter::AnomalyFlags, "abuse_filter.scorer.anomaly_flags_applied"),
    (Counter::DecisionsSent, "abuse_filter.decision_events.sent"),
    (Counter::DecisionsDropped, "abuse_filter.decision_events.dropped"),
    (Counter::LiftsApplied, "abuse_filter.operator.lifts_applied"),
    (Counter::RuleKeysApplied, "abuse_filter.scorer.rule_keys_applied"),
];

/// Per rule (`rules[]`, by index, after every fixed slot): requests it
/// matched (counted or checked), fired on (its key at the threshold),
/// refused (or would have, in monitor mode), and, for a shadow rule,
/// would have acted on.
const RULE_STATS: [&str; 4] = ["matched", "fired", "blocked", "shadow"];

/// Per reason: requests on which its detector fired, and requests blocked
/// (or would-blocked) with it among the reasons.
const PER_REASON: usize = 2;

struct Registry {
    ids: Vec<Option<u32>>,
    pending: Vec<u64>,
}

fn rule_slot(rule: usize, which: usize) -> usize {
    slot_count() + RULE_STATS.len() * rule + which
}

thread_local! {
    static REGISTRY: RefCell<Registry> = const { RefCell::new(Registry { ids: Vec::new(), pending: Vec::new() }) };
}

/// Successful logins signalled against their account's profile: one per
/// level above low, then one per profile reason.
const LOGIN_LEVELS: [Level; 2] = [Level::Medium, Level::High];

fn login_risk_slot() -> usize {
    FIXED.len() + PER_REASON * Reason::ALL.len()
}

fn slot_count() -> usize {
    login_risk_slot() + LOGIN_LEVELS.len() + PROFILE_REASONS.len()
}

fn names(rules: &[String]) -> Vec<String> {
    let mut names: Vec<String> = FIXED.iter().map(|(_, n)| (*n).to_string()).collect();
    for r in Reason::ALL {
        names.push(format!("abuse_filter.detector.{}.fired", r.name()));
        names.push(format!("abuse_filter.detector.{}.blocked", r.name()));
    }
    for level in LOGIN_LEVELS {
        names.push(format!("abuse_filter.login_risk.{}", level.name()));
    }
    for (_, name, _) in PROFILE_REASONS {
        names.push(format!("abuse_filter.login_risk.reason.{name}"));
    }
    // Rule names are validated to `[a-z0-9_]`: safe in a stat name.
    for rule in rules {
        for which in RULE_STATS {
            names.push(format!("abuse_filter.rule.{rule}.{which}"));
        }
    }
    names
}

/// Defines the counters in this VM (idempotent: Envoy returns the same stat).
pub fn define(rules: &[String]) {
    let ids: Vec<Option<u32>> = names(rules)
        .iter()
        .map(|n| hostcalls::define_metric(MetricType::Counter, n).ok())
        .collect();
    REGISTRY.with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            r.ids = ids;
            r.pending = vec![0; rule_slot(rules.len(), 0)];
        }
    });
}

fn add(slot: usize, n: u64) {
    if n == 0 {
        return;
    }
    REGISTRY.with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            if let Some(p) = r.pending.get_mut(slot) {
                *p = p.saturating_add(n);
            }
        }
    });
}

pub fn bump(counter: Counter, n: u64) {
    add(counter as usize, n);
}

fn reason_slot(reason: Reason, which: usize) -> usize {
    FIXED.len() + PER_REASON * (reason as usize) + which
}

/// Counts what a verdict on an answer adds (the request was counted already).
pub fn record_answer(v: &Verdict) {
    if v.action == Action::Block {
        bump(Counter::Block, 1);
    } else if v.would_block {
        bump(Counter::WouldBlock, 1);
    }
    count_store_and_reasons(v);
    if let Some(risk) = &v.profile_risk {
        // A successful login that differed from its account's profile.
        if let Some(i) = LOGIN_LEVELS.iter().position(|l| *l == risk.level) {
            add(login_risk_slot() + i, 1);
        }
        for (i, (reason, _, _)) in PROFILE_REASONS.iter().enumerate() {
            if risk.has(*reason) {
                add(login_risk_slot() + LOGIN_LEVELS.len() + i, 1);
            }
        }
    }
}

/// Counts everything a verdict tells.
pub fn record(v: &Verdict) {
    bump(Counter::Requests, 1);
    bump(Counter::Exempt, u64::from(v.exempt));
    bump(
        match v.action {
            Action::Allow => Counter::Allow,
            Action::Tag => Counter::Tag,
            Action::Block => Counter::Block,
        },
        1,
    );
    if v.would_block && v.action != Action::Block {
        bump(Counter::WouldBlock, 1);
    }
    if v.penalized {
        bump(Counter::PenaltyBoxHits, 1);
    }
    count_store_and_reasons(v);
}

fn count_callout(v: &Verdict) {
    let counter = match v.callout {
        CalloutPlan::NotAsked | CalloutPlan::Ask => return,
        CalloutPlan::CacheHit => Counter::CalloutCacheHits,
        CalloutPlan::InFlight => Counter::CalloutsCoalesced,
        CalloutPlan::BreakerOpen => Counter::CalloutsSkippedBreakerOpen,
        CalloutPlan::Answered => Counter::CalloutsAnswered,
        CalloutPlan::Failed => Counter::CalloutsFailed,
        CalloutPlan::TimedOut => Counter::CalloutsTimedOut,
    };
    bump(counter, 1);
}

/// Counts the outcome of a callout (the request was counted already).
pub fn record_callout(v: &Verdict) {
    count_callout(v);
    if v.action == Action::Block {
        bump(Counter::Block, 1);
    } else if v.would_block {
        bump(Counter::WouldBlock, 1);
    }
}

static BREAKER_GAUGE: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
static LEARNING_GAUGE: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();

static ATTACK_GAUGE: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();

/// `abuse_filter.login.under_attack`: 1 while this worker last saw a login
/// endpoint under a recognised distributed attack.
pub fn login_under_attack(on: bool) {
    let id = ATTACK_GAUGE.get_or_init(|| hostcalls::define_metric(MetricType::Gauge, "abuse_filter.login.under_attack").ok());
    if let Some(id) = id {
        let _ = hostcalls::record_metric(*id, u64::from(on));
    }
}

/// `abuse_filter.baselines.learning`: learned baselines (route groups for
/// spikes, login endpoints) still learning, as this worker last saw them.
pub fn baselines_learning(n: u32) {
    let id = LEARNING_GAUGE.get_or_init(|| hostcalls::define_metric(MetricType::Gauge, "abuse_filter.baselines.learning").ok());
    if let Some(id) = id {
        let _ = hostcalls::record_metric(*id, u64::from(n));
    }
}

/// `abuse_filter.scorer.breaker_open`: 1 while this worker's breaker is open.
pub fn breaker_open(open: bool) {
    let id = BREAKER_GAUGE.get_or_init(|| hostcalls::define_metric(MetricType::Gauge, "abuse_filter.scorer.breaker_open").ok());
    if let Some(id) = id {
        let _ = hostcalls::record_metric(*id, u64::from(open));
    }
}

fn count_store_and_reasons(v: &Verdict) {
    count_callout(v);
    bump(Counter::CasRetries, u64::from(v.store.cas_retries));
    bump(Counter::Evictions, u64::from(v.store.evicted));
    bump(Counter::StoreErrors, u64::from(v.store_failed));
    for r in v.fired.iter() {
        add(reason_slot(r, 0), 1);
    }
    if v.would_block {
        for r in v.reasons.iter() {
            add(reason_slot(r, 1), 1);
        }
    }
    let hits = v.rules;
    if !hits.is_empty() {
        for (which, bits) in [hits.matched, hits.fired, hits.blocked, hits.shadow].into_iter().enumerate() {
            for rule in (0..32).filter(|i| bits & (1u32 << i) != 0) {
                add(rule_slot(rule, which), 1);
            }
        }
    }
}

/// Hands pending deltas to Envoy.
pub fn flush() {
    REGISTRY.with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            let Registry { ids, pending } = &mut *r;
            for (id, count) in ids.iter().zip(pending.iter_mut()) {
                if let (Some(id), true) = (id, *count > 0) {
                    let delta = i64::try_from(*count).unwrap_or(i64::MAX);
                    if hostcalls::increment_metric(*id, delta).is_ok() {
                        *count = 0;
                    }
                }
            }
        }
    });
}

/// `abuse_filter.shared_data.bytes`: the fixed size of the filter's shared
/// data (all tables), set once at configuration; it never grows with traffic.
pub fn shared_data_bytes(bytes: usize) {
    if let Ok(id) = hostcalls::define_metric(MetricType::Gauge, "abuse_filter.shared_data.bytes") {
        let _ = hostcalls::record_metric(id, u64::try_from(bytes).unwrap_or(u64::MAX));
    }
}
