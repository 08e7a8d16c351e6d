//! One HTTP stream: read only the headers the configuration needs, ask the
//! engine, then forward (with risk headers) or reply locally — what
//! `src/http.rs` does for the wasm filter, over the dynamic-module ABI.
//! Differences are the host's: headers are read in place, the peer comes
//! from the `source.address` attribute, a native filter keeps its request
//! headers while it reads the body (no `allow_on_headers_stop_iteration`
//! needed), and stats are atomics flushed by the tick.

use crate::abi::{self, FilterEnvoyPtr, SchedulerPtr};
use crate::config::{now_ms, FilterConfig, SendPtr, Waiter};
use crate::host::{self, log, HeaderMap};
use abuse_engine::callout::{parse_answer, CalloutFailure};
use abuse_engine::facts::Facts;
use abuse_engine::stats::{self, Counter};
use abuse_engine::wire::{SCORE_PATH, SECRET_HEADER};
use abuse_engine::{Action, Engine, Exchange, IdentityInput, RequestFacts, Verdict};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Filter state keys of the decision and of a scorer wait: the wasm
/// filter's, so access-log formats (`%FILTER_STATE(wasm.abuse_filter:PLAIN)%`)
/// and the tools reading them work with either build.
pub const DECISION_KEY: &str = "wasm.abuse_filter";
pub const CALLOUT_KEY: &str = "wasm.abuse_filter_callout";
pub const DECISION_HEADER: &str = "x-abuse-decision";

/// What the filter tells Envoy about a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Continue,
    /// Stop here: a local reply went out, or the stream waits (callout, body).
    Stop,
}

static STREAMS: AtomicU64 = AtomicU64::new(1);

pub struct AbuseFilter {
    config: Arc<FilterConfig>,
    envoy: FilterEnvoyPtr,
    stream: u64,
    exchange: Exchange,
    body_limit: Option<usize>,
    method: String,
    path: String,
    callout_started_ms: Option<u64>,
    callout_id: Option<u64>,
    ask_after_body: bool,
    headers_sent: bool,
    forged_risk_headers: bool,
    pending_decision: Option<String>,
    held_headers: Option<Verdict>,
    /// Waiting on another request's callout: its scheduler and slot.
    waiting: Option<(SchedulerPtr, Arc<Mutex<Option<Verdict>>>)>,
    /// The request was answered locally: nothing more to do.
    replied: bool,
}

impl AbuseFilter {
    pub fn new(config: Arc<FilterConfig>, envoy: FilterEnvoyPtr) -> AbuseFilter {
        AbuseFilter {
            config,
            envoy,
            stream: STREAMS.fetch_add(1, Ordering::Relaxed),
            exchange: Exchange::default(),
            body_limit: None,
            method: String::new(),
            path: String::new(),
            callout_started_ms: None,
            callout_id: None,
            ask_after_body: false,
            headers_sent: false,
            forged_risk_headers: false,
            pending_decision: None,
            held_headers: None,
            waiting: None,
            replied: false,
        }
    }

