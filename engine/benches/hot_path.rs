//! The engine's work per request, natively (`cargo bench -p abuse-engine`):
//! the `make bench` configuration (every detector on, limits nobody
//! reaches) driven with 10,000 client addresses through an in-memory store,
//! with the per-worker tier (the default) and without it (every request a
//! read-modify-write of the client's 5 KiB shard); and the facts header's
//! parse. The wasm build on V8 runs the same code, plus the host calls.

use abuse_engine::facts::Facts;
use abuse_engine::{Config, Engine, IdentityInput, MemoryStore, RequestFacts, SEED_BYTES};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

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
  ]},
  "state": {"worker_clients": WORKER}
}"#;

fn engine(worker_clients: u32) -> (Engine, MemoryStore) {
    let json = CONFIG.replace("WORKER", &worker_clients.to_string());
    let config = match Config::from_json(json.as_bytes()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench config: {e}");
            std::process::exit(1)
        }
    };
    let engine = match Engine::new(&config, &[7; SEED_BYTES]) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("bench engine: {e}");
            std::process::exit(1)
        }
    };
    let store = MemoryStore::new();
    let _ = engine.create_state(&store);
    (engine, store)
}

fn requests(c: &mut Criterion) {
    let addresses: Vec<String> = (0..10_000).map(|c| format!("10.1.{}.{}", c / 256, c % 256)).collect();
    for (name, worker_clients) in [("request, worker tier", 16_384u32), ("request, shared data only", 0)] {
        let (engine, store) = engine(worker_clients);
        let mut n = 0usize;
        // 40,000 requests/s of simulated time: each client every 250 ms.
        let mut now_ms = 1_700_000_000_000u64;
        c.bench_function(name, |b| {
            b.iter(|| {
                n = n.wrapping_add(1);
                if n.is_multiple_of(40) {
                    now_ms += 1;
                }
                if n.is_multiple_of(20_000) {
                    engine.on_tick(&store, now_ms);
                }
                let xff = addresses.get(n % addresses.len()).map(String::as_bytes);
                let facts = RequestFacts {
                    identity: IdentityInput { peer: Some(b"127.0.0.1"), forwarded_for: xff, ..IdentityInput::default() },
                    method: "GET",
                    path: "/direct",
                    user_agent: Some("wrk"),
                    ..RequestFacts::default()
                };
                let (verdict, exchange) = engine.on_request(&store, &facts, now_ms);
                if engine.answer_matters(&exchange, 200) {
                    let _ = engine.on_response(&store, &exchange, 200, None, now_ms);
                }
                black_box(verdict)
            })
        });
    }
    c.bench_function("facts header parse", |b| {
        b.iter(|| black_box(Facts::parse(black_box(b"2001:db8::1 1796129374533 t13d1516h2_8daaf6152771_02713d6af862"))))
    });
}

criterion_group!(benches, requests);
criterion_main!(benches);
