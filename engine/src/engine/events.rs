//! The tick-batch channel to the scorer, and the warm start from it.
//!
//! **Batches.** Requests never talk to the scorer for this: a success that
//! teaches the known accounts a new account queues its fleet key in a
//! bounded per-worker buffer ([`PENDING_CAP`]; beyond it keys are dropped
//! and counted), and each worker's tick sends at most one
//! [`EventBatch`] — the queued keys (≤ `MAX_BATCH_ACCOUNTS`) and, every
//! [`BASELINE_EVERY_MS`], the learned baselines by fleet-stable names
//! (`login:<path>`, `group:<name>`). A batch the scorer does not take is
//! dropped and counted, never retried: the next success of an account
//! queues it again, and baselines are resent anyway.
//!
//! **Samples.** Every batch also carries the last finished window's
//! uniform sample of this worker's clients ([`sample`]): their feature
//! summaries, route group and whether they were penalized. The scorer's
//! model learns normal from them and answers ([`EventsAnswer`]) with the
//! sampled clients it finds anomalous, which this Envoy then tags
//! ([`Engine::apply_events_answer`]).
//!
//! **Warm start.** One worker per Envoy process takes a lease in shared
//! data and pages through [`WarmState`]: known-accounts shards are OR-ed
//! into the local ones, and a baseline replaces the local one when it has
//! more samples (a restarted Envoy starts where the fleet was, not from a
//! cold prior an attack could drag). Failed pages are retried after the
//! lease ([`WARM_LEASE_MS`]) up to [`WARM_ATTEMPTS`] times, then the filter
//! carries on cold and says so (`abuse_filter.baselines.learning`).

use super::{Engine, DOMAIN_ROUTE, STATE_PREFIX};
use crate::codec::{Reader, Writer};
use crate::state::store::SharedStore;
use super::sample::{self, Observation, Reservoir};
use crate::record::ClientRecord;
use crate::routes::RouteMatch;
use crate::verdict::Verdict;
use crate::wire::{
    BaselineSnapshot, EventBatch, EventsAnswer, ProfileUpdate, WarmState, MAX_BASELINES, MAX_BATCH_ACCOUNTS,
    MAX_BATCH_BYTES, MAX_BATCH_PROFILES, WIRE_VERSION,
};
use crate::profile::AccountProfile;
use base64::Engine as _;

/// Account keys a worker holds for its next batch, at most.
pub const PENDING_CAP: usize = 4 * MAX_BATCH_ACCOUNTS;
/// Changed profiles a worker holds for its next batches, at most.
pub const PROFILES_CAP: usize = 4 * MAX_BATCH_PROFILES;
/// Baselines ride along this often.
pub const BASELINE_EVERY_MS: u64 = 10_000;
/// A warm-start page may take this long before another worker may retry.
pub const WARM_LEASE_MS: u64 = 3_000;
/// Pages that fail (or time out) before the filter gives up warming.
pub const WARM_ATTEMPTS: u32 = 10;
/// Shared-data key of the warm-start state: `[phase u8][attempts u32][next u32][lease_until u64]`.
pub const WARM_KEY: &str = "abuse_filter/v1/warm";

const PHASE_TODO: u8 = 0;
const PHASE_DONE: u8 = 2;

/// NaN or infinite would not survive JSON (it becomes null): send 0.
fn finite(v: f32) -> f32 {
    if v.is_finite() { v.max(0.0) } else { 0.0 }
}

/// One tick's batch for the scorer, and what it carries (for stats).
#[derive(Debug, Clone, PartialEq)]
pub struct TickBatch {
    pub body: Vec<u8>,
    /// Known accounts, baselines, profiles and samples (what `batch_failed` counts).
    pub items: u64,
    pub samples: u64,
    pub decisions: u64,
    /// Decisions dropped before this batch (buffer full, failed batches).
    pub decisions_dropped: u64,
}

/// What one worker keeps for its next batch.
#[derive(Debug, Default)]
pub struct Outbox {
    accounts: Vec<u64>,
    profiles: Vec<ProfileUpdate>,
    dropped: u64,
    baselines_sent_ms: u64,
    samples: Reservoir,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WarmLease {
    phase: u8,
    attempts: u32,
    next: u32,
    until_ms: u64,
}

impl WarmLease {
    fn decode(value: Option<&[u8]>) -> WarmLease {
        let bytes = value.unwrap_or(&[]);
        let mut r = Reader::new(bytes);
        let phase = r.take::<1>()[0];
        WarmLease { phase, attempts: r.u32(), next: r.u32(), until_ms: r.u64() }
    }

