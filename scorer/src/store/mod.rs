//! Fleet state: what one scorer must know about the others' traffic.
//!
//! Envoy runs many proxies, each asking its nearest scorer; an attack spread
//! over them (one account tried from hundreds of addresses, one session
//! token used from many places) is only visible in aggregate. The
//! [`FleetStore`] trait holds those aggregates:
//!
//! * attempts per username, over a sliding 10-minute window (two
//!   10-minute buckets, the older weighted by how much of it still lies in
//!   the window — as the filter's rate windows do);
//! * distinct client addresses per session hash, over the last 10 minutes;
//! * blocked clients (until when), and the log of those block decisions
//!   with a monotonically increasing cursor, the last 10,000 kept, which the
//!   filters poll through `GET /v1/verdicts?since=N`;
//! * what a fresh Envoy warms from (`GET /v1/warm`), learned from the
//!   filters' tick batches (`POST /v1/events`): the known-accounts Bloom
//!   filter (1,024 shards of 1 KiB, bits only ever set) and the learned
//!   baselines, the warmest per name (see `known`). In Redis these expire
//!   [`WARM_TTL_MS`] after their last write; in memory they are bounded.
//!
//! [`memory::MemoryStore`] keeps them in this process (one scorer, or a
//! fallback); [`redis::RedisStore`] keeps them in Redis, shared by every
//! scorer. [`Fleet`] is what the service uses: with Redis it writes every
//! update to both, reads Redis, and when a Redis call fails answers from the
//! memory store — never an error to the caller — with a rate-limited
//! warning and the `store_fallbacks` counter. The warm-start reads answer
//! the union of Redis and the memory store, so bits and baselines learned
//! here during an outage are still handed out once Redis is back.

pub mod memory;
pub mod redis;

use crate::known::{merge_lists, merge_pages, ShardPage};
use abuse_engine::wire::{BaselineSnapshot, FleetLift, FleetVerdict, FleetVerdicts, ProfileUpdate};
use prometheus::{IntCounter, IntGauge};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Length of every fleet window.
pub const WINDOW_MS: u64 = 10 * 60 * 1000;
/// Block decisions kept for `GET /v1/verdicts`.
pub const VERDICT_LOG_CAP: usize = 10_000;
/// Most verdicts answered per poll; the cursor pages through the rest.
pub const VERDICTS_PAGE: usize = 1_000;
/// How long Redis keeps warm-start state (known accounts, baselines,
/// profiles) and the verdict log after their last write: state nobody
/// feeds any more goes away by itself.
pub const WARM_TTL_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// How long Redis keeps the verdict log and its cursor after the last
/// block (longer than any block lasts: `4 · ttl_s` ≤ 4 days).
pub const VERDICT_LOG_TTL_MS: u64 = 7 * 24 * 60 * 60 * 1000;
/// Addresses remembered per session: enough to see sharing (5), bounded.
pub const SESSION_ADDRESS_CAP: usize = 32;
/// How long a lift is handed out after it was logged (or until its quiet
/// period ends, if later): longer than a filter stays away from the poll
/// and still holds the penalty it lifts.
pub const LIFT_KEEP_MS: u64 = 24 * 60 * 60 * 1000;

/// Whether a lift logged at `logged_ms` is still handed out.
pub fn lift_live(logged_ms: u64, lift: &FleetLift, now_ms: u64) -> bool {
    logged_ms.saturating_add(LIFT_KEEP_MS) >= now_ms || lift.quiet_until_ms >= now_ms
}

/// One entry of the verdict log: a block, or an operator's lift (both
/// under one cursor, so a filter pages through them in order).
#[derive(Debug, Clone, PartialEq)]
pub enum LogEntry {
    Verdict(FleetVerdict),
    Lift { lift: FleetLift, logged_ms: u64 },
}

/// At most one "Redis failed" warning per this many ms (the rest are counted).
const WARN_EVERY_MS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Sliding-window estimate from two fixed buckets: the current one plus the
/// share of the previous one that still lies within the window.
pub fn sliding_estimate(current: u64, previous: u64, now_ms: u64) -> f64 {
    let elapsed = (now_ms % WINDOW_MS) as f64 / WINDOW_MS as f64;
    current as f64 + previous as f64 * (1.0 - elapsed)
}

