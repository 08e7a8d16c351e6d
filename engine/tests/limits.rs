//! Every input limit of the engine, at the limit and one past it (the
//! "Input limits" table of docs/input-limits.md). Header-level limits Envoy enforces itself
//! (header bytes and count) are in tests/test_limits_envoy.py.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use abuse_engine::callout::parse_answer;
use abuse_engine::config::{MAX_ALLOWLIST, MAX_CONFIG_BYTES, MAX_GOOD_BOTS, MAX_PROXY_CIDRS};
use abuse_engine::detectors::login::extract_username;
use abuse_engine::identity::{cookie_value, forwarded_client, jwt_claim, IdentityPolicy, MAX_HEADER_LEN, MAX_IDENTITY_LEN};
use abuse_engine::wire::{FleetVerdict, FleetVerdicts, MAX_FLEET_BYTES, MAX_FLEET_VERDICTS, MAX_SCORE_ANSWER_BYTES, MAX_WARM_BYTES, WIRE_VERSION};
use abuse_engine::{Config, Engine, IdentityInput, MemoryStore, SEED_BYTES};
use base64::Engine as _;

/// `text` padded with trailing spaces (JSON whitespace) to exactly `len` bytes.
fn padded(text: &str, len: usize) -> Vec<u8> {
    let mut v = text.as_bytes().to_vec();
    assert!(v.len() <= len, "{} > {len}", v.len());
    v.resize(len, b' ');
    v
}

#[test]
fn forwarded_for_up_to_8_kib_whatever_the_number_of_entries() {
    // As many entries as fit in 8 KiB (one per 12 bytes: 682 of them).
    let entry = "10.0.0.1, ";
    let mut xff = entry.repeat((MAX_HEADER_LEN - 12) / entry.len());
    xff.push_str("198.51.100.7");
    while xff.len() < MAX_HEADER_LEN {
        xff.insert(0, ' ');
    }
    assert_eq!(xff.len(), MAX_HEADER_LEN);
    assert_eq!(forwarded_client(xff.as_bytes(), 1), Some("198.51.100.7".parse().unwrap()));
    let entries = xff.split(',').count();
    assert!(entries > 800, "{entries}");
    assert_eq!(forwarded_client(xff.as_bytes(), entries), Some("10.0.0.1".parse().unwrap()), "the leftmost entry");
    assert_eq!(forwarded_client(xff.as_bytes(), entries + 1), None, "past the list");
    let over = format!(" {xff}");
    assert_eq!(forwarded_client(over.as_bytes(), 1), None, "8 KiB + 1 is ignored (the peer address is used)");
}

#[test]
fn cookies_up_to_8_kib_and_a_256_byte_value() {
    // The session cookie after as many other cookies as fit.
    let value = "s".repeat(MAX_IDENTITY_LEN);
    let tail = format!("; session={value}");
    let mut header = String::new();
    let mut i = 0;
    while header.len() + tail.len() + 12 < MAX_HEADER_LEN {
        header.push_str(&format!("c{i:04}=v; "));
        i += 1;
    }
    header.push_str("x=y");
    while header.len() + tail.len() < MAX_HEADER_LEN {
        header.push('y');
    }
    header.push_str(&tail);
    assert_eq!(header.len(), MAX_HEADER_LEN);
    assert!(i > 800, "{i} cookies");
    assert_eq!(cookie_value(header.as_bytes(), "session"), Some(value.clone()));
    assert_eq!(cookie_value(format!("a{header}").as_bytes(), "session"), None, "header of 8 KiB + 1");
    let long = format!("session={value}s");
    assert_eq!(cookie_value(long.as_bytes(), "session"), None, "a value of 257 bytes names no session");
}