    fn encode(&self) -> [u8; 17] {
        let mut out = [0u8; 17];
        out[0] = self.phase;
        let mut w = Writer::new(&mut out[1..]);
        w.u32(self.attempts);
        w.u32(self.next);
        w.u64(self.until_ms);
        out
    }
}

impl Engine {
    /// Whether decision events (and the rest of the tick batch) go to the scorer.
    pub fn events_enabled(&self) -> bool {
        self.events_on()
    }

    pub(super) fn events_on(&self) -> bool {
        self.callouts.as_ref().is_some_and(|c| c.config.events)
    }

    /// Queues a newly known account for the next batch (never blocks a request).
    pub(super) fn queue_known_account(&self, key: u64) {
        if !self.events_on() {
            return;
        }
        if let Ok(mut out) = self.outbox.lock() {
            if out.accounts.len() < PENDING_CAP {
                out.accounts.push(key);
            } else {
                out.dropped = out.dropped.saturating_add(1);
            }
        }
    }

    /// An account's profile after a successful login, for the fleet (the
    /// latest per account in the batch).
    pub(super) fn queue_profile(&self, key: u64, profile: AccountProfile) {
        if !self.events_on() {
            return;
        }
        if let Ok(mut out) = self.outbox.lock() {
            if let Some(p) = out.profiles.iter_mut().find(|p| p.account == key) {
                p.profile = profile;
            } else if out.profiles.len() < PROFILES_CAP {
                out.profiles.push(ProfileUpdate { account: key, profile });
            } else {
                out.dropped = out.dropped.saturating_add(1);
            }
        }
    }

    /// Offers this request's client to the window's sample (see [`sample`]);
    /// `record` is the client's record after this request (None when the
    /// request was refused before counting).
    pub(super) fn sample_client(
        &self,
        key: u64,
        verdict: &Verdict,
        record: Option<&ClientRecord>,
        routes: RouteMatch,
        anonymous: bool,
        now_ms: u64,
    ) {
        if !self.events_on() || verdict.exempt || verdict.store_failed {
            return;
        }
        let penalized = verdict.would_block || verdict.penalized;
        if let Ok(mut out) = self.outbox.lock() {
            out.samples.offer(key, penalized, now_ms, || {
                let r = record?;
                Some(Observation {
                    client: crate::identity::verdict_label(verdict.client, verdict.agent, verdict.pool),
                    group: (0..self.config.route_groups.len()).find(|g| routes.contains(*g)),
                    features: self.features_of(r, verdict.risk, anonymous, now_ms).to_vector(),
                })
            });
        }
    }

    /// The scorer's answer to a batch: the sampled clients its model flags
    /// are tagged here — their risk raised to `risk.tag_at` with reason
    /// `anomaly`, enough to stay tagged until the flag's `until_ms` as it
    /// decays (never `block_at`: tag only, the model alone never blocks).
    /// Returns how many were applied.
    pub fn apply_events_answer(&self, store: &dyn SharedStore, body: &[u8], now_ms: u64) -> usize {
        let Ok(answer) = serde_json::from_slice::<EventsAnswer>(body) else {
            return 0;
        };
        let tag_at = self.config.risk.tag_at;
        let mut applied = 0;
        for flag in answer.flags.iter().take(crate::wire::MAX_BATCH_SAMPLES) {
            if flag.until_ms <= now_ms {
                continue;
            }
            let Some(key) = self.key_of_label(&flag.client) else {
                continue;
            };
            let done = self.clients.update(store, key, now_ms, |r| {
                if r.is_empty() || r.first_seen_ms == 0 {
                    // Never seen here: nothing to tag (and no slot taken).
                    return (false, false);
                }
                // Enough risk to stay at tag_at, decaying, until the flag ends;
                // never block_at (tag only).
                let risk = crate::risk::decayed(r.risk, r.last_seen_ms, now_ms, self.half_life_ms);
                let lasting = tag_at * (flag.until_ms.saturating_sub(now_ms) as f32 / self.half_life_ms.max(1) as f32).exp2();
                let ceiling = (self.config.risk.block_at - 0.01).max(risk);
                r.risk = risk.max(lasting.min(ceiling));
                r.last_seen_ms = now_ms;
                r.recent_reasons.insert(crate::reason::Reason::Anomaly);
                (true, true)
            });
            if matches!(done, Ok((true, _))) {
                applied += 1;
            }
        }
        applied
    }

