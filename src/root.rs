//! The root context: validates the configuration (refusing a bad one with a
//! log line naming the key), shares the hashing seed between worker VMs,
//! creates the shard keys, and flushes stats on each tick.

use crate::http::AbuseFilterHttp;
use crate::metrics;
use crate::shared_data::EnvoySharedData;
use abuse_engine::{Config, Engine, SharedStore, SEED_BYTES, SEED_KEY};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use abuse_engine::wire::{SECRET_HEADER, VERDICTS_PATH};
use proxy_wasm::types::{BufferType, ContextType, MapType};
use std::rc::Rc;
use std::time::Duration;

/// Stats reach Envoy at most this long after the request.
const TICK: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct AbuseFilterRoot {
    engine: Option<Rc<Engine>>,
    /// A fleet-verdict poll from this VM is in flight until then.
    fleet_poll_in_flight_until: u64,
}

impl Context for AbuseFilterRoot {
    fn on_http_call_response(&mut self, _token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        self.fleet_poll_in_flight_until = 0;
        let Some(engine) = self.engine.clone() else {
            return;
        };
        let ok = num_headers > 0 && crate::http::status_of(MapType::HttpCallResponseHeaders) == Some(200);
        if !ok {
            return;
        }
        // Bounded: at most 1 MiB of verdicts per poll.
        if let Ok(Some(body)) = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size.min(1 << 20)) {
            let applied = engine.apply_fleet_verdicts(&EnvoySharedData, &body, crate::http::now_ms());
            metrics::bump(metrics::Counter::FleetVerdictsApplied, applied as u64);
        }
    }
}

impl AbuseFilterRoot {
    /// Asks the scorer for blocks decided anywhere in the fleet since `cursor`.
    fn poll_fleet(&mut self, engine: &Engine, cursor: u64, now: u64) {
        let Some(callouts) = engine.callouts() else {
            return;
        };
        let c = &callouts.config;
        let path = format!("{VERDICTS_PATH}?since={cursor}");
        let mut headers = vec![(":method", "GET"), (":path", path.as_str()), (":authority", c.authority.as_str())];
        if let Some(secret) = &callouts.secret {
            headers.push((SECRET_HEADER, secret.as_str()));
        }
        let timeout = Duration::from_millis(1000);
        if hostcalls::dispatch_http_call(&c.cluster, headers, None, vec![], timeout).is_ok() {
            metrics::bump(metrics::Counter::FleetPolls, 1);
            self.fleet_poll_in_flight_until = now.saturating_add(1500);
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
        if let Err(e) = engine.create_state(&EnvoySharedData) {
            // Not fatal: shards are also created on first write.
            log::warn!("abuse_filter: creating shared-data shards failed: {e:?}");
        }
        metrics::define();
        metrics::shared_data_bytes(engine.state_bytes());
        metrics::baselines_learning(engine.baselines_learning());
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
            metrics::baselines_learning(engine.baselines_learning());
            crate::waiters::resume_ready(&engine, now, None);
            if self.fleet_poll_in_flight_until < now {
                if let Some(cursor) = engine.claim_fleet_poll(&EnvoySharedData, now) {
                    self.poll_fleet(&engine, cursor, now);
                }
            }
        }
        metrics::flush();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
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
