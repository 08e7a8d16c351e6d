//! Login requests whose headers wait for their body, per worker
//! (`credential_stuffing.hold_login_headers`). Envoy holds them only with
//! `allow_on_headers_stop_iteration: true` in the Wasm filter config;
//! without it a paused header phase stops the body too and the request
//! would hang, so every held request has a deadline and the tick releases
//! the ones past it (with one warning per worker). Bounded: when the list
//! is full, requests are not held.

use proxy_wasm::hostcalls;
use std::cell::RefCell;

const MAX_HELD: usize = 1024;
/// A body normally follows its headers within milliseconds.
const HOLD_MS: u64 = 1000;

#[derive(Default)]
struct Held {
    waiting: Vec<(u32, u64)>,
    released: Vec<u32>,
    warned: bool,
}

thread_local! {
    static HELD: RefCell<Held> = RefCell::new(Held::default());
}

/// Holds a request's headers; false when the list is full.
pub fn hold(context_id: u32) -> bool {
    let deadline = crate::http::now_ms().saturating_add(HOLD_MS);
    HELD.with(|h| match h.try_borrow_mut() {
        Ok(mut h) if h.waiting.len() < MAX_HELD => {
            h.waiting.push((context_id, deadline));
            true
        }
        _ => false,
    })
}

/// The body arrived: the request is no longer held.
pub fn done(context_id: u32) {
    HELD.with(|h| {
        if let Ok(mut h) = h.try_borrow_mut() {
            h.waiting.retain(|(id, _)| *id != context_id);
        }
    });
}

/// Whether the tick released this request (its headers went upstream).
pub fn released(context_id: u32) -> bool {
    HELD.with(|h| match h.try_borrow_mut() {
        Ok(mut h) => match h.released.iter().position(|id| *id == context_id) {
            Some(i) => {
                h.released.swap_remove(i);
                true
            }
            None => false,
        },
        Err(_) => false,
    })
}

/// Releases the requests held past their deadline (on each tick).
pub fn release_overdue(now_ms: u64) {
    let overdue: Vec<u32> = HELD.with(|h| {
        let Ok(mut h) = h.try_borrow_mut() else {
            return Vec::new();
        };
        let (late, kept): (Vec<_>, Vec<_>) = h.waiting.drain(..).partition(|(_, d)| *d <= now_ms);
        h.waiting = kept;
        let ids: Vec<u32> = late.into_iter().map(|(id, _)| id).collect();
        if !ids.is_empty() && !h.warned {
            h.warned = true;
            log::warn!(
                "abuse_filter: login headers held without a body for {HOLD_MS} ms: set \
                 allow_on_headers_stop_iteration: true in the Wasm filter config, or \
                 credential_stuffing.hold_login_headers: false"
            );
        }
        for id in &ids {
            if h.released.len() < MAX_HELD {
                h.released.push(*id);
            }
        }
        ids
    });
    for id in overdue {
        if hostcalls::set_effective_context(id).is_ok() {
            let _ = hostcalls::resume_http_request();
        }
    }
}