    /// The learned baselines, by fleet-stable names.
    fn baseline_snapshots(&self, store: &dyn SharedStore) -> Vec<BaselineSnapshot> {
        let mut out = Vec::new();
        if let (Some(login), Some(_)) = (&self.login, &self.distributed) {
            for (route, path) in login.paths().enumerate().take(MAX_BASELINES) {
                if let Ok(Some(e)) = self.endpoints.peek(store, self.endpoint_key(route)) {
                    if e.baseline_samples > 0 {
                        out.push(BaselineSnapshot {
                            name: format!("login:{path}"),
                            baseline: finite(e.baseline),
                            unknown_baseline: finite(e.unknown_baseline),
                            samples: e.baseline_samples,
                            successes_seen: e.successes_seen,
                        });
                    }
                }
            }
        }
        if self.spikes.is_some() {
            for group in &self.config.route_groups {
                if out.len() >= MAX_BASELINES {
                    break;
                }
                let key = self.hasher.key(DOMAIN_ROUTE, group.name.as_bytes());
                if let Ok(Some(g)) = self.group_table.peek(store, key) {
                    if g.baseline_samples > 0 {
                        out.push(BaselineSnapshot {
                            name: format!("group:{}", group.name),
                            baseline: finite(g.baseline),
                            samples: g.baseline_samples,
                            ..BaselineSnapshot::default()
                        });
                    }
                }
            }
        }
        out
    }

    /// Samples the model's clients for `workers` workers: for an adapter
    /// whose workers share one engine (the dynamic module), so that an Envoy
    /// samples as many clients as the wasm build's engine-per-worker does.
    pub fn sample_for_workers(&self, workers: u32) {
        if let Ok(mut out) = self.outbox.lock() {
            out.samples.set_workers(workers);
        }
    }

