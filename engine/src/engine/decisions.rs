//! Decisions as records (the operator's view): every block, shed and tag
//! gets a short id that the refusal quotes, and — when the tick batch is on
//! — an event with the reasons and each detector's figure against its
//! limit, for the scorer to keep fleet-wide.
//!
//! **Ids.** `<instance>-<worker>-<counter>` in hex, unique per Envoy: the
//! instance tag comes from the process's hashing seed (every worker VM of
//! the process shares it), the worker number from a counter in shared data
//! that only grows (a reload's new VMs take new numbers, so a counter that
//! restarts at 1 never repeats an id), the counter from the worker. The id
//! of the decision that boxed a client lives in its record, so every
//! refusal of the penalty box quotes the block it comes from.
//!
//! **Events.** Off the request path: a decision is queued in a bounded
//! per-worker buffer ([`DECISIONS_CAP`]; when full the oldest goes, counted)
//! and leaves with the worker's next tick batch. A block is one event;
//! penalty-box refusals, sheds and tags are aggregated per client and
//! action until the batch leaves (`hits`), so a flood held in the box costs
//! one event per tick, not one per request.

use super::{Engine, Exchange};
use crate::detectors::Figure;
use crate::reason::Reason;
use crate::state::store::SharedStore;
use crate::verdict::{Action, Verdict};
use crate::wire::{DecisionEvent, ReasonFigure, MAX_BATCH_DECISIONS, MAX_DECISION_REASONS};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Decision events a worker holds for its next batches, at most.
pub const DECISIONS_CAP: usize = 4 * MAX_BATCH_DECISIONS;
/// Shared-data key of the worker-number counter (a u32 that only grows).
pub const WORKERS_KEY: &str = "abuse_filter/v1/workers";
/// Low bits of a decision id that count; the bits above name the worker.
const COUNTER_BITS: u32 = 40;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;

/// What a worker needs to name decisions.
#[derive(Debug)]
pub struct DecisionIds {
    /// Per process: from the hashing seed.
    instance_tag: u16,
    /// The Envoy as events name it (its node id, else `envoy-<tag>`).
    instance: std::sync::RwLock<String>,
    worker: AtomicU32,
    next: AtomicU64,
    /// The phase being judged (see [`Engine::begin_phase`]) and the id
    /// minted in it: one phase that boxes two records (a new identity and
    /// its address's pool) names both with one decision.
    phase: AtomicU64,
    minted: std::sync::Mutex<(u64, u64)>,
}

impl DecisionIds {
    pub fn new(instance_tag: u16) -> DecisionIds {
        DecisionIds {
            instance_tag,
            instance: std::sync::RwLock::new(format!("envoy-{instance_tag:04x}")),
            worker: AtomicU32::new(0),
            next: AtomicU64::new(1),
            phase: AtomicU64::new(1),
            minted: std::sync::Mutex::new((0, 0)),
        }
    }

    fn fresh(&self) -> u64 {
        let counter = self.next.fetch_add(1, Ordering::Relaxed) & COUNTER_MASK;
        (u64::from(self.worker.load(Ordering::Relaxed) & 0xffff) << COUNTER_BITS) | counter.max(1)
    }

    /// The phase's decision id (minted on first use in the phase).
    fn mint(&self) -> u64 {
        let phase = self.phase.load(Ordering::Relaxed);
        let Ok(mut minted) = self.minted.lock() else { return self.fresh() };
        if minted.0 != phase {
            *minted = (phase, self.fresh());
        }
        minted.1
    }

    fn begin_phase(&self) {
        self.phase.fetch_add(1, Ordering::Relaxed);
    }

    /// `3fa2-1-2c`: what a refused user quotes.
    pub fn label(&self, id: u64) -> String {
        format!("{:04x}-{:x}-{:x}", self.instance_tag, id >> COUNTER_BITS, id & COUNTER_MASK)
    }

    fn instance(&self) -> String {
        self.instance.read().map(|s| s.clone()).unwrap_or_default()
    }
}

/// What one worker holds for its next batch.
#[derive(Debug, Default)]
pub struct DecisionOutbox {
    events: VecDeque<DecisionEvent>,
    /// Aggregation key (client key, action) → sequence number of its event.
    open: HashMap<(u64, u8), u64>,
    /// Sequence number of `events[0]`.
    first_seq: u64,
    /// Dropped since the last batch (what the scorer is told).
    dropped: u64,
    /// Dropped since the host last asked (its stat).
    lost: u64,
}

