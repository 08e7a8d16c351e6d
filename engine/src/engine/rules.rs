//! The rules stage (`rules[]`, see [`crate::rules`]): each rule's key is
//! counted in its own fixed table, on the request, its body or its answer,
//! and a key over the threshold acts on the request (refused, tagged) and
//! on the client's risk (its weight). `fleet` rules also queue their counts
//! for the scorer's tick batch and refuse the keys the fleet put over.

use super::{Engine, Exchange, RequestFacts};
use crate::identity::ClientAddr;
use crate::rules::count::{RuleRecord, RULE_RECORD_BYTES};
use crate::rules::key::{field_value, key_bytes, KeySpec, RuleInput};
use crate::rules::{Acted, CostSource, CountSpec, Pending, Rule, RULE_BODY_BYTES};
use crate::routes::RouteMatch;
use crate::state::store::{ShardedTable, SharedStore};
use crate::verdict::{Action, Verdict};
use crate::wire::{RuleCount, MAX_BATCH_RULE_COUNTS};

/// Hash domains of rule keys and counted values.
const DOMAIN_RULE: u8 = 12;
const DOMAIN_RULE_VALUE: u8 = 13;
/// Fleet counts a worker holds for its next batch, at most (more are
/// dropped and counted: the fleet then under-counts, never over-counts).
pub const RULE_DELTAS_CAP: usize = 4 * MAX_BATCH_RULE_COUNTS;
/// A worker with fleet rules asks the scorer this often at least (an
/// empty batch): the keys the fleet put over reach every Envoy.
pub const FLEET_RULE_POLL_MS: u64 = 1_000;

/// What a body-phase rule needs of the request, kept from its headers
/// (only when a body rule matched).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeptInput {
    path: String,
    session: Option<String>,
    api_key: Option<String>,
    jwt_claim: Option<String>,
    headers: Vec<(String, Vec<u8>)>,
}

/// A worker's fleet counts for its next batch.
#[derive(Debug, Default)]
pub struct RuleOutbox {
    deltas: Vec<(usize, u64, u64)>,
    pub dropped: u64,
    pub polled_ms: u64,
}

/// Response facts the rules count with.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuleAnswer<'a> {
    /// `content-length`, when a `cost:response_bytes` rule reads it.
    pub response_bytes: Option<u64>,
    /// The answer headers [`Engine::rule_answer_headers`] named.
    pub headers: &'a [(&'a str, &'a [u8])],
}

/// The per-rule tables (`rule_<name>`, `keys` × 72 bytes each).
pub(super) fn tables(rules: &crate::rules::Rules, fingerprint: &dyn Fn(&str) -> u32) -> Vec<ShardedTable<RuleRecord>> {
    rules
        .rules
        .iter()
        .map(|r| {
            // A changed definition starts afresh: its counts meant something else.
            let tag = format!("rule;{};{:?};{:?};{}", r.name, r.key, r.count, r.window_s);
            ShardedTable::new(super::STATE_PREFIX, &format!("rule_{}", r.name), r.shards(), 64, fingerprint(&tag))
        })
        .collect()
}

impl Engine {
    /// Request headers the rules read (the host passes them in `RequestFacts::rule_headers`).
    pub fn rule_header_names(&self) -> &[String] {
        self.rules.header_names()
    }

    /// The rule names, by index (a rule reason's name).
    pub fn rule_names(&self) -> &[String] {
        &self.rules.names
    }

    /// Whether a rule counts this request at its answer: the host then reads it.
    pub fn rules_judge_answer(&self, exchange: &Exchange) -> bool {
        exchange.judged && !exchange.rules.answer.is_empty()
    }

