//! The per-request context: read only the headers the configuration needs,
//! ask the engine, then forward (with risk headers) or reply locally.

use crate::metrics;
use crate::shared_data::EnvoySharedData;
use abuse_engine::{Action, Engine, Exchange, IdentityInput, RequestFacts, Verdict};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action as WasmAction, BufferType, MapType};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

pub struct AbuseFilterHttp {
    engine: Option<Rc<Engine>>,
    /// What the engine needs to judge the answer.
    exchange: Exchange,
    /// Largest login body still worth reading (None: do not read the body).
    body_limit: Option<usize>,
    /// Kept for the log line of a block decided on the answer: request
    /// headers cannot be read in the response phase (the SDK would trap).
    method: String,
    path: String,
}

impl AbuseFilterHttp {
    pub fn new(engine: Option<Rc<Engine>>) -> AbuseFilterHttp {
        AbuseFilterHttp {
            engine,
            exchange: Exchange::default(),
            body_limit: None,
            method: String::new(),
            path: String::new(),
        }
    }
}

fn header(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Context for AbuseFilterHttp {}

impl HttpContext for AbuseFilterHttp {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> WasmAction {
        let Some(engine) = self.engine.clone() else {
            return WasmAction::Continue;
        };
        let policy = engine.identity_policy();
        let peer = hostcalls::get_property(vec!["source", "address"]).ok().flatten();
        let forwarded_for = if policy.reads_forwarded_for() {
            header(&policy.forwarded_for_header)
        } else {
            None
        };
        let path = header(":path").unwrap_or_default();
        let method = header(":method").unwrap_or_default();
        let user_agent = if engine.reads_user_agent() { header("user-agent") } else { None };
        let api_key = match (&policy.api_key_header, engine.reads_api_key()) {
            (Some(name), true) => header(name),
            _ => None,
        };
        let path = String::from_utf8_lossy(&path);
        let method = String::from_utf8_lossy(&method);
        let user_agent = user_agent.as_deref().map(String::from_utf8_lossy);
        let geo = &engine.config().geo;
        let asn = geo.asn_header.as_deref().and_then(header);
        let asn = asn.as_deref().map(String::from_utf8_lossy);
        let country = geo.country_header.as_deref().and_then(header);
        let country = country.as_deref().map(String::from_utf8_lossy);
        let anonymous = geo
            .anonymous_headers
            .iter()
            .any(|h| header(h).is_some_and(|v| v.eq_ignore_ascii_case(b"true")));
        let cookie = if engine.reads_cookie() { header("cookie") } else { None };
        let authorization = if engine.reads_authorization() { header("authorization") } else { None };
        // One host call for all names, on login routes only.
        let header_names = if engine.wants_fingerprint(&method, &path) {
            hostcalls::get_map_bytes(MapType::HttpRequestHeaders).ok().map(|pairs| {
                pairs.iter().map(|(name, _)| name.as_str()).take(64).collect::<Vec<_>>().join(",")
            })
        } else {
            None
        };
        let facts = RequestFacts {
            identity: IdentityInput {
                peer: peer.as_deref(),
                forwarded_for: forwarded_for.as_deref(),
                api_key: api_key.as_deref(),
                cookie: cookie.as_deref(),
                authorization: authorization.as_deref(),
            },
            method: &method,
            path: &path,
            user_agent: user_agent.as_deref(),
            header_names: header_names.as_deref(),
            asn: asn.as_deref(),
            country: country.as_deref(),
            anonymous,
        };
        let (verdict, exchange) = engine.on_request(&EnvoySharedData, &facts, now_ms());
        self.body_limit = engine.wants_body(&exchange);
        self.exchange = exchange;
        if self.exchange.judged() {
            self.method = method.chars().take(16).collect();
            self.path = path.chars().take(256).collect();
        }
        metrics::record(&verdict);
        let config = engine.config();
        if verdict.newly_blocked && config.log_blocks {
            log::warn!("{}", verdict.log_line(&method, &path));
        }
        if verdict.action == Action::Block {
            return reply_blocked(&verdict);
        }
        if config.headers.enabled {
            // Set, not add: a client must not smuggle its own score upstream.
            let score = verdict.score_header();
            let reasons = verdict.reasons_header();
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, &config.headers.score, Some(&score));
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, &config.headers.reasons, Some(&reasons));
        }
        WasmAction::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> WasmAction {
        let (Some(engine), Some(limit)) = (self.engine.clone(), self.body_limit) else {
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
        if let Ok(Some(body)) = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            engine.on_request_body(&mut self.exchange, &body);
        }
        self.body_limit = None;
        WasmAction::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> WasmAction {
        let Some(engine) = self.engine.clone() else {
            return WasmAction::Continue;
        };
        let Some(status) = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| std::str::from_utf8(&s).ok().and_then(|s| s.parse::<u32>().ok()))
        else {
            return WasmAction::Continue;
        };
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
        let Some(verdict) = engine.on_response(&EnvoySharedData, &self.exchange, status, kib, now_ms()) else {
            return WasmAction::Continue;
        };
        metrics::record_answer(&verdict);
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

fn reply_blocked(verdict: &Verdict) -> WasmAction {
    let body = verdict.block_body();
    let retry_after = verdict.retry_after_s.to_string();
    let headers = vec![("content-type", "application/json"), ("retry-after", retry_after.as_str())];
    match hostcalls::send_http_response(verdict.status, headers, Some(body.as_bytes())) {
        Ok(()) => WasmAction::Pause,
        // Could not reply: fail open rather than hang the request.
        Err(_) => WasmAction::Continue,
    }
}