    /// This worker's batch for this tick, if it has something to say.
    pub fn tick_batch(&self, store: &dyn SharedStore, now_ms: u64) -> Option<TickBatch> {
        if !self.events_on() {
            return None;
        }
        let (decisions, decisions_dropped) = self.take_decisions();
        let (accounts, profiles, dropped, baselines_due, samples) = {
            let mut out = self.outbox.lock().ok()?;
            let samples = out.samples.take_ready(now_ms);
            let due = now_ms.saturating_sub(out.baselines_sent_ms) >= BASELINE_EVERY_MS;
            let no_decisions = decisions.is_empty() && decisions_dropped == 0;
            let quiet = out.accounts.is_empty() && out.profiles.is_empty() && !due && samples.is_empty() && no_decisions;
            if quiet && !self.rules_due(now_ms) {
                return None;
            }
            if due {
                out.baselines_sent_ms = now_ms;
            }
            let n = out.accounts.len().min(MAX_BATCH_ACCOUNTS);
            let accounts: Vec<u64> = out.accounts.drain(..n).collect();
            let n = out.profiles.len().min(MAX_BATCH_PROFILES);
            let profiles: Vec<ProfileUpdate> = out.profiles.drain(..n).collect();
            let dropped = std::mem::take(&mut out.dropped).saturating_add(std::mem::take(&mut out.samples.dropped));
            (accounts, profiles, dropped, due, samples)
        };
        let baselines = if baselines_due { self.baseline_snapshots(store) } else { Vec::new() };
        let (rule_counts, rules_due, rules_dropped) = self.take_rule_counts(now_ms);
        let dropped = dropped.saturating_add(rules_dropped);
        if accounts.is_empty()
            && profiles.is_empty()
            && baselines.is_empty()
            && dropped == 0
            && samples.is_empty()
            && decisions.is_empty()
            && decisions_dropped == 0
            && !rules_due
        {
            return None;
        }
        let samples: Vec<_> = samples
            .into_iter()
            .take(crate::wire::MAX_BATCH_SAMPLES)
            .map(|e| sample::to_wire(e, &self.config.route_groups))
            .collect();
        let items = (accounts.len() + baselines.len() + profiles.len() + samples.len() + rule_counts.len()) as u64;
        let mut batch = EventBatch {
            version: WIRE_VERSION,
            known_accounts: accounts,
            baselines,
            profiles,
            dropped,
            samples,
            rule_counts,
            decisions,
            decisions_dropped,
        };
        // Within the scorer's byte limit whatever the names: what does not
        // fit is dropped and counted (an account comes back with its next success).
        loop {
            let body = serde_json::to_vec(&batch).ok()?;
            if body.len() <= MAX_BATCH_BYTES {
                return Some(TickBatch {
                    body,
                    items,
                    samples: batch.samples.len() as u64,
                    decisions: batch.decisions.len() as u64,
                    decisions_dropped: batch.decisions_dropped,
                });
            }
            if batch.decisions.len() > 16 {
                let keep = batch.decisions.len() / 2;
                batch.decisions_dropped = batch.decisions_dropped.saturating_add((batch.decisions.len() - keep) as u64);
                batch.decisions.truncate(keep);
            } else if batch.baselines.len() > 8 {
                batch.baselines.truncate(8);
            } else if !batch.profiles.is_empty() {
                let keep = batch.profiles.len() / 2;
                batch.dropped = batch.dropped.saturating_add((batch.profiles.len() - keep) as u64);
                batch.profiles.truncate(keep);
            } else if batch.samples.len() > 8 {
                let keep = batch.samples.len() / 2;
                batch.dropped = batch.dropped.saturating_add((batch.samples.len() - keep) as u64);
                batch.samples.truncate(keep);
            } else if batch.rule_counts.len() > 16 {
                let keep = batch.rule_counts.len() / 2;
                batch.dropped = batch.dropped.saturating_add((batch.rule_counts.len() - keep) as u64);
                batch.rule_counts.truncate(keep);
            } else if !batch.known_accounts.is_empty() {
                let keep = batch.known_accounts.len() / 2;
                batch.dropped = batch.dropped.saturating_add((batch.known_accounts.len() - keep) as u64);
                batch.known_accounts.truncate(keep);
            } else {
                return None;
            }
        }
    }

    /// The scorer did not take a batch of `items`: they are dropped, and
    /// the next batch says how many.
    pub fn batch_failed(&self, items: u64) {
        if let Ok(mut out) = self.outbox.lock() {
            out.dropped = out.dropped.saturating_add(items);
        }
    }

    /// Claims the next warm-start page when one is due; returns where it starts.
    pub fn claim_warm(&self, store: &dyn SharedStore, now_ms: u64) -> Option<u32> {
        if !self.callouts.as_ref().is_some_and(|c| c.config.warm_start) {
            return None;
        }
        let (value, cas) = store.get(WARM_KEY).ok()?;
        let lease = WarmLease::decode(value.as_deref());
        if lease.phase == PHASE_DONE || lease.until_ms > now_ms {
            return None;
        }
        if lease.attempts >= WARM_ATTEMPTS {
            let done = WarmLease { phase: PHASE_DONE, ..lease };
            let _ = store.set(WARM_KEY, &done.encode(), cas);
            return None;
        }
        let claimed = WarmLease {
            phase: PHASE_TODO,
            attempts: lease.attempts.saturating_add(1),
            next: lease.next,
            until_ms: now_ms.saturating_add(WARM_LEASE_MS),
        };
        store.set(WARM_KEY, &claimed.encode(), cas).ok()?;
        Some(lease.next)
    }

