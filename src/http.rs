//! The per-request context: read only the headers the configuration needs,
//! ask the engine, then forward (with risk headers) or reply locally.

use crate::header_map::HeaderMap;
use crate::metrics;
use crate::shared_data::EnvoySharedData;
use abuse_engine::callout::{parse_answer, CalloutFailure};
use abuse_engine::facts::Facts;
use abuse_engine::wire::{SCORE_PATH, SECRET_HEADER};
use abuse_engine::{Action, Engine, Exchange, IdentityInput, RequestFacts, Verdict};
use std::time::Duration;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action as WasmAction, BufferType, MapType};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

pub struct AbuseFilterHttp {
    engine: Option<Rc<Engine>>,
    context_id: u32,
    /// What the engine needs to judge the answer.
    exchange: Exchange,
    /// Largest login body still worth reading (None: do not read the body).
    body_limit: Option<usize>,
    /// Kept for the log line of a block decided on the answer: request
    /// headers cannot be read in the response phase (the SDK would trap).
    method: String,
    path: String,
    /// When the scorer callout went out (ms), while one is in flight.
    callout_started_ms: Option<u64>,
    /// The login body must be read before asking the scorer.
    ask_after_body: bool,
    /// The request headers already went upstream: they can no longer be
    /// changed (Envoy refuses, and the SDK would trap).
    headers_sent: bool,
    /// The client sent its own risk headers: they must be overwritten.
    forged_risk_headers: bool,
    /// The latest decision worth logging, written as filter state once (see
    /// `flush_decision`): when the request is blocked, or at the answer.
    pending_decision: Option<String>,
    /// The login request's headers are held until its body was read
    /// (`credential_stuffing.hold_login_headers`); what they will carry.
    held_headers: Option<Verdict>,
}

impl AbuseFilterHttp {
    pub fn new(engine: Option<Rc<Engine>>, context_id: u32) -> AbuseFilterHttp {
        AbuseFilterHttp {
            engine,
            context_id,
            exchange: Exchange::default(),
            body_limit: None,
            method: String::new(),
            path: String::new(),
            callout_started_ms: None,
            ask_after_body: false,
            headers_sent: false,
            forged_risk_headers: false,
            pending_decision: None,
            held_headers: None,
        }
    }
}

/// The `:status` of a response (or callout response) header map.
pub fn status_of(map: MapType) -> Option<u32> {
    let value = hostcalls::get_map_value_bytes(map, ":status").ok().flatten()?;
    std::str::from_utf8(&value).ok()?.parse().ok()
}

pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl HttpContext for AbuseFilterHttp {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> WasmAction {
        let Some(engine) = self.engine.clone() else {
            return WasmAction::Continue;
        };
        let policy = engine.identity_policy();
        // Every host call costs a few microseconds on V8 (`make
        // bench-hostcalls`): all request headers come in one call, and with
        // `client.facts_header` the peer address and the clock come in it
        // too (Envoy's header_mutation wrote them); else two more calls.
        let headers = HeaderMap::request();
        let facts_header = engine.config().client.facts_header.as_deref();
        let request_facts = facts_header.and_then(|name| headers.get(name)).and_then(Facts::parse);
        if cfg!(feature = "phase-headers") {
            // Benchmark build: the price of reading the request's facts.
            std::hint::black_box(&request_facts);
            return WasmAction::Continue;
        }
        let property_peer: Option<Vec<u8>>;
        let (peer, now) = match request_facts {
            Some(f) => (Some(f.peer), f.start_ms),
            None => {
                property_peer = hostcalls::get_property(vec!["source", "address"]).ok().flatten();
                (property_peer.as_deref(), now_ms())
            }
        };
        let forwarded_for = if policy.reads_forwarded_for() { headers.get(&policy.forwarded_for_header) } else { None };
        let path = String::from_utf8_lossy(headers.get(":path").unwrap_or_default());
        let method = String::from_utf8_lossy(headers.get(":method").unwrap_or_default());
        let user_agent = if engine.reads_user_agent() { headers.get("user-agent") } else { None };
        let api_key = match (&policy.api_key_header, engine.reads_api_key()) {
            (Some(name), true) => headers.get(name),
            _ => None,
        };
        let user_agent = user_agent.map(String::from_utf8_lossy);
        let geo = &engine.config().geo;
        let asn = geo.asn_header.as_deref().and_then(|h| headers.get(h)).map(String::from_utf8_lossy);
        let country = geo.country_header.as_deref().and_then(|h| headers.get(h)).map(String::from_utf8_lossy);
        let anonymous = geo
            .anonymous_headers
            .iter()
            .any(|h| headers.get(h).is_some_and(|v| v.eq_ignore_ascii_case(b"true")));
        let cookie = if engine.reads_cookie() { headers.get("cookie") } else { None };
        let authorization = if engine.reads_authorization() { headers.get("authorization") } else { None };
        let verified_subject = policy.verified_subject_header.as_deref().and_then(|h| headers.get(h));
        // Header names in the client's order, on login routes only.
        let header_names = engine.wants_fingerprint(&method, &path).then(|| headers.names(64));
        // The TLS fingerprint for the login's device: a header named for it,
        // else the facts header's (Envoy's %TLS_JA4_FINGERPRINT%).
        let ja4 = match (engine.ja4_header(), &header_names) {
            (Some(h), Some(_)) => headers.get(h).map(String::from_utf8_lossy),
            (None, Some(_)) => request_facts.as_ref().and_then(|f| f.ja4).map(String::from_utf8_lossy),
            _ => None,
        };
        // The request headers the rules read (only when rules are configured).
        let rule_headers: Vec<(&str, &[u8])> = engine
            .rule_header_names()
            .iter()
            .filter_map(|name| headers.get(name).map(|v| (name.as_str(), v)))
            .collect();
        let h = &engine.config().headers;
        self.forged_risk_headers = h.enabled
            && (headers.get(&h.score).is_some() || headers.get(&h.reasons).is_some() || headers.get(&h.login_risk).is_some());
        let facts = RequestFacts {
            identity: IdentityInput {
                peer,
                forwarded_for,
                api_key,
                cookie,
                authorization,
                verified_subject,
            },
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
        let (mut verdict, exchange) = engine.on_request(&EnvoySharedData, &facts, now);
        self.body_limit = engine.wants_body(&exchange);
        self.exchange = exchange;
        let refused_now = verdict.action != Action::Allow || verdict.would_block;
        if (self.exchange.judged() || refused_now) && (engine.config().log_blocks || engine.events_enabled()) {
            // For the log line and the decision event of a block decided
            // now or later (the answer, the scorer).
            self.method = method.chars().take(16).collect();
            self.path = path.split('?').next().unwrap_or("").chars().take(256).collect();
        }
        metrics::record(&verdict);
        self.note_decision(&engine, &mut verdict, now);
        let config = engine.config();
        if verdict.newly_blocked && config.log_blocks {
            log::warn!("{}", verdict.log_line(&method, &path));
        }
        log_shadow(&engine, &verdict, &method, &path);
        if verdict.action == Action::Block {
            self.flush_decision();
            return reply_blocked(&verdict);
        }
        let waits = engine
            .callouts()
            .is_some_and(|c| c.config.concurrent == abuse_engine::config::Concurrent::Wait);
        if verdict.callout == abuse_engine::CalloutPlan::InFlight && waits {
            let deadline_ms = now_ms().saturating_add(engine.callouts().map(|c| c.timeout_ms()).unwrap_or(0) + 100);
            let waiter = crate::waiters::Waiter { context_id: self.context_id, deadline_ms, exchange: self.exchange.clone() };
            if crate::waiters::park(waiter) {
                // The shared answer decides; the waiter writes it when it resumes.
                self.pending_decision = None;
                write_filter_state(CALLOUT_PROPERTY, "waited");
                return WasmAction::Pause;
            }
        }
        if !end_of_stream && self.body_limit.is_some() && engine.holds_login_headers(&self.exchange) && crate::held::hold(self.context_id) {
            // Headers wait for the body (Envoy's allow_on_headers_stop_iteration):
            // the login-risk header then carries the account's evidence, and a
            // refused attempt never reaches the upstream. The scorer, when
            // asked, is asked after the body too.
            self.ask_after_body = self.exchange.asks_scorer();
            if self.forged_risk_headers {
                // Removed now, not when the body is in: should Envoy not
                // hold the headers (allow_on_headers_stop_iteration off),
                // they go upstream without the client's own risk headers.
                let h = &engine.config().headers;
                for name in [&h.score, &h.reasons, &h.login_risk] {
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
                }
            }
            self.held_headers = Some(verdict);
            return WasmAction::Pause;
        }
        if self.exchange.asks_scorer() {
            if !end_of_stream && self.body_limit.is_some() {
                // Ask once the login body gave the username. The headers go
                // on (Envoy would not deliver the body to a filter holding
                // them); the body is held until the scorer answers.
                self.ask_after_body = true;
                self.headers_sent = true;
                set_risk_headers(&engine, &verdict, self.forged_risk_headers);
                return WasmAction::Continue;
            }
            return self.ask_scorer(&engine);
        }
        set_risk_headers(&engine, &verdict, self.forged_risk_headers);
        WasmAction::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> WasmAction {
        let Some(engine) = self.engine.clone() else {
            return WasmAction::Continue;
        };
        if self.held_headers.is_some() && crate::held::released(self.context_id) {
            // Released by the tick: Envoy did not hold the headers (its
            // allow_on_headers_stop_iteration is off); they went upstream.
            self.held_headers = None;
            self.headers_sent = true;
        }
        let action = self.read_login_body(&engine, body_size, end_of_stream);
        if self.held_headers.is_some() {
            if self.body_limit.is_some() {
                // Still buffering the body.
                return action;
            }
            crate::held::done(self.context_id);
            let Some(mut verdict) = self.held_headers.take() else {
                return action;
            };
            if matches!(action, WasmAction::Pause) {
                // Refused: the local reply went out, nothing goes upstream.
                return action;
            }
            if self.ask_after_body {
                // The headers are written with the scorer's answer.
                self.ask_after_body = false;
                return self.ask_scorer(&engine);
            }
            verdict.login_risk = engine.login_risk(&self.exchange);
            set_risk_headers(&engine, &verdict, self.forged_risk_headers);
            return WasmAction::Continue;
        }
        if self.ask_after_body && (end_of_stream || self.body_limit.is_none()) {
            self.ask_after_body = false;
            return self.ask_scorer(&engine);
        }
        if self.ask_after_body {
            return WasmAction::Pause;
        }
        action
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> WasmAction {
        if cfg!(feature = "phase-request") {
            // Benchmark build: the request judged, the answer not.
            return WasmAction::Continue;
        }
        let action = self.judge_answer();
        self.flush_decision();
        action
    }
}

impl Context for AbuseFilterHttp {
    fn on_http_call_response(&mut self, _token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        let Some(engine) = self.engine.clone() else {
            return;
        };
        let now = now_ms();
        let started = self.callout_started_ms.take().unwrap_or(now);
        // No headers at all: the callout was reset or timed out.
        let status = if num_headers == 0 { None } else { status_of(MapType::HttpCallResponseHeaders) };
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size.min(abuse_engine::wire::MAX_SCORE_ANSWER_BYTES + 1))
            .ok()
            .flatten()
            .unwrap_or_default();
        let answer = parse_answer(status, &body).map_err(|failure| {
            let timeout = engine.callouts().map(|c| c.timeout_ms()).unwrap_or(0);
            if failure == CalloutFailure::Reset && now.saturating_sub(started) >= timeout {
                CalloutFailure::TimedOut
            } else {
                failure
            }
        });
        let verdict = engine.on_score_answer(&EnvoySharedData, &self.exchange, answer, now);
        self.finish_callout(&engine, verdict);
    }
}

impl AbuseFilterHttp {
    /// Sends the scorer the question and holds the request until it answers.
    fn ask_scorer(&mut self, engine: &Rc<Engine>) -> WasmAction {
        let (Some(callouts), Some(body)) = (engine.callouts(), engine.score_request_body(&self.exchange)) else {
            return WasmAction::Continue;
        };
        let c = &callouts.config;
        let mut headers = vec![
            (":method", "POST"),
            (":path", SCORE_PATH),
            (":authority", c.authority.as_str()),
            ("content-type", "application/json"),
        ];
        if let Some(secret) = &callouts.secret {
            headers.push((SECRET_HEADER, secret.as_str()));
        }
        let timeout = Duration::from_millis(callouts.timeout_ms());
        match hostcalls::dispatch_http_call(&c.cluster, headers, Some(&body), vec![], timeout) {
            Ok(_token) => {
                metrics::bump(metrics::Counter::CalloutsSent, 1);
                self.callout_started_ms = Some(now_ms());
                write_filter_state(CALLOUT_PROPERTY, "asked");
                WasmAction::Pause
            }
            Err(_) => {
                // No such cluster, or Envoy refused: a failure like any other.
                let mut verdict =
                    engine.on_score_answer(&EnvoySharedData, &self.exchange, Err(CalloutFailure::Dispatch), now_ms());
                metrics::record_callout(&verdict);
                self.note_decision(engine, &mut verdict, now_ms());
                if verdict.action == Action::Block {
                    self.flush_decision();
                    return reply_blocked(&verdict);
                }
                if !self.headers_sent {
                    set_risk_headers(engine, &verdict, self.forged_risk_headers);
                }
                WasmAction::Continue
            }
        }
    }

    /// Acts on the scorer's verdict for the held request.
    fn finish_callout(&mut self, engine: &Rc<Engine>, mut verdict: Verdict) {
        metrics::record_callout(&verdict);
        self.note_decision(engine, &mut verdict, now_ms());
        if let Some(b) = engine.callouts() {
            metrics::breaker_open(b.breaker.position(now_ms()) != abuse_engine::callout::BreakerPosition::Closed);
        }
        let config = engine.config();
        if verdict.newly_blocked && config.log_blocks {
            log::warn!("{}", verdict.log_line(&self.method, &self.path));
        }
        if verdict.action == Action::Block {
            self.flush_decision();
            reply_blocked(&verdict);
            crate::waiters::resume_ready(engine, now_ms(), Some(Engine::client_key_of(&self.exchange)));
            return;
        }
        if !self.headers_sent {
            verdict.login_risk = verdict.login_risk.take().or_else(|| engine.login_risk(&self.exchange));
            set_risk_headers(engine, &verdict, self.forged_risk_headers);
        }
        let _ = hostcalls::resume_http_request();
        // Requests of the same client waiting on this worker share the answer.
        crate::waiters::resume_ready(engine, now_ms(), Some(Engine::client_key_of(&self.exchange)));
    }
}

/// Risk headers for the upstream: set when the client has a score or a
/// reason, or when it sent its own (`overwrite`): set, not added, so a client
/// cannot smuggle its own score upstream. No header means score 0 — the
/// common case costs no host call.
pub fn set_risk_headers(engine: &Engine, verdict: &Verdict, overwrite: bool) {
    let config = engine.config();
    let clean = verdict.risk < 1.0 && verdict.reasons.is_empty();
    if config.headers.enabled && (overwrite || !clean) {
        let score = verdict.score_header();
        let reasons = verdict.reasons_header();
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, &config.headers.score, Some(&score));
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, &config.headers.reasons, Some(&reasons));
    }
    // The login's risk (login routes only); a client-sent copy is removed.
    if config.headers.enabled && (overwrite || verdict.login_risk.is_some()) {
        let _ = hostcalls::set_map_value(
            MapType::HttpRequestHeaders,
            &config.headers.login_risk,
            verdict.login_risk.as_deref(),
        );
    }
}

