//! The rules stage end to end, with explicit timestamps: each example rule
//! of docs/rules.md and its benign look-alike.

use super::super::*;
use super::RULE_DELTAS_CAP;
use crate::state::store::MemoryStore;
use crate::verdict::{Action, Verdict};

const T0: u64 = 1_700_000_000_000;

fn engine(rules: &str) -> Engine {
    let json = format!(
        r#"{{"mode":"block",
        "client":{{"trusted_proxies":["127.0.0.1"],"api_key_header":"x-api-key","session_cookie":"session"}},
        "route_groups":[{{"name":"api","path_prefix":"/api/"}}],
        "scorer":{{"enabled":true,"secret":"fleet-secret"}},
        "state":{{"shards":4,"slots_per_shard":16}},
        "rules":[{rules}]}}"#
    );
    let e = Engine::new(&Config::from_json(json.as_bytes()).unwrap(), &[7; SEED_BYTES]).unwrap();
    e
}

fn ready(e: &Engine) -> MemoryStore {
    let s = MemoryStore::new();
    e.create_state(&s).unwrap();
    s
}

struct Req<'a> {
    peer: &'a str,
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, &'a [u8])>,
    cookie: Option<&'a [u8]>,
}

fn req<'a>(peer: &'a str, method: &'a str, path: &'a str) -> Req<'a> {
    Req { peer, method, path, headers: Vec::new(), cookie: None }
}

fn send(e: &Engine, s: &MemoryStore, r: &Req<'_>, now: u64) -> (Verdict, Exchange) {
    let api_key = r.headers.iter().find(|(n, _)| *n == "x-api-key").map(|(_, v)| *v);
    let facts = RequestFacts {
        identity: IdentityInput { peer: Some(r.peer.as_bytes()), api_key, cookie: r.cookie, ..IdentityInput::default() },
        method: r.method,
        path: r.path,
        rule_headers: &r.headers,
        ..RequestFacts::default()
    };
    e.on_request(s, &facts, now)
}

/// A request with a body and an answer, as the host runs the phases.
fn exchange(e: &Engine, s: &MemoryStore, r: &Req<'_>, body: &[u8], status: u32, answer: &RuleAnswer<'_>, now: u64) -> Verdict {
    let (v, mut x) = send(e, s, r, now);
    if v.action == Action::Block {
        return v;
    }
    if e.wants_body(&x).is_some() {
        if let Some(v) = e.on_rule_body(s, &mut x, body, now) {
            if v.action == Action::Block {
                return v;
            }
        }
    }
    e.on_rule_answer(s, &x, status, answer, now + 5).unwrap_or(v)
}

const OTP: &str = r#"{"name":"otp_verify_failures","match":{"methods":["POST"],"path":"/api/otp/verify","statuses":["401"]},
    "key":["session"],"window_s":300,"threshold":5,"action":"block","penalty_s":300,"max_penalty_s":3600,"reset_on":["200"]}"#;

#[test]
fn otp_failures_per_session_block_the_session_and_a_success_resets_the_count() {
    let e = engine(OTP);
    let s = ready(&e);
    let mut attacker = req("192.0.2.1:1", "POST", "/api/otp/verify");
    attacker.cookie = Some(b"session=attacker");
    let none = RuleAnswer::default();
    for i in 0..5 {
        let v = exchange(&e, &s, &attacker, b"{}", 401, &none, T0 + i * 1000);
        assert_ne!(v.action, Action::Block, "failure {i} is answered");
    }
    // The fifth failure fired: the session is refused, from any address.
    let mut elsewhere = req("198.51.100.9:1", "POST", "/api/otp/verify");
    elsewhere.cookie = Some(b"session=attacker");
    let (v, _) = send(&e, &s, &elsewhere, T0 + 6000);
    assert_eq!((v.action, v.status), (Action::Block, 403));
    assert_eq!(v.reason_names(), vec!["otp_verify_failures"]);
    assert!(v.retry_after_s > 290 && v.retry_after_s <= 300, "{}", v.retry_after_s);
    assert_eq!(v.rules.blocked, 1);
    let body: serde_json::Value = serde_json::from_str(&v.block_body()).unwrap();
    assert_eq!(body["reasons"][0], "otp_verify_failures");

    // Benign: mistypes twice, succeeds (the count resets), mistypes twice more.
    let mut user = req("192.0.2.2:1", "POST", "/api/otp/verify");
    user.cookie = Some(b"session=user");
    let mut t = T0;
    for status in [401, 401, 200, 401, 401, 401, 401] {
        let v = exchange(&e, &s, &user, b"{}", status, &none, t);
        assert_ne!(v.action, Action::Block);
        t += 1000;
    }
    let (v, _) = send(&e, &s, &user, t);
    assert_eq!(v.action, Action::Allow, "4 failures since the success: {v:?}");
    // A request without the key (no session) is not counted by the rule.
    let anon = req("192.0.2.3:1", "POST", "/api/otp/verify");
    for i in 0..10 {
        let v = exchange(&e, &s, &anon, b"{}", 401, &none, T0 + i);
        assert_eq!(v.rules.matched, 0);
    }
}

