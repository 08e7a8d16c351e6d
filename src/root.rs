//! The root context: validates the configuration (refusing a bad one with a
//! log line naming the key), shares the hashing seed between worker VMs,
//! creates the shard keys, and flushes stats on each tick.

use crate::http::AbuseFilterHttp;
use crate::metrics;
use crate::shared_data::EnvoySharedData;
use abuse_engine::{Config, Engine, SharedStore, SEED_BYTES, SEED_KEY};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};
use std::rc::Rc;
use std::time::Duration;

/// Stats reach Envoy at most this long after the request.
const TICK: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct AbuseFilterRoot {
    engine: Option<Rc<Engine>>,
}

impl Context for AbuseFilterRoot {}

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
        if let Some(engine) = &self.engine {
            engine.on_tick(&EnvoySharedData, crate::http::now_ms());
        }
        metrics::flush();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AbuseFilterHttp::new(self.engine.clone())))
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