impl AbuseFilterHttp {
    /// Buffers and reads the login body (bounded); returns what to tell Envoy.
    fn read_login_body(&mut self, engine: &Rc<Engine>, body_size: usize, end_of_stream: bool) -> WasmAction {
        let Some(limit) = self.body_limit else {
            return WasmAction::Continue;
        };
        if body_size > limit {
            // Too big for a login form: not read, never buffered further.
            self.body_limit = None;
            metrics::bump(metrics::Counter::BodiesSkipped, 1);
            return WasmAction::Continue;
        }
        if !end_of_stream {
            // Let Envoy buffer until the whole (small) body is there.
            return WasmAction::Pause;
        }
        let refused = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(Some(body)) => {
                let now = now_ms();
                // The login first (it reads the username rules may key by), then the rules.
                let login = engine.on_request_body(&EnvoySharedData, &mut self.exchange, &body, now);
                match login {
                    Some(v) if v.action == Action::Block => Some(v),
                    login => match engine.on_rule_body(&EnvoySharedData, &mut self.exchange, &body, now) {
                        Some(rules) => {
                            log_shadow(engine, &rules, &self.method, &self.path);
                            if rules.action != Action::Block {
                                // Counted for the stats; the login's verdict (if any) goes on below.
                                metrics::record_answer(&rules);
                                login
                            } else {
                                Some(rules)
                            }
                        }
                        None => login,
                    },
                }
            }
            _ => None,
        };
        self.body_limit = None;
        if let Some(mut verdict) = refused {
            // Refused before the upstream saw the body: the attempt never runs.
            metrics::record_answer(&verdict);
            self.note_decision(engine, &mut verdict, now_ms());
            if verdict.newly_blocked && engine.config().log_blocks {
                log::warn!("{}", verdict.log_line(&self.method, &self.path));
            }
            if verdict.action == Action::Block {
                self.ask_after_body = false;
                self.flush_decision();
                return reply_blocked(&verdict);
            }
        }
        WasmAction::Continue
    }

    fn judge_answer(&mut self) -> WasmAction {
        let Some(engine) = self.engine.clone() else {
            return WasmAction::Continue;
        };
        // No host call where no answer can count (allowlisted, blocked, or
        // no detector reads this route's answers).
        if !engine.answer_can_count(&self.exchange) {
            return WasmAction::Continue;
        }
        let Some(status) = status_of(MapType::HttpResponseHeaders) else {
            return WasmAction::Continue;
        };
        if let (Some(name), true) = (engine.credential_header_for(&self.exchange), (200..300).contains(&status)) {
            // The upstream says it accepted the request's credential (one
            // header read, only while the credential is not yet accepted).
            if hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name).ok().flatten().is_some() {
                engine.on_credential_accepted(&EnvoySharedData, &self.exchange, now_ms());
            }
        }
        if engine.rules_judge_answer(&self.exchange) {
            self.judge_rules_answer(&engine, status);
        }
        if !engine.answer_matters(&self.exchange, status) {
            return WasmAction::Continue;
        }
        let kib = if engine.reads_response_size() {
            hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, "content-length")
                .ok()
                .flatten()
                .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.trim().parse::<u64>().ok()))
                // Nearest KiB: small answers (< 512 B) cost no shared-data update.
                .map(|bytes| u32::try_from(bytes.saturating_add(512) / 1024).unwrap_or(u32::MAX))
        } else {
            None
        };
        let Some(mut verdict) = engine.on_response(&EnvoySharedData, &self.exchange, status, kib, now_ms()) else {
            return WasmAction::Continue;
        };
        metrics::record_answer(&verdict);
        self.note_decision(&engine, &mut verdict, now_ms());
        let config = engine.config();
        if verdict.newly_blocked && config.log_blocks {
            log::warn!("{}", verdict.log_line(&self.method, &self.path));
        }
        if verdict.action == Action::Block {
            // The client is blocked from now on, this answer included: a
            // login that an account takeover just won never reaches it.
            return reply_blocked(&verdict);
        }
        WasmAction::Continue
    }
}