    /// Answer headers the rules read for this exchange.
    pub fn rule_answer_headers(&self, exchange: &Exchange) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for (i, _, _) in &exchange.rules.answer {
            if let Some(CountSpec::Cost(CostSource::Header(h))) = self.rules.rules.get(*i).map(|r| &r.count) {
                if !out.contains(&h.as_str()) {
                    out.push(h);
                }
            }
        }
        out
    }

    /// Whether a rule of this exchange counts response bytes.
    pub fn rules_read_response_bytes(&self, exchange: &Exchange) -> bool {
        exchange.rules.answer.iter().any(|(i, _, _)| {
            self.rules.rules.get(*i).is_some_and(|r| matches!(r.count, CountSpec::Cost(CostSource::ResponseBytes)))
        })
    }

    /// How much body the rules want read (a body rule matched).
    pub(super) fn rule_body_limit(&self, exchange: &Exchange) -> Option<usize> {
        (exchange.rules.body != 0 && exchange.judged).then_some(RULE_BODY_BYTES)
    }

    fn rule_key(&self, rule: &Rule, bytes: &[u8]) -> u64 {
        // Keyed with the fleet secret when there is one (like accounts), so
        // that every Envoy names a fleet rule's key alike.
        let mut text = Vec::with_capacity(rule.name.len() + 1 + bytes.len());
        text.extend_from_slice(rule.name.as_bytes());
        text.push(0);
        text.extend_from_slice(bytes);
        self.account_hasher.key(DOMAIN_RULE, &text)
    }

    /// The rules on the request's headers: those whose key is in the body
    /// wait for it, those counted at the answer are checked (and noted for
    /// it), the others counted now. Returns what they do to the request.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rules_on_request(
        &self,
        store: &dyn SharedStore,
        facts: &RequestFacts<'_>,
        client: ClientAddr,
        client_key: u64,
        routes: RouteMatch,
        exchange: &mut Exchange,
        now_ms: u64,
    ) -> Acted {
        let mut acted = Acted::default();
        if self.rules.is_empty() {
            return acted;
        }
        exchange.rules.started_ms = now_ms;
        let header = |name: &str| facts.rule_headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        let matched: Vec<usize> = self
            .rules
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.matcher.request_matches(facts.method, facts.path, routes, &header))
            .map(|(i, _)| i)
            .collect();
        if matched.is_empty() {
            return acted;
        }
        let uses = |k: KeySpec| matched.iter().any(|i| self.rules.rules.get(*i).is_some_and(|r| r.key.contains(&k)));
        let identity = (uses(KeySpec::Session) || uses(KeySpec::ApiKey) || uses(KeySpec::JwtClaim))
            .then(|| self.identity.identify(&facts.identity));
        let id = identity.as_ref();
        let input = RuleInput {
            path: facts.path,
            client_key,
            addr: Some(client),
            session: id.and_then(|i| i.session.as_deref()),
            api_key: id.and_then(|i| i.api_key.as_deref()),
            jwt_claim: id.and_then(|i| i.subject.as_deref()),
            headers: facts.rule_headers,
            username: None,
            body: None,
        };
        for i in matched {
            let Some(rule) = self.rules.rules.get(i) else { continue };
            if rule.needs_body() {
                exchange.rules.body |= 1u32 << i;
                continue;
            }
            self.count_rule(store, i, rule, &input, &mut exchange.rules, &mut acted, now_ms);
        }
        if exchange.rules.body != 0 {
            exchange.rules_input = Some(Box::new(KeptInput {
                path: facts.path.chars().take(2048).collect(),
                session: input.session.map(String::from),
                api_key: input.api_key.map(String::from),
                jwt_claim: input.jwt_claim.map(String::from),
                headers: facts.rule_headers.iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect(),
            }));
        }
        acted
    }

    /// Counts (or checks) one rule's key for a request (headers or body).
    #[allow(clippy::too_many_arguments)]
    fn count_rule(
        &self,
        store: &dyn SharedStore,
        i: usize,
        rule: &Rule,
        input: &RuleInput<'_>,
        pending: &mut Pending,
        acted: &mut Acted,
        now_ms: u64,
    ) {
        // A request missing the key (or the counted field) is not counted.
        let Some(bytes) = key_bytes(&rule.key, input) else { return };
        let value = match rule.distinct_field() {
            Some(field) => match field_value(field, input) {
                Some(v) => self.hasher.key(DOMAIN_RULE_VALUE, &v),
                None => return,
            },
            None => 0,
        };
        let key = self.rule_key(rule, &bytes);
        let Some(table) = self.rule_tables.get(i) else { return };
        acted.hits.matched |= 1u32 << i;
        let counts_now = !rule.counts_at_answer();
        let c = &rule.counting;
        // (fired, penalty end, newly fired, counted, the key's count)
        let done = table.update(store, key, now_ms, |r| {
            if let Some(until) = r.over_at(now_ms) {
                // Fired earlier (or by the fleet): acts, counts no more.
                return ((true, Some(until), false, false, r.estimate(c, now_ms).max(c.threshold)), false);
            }
            if counts_now {
                let counted = r.add(c, 1, value, now_ms);
                return ((counted.fired, counted.until_ms, counted.fired, true, counted.estimate), true);
            }
            let estimate = r.estimate(c, now_ms);
            let (fired, until) = r.check(c, estimate, now_ms);
            ((fired, until, fired, false, estimate), fired)
        });
        let Ok(((fired, until, newly, counted, estimate), _)) = done else {
            // Fail open: a lost count is better than a refused user.
            return;
        };
        if counted && rule.fleet && self.events_on() {
            self.queue_rule_delta(i, key, 1);
        }
        if fired {
            acted.fire(i, rule, until, now_ms, newly);
            acted.figures.push((i, estimate as f32));
        }
        let refused = fired && rule.refusal_status().is_some() && !rule.shadow;
        if !refused && rule.at_answer() && pending.answer.len() < crate::reason::MAX_RULES {
            pending.answer.push((i, key, value));
        }
    }

    /// The rules whose key or field is in the request body (read whole, at
    /// most [`RULE_BODY_BYTES`]); returns the verdict when a rule acted.
    pub fn on_rule_body(&self, store: &dyn SharedStore, exchange: &mut Exchange, body: &[u8], now_ms: u64) -> Option<Verdict> {
        if exchange.rules.body == 0 || !exchange.judged {
            return None;
        }
        let kept = exchange.rules_input.take().unwrap_or_default();
        let headers: Vec<(&str, &[u8])> = kept.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        let input = RuleInput {
            path: &kept.path,
            client_key: exchange.client_key,
            addr: exchange.client,
            session: kept.session.as_deref(),
            api_key: kept.api_key.as_deref(),
            jwt_claim: kept.jwt_claim.as_deref(),
            headers: &headers,
            username: exchange.username.as_deref(),
            body: Some(body),
        };
        let mut acted = Acted::default();
        let mut pending = std::mem::take(&mut exchange.rules);
        let bits = std::mem::take(&mut pending.body);
        for (i, rule) in self.rules.rules.iter().enumerate() {
            if bits & (1u32 << i) != 0 {
                self.count_rule(store, i, rule, &input, &mut pending, &mut acted, now_ms);
            }
        }
        exchange.rules = pending;
        if acted.hits.is_empty() {
            return None;
        }
        let verdict = self.rule_verdict(store, exchange, &acted, now_ms);
        if verdict.would_block {
            // No answer will be judged: the request never reaches the upstream.
            exchange.judged = false;
        }
        Some(verdict)
    }

    /// The rules counted at the answer (failures, costs) and the resets;
    /// a key that fires here is refused from its next request on. Returns
    /// a verdict (for stats) when a rule counted.
    pub fn on_rule_answer(
        &self,
        store: &dyn SharedStore,
        exchange: &Exchange,
        status: u32,
        answer: &RuleAnswer<'_>,
        now_ms: u64,
    ) -> Option<Verdict> {
        if !self.rules_judge_answer(exchange) {
            return None;
        }
        let mut acted = Acted::default();
        for &(i, key, value) in &exchange.rules.answer {
            let (Some(rule), Some(table)) = (self.rules.rules.get(i), self.rule_tables.get(i)) else { continue };
            let reset = rule.resets_on(status);
            let counts = rule.counts_at_answer() && rule.matcher.status_matches(status);
            if !reset && !counts {
                continue;
            }
            let amount: Option<u32> = match &rule.count {
                CountSpec::Cost(CostSource::ResponseBytes) => answer.response_bytes.map(saturate),
                CountSpec::Cost(CostSource::UpstreamMs) => Some(saturate(now_ms.saturating_sub(exchange.rules.started_ms))),
                CountSpec::Cost(CostSource::Header(h)) => answer
                    .headers
                    .iter()
                    .find(|(n, _)| *n == h.as_str())
                    .and_then(|(_, v)| std::str::from_utf8(v).ok())
                    .and_then(|s| s.trim().parse::<f64>().ok())
                    .filter(|n| n.is_finite() && *n >= 0.0)
                    .map(|n| n.round().min(f64::from(u32::MAX)) as u32),
                _ => Some(1),
            };
            let c = &rule.counting;
            let done = table.update(store, key, now_ms, |r| {
                if reset {
                    r.restart();
                    return (None, true);
                }
                match amount {
                    Some(n) if n > 0 => {
                        let counted = r.add(c, n, value, now_ms);
                        (Some((counted.fired, counted.until_ms, n, counted.estimate)), true)
                    }
                    _ => (None, false),
                }
            });
            // (`matched` was counted on the request: one per request.)
            if let Ok((Some((fired, until, n, estimate)), _)) = done {
                if rule.fleet && self.events_on() {
                    self.queue_rule_delta(i, key, u64::from(n));
                }
                if fired {
                    acted.fire(i, rule, until, now_ms, true);
                    acted.figures.push((i, estimate as f32));
                }
            }
        }
        if acted.hits.is_empty() {
            return None;
        }
        // The answer goes on: the key is refused from its next request.
        acted.refuse = None;
        acted.hits.blocked = 0;
        let mut verdict = Verdict::allow(exchange.client.unwrap_or(ClientAddr::Unknown));
        verdict.agent = exchange.agent;
        verdict.mode = exchange.mode.unwrap_or(self.config.mode);
        verdict.on_response = true;
        self.apply_rules(&mut verdict, &acted);
        Some(verdict)
    }

    /// A verdict for the rules of a later phase (the body): their weight
    /// on the client's record, their refusal on the request.
    fn rule_verdict(&self, store: &dyn SharedStore, exchange: &Exchange, acted: &Acted, now_ms: u64) -> Verdict {
        let client = exchange.client.unwrap_or(ClientAddr::Unknown);
        let mode = exchange.mode.unwrap_or(self.config.mode);
        let mut verdict = if acted.signal.risk > 0.0 {
            let signal = acted.signal;
            let updated = self.clients.update(store, exchange.client_key, now_ms, |record| {
                if let Some(penalized) = self.penalized(record, now_ms) {
                    return (penalized, false);
                }
                (self.apply(record, signal, now_ms), true)
            });
            self.verdict(client, updated, mode, now_ms)
        } else {
            let mut v = Verdict::allow(client);
            v.mode = mode;
            v
        };
        verdict.agent = exchange.agent;
        verdict.on_response = true;
        self.apply_rules(&mut verdict, acted);
        verdict
    }

    /// What the rules did, onto the verdict: their reasons (named by the
    /// rule), a tag, a refusal (a block's 403 wins over a shed's 429).
    pub(super) fn apply_rules(&self, verdict: &mut Verdict, acted: &Acted) {
        verdict.rules.add(acted.hits);
        if acted.hits.is_empty() {
            return;
        }
        verdict.rule_names = self.rules.names.clone();
        verdict.rule_figures.extend(acted.figures.iter().copied());
        verdict.reasons = verdict.reasons.union(acted.reasons);
        verdict.fired = verdict.fired.union(acted.reasons);
        if (acted.tag || acted.signal.risk > 0.0) && verdict.action == Action::Allow {
            verdict.action = Action::Tag;
        }
        if let Some((status, retry_s)) = acted.refuse {
            if !verdict.would_block || status < verdict.status {
                verdict.block(status, retry_s.max(verdict.retry_after_s));
            }
            verdict.newly_blocked |= acted.newly;
        }
    }

    /// Decision-event figures of the verdict's rules: each rule's name, its
    /// key's count against its threshold ("6 answers in 300 s; limit 5").
    pub(super) fn rule_reason_figures(&self, verdict: &Verdict) -> Vec<crate::wire::ReasonFigure> {
        let shown = verdict.reasons.union(verdict.fired);
        shown
            .rules()
            .filter_map(|i| {
                let rule = self.rules.rules.get(i)?;
                let value = verdict.rule_figures.iter().find(|(r, _)| *r == i).map(|(_, v)| *v);
                let limit = rule.counting.threshold as f32;
                let what = rule.counts_what();
                Some(match value {
                    Some(v) => crate::wire::ReasonFigure {
                        reason: rule.name.clone(),
                        text: format!("{} {what} in {} s; limit {}", v.round(), rule.window_s, limit.round()),
                        what,
                        value: if v.is_finite() { v } else { 0.0 },
                        limit,
                        window_s: rule.window_s,
                    },
                    None => crate::wire::ReasonFigure { reason: rule.name.clone(), ..Default::default() },
                })
            })
            .collect()
    }

    /// One log line per shadow rule that would have acted (`rule_shadow`:
    /// what it would have done), and per rule that fired on an answer
    /// (`rule_fired`: its key is refused from its next request on).
    pub fn shadow_lines(&self, verdict: &Verdict, method: &str, path: &str) -> Vec<String> {
        let path: String = path.split('?').next().unwrap_or("").chars().take(256).collect();
        let shadow = verdict.rules.shadow;
        let fired = if verdict.on_response && !verdict.would_block { verdict.rules.fired & !shadow } else { 0 };
        self.rules
            .rules
            .iter()
            .enumerate()
            .filter(|(i, _)| (shadow | fired) & (1u32 << i) != 0)
            .map(|(i, r)| {
                serde_json::json!({
                    "event": if shadow & (1u32 << i) != 0 { "rule_shadow" } else { "rule_fired" },
                    "rule": r.name,
                    "would": match r.action {
                        crate::policy::DetectorAction::Block => "block",
                        crate::policy::DetectorAction::Shed => "shed",
                        crate::policy::DetectorAction::Tag => "tag",
                        crate::policy::DetectorAction::Monitor => "monitor",
                    },
                    "client": verdict.client.to_string(),
                    "method": method.chars().take(16).collect::<String>(),
                    "path": path,
                })
                .to_string()
            })
            .collect()
    }

    // ---- fleet ----

    fn queue_rule_delta(&self, i: usize, key: u64, n: u64) {
        if let Ok(mut out) = self.rule_outbox.lock() {
            if let Some(d) = out.deltas.iter_mut().find(|d| d.0 == i && d.1 == key) {
                d.2 = d.2.saturating_add(n);
            } else if out.deltas.len() < RULE_DELTAS_CAP {
                out.deltas.push((i, key, n));
            } else {
                out.dropped = out.dropped.saturating_add(1);
            }
        }
    }

    /// Whether this worker owes the scorer a batch for its fleet rules.
    pub(super) fn rules_due(&self, now_ms: u64) -> bool {
        self.rules.has_fleet()
            && self
                .rule_outbox
                .lock()
                .is_ok_and(|o| !o.deltas.is_empty() || now_ms.saturating_sub(o.polled_ms) >= FLEET_RULE_POLL_MS)
    }

    /// This worker's fleet counts for its batch (at most
    /// [`MAX_BATCH_RULE_COUNTS`]), whether a batch is due for them (counts
    /// pending, or the poll interval passed), and how many were dropped.
    pub(super) fn take_rule_counts(&self, now_ms: u64) -> (Vec<RuleCount>, bool, u64) {
        if !self.rules.has_fleet() {
            return (Vec::new(), false, 0);
        }
        let Ok(mut out) = self.rule_outbox.lock() else {
            return (Vec::new(), false, 0);
        };
        // Counts dropped on a full outbox ride the batch's `dropped`.
        let dropped = std::mem::take(&mut out.dropped);
        let n = out.deltas.len().min(MAX_BATCH_RULE_COUNTS);
        let counts: Vec<RuleCount> = out
            .deltas
            .drain(..n)
            .filter_map(|(i, key, count)| {
                let rule = self.rules.rules.get(i)?;
                Some(RuleCount {
                    rule: rule.name.clone(),
                    key: format!("{key:016x}"),
                    count,
                    window_s: rule.window_s,
                    threshold: rule.counting.threshold,
                    penalty_s: u32::try_from(rule.counting.penalty_ms / 1000).unwrap_or(u32::MAX),
                })
            })
            .collect();
        let due = !counts.is_empty() || now_ms.saturating_sub(out.polled_ms) >= FLEET_RULE_POLL_MS;
        if due {
            out.polled_ms = now_ms;
        }
        (counts, due || dropped > 0, dropped)
    }

    /// The keys the fleet put over a `fleet` rule's threshold (from the
    /// scorer's answer to a batch): each is refused (or tagged) here until
    /// its `until_ms`. Returns how many were applied.
    pub fn apply_rule_keys(&self, store: &dyn SharedStore, body: &[u8], now_ms: u64) -> usize {
        let Ok(answer) = serde_json::from_slice::<crate::wire::EventsAnswer>(body) else {
            return 0;
        };
        let mut applied = 0;
        for over in answer.rule_keys.iter().take(crate::wire::MAX_RULE_KEYS_OVER) {
            if over.until_ms <= now_ms {
                continue;
            }
            let Some(i) = self.rules.index_of(&over.rule) else { continue };
            let (Some(rule), Some(table)) = (self.rules.rules.get(i), self.rule_tables.get(i)) else { continue };
            let Ok(key) = u64::from_str_radix(&over.key, 16) else { continue };
            // Never longer than a day, whatever the scorer says.
            let until = over.until_ms.min(now_ms.saturating_add(86_400_000));
            if !rule.fleet {
                continue;
            }
            let done = table.update(store, key, now_ms, |r| {
                if r.over_until_ms >= until {
                    return (false, false);
                }
                r.over_until_ms = until;
                r.last_seen_ms = now_ms;
                (true, true)
            });
            if matches!(done, Ok((true, _))) {
                applied += 1;
            }
        }
        applied
    }

    /// Bytes of shared data the rule tables occupy.
    pub(super) fn rule_bytes(&self) -> usize {
        self.rule_tables.iter().map(ShardedTable::total_bytes).sum()
    }
}

fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

const _: () = assert!(RULE_RECORD_BYTES == 72);

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
#[path = "rules_tests.rs"]
mod tests;
