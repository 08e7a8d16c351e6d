//! One filter configuration, shared by every worker (`Sync`): the engine,
//! its in-process store, the stats, the requests waiting on another
//! request's scorer callout, and the tick — a thread that wakes every
//! 500 ms and posts to Envoy's main thread through the config scheduler,
//! where the tick's work runs (merges, stats, scorer batches, fleet polls,
//! warm start), with its callouts made from the config.

use crate::abi::{self, ConfigEnvoyPtr, EnvoyBuffer, EnvoyHeader, ModuleBuffer, ModuleHeader};
use crate::host::log;
use crate::stats::Stats;
use crate::store::InProcessStore;
use abuse_engine::stats::Counter;
use abuse_engine::wire::{EVENTS_PATH, SECRET_HEADER, VERDICTS_PATH, WARM_PATH};
use abuse_engine::{Config, Engine, Exchange, SharedStore, Verdict, SEED_BYTES, SEED_KEY};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// The tick's period (as the wasm filter's).
pub const TICK: Duration = Duration::from_millis(500);

/// Requests waiting on another request's callout, at most.
const MAX_WAITERS: usize = 1024;

/// A raw pointer that crosses threads: Envoy's objects behind it are
/// thread-safe for the calls made on them (scheduler commits, metrics).
#[derive(Clone, Copy)]
pub struct SendPtr(pub *mut std::ffi::c_void);
// SAFETY: see the type's doc; the pointers are only used as the ABI allows.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub fn get(&self) -> *mut std::ffi::c_void {
        self.0
    }
}

/// A request waiting on another request's callout about the same client
/// (`scorer.concurrent: "wait"`): woken on its own worker through its
/// stream's scheduler once the answer is there or its deadline passed.
pub struct Waiter {
    pub stream: u64,
    pub scheduler: SendPtr,
    pub deadline_ms: u64,
    pub exchange: Exchange,
    /// The verdict it wakes up to (written before the wake-up is posted).
    pub slot: Arc<Mutex<Option<Verdict>>>,
}

#[derive(Debug, Clone, Copy)]
enum Call {
    FleetPoll,
    Batch(u64, u64, u64, u64),
    WarmPage,
}

#[derive(Default)]
struct TickState {
    fleet_poll_in_flight_until: u64,
    batch_in_flight_until: u64,
    calls: Vec<(u64, Call)>,
}

struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
    scheduler: SendPtr,
}

pub struct FilterConfig {
    pub engine: Engine,
    pub store: Arc<InProcessStore>,
    pub stats: Stats,
    envoy: SendPtr,
    waiters: Mutex<Vec<Waiter>>,
    pub breaker_open: AtomicBool,
    tick: Mutex<TickState>,
    ticker: Mutex<Option<Ticker>>,
}

/// One store per filter name for the life of the process, as Envoy keeps
/// a wasm `vm_id`'s shared data across reloads: a new configuration finds
/// the old one's state (and migrates it when the layout changed).
fn store_for(name: &str) -> Arc<InProcessStore> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InProcessStore>>>> = OnceLock::new();
    let stores = STORES.get_or_init(|| Mutex::new(HashMap::new()));
    match stores.lock() {
        Ok(mut map) => map.entry(name.to_string()).or_default().clone(),
        Err(_) => Arc::new(InProcessStore::default()),
    }
}