impl AbuseFilterHttp {
    /// The rules counted at the answer (failures, costs) and their resets:
    /// only the headers they name are read. A key that fires here is
    /// refused from its next request on; this answer goes on.
    fn judge_rules_answer(&mut self, engine: &Rc<Engine>, status: u32) {
        let header = |name: &str| hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name).ok().flatten();
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
        if let Some(mut verdict) = engine.on_rule_answer(&EnvoySharedData, &self.exchange, status, &answer, now) {
            metrics::record_answer(&verdict);
            self.note_decision(engine, &mut verdict, now);
            log_shadow(engine, &verdict, &self.method, &self.path);
        }
    }
}

/// A shadow rule that would have acted says so, one log line each; so
/// does a rule that fired on an answer.
fn log_shadow(engine: &Engine, verdict: &Verdict, method: &str, path: &str) {
    if verdict.rules.shadow != 0 || (verdict.on_response && verdict.rules.fired != 0) {
        for line in engine.shadow_lines(verdict, method, path) {
            log::info!("{line}");
        }
    }
}

/// Filter state key of the decision, for Envoy's access log:
/// `%FILTER_STATE(wasm.abuse_filter:PLAIN)%` (Envoy prefixes `wasm.`).
pub const DECISION_PROPERTY: &str = "abuse_filter";

