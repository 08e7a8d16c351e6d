//! The engine end to end: every phase, as the host calls them.

use super::*;
use crate::state::store::SharedStore;
use crate::verdict::{Action, Verdict};
use crate::state::store::MemoryStore;
use std::sync::Arc;

const T0: u64 = 1_700_000_000_000;

fn engine(json: &str) -> Engine {
    Engine::new(&Config::from_json(json.as_bytes()).unwrap(), &[7; SEED_BYTES]).unwrap()
}

fn request<'a>(peer: &'a str, xff: Option<&'a str>, path: &'a str) -> RequestFacts<'a> {
    RequestFacts {
        identity: IdentityInput {
            peer: Some(peer.as_bytes()),
            forwarded_for: xff.map(str::as_bytes),
            ..IdentityInput::default()
        },
        method: "GET",
        path,
        ..RequestFacts::default()
    }
}

const BLOCK: &str = r#"{"mode":"block",
    "client":{"trusted_proxies":["127.0.0.1"]},
    "route_groups":[{"name":"api","path_prefix":"/api/"}],
    "rate":{"limits":[{"route_group":"api","requests":5,"window_s":10}]},
    "penalty":{"duration_s":30},
    "actions":{"rate_limit":"block"},
    "state":{"shards":4,"slots_per_shard":16}}"#;

