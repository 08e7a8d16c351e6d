//! Filter stats, visible in Envoy's `/stats` and `/stats/prometheus` as
//! `wasmcustom.abuse_filter.*` counters.
//!
//! Every host call costs microseconds (`make bench-hostcalls`), so requests only bump
//! plain per-VM counters; `flush` (on each tick) hands the deltas to Envoy.
//! The names and slots are the engine's (`abuse_engine::stats`), shared with
//! the dynamic module.

use abuse_engine::stats::{self, StatSink};
use abuse_engine::Verdict;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::cell::RefCell;

pub use abuse_engine::stats::Counter;

struct Registry {
    ids: Vec<Option<u32>>,
    pending: Vec<u64>,
}

thread_local! {
    static REGISTRY: RefCell<Registry> = const { RefCell::new(Registry { ids: Vec::new(), pending: Vec::new() }) };
}

/// Defines the counters in this VM (idempotent: Envoy returns the same stat).
pub fn define(rules: &[String]) {
    let ids: Vec<Option<u32>> = stats::names(rules)
        .iter()
        .map(|n| hostcalls::define_metric(MetricType::Counter, n).ok())
        .collect();
    REGISTRY.with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            r.ids = ids;
            r.pending = vec![0; stats::slot_len(rules.len())];
        }
    });
}

/// This VM's pending counts.
struct VmCounts;

impl StatSink for VmCounts {
    fn add(&self, slot: usize, n: u64) {
        REGISTRY.with(|r| {
            if let Ok(mut r) = r.try_borrow_mut() {
                if let Some(p) = r.pending.get_mut(slot) {
                    *p = p.saturating_add(n);
                }
            }
        });
    }
}

pub fn bump(counter: Counter, n: u64) {
    stats::bump(&VmCounts, counter, n);
}

/// Counts what a verdict on an answer adds (the request was counted already).
pub fn record_answer(v: &Verdict) {
    stats::record_answer(&VmCounts, v);
}

/// Counts everything a verdict tells.
pub fn record(v: &Verdict) {
    stats::record(&VmCounts, v);
}

/// Counts the outcome of a callout (the request was counted already).
pub fn record_callout(v: &Verdict) {
    stats::record_callout(&VmCounts, v);
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
