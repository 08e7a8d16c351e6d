//! Client identity from request facts: peer address, X-Forwarded-For,
//! API key, cookie header (session cookie), Authorization (JWT claim).
#![no_main]
use abuse_engine::identity::{cookie_value, forwarded_client, jwt_claim, parse_peer};
use abuse_engine::IdentityInput;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

mod common;

fuzz_target!(|data: &[u8]| {
    static ENGINE: OnceLock<abuse_engine::Engine> = OnceLock::new();
    let engine = ENGINE.get_or_init(common::engine);
    let [peer, xff, api_key, cookie, authorization] = common::fields::<5>(data);
    let _ = parse_peer(peer);
    let hops = usize::from(data.first().copied().unwrap_or(0) % 8);
    let _ = forwarded_client(xff, hops);
    let _ = cookie_value(cookie, "session");
    let _ = jwt_claim(authorization, "sub");
    let input = IdentityInput {
        peer: Some(peer),
        forwarded_for: Some(xff),
        api_key: Some(api_key),
        cookie: Some(cookie),
        authorization: Some(authorization),
        verified_subject: Some(cookie),
    };
    let _ = engine.identity_policy().identify(&input);
});
