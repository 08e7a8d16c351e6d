//! Shared by the fuzz targets: splitting one input into several fields, and
//! an engine with every detector on (the configuration the tests use most).

#![allow(dead_code)]

/// Splits `data` at 0xff bytes into at most `N` fields (missing ones empty),
/// so one input can drive several arguments and libFuzzer still mutates
/// each of them.
pub fn fields<const N: usize>(data: &[u8]) -> [&[u8]; N] {
    let mut out: [&[u8]; N] = [&[]; N];
    let mut parts = data.splitn(N, |b| *b == 0xff);
    for slot in out.iter_mut() {
        *slot = parts.next().unwrap_or(&[]);
    }
    out
}

pub const FULL_CONFIG: &str = r#"{
  "mode": "block",
  "client": {"trusted_proxies": ["127.0.0.0/8", "::1/128"], "trusted_hops": 1,
             "api_key_header": "x-api-key", "session_cookie": "session", "jwt_claim": "sub"},
  "route_groups": [{"name": "login", "path_prefix": "/api/login", "methods": ["POST"]},
                   {"name": "api", "path_prefix": "/api/"}],
  "rate": {"limits": [{"route_group": "api", "requests": 5, "window_s": 10}]},
  "credential_stuffing": {"login_routes": [{"path": "/api/login", "method": "POST", "username_field": "username",
                           "failure_statuses": [401], "success_statuses": [200]}]},
  "enumeration": {"object_routes": ["/api/users/{id}"]},
  "sessions": {"enabled": true},
  "scorer": {"enabled": true, "cluster": "abuse_scorer", "secret": "fuzz-secret"},
  "state": {"shards": 4, "slots_per_shard": 16}
}"#;

pub fn engine() -> abuse_engine::Engine {
    let config = abuse_engine::Config::from_json(FULL_CONFIG.as_bytes()).unwrap();
    abuse_engine::Engine::new(&config, &[7; abuse_engine::SEED_BYTES]).unwrap()
}
