//! The root context: validates the configuration (refusing a bad one with a
//! log line naming the key), shares the hashing seed between worker VMs,
//! creates the shard keys, and flushes stats on each tick.

use crate::http::AbuseFilterHttp;
use crate::metrics;
use crate::shared_data::EnvoySharedData;
use abuse_engine::{Config, Engine, SharedStore, SEED_BYTES, SEED_KEY};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use abuse_engine::wire::{EVENTS_PATH, SECRET_HEADER, VERDICTS_PATH, WARM_PATH};
use proxy_wasm::types::{BufferType, ContextType, MapType};
use std::rc::Rc;
use std::time::Duration;

/// Stats reach Envoy at most this long after the request.
const TICK: Duration = Duration::from_millis(500);

/// What a root-context callout was for.
#[derive(Debug, Clone, Copy)]
enum Call {
    FleetPoll,
    /// A tick batch carrying this many items, of which that many samples,
    /// and that many decision events (reporting that many dropped ones).
    Batch(u64, u64, u64, u64),
    WarmPage,
}

/// Callouts in flight from one root context, at most.
const MAX_CALLS: usize = 16;

#[derive(Default)]
pub struct AbuseFilterRoot {
    engine: Option<Rc<Engine>>,
    /// A fleet-verdict poll from this VM is in flight until then.
    fleet_poll_in_flight_until: u64,
    /// A batch from this VM is in flight until then (one at a time).
    batch_in_flight_until: u64,
    calls: Vec<(u32, Call)>,
}

impl Context for AbuseFilterRoot {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        let call = match self.calls.iter().position(|(t, _)| *t == token) {
            Some(i) => self.calls.swap_remove(i).1,
            None => return,
        };
        let Some(engine) = self.engine.clone() else {
            return;
        };
        let ok = num_headers > 0
            && matches!(crate::http::status_of(MapType::HttpCallResponseHeaders), Some(200..=299));
        let body = |limit: usize| {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size.min(limit)).ok().flatten()
        };
        let now = crate::http::now_ms();
        match call {
            Call::FleetPoll => {
                self.fleet_poll_in_flight_until = 0;
                // Bounded: one byte past the limit, so that a larger answer is refused, not cut.
                if let (true, Some(body)) = (ok, body(abuse_engine::wire::MAX_FLEET_BYTES + 1)) {
                    let applied = engine.apply_fleet_verdicts(&EnvoySharedData, &body, now);
                    metrics::bump(metrics::Counter::FleetVerdictsApplied, applied.verdicts as u64);
                    metrics::bump(metrics::Counter::LiftsApplied, applied.lifts as u64);
                }
            }
            Call::Batch(items, samples, decisions, decisions_dropped) => {
                self.batch_in_flight_until = 0;
                if ok {
                    metrics::bump(metrics::Counter::BatchesSent, 1);
                    metrics::bump(metrics::Counter::SamplesSent, samples);
                    metrics::bump(metrics::Counter::DecisionsSent, decisions);
                    // The sampled clients the model flags (a few KiB at most).
                    if let Some(body) = body(64 * 1024) {
                        let flagged = engine.apply_events_answer(&EnvoySharedData, &body, now);
                        metrics::bump(metrics::Counter::AnomalyFlags, flagged as u64);
                        // The fleet rules' keys the fleet put over.
                        let over = engine.apply_rule_keys(&EnvoySharedData, &body, now);
                        metrics::bump(metrics::Counter::RuleKeysApplied, over as u64);
                    }
                } else {
                    engine.batch_failed(items);
                    engine.decisions_failed(decisions, decisions_dropped);
                    metrics::bump(metrics::Counter::BatchItemsDropped, items);
                }
            }
            Call::WarmPage => {
                // A page is at most 64 shards of 1 KiB in base64, plus baselines.
                let applied = if ok { body(abuse_engine::wire::MAX_WARM_BYTES + 1).and_then(|b| engine.apply_warm(&EnvoySharedData, &b, now)) } else { None };
                if let Some((shards, done)) = applied {
                    metrics::bump(metrics::Counter::WarmShards, shards as u64);
                    if done {
                        log::info!("abuse_filter: warmed from the scorer");
                    } else {
                        // The next page at once (the lease was renewed by apply_warm).
                        self.warm(&engine, now);
                    }
                }
            }
        }
    }
}

impl AbuseFilterRoot {
    /// A root-context callout to the scorer, remembered by its token.
    fn call(&mut self, engine: &Engine, method: &str, path: &str, body: Option<&[u8]>, call: Call) -> bool {
        let Some(callouts) = engine.callouts() else {
            return false;
        };
        if self.calls.len() >= MAX_CALLS {
            return false;
        }
        let c = &callouts.config;
        let mut headers = vec![(":method", method), (":path", path), (":authority", c.authority.as_str())];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        if let Some(secret) = &callouts.secret {
            headers.push((SECRET_HEADER, secret.as_str()));
        }
        let timeout = Duration::from_millis(1000);
        match hostcalls::dispatch_http_call(&c.cluster, headers, body, vec![], timeout) {
            Ok(token) => {
                self.calls.push((token, call));
                true
            }
            Err(_) => false,
        }
    }

