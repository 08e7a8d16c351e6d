//! The decision for one request: identify the client, enforce its penalty
//! box, run the detectors against its record, update its risk, decide.
//! All of it in one read-modify-write of the client's shard.

use crate::config::{Config, ConfigError, Mode};
use crate::detectors::rate::RequestRate;
use crate::detectors::Signal;
use crate::hash::{KeyedHasher, SEED_BYTES};
use crate::identity::{ClientIdentity, IdentityInput, IdentityPolicy};
use crate::reason::ReasonSet;
use crate::record::{ClientRecord, RECORD_FORMAT};
use crate::risk;
use crate::routes::{RouteMatch, RouteTable};
use crate::shard::ShardLayout;
use crate::store::{ClientTable, SharedStore};
use crate::verdict::{Action, Verdict};

/// Prefix of every shared-data key this filter owns.
pub const STATE_PREFIX: &str = "abuse_filter/v1";
/// Shared-data key of the per-process hashing seed.
pub const SEED_KEY: &str = "abuse_filter/v1/seed";

/// Hash domain of client address keys.
const DOMAIN_CLIENT: u8 = 1;

/// What the host read from the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestFacts<'a> {
    pub identity: IdentityInput<'a>,
    pub method: &'a str,
    pub path: &'a str,
}

/// Outcome of the read-modify-write on the client's record.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Penalized { reasons: ReasonSet, until_ms: u64, risk: f32 },
    Scored { risk: f32, fired: ReasonSet, blocked_until_ms: Option<u64> },
}

#[derive(Debug, Clone)]
pub struct Engine {
    config: Config,
    identity: IdentityPolicy,
    routes: RouteTable,
    rate: Option<RequestRate>,
    table: ClientTable,
    hasher: KeyedHasher,
    half_life_ms: u64,
    penalty_ms: u64,
}