/// Filter state key set on a request held for a scorer callout: `asked`
/// (it sent the callout) or `waited` (it waited for another request's
/// callout about the same client), for Envoy's access log:
/// `%FILTER_STATE(wasm.abuse_filter_callout:PLAIN)%`. Such a request may
/// take up to the scorer's timeout; no other request waits on the scorer
/// (`make soak` tells the two apart by it). One host call per callout.
pub const CALLOUT_PROPERTY: &str = "abuse_filter_callout";

/// Response header of a refusal naming its decision (`3fa2-1-2c`).
pub const DECISION_HEADER: &str = "x-abuse-decision";


#[link(wasm_import_module = "env")]
extern "C" {
    // The raw host call: the SDK's `hostcalls::set_property` panics on any
    // status but Ok (NotFound without a stream, BadArgument for a read-only
    // declared property), and a panic traps the VM.
    #[link_name = "proxy_set_property"]
    fn raw_proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
}

/// Writes the decision as filter state `wasm.abuse_filter` for Envoy's
/// access log (`%FILTER_STATE(wasm.abuse_filter:PLAIN)%`; Envoy prefixes
/// `wasm.`). One host call that returns nothing (about 1 µs on V8); the
/// status is ignored — logging never changes what happens to the request.
pub fn write_decision(text: &str) {
    write_filter_state(DECISION_PROPERTY, text);
}