/// The seed every configuration of this filter name hashes with (drawn
/// once from the OS, kept in the store as the wasm filter keeps it in
/// shared data).
fn shared_seed(store: &dyn SharedStore) -> Option<[u8; SEED_BYTES]> {
    let parse = |v: Option<Vec<u8>>| -> Option<[u8; SEED_BYTES]> { v?.try_into().ok() };
    let (value, cas) = store.get(SEED_KEY).ok()?;
    if let Some(seed) = parse(value) {
        return Some(seed);
    }
    let mut fresh = [0u8; SEED_BYTES];
    getrandom::fill(&mut fresh).ok()?;
    let _ = store.set(SEED_KEY, &fresh, cas);
    parse(store.get(SEED_KEY).ok()?.0)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl FilterConfig {
    /// Validates and compiles the configuration (the same JSON and the same
    /// errors as the wasm filter's `on_configure`); Err is logged and makes
    /// Envoy refuse the filter configuration.
    pub fn new(envoy: ConfigEnvoyPtr, name: &str, json: &[u8]) -> Result<Arc<FilterConfig>, String> {
        let config = Config::from_json(json).map_err(|e| format!("abuse_filter: {e}"))?;
        let store = store_for(name);
        let seed = shared_seed(store.as_ref()).ok_or("abuse_filter: cannot create the hashing seed")?;
        let engine = Engine::new(&config, &seed).map_err(|e| format!("abuse_filter: {e}"))?;
        match engine.prepare_state(store.as_ref(), now_ms()) {
            Ok(report) => {
                if let Some(line) = report.summary() {
                    log(abi::LOG_WARN, &format!("abuse_filter: state layout changed by this configuration: {line}"));
                }
            }
            Err(e) => log(abi::LOG_WARN, &format!("abuse_filter: creating state shards failed: {e:?}")),
        }
        engine.start_decisions(store.as_ref(), None);
        // One engine serves every worker: sample the model's clients as the
        // wasm build's engine-per-worker does (called on the main thread).
        engine.sample_for_workers(unsafe { abi::envoy_dynamic_module_callback_get_concurrency() });
        let stats = Stats::define(envoy, engine.rule_names());
        log(
            abi::LOG_INFO,
            &format!(
                "abuse_filter: configured (dynamic module), mode {:?}, {} client shards x {} slots, {} KiB of state",
                config.mode,
                engine.table().shard_count(),
                engine.table().layout().slots,
                engine.state_bytes() / 1024
            ),
        );
        let cfg = Arc::new(FilterConfig {
            engine,
            store,
            stats,
            envoy: SendPtr(envoy),
            waiters: Mutex::new(Vec::new()),
            breaker_open: AtomicBool::new(false),
            tick: Mutex::new(TickState::default()),
            ticker: Mutex::new(None),
        });
        cfg.stats.gauge(envoy, "abuse_filter.shared_data.bytes", u64::try_from(cfg.engine.state_bytes()).unwrap_or(u64::MAX));
        // At once, as the wasm filter does in on_configure: until the first
        // tick the gauge would read 0 ("nothing learning") on a cold start.
        cfg.stats.gauge(envoy, "abuse_filter.baselines.learning", u64::from(cfg.engine.baselines_learning(cfg.store.as_ref())));
        cfg.start_ticker();
        Ok(cfg)
    }

    /// The tick thread: it only posts; the work runs on the main thread.
    fn start_ticker(&self) {
        // SAFETY: main thread, configuration time.
        let scheduler = SendPtr(unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.envoy.0) });
        if scheduler.0.is_null() {
            log(abi::LOG_WARN, "abuse_filter: no scheduler; stats will not be flushed");
            return;
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread_stop = stop.clone();
        let spawned = std::thread::Builder::new().name("abuse_filter_tick".into()).spawn(move || {
            let (lock, cv) = &*thread_stop;
            let Ok(mut stopped) = lock.lock() else { return };
            loop {
                match cv.wait_timeout(stopped, TICK) {
                    Ok((guard, _)) => stopped = guard,
                    Err(_) => return,
                }
                if *stopped {
                    return;
                }
                // SAFETY: the scheduler is deleted only after this thread was joined.
                unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler.get(), 0) };
            }
        });
        match spawned {
            Ok(thread) => {
                if let Ok(mut t) = self.ticker.lock() {
                    *t = Some(Ticker { stop, thread: Some(thread), scheduler });
                }
            }
            Err(_) => {
                // SAFETY: created above, never shared.
                unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler.0) };
                log(abi::LOG_WARN, "abuse_filter: no tick thread; stats will not be flushed");
            }
        }
    }

    /// Stops the tick thread and frees the scheduler (config destroyed, main thread).
    pub fn stop(&self) {
        let ticker = self.ticker.lock().ok().and_then(|mut t| t.take());
        if let Some(mut t) = ticker {
            let (lock, cv) = &*t.stop;
            if let Ok(mut stopped) = lock.lock() {
                *stopped = true;
            }
            cv.notify_all();
            if let Some(thread) = t.thread.take() {
                let _ = thread.join();
            }
            // SAFETY: the only committer (the thread) has ended.
            unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(t.scheduler.0) };
        }
    }

    /// Parks a waiting request; false when the list is full (it proceeds).
    pub fn park(&self, waiter: Waiter) -> bool {
        match self.waiters.lock() {
            Ok(mut list) if list.len() < MAX_WAITERS => {
                list.push(waiter);
                true
            }
            _ => false,
        }
    }

    /// Forgets a stream's waiter (stream destroyed); its scheduler may then be deleted.
    pub fn unpark(&self, stream: u64) {
        if let Ok(mut list) = self.waiters.lock() {
            list.retain(|w| w.stream != stream);
        }
    }

    /// Wakes the waiters whose answer is there or whose deadline passed
    /// (only those about `client_key`, when given): the verdict goes in the
    /// waiter's slot, the wake-up to its own worker.
    pub fn wake_ready(&self, now_ms: u64, client_key: Option<u64>) {
        let Ok(mut list) = self.waiters.lock() else { return };
        list.retain(|w| {
            let mine = client_key.is_none_or(|k| Engine::client_key_of(&w.exchange) == k);
            let verdict = if mine { self.engine.waiting_verdict(self.store.as_ref(), &w.exchange, w.deadline_ms, now_ms) } else { None };
            match verdict {
                Some(v) => {
                    if let Ok(mut slot) = w.slot.lock() {
                        *slot = Some(v);
                    }
                    // SAFETY: the stream deletes its scheduler only after
                    // `unpark`, which takes this same lock.
                    unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_commit(w.scheduler.0, 1) };
                    false
                }
                None => true,
            }
        });
    }

    fn waiting(&self) -> usize {
        self.waiters.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// The tick's work (main thread).
    pub fn on_tick(&self) {
        let engine = &self.engine;
        let store = self.store.as_ref();
        let now = now_ms();
        engine.on_tick(store, now);
        let envoy = self.envoy.0;
        self.stats.gauge(envoy, "abuse_filter.baselines.learning", u64::from(engine.baselines_learning(store)));
        self.stats.gauge(envoy, "abuse_filter.login.under_attack", u64::from(engine.login_under_attack(store, now)));
        self.stats.gauge(envoy, "abuse_filter.scorer.breaker_open", u64::from(self.breaker_open.load(Ordering::Relaxed)));
        self.stats.gauge(envoy, "abuse_filter.module.waiting", self.waiting() as u64);
        self.wake_ready(now, None);
        let poll_due = self.tick.lock().map(|t| t.fleet_poll_in_flight_until < now).unwrap_or(false);
        if poll_due {
            if let Some(cursor) = engine.claim_fleet_poll(store, now) {
                let path = format!("{VERDICTS_PATH}?since={cursor}");
                if self.call("GET", &path, None, Call::FleetPoll) {
                    self.stats.bump(Counter::FleetPolls, 1);
                    if let Ok(mut t) = self.tick.lock() {
                        t.fleet_poll_in_flight_until = now.saturating_add(1500);
                    }
                }
            }
        }
        self.warm(now);
        self.send_batch(now);
        self.stats.flush(envoy);
    }

    fn warm(&self, now: u64) {
        if let Some(from) = self.engine.claim_warm(self.store.as_ref(), now) {
            let path = format!("{WARM_PATH}?from={from}");
            self.call("GET", &path, None, Call::WarmPage);
        }
    }

    fn send_batch(&self, now: u64) {
        let engine = &self.engine;
        let in_flight = self.tick.lock().map(|t| t.batch_in_flight_until > now).unwrap_or(true);
        if !in_flight {
            if let Some(batch) = engine.tick_batch(self.store.as_ref(), now) {
                let call = Call::Batch(batch.items, batch.samples, batch.decisions, batch.decisions_dropped);
                if self.call("POST", EVENTS_PATH, Some(&batch.body), call) {
                    if let Ok(mut t) = self.tick.lock() {
                        t.batch_in_flight_until = now.saturating_add(1500);
                    }
                } else {
                    engine.batch_failed(batch.items);
                    engine.decisions_failed(batch.decisions, batch.decisions_dropped);
                    self.stats.bump(Counter::BatchItemsDropped, batch.items);
                }
            }
        }
        self.stats.bump(Counter::DecisionsDropped, engine.decisions_lost());
    }

    /// A callout from the configuration (main thread), remembered by its id.
    fn call(&self, method: &str, path: &str, body: Option<&[u8]>, call: Call) -> bool {
        let Some(callouts) = self.engine.callouts() else {
            return false;
        };
        let Ok(mut tick) = self.tick.lock() else { return false };
        if tick.calls.len() >= 16 {
            return false;
        }
        let c = &callouts.config;
        let mut headers: Vec<(&str, &[u8])> =
            vec![(":method", method.as_bytes()), (":path", path.as_bytes()), (":authority", c.authority.as_bytes())];
        if body.is_some() {
            headers.push(("content-type", b"application/json"));
        }
        if let Some(secret) = &callouts.secret {
            headers.push((SECRET_HEADER, secret.as_bytes()));
        }
        let mut raw: Vec<ModuleHeader> = headers.iter().map(|(k, v)| ModuleHeader::of(k, v)).collect();
        let mut id = 0u64;
        // SAFETY: main thread; everything lives for the call.
        let result = unsafe {
            abi::envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.envoy.0,
                &mut id,
                ModuleBuffer::of(c.cluster.as_bytes()),
                raw.as_mut_ptr(),
                raw.len(),
                body.map(ModuleBuffer::of).unwrap_or(ModuleBuffer::NULL),
                1000,
            )
        };
        if result == abi::CALLOUT_INIT_SUCCESS {
            tick.calls.push((id, call));
            true
        } else {
            false
        }
    }

    /// A configuration callout's answer (main thread).
    ///
    /// # Safety
    /// The arrays must be those Envoy handed to the callout hook.
    pub unsafe fn on_callout_done(
        &self,
        id: u64,
        result: u32,
        headers: *const EnvoyHeader,
        headers_len: usize,
        chunks: *const EnvoyBuffer,
        chunks_len: usize,
    ) {
        let call = {
            let Ok(mut tick) = self.tick.lock() else { return };
            match tick.calls.iter().position(|(i, _)| *i == id) {
                Some(i) => tick.calls.swap_remove(i).1,
                None => return,
            }
        };
        let limit = match call {
            Call::FleetPoll => abuse_engine::wire::MAX_FLEET_BYTES,
            Call::Batch(..) => 64 * 1024,
            Call::WarmPage => abuse_engine::wire::MAX_WARM_BYTES,
        };
        let (status, body) = crate::host::callout_answer(result, headers, headers_len, chunks, chunks_len, limit);
        let ok = matches!(status, Some(200..=299));
        if !ok {
            log(abi::LOG_DEBUG, &format!("abuse_filter: scorer callout {call:?} failed: result {result}, status {status:?}, {} bytes", body.len()));
        }
        let engine = &self.engine;
        let store = self.store.as_ref();
        let now = now_ms();
        match call {
            Call::FleetPoll => {
                if let Ok(mut t) = self.tick.lock() {
                    t.fleet_poll_in_flight_until = 0;
                }
                if ok {
                    let applied = engine.apply_fleet_verdicts(store, &body, now);
                    self.stats.bump(Counter::FleetVerdictsApplied, applied.verdicts as u64);
                    self.stats.bump(Counter::LiftsApplied, applied.lifts as u64);
                }
            }
            Call::Batch(items, samples, decisions, dropped) => {
                if let Ok(mut t) = self.tick.lock() {
                    t.batch_in_flight_until = 0;
                }
                if ok {
                    self.stats.bump(Counter::BatchesSent, 1);
                    self.stats.bump(Counter::SamplesSent, samples);
                    self.stats.bump(Counter::DecisionsSent, decisions);
                    let flagged = engine.apply_events_answer(store, &body, now);
                    self.stats.bump(Counter::AnomalyFlags, flagged as u64);
                    let over = engine.apply_rule_keys(store, &body, now);
                    self.stats.bump(Counter::RuleKeysApplied, over as u64);
                } else {
                    engine.batch_failed(items);
                    engine.decisions_failed(decisions, dropped);
                    self.stats.bump(Counter::BatchItemsDropped, items);
                }
            }
            Call::WarmPage => {
                let applied = if ok { engine.apply_warm(store, &body, now) } else { None };
                if let Some((shards, done)) = applied {
                    self.stats.bump(Counter::WarmShards, shards as u64);
                    if done {
                        log(abi::LOG_INFO, "abuse_filter: warmed from the scorer");
                    } else {
                        self.warm(now);
                    }
                }
            }
        }
    }
}