    /// The stream ends: forget a wait, free its scheduler.
    pub fn destroy(&mut self) {
        if let Some((scheduler, _)) = self.waiting.take() {
            self.config.unpark(self.stream);
            // SAFETY: unparked above: no other thread commits to it any more.
            unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler) };
        }
    }

    pub fn on_request_headers(&mut self, end_of_stream: bool) -> Step {
        let config = self.config.clone();
        let engine = &config.engine;
        let store = config.store.as_ref();
        // Everything read from the header map is used, then dropped, before
        // any header is written (the map's slices point into Envoy's).
        let (mut verdict, exchange, method, path, now) = {
            let headers = HeaderMap::read(self.envoy, abi::REQUEST_HEADER);
            let policy = engine.identity_policy();
            let facts_header = engine.config().client.facts_header.as_deref();
            let request_facts = facts_header.and_then(|name| headers.get(name)).and_then(Facts::parse);
            let property_peer: Option<Vec<u8>>;
            let (peer, now) = match request_facts {
                Some(f) => (Some(f.peer), f.start_ms),
                None => {
                    property_peer = host::source_address(self.envoy);
                    (property_peer.as_deref(), now_ms())
                }
            };
            let forwarded_for = if policy.reads_forwarded_for() { headers.get(&policy.forwarded_for_header) } else { None };
            let path = String::from_utf8_lossy(headers.get(":path").unwrap_or_default()).into_owned();
            let method = String::from_utf8_lossy(headers.get(":method").unwrap_or_default()).into_owned();
            let user_agent = if engine.reads_user_agent() { headers.get("user-agent") } else { None };
            let api_key = match (&policy.api_key_header, engine.reads_api_key()) {
                (Some(name), true) => headers.get(name),
                _ => None,
            };
            let user_agent = user_agent.map(String::from_utf8_lossy);
            let geo = &engine.config().geo;
            let asn = geo.asn_header.as_deref().and_then(|h| headers.get(h)).map(String::from_utf8_lossy);
            let country = geo.country_header.as_deref().and_then(|h| headers.get(h)).map(String::from_utf8_lossy);
            let anonymous = geo.anonymous_headers.iter().any(|h| headers.get(h).is_some_and(|v| v.eq_ignore_ascii_case(b"true")));
            let cookie = if engine.reads_cookie() { headers.get("cookie") } else { None };
            let authorization = if engine.reads_authorization() { headers.get("authorization") } else { None };
            let verified_subject = policy.verified_subject_header.as_deref().and_then(|h| headers.get(h));
            let header_names = engine.wants_fingerprint(&method, &path).then(|| headers.names(64));
            let ja4 = match (engine.ja4_header(), &header_names) {
                (Some(h), Some(_)) => headers.get(h).map(String::from_utf8_lossy),
                (None, Some(_)) => request_facts.as_ref().and_then(|f| f.ja4).map(String::from_utf8_lossy),
                _ => None,
            };
            let rule_headers: Vec<(&str, &[u8])> =
                engine.rule_header_names().iter().filter_map(|name| headers.get(name).map(|v| (name.as_str(), v))).collect();
            let h = &engine.config().headers;
            self.forged_risk_headers = h.enabled
                && (headers.get(&h.score).is_some() || headers.get(&h.reasons).is_some() || headers.get(&h.login_risk).is_some());
            let facts = RequestFacts {
                identity: IdentityInput { peer, forwarded_for, api_key, cookie, authorization, verified_subject },
                method: &method,
                path: &path,
                user_agent: user_agent.as_deref(),
                header_names: header_names.as_deref(),
                asn: asn.as_deref(),
                country: country.as_deref(),
                anonymous,
                ja4: ja4.as_deref(),
                rule_headers: &rule_headers,
            };
            let (verdict, exchange) = engine.on_request(store, &facts, now);
            (verdict, exchange, method, path, now)
        };
        self.body_limit = engine.wants_body(&exchange);
        self.exchange = exchange;
        let refused_now = verdict.action != Action::Allow || verdict.would_block;
        if (self.exchange.judged() || refused_now) && (engine.config().log_blocks || engine.events_enabled()) {
            self.method = method.chars().take(16).collect();
            self.path = path.split('?').next().unwrap_or("").chars().take(256).collect();
        }
        stats::record(&config.stats, &verdict);
        self.note_decision(&mut verdict, now);
        if verdict.newly_blocked && engine.config().log_blocks {
            log(abi::LOG_WARN, &verdict.log_line(&method, &path));
        }
        log_shadow(engine, &verdict, &method, &path);
        if verdict.action == Action::Block {
            self.flush_decision();
            return self.reply_blocked(&verdict);
        }
        let waits = engine.callouts().is_some_and(|c| c.config.concurrent == abuse_engine::config::Concurrent::Wait);
        if verdict.callout == abuse_engine::CalloutPlan::InFlight && waits && self.park(now) {
            self.pending_decision = None;
            host::set_filter_state(self.envoy, CALLOUT_KEY, "waited");
            return Step::Stop;
        }
        if !end_of_stream && self.body_limit.is_some() && engine.holds_login_headers(&self.exchange) {
            // A native filter that stops its headers still gets the body:
            // the headers wait for it, then carry the login's evidence.
            self.ask_after_body = self.exchange.asks_scorer();
            if self.forged_risk_headers {
                let h = &engine.config().headers;
                for name in [&h.score, &h.reasons, &h.login_risk] {
                    host::set_header(self.envoy, abi::REQUEST_HEADER, name, None);
                }
            }
            self.held_headers = Some(verdict);
            return Step::Stop;
        }
        if self.exchange.asks_scorer() {
            if !end_of_stream && self.body_limit.is_some() {
                self.ask_after_body = true;
                self.headers_sent = true;
                self.set_risk_headers(&verdict, self.forged_risk_headers);
                return Step::Continue;
            }
            return self.ask_scorer();
        }
        self.set_risk_headers(&verdict, self.forged_risk_headers);
        Step::Continue
    }

    /// `Stop` here means "buffer the body and stop".
    pub fn on_request_body(&mut self, end_of_stream: bool) -> Step {
        if self.replied {
            return Step::Stop;
        }
        if self.callout_started_ms.is_some() || self.waiting.is_some() {
            // Held for the scorer's answer: keep buffering.
            return Step::Stop;
        }
        let step = self.read_login_body(end_of_stream);
        if self.held_headers.is_some() {
            if self.body_limit.is_some() {
                return step;
            }
            let Some(mut verdict) = self.held_headers.take() else {
                return step;
            };
            if step == Step::Stop {
                return step;
            }
            if self.ask_after_body {
                self.ask_after_body = false;
                return self.ask_scorer();
            }
            verdict.login_risk = self.config.engine.login_risk(&self.exchange);
            self.set_risk_headers(&verdict, self.forged_risk_headers);
            return Step::Continue;
        }
        if self.ask_after_body && (end_of_stream || self.body_limit.is_none()) {
            self.ask_after_body = false;
            return self.ask_scorer();
        }
        if self.ask_after_body {
            return Step::Stop;
        }
        step
    }

    pub fn on_response_headers(&mut self) -> Step {
        if self.replied {
            return Step::Continue;
        }
        let step = self.judge_answer();
        self.flush_decision();
        step
    }

    /// The stream's scorer callout answered (or failed).
    pub fn on_callout_done(&mut self, id: u64, status: Option<u32>, body: &[u8]) {
        if self.callout_id != Some(id) {
            return;
        }
        self.callout_id = None;
        let config = self.config.clone();
        let engine = &config.engine;
        let now = now_ms();
        let started = self.callout_started_ms.take().unwrap_or(now);
        let answer = parse_answer(status, body).map_err(|failure| {
            let timeout = engine.callouts().map(|c| c.timeout_ms()).unwrap_or(0);
            if failure == CalloutFailure::Reset && now.saturating_sub(started) >= timeout {
                CalloutFailure::TimedOut
            } else {
                failure
            }
        });
        let verdict = engine.on_score_answer(config.store.as_ref(), &self.exchange, answer, now);
        self.finish_callout(verdict);
    }

    /// Woken by the scheduler: the answer this request waited for is in its slot.
    pub fn on_scheduled(&mut self) {
        let Some((_, slot)) = self.waiting.as_ref() else { return };
        let verdict = slot.lock().ok().and_then(|mut s| s.take());
        let Some(mut verdict) = verdict else { return };
        let config = self.config.clone();
        let engine = &config.engine;
        engine.decided(&self.exchange, &mut verdict, "", "", now_ms());
        stats::record_callout(&config.stats, &verdict);
        if let Some(text) = verdict.decision_text() {
            host::set_filter_state(self.envoy, DECISION_KEY, &text);
        }
        if verdict.action == Action::Block {
            self.reply_blocked(&verdict);
        } else {
            self.set_risk_headers(&verdict, true);
            host::continue_decoding(self.envoy);
        }
    }
}

