//! The filter's stats through Envoy's dynamic-module metrics ABI, under the
//! same names as the wasm filter's (`abuse_engine::stats`). Requests add to
//! atomics shared by all workers; the tick (main thread, every 500 ms)
//! hands the deltas to Envoy, as the wasm filter's tick does.

use crate::abi::{self, ConfigEnvoyPtr, ModuleBuffer};
use abuse_engine::stats::{self, StatSink};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Stats {
    ids: Vec<Option<usize>>,
    pending: Vec<AtomicU64>,
    gauges: Vec<(&'static str, Option<usize>)>,
}

/// Gauges, by name (the wasm filter's).
pub const GAUGES: [&str; 5] = [
    "abuse_filter.shared_data.bytes",
    "abuse_filter.baselines.learning",
    "abuse_filter.login.under_attack",
    "abuse_filter.scorer.breaker_open",
    "abuse_filter.module.waiting",
];

impl StatSink for Stats {
    fn add(&self, slot: usize, n: u64) {
        if let Some(p) = self.pending.get(slot) {
            p.fetch_add(n, Ordering::Relaxed);
        }
    }
}

fn define(config: ConfigEnvoyPtr, name: &str, gauge: bool) -> Option<usize> {
    let mut id = 0usize;
    // SAFETY: main thread, at configuration; the name lives for the call.
    let result = unsafe {
        if gauge {
            abi::envoy_dynamic_module_callback_http_filter_config_define_gauge(
                config,
                ModuleBuffer::of(name.as_bytes()),
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        } else {
            abi::envoy_dynamic_module_callback_http_filter_config_define_counter(
                config,
                ModuleBuffer::of(name.as_bytes()),
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        }
    };
    (result == abi::METRICS_SUCCESS).then_some(id)
}

impl Stats {
    /// Defines every counter and gauge (main thread, configuration time).
    pub fn define(config: ConfigEnvoyPtr, rules: &[String]) -> Stats {
        let names = stats::names(rules);
        let ids = names.iter().map(|n| define(config, n, false)).collect();
        let pending = (0..stats::slot_len(rules.len())).map(|_| AtomicU64::new(0)).collect();
        let gauges = GAUGES.iter().map(|g| (*g, define(config, g, true))).collect();
        Stats { ids, pending, gauges }
    }

    pub fn bump(&self, counter: stats::Counter, n: u64) {
        stats::bump(self, counter, n);
    }

    /// Hands the pending deltas to Envoy (main thread, on the tick).
    pub fn flush(&self, config: ConfigEnvoyPtr) {
        for (id, pending) in self.ids.iter().zip(self.pending.iter()) {
            let n = pending.swap(0, Ordering::Relaxed);
            if let (Some(id), true) = (id, n > 0) {
                // SAFETY: an id Envoy gave this config; main thread.
                let result = unsafe {
                    abi::envoy_dynamic_module_callback_http_filter_config_increment_counter(config, *id, std::ptr::null_mut(), 0, n)
                };
                if result != abi::METRICS_SUCCESS {
                    pending.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }

    pub fn gauge(&self, config: ConfigEnvoyPtr, name: &str, value: u64) {
        if let Some((_, Some(id))) = self.gauges.iter().find(|(n, _)| *n == name) {
            // SAFETY: an id Envoy gave this config; main thread.
            unsafe {
                abi::envoy_dynamic_module_callback_http_filter_config_set_gauge(config, *id, std::ptr::null_mut(), 0, value);
            }
        }
    }
}
