//! Requests that wait for another request's scorer callout about the same
//! client (`scorer.concurrent: "wait"`), per worker. They are resumed when
//! that callout's answer lands (same worker: at once; another worker: on
//! the next tick, from the shared verdict cache) or, at their deadline, by
//! the failure mode. Bounded: when the list is full, requests proceed.

use crate::http::{reply_blocked, set_risk_headers};
use crate::metrics;
use crate::shared_data::EnvoySharedData;
use abuse_engine::{Action, Engine, Exchange};
use proxy_wasm::hostcalls;
use std::cell::RefCell;

const MAX_WAITERS: usize = 1024;

pub struct Waiter {
    pub context_id: u32,
    pub deadline_ms: u64,
    pub exchange: Exchange,
}

thread_local! {
    static WAITERS: RefCell<Vec<Waiter>> = const { RefCell::new(Vec::new()) };
}

/// Parks a request; false when the list is full (the request proceeds).
pub fn park(waiter: Waiter) -> bool {
    WAITERS.with(|w| match w.try_borrow_mut() {
        Ok(mut list) if list.len() < MAX_WAITERS => {
            list.push(waiter);
            true
        }
        _ => false,
    })
}

/// Resumes the waiters whose answer is there or whose deadline passed
/// (only those about `client_key`, when given).
pub fn resume_ready(engine: &Engine, now_ms: u64, client_key: Option<u64>) {
    let ready: Vec<(Waiter, abuse_engine::Verdict)> = WAITERS.with(|w| {
        let Ok(mut list) = w.try_borrow_mut() else {
            return Vec::new();
        };
        let mut ready = Vec::new();
        let mut kept = Vec::with_capacity(list.len());
        for waiter in list.drain(..) {
            let mine = client_key.is_none_or(|k| Engine::client_key_of(&waiter.exchange) == k);
            let verdict = if mine {
                engine.waiting_verdict(&EnvoySharedData, &waiter.exchange, waiter.deadline_ms, now_ms)
            } else {
                None
            };
            match verdict {
                Some(v) => ready.push((waiter, v)),
                None => kept.push(waiter),
            }
        }
        *list = kept;
        ready
    });
    for (waiter, verdict) in ready {
        // The request may be gone (client hung up): then there is nothing to do.
        if hostcalls::set_effective_context(waiter.context_id).is_err() {
            continue;
        }
        let mut verdict = verdict;
        engine.decided(&waiter.exchange, &mut verdict, "", "", crate::http::now_ms());
        metrics::record_callout(&verdict);
        // The shared answer, written now (the waiter kept no decision of its
        // own; a decision on its answer would overwrite this one, later).
        if let Some(text) = verdict.decision_text() {
            crate::http::write_decision(&text);
        }
        if verdict.action == Action::Block {
            reply_blocked(&verdict);
        } else {
            // Whether the client sent its own is unknown here: always overwrite.
            set_risk_headers(engine, &verdict, true);
            let _ = hostcalls::resume_http_request();
        }
    }
}