    /// Asks the scorer for blocks decided anywhere in the fleet since `cursor`.
    fn poll_fleet(&mut self, engine: &Engine, cursor: u64, now: u64) {
        let path = format!("{VERDICTS_PATH}?since={cursor}");
        if self.call(engine, "GET", &path, None, Call::FleetPoll) {
            metrics::bump(metrics::Counter::FleetPolls, 1);
            self.fleet_poll_in_flight_until = now.saturating_add(1500);
        }
    }

    /// Sends this worker's tick batch, if it has one and none is in flight.
    fn send_batch(&mut self, engine: &Engine, now: u64) {
        if self.batch_in_flight_until > now {
            return;
        }
        if let Some(batch) = engine.tick_batch(&EnvoySharedData, now) {
            let call = Call::Batch(batch.items, batch.samples, batch.decisions, batch.decisions_dropped);
            if self.call(engine, "POST", EVENTS_PATH, Some(&batch.body), call) {
                self.batch_in_flight_until = now.saturating_add(1500);
            } else {
                engine.batch_failed(batch.items);
                engine.decisions_failed(batch.decisions, batch.decisions_dropped);
                metrics::bump(metrics::Counter::BatchItemsDropped, batch.items);
            }
        }
        metrics::bump(metrics::Counter::DecisionsDropped, engine.decisions_lost());
    }

    /// Asks for the next warm-start page when this worker holds the lease.
    fn warm(&mut self, engine: &Engine, now: u64) {
        if let Some(from) = engine.claim_warm(&EnvoySharedData, now) {
            let path = format!("{WARM_PATH}?from={from}");
            self.call(engine, "GET", &path, None, Call::WarmPage);
        }
    }
}

impl RootContext for AbuseFilterRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match Config::from_json(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log::error!("abuse_filter: {e}");
                return false;
            }
        };
        let seed = match shared_seed(&EnvoySharedData) {
            Some(seed) => seed,
            None => {
                log::error!("abuse_filter: cannot read or create the hashing seed in shared data");
                return false;
            }
        };
        let engine = match Engine::new(&config, &seed) {
            Ok(e) => e,
            Err(e) => {
                log::error!("abuse_filter: {e}");
                return false;
            }
        };
        match engine.prepare_state(&EnvoySharedData, crate::http::now_ms()) {
            // One line per reload that changed a layout: what was carried over, what was dropped.
            Ok(report) => {
                if let Some(line) = report.summary() {
                    log::warn!("abuse_filter: state layout changed by this configuration: {line}");
                }
            }
            // Not fatal: shards are also created on first write.
            Err(e) => log::warn!("abuse_filter: creating shared-data shards failed: {e:?}"),
        }
        // The Envoy's name in decision events, and this worker's number in ids.
        let node_id = hostcalls::get_property(vec!["node", "id"]).ok().flatten();
        engine.start_decisions(&EnvoySharedData, node_id.as_deref().and_then(|b| std::str::from_utf8(b).ok()));
        metrics::define(engine.rule_names());
        metrics::shared_data_bytes(engine.state_bytes());
        metrics::baselines_learning(engine.baselines_learning(&EnvoySharedData));
        if hostcalls::set_tick_period(TICK).is_err() {
            log::warn!("abuse_filter: no tick; stats will not be flushed");
        }
        log::info!(
            "abuse_filter: configured, mode {:?}, {} client shards x {} slots, {} KiB of shared data",
            config.mode,
            engine.table().shard_count(),
            engine.table().layout().slots,
            engine.state_bytes() / 1024
        );
        self.engine = Some(Rc::new(engine));
        true
    }

    fn on_tick(&mut self) {
        if let Some(engine) = self.engine.clone() {
            let now = crate::http::now_ms();
            engine.on_tick(&EnvoySharedData, now);
            metrics::baselines_learning(engine.baselines_learning(&EnvoySharedData));
            metrics::login_under_attack(engine.login_under_attack(&EnvoySharedData, now));
            crate::waiters::resume_ready(&engine, now, None);
            crate::held::release_overdue(now);
            if self.fleet_poll_in_flight_until < now {
                if let Some(cursor) = engine.claim_fleet_poll(&EnvoySharedData, now) {
                    self.poll_fleet(&engine, cursor, now);
                }
            }
            self.warm(&engine, now);
            self.send_batch(&engine, now);
        }
        metrics::flush();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Bench build only: the VM entries so far, as a gauge (make bench).
        #[cfg(feature = "count-entries")]
        vm_entries::publish();
        Some(Box::new(AbuseFilterHttp::new(self.engine.clone(), _context_id)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The seed all worker VMs of this Envoy process hash with. The first VM to
/// configure (Envoy's main thread) draws it from WASI `random_get`; the
/// others read it. Re-reading after the write makes a racing pair agree.
fn shared_seed(store: &dyn SharedStore) -> Option<[u8; SEED_BYTES]> {
    let parse = |v: Option<Vec<u8>>| -> Option<[u8; SEED_BYTES]> { v?.try_into().ok() };
    let (value, cas) = store.get(SEED_KEY).ok()?;
    if let Some(seed) = parse(value) {
        return Some(seed);
    }
    let mut fresh = [0u8; SEED_BYTES];
    getrandom::fill(&mut fresh).ok()?;
    // A CAS failure means another VM won the race: use its seed.
    let _ = store.set(SEED_KEY, &fresh, cas);
    parse(store.get(SEED_KEY).ok()?.0)
}
