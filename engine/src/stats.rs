//! The filter's stats as names and slots, host-free: every host adapter
//! (the proxy-wasm filter, the dynamic module) counts the same things under
//! the same names. A verdict becomes slot increments on a [`StatSink`]; the
//! adapter keeps the pending counts and hands them to its host (Envoy's
//! wasm metrics, or the dynamic-module metrics ABI).

use crate::detectors::login_profile::{Level, REASONS as PROFILE_REASONS};
use crate::{Action, CalloutPlan, Reason, Verdict};

/// Where slot increments go (a per-VM array in wasm, atomics in the module).
pub trait StatSink {
    fn add(&self, slot: usize, n: u64);
}

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

pub const FIXED: [(Counter, &str); 29] = [
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

/// Slots of the fixed counters, the per-reason ones and the login-risk
/// ones, then the per-rule ones: [`slot_len`] in all.
pub fn rule_slot(rule: usize, which: usize) -> usize {
    slot_count() + RULE_STATS.len() * rule + which
}

/// How many slots a configuration with `rules` rules counts in.
pub fn slot_len(rules: usize) -> usize {
    rule_slot(rules, 0)
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

/// Every counter name, slot by slot (without any host prefix).
pub fn names(rules: &[String]) -> Vec<String> {
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

pub fn bump<S: StatSink + ?Sized>(sink: &S, counter: Counter, n: u64) {
    if n > 0 {
        sink.add(counter as usize, n);
    }
}

fn add<S: StatSink + ?Sized>(sink: &S, slot: usize, n: u64) {
    if n > 0 {
        sink.add(slot, n);
    }
}

fn reason_slot(reason: Reason, which: usize) -> usize {
    FIXED.len() + PER_REASON * (reason as usize) + which
}

/// Counts what a verdict on an answer adds (the request was counted already).
pub fn record_answer<S: StatSink + ?Sized>(s: &S, v: &Verdict) {
    if v.action == Action::Block {
        bump(s, Counter::Block, 1);
    } else if v.would_block {
        bump(s, Counter::WouldBlock, 1);
    }
    count_store_and_reasons(s, v);
    if let Some(risk) = &v.profile_risk {
        // A successful login that differed from its account's profile.
        if let Some(i) = LOGIN_LEVELS.iter().position(|l| *l == risk.level) {
            add(s, login_risk_slot() + i, 1);
        }
        for (i, (reason, _, _)) in PROFILE_REASONS.iter().enumerate() {
            if risk.has(*reason) {
                add(s, login_risk_slot() + LOGIN_LEVELS.len() + i, 1);
            }
        }
    }
}

/// Counts everything a verdict tells.
pub fn record<S: StatSink + ?Sized>(s: &S, v: &Verdict) {
    bump(s, Counter::Requests, 1);
    bump(s, Counter::Exempt, u64::from(v.exempt));
    bump(s, 
        match v.action {
            Action::Allow => Counter::Allow,
            Action::Tag => Counter::Tag,
            Action::Block => Counter::Block,
        },
        1,
    );
    if v.would_block && v.action != Action::Block {
        bump(s, Counter::WouldBlock, 1);
    }
    if v.penalized {
        bump(s, Counter::PenaltyBoxHits, 1);
    }
    count_store_and_reasons(s, v);
}

fn count_callout<S: StatSink + ?Sized>(s: &S, v: &Verdict) {
    let counter = match v.callout {
        CalloutPlan::NotAsked | CalloutPlan::Ask => return,
        CalloutPlan::CacheHit => Counter::CalloutCacheHits,
        CalloutPlan::InFlight => Counter::CalloutsCoalesced,
        CalloutPlan::BreakerOpen => Counter::CalloutsSkippedBreakerOpen,
        CalloutPlan::Answered => Counter::CalloutsAnswered,
        CalloutPlan::Failed => Counter::CalloutsFailed,
        CalloutPlan::TimedOut => Counter::CalloutsTimedOut,
    };
    bump(s, counter, 1);
}

/// Counts the outcome of a callout (the request was counted already).
pub fn record_callout<S: StatSink + ?Sized>(s: &S, v: &Verdict) {
    count_callout(s, v);
    if v.action == Action::Block {
        bump(s, Counter::Block, 1);
    } else if v.would_block {
        bump(s, Counter::WouldBlock, 1);
    }
}

fn count_store_and_reasons<S: StatSink + ?Sized>(s: &S, v: &Verdict) {
    count_callout(s, v);
    bump(s, Counter::CasRetries, u64::from(v.store.cas_retries));
    bump(s, Counter::Evictions, u64::from(v.store.evicted));
    bump(s, Counter::StoreErrors, u64::from(v.store_failed));
    for r in v.fired.iter() {
        add(s, reason_slot(r, 0), 1);
    }
    if v.would_block {
        for r in v.reasons.iter() {
            add(s, reason_slot(r, 1), 1);
        }
    }
    let hits = v.rules;
    if !hits.is_empty() {
        for (which, bits) in [hits.matched, hits.fired, hits.blocked, hits.shadow].into_iter().enumerate() {
            for rule in (0..32).filter(|i| bits & (1u32 << i) != 0) {
                add(s, rule_slot(rule, which), 1);
            }
        }
    }
}

