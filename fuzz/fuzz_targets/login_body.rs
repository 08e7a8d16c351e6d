//! Login bodies, JSON or form: the username and password fields, then the
//! whole request + body path of the engine against an in-memory store.
#![no_main]
use abuse_engine::detectors::login::extract_username;
use abuse_engine::identity::IdentityInput;
use abuse_engine::{MemoryStore, RequestFacts};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

mod common;

fuzz_target!(|data: &[u8]| {
    static ENGINE: OnceLock<(abuse_engine::Engine, MemoryStore)> = OnceLock::new();
    let (engine, store) = ENGINE.get_or_init(|| {
        let engine = common::engine();
        let store = MemoryStore::new();
        let _ = engine.create_state(&store);
        (engine, store)
    });
    let _ = extract_username(data, "username");
    let _ = extract_username(data, "password");
    let facts = RequestFacts {
        identity: IdentityInput { peer: Some(b"127.0.0.1:5"), forwarded_for: Some(b"198.51.100.7"), ..IdentityInput::default() },
        method: "POST",
        path: "/api/login",
        user_agent: Some("Mozilla/5.0"),
        header_names: Some("host,user-agent,content-type"),
        ..RequestFacts::default()
    };
    let now = 1_700_000_000_000;
    let (_, mut exchange) = engine.on_request(store, &facts, now);
    let _ = engine.on_request_body(store, &mut exchange, data, now);
});