/// Keys are made by the caller from what clients send; usernames arrive
/// already hashed (see `app`), so no store ever holds one in clear.
pub trait FleetStore: Send + Sync {
    /// Counts one attempt on `user`; the attempts in the window, this one included.
    fn username_attempt(
        &self,
        user: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<f64, StoreError>> + Send;
    /// Notes `client` using `session`; distinct addresses in the window.
    fn session_seen(
        &self,
        session: &str,
        client: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// The live block on `client`, if any.
    fn blocked(
        &self,
        client: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<Option<FleetVerdict>, StoreError>> + Send;
    /// Blocks `verdict.client` until `verdict.until_ms` and logs it; its cursor.
    fn record_verdict(
        &self,
        verdict: &FleetVerdict,
        now_ms: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Live verdicts logged after cursor `since` (at most [`VERDICTS_PAGE`]).
    /// A `since` ahead of the log (a store that was reset) reads as 0.
    fn verdicts_since(
        &self,
        since: u64,
        now_ms: u64,
    ) -> impl Future<Output = Result<FleetVerdicts, StoreError>> + Send;
    /// Logs an operator's lift (after every verdict so far); its cursor.
    fn record_lift(
        &self,
        lift: &FleetLift,
        now_ms: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Forgets the live blocks of `clients` and their verdicts in the log.
    fn forget(&self, clients: &[String]) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Sets each account's known-accounts bits (`known_accounts::bit_positions`);
    /// how many accounts were new (some bit of theirs was unset).
    fn add_known_accounts(
        &self,
        accounts: &[u64],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Up to `max` non-empty known-accounts shards with index ≥ `from`
    /// (see [`ShardPage`]).
    fn known_shards(
        &self,
        from: usize,
        max: usize,
    ) -> impl Future<Output = Result<ShardPage, StoreError>> + Send;
    /// Keeps per name the warmer baseline (`known::replaces`), at most
    /// `known::BASELINE_NAMES` names; how many were dropped for want of one.
    fn merge_baselines(
        &self,
        baselines: &[BaselineSnapshot],
        now_ms: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Every baseline kept.
    fn baselines(&self) -> impl Future<Output = Result<Vec<BaselineSnapshot>, StoreError>> + Send;
    /// Merges account profiles into the fleet's (`AccountProfile::merge`);
    /// how many changed.
    fn merge_profiles(
        &self,
        updates: &[ProfileUpdate],
        now_ms: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Page `k` of the most recent profiles (`profiles::page_of`), and
    /// whether another follows.
    fn profile_page(
        &self,
        k: usize,
    ) -> impl Future<Output = Result<(Vec<ProfileUpdate>, bool), StoreError>> + Send;
}

/// The store the service uses (see module doc).
pub enum Fleet {
    Memory(memory::MemoryStore),
    Redis(RedisFleet),
}

pub struct RedisFleet {
    redis: redis::RedisStore,
    local: memory::MemoryStore,
    errors: IntCounter,
    fallbacks: IntCounter,
    redis_up: IntGauge,
    redis_ok: AtomicBool,
    last_warn_ms: AtomicU64,
    suppressed: AtomicU64,
}

/// Counters the fleet reports into (see `metrics`).
pub struct FleetMetrics {
    pub errors: IntCounter,
    pub fallbacks: IntCounter,
    pub redis_up: IntGauge,
}

impl Fleet {
    pub fn memory() -> Fleet {
        Fleet::Memory(memory::MemoryStore::new())
    }

    pub fn redis(url: &str, metrics: FleetMetrics) -> Result<Fleet, StoreError> {
        let redis = redis::RedisStore::connect_lazy(url)?;
        metrics.redis_up.set(1);
        Ok(Fleet::Redis(RedisFleet {
            redis,
            local: memory::MemoryStore::new(),
            errors: metrics.errors,
            fallbacks: metrics.fallbacks,
            redis_up: metrics.redis_up,
            redis_ok: AtomicBool::new(true),
            last_warn_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Fleet::Memory(_) => "memory",
            Fleet::Redis(_) => "redis",
        }
    }

    /// Whether the last Redis call worked (false without Redis).
    pub fn redis_ok(&self) -> bool {
        match self {
            Fleet::Memory(_) => false,
            Fleet::Redis(r) => r.redis_ok.load(Ordering::Relaxed),
        }
    }

    /// Pings Redis (health checks); false without Redis.
    pub async fn check_redis(&self, now_ms: u64) -> bool {
        match self {
            Fleet::Memory(_) => false,
            Fleet::Redis(r) => match r.redis.ping().await {
                Ok(()) => {
                    r.succeeded();
                    true
                }
                Err(e) => {
                    r.failed("ping", &e, now_ms, false);
                    false
                }
            },
        }
    }

    pub async fn username_attempt(&self, user: &str, now_ms: u64) -> f64 {
        match self {
            Fleet::Memory(m) => m.attempt(user, now_ms),
            Fleet::Redis(r) => {
                let local = r.local.attempt(user, now_ms);
                r.or_local(
                    "username_attempt",
                    r.redis.username_attempt(user, now_ms).await,
                    local,
                    now_ms,
                )
            }
        }
    }

    pub async fn session_seen(&self, session: &str, client: &str, now_ms: u64) -> u64 {
        match self {
            Fleet::Memory(m) => m.session(session, client, now_ms),
            Fleet::Redis(r) => {
                let local = r.local.session(session, client, now_ms);
                r.or_local(
                    "session_seen",
                    r.redis.session_seen(session, client, now_ms).await,
                    local,
                    now_ms,
                )
            }
        }
    }

    pub async fn blocked(&self, client: &str, now_ms: u64) -> Option<FleetVerdict> {
        match self {
            Fleet::Memory(m) => m.block_of(client, now_ms),
            Fleet::Redis(r) => {
                // A block decided here during an outage lives only locally:
                // honour it even when Redis is back and does not know it.
                let local = r.local.block_of(client, now_ms);
                let remote = r.or_local(
                    "blocked",
                    r.redis.blocked(client, now_ms).await,
                    None,
                    now_ms,
                );
                remote.or(local)
            }
        }
    }

    pub async fn record_verdict(&self, verdict: &FleetVerdict, now_ms: u64) -> u64 {
        match self {
            Fleet::Memory(m) => m.push_verdict(verdict),
            Fleet::Redis(r) => {
                let local = r.local.push_verdict(verdict);
                r.or_local(
                    "record_verdict",
                    r.redis.record_verdict(verdict, now_ms).await,
                    local,
                    now_ms,
                )
            }
        }
    }

    pub async fn verdicts_since(&self, since: u64, now_ms: u64) -> FleetVerdicts {
        match self {
            Fleet::Memory(m) => m.verdicts_after(since, now_ms),
            Fleet::Redis(r) => match r.redis.verdicts_since(since, now_ms).await {
                Ok(v) => {
                    r.succeeded();
                    v
                }
                Err(e) => {
                    r.failed("verdicts_since", &e, now_ms, true);
                    r.local.verdicts_after(since, now_ms)
                }
            },
        }
    }
}

impl Fleet {
    /// Logs a lift for every filter to apply; its cursor.
    pub async fn record_lift(&self, lift: &FleetLift, now_ms: u64) -> u64 {
        match self {
            Fleet::Memory(m) => m.push_lift(lift, now_ms),
            Fleet::Redis(r) => {
                let local = r.local.push_lift(lift, now_ms);
                r.or_local("record_lift", r.redis.record_lift(lift, now_ms).await, local, now_ms)
            }
        }
    }

    /// Forgets the blocks of `clients` (an operator lifted them).
    pub async fn forget(&self, clients: &[String], now_ms: u64) {
        match self {
            Fleet::Memory(m) => m.forget_blocks(clients),
            Fleet::Redis(r) => {
                r.local.forget_blocks(clients);
                r.or_local("forget", r.redis.forget(clients).await, (), now_ms);
            }
        }
    }

    /// Redis's connection, for the operator's state (decisions, allow
    /// entries, audit) that lives beside the fleet's; None without Redis.
    pub fn redis_conn(&self) -> Option<::redis::aio::ConnectionManager> {
        match self {
            Fleet::Memory(_) => None,
            Fleet::Redis(r) => Some(r.redis.connection()),
        }
    }

    /// A Redis call's result, counted as the fleet's are: Some on success,
    /// None (a fallback, warned about at most every 10 s) on failure.
    pub fn redis_result<T>(&self, op: &'static str, result: Result<T, StoreError>, now_ms: u64) -> Option<T> {
        match self {
            Fleet::Memory(_) => None,
            Fleet::Redis(r) => match result {
                Ok(v) => {
                    r.succeeded();
                    Some(v)
                }
                Err(e) => {
                    r.failed(op, &e, now_ms, true);
                    None
                }
            },
        }
    }
}

impl Fleet {
    /// The in-process store: all of it, or Redis's mirror (snapshots).
    pub fn local(&self) -> &memory::MemoryStore {
        match self {
            Fleet::Memory(m) => m,
            Fleet::Redis(r) => &r.local,
        }
    }

    /// Sets the accounts' bits; how many were new.
    pub async fn add_known_accounts(&self, accounts: &[u64], now_ms: u64) -> u64 {
        match self {
            Fleet::Memory(m) => m.add_known(accounts),
            Fleet::Redis(r) => {
                let local = r.local.add_known(accounts);
                if accounts.is_empty() {
                    return local;
                }
                r.or_local(
                    "add_known_accounts",
                    r.redis.add_known_accounts(accounts).await,
                    local,
                    now_ms,
                )
            }
        }
    }

    pub async fn known_shards(&self, from: usize, max: usize, now_ms: u64) -> ShardPage {
        match self {
            Fleet::Memory(m) => m.known_page(from, max),
            Fleet::Redis(r) => {
                let local = r.local.known_page(from, max);
                match r.redis.known_shards(from, max).await {
                    Ok(remote) => {
                        r.succeeded();
                        merge_pages(remote, local, max)
                    }
                    Err(e) => {
                        r.failed("known_shards", &e, now_ms, true);
                        local
                    }
                }
            }
        }
    }

    /// Merges the baselines; how many were dropped for want of a name.
    pub async fn merge_baselines(&self, baselines: &[BaselineSnapshot], now_ms: u64) -> u64 {
        match self {
            Fleet::Memory(m) => m.merge_baseline_list(baselines, now_ms),
            Fleet::Redis(r) => {
                let local = r.local.merge_baseline_list(baselines, now_ms);
                if baselines.is_empty() {
                    return local;
                }
                r.or_local(
                    "merge_baselines",
                    r.redis.merge_baselines(baselines, now_ms).await,
                    local,
                    now_ms,
                )
            }
        }
    }

    /// Merges the profiles; how many changed, and how many new values the
    /// bound (`profiles::merge_bounded`) dropped — as the local mirror saw
    /// them (Redis applies the same bound).
    pub async fn merge_profiles(&self, updates: &[ProfileUpdate], now_ms: u64) -> (u64, u64) {
        match self {
            Fleet::Memory(m) => m.merge_profile_list(updates, now_ms),
            Fleet::Redis(r) => {
                let (local, dropped) = r.local.merge_profile_list(updates, now_ms);
                if updates.is_empty() {
                    return (local, dropped);
                }
                let changed = r.or_local(
                    "merge_profiles",
                    r.redis.merge_profiles(updates, now_ms).await,
                    local,
                    now_ms,
                );
                (changed, dropped)
            }
        }
    }

    /// Page `k` of the most recent profiles for a warm start.
    pub async fn profile_page(&self, k: usize, now_ms: u64) -> (Vec<ProfileUpdate>, bool) {
        match self {
            Fleet::Memory(m) => m.profiles_page(k),
            Fleet::Redis(r) => match r.redis.profile_page(k).await {
                Ok(page) => {
                    r.succeeded();
                    page
                }
                Err(e) => {
                    r.failed("profile_page", &e, now_ms, true);
                    r.local.profiles_page(k)
                }
            },
        }
    }

    pub async fn baselines(&self, now_ms: u64) -> Vec<BaselineSnapshot> {
        match self {
            Fleet::Memory(m) => m.baseline_list(),
            Fleet::Redis(r) => {
                let local = r.local.baseline_list();
                match r.redis.baselines().await {
                    Ok(remote) => {
                        r.succeeded();
                        merge_lists(remote, local)
                    }
                    Err(e) => {
                        r.failed("baselines", &e, now_ms, true);
                        local
                    }
                }
            }
        }
    }
}

impl RedisFleet {
    fn or_local<T>(
        &self,
        op: &'static str,
        remote: Result<T, StoreError>,
        local: T,
        now_ms: u64,
    ) -> T {
        match remote {
            Ok(v) => {
                self.succeeded();
                v
            }
            Err(e) => {
                self.failed(op, &e, now_ms, true);
                local
            }
        }
    }

    fn succeeded(&self) {
        if !self.redis_ok.swap(true, Ordering::Relaxed) {
            tracing::info!("redis answers again; fleet state is shared again");
            self.redis_up.set(1);
        }
    }

    /// Counts the failure and warns — at most once per `WARN_EVERY_MS`,
    /// since during an outage every request would otherwise log.
    fn failed(&self, op: &'static str, error: &StoreError, now_ms: u64, fell_back: bool) {
        self.errors.inc();
        if fell_back {
            self.fallbacks.inc();
        }
        self.redis_ok.store(false, Ordering::Relaxed);
        self.redis_up.set(0);
        let last = self.last_warn_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= WARN_EVERY_MS;
        if due
            && self
                .last_warn_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(
                op,
                %error,
                suppressed,
                "redis call failed; falling back to the local memory store (fleet state is local until redis answers)"
            );
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn fleet_metrics() -> FleetMetrics {
        FleetMetrics {
            errors: IntCounter::new("e", "e").unwrap(),
            fallbacks: IntCounter::new("f", "f").unwrap(),
            redis_up: IntGauge::new("u", "u").unwrap(),
        }
    }

    #[test]
    fn a_redis_that_is_down_from_the_start_means_memory_answers() {
        // A port nobody listens on: Redis "down" before the first call.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let metrics = fleet_metrics();
            let fallbacks = metrics.fallbacks.clone();
            let fleet = Fleet::redis(&format!("redis://127.0.0.1:{port}"), metrics).unwrap();
            let t = 1_700_000_000_000;
            assert_eq!(fleet.username_attempt("u", t).await, 1.0);
            assert_eq!(
                fleet.username_attempt("u", t + 1).await,
                2.0,
                "counted locally"
            );
            let v = FleetVerdict {
                client: "c".into(),
                reasons: vec![],
                until_ms: t + 60_000,
            };
            assert_eq!(fleet.record_verdict(&v, t).await, 1);
            assert_eq!(fleet.blocked("c", t).await, Some(v.clone()));
            assert_eq!(fleet.verdicts_since(0, t).await.verdicts, vec![v]);
            // The warm-start state too: written locally, read from there.
            assert_eq!(fleet.add_known_accounts(&[7, 7 + 1024], t).await, 2);
            let page = fleet.known_shards(0, 64, t).await;
            assert_eq!(page.shards.len(), 1);
            assert_eq!((page.shards[0].0, page.next), (7, None));
            let b = BaselineSnapshot {
                name: "login:/l".into(),
                samples: 5,
                ..BaselineSnapshot::default()
            };
            assert_eq!(fleet.merge_baselines(std::slice::from_ref(&b), t).await, 0);
            assert_eq!(fleet.baselines(t).await, vec![b]);
            assert!(!fleet.redis_ok());
            assert!(!fleet.check_redis(t).await);
            assert_eq!(fallbacks.get(), 9);
        });
    }
}