fn bearer(claims: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!("Bearer {}.{}.{}", b64.encode(r#"{"alg":"HS256"}"#), b64.encode(claims), "c2ln")
}

#[test]
fn jwts_up_to_8_kib_and_a_256_byte_subject() {
    let sub = "u".repeat(MAX_IDENTITY_LEN);
    // Pad the payload with another claim until the header is exactly 8 KiB.
    let mut pad = 0;
    let header = loop {
        let h = bearer(&format!(r#"{{"sub":"{sub}","pad":"{}"}}"#, "p".repeat(pad)));
        if h.len() >= MAX_HEADER_LEN - 3 {
            break h;
        }
        pad += 1;
    };
    let header = format!("{header}{}", " ".repeat(MAX_HEADER_LEN - header.len()));
    assert_eq!(header.len(), MAX_HEADER_LEN);
    assert_eq!(jwt_claim(header.as_bytes(), "sub"), Some(sub.clone()));
    assert_eq!(jwt_claim(format!("{header} ").as_bytes(), "sub"), None, "8 KiB + 1");
    assert_eq!(jwt_claim(bearer(&format!(r#"{{"sub":"{sub}u"}}"#)).as_bytes(), "sub"), None, "a 257-byte subject");
}

#[test]
fn api_keys_up_to_256_bytes() {
    let policy = IdentityPolicy::new(&Config::default().client).unwrap();
    let key = "k".repeat(MAX_IDENTITY_LEN);
    let id = policy.identify(&IdentityInput { api_key: Some(key.as_bytes()), ..IdentityInput::default() });
    assert_eq!(id.api_key, Some(key.clone()));
    let over = format!("{key}k");
    let id = policy.identify(&IdentityInput { api_key: Some(over.as_bytes()), ..IdentityInput::default() });
    assert_eq!(id.api_key, None);
}

#[test]
fn login_usernames_up_to_256_characters() {
    // The body limit itself is the host's (credential_stuffing.max_body_bytes,
    // tests/test_limits_envoy.py); the username is cut to 256 characters.
    let name = "a".repeat(300);
    let body = format!(r#"{{"username":"{name}"}}"#);
    assert_eq!(extract_username(body.as_bytes(), "username").unwrap().len(), 256);
    let form = format!("username={name}&password=x");
    assert_eq!(extract_username(form.as_bytes(), "username").unwrap().len(), 256);
}

#[test]
fn scorer_answers_up_to_64_kib() {
    let answer = r#"{"version":1,"score":80.0,"action":"block","reasons":["rate_limit"],"ttl_s":60}"#;
    assert!(parse_answer(Some(200), &padded(answer, MAX_SCORE_ANSWER_BYTES)).is_ok());
    assert!(parse_answer(Some(200), &padded(answer, MAX_SCORE_ANSWER_BYTES + 1)).is_err());
}

fn engine() -> Engine {
    let json = r#"{"mode":"block","client":{"trusted_proxies":["127.0.0.1"]},
        "scorer":{"enabled":true,"cluster":"abuse_scorer"},"state":{"shards":64,"slots_per_shard":256}}"#;
    Engine::new(&Config::from_json(json.as_bytes()).unwrap(), &[7; SEED_BYTES]).unwrap()
}

fn verdicts(n: usize) -> FleetVerdicts {
    FleetVerdicts {
        version: WIRE_VERSION,
        next: 1,
        verdicts: (0..n)
            .map(|i| FleetVerdict {
                client: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                reasons: vec!["rate_limit".into()],
                until_ms: 2_000_000_000_000,
            })
            .collect(),
        ..FleetVerdicts::default()
    }
}

#[test]
fn fleet_polls_apply_up_to_10000_verdicts_and_1_mib() {
    let now = 1_700_000_000_000;
    let e = engine();
    let s = MemoryStore::new();
    e.create_state(&s).unwrap();
    let at = serde_json::to_vec(&verdicts(MAX_FLEET_VERDICTS)).unwrap();
    assert!(at.len() <= MAX_FLEET_BYTES, "{}", at.len());
    assert_eq!(e.apply_fleet_verdicts(&s, &at, now).verdicts, MAX_FLEET_VERDICTS);
    let past = serde_json::to_vec(&verdicts(MAX_FLEET_VERDICTS + 1)).unwrap();
    assert_eq!(e.apply_fleet_verdicts(&s, &past, now).verdicts, MAX_FLEET_VERDICTS, "the first 10,000 only");

    let small = serde_json::to_vec(&verdicts(1)).unwrap();
    let text = String::from_utf8(small).unwrap();
    let s = MemoryStore::new();
    e.create_state(&s).unwrap();
    assert_eq!(e.apply_fleet_verdicts(&s, &padded(&text, MAX_FLEET_BYTES), now).verdicts, 1);
    assert_eq!(e.apply_fleet_verdicts(&s, &padded(&text, MAX_FLEET_BYTES + 1), now).verdicts, 0, "1 MiB + 1 is refused");
}

#[test]
fn warm_pages_up_to_256_kib() {
    let now = 1_700_000_000_000;
    let e = engine();
    let s = MemoryStore::new();
    e.create_state(&s).unwrap();
    let page = r#"{"version":1,"baselines":[],"known_shards":[],"next":null}"#;
    let at = e.apply_warm(&s, &padded(page, MAX_WARM_BYTES), now);
    assert_eq!(at, Some((0, true)), "{at:?}");
    assert_eq!(e.apply_warm(&s, &padded(page, MAX_WARM_BYTES + 1), now), None);
}

#[test]
fn configuration_up_to_256_kib() {
    let at = padded(r#"{"mode":"monitor"}"#, MAX_CONFIG_BYTES);
    assert!(Config::from_json(&at).is_ok());
    let e = Config::from_json(&padded(r#"{"mode":"monitor"}"#, MAX_CONFIG_BYTES + 1)).unwrap_err();
    assert_eq!(e.key, "(root)");
    assert!(e.to_string().contains("at most 262144"), "{e}");
}

fn list(n: usize, item: impl Fn(usize) -> String) -> String {
    (0..n).map(item).collect::<Vec<_>>().join(",")
}

fn cidr(i: usize) -> String {
    format!(r#""10.{}.{}.0/24""#, i / 256, i % 256)
}

/// A configuration holding `n` entries of one list.
type ConfigOf = Box<dyn Fn(usize) -> String>;

#[test]
fn configuration_lists_at_their_limit_and_one_past() {
    let cases: Vec<(&str, usize, ConfigOf)> = vec![
        ("client.trusted_proxies", MAX_PROXY_CIDRS, Box::new(|n| format!(r#"{{"client":{{"trusted_proxies":[{}]}}}}"#, list(n, cidr)))),
        ("allowlist.cidrs", MAX_ALLOWLIST, Box::new(|n| format!(r#"{{"allowlist":{{"cidrs":[{}]}}}}"#, list(n, cidr)))),
        ("allowlist.api_keys", MAX_ALLOWLIST, Box::new(|n| format!(r#"{{"allowlist":{{"api_keys":[{}]}}}}"#, list(n, |i| format!(r#""key-{i}""#))))),
        ("good_bots", MAX_GOOD_BOTS, Box::new(|n| format!(r#"{{"good_bots":[{}]}}"#, list(n, |i| format!(r#"{{"name":"b{i}","user_agent":"Bot{i}","cidrs":["66.249.64.0/19"]}}"#))))),
        ("good_bots[0].cidrs", MAX_PROXY_CIDRS, Box::new(|n| format!(r#"{{"good_bots":[{{"name":"b","user_agent":"Bot","cidrs":[{}]}}]}}"#, list(n, cidr)))),
        ("route_groups", 32, Box::new(|n| format!(r#"{{"route_groups":[{}]}}"#, list(n, |i| format!(r#"{{"name":"g{i}","path_prefix":"/g{i}/"}}"#))))),
        ("rate.limits", 4, Box::new(|n| format!(r#"{{"rate":{{"limits":[{}]}}}}"#, list(n, |i| format!(r#"{{"requests":{},"window_s":10}}"#, i + 1))))),
        ("credential_stuffing.login_routes", 8, Box::new(|n| format!(r#"{{"credential_stuffing":{{"login_routes":[{}]}}}}"#, list(n, |i| format!(r#"{{"path":"/login{i}"}}"#))))),
        ("enumeration.object_routes", 32, Box::new(|n| format!(r#"{{"enumeration":{{"object_routes":[{}]}}}}"#, list(n, |i| format!(r#""/o{i}/{{id}}""#))))),
        ("geo.anonymous_headers", 16, Box::new(|n| format!(r#"{{"geo":{{"anonymous_headers":[{}]}}}}"#, list(n, |i| format!(r#""x-anon-{i}""#))))),
    ];
    for (key, max, config) in cases {
        let at = config(max);
        assert!(Config::from_json(at.as_bytes()).is_ok(), "{key} with {max}: {:?}", Config::from_json(at.as_bytes()).err());
        let e = Config::from_json(config(max + 1).as_bytes()).unwrap_err();
        assert_eq!(e.key, key, "{key}: {e}");
    }
}