#[test]
fn by_default_a_rate_overflow_sheds_the_excess_and_penalizes_nobody() {
    let json = BLOCK.replace(r#""actions":{"rate_limit":"block"},"#, "");
    let (e, s) = (engine(&json), MemoryStore::new());
    e.table().create_shards(&s).unwrap();
    let r = request("192.0.2.1:5", None, "/api/x");
    let verdicts: Vec<Verdict> = (0..12).map(|i| e.on_request(&s, &r, T0 + i).0).collect();
    assert!(verdicts[..5].iter().all(|v| v.action == Action::Allow));
    for v in &verdicts[5..] {
        assert_eq!((v.action, v.status, v.retry_after_s, v.penalized, v.newly_blocked), (Action::Block, 429, 1, false, false));
        assert_eq!(v.reasons_header(), "rate_limit");
    }
    // Once the window has room again the client is served: no penalty box.
    let later = e.on_request(&s, &r, T0 + 20_001).0;
    assert_eq!(later.action, Action::Allow, "{later:?}");
    // With other evidence of abuse (a scanner), the overflow counts as a block.
    let mut scan = request("192.0.2.2:5", None, "/api/.env");
    scan.user_agent = Some("curl/8");
    let json = json.replace(r#""state""#, r#""probing":{"sensitive_weight":40},"state""#);
    let e = engine(&json);
    e.table().create_shards(&s).unwrap();
    let first = e.on_request(&s, &scan, T0).0;
    assert_eq!(first.action, Action::Tag);
    let mut clean = request("192.0.2.2:5", None, "/api/x");
    clean.user_agent = Some("curl/8");
    let mut last = first;
    for i in 1..8 {
        last = e.on_request(&s, &clean, T0 + i).0;
    }
    assert!(last.penalized || last.newly_blocked, "abuse evidence + overflow = penalty: {last:?}");
}

#[test]
fn people_behind_one_address_are_judged_apart_by_user_agent() {
    let (e, s) = (engine(BLOCK), MemoryStore::new());
    e.table().create_shards(&s).unwrap();
    let mut flood = request("192.0.2.1:5", None, "/api/x");
    flood.user_agent = Some("wrk/4");
    for i in 0..10 {
        e.on_request(&s, &flood, T0 + i);
    }
    assert!(e.on_request(&s, &flood, T0 + 10).0.penalized, "the flooder is in the penalty box");
    let mut colleague = request("192.0.2.1:5", None, "/api/x");
    colleague.user_agent = Some("Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0");
    let v = e.on_request(&s, &colleague, T0 + 11).0;
    assert_eq!(v.action, Action::Allow, "the person sharing its address is not");
    // Off: the address alone is the client.
    let off = engine(&BLOCK.replace(r#""client":{"#, r#""client":{"key_by_user_agent":false,"#));
    off.table().create_shards(&s).unwrap();
    for i in 0..10 {
        off.on_request(&s, &flood, T0 + 100 + i);
    }
    assert!(off.on_request(&s, &colleague, T0 + 111).0.penalized);
}

#[test]
fn over_the_limit_blocks_then_penalty_holds_then_expires() {
    let (e, s) = (engine(BLOCK), MemoryStore::new());
    e.table().create_shards(&s).unwrap();
    let r = request("192.0.2.1:5", None, "/api/x");
    for i in 0..5 {
        let v = e.on_request(&s, &r, T0 + i).0;
        assert_eq!(v.action, Action::Allow, "request {i}");
    }
    let v = e.on_request(&s, &r, T0 + 10).0;
    assert_eq!((v.action, v.status, v.newly_blocked), (Action::Block, 429, true));
    assert_eq!(v.retry_after_s, 30);
    assert_eq!(v.reasons_header(), "rate_limit");
    // Still blocked 29 s later, from the penalty box, without detectors.
    let v = e.on_request(&s, &r, T0 + 29_500).0;
    assert_eq!((v.action, v.penalized, v.newly_blocked), (Action::Block, true, false));
    assert_eq!(v.retry_after_s, 1);
    // After the penalty the window has moved on.
    let v = e.on_request(&s, &r, T0 + 31_000).0;
    assert_eq!(v.action, Action::Tag, "risk still above tag_at: {}", v.risk);
    assert!(!v.would_block);
    // Other routes never counted.
    let v = e.on_request(&s, &request("192.0.2.9:5", None, "/health"), T0).0;
    assert_eq!(v.action, Action::Allow);
}

#[test]
fn other_clients_are_unaffected() {
    let (e, s) = (engine(BLOCK), MemoryStore::new());
    e.table().create_shards(&s).unwrap();
    for i in 0..20 {
        e.on_request(&s, &request("127.0.0.1:1", Some("198.51.100.1"), "/api/x"), T0 + i);
    }
    let v = e.on_request(&s, &request("127.0.0.1:1", Some("198.51.100.2"), "/api/x"), T0 + 30).0;
    assert_eq!(v.action, Action::Allow);
    // The proxy itself is not the client.
    let v = e.on_request(&s, &request("127.0.0.1:1", None, "/api/x"), T0 + 30).0;
    assert_eq!(v.action, Action::Allow);
}

#[test]
fn monitor_mode_never_blocks_but_says_so() {
    let json = BLOCK.replace(r#""mode":"block""#, r#""mode":"monitor""#);
    let (e, s) = (engine(&json), MemoryStore::new());
    e.table().create_shards(&s).unwrap();
    let r = request("192.0.2.1:5", None, "/api/x");
    let verdicts: Vec<Verdict> = (0..20).map(|i| e.on_request(&s, &r, T0 + i).0).collect();
    assert!(verdicts.iter().all(|v| v.action != Action::Block));
    assert_eq!(verdicts.iter().filter(|v| v.would_block).count(), 15);
    assert_eq!(verdicts.iter().filter(|v| v.newly_blocked).count(), 1);
}

#[test]
fn counts_are_exact_across_concurrent_workers() {
    let json = BLOCK.replace(r#""requests":5"#, r#""requests":400"#);
    let e = Arc::new(engine(&json));
    let s = Arc::new(MemoryStore::new());
    e.table().create_shards(&*s).unwrap();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (e, s) = (e.clone(), s.clone());
            std::thread::spawn(move || {
                let verdicts: Vec<Verdict> = (0..200)
                    .map(|_| e.on_request(&*s, &request("192.0.2.1:5", None, "/api/x"), T0).0)
                    .collect();
                let blocked = verdicts.iter().filter(|v| v.action == Action::Block).count();
                let gave_up = verdicts.iter().filter(|v| v.store_failed).count();
                (blocked, gave_up)
            })
        })
        .collect();
    let (blocked, gave_up) = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold((0, 0), |acc, x| (acc.0 + x.0, acc.1 + x.1));
    assert_eq!(blocked, 0);
    // Updates that gave up (failed open) were not counted: exactly that
    // many more fit under the limit, and not one more.
    let r = request("192.0.2.1:5", None, "/api/x");
    for _ in 0..gave_up {
        assert_eq!(e.on_request(&*s, &r, T0).0.action, Action::Allow);
    }
    let v = e.on_request(&*s, &r, T0).0;
    assert_eq!(v.action, Action::Block, "the 401st request is over");
}

#[test]
fn store_failure_fails_open() {
    let (e, s) = (engine(BLOCK), MemoryStore::new());
    e.table().create_shards(&s).unwrap();
    *s.forced_conflicts.lock().unwrap() = 10_000;
    let v = e.on_request(&s, &request("192.0.2.1:5", None, "/api/x"), T0).0;
    assert!(v.store_failed);
    assert_eq!(v.action, Action::Allow);
}

#[test]
fn a_reload_keeps_the_penalty_box_and_the_counts() {
    let s = MemoryStore::new();
    let e1 = engine(BLOCK);
    assert!(e1.prepare_state(&s, T0).unwrap().summary().is_none(), "a first start is no change");
    for i in 0..6 {
        e1.on_request(&s, &request("192.0.2.1:5", None, "/api/x"), T0 + i);
    }
    for i in 0..3 {
        e1.on_request(&s, &request("192.0.2.2:5", None, "/api/x"), T0 + i);
    }
    assert!(e1.on_request(&s, &request("192.0.2.1:5", None, "/"), T0 + 10).0.penalized);

    // A threshold and an action change: same layout, nothing to migrate, all kept.
    let stricter = BLOCK.replace(r#""requests":5"#, r#""requests":4"#).replace(r#""penalty":{"duration_s":30}"#, r#""penalty":{"duration_s":60}"#);
    let e2 = engine(&stricter);
    let report = e2.prepare_state(&s, T0 + 20).unwrap();
    assert!(report.summary().is_none(), "{:?}", report.summary());
    assert!(e2.on_request(&s, &request("192.0.2.1:5", None, "/"), T0 + 30).0.penalized);
    // 192.0.2.2 had 3 requests in the window: the 4th is within 4, the 5th over.
    assert!(!e2.on_request(&s, &request("192.0.2.2:5", None, "/api/x"), T0 + 40).0.penalized);
    let v = e2.on_request(&s, &request("192.0.2.2:5", None, "/api/x"), T0 + 50).0;
    assert_eq!(v.action, Action::Block, "the count was forgotten: {v:?}");

    // Another window and half the shards: a real layout change.
    let other = stricter.replace(r#""window_s":10"#, r#""window_s":20"#).replace(r#""shards":4"#, r#""shards":2"#);
    let e3 = engine(&other);
    let report = e3.prepare_state(&s, T0 + 60).unwrap();
    let line = report.summary().unwrap();
    assert!(line.starts_with("clients: 4x16 -> 2x16 shards, kept 2, dropped 0"), "{line}");
    assert!(line.contains("reset [api/10s]"), "{line}");
    let v = e3.on_request(&s, &request("192.0.2.1:5", None, "/"), T0 + 70).0;
    assert!(v.penalized, "the penalty box was emptied by the reload");
    // The old configuration, still draining, does not overwrite the new shards.
    let refused = (0..10)
        .map(|i| e1.on_request(&s, &request(&format!("192.0.2.{}:5", 10 + i), None, "/"), T0 + 80).0)
        .filter(|v| v.store_failed && v.action == Action::Allow)
        .count();
    assert!(refused > 0, "the old layout wrote into the new shards");
    assert!(e3.on_request(&s, &request("192.0.2.1:5", None, "/"), T0 + 90).0.penalized);
    // Back to the first layout: carried over again.
    let e4 = engine(BLOCK);
    assert!(e4.prepare_state(&s, T0 + 100).unwrap().summary().unwrap().contains("kept 2"));
    assert!(e4.on_request(&s, &request("192.0.2.1:5", None, "/"), T0 + 110).0.penalized);
}

#[test]
fn a_reload_that_reorders_login_routes_keeps_each_endpoints_state() {
    let s = MemoryStore::new();
    let one = engine(LOGIN);
    one.prepare_state(&s, T0).unwrap();
    let key = one.endpoint_key(0);
    one.endpoints
        .update(&s, key, T0, |e| {
            e.attack_until_ms = T0 + 60_000;
            ((), true)
        })
        .unwrap();
    assert!(one.login_under_attack(&s, T0 + 1));
    let two = engine(&LOGIN.replace(r#""login_routes":[{"path":"/login""#, r#""login_routes":[{"path":"/signin"},{"path":"/login""#));
    assert!(two.prepare_state(&s, T0 + 2).unwrap().summary().is_none());
    assert_eq!(two.endpoint_key(1), key, "/login is now the second route");
    assert!(two.login_under_attack(&s, T0 + 3), "the endpoint forgot the attack");
}

#[test]
fn a_smaller_table_keeps_penalized_clients_before_idle_ones() {
    let s = MemoryStore::new();
    let big = engine(&BLOCK.replace(r#""slots_per_shard":16"#, r#""slots_per_shard":64"#).replace(r#""shards":4"#, r#""shards":1"#));
    big.prepare_state(&s, T0).unwrap();
    // 60 idle clients, and one in the penalty box.
    for i in 0..60u64 {
        big.on_request(&s, &request(&format!("198.51.100.{i}:5"), None, "/"), T0 + i);
    }
    for i in 0..6 {
        big.on_request(&s, &request("192.0.2.1:5", None, "/api/x"), T0 + 100 + i);
    }
    let small = engine(&BLOCK.replace(r#""slots_per_shard":16"#, r#""slots_per_shard":8"#).replace(r#""shards":4"#, r#""shards":1"#));
    let line = small.prepare_state(&s, T0 + 200).unwrap().summary().unwrap();
    assert!(line.starts_with("clients: 1x64 -> 1x8 shards, kept 8, dropped "), "{line}");
    assert!(small.on_request(&s, &request("192.0.2.1:5", None, "/"), T0 + 300).0.penalized);
}

#[test]
fn a_burst_shorter_than_a_tick_is_recognised_inside_it() {
    let json = r#"{"mode":"block","client":{"trusted_proxies":["127.0.0.1"]},
        "route_groups":[{"name":"users","path_prefix":"/api/users/"}],
        "enumeration":{"enabled":false},
        "spikes":{"window_s":5,"factor":4,"min_rps":20,"min_client_requests":40,"client_share":0.2},
        "actions":{"endpoint_spike":"block"}}"#;
    let (e, s) = (engine(json), MemoryStore::new());
    e.create_state(&s).unwrap();
    assert_eq!(e.baselines_learning(&s), 1);
    // 30 s of ~8 requests/s from ten regular clients, ticking every 500 ms.
    let mut t = T0;
    for n in 0..240u64 {
        t += 125;
        let xff = format!("198.51.100.{}", 10 + n % 10);
        assert_eq!(e.on_request(&s, &request("127.0.0.1:1", Some(&xff), "/api/users/1"), t).0.action, Action::Allow);
        if n % 4 == 3 {
            e.on_tick(&s, t);
        }
    }
    assert_eq!(e.baselines_learning(&s), 0, "learned");
    // 600 requests in 60 ms: no tick happens during the burst.
    let flood = request("127.0.0.1:1", Some("203.0.113.250"), "/api/users/2");
    let verdicts: Vec<Verdict> = (0..600u64).map(|i| e.on_request(&s, &flood, t + i / 10).0).collect();
    let first = verdicts.iter().position(|v| v.action == Action::Block);
    assert!(first.is_some(), "blocked inside the burst");
    let first = first.unwrap();
    assert!(first <= 250, "recognised after {first} requests");
    assert!(verdicts[first].reasons.contains(Reason::EndpointSpike));
    assert!(verdicts[first..].iter().all(|v| v.action == Action::Block), "and held");
    // A regular client calling the endpoint during the spike is not charged.
    let regular = e.on_request(&s, &request("127.0.0.1:1", Some("198.51.100.10"), "/api/users/3"), t + 61).0;
    assert_eq!(regular.action, Action::Allow);
    // Steady traffic never merges early: the early threshold is far above a worker's share.
    let calm = Engine::new(&Config::from_json(json.as_bytes()).unwrap(), &[7; SEED_BYTES]).unwrap();
    let s2 = MemoryStore::new();
    calm.create_state(&s2).unwrap();
    let mut t = T0;
    for n in 0..400u64 {
        t += 125;
        let xff = format!("198.51.100.{}", 10 + n % 10);
        calm.on_request(&s2, &request("127.0.0.1:1", Some(&xff), "/api/users/1"), t);
        if n % 4 == 3 {
            calm.on_tick(&s2, t);
        }
    }
    // The CAS token counts the group shard's writes: creation + one per tick.
    let writes = s2.get("abuse_filter/v1/route_groups/0").unwrap().1.unwrap();
    assert_eq!(writes, 1 + 100, "one merge per tick, none early");
}

const LOGIN: &str = r#"{"mode":"block","client":{"trusted_proxies":["127.0.0.1"]},
    "credential_stuffing":{"login_routes":[{"path":"/login","failure_statuses":[401],"success_statuses":[200]}]}}"#;

const BROWSER_NAMES: &str = ":authority,:path,:method,content-type,user-agent,accept,accept-language,accept-encoding";
const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

/// One login attempt through every phase; returns (refused, login-risk header).
fn login(e: &Engine, s: &MemoryStore, xff: &str, ua: &str, user: &str, ok: bool, t: u64) -> (bool, Option<String>) {
    let mut facts = request("127.0.0.1:1", Some(xff), "/login");
    facts.method = "POST";
    facts.user_agent = Some(ua);
    facts.header_names = Some(BROWSER_NAMES);
    // The GeoIP filter's country: real users here are in GB; the
    // attack's scattered addresses are everywhere.
    const ELSEWHERE: [&str; 6] = ["US", "BR", "IN", "VN", "DE", "NG"];
    facts.country = Some(if xff.starts_with("100.") { ELSEWHERE[t as usize % 6] } else { "GB" });
    let (v, mut ex) = e.on_request(s, &facts, t);
    if v.action == Action::Block {
        return (true, v.login_risk);
    }
    // A leaked list pairs each username with its own password.
    let body = format!(r#"{{"username":"{user}","password":"{}"}}"#, if ok { "right".to_string() } else { format!("Summer{t}!") });
    if let Some(refused) = e.on_request_body(s, &mut ex, body.as_bytes(), t) {
        return (refused.action == Action::Block, refused.login_risk);
    }
    // What the application is told once the body is in (hold_login_headers).
    let told = e.login_risk(&ex).or(v.login_risk);
    let answer = e.on_response(s, &ex, if ok { 200 } else { 401 }, None, t + 5);
    (answer.is_some_and(|a| a.action == Action::Block), told)
}

/// A login with valid credentials from `country`; returns (refused, the
/// header the application got, the answer's verdict).
fn valid_login(e: &Engine, s: &MemoryStore, xff: &str, ua: &str, country: &str, t: u64) -> (bool, Option<String>, Option<Verdict>) {
    let mut facts = request("127.0.0.1:1", Some(xff), "/login");
    facts.method = "POST";
    facts.user_agent = Some(ua);
    facts.header_names = Some(BROWSER_NAMES);
    facts.country = Some(country);
    let (v, mut ex) = e.on_request(s, &facts, t);
    assert_ne!(v.action, Action::Block);
    if let Some(refused) = e.on_request_body(s, &mut ex, br#"{"username":"owner@mail.example","password":"right"}"#, t) {
        return (refused.action == Action::Block, refused.login_risk, None);
    }
    let told = e.login_risk(&ex);
    (false, told, e.on_response(s, &ex, 200, None, t + 5))
}

const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";
const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1";

/// The profile's part of a successful login's risk: (level, reasons).
fn profile_part(answer: &Option<Verdict>) -> (&'static str, Vec<&'static str>) {
    match answer.as_ref().and_then(|a| a.profile_risk) {
        Some(r) => (r.level.name(), r.told_names().collect()),
        None => ("low", Vec::new()),
    }
}

#[test]
fn a_takeover_with_the_right_password_is_told_to_the_application_and_the_owner_is_not() {
    let (e, s) = (engine(LOGIN), MemoryStore::new());
    e.create_state(&s).unwrap();
    let day = 86_400_000;
    // The owner logs in from home, in GB, on their laptop, for a week.
    for d in 0..7 {
        let (refused, _, answer) = valid_login(&e, &s, "81.2.69.142", CHROME, "GB", T0 + d * day);
        assert!(!refused);
        assert_eq!(profile_part(&answer), ("low", vec![]), "day {d}");
    }
    // A new phone at home: low, only a new device.
    let (_, told, answer) = valid_login(&e, &s, "81.2.69.143", IPHONE, "GB", T0 + 7 * day);
    assert_eq!(profile_part(&answer), ("low", vec!["new_device"]));
    assert!(!told.unwrap_or_default().starts_with("high"), "no step-up for a new phone at home");
    // The password used from another country on another browser.
    let (refused, told, answer) = valid_login(&e, &s, "175.16.199.1", FIREFOX, "CN", T0 + 8 * day);
    assert!(!refused, "tag by default: the application decides");
    assert_eq!(profile_part(&answer), ("high", vec!["new_country", "new_device"]));
    let told = told.unwrap();
    assert!(told.starts_with("high; ") && told.ends_with("new_country,new_device"), "{told}");
    let answer = answer.unwrap();
    assert_eq!(answer.login_risk.as_deref(), Some(told.as_str()), "the answer carries it to the access log");
    assert_ne!(answer.action, Action::Block);
    // Ten minutes after it the owner at home: another country than the
    // last success that soon is impossible travel, but the owner's
    // device at home is only medium.
    let (_, _, answer) = valid_login(&e, &s, "81.2.69.142", CHROME, "GB", T0 + 8 * day + 600_000);
    assert_eq!(profile_part(&answer), ("medium", vec!["impossible_travel"]));
}

#[test]
fn the_device_is_the_clients_headers_not_the_proxys() {
    let e = engine(r#"{"geo":{"country_header":"x-geo-country","anonymous_headers":["x-geo-anon-vpn","x-geo-anon-tor"]}}"#);
    let a = e.client_header_shape("host,user-agent,accept,x-forwarded-proto,x-request-id,x-geo-anon-vpn,x-geo-anon-tor,x-geo-country");
    let b = e.client_header_shape("host,user-agent,accept,x-forwarded-proto,x-request-id,x-geo-country,x-geo-anon-tor,x-geo-anon-vpn");
    assert_eq!(a, "host,user-agent,accept");
    assert_eq!(a, b, "the GeoIP filter's order does not matter");
}

#[test]
fn an_owners_trip_is_learned_and_an_operator_can_block_a_combination() {
    let config = r#"{"mode":"block","client":{"trusted_proxies":["127.0.0.1"]},
        "credential_stuffing":{"login_routes":[{"path":"/login","failure_statuses":[401],"success_statuses":[200]}]},
        "account_takeover":{"profile":{"block_when":[["new_country","new_device","anonymous_source"]]}}}"#;
    let (e, s) = (engine(config), MemoryStore::new());
    e.create_state(&s).unwrap();
    let day = 86_400_000;
    for d in 0..3 {
        valid_login(&e, &s, "81.2.69.142", CHROME, "GB", T0 + d * day);
    }
    // The owner travels (a day later, with their laptop): medium, let in, learned.
    let (refused, _, answer) = valid_login(&e, &s, "89.160.20.112", CHROME, "SE", T0 + 4 * day);
    assert!(!refused);
    assert_eq!(profile_part(&answer), ("medium", vec!["new_country"]));
    let (_, _, answer) = valid_login(&e, &s, "89.160.20.112", CHROME, "SE", T0 + 5 * day);
    assert_eq!(profile_part(&answer), ("low", vec![]), "the trip is in the profile now");
    // The owner behind a VPN abroad with their own laptop: not the combination.
    let (refused, _, _) = valid_login(&e, &s, "1.2.0.2", CHROME, "SE", T0 + 5 * day + 3_600_000);
    assert!(!refused);
    // A new country, a new device and a VPN: refused before the upstream.
    let mut facts = request("127.0.0.1:1", Some("1.2.0.1"), "/login");
    facts.method = "POST";
    facts.user_agent = Some(FIREFOX);
    facts.header_names = Some(BROWSER_NAMES);
    facts.country = Some("PH");
    facts.anonymous = true;
    let (v, mut ex) = e.on_request(&s, &facts, T0 + 6 * day);
    assert_ne!(v.action, Action::Block);
    let refused = e.on_request_body(&s, &mut ex, br#"{"username":"owner@mail.example","password":"right"}"#, T0 + 6 * day).unwrap();
    assert_eq!(refused.action, Action::Block);
    assert!(refused.reasons.contains(Reason::AccountTakeover));
    assert!(refused.login_risk.is_some_and(|r| r.contains("anonymous_source")));
    // Refused attempts teach the profile nothing: PH is still new.
    let (_, _, answer) = valid_login(&e, &s, "202.196.224.1", CHROME, "PH", T0 + 7 * day);
    assert_eq!(profile_part(&answer).1, vec!["new_country"]);
}

#[test]
fn stuffing_disguised_as_browsers_is_refused_and_real_users_are_not() {
    let (e, s) = (engine(LOGIN), MemoryStore::new());
    e.create_state(&s).unwrap();
    let mut t = T0;
    // A live site: 100 people log in (a cold start: every first login is
    // to an account the filter does not know yet), then two hours of
    // their repeat logins, one every 2 s, ~23 % after a typo, each user
    // from their own address with the common browser the attacker will copy.
    for i in 0..3700u64 {
        t += if i < 100 { 500 } else { 2_000 };
        let (xff, user) = (format!("198.51.{}.{}", i % 100 / 50, i % 50 + 1), format!("user{:04}", i % 100));
        if i % 13 < 3 {
            login(&e, &s, &xff, CHROME, &user, false, t);
        }
        t += 100;
        assert!(!login(&e, &s, &xff, CHROME, &user, true, t).0, "real login {i}");
    }
    // Only now do unknown accounts count as evidence (the learned
    // share of real logins to unknown accounts fell below 1 in 4).
    let ep = e.endpoints.peek(&s, e.endpoint_key(0)).unwrap().unwrap();
    assert!(e.distributed.as_ref().unwrap().unknown_is_evidence(&ep), "{ep:?}");
    // 600 addresses, 1-3 tries each, the same browser, a leaked list of
    // which one in ten names a real account; real users keep logging in.
    let (mut attempts, mut refused_after, mut later, mut recognised_at) = (0u32, 0u32, 0u32, None);
    let (mut real_refused, mut first_timers_refused) = (0, 0);
    for a in 0..600u64 {
        for k in 0..(1 + a % 3) {
            t += 60;
            let user = if (a + k) % 10 == 0 { format!("user{:04}", (a + k) % 100) } else { format!("leak{a}x{k}@mail.example") };
            let (refused, risk) = login(&e, &s, &format!("100.{}.{}.{}", 64 + a % 50, a / 50, k + 1), CHROME, &user, false, t);
            attempts += 1;
            if recognised_at.is_none() && e.login_under_attack(&s, t) {
                recognised_at = Some(attempts);
            }
            if recognised_at.is_some_and(|r| attempts > r) {
                later += 1;
                // On a real account, the copied browser from a new address
                // looks like its owner's new phone: no evidence specific
                // to the attempt, so it is told (`high`, for a second
                // factor), never refused on "new to this account" alone.
                let told_high = risk.as_deref().is_some_and(|r| r.starts_with("high"));
                refused_after += u32::from(refused || (user.starts_with("user") && told_high));
            }
        }
        if a % 10 == 0 {
            // A real user logging in from their usual browser, a new address.
            let u = a / 10 % 100;
            let (refused, _) = login(&e, &s, &format!("198.51.100.{}", u + 1), CHROME, &format!("user{u:04}"), true, t);
            real_refused += usize::from(refused);
        }
        if a % 50 == 25 {
            // A person logging in for the first time, after browsing (an
            // account of the site's own format, issued on sign-up).
            let xff = format!("198.51.101.{}", a / 50 + 1);
            let mut browse = request("127.0.0.1:1", Some(&xff), "/products");
            browse.user_agent = Some(CHROME);
            e.on_request(&s, &browse, t);
            let (refused, risk) = login(&e, &s, &xff, CHROME, &format!("user{:04}", 5000 + a), true, t + 1);
            first_timers_refused += usize::from(refused);
            // The request header knows what the request tells (the
            // account comes with the body): the app can step up.
            if e.login_under_attack(&s, t) {
                assert!(risk.is_some_and(|r| r.contains("endpoint_under_attack")), "told, not refused");
            }
        }
    }
    assert!(recognised_at.is_some(), "recognised");
    let recognised_at = recognised_at.unwrap_or(u32::MAX);
    assert!(recognised_at <= 200, "recognised at attempt {recognised_at}");
    let share = f64::from(refused_after) / f64::from(later);
    assert!(share >= 0.95, "{refused_after} of {later} later attempts refused (or, on real accounts, told high)");
    assert_eq!(real_refused, 0, "real users logging into their own accounts");
    assert_eq!(first_timers_refused, 0, "first-time logins after browsing");
}

#[test]
fn after_a_cold_start_an_early_attack_is_recognised() {
    let (e, s) = (engine(LOGIN), MemoryStore::new());
    e.create_state(&s).unwrap();
    let mut t = T0;
    for i in 0..20u64 {
        t += 1000;
        login(&e, &s, &format!("198.51.100.{}", i + 1), CHROME, &format!("user{i:04}"), i % 5 != 0, t);
    }
    assert_eq!(e.baselines_learning(&s), 1, "still learning, and says so");
    let mut recognised_at = None;
    for a in 0..300u64 {
        t += 250;
        login(&e, &s, &format!("100.64.{}.{}", a / 200, a % 200 + 1), CHROME, &format!("leak{a}"), false, t);
        if recognised_at.is_none() && e.login_under_attack(&s, t) {
            recognised_at = Some(a + 1);
        }
    }
    assert!(recognised_at.is_some_and(|a| a <= 200), "{recognised_at:?}");
}

proptest::proptest! {
    /// Whatever a client sends, every phase of the engine answers
    /// without panicking and keeps the risk finite.
    #[test]
    fn arbitrary_requests_never_panic(
        peer in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..60),
        xff in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        path in ".{0,120}",
        ua in ".{0,80}",
        body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        status in 0u32..1000,
        cookie in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
        auth in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
    ) {
        let config = r#"{"mode":"block","client":{"trusted_proxies":["0.0.0.0/0","::/0"],
            "session_cookie":"s","jwt_claim":"sub","api_key_header":"x-api-key"},
            "route_groups":[{"name":"all","path_prefix":"/"}],
            "credential_stuffing":{"login_routes":[{"path":"/login"}]},
            "scraping":{"max_kib_per_window":1},
            "scorer":{"enabled":true},
            "state":{"shards":2,"slots_per_shard":8}}"#;
        let e = engine(config);
        let s = MemoryStore::new();
        e.create_state(&s).unwrap();
        for (i, method) in ["GET", "POST"].iter().enumerate() {
            let path = if i == 1 { "/login" } else { path.as_str() };
            let facts = RequestFacts {
                identity: IdentityInput {
                    peer: Some(&peer),
                    forwarded_for: Some(&xff),
                    api_key: Some(&cookie),
                    cookie: Some(&cookie),
                    authorization: Some(&auth),
                    verified_subject: Some(&cookie),
                },
                method,
                path,
                user_agent: Some(ua.as_str()),
                header_names: Some(ua.as_str()),
                asn: Some(ua.as_str()),
                country: Some(ua.as_str()),
                anonymous: i == 0,
                rule_headers: &[],
                ja4: Some(ua.as_str()),
            };
            let (v, mut ex) = e.on_request(&s, &facts, T0 + i as u64);
            proptest::prop_assert!(v.risk.is_finite());
            let _ = e.on_request_body(&s, &mut ex, &body, T0 + 4);
            let _ = e.score_request_body(&ex);
            let _ = e.on_response(&s, &ex, status, Some(status), T0 + 5);
            let _ = e.on_score_answer(&s, &ex, crate::callout::parse_answer(Some(status), &body), T0 + 6);
            let _ = e.waiting_verdict(&s, &ex, T0, T0 + 7);
            let _ = e.apply_fleet_verdicts(&s, &body, T0 + 8);
            e.on_tick(&s, T0 + 9);
        }
    }
}

/// Two Envoys (each its own random seed) name one session cookie alike to
/// the scorer when they share its secret, so the scorer can count the
/// session's addresses across the fleet; the session table's own key stays
/// this process's.
#[test]
fn every_envoy_names_a_session_alike_to_the_scorer() {
    let json = r#"{"client":{"session_cookie":"sid"},"sessions":{},
        "scorer":{"enabled":true,"secret":"fleet-secret"}}"#;
    let config = Config::from_json(json.as_bytes()).unwrap();
    let (a, b) = (Engine::new(&config, &[7; SEED_BYTES]).unwrap(), Engine::new(&config, &[9; SEED_BYTES]).unwrap());
    let with_cookie = |cookie: &'static [u8]| {
        let mut facts = request("192.0.2.1", None, "/api/me");
        facts.identity.cookie = Some(cookie);
        facts
    };
    let named = |e: &Engine, cookie: &'static [u8]| {
        let facts = with_cookie(cookie);
        let verdict = Verdict::allow(e.identity.client_addr(facts.identity.peer, None));
        e.score_request(&facts, &<ClientRecord as crate::record::Record>::new(1), crate::routes::RouteMatch::default(), &verdict, T0)
            .session
    };
    let (sa, sb) = (named(&a, b"sid=abc123; theme=dark"), named(&b, b"sid=abc123"));
    assert!(sa.is_some());
    assert_eq!(sa, sb);
    assert_ne!(named(&a, b"sid=other"), sa, "another cookie is another session");
    let facts = with_cookie(b"sid=abc123");
    let (ha, hb) = (a.observe_session(&MemoryStore::new(), &facts, 1, T0).hash, b.observe_session(&MemoryStore::new(), &facts, 1, T0).hash);
    assert_ne!(ha, hb, "the session table's key is per process");
}

// ---- rotation buys no budget (issue 20): the address's pool ----

/// The shipped config's rate limits and login route, trusting the loopback proxy.
const SHIPPED_RATE: &str = r#"{"mode":"block","client":{"trusted_proxies":["127.0.0.1"]},
    "route_groups":[{"name":"login","path_prefix":"/login","methods":["POST"]},{"name":"api","path_prefix":"/api/"}],
    "rate":{"limits":[{"route_group":"login","requests":120,"window_s":60},
                      {"route_group":"api","requests":15,"window_s":1,"anonymous_only":true},
                      {"route_group":"api","requests":100,"window_s":1},
                      {"route_group":"api","requests":6000,"window_s":60}]},
    "credential_stuffing":{"login_routes":[{"path":"/login","failure_statuses":[401],"success_statuses":[200]}]}}"#;

/// A browser user agent of its own for every `n` (a new build number each).
fn rotated_agent(n: u64) -> String {
    format!("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{}.0.{}.{} Safari/537.36", 110 + n % 20, 6000 + n, n % 200)
}

fn get(e: &Engine, s: &MemoryStore, xff: &str, ua: &str, path: &str, t: u64) -> Verdict {
    let mut facts = request("127.0.0.1:1", Some(xff), path);
    facts.user_agent = Some(ua);
    e.on_request(s, &facts, t).0
}

#[test]
fn a_flood_with_a_new_user_agent_per_request_is_cut_and_stays_cut() {
    let (e, s) = (engine(SHIPPED_RATE), MemoryStore::new());
    e.table().create_shards(&s).unwrap();
    // 1,500 requests at 150/s from one address, each with a new string.
    let refused: Vec<bool> = (0..1500u64)
        .map(|i| {
            let ua = rotated_agent(i);
            get(&e, &s, "203.0.113.9", &ua, "/api/products", T0 + i * 1000 / 150).action == Action::Block
        })
        .collect();
    let first = refused.iter().position(|&r| r).unwrap();
    let later = &refused[first + 1..];
    let share = later.iter().filter(|&&r| r).count() as f64 / later.len() as f64;
    println!("UA-rotating flood: cut at request {first}, {:.1} % of the later ones refused", share * 100.0);
    assert!(first < 100, "cut at request {first}");
    assert!(share >= 0.9, "{:.1} % of later requests refused", share * 100.0);
}

#[test]
fn stuffing_with_a_new_firefox_build_per_attempt_is_refused_within_ten() {
    let (e, s) = (engine(SHIPPED_RATE), MemoryStore::new());
    e.table().create_shards(&s).unwrap();
    let attempts: Vec<bool> = (0..40u64)
        .map(|i| {
            let ua = format!("Mozilla/5.0 (X11; Linux x86_64; rv:{}.0) Gecko/20100101 Firefox/{}.0.{}", 100 + i, 100 + i, i % 7);
            login(&e, &s, "203.0.113.10", &ua, &format!("victim{i}@mail.example"), false, T0 + i * 1500).0
        })
        .collect();
    let first = attempts.iter().position(|&r| r).unwrap();
    println!("UA-rotating stuffing: first refused attempt {first} (0-based)");
    assert!(first < 10, "refused at attempt {first}");
    assert!(attempts[first..].iter().all(|&r| r), "{attempts:?}");
}

#[test]
fn an_office_and_a_carrier_nat_keep_their_people_while_a_rotating_flooder_inside_is_cut() {
    let (e, s) = (engine(SHIPPED_RATE), MemoryStore::new());
    e.table().create_shards(&s).unwrap();
    // An office: 30 people, each with its own browser, a page every 2-6 s
    // (seeded gaps) for 60 s; a carrier NAT: 120 phones, each its own app
    // build, a request every 3-8 s. From t = 20 s a flooder behind the
    // office address sends 150 requests/s, each with a new browser string.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = |lo: u64, hi: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        lo + rng % (hi - lo)
    };
    let mut events: Vec<(u64, u8, u64)> = Vec::new(); // (t ms, kind, who)
    for person in 0..30 {
        let mut t = next(0, 3000);
        while t < 60_000 {
            events.push((t, 0, person));
            t += next(2000, 6000);
        }
    }
    for phone in 0..120 {
        let mut t = next(0, 8000);
        while t < 60_000 {
            events.push((t, 1, phone));
            t += next(3000, 8000);
        }
    }
    for i in 0..6000u64 {
        events.push((20_000 + i * 1000 / 150, 2, i));
    }
    events.sort_unstable();
    let (mut people_refused, mut flood) = (Vec::new(), Vec::new());
    for (t, kind, who) in events {
        let v = match kind {
            0 => get(&e, &s, "198.51.100.1", &format!("Mozilla/5.0 (Macintosh) Firefox/13{}.0 person-{who}", who % 3), "/api/products", T0 + t),
            1 => get(&e, &s, "100.64.20.1", &format!("ShopApp/5.{} (Android 14; Pixel {}; build {})", who % 7, who % 9, 1000 + who), "/api/products", T0 + t),
            _ => get(&e, &s, "198.51.100.1", &rotated_agent(who), "/api/products", T0 + t),
        };
        if kind < 2 && v.action == Action::Block {
            people_refused.push((kind, who, t));
        }
        if kind == 2 {
            flood.push(v.action == Action::Block);
        }
    }
    assert_eq!(people_refused, vec![], "people refused");
    let first = flood.iter().position(|&r| r).unwrap();
    let later = &flood[first + 1..];
    let share = later.iter().filter(|&&r| r).count() as f64 / later.len() as f64;
    // The office's 30 returning people earn its pool ~4 more slots (one per
    // eight): 7.75 × 15 new-identity requests a second, so the cut comes
    // a little later than on a bare address — and then holds.
    println!("office flooder: cut at {first}, {:.1} % later refused", share * 100.0);
    assert!(first < 200 && share >= 0.9, "cut at {first}, {:.1} % later refused", share * 100.0);
}

#[test]
fn a_returning_identity_is_judged_alone_and_a_newcomer_with_the_pool() {
    let (e, s) = (engine(SHIPPED_RATE), MemoryStore::new());
    e.table().create_shards(&s).unwrap();
    let fox = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";
    let (_, ex) = {
        let mut f = request("127.0.0.1:1", Some("192.0.2.7"), "/api/x");
        f.user_agent = Some(fox);
        e.on_request(&s, &f, T0)
    };
    assert!(ex.pool_key.is_some(), "a first request is also the pool's");
    let mut f = request("127.0.0.1:1", Some("192.0.2.7"), "/api/x");
    f.user_agent = Some(fox);
    assert!(e.on_request(&s, &f, T0 + 1000).1.pool_key.is_some(), "back too soon: still a newcomer");
    assert!(e.on_request(&s, &f, T0 + 2500).1.pool_key.is_none(), "back after returning_after_s: its own client");
}

// ---- a victim's name is not a weapon (issue 20) ----

#[test]
fn failures_by_others_on_a_name_never_refuse_its_owners_correct_login() {
    for failures in [5u64, 50] {
        let (e, s) = (engine(LOGIN), MemoryStore::new());
        e.table().create_shards(&s).unwrap();
        // Five (fifty) wrong passwords on the owner's name, from other
        // addresses, before the owner ever logged in here (no profile: a
        // restart, or a new account).
        for i in 0..failures {
            login(&e, &s, &format!("203.0.113.{}", i % 200 + 1), FIREFOX, "owner@mail.example", false, T0 + i * 1000);
        }
        let (refused, told, answer) = valid_login(&e, &s, "198.51.100.50", IPHONE, "GB", T0 + failures * 1000 + 60_000);
        assert!(!refused && answer.as_ref().is_none_or(|a| a.action != Action::Block), "{failures} failures by others: {answer:?}");
        assert!(told.is_some_and(|t| t.contains("failures_elsewhere")), "the application is told, for a second factor");
    }
}

#[test]
fn a_client_that_failed_on_an_account_then_gets_in_is_a_takeover() {
    let (e, s) = (engine(LOGIN), MemoryStore::new());
    e.table().create_shards(&s).unwrap();
    for i in 0..6u64 {
        login(&e, &s, "203.0.113.77", FIREFOX, "owner@mail.example", false, T0 + i * 1000);
    }
    let (refused, _, answer) = valid_login(&e, &s, "203.0.113.77", FIREFOX, "GB", T0 + 10_000);
    assert!(refused || answer.is_some_and(|a| a.action == Action::Block && a.reasons_header().contains("account_takeover")));
}

#[test]
fn a_slash_24_pool_holds_an_address_rotating_within_it() {
    // With client.pool_prefix_v4 = 24 new identities anywhere in the /24
    // share one pool: a flood rotating both address and user agent is cut.
    let json = SHIPPED_RATE.replace(r#""client":{"#, r#""client":{"pool_prefix_v4":24,"#);
    let (e, s) = (engine(&json), MemoryStore::new());
    e.table().create_shards(&s).unwrap();
    let refused: Vec<bool> = (0..600u64)
        .map(|i| {
            let xff = format!("203.0.113.{}", i % 250 + 1);
            get(&e, &s, &xff, &rotated_agent(i), "/api/products", T0 + i * 1000 / 150).action == Action::Block
        })
        .collect();
    let first = refused.iter().position(|&r| r).unwrap();
    let later = &refused[first + 1..];
    let share = later.iter().filter(|&&r| r).count() as f64 / later.len() as f64;
    assert!(first < 100 && share >= 0.9, "cut at {first}, {:.1} % later refused", share * 100.0);
    // Per address (the default), the same flood spreads over 250 pools.
    let (e, s) = (engine(SHIPPED_RATE), MemoryStore::new());
    e.table().create_shards(&s).unwrap();
    let refused = (0..600u64)
        .filter(|&i| get(&e, &s, &format!("203.0.113.{}", i % 250 + 1), &rotated_agent(i), "/api/products", T0 + i * 1000 / 150).action == Action::Block)
        .count();
    assert_eq!(refused, 0, "each address alone stays under its limits");
}

#[test]
fn the_answer_is_read_only_where_an_outcome_can_count() {
    let s = MemoryStore::new();
    let plain = BLOCK.replace(r#""state""#, r#""probing":{"enabled":false},"state""#);
    let e = engine(&plain);
    e.table().create_shards(&s).unwrap();
    let (_, exchange) = e.on_request(&s, &request("192.0.2.1:5", None, "/api/x"), T0);
    assert!(exchange.judged());
    assert!(!e.answer_can_count(&exchange), "no detector reads this answer: no status read");
    for status in [200, 401, 403, 404, 500] {
        assert!(!e.answer_matters(&exchange, status));
    }
    // Probing on: a 404 counts on any route, so the status must be read.
    let e = engine(BLOCK);
    e.table().create_shards(&s).unwrap();
    let (_, exchange) = e.on_request(&s, &request("192.0.2.2:5", None, "/api/x"), T0);
    assert!(e.answer_can_count(&exchange));
    assert!(!e.answer_matters(&exchange, 200) && e.answer_matters(&exchange, 404));
    // An object route counts every answer, probing or not.
    let objects = plain.replace(r#""state""#, r#""enumeration":{"object_routes":["/api/users/{id}"]},"state""#);
    let e = engine(&objects);
    e.table().create_shards(&s).unwrap();
    let (_, exchange) = e.on_request(&s, &request("192.0.2.3:5", None, "/api/users/7"), T0);
    assert!(e.answer_can_count(&exchange) && e.answer_matters(&exchange, 200));
}