    /// Applies one warm-start page; returns the shards merged and whether
    /// warming is done. A page that does not parse changes nothing (the
    /// lease runs out and the page is asked again).
    pub fn apply_warm(&self, store: &dyn SharedStore, body: &[u8], now_ms: u64) -> Option<(usize, bool)> {
        if body.len() > crate::wire::MAX_WARM_BYTES {
            return None;
        }
        let warm: WarmState = serde_json::from_slice(body).ok()?;
        if warm.version != WIRE_VERSION {
            return None;
        }
        let mut merged = 0;
        if self.distributed.is_some() {
            for shard in warm.known_shards.iter().take(crate::known_accounts::SHARDS) {
                let Ok(bits) = base64::engine::general_purpose::STANDARD.decode(&shard.bits) else {
                    continue;
                };
                let index = usize::try_from(shard.index).unwrap_or(usize::MAX);
                if self.known_accounts.merge(store, index, &bits).is_ok() {
                    merged += 1;
                }
            }
        }
        for snap in warm.baselines.iter().take(MAX_BASELINES) {
            self.warm_baseline(store, snap, now_ms);
        }
        if self.login.is_some() {
            for p in warm.profiles.iter().take(MAX_BATCH_PROFILES) {
                // The fleet's view joins this Envoy's (best effort: a lost
                // update only leaves the account to learn again).
                let _ = self.accounts.update(store, p.account, now_ms, |a| {
                    a.profile.merge(&p.profile);
                    a.last_seen_ms = a.last_seen_ms.max(p.profile.last_success_ms.min(now_ms));
                    ((), true)
                });
            }
        }
        let done = warm.next.is_none();
        for _ in 0..8 {
            let Ok((value, cas)) = store.get(WARM_KEY) else { break };
            let lease = WarmLease::decode(value.as_deref());
            let next = match warm.next {
                Some(next) => WarmLease { phase: PHASE_TODO, attempts: 0, next, until_ms: 0 },
                None => WarmLease { phase: PHASE_DONE, ..lease },
            };
            if store.set(WARM_KEY, &next.encode(), cas).is_ok() {
                break;
            }
        }
        Some((merged, done))
    }

    /// A warmer baseline from the fleet replaces the local one.
    fn warm_baseline(&self, store: &dyn SharedStore, snap: &BaselineSnapshot, now_ms: u64) {
        let finite = |v: f32| if v.is_finite() { v.max(0.0) } else { 0.0 };
        if let Some(path) = snap.name.strip_prefix("login:") {
            let Some(route) = self.login.as_ref().and_then(|l| l.paths().position(|p| p == path)) else {
                return;
            };
            let _ = self.endpoints.update(store, self.endpoint_key(route), now_ms, |e| {
                if e.baseline_samples >= snap.samples {
                    return ((), false);
                }
                e.baseline = finite(snap.baseline).min(1.0);
                e.learning_mean = e.baseline;
                e.unknown_baseline = finite(snap.unknown_baseline).min(1.0);
                e.baseline_samples = snap.samples;
                e.successes_seen = e.successes_seen.max(snap.successes_seen);
                ((), true)
            });
        } else if let Some(name) = snap.name.strip_prefix("group:") {
            if !self.config.route_groups.iter().any(|g| g.name == name) {
                return;
            }
            let key = self.hasher.key(DOMAIN_ROUTE, name.as_bytes());
            let _ = self.group_table.update(store, key, now_ms, |g| {
                if g.baseline_samples >= snap.samples {
                    return ((), false);
                }
                g.baseline = finite(snap.baseline);
                g.baseline_samples = snap.samples;
                ((), true)
            });
        }
    }
}

/// Keeps the module's constant honest: the warm key lives under the prefix.
const _: () = assert!(WARM_KEY.len() > STATE_PREFIX.len());

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::hash::SEED_BYTES;
    use crate::state::store::MemoryStore;
    use crate::wire::KnownShard;