#[test]
fn a_repeat_offender_waits_twice_as_long() {
    let e = engine(OTP);
    let s = ready(&e);
    let mut a = req("192.0.2.1:1", "POST", "/api/otp/verify");
    a.cookie = Some(b"session=a");
    let none = RuleAnswer::default();
    for i in 0..5 {
        exchange(&e, &s, &a, b"{}", 401, &none, T0 + i);
    }
    let after = T0 + 301_000;
    assert_eq!(send(&e, &s, &a, after).0.action, Action::Allow, "the first penalty is over");
    for i in 0..5 {
        exchange(&e, &s, &a, b"{}", 401, &none, after + 1 + i);
    }
    let v = send(&e, &s, &a, after + 10).0;
    assert!(v.retry_after_s > 590, "doubled: {}", v.retry_after_s);
}

#[test]
fn distinct_coupon_codes_per_client() {
    let e = engine(
        r#"{"name":"coupon_enumeration","match":{"methods":["POST"],"path":"/api/coupons/apply"},
        "key":["client"],"count":"distinct:json:code","window_s":600,"threshold":20,"action":"block","penalty_s":600}"#,
    );
    let s = ready(&e);
    let none = RuleAnswer::default();
    let shopper = req("192.0.2.10:1", "POST", "/api/coupons/apply");
    for code in ["WELCOME10", "SPRING", "WELCOME10", "FREESHIP"] {
        let body = format!(r#"{{"code":"{code}"}}"#);
        assert_eq!(exchange(&e, &s, &shopper, body.as_bytes(), 404, &none, T0).action, Action::Allow);
    }
    let bot = req("192.0.2.11:1", "POST", "/api/coupons/apply");
    let mut refused_at = None;
    for i in 0..40 {
        let body = format!(r#"{{"code":"GUESS{i:04}"}}"#);
        let v = exchange(&e, &s, &bot, body.as_bytes(), 404, &none, T0 + i);
        if v.action == Action::Block {
            assert_eq!(v.reason_names(), vec!["coupon_enumeration"]);
            refused_at = Some(i + 1);
            break;
        }
    }
    // A 64-bit sketch: the 21st code on average, the 18th to 27th in 98 % of runs.
    let n = refused_at.unwrap();
    assert!((17..=32).contains(&n), "refused at code {n}");
    assert_eq!(exchange(&e, &s, &shopper, br#"{"code":"X"}"#, 404, &none, T0 + 50).action, Action::Allow);
}

const QUOTA: &str = r#"{"name":"search_quota","match":{"methods":["GET"],"path":"/api/search"},"key":["api_key"],
    "window_s":60,"threshold":20,"action":"tag"},
    {"name":"search_quota_2x","match":{"methods":["GET"],"path":"/api/search"},"key":["api_key"],
    "window_s":60,"threshold":40,"action":"shed"}"#;

#[test]
fn search_over_the_quota_is_tagged_then_shed_per_api_key() {
    let e = engine(QUOTA);
    let s = ready(&e);
    let mut partner = req("192.0.2.20:1", "GET", "/api/search?q=shoes");
    partner.headers = vec![("x-api-key", b"partner-a")];
    let verdicts: Vec<Verdict> = (0..45).map(|i| send(&e, &s, &partner, T0 + i * 10).0).collect();
    assert!(verdicts[..19].iter().all(|v| v.action == Action::Allow && v.reasons.is_empty()));
    assert_eq!(verdicts[19].action, Action::Tag);
    assert_eq!(verdicts[19].reasons_header(), "search_quota");
    assert!(verdicts[20..39].iter().all(|v| v.action == Action::Tag));
    for v in &verdicts[39..] {
        assert_eq!((v.action, v.status, v.retry_after_s), (Action::Block, 429, 1));
        assert_eq!(v.reason_names(), vec!["search_quota", "search_quota_2x"]);
        assert!(!v.penalized, "a shed boxes nobody");
    }
    let mut other = req("192.0.2.21:1", "GET", "/api/search?q=shoes");
    other.headers = vec![("x-api-key", b"partner-b")];
    assert_eq!(send(&e, &s, &other, T0 + 500).0.action, Action::Allow, "another key");
    // The window slides: the partner is served again (still tagged a while:
    // the weight it earned decays with risk.half_life_s).
    let later = send(&e, &s, &partner, T0 + 130_000).0;
    assert_eq!((later.action, later.rules.fired), (Action::Tag, 0));
}

#[test]
fn a_cost_budget_counts_what_the_api_reports() {
    let e = engine(
        r#"{"name":"search_cost_budget","match":{"methods":["GET"],"path":"/api/search"},"key":["api_key"],
        "count":"cost:header:x-query-cost","window_s":60,"threshold":500,"action":"shed"}"#,
    );
    let s = ready(&e);
    let expensive: [(&str, &[u8]); 1] = [("x-query-cost", b"100")];
    let cheap: [(&str, &[u8]); 1] = [("x-query-cost", b"1")];
    let mut heavy = req("192.0.2.30:1", "GET", "/api/search?q=*");
    heavy.headers = vec![("x-api-key", b"heavy")];
    let mut light = req("192.0.2.31:1", "GET", "/api/search?q=shoes");
    light.headers = vec![("x-api-key", b"light")];
    let mut statuses = Vec::new();
    for i in 0..8 {
        let v = exchange(&e, &s, &heavy, b"", 200, &RuleAnswer { headers: &expensive, ..RuleAnswer::default() }, T0 + i);
        statuses.push(v.status);
        let v = exchange(&e, &s, &light, b"", 200, &RuleAnswer { headers: &cheap, ..RuleAnswer::default() }, T0 + i);
        assert_eq!(v.action, Action::Allow, "the same number of cheap searches");
    }
    // 5 × 100 reached the budget at the fifth answer: the sixth request is shed.
    assert_eq!(statuses, vec![0, 0, 0, 0, 0, 429, 429, 429]);
    // Answers without the header (or garbage) cost nothing.
    let garbage: [(&str, &[u8]); 1] = [("x-query-cost", b"lots")];
    let mut other = req("192.0.2.32:1", "GET", "/api/search?q=*");
    other.headers = vec![("x-api-key", b"other")];
    for i in 0..10 {
        let v = exchange(&e, &s, &other, b"", 200, &RuleAnswer { headers: &garbage, ..RuleAnswer::default() }, T0 + i);
        assert_eq!(v.action, Action::Allow);
    }
}

const SMS: &str = r#"{"name":"sms_pumping","match":{"methods":["POST"],"path":"/api/otp/send"},"key":["json:phone"],
    "window_s":600,"threshold":5,"action":"block","penalty_s":600,"fleet":true}"#;

