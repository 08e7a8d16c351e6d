//! The engine's own work per request, natively (no Envoy, no wasm): the
//! `make bench` configuration driven with 10,000 client addresses through
//! an in-memory store. Prints nanoseconds per request; the wasm build on V8
//! runs the same code, plus one to two microseconds per host call.

use abuse_engine::{Config, Engine, IdentityInput, MemoryStore, RequestFacts, SEED_BYTES};
use std::time::Instant;

const CONFIG: &str = r#"{
  "mode": "monitor",
  "client": {"trusted_proxies": ["127.0.0.0/8"]},
  "route_groups": [
    {"name": "login", "path_prefix": "/api/login", "methods": ["POST"]},
    {"name": "direct", "path_prefix": "/direct"}
  ],
  "rate": {"limits": [
    {"route_group": "login", "requests": 10, "window_s": 60},
    {"route_group": "direct", "requests": 10000000, "window_s": 60}
  ]}
}"#;

fn main() -> Result<(), String> {
    let config = Config::from_json(CONFIG.as_bytes()).map_err(|e| e.to_string())?;
    let engine = Engine::new(&config, &[7; SEED_BYTES]).map_err(|e| e.to_string())?;
    let store = MemoryStore::new();
    engine.create_state(&store).map_err(|e| format!("{e:?}"))?;
    let addresses: Vec<String> = (0..10_000).map(|c| format!("10.1.{}.{}", c / 256, c % 256)).collect();
    let rounds = 400_000usize;
    let mut now_ms = 1_700_000_000_000u64;
    for phase in ["warm-up", "measured"] {
        let started = Instant::now();
        for n in 0..rounds {
            let xff = addresses.get(n % addresses.len()).map(String::as_bytes);
            let facts = RequestFacts {
                identity: IdentityInput { peer: Some(b"127.0.0.1:40000"), forwarded_for: xff, ..IdentityInput::default() },
                method: "GET",
                path: "/direct",
                user_agent: Some("wrk"),
                header_names: None,
                asn: None,
                country: None,
                anonymous: false,
                ja4: None,
            };
            now_ms += 1;
            let (_verdict, exchange) = engine.on_request(&store, &facts, now_ms);
            if engine.answer_matters(&exchange, 200) {
                let _ = engine.on_response(&store, &exchange, 200, None, now_ms);
            }
        }
        let ns = started.elapsed().as_nanos() / rounds as u128;
        println!("engine, {phase}: {ns} ns per request (native, in-memory store)");
    }
    Ok(())
}