/// Writes filter state `wasm.<key>` (the status is ignored, as above).
fn write_filter_state(key: &str, text: &str) {
    let path = key.as_bytes();
    // SAFETY: both pointers are valid for their lengths for the whole call;
    // the host only reads them.
    let _status = unsafe { raw_proxy_set_property(path.as_ptr(), path.len(), text.as_ptr(), text.len()) };
}

impl AbuseFilterHttp {
    /// Keeps the latest decision worth logging (the common clean request
    /// keeps nothing and costs nothing).
    fn note_decision(&mut self, engine: &Engine, verdict: &mut Verdict, now: u64) {
        // The decision's id and event (a clean allow costs a comparison).
        engine.decided(&self.exchange, verdict, &self.method, &self.path, now);
        if let Some(text) = verdict.decision_text() {
            self.pending_decision = Some(text);
        }
    }

    /// Writes the kept decision, once per request — when the request is
    /// blocked, or when its answer was judged — so the log shows the last
    /// decision (the answer's or the scorer's included) for one host call,
    /// however many decisions the request went through.
    fn flush_decision(&mut self) {
        if let Some(text) = self.pending_decision.take() {
            write_decision(&text);
        }
    }
}

pub fn reply_blocked(verdict: &Verdict) -> WasmAction {
    let body = verdict.block_body();
    let retry_after = verdict.retry_after_s.to_string();
    let mut headers = vec![("content-type", "application/json"), ("retry-after", retry_after.as_str())];
    if let Some(id) = &verdict.decision_id {
        // What a refused user quotes to support (also in the body).
        headers.push((DECISION_HEADER, id.as_str()));
    }
    match hostcalls::send_http_response(verdict.status, headers, Some(body.as_bytes())) {
        Ok(()) => WasmAction::Pause,
        // Could not reply: fail open rather than hang the request.
        Err(_) => WasmAction::Continue,
    }
}
