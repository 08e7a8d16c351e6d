//! The per-request context: read only the headers the configuration needs,
//! ask the engine, then forward (with risk headers) or reply locally.

use crate::metrics;
use crate::shared_data::EnvoySharedData;
use abuse_engine::{Action, Engine, IdentityInput, RequestFacts, Verdict};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action as WasmAction, MapType};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

pub struct AbuseFilterHttp {
    engine: Option<Rc<Engine>>,
}

impl AbuseFilterHttp {
    pub fn new(engine: Option<Rc<Engine>>) -> AbuseFilterHttp {
        AbuseFilterHttp { engine }
    }
}

fn header(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

fn now_ms() -> u64 {
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
        let path = String::from_utf8_lossy(&path);
        let method = String::from_utf8_lossy(&method);
        let facts = RequestFacts {
            identity: IdentityInput {
                peer: peer.as_deref(),
                forwarded_for: forwarded_for.as_deref(),
                ..IdentityInput::default()
            },
            method: &method,
            path: &path,
        };
        let verdict = engine.on_request(&EnvoySharedData, &facts, now_ms());
        metrics::record(&verdict);
        let config = engine.config();
        if verdict.newly_blocked && config.log_blocks {
            log::warn!("{}", verdict.log_line(config.mode, &method, &path));
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