    const T0: u64 = 1_700_000_000_000;
    const CONFIG: &str = r#"{"credential_stuffing":{"login_routes":[{"path":"/login"}]},
        "scorer":{"enabled":true,"secret":"s3cret"}}"#;

    fn engine() -> Engine {
        Engine::new(&Config::from_json(CONFIG.as_bytes()).unwrap(), &[1; SEED_BYTES]).unwrap()
    }

    #[test]
    fn batches_carry_new_accounts_once_and_are_bounded() {
        let (e, s) = (engine(), MemoryStore::new());
        e.create_state(&s).unwrap();
        assert!(e.tick_batch(&s, T0).is_none() || e.tick_batch(&s, T0 + 1).is_none(), "nothing new to say twice");
        for k in 0..(PENDING_CAP as u64 + 10) {
            e.queue_known_account(k);
        }
        let TickBatch { body, items, .. } = e.tick_batch(&s, T0 + 2).unwrap();
        let batch: EventBatch = serde_json::from_slice(&body).unwrap();
        assert_eq!(batch.known_accounts.len(), MAX_BATCH_ACCOUNTS);
        assert_eq!(batch.dropped, 10);
        assert_eq!(items, MAX_BATCH_ACCOUNTS as u64);
        e.batch_failed(items);
        let batch: EventBatch = serde_json::from_slice(&e.tick_batch(&s, T0 + 3).unwrap().body).unwrap();
        assert_eq!(batch.dropped, MAX_BATCH_ACCOUNTS as u64, "a lost batch is counted, not resent");
    }

    #[test]
    fn a_warm_start_merges_shards_and_warmer_baselines_once() {
        let (e, s) = (engine(), MemoryStore::new());
        e.create_state(&s).unwrap();
        assert_eq!(e.claim_warm(&s, T0), Some(0));
        assert_eq!(e.claim_warm(&s, T0 + 1), None, "leased");
        let account = 1024 * 99 + 7;
        let (shard, bits) = crate::known_accounts::bit_positions(account);
        let mut bytes = vec![0u8; 1024];
        for b in bits {
            bytes[(b / 8) as usize] |= 1 << (b % 8);
        }
        let page = WarmState {
            version: WIRE_VERSION,
            baselines: vec![BaselineSnapshot {
                name: "login:/login".into(),
                baseline: 0.15,
                unknown_baseline: 0.05,
                samples: 5000,
                successes_seen: 4000,
            }],
            known_shards: vec![KnownShard {
                index: shard as u32,
                bits: base64::engine::general_purpose::STANDARD.encode(&bytes),
            }],
            profiles: vec![],
            next: Some(512),
        };
        assert_eq!(e.apply_warm(&s, &serde_json::to_vec(&page).unwrap(), T0 + 2), Some((1, false)));
        assert!(e.known_accounts.contains(&s, account));
        let ep = e.endpoints.peek(&s, e.endpoint_key(0)).unwrap().unwrap();
        assert_eq!((ep.baseline_samples, ep.successes_seen), (5000, 4000));
        assert!(e.distributed.as_ref().unwrap().unknown_is_evidence(&ep), "warm: no cold start");
        assert_eq!(e.baselines_learning(&s), 0, "and says so");
        // The next page is claimed from where the last one ended; the last page ends it.
        assert_eq!(e.claim_warm(&s, T0 + 3), Some(512));
        let last = WarmState { version: WIRE_VERSION, next: None, ..WarmState::default() };
        assert_eq!(e.apply_warm(&s, &serde_json::to_vec(&last).unwrap(), T0 + 4), Some((0, true)));
        assert_eq!(e.claim_warm(&s, T0 + 10_000), None, "done");
        assert!(e.apply_warm(&s, b"garbage", T0 + 5).is_none());
    }

    fn facts<'a>(peer: &'a str, path: &'a str) -> crate::engine::RequestFacts<'a> {
        crate::engine::RequestFacts {
            identity: crate::identity::IdentityInput { peer: Some(peer.as_bytes()), ..Default::default() },
            method: "GET",
            path,
            ..Default::default()
        }
    }

    #[test]
    fn batches_carry_a_bounded_sample_of_clients_and_penalized_ones_are_marked() {
        let (e, s) = (engine(), MemoryStore::new());
        e.create_state(&s).unwrap();
        let t = T0 / sample::SAMPLE_WINDOW_MS * sample::SAMPLE_WINDOW_MS;
        // 300 clients in one window, one of them probing until it is boxed.
        let peers: Vec<String> = (0..300).map(|i| format!("10.0.{}.{}:1000", i / 200, i % 200 + 1)).collect();
        for (i, peer) in peers.iter().enumerate() {
            e.on_request(&s, &facts(peer, "/api/items"), t + i as u64);
        }
        let mut boxed = false;
        for i in 0..40 {
            let (v, _) = e.on_request(&s, &facts(&peers[0], "/.env"), t + 400 + i);
            boxed |= v.would_block;
        }
        assert!(boxed, "the prober was blocked");
        let TickBatch { body, items, samples: n, .. } = e.tick_batch(&s, t + sample::SAMPLE_WINDOW_MS).unwrap();
        let batch: EventBatch = serde_json::from_slice(&body).unwrap();
        assert_eq!(batch.samples.len(), sample::RESERVOIR_CAP, "a full, bounded sample");
        assert_eq!(items, batch.samples.len() as u64 + batch.baselines.len() as u64);
        assert_eq!(n, batch.samples.len() as u64);
        assert!(body.len() <= MAX_BATCH_BYTES);
        let mut clients: Vec<&str> = batch.samples.iter().map(|x| x.client.as_str()).collect();
        clients.sort_unstable();
        clients.dedup();
        assert_eq!(clients.len(), batch.samples.len(), "distinct clients");
        assert!(batch.samples.iter().all(|x| x.features.len() == crate::wire::FEATURE_NAMES.len()));
        // Whether the prober is in this window's sample is chance; run the
        // same window on a fresh engine with the prober among few clients.
        let (e2, s2) = (engine(), MemoryStore::new());
        e2.create_state(&s2).unwrap();
        e2.on_request(&s2, &facts("10.9.9.9:1", "/api/items"), t);
        for i in 0..40 {
            e2.on_request(&s2, &facts("10.9.9.8:1", "/.env"), t + 1 + i);
        }
        let batch: EventBatch = serde_json::from_slice(&e2.tick_batch(&s2, t + sample::SAMPLE_WINDOW_MS).unwrap().body).unwrap();
        let prober = batch.samples.iter().find(|x| x.client == "10.9.9.8").unwrap();
        let quiet = batch.samples.iter().find(|x| x.client == "10.9.9.9").unwrap();
        assert!(prober.penalized && !quiet.penalized, "{batch:?}");
        // A batch the scorer does not take is counted as dropped, samples included.
        e2.batch_failed(2);
        let later = e2.tick_batch(&s2, t + 2 * sample::SAMPLE_WINDOW_MS + BASELINE_EVERY_MS).unwrap();
        let later: EventBatch = serde_json::from_slice(&later.body).unwrap();
        assert_eq!(later.dropped, 2);
        assert!(later.samples.is_empty(), "nothing new was seen");
    }

    #[test]
    fn flags_from_the_scorer_tag_known_clients_only() {
        let (e, s) = (engine(), MemoryStore::new());
        e.create_state(&s).unwrap();
        let (v, _) = e.on_request(&s, &facts("10.1.1.1:5", "/api/items"), T0);
        assert_eq!(v.action, crate::verdict::Action::Allow);
        let flags = crate::wire::EventsAnswer {
            accepted: 1,
            flags: vec![
                crate::wire::FleetVerdict { client: "10.1.1.1".into(), reasons: vec!["anomaly".into()], until_ms: T0 + 60_000 },
                crate::wire::FleetVerdict { client: "10.2.2.2".into(), reasons: vec!["anomaly".into()], until_ms: T0 + 60_000 },
                crate::wire::FleetVerdict { client: "10.1.1.1".into(), reasons: vec![], until_ms: T0 - 1 },
            ],
            ..Default::default()
        };
        assert_eq!(e.apply_events_answer(&s, &serde_json::to_vec(&flags).unwrap(), T0 + 10), 1);
        let (v, _) = e.on_request(&s, &facts("10.1.1.1:5", "/api/items"), T0 + 20);
        assert_eq!(v.action, crate::verdict::Action::Tag);
        assert!(v.reasons.contains(crate::reason::Reason::Anomaly) && !v.would_block);
        // Untouched, an unknown client is still unknown (no slot taken for it).
        let unknown = e.identity.client_addr(Some(b"10.2.2.2"), None);
        assert!(e.table().peek(&s, e.client_key(unknown, None)).unwrap().is_none());
        // Tag only: a flood of flags never blocks.
        for i in 0..50 {
            e.apply_events_answer(&s, &serde_json::to_vec(&flags).unwrap(), T0 + 30 + i);
        }
        assert!(!e.on_request(&s, &facts("10.1.1.1:5", "/api/items"), T0 + 100).0.would_block);
        assert_eq!(e.apply_events_answer(&s, b"{nope", T0), 0);
    }

    #[test]
    fn warming_gives_up_after_its_attempts() {
        let (e, s) = (engine(), MemoryStore::new());
        let mut t = T0;
        let mut claims = 0;
        for _ in 0..50 {
            t += WARM_LEASE_MS + 1;
            claims += usize::from(e.claim_warm(&s, t).is_some());
        }
        assert_eq!(claims, WARM_ATTEMPTS as usize);
    }
}