impl DecisionOutbox {
    fn push(&mut self, event: DecisionEvent) -> u64 {
        if self.events.len() >= DECISIONS_CAP {
            self.events.pop_front();
            self.first_seq = self.first_seq.saturating_add(1);
            self.dropped = self.dropped.saturating_add(1);
            self.lost = self.lost.saturating_add(1);
        }
        self.events.push_back(event);
        self.first_seq.saturating_add(self.events.len() as u64 - 1)
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut DecisionEvent> {
        let index = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        self.events.get_mut(index)
    }

    /// The events for a batch (at most [`MAX_BATCH_DECISIONS`]) and the
    /// count dropped since the last one. Aggregation starts afresh.
    pub fn take(&mut self) -> (Vec<DecisionEvent>, u64) {
        let n = self.events.len().min(MAX_BATCH_DECISIONS);
        let events: Vec<DecisionEvent> = self.events.drain(..n).collect();
        self.first_seq = self.first_seq.saturating_add(n as u64);
        self.open.clear();
        (events, std::mem::take(&mut self.dropped))
    }

    /// A batch with `n` decisions (and a report of `reported` earlier
    /// drops) did not reach the scorer: the next batch reports both.
    pub fn failed(&mut self, n: u64, reported: u64) {
        self.dropped = self.dropped.saturating_add(n).saturating_add(reported);
        self.lost = self.lost.saturating_add(n);
    }
}

/// How an event names what was decided.
fn action_name(verdict: &Verdict) -> (&'static str, u8) {
    if verdict.penalized {
        ("penalty", 0)
    } else if verdict.newly_blocked {
        ("block", 1)
    } else if verdict.would_block {
        ("shed", 2)
    } else {
        ("tag", 3)
    }
}

/// Replaces object ids in a path (`/api/users/123` → `/api/users/{id}`):
/// events group by endpoint, and ids are nobody's business in a dashboard.
pub fn path_template(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut out = String::with_capacity(path.len().min(128));
    for (i, segment) in path.split('/').enumerate().take(16) {
        if i > 0 {
            out.push('/');
        }
        let digits = segment.bytes().filter(u8::is_ascii_digit).count();
        let hexish = segment.len() >= 16 && segment.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        if (!segment.is_empty() && digits * 2 >= segment.len()) || hexish {
            out.push_str("{id}");
        } else {
            out.extend(segment.chars().take(64));
        }
    }
    out
}

impl Engine {
    /// Takes this worker's number (once per VM, at configure time) and the
    /// Envoy's name for events.
    pub fn start_decisions(&self, store: &dyn SharedStore, node_id: Option<&str>) {
        if let Some(node) = node_id.map(str::trim).filter(|n| !n.is_empty()) {
            if let Ok(mut name) = self.decision_ids.instance.write() {
                *name = node.chars().take(64).collect();
            }
        }
        for _ in 0..16 {
            let Ok((value, cas)) = store.get(WORKERS_KEY) else { return };
            let mut r = crate::codec::Reader::new(value.as_deref().unwrap_or(&[]));
            let n = r.u32().wrapping_add(1);
            if store.set(WORKERS_KEY, &n.to_le_bytes(), cas).is_ok() {
                self.decision_ids.worker.store(n, Ordering::Relaxed);
                return;
            }
        }
    }

    pub(super) fn mint_decision(&self) -> u64 {
        self.decision_ids.mint()
    }

    /// A new phase of judging (a request, its body, its answer, a scorer
    /// answer, one fleet verdict): the decisions it makes share one id.
    pub(super) fn begin_phase(&self) {
        self.decision_ids.begin_phase();
    }

    /// The id as refusals and events show it.
    pub fn decision_label(&self, id: u64) -> String {
        self.decision_ids.label(id)
    }