#[test]
fn sends_per_phone_number_are_counted_across_addresses_and_sent_to_the_fleet() {
    let e = engine(SMS);
    let s = ready(&e);
    let none = RuleAnswer::default();
    for i in 0..4 {
        let peer = format!("203.0.113.{i}:1");
        let v = exchange(&e, &s, &req(&peer, "POST", "/api/otp/send"), br#"{"phone":"+15550100"}"#, 202, &none, T0 + i);
        assert_eq!(v.action, Action::Allow);
    }
    let v = exchange(&e, &s, &req("203.0.113.9:1", "POST", "/api/otp/send"), br#"{"phone":"+15550100"}"#, 202, &none, T0 + 9);
    assert_eq!((v.action, v.status), (Action::Block, 403));
    assert_eq!(v.reason_names(), vec!["sms_pumping"]);
    // Another number, from the same addresses: untouched.
    let v = exchange(&e, &s, &req("203.0.113.1:1", "POST", "/api/otp/send"), br#"{"phone":"+15550199"}"#, 202, &none, T0 + 10);
    assert_eq!(v.action, Action::Allow);
    // A body without the field is not counted.
    let v = exchange(&e, &s, &req("203.0.113.1:1", "POST", "/api/otp/send"), b"{}", 202, &none, T0 + 11);
    assert_eq!(v.rules.matched, 0);
    // The counts ride the tick batch.
    let body = e.tick_batch(&s, T0 + 20).unwrap().body;
    let batch: crate::wire::EventBatch = serde_json::from_slice(&body).unwrap();
    let total: u64 = batch.rule_counts.iter().map(|c| c.count).sum();
    assert_eq!(total, 6, "{:?}", batch.rule_counts);
    assert!(batch.rule_counts.iter().all(|c| c.rule == "sms_pumping" && c.window_s == 600 && c.key.len() == 16));
}

#[test]
fn the_fleet_puts_a_key_over_on_an_envoy_that_counted_little() {
    let a = engine(SMS);
    let b = engine(SMS);
    let (sa, sb) = (ready(&a), ready(&b));
    let none = RuleAnswer::default();
    // Three sends through each Envoy: five or more fleet-wide, under five each.
    for i in 0..3 {
        for (e, s) in [(&a, &sa), (&b, &sb)] {
            let v = exchange(e, s, &req("203.0.113.5:1", "POST", "/api/otp/send"), br#"{"phone":"+15550111"}"#, 202, &none, T0 + i);
            assert_eq!(v.action, Action::Allow);
        }
    }
    let body = a.tick_batch(&sa, T0 + 10).unwrap().body;
    let batch: crate::wire::EventBatch = serde_json::from_slice(&body).unwrap();
    let key = batch.rule_counts[0].key.clone();
    // Both Envoys name the key alike (hashed with the fleet secret).
    let body_b = b.tick_batch(&sb, T0 + 10).unwrap().body;
    let batch_b: crate::wire::EventBatch = serde_json::from_slice(&body_b).unwrap();
    assert_eq!(batch_b.rule_counts[0].key, key);
    let answer = serde_json::json!({"accepted": 1, "flags": [],
        "rule_keys": [{"rule": "sms_pumping", "key": key, "until_ms": T0 + 600_000}]});
    assert_eq!(b.apply_rule_keys(&sb, answer.to_string().as_bytes(), T0 + 11), 1);
    let v = exchange(&b, &sb, &req("198.51.100.1:1", "POST", "/api/otp/send"), br#"{"phone":"+15550111"}"#, 202, &none, T0 + 12);
    assert_eq!((v.action, v.status), (Action::Block, 403));
    assert_eq!(v.reason_names(), vec!["sms_pumping"]);
    let v = exchange(&b, &sb, &req("198.51.100.1:1", "POST", "/api/otp/send"), br#"{"phone":"+15550112"}"#, 202, &none, T0 + 13);
    assert_eq!(v.action, Action::Allow, "another number");
    // Unknown rules, bad keys and stale words are ignored.
    let junk = serde_json::json!({"accepted": 0, "flags": [], "rule_keys": [
        {"rule": "nope", "key": key, "until_ms": T0 + 600_000},
        {"rule": "sms_pumping", "key": "zz", "until_ms": T0 + 600_000},
        {"rule": "sms_pumping", "key": key, "until_ms": T0}]});
    assert_eq!(b.apply_rule_keys(&sb, junk.to_string().as_bytes(), T0 + 14), 0);
}

#[test]
fn a_shadow_rule_counts_and_reports_but_never_acts() {
    let e = engine(
        r#"{"name":"quiet","match":{"path":"/api/**"},"key":["address"],"window_s":60,"threshold":3,
        "action":"block","shadow":true}"#,
    );
    let s = ready(&e);
    let r = req("192.0.2.40:1", "GET", "/api/x");
    let verdicts: Vec<Verdict> = (0..6).map(|i| send(&e, &s, &r, T0 + i).0).collect();
    assert!(verdicts.iter().all(|v| v.action == Action::Allow && v.reasons.is_empty()));
    assert_eq!(verdicts[2].rules.fired, 1);
    assert_eq!(verdicts[2].rules.shadow, 1);
    assert_eq!(verdicts[2].rules.blocked, 0);
    let lines = e.shadow_lines(&verdicts[2], "GET", "/api/x?token=1");
    let line: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!((line["rule"].as_str(), line["would"].as_str(), line["path"].as_str()), (Some("quiet"), Some("block"), Some("/api/x")));
}

#[test]
fn monitor_mode_only_would_block() {
    let e = Engine::new(
        &Config::from_json(
            br#"{"mode":"monitor","rules":[{"name":"r","key":["address"],"window_s":60,"threshold":2,"action":"block"}]}"#,
        )
        .unwrap(),
        &[7; SEED_BYTES],
    )
    .unwrap();
    let s = ready(&e);
    let r = req("192.0.2.50:1", "GET", "/x");
    let v = (0..3).map(|i| send(&e, &s, &r, T0 + i).0).last().unwrap();
    assert!(v.would_block && v.action == Action::Tag, "{v:?}");
    assert_eq!(v.reasons_header(), "r");
}

fn problem(json: &str) -> crate::config::ConfigError {
    Config::from_json(json.as_bytes()).unwrap_err()
}

#[test]
fn bad_rules_name_their_index_and_key() {
    let rule = |extra: &str| {
        // The bad rule: a good one with `extra`'s fields over it.
        let mut bad = serde_json::json!({"name":"bad","key":["address"],"window_s":60,"threshold":5,"action":"tag"});
        let extra: serde_json::Value = serde_json::from_str(&format!("{{{}}}", extra.trim_start_matches(','))).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            bad[k] = v.clone();
        }
        format!(
            r#"{{"route_groups":[{{"name":"api","path_prefix":"/api/"}}],"rules":[
            {{"name":"ok","key":["address"],"window_s":60,"threshold":5,"action":"tag"}},{bad}]}}"#
        )
    };
    let cases = [
        (r#","window_s":0"#, "rules[1].window_s"),
        (r#","threshold":0"#, "rules[1].threshold"),
        (r#","surprise":1"#, "rules[1]"),
        (r#","key":["nope"]"#, "rules[1].key[0]"),
        (r#","key":["address","client","prefix"]"#, "rules[1].key"),
        (r#","key":["session"]"#, "rules[1].key[0]"),
        (r#","count":"distinct:nope""#, "rules[1].count"),
        (r#","count":"cost:header:X""#, "rules[1].count"),
        (r#","match":{"route_groups":["nope"]}"#, "rules[1].match.route_groups[0]"),
        (r#","match":{"path":"/a/**/b"}"#, "rules[1].match.path"),
        (r#","match":{"statuses":["7xx"]}"#, "rules[1].match.statuses[0]"),
        (r#","match":{"headers":[{"name":"x-a","present":true,"prefix":"b"}]}"#, "rules[1].match.headers[0]"),
        (r#","match":{"methods":["get"]}"#, "rules[1].match.methods[0]"),
        (r#","reset_on":["2x"]"#, "rules[1].reset_on[0]"),
        (r#","weight":-1"#, "rules[1].weight"),
        (r#","keys":10"#, "rules[1].keys"),
        (r#","max_penalty_s":1,"penalty_s":60"#, "rules[1].max_penalty_s"),
        (r#","action":"block","penalty_s":0"#, "rules[1].penalty_s"),
    ];
    for (extra, key) in cases {
        let e = problem(&rule(extra));
        assert!(e.key.starts_with(key), "{extra}: {e}");
    }
    // Names: a safe charset, unique, not a built-in reason.
    for (name, why) in [("Bad-Name", "a-z"), ("ok", "duplicate"), ("probing", "built-in")] {
        let e = problem(&rule(&format!(r#","name":"{name}""#)));
        assert_eq!(e.key, "rules[1].name");
        assert!(e.problem.contains(why), "{name}: {e}");
    }
    // Without the scorer's tick channel a fleet rule counts per Envoy (the
    // checker warns); with it, it needs the fleet's secret.
    let alone = r#"{"rules":[{"name":"f","key":["address"],"window_s":1,"threshold":1,"action":"tag","fleet":true}]}"#;
    assert!(Config::from_json(alone.as_bytes()).is_ok());
    let fleet = r#"{"scorer":{"enabled":true},"rules":[{"name":"f","key":["address"],"window_s":1,"threshold":1,"action":"tag","fleet":true}]}"#;
    assert_eq!(problem(fleet).key, "rules[0].fleet");
    assert!(problem(fleet).problem.contains("secret"));
    let many: Vec<String> =
        (0..33).map(|i| format!(r#"{{"name":"r{i}","key":["address"],"window_s":1,"threshold":1,"action":"tag"}}"#)).collect();
    assert_eq!(problem(&format!(r#"{{"rules":[{}]}}"#, many.join(","))).key, "rules");
}

#[test]
fn rule_tables_are_fixed_whatever_the_keys() {
    let e = engine(r#"{"name":"r","key":["header:x-k"],"window_s":60,"threshold":1000,"action":"tag","keys":128}"#);
    let s = ready(&e);
    let before = s.total_bytes();
    for i in 0..5000u64 {
        let value = i.to_string();
        let mut r = req("192.0.2.60:1", "GET", "/api/x");
        r.headers = vec![("x-k", value.as_bytes())];
        send(&e, &s, &r, T0 + i);
    }
    assert_eq!(s.total_bytes(), before, "no key grows shared data");
    assert!(e.state_bytes() >= 128 * 72);
}

#[test]
fn a_rule_refusal_is_a_decision_with_the_rule_and_its_figure() {
    let e = engine(OTP);
    let s = ready(&e);
    let mut a = req("192.0.2.70:1", "POST", "/api/otp/verify");
    a.cookie = Some(b"session=a");
    let none = RuleAnswer::default();
    for i in 0..5 {
        exchange(&e, &s, &a, b"{}", 401, &none, T0 + i);
    }
    let (mut v, x) = send(&e, &s, &a, T0 + 10);
    assert_eq!(v.action, Action::Block);
    e.decided(&x, &mut v, "POST", "/api/otp/verify", T0 + 10);
    assert!(v.decision_id.is_some());
    let (events, _) = e.take_decisions();
    let reasons = &events.last().unwrap().reasons;
    let figure = reasons.iter().find(|r| r.reason == "otp_verify_failures").unwrap();
    assert_eq!((figure.limit, figure.window_s), (5.0, 300));
    assert_eq!(figure.text, "5 answers in 300 s; limit 5");
}

#[test]
fn fleet_counts_are_bounded_per_worker_and_per_batch() {
    let e = engine(SMS);
    let s = ready(&e);
    let none = RuleAnswer::default();
    for i in 0..1100u64 {
        let body = format!(r#"{{"phone":"+1555{i:07}"}}"#);
        exchange(&e, &s, &req("203.0.113.5:1", "POST", "/api/otp/send"), body.as_bytes(), 202, &none, T0 + i);
    }
    let batch: crate::wire::EventBatch = serde_json::from_slice(&e.tick_batch(&s, T0 + 2000).unwrap().body).unwrap();
    assert_eq!(batch.rule_counts.len(), crate::wire::MAX_BATCH_RULE_COUNTS);
    assert_eq!(batch.dropped, 1100 - RULE_DELTAS_CAP as u64, "what did not fit is counted");
    // The rest rides the next batches.
    let next: crate::wire::EventBatch = serde_json::from_slice(&e.tick_batch(&s, T0 + 3000).unwrap().body).unwrap();
    assert_eq!(next.rule_counts.len(), crate::wire::MAX_BATCH_RULE_COUNTS);
}
