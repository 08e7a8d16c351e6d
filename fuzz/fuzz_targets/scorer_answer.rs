//! What the filter reads from the scorer: the score answer (any status,
//! any body), a fleet-verdict poll, and a warm-start page.
#![no_main]
use abuse_engine::callout::parse_answer;
use abuse_engine::MemoryStore;
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
    let status = data.first().map(|b| 150 + u32::from(*b) * 2);
    let _ = parse_answer(status, data);
    let _ = parse_answer(Some(200), data);
    let now = 1_700_000_000_000;
    let _ = engine.apply_fleet_verdicts(store, data, now);
    let _ = engine.apply_warm(store, data, now);
});