    /// Names a decision worth naming (a refusal, a would-be refusal, a tag)
    /// and queues its event; a clean allow costs one comparison.
    pub fn decided(&self, exchange: &Exchange, verdict: &mut Verdict, method: &str, path: &str, now_ms: u64) {
        if verdict.exempt || (verdict.action == Action::Allow && !verdict.would_block) {
            return;
        }
        let (action, code) = action_name(verdict);
        let agg = (exchange.client_key ^ u64::from(verdict.pool), code);
        let events = self.events_on();
        let mut outbox = match self.decision_outbox.lock() {
            Ok(o) => o,
            Err(_) => return,
        };
        if code != 1 {
            // Aggregated kinds: the open event's id, while the batch has not left.
            if let Some(e) = outbox.open.get(&agg).copied().and_then(|seq| outbox.get_mut(seq)) {
                e.hits = e.hits.saturating_add(1);
                e.time_ms = now_ms;
                verdict.decision_id = Some(e.id.clone());
                return;
            }
        }
        if verdict.decision == 0 {
            verdict.decision = self.mint_decision();
        }
        let id = self.decision_label(verdict.decision);
        verdict.decision_id = Some(id.clone());
        if !events {
            return;
        }
        let event = self.decision_event(exchange, verdict, id, action, method, path, now_ms);
        let seq = outbox.push(event);
        if code != 1 {
            outbox.open.insert(agg, seq);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn decision_event(
        &self,
        exchange: &Exchange,
        verdict: &Verdict,
        id: String,
        action: &str,
        method: &str,
        path: &str,
        now_ms: u64,
    ) -> DecisionEvent {
        let figure_of = |reason: Reason| verdict.figures.iter().flatten().find(|(r, _)| *r == reason).map(|(_, f)| *f);
        let mut reasons: Vec<ReasonFigure> = verdict
            .reasons
            .union(verdict.fired)
            .iter()
            .map(|reason| reason_figure(reason, figure_of(reason)))
            .collect();
        // Rules (issue 22) by their names, with their count against their threshold.
        reasons.extend(self.rule_reason_figures(verdict));
        reasons.truncate(MAX_DECISION_REASONS);
        let (session, credential) = match exchange.fleet_session {
            Some((hash, kind)) => (Some(format!("{hash:016x}")), Some(kind.to_string())),
            None => (None, None),
        };
        DecisionEvent {
            id,
            time_ms: now_ms,
            instance: self.decision_ids.instance(),
            client: crate::identity::verdict_label(verdict.client, verdict.agent, verdict.pool),
            address: verdict.client.to_string(),
            agent: verdict.agent.map(|a| format!("{a:08x}")),
            session,
            credential,
            username: exchange
                .username
                .as_deref()
                .map(|u| format!("{:016x}", self.account_hasher.key(super::DOMAIN_USERNAME, u.as_bytes()))),
            route_group: exchange.group.and_then(|g| self.config.route_groups.get(g)).map(|g| g.name.clone()),
            method: method.chars().take(16).collect(),
            path: path_template(path),
            action: action.to_string(),
            mode: match verdict.mode {
                crate::config::Mode::Block => "block",
                crate::config::Mode::Monitor => "monitor",
            }
            .to_string(),
            status: verdict.status,
            risk: if verdict.risk.is_finite() { verdict.risk } else { 0.0 },
            until_ms: verdict.penalty_until_ms,
            hits: 1,
            reasons,
        }
    }

    /// The events for this tick's batch, and how many were dropped.
    pub(super) fn take_decisions(&self) -> (Vec<DecisionEvent>, u64) {
        self.decision_outbox.lock().map(|mut o| o.take()).unwrap_or_default()
    }

    /// A batch that carried `n` decisions (and reported `reported` dropped
    /// ones) did not reach the scorer.
    pub fn decisions_failed(&self, n: u64, reported: u64) {
        if let Ok(mut o) = self.decision_outbox.lock() {
            o.failed(n, reported);
        }
    }

    /// Decision events lost since the last call (buffer full, scorer away):
    /// the host's `abuse_filter.decisions.dropped`.
    pub fn decisions_lost(&self) -> u64 {
        self.decision_outbox.lock().map(|mut o| std::mem::take(&mut o.lost)).unwrap_or(0)
    }
}

fn reason_figure(reason: Reason, figure: Option<Figure>) -> ReasonFigure {
    match figure {
        Some(f) => ReasonFigure {
            reason: reason.name().to_string(),
            what: f.what.to_string(),
            value: if f.value.is_finite() { f.value } else { 0.0 },
            limit: if f.limit.is_finite() { f.limit } else { 0.0 },
            window_s: f.window_s,
            text: f.text(),
        },
        // A reason from an earlier request of the client (its figure went
        // with that request's event) or one without a count (the model's).
        None => ReasonFigure { reason: reason.name().to_string(), ..ReasonFigure::default() },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_instance_worker_and_counter() {
        let ids = DecisionIds::new(0x3fa2);
        ids.worker.store(3, Ordering::Relaxed);
        let a = ids.mint();
        assert_eq!(ids.mint(), a, "one id per phase");
        ids.begin_phase();
        let b = ids.mint();
        assert_ne!(a, b);
        assert_eq!(ids.label(a), "3fa2-3-1");
        assert_eq!(ids.label(b), "3fa2-3-2");
    }

    #[test]
    fn the_outbox_drops_the_oldest_and_counts() {
        let mut o = DecisionOutbox::default();
        for i in 0..DECISIONS_CAP + 3 {
            o.push(DecisionEvent { id: i.to_string(), ..DecisionEvent::default() });
        }
        let (first, dropped) = o.take();
        assert_eq!(dropped, 3);
        assert_eq!(first.len(), MAX_BATCH_DECISIONS);
        assert_eq!(first[0].id, "3", "the oldest three went");
        let (_, dropped) = o.take();
        assert_eq!(dropped, 0);
    }

    #[test]
    fn templates_hide_ids() {
        assert_eq!(path_template("/api/users/123?x=1"), "/api/users/{id}");
        assert_eq!(path_template("/api/orders/5f0c6a1e-8b7d-4c2e-9f3a-1b2c3d4e5f60/items"), "/api/orders/{id}/items");
        assert_eq!(path_template("/api/products"), "/api/products");
        assert_eq!(path_template("/"), "/");
    }
}
