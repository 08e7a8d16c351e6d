//! The scorer tier: a borderline client's request asks the scoring
//! service (single flight per client, answers cached in the `verdicts`
//! table, a circuit breaker), and waits for its answer.

use super::{Engine, Exchange, RequestFacts};
use crate::risk;
use crate::callout::{CacheLookup, CalloutFailure, Callouts, reasons_from_names};
use crate::identity::ClientAddr;
use crate::reason::ReasonSet;
use crate::record::ClientRecord;
use crate::state::store::SharedStore;
use crate::verdict::{Action, CalloutPlan, Verdict};
use crate::wire::{Features, ScoreAction, ScoreRequest, ScoreResponse, WIRE_VERSION};

impl Engine {
    /// For a borderline client: use the cached scorer verdict, or claim the
    /// callout and prepare the question (single flight per client).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn consult_scorer(
        &self,
        store: &dyn SharedStore,
        facts: &RequestFacts<'_>,
        record: ClientRecord,
        routes: crate::routes::RouteMatch,
        verdict: &mut Verdict,
        exchange: &mut Exchange,
        now_ms: u64,
    ) {
        let Some(callouts) = &self.callouts else {
            return;
        };
        if !callouts.borderline(verdict.risk, self.config.risk.block_at) {
            return;
        }
        let looked_up = self
            .verdict_table
            .update(store, exchange.client_key, now_ms, |v| callouts.lookup(v, now_ms));
        let Ok((lookup, _)) = looked_up else {
            return;
        };
        match lookup {
            CacheLookup::Hit { action, score, reasons, until_ms } => {
                verdict.callout = CalloutPlan::CacheHit;
                self.apply_answer(verdict, action, score, reasons, until_ms, now_ms);
            }
            CacheLookup::InFlight => {
                verdict.callout = CalloutPlan::InFlight;
                exchange.risk = verdict.risk;
                exchange.reasons = verdict.reasons;
            }
            CacheLookup::Ask if !callouts.breaker.allow(now_ms) => {
                verdict.callout = CalloutPlan::BreakerOpen;
                let _ = self.verdict_table.update(store, exchange.client_key, now_ms, |v| {
                    callouts.release(v, now_ms);
                    ((), true)
                });
                if callouts.fail_closed() {
                    verdict.block(403, 1);
                }
            }
            CacheLookup::Ask => {
                verdict.callout = CalloutPlan::Ask;
                exchange.risk = verdict.risk;
                exchange.reasons = verdict.reasons;
                exchange.score_request = Some(self.score_request(facts, &record, routes, verdict, now_ms));
            }
        }
    }

    /// Applies a scorer verdict (fresh or cached) to the filter's verdict.
    pub(super) fn apply_answer(&self, v: &mut Verdict, action: ScoreAction, score: f32, reasons: ReasonSet, until_ms: u64, now_ms: u64) {
        v.risk = score;
        v.reasons = v.reasons.union(reasons);
        if action != ScoreAction::Allow {
            // The decision's figure is the scorer's score against the line
            // it crossed (its own answer explains the score's parts).
            let limit = if action == ScoreAction::Block { self.config.risk.block_at } else { self.config.risk.tag_at };
            let figure = crate::detectors::Figure::new("scorer's score", score.into(), limit.into(), 0);
            for (slot, reason) in v.figures.iter_mut().filter(|f| f.is_none()).zip(v.reasons.iter()) {
                *slot = Some((reason, figure));
            }
        }
        match action {
            ScoreAction::Block => v.block(403, until_ms.saturating_sub(now_ms).div_ceil(1000)),
            ScoreAction::Tag => v.action = Action::Tag,
            ScoreAction::Allow => {}
        }
    }

    /// A client's feature summary, as the scorer sees it (callouts and samples).
    pub(super) fn features_of(&self, r: &ClientRecord, risk: f32, anonymous: bool, now_ms: u64) -> Features {
        let c = &self.config;
        let w = |s: u32| u64::from(s).saturating_mul(1000);
        let (login_w, probe_w, enum_w, scrape_w) =
            (w(c.credential_stuffing.window_s), w(c.probing.window_s), w(c.enumeration.window_s), w(c.scraping.window_s));
        let object_requests = r.object_requests.estimate(now_ms, enum_w) as f32;
        let cv = if r.interval_mean_ms > 0.0 { r.interval_var.max(0.0).sqrt() / r.interval_mean_ms } else { 0.0 };
        Features {
            risk,
            requests: r.requests as f32,
            recent_requests: r.recent_requests.estimate(now_ms, w(c.spikes.window_s)) as f32,
            login_failures: r.login_failures.estimate(now_ms, login_w) as f32,
            failed_usernames: r.failed_usernames.estimate() as f32,
            login_successes: r.login_successes as f32,
            not_found: r.not_found.estimate(now_ms, probe_w) as f32,
            not_found_paths: r.not_found_paths.estimate() as f32,
            object_requests,
            object_miss_ratio: (r.object_misses.estimate(now_ms, enum_w) as f32) / object_requests.max(1.0),
            distinct_object_ids: r.object_ids.estimate() as f32,
            sequential_object_run: r.object_run as f32,
            page_run: r.page_run as f32,
            interval_mean_ms: r.interval_mean_ms,
            interval_cv: cv,
            sessions: r.sessions.estimate() as f32,
            response_kib: r.response_kib.estimate(now_ms, scrape_w) as f32,
            anonymous_network: if anonymous { 1.0 } else { 0.0 },
        }
    }

    /// The feature summary the scorer judges.
    pub(super) fn score_request(
        &self,
        facts: &RequestFacts<'_>,
        r: &ClientRecord,
        routes: crate::routes::RouteMatch,
        verdict: &Verdict,
        now_ms: u64,
    ) -> ScoreRequest {
        let c = &self.config;
        let features = self.features_of(r, verdict.risk, facts.anonymous, now_ms);
        let route_group = c
            .route_groups
            .iter()
            .enumerate()
            .find(|(i, _)| routes.contains(*i))
            .map(|(_, g)| g.name.clone());
        let id = self.identity.identify(&facts.identity);
        let short = |s: &str, n: usize| s.chars().take(n).collect::<String>();
        ScoreRequest {
            version: WIRE_VERSION,
            client: crate::identity::verdict_label(verdict.client, verdict.agent, verdict.pool),
            route_group,
            method: short(facts.method, 16),
            path: short(facts.path.split('?').next().unwrap_or(""), 256),
            reasons: verdict.reasons.names().into_iter().map(String::from).collect(),
            features,
            username: None,
            session: self.fleet_session(&id),
            // Only a verified subject, and by its fleet-wide keyed name.
            subject: id
                .verified_subject
                .map(|s| format!("{:016x}", self.account_hasher.key(super::DOMAIN_SESSION, format!("sub:{s}").as_bytes()))),
            user_agent: facts.user_agent.map(|u| short(u, 256)),
            country: facts.country.map(|c| short(c, 8)),
            asn: facts.asn.map(|a| short(a, 16)),
        }
    }

    /// The scorer question as JSON, once everything it needs is known
    /// (for login routes: after the body gave the username).
    pub fn score_request_body(&self, exchange: &Exchange) -> Option<Vec<u8>> {
        exchange.score_request.as_ref().and_then(|r| serde_json::to_vec(r).ok())
    }

    /// The scorer answered (or failed): caches the answer, moves the breaker,
    /// and returns the final verdict for the paused request.
    pub fn on_score_answer(
        &self,
        store: &dyn SharedStore,
        exchange: &Exchange,
        answer: Result<ScoreResponse, CalloutFailure>,
        now_ms: u64,
    ) -> Verdict {
        self.begin_phase();
        let mut v = self.held_verdict(exchange);
        let Some(callouts) = &self.callouts else {
            return v;
        };
        let key = exchange.client_key;
        match answer {
            Ok(answer) => {
                v.callout = CalloutPlan::Answered;
                callouts.breaker.success();
                let cached = self.verdict_table.update(store, key, now_ms, |r| {
                    callouts.store_answer(r, &answer, now_ms);
                    (r.valid_until_ms, true)
                });
                let until_ms = cached.map(|(u, _)| u).unwrap_or(now_ms.saturating_add(1000));
                let reasons = reasons_from_names(&answer.reasons);
                self.apply_answer(&mut v, answer.action, answer.score, reasons, until_ms, now_ms);
                if answer.action == ScoreAction::Block {
                    // Into the penalty box, like any block: later requests
                    // are refused before any other work.
                    let penalty = v.reasons;
                    let decision = self.mint_decision();
                    let _ = self.clients.update(store, key, now_ms, |r| {
                        r.penalty_until_ms = until_ms;
                        r.penalty_reasons = penalty;
                        r.risk = r.risk.max(answer.score.min(risk::MAX_RISK));
                        r.decision = decision;
                        ((), true)
                    });
                    v.newly_blocked = true;
                    v.decision = decision;
                    v.penalty_until_ms = until_ms;
                }
            }
            Err(failure) => {
                v.callout = if failure.is_timeout() { CalloutPlan::TimedOut } else { CalloutPlan::Failed };
                callouts.breaker.failure(
                    now_ms,
                    callouts.config.breaker_failures,
                    u64::from(callouts.config.breaker_cooldown_s).saturating_mul(1000),
                );
                let _ = self.verdict_table.update(store, key, now_ms, |r| {
                    callouts.release(r, now_ms);
                    ((), true)
                });
                if callouts.fail_closed() {
                    v.block(403, 1);
                }
            }
        }
        v
    }

    /// For a request that waited while another asked about its client: the
    /// cached answer once there, the failure mode once `deadline_ms` passed,
    /// else None (keep waiting).
    pub fn waiting_verdict(&self, store: &dyn SharedStore, exchange: &Exchange, deadline_ms: u64, now_ms: u64) -> Option<Verdict> {
        let callouts = self.callouts.as_ref()?;
        let cached = self
            .verdict_table
            .peek(store, exchange.client_key)
            .ok()
            .flatten()
            .filter(|r| r.valid_until_ms > now_ms);
        let mut v = self.held_verdict(exchange);
        match cached {
            Some(r) => {
                v.callout = CalloutPlan::CacheHit;
                let action = crate::callout::action_of(r.action);
                self.apply_answer(&mut v, action, r.score, r.reasons, r.valid_until_ms, now_ms);
                Some(v)
            }
            None if now_ms >= deadline_ms => {
                v.callout = CalloutPlan::TimedOut;
                if callouts.fail_closed() {
                    v.block(403, 1);
                }
                Some(v)
            }
            None => None,
        }
    }

    /// The client key of an exchange (to match waiters with their callout).
    pub fn client_key_of(exchange: &Exchange) -> u64 {
        exchange.client_key
    }

    /// The filter's own decision for a request held while the scorer is asked.
    pub(super) fn held_verdict(&self, exchange: &Exchange) -> Verdict {
        let mut v = Verdict::allow(exchange.client.unwrap_or(ClientAddr::Unknown));
        v.agent = exchange.agent;
        v.mode = exchange.mode.unwrap_or(self.config.mode);
        v.risk = exchange.risk;
        v.reasons = exchange.reasons;
        if v.risk >= self.config.risk.tag_at {
            v.action = Action::Tag;
        }
        v
    }

    /// The scorer policy, when enabled.
    pub fn callouts(&self) -> Option<&Callouts> {
        self.callouts.as_ref()
    }
}