impl AbuseFilter {
    fn park(&mut self, now: u64) -> bool {
        let engine = &self.config.engine;
        // SAFETY: this stream's pointer; the scheduler is deleted in `destroy`.
        let scheduler = unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_new(self.envoy) };
        if scheduler.is_null() {
            return false;
        }
        let slot = Arc::new(Mutex::new(None));
        let deadline_ms = now.saturating_add(engine.callouts().map(|c| c.timeout_ms()).unwrap_or(0) + 100);
        let waiter =
            Waiter { stream: self.stream, scheduler: SendPtr(scheduler), deadline_ms, exchange: self.exchange.clone(), slot: slot.clone() };
        if self.config.park(waiter) {
            self.waiting = Some((scheduler, slot));
            true
        } else {
            // SAFETY: never shared.
            unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler) };
            false
        }
    }

    fn ask_scorer(&mut self) -> Step {
        let config = self.config.clone();
        let engine = &config.engine;
        let (Some(callouts), Some(body)) = (engine.callouts(), engine.score_request_body(&self.exchange)) else {
            return Step::Continue;
        };
        let c = &callouts.config;
        let mut headers: Vec<(&str, &[u8])> = vec![
            (":method", b"POST"),
            (":path", SCORE_PATH.as_bytes()),
            (":authority", c.authority.as_bytes()),
            ("content-type", b"application/json"),
        ];
        if let Some(secret) = &callouts.secret {
            headers.push((SECRET_HEADER, secret.as_bytes()));
        }
        match host::stream_callout(self.envoy, &c.cluster, &headers, &body, callouts.timeout_ms()) {
            Some(id) => {
                config.stats.bump(Counter::CalloutsSent, 1);
                self.callout_id = Some(id);
                self.callout_started_ms = Some(now_ms());
                host::set_filter_state(self.envoy, CALLOUT_KEY, "asked");
                Step::Stop
            }
            None => {
                let now = now_ms();
                let mut verdict = engine.on_score_answer(config.store.as_ref(), &self.exchange, Err(CalloutFailure::Dispatch), now);
                stats::record_callout(&config.stats, &verdict);
                self.note_decision(&mut verdict, now);
                if verdict.action == Action::Block {
                    self.flush_decision();
                    return self.reply_blocked(&verdict);
                }
                if !self.headers_sent {
                    self.set_risk_headers(&verdict, self.forged_risk_headers);
                }
                Step::Continue
            }
        }
    }

    fn finish_callout(&mut self, mut verdict: Verdict) {
        let config = self.config.clone();
        let engine = &config.engine;
        stats::record_callout(&config.stats, &verdict);
        self.note_decision(&mut verdict, now_ms());
        if let Some(b) = engine.callouts() {
            let open = b.breaker.position(now_ms()) != abuse_engine::callout::BreakerPosition::Closed;
            config.breaker_open.store(open, Ordering::Relaxed);
        }
        if verdict.newly_blocked && engine.config().log_blocks {
            log(abi::LOG_WARN, &verdict.log_line(&self.method, &self.path));
        }
        let key = Engine::client_key_of(&self.exchange);
        if verdict.action == Action::Block {
            self.flush_decision();
            self.reply_blocked(&verdict);
            config.wake_ready(now_ms(), Some(key));
            return;
        }
        if !self.headers_sent {
            verdict.login_risk = verdict.login_risk.take().or_else(|| engine.login_risk(&self.exchange));
            self.set_risk_headers(&verdict, self.forged_risk_headers);
        }
        host::continue_decoding(self.envoy);
        config.wake_ready(now_ms(), Some(key));
    }

    fn set_risk_headers(&self, verdict: &Verdict, overwrite: bool) {
        let config = self.config.engine.config();
        let clean = verdict.risk < 1.0 && verdict.reasons.is_empty();
        if config.headers.enabled && (overwrite || !clean) {
            let score = verdict.score_header();
            let reasons = verdict.reasons_header();
            host::set_header(self.envoy, abi::REQUEST_HEADER, &config.headers.score, Some(score.as_bytes()));
            host::set_header(self.envoy, abi::REQUEST_HEADER, &config.headers.reasons, Some(reasons.as_bytes()));
        }
        if config.headers.enabled && (overwrite || verdict.login_risk.is_some()) {
            host::set_header(self.envoy, abi::REQUEST_HEADER, &config.headers.login_risk, verdict.login_risk.as_deref().map(str::as_bytes));
        }
    }

    fn read_login_body(&mut self, end_of_stream: bool) -> Step {
        let Some(limit) = self.body_limit else {
            return Step::Continue;
        };
        let config = self.config.clone();
        let engine = &config.engine;
        let store = config.store.as_ref();
        if host::request_body_size(self.envoy) > limit {
            self.body_limit = None;
            config.stats.bump(Counter::BodiesSkipped, 1);
            return Step::Continue;
        }
        if !end_of_stream {
            return Step::Stop;
        }
        let body = host::request_body(self.envoy);
        let now = now_ms();
        let login = engine.on_request_body(store, &mut self.exchange, &body, now);
        let refused = match login {
            Some(v) if v.action == Action::Block => Some(v),
            login => match engine.on_rule_body(store, &mut self.exchange, &body, now) {
                Some(rules) => {
                    log_shadow(engine, &rules, &self.method, &self.path);
                    if rules.action != Action::Block {
                        stats::record_answer(&config.stats, &rules);
                        login
                    } else {
                        Some(rules)
                    }
                }
                None => login,
            },
        };
        self.body_limit = None;
        if let Some(mut verdict) = refused {
            stats::record_answer(&config.stats, &verdict);
            self.note_decision(&mut verdict, now_ms());
            if verdict.newly_blocked && engine.config().log_blocks {
                log(abi::LOG_WARN, &verdict.log_line(&self.method, &self.path));
            }
            if verdict.action == Action::Block {
                self.ask_after_body = false;
                self.flush_decision();
                return self.reply_blocked(&verdict);
            }
        }
        Step::Continue
    }

    fn judge_answer(&mut self) -> Step {
        let config = self.config.clone();
        let engine = &config.engine;
        let store = config.store.as_ref();
        if !engine.answer_can_count(&self.exchange) {
            return Step::Continue;
        }
        let Some(status) = host::response_status(self.envoy) else {
            return Step::Continue;
        };
        if let (Some(name), true) = (engine.credential_header_for(&self.exchange), (200..300).contains(&status)) {
            if host::header(self.envoy, abi::RESPONSE_HEADER, name).is_some() {
                engine.on_credential_accepted(store, &self.exchange, now_ms());
            }
        }
        if engine.rules_judge_answer(&self.exchange) {
            self.judge_rules_answer(status);
        }
        if !engine.answer_matters(&self.exchange, status) {
            return Step::Continue;
        }
        let kib = if engine.reads_response_size() {
            host::header(self.envoy, abi::RESPONSE_HEADER, "content-length")
                .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.trim().parse::<u64>().ok()))
                .map(|bytes| u32::try_from(bytes.saturating_add(512) / 1024).unwrap_or(u32::MAX))
        } else {
            None
        };
        let Some(mut verdict) = engine.on_response(store, &self.exchange, status, kib, now_ms()) else {
            return Step::Continue;
        };
        stats::record_answer(&config.stats, &verdict);
        self.note_decision(&mut verdict, now_ms());
        if verdict.newly_blocked && engine.config().log_blocks {
            log(abi::LOG_WARN, &verdict.log_line(&self.method, &self.path));
        }
        if verdict.action == Action::Block {
            return self.reply_blocked(&verdict);
        }
        Step::Continue
    }

    fn judge_rules_answer(&mut self, status: u32) {
        let config = self.config.clone();
        let engine = &config.engine;
        let header = |name: &str| host::header(self.envoy, abi::RESPONSE_HEADER, name);
        let response_bytes = if engine.rules_read_response_bytes(&self.exchange) {
            header("content-length").and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.trim().parse::<u64>().ok()))
        } else {
            None
        };
        let values: Vec<(&str, Vec<u8>)> =
            engine.rule_answer_headers(&self.exchange).into_iter().filter_map(|n| header(n).map(|v| (n, v))).collect();
        let headers: Vec<(&str, &[u8])> = values.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        let answer = abuse_engine::RuleAnswer { response_bytes, headers: &headers };
        let now = now_ms();
        if let Some(mut verdict) = engine.on_rule_answer(config.store.as_ref(), &self.exchange, status, &answer, now) {
            stats::record_answer(&config.stats, &verdict);
            self.note_decision(&mut verdict, now);
            log_shadow(engine, &verdict, &self.method, &self.path);
        }
    }

    fn note_decision(&mut self, verdict: &mut Verdict, now: u64) {
        self.config.engine.decided(&self.exchange, verdict, &self.method, &self.path, now);
        if let Some(text) = verdict.decision_text() {
            self.pending_decision = Some(text);
        }
    }

    fn flush_decision(&mut self) {
        if let Some(text) = self.pending_decision.take() {
            host::set_filter_state(self.envoy, DECISION_KEY, &text);
        }
    }

    fn reply_blocked(&mut self, verdict: &Verdict) -> Step {
        // The decision first: Envoy may finish the stream (and write its
        // access log) inside the local reply.
        self.flush_decision();
        let body = verdict.block_body();
        let retry_after = verdict.retry_after_s.to_string();
        let mut headers: Vec<(&str, &[u8])> = vec![("content-type", b"application/json"), ("retry-after", retry_after.as_bytes())];
        if let Some(id) = &verdict.decision_id {
            headers.push((DECISION_HEADER, id.as_bytes()));
        }
        self.replied = true;
        host::send_response(self.envoy, verdict.status, &headers, body.as_bytes());
        Step::Stop
    }
}

fn log_shadow(engine: &Engine, verdict: &Verdict, method: &str, path: &str) {
    if verdict.rules.shadow != 0 || (verdict.on_response && verdict.rules.fired != 0) {
        for line in engine.shadow_lines(verdict, method, path) {
            log(abi::LOG_INFO, &line);
        }
    }
}