impl Engine {
    /// Compiles a validated configuration. `seed` must be the same in every
    /// worker VM of the process (it lives in shared data).
    pub fn new(config: &Config, seed: &[u8; SEED_BYTES]) -> Result<Engine, ConfigError> {
        config.validate()?;
        let identity = IdentityPolicy::new(&config.client)?;
        let routes = RouteTable::new(&config.route_groups);
        let rate = RequestRate::new(&config.rate, &routes);
        let hasher = KeyedHasher::from_seed(seed);
        let layout_tag = format!(
            "format={RECORD_FORMAT};rate={}",
            rate.as_ref().map(RequestRate::layout_tag).unwrap_or_default()
        );
        // Truncation to 32 bits is fine: it only has to differ when layouts do.
        let fingerprint = (hasher.key(0, layout_tag.as_bytes()) & 0xffff_ffff) as u32;
        let layout = ShardLayout {
            slots: usize::try_from(config.state.slots_per_shard).unwrap_or(32),
            fingerprint,
        };
        let shards = usize::try_from(config.state.shards).unwrap_or(1);
        Ok(Engine {
            config: config.clone(),
            identity,
            routes,
            rate,
            table: ClientTable::new(STATE_PREFIX, shards, layout),
            hasher,
            half_life_ms: u64::from(config.risk.half_life_s).saturating_mul(1000),
            penalty_ms: u64::from(config.penalty.duration_s).saturating_mul(1000),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn identity_policy(&self) -> &IdentityPolicy {
        &self.identity
    }

    pub fn table(&self) -> &ClientTable {
        &self.table
    }

    pub fn identify(&self, input: &IdentityInput<'_>) -> ClientIdentity {
        self.identity.identify(input)
    }

    pub fn on_request(&self, store: &dyn SharedStore, facts: &RequestFacts<'_>, now_ms: u64) -> Verdict {
        let client = self
            .identity
            .client_addr(facts.identity.peer, facts.identity.forwarded_for);
        let key = self.hasher.key(DOMAIN_CLIENT, &client.key_bytes());
        let routes = self.routes.matches(facts.method, facts.path);
        let updated = self
            .table
            .update(store, key, now_ms, |record| self.decide(record, routes, now_ms));
        let (outcome, stats) = match updated {
            Ok(done) => done,
            Err(failed) => {
                // Fail open: losing a count is better than blocking a user.
                let mut v = Verdict::allow(client);
                v.store = failed.stats;
                v.store_failed = true;
                return v;
            }
        };
        let mut v = Verdict::allow(client);
        v.store = stats;
        let blocked = match outcome {
            Outcome::Penalized { reasons, until_ms, risk } => {
                v.penalized = true;
                v.reasons = reasons;
                v.risk = risk;
                Some(until_ms)
            }
            Outcome::Scored { risk, fired, blocked_until_ms } => {
                v.fired = fired;
                v.reasons = fired;
                v.risk = risk;
                v.newly_blocked = blocked_until_ms.is_some();
                if risk >= self.config.risk.tag_at {
                    v.action = Action::Tag;
                }
                blocked_until_ms
            }
        };
        if let Some(until_ms) = blocked {
            v.would_block = true;
            v.status = v.reasons.block_status();
            v.retry_after_s = until_ms.saturating_sub(now_ms).div_ceil(1000).max(1);
            v.action = match self.config.mode {
                Mode::Block => Action::Block,
                Mode::Monitor => Action::Tag,
            };
        }
        v
    }

    /// The pure decision on one record; may run several times (CAS retries).
    fn decide(&self, record: &mut ClientRecord, routes: RouteMatch, now_ms: u64) -> (Outcome, bool) {
        if record.penalized_at(now_ms) {
            // Penalty box first: no counting, no detectors, no write.
            let risk = risk::decayed(record.risk, record.last_seen_ms, now_ms, self.half_life_ms);
            let outcome = Outcome::Penalized {
                reasons: record.penalty_reasons,
                until_ms: record.penalty_until_ms,
                risk,
            };
            return (outcome, false);
        }
        let mut signal = Signal::default();
        if let Some(rate) = &self.rate {
            let s = rate.observe(routes, record, now_ms);
            signal.risk += s.risk;
            signal.reasons = signal.reasons.union(s.reasons);
        }
        let risk = risk::add(
            risk::decayed(record.risk, record.last_seen_ms, now_ms, self.half_life_ms),
            signal.risk,
        );
        record.risk = risk;
        record.last_seen_ms = now_ms;
        let mut blocked_until_ms = None;
        if risk >= self.config.risk.block_at && !signal.reasons.is_empty() {
            let until = now_ms.saturating_add(self.penalty_ms);
            record.penalty_until_ms = until;
            record.penalty_reasons = signal.reasons;
            blocked_until_ms = Some(until);
        }
        let outcome = Outcome::Scored {
            risk,
            fired: signal.reasons,
            blocked_until_ms,
        };
        (outcome, true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use std::sync::Arc;

    const T0: u64 = 1_700_000_000_000;

    fn engine(json: &str) -> Engine {
        Engine::new(&Config::from_json(json.as_bytes()).unwrap(), &[7; SEED_BYTES]).unwrap()
    }

    fn request<'a>(peer: &'a str, xff: Option<&'a str>, path: &'a str) -> RequestFacts<'a> {
        RequestFacts {
            identity: IdentityInput {
                peer: Some(peer.as_bytes()),
                forwarded_for: xff.map(str::as_bytes),
                ..IdentityInput::default()
            },
            method: "GET",
            path,
        }
    }

    const BLOCK: &str = r#"{"mode":"block",
        "client":{"trusted_proxies":["127.0.0.1"]},
        "route_groups":[{"name":"api","path_prefix":"/api/"}],
        "rate":{"limits":[{"route_group":"api","requests":5,"window_s":10}]},
        "penalty":{"duration_s":30},
        "state":{"shards":4,"slots_per_shard":16}}"#;

    #[test]
    fn over_the_limit_blocks_then_penalty_holds_then_expires() {
        let (e, s) = (engine(BLOCK), MemoryStore::new());
        e.table().create_shards(&s).unwrap();
        let r = request("192.0.2.1:5", None, "/api/x");
        for i in 0..5 {
            let v = e.on_request(&s, &r, T0 + i);
            assert_eq!(v.action, Action::Allow, "request {i}");
        }
        let v = e.on_request(&s, &r, T0 + 10);
        assert_eq!((v.action, v.status, v.newly_blocked), (Action::Block, 429, true));
        assert_eq!(v.retry_after_s, 30);
        assert_eq!(v.reasons_header(), "rate_limit");
        // Still blocked 29 s later, from the penalty box, without detectors.
        let v = e.on_request(&s, &r, T0 + 29_500);
        assert_eq!((v.action, v.penalized, v.newly_blocked), (Action::Block, true, false));
        assert_eq!(v.retry_after_s, 1);
        // After the penalty the window has moved on.
        let v = e.on_request(&s, &r, T0 + 31_000);
        assert_eq!(v.action, Action::Tag, "risk still above tag_at: {}", v.risk);
        assert!(!v.would_block);
        // Other routes never counted.
        let v = e.on_request(&s, &request("192.0.2.9:5", None, "/health"), T0);
        assert_eq!(v.action, Action::Allow);
    }

    #[test]
    fn other_clients_are_unaffected() {
        let (e, s) = (engine(BLOCK), MemoryStore::new());
        e.table().create_shards(&s).unwrap();
        for i in 0..20 {
            e.on_request(&s, &request("127.0.0.1:1", Some("198.51.100.1"), "/api/x"), T0 + i);
        }
        let v = e.on_request(&s, &request("127.0.0.1:1", Some("198.51.100.2"), "/api/x"), T0 + 30);
        assert_eq!(v.action, Action::Allow);
        // The proxy itself is not the client.
        let v = e.on_request(&s, &request("127.0.0.1:1", None, "/api/x"), T0 + 30);
        assert_eq!(v.action, Action::Allow);
    }

    #[test]
    fn monitor_mode_never_blocks_but_says_so() {
        let json = BLOCK.replace(r#""mode":"block""#, r#""mode":"monitor""#);
        let (e, s) = (engine(&json), MemoryStore::new());
        e.table().create_shards(&s).unwrap();
        let r = request("192.0.2.1:5", None, "/api/x");
        let verdicts: Vec<Verdict> = (0..20).map(|i| e.on_request(&s, &r, T0 + i)).collect();
        assert!(verdicts.iter().all(|v| v.action != Action::Block));
        assert_eq!(verdicts.iter().filter(|v| v.would_block).count(), 15);
        assert_eq!(verdicts.iter().filter(|v| v.newly_blocked).count(), 1);
    }

    #[test]
    fn counts_are_exact_across_concurrent_workers() {
        let json = BLOCK.replace(r#""requests":5"#, r#""requests":400"#);
        let e = Arc::new(engine(&json));
        let s = Arc::new(MemoryStore::new());
        e.table().create_shards(&*s).unwrap();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (e, s) = (e.clone(), s.clone());
                std::thread::spawn(move || {
                    let verdicts: Vec<Verdict> = (0..200)
                        .map(|_| e.on_request(&*s, &request("192.0.2.1:5", None, "/api/x"), T0))
                        .collect();
                    let blocked = verdicts.iter().filter(|v| v.action == Action::Block).count();
                    let gave_up = verdicts.iter().filter(|v| v.store_failed).count();
                    (blocked, gave_up)
                })
            })
            .collect();
        let (blocked, gave_up) = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .fold((0, 0), |acc, x| (acc.0 + x.0, acc.1 + x.1));
        assert_eq!(blocked, 0);
        // Updates that gave up (failed open) were not counted: exactly that
        // many more fit under the limit, and not one more.
        let r = request("192.0.2.1:5", None, "/api/x");
        for _ in 0..gave_up {
            assert_eq!(e.on_request(&*s, &r, T0).action, Action::Allow);
        }
        let v = e.on_request(&*s, &r, T0);
        assert_eq!(v.action, Action::Block, "the 401st request is over");
    }

    #[test]
    fn store_failure_fails_open() {
        let (e, s) = (engine(BLOCK), MemoryStore::new());
        e.table().create_shards(&s).unwrap();
        *s.forced_conflicts.lock().unwrap() = 10_000;
        let v = e.on_request(&s, &request("192.0.2.1:5", None, "/api/x"), T0);
        assert!(v.store_failed);
        assert_eq!(v.action, Action::Allow);
    }

    #[test]
    fn reload_with_other_limits_starts_clean() {
        let s = MemoryStore::new();
        let e1 = engine(BLOCK);
        e1.table().create_shards(&s).unwrap();
        for i in 0..6 {
            e1.on_request(&s, &request("192.0.2.1:5", None, "/api/x"), T0 + i);
        }
        let other = BLOCK.replace(r#""window_s":10"#, r#""window_s":20"#);
        let e2 = engine(&other);
        let v = e2.on_request(&s, &request("192.0.2.1:5", None, "/api/x"), T0 + 100);
        assert!(!v.penalized, "state of another layout was read");
        // Same config again: state is kept.
        let e3 = engine(BLOCK);
        e3.table().create_shards(&s).unwrap();
        let v = e3.on_request(&s, &request("192.0.2.7:5", None, "/api/x"), T0 + 100);
        assert!(!v.penalized);
    }
}
