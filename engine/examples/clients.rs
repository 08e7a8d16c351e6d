//! `make bench-clients`: ten million distinct client addresses through the
//! engine against the in-memory store (Envoy's shared-data semantics: every
//! get copies the value, every set copies it again, CAS on each write).
//! At 1M, 2M, 5M and 10M distinct addresses (half IPv4, half IPv6 /64s) it
//! prints the shared-data bytes, the process RSS, the eviction rate and the
//! cost per request; meanwhile a tool rotates through those same addresses
//! stuffing the login (one attempt per 50 requests) and real users keep
//! logging in. Not a test: it measures (read ratios, machines differ); it
//! exits non-zero only if memory grows, the attack is not blocked, or a real
//! user is refused. CLIENTS=N changes the last step (default 10,000,000).

use abuse_engine::{Action, Config, Engine, IdentityInput, MemoryStore, RequestFacts, SEED_BYTES};
use std::time::Instant;

const CONFIG: &str = r#"{"mode":"block",
  "client":{"trusted_proxies":["127.0.0.1"]},
  "route_groups":[{"name":"login","path_prefix":"/api/login","methods":["POST"]},{"name":"api","path_prefix":"/api/"}],
  "rate":{"limits":[{"route_group":"login","requests":120,"window_s":60},
                    {"route_group":"api","requests":15,"window_s":1,"anonymous_only":true},
                    {"route_group":"api","requests":100,"window_s":1}]},
  "credential_stuffing":{"login_routes":[{"path":"/api/login","method":"POST","username_field":"username",
                         "failure_statuses":[401],"success_statuses":[200]}]},
  "enumeration":{"object_routes":["/api/users/{id}","/api/products/{id}"]}}"#;

const TOOL: &str = "python-requests/2.31.0";
const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
const NAMES: &str = ":authority,:path,:method,content-type,user-agent,accept,accept-language,accept-encoding";

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// The i-th distinct address: even i IPv4 (from 1.0.0.0 up), odd i an IPv6 /64.
fn address(i: u64) -> String {
    if i.is_multiple_of(2) {
        let n = (i / 2 + (1 << 24)) as u32;
        std::net::Ipv4Addr::from(n).to_string()
    } else {
        format!("2001:db8:{:x}:{:x}::1", (i >> 16) & 0xffff, i & 0xffff)
    }
}

/// One login through every phase; true when refused.
fn login(e: &Engine, s: &MemoryStore, xff: &str, ua: &str, user: &str, ok: bool, t: u64) -> bool {
    let facts = RequestFacts {
        identity: IdentityInput { peer: Some(b"127.0.0.1:1"), forwarded_for: Some(xff.as_bytes()), ..IdentityInput::default() },
        method: "POST",
        path: "/api/login",
        user_agent: Some(ua),
        header_names: Some(NAMES),
        ..RequestFacts::default()
    };
    let (v, mut ex) = e.on_request(s, &facts, t);
    if v.action == Action::Block {
        return true;
    }
    let body = format!(r#"{{"username":"{user}","password":"{}"}}"#, if ok { "right" } else { "Summer1!" });
    if let Some(r) = e.on_request_body(s, &mut ex, body.as_bytes(), t) {
        return r.action == Action::Block;
    }
    e.on_response(s, &ex, if ok { 200 } else { 401 }, None, t + 5).is_some_and(|a| a.action == Action::Block)
}

fn main() {
    let last: u64 = std::env::var("CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000_000);
    let steps: Vec<u64> = [1_000_000, 2_000_000, 5_000_000, 10_000_000].into_iter().filter(|s| *s < last).chain([last]).collect();
    let config = Config::from_json(CONFIG.as_bytes()).unwrap_or_default();
    let Ok(e) = Engine::new(&config, &[7; SEED_BYTES]) else {
        eprintln!("bad config");
        std::process::exit(2);
    };
    let s = MemoryStore::new();
    let _ = e.create_state(&s);
    let mut t: u64 = 1_700_000_000_000;
    // A live site first: 100 people log in (they are the real users below).
    for u in 0..100u64 {
        t += 500;
        login(&e, &s, &format!("198.51.{}.{}", u / 50, u % 50 + 1), CHROME, &format!("user{u:04}"), true, t);
    }
    println!(
        "{:>11} {:>10} {:>13} {:>10} {:>13} {:>10} {:>12} {:>12}",
        "clients", "shared KiB", "RSS KiB", "evicted %", "ns/request", "attack", "refused %", "real refused"
    );
    let (mut i, mut from) = (0u64, 0u64);
    let (mut real_refused, mut attempts_after, mut refused_after, mut recognised) = (0u64, 0u64, 0u64, false);
    let base_rss = rss_kib();
    let base_bytes = s.total_bytes();
    let mut ok = true;
    for step in steps {
        let (mut evicted, mut requests) = (0u64, 0u64);
        let (step_attempts, step_refused) = (attempts_after, refused_after);
        let started = Instant::now();
        while i < step {
            // 20 requests per simulated millisecond: 50,000 req/s.
            if i.is_multiple_of(20) {
                t += 1;
            }
            let addr = address(i);
            if i % 50 == 49 {
                // The tool, at this address now, tries a leaked pair.
                let refused = login(&e, &s, &addr, TOOL, &format!("leak{i}@mail.example"), false, t);
                recognised |= e.login_under_attack(&s, t);
                if recognised {
                    attempts_after += 1;
                    refused_after += u64::from(refused);
                }
            } else {
                let facts = RequestFacts {
                    identity: IdentityInput { peer: Some(b"127.0.0.1:1"), forwarded_for: Some(addr.as_bytes()), ..IdentityInput::default() },
                    method: "GET",
                    path: "/api/products/7",
                    user_agent: Some(CHROME),
                    ..RequestFacts::default()
                };
                let (v, _) = e.on_request(&s, &facts, t);
                evicted += u64::from(v.store.evicted);
            }
            if i % 10_000 == 5_000 {
                // A real user logging into their own account, from their usual address.
                let u = i / 10_000 % 100;
                real_refused += u64::from(login(&e, &s, &format!("198.51.{}.{}", u / 50, u % 50 + 1), CHROME, &format!("user{u:04}"), true, t));
            }
            requests += 1;
            i += 1;
        }
        let ns = started.elapsed().as_nanos() as f64 / (step - from).max(1) as f64;
        let (attempts, refused) = (attempts_after - step_attempts, refused_after - step_refused);
        println!(
            "{:>11} {:>10} {:>13} {:>10.1} {:>13.0} {:>10} {:>12.1} {:>12}",
            step,
            s.total_bytes() / 1024,
            rss_kib(),
            100.0 * evicted as f64 / requests.max(1) as f64,
            ns,
            if recognised { "recognised" } else { "not yet" },
            100.0 * refused as f64 / attempts.max(1) as f64,
            real_refused
        );
        ok &= s.total_bytes() == base_bytes && recognised && refused * 100 >= attempts * 95;
        from = step;
    }
    let growth = rss_kib().saturating_sub(base_rss);
    println!("shared data constant at {} KiB; RSS grew {growth} KiB after the first step's baseline", base_bytes / 1024);
    ok &= real_refused == 0 && growth < 16 * 1024;
    if !ok {
        eprintln!("FAILED: memory grew, the attack was not blocked, or a real user was refused");
        std::process::exit(1);
    }
}
