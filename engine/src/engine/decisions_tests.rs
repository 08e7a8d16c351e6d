//! The operator's view end to end in the engine: decision ids, events with
//! figures, the block-loop guard, lifts that stick, allow entries.

use super::*;
use crate::state::store::{MemoryStore, SharedStore};
use crate::verdict::{Action, Verdict};
use crate::wire::{AllowEntry, EventBatch, FleetLift, FleetVerdicts, WIRE_VERSION};

const T0: u64 = 1_700_000_000_000;

const CONFIG: &str = r#"{"mode":"block","client":{"trusted_proxies":["127.0.0.1"]},
    "route_groups":[{"name":"api","path_prefix":"/api/"}],
    "rate":{"limits":[{"route_group":"api","requests":5,"window_s":10}]},
    "actions":{"rate_limit":"shed"},
    "penalty":{"duration_s":60},
    "credential_stuffing":{"login_routes":[{"path":"/login","failure_statuses":[401],"success_statuses":[200]}]},
    "scorer":{"enabled":true,"secret":"fleet-secret"},
    "state":{"shards":4,"slots_per_shard":16}}"#;

fn engine() -> (Engine, MemoryStore) {
    let e = Engine::new(&Config::from_json(CONFIG.as_bytes()).unwrap(), &[3; SEED_BYTES]).unwrap();
    let s = MemoryStore::new();
    e.create_state(&s).unwrap();
    e.start_decisions(&s, Some("envoy-a"));
    (e, s)
}

fn facts<'a>(xff: &'a str, method: &'a str, path: &'a str) -> RequestFacts<'a> {
    RequestFacts {
        identity: IdentityInput { peer: Some(b"127.0.0.1:1"), forwarded_for: Some(xff.as_bytes()), ..IdentityInput::default() },
        method,
        path,
        user_agent: Some("python-requests/2.32"),
        ..RequestFacts::default()
    }
}

/// One failed (or successful) login through every phase, named as the host
/// names decisions; returns the last verdict.
fn login(e: &Engine, s: &MemoryStore, xff: &str, user: &str, ok: bool, t: u64) -> Verdict {
    let f = facts(xff, "POST", "/login");
    let (mut v, mut ex) = e.on_request(s, &f, t);
    e.decided(&ex, &mut v, "POST", "/login", t);
    if v.action == Action::Block {
        return v;
    }
    let body = format!(r#"{{"username":"{user}","password":"x"}}"#);
    if let Some(mut refused) = e.on_request_body(s, &mut ex, body.as_bytes(), t) {
        e.decided(&ex, &mut refused, "POST", "/login", t);
        if refused.action == Action::Block {
            return refused;
        }
    }
    match e.on_response(s, &ex, if ok { 200 } else { 401 }, None, t + 1) {
        Some(mut answer) => {
            e.decided(&ex, &mut answer, "POST", "/login", t + 1);
            answer
        }
        None => v,
    }
}

fn batch(e: &Engine, s: &MemoryStore, t: u64) -> EventBatch {
    serde_json::from_slice(&e.tick_batch(s, t).unwrap().body).unwrap()
}

fn fleet(e: &Engine, s: &MemoryStore, answer: FleetVerdicts, t: u64) -> FleetApplied {
    e.apply_fleet_verdicts(s, &serde_json::to_vec(&answer).unwrap(), t)
}

/// A stuffer boxed at its 6th username; returns the blocking verdict.
fn boxed_stuffer(e: &Engine, s: &MemoryStore, xff: &str) -> (Verdict, u64) {
    for i in 0..20u64 {
        let v = login(e, s, xff, &format!("user{i}"), false, T0 + i * 100);
        if v.newly_blocked {
            return (v, T0 + i * 100);
        }
    }
    panic!("never blocked");
}

#[test]
fn a_block_is_named_and_its_event_says_why_with_the_figure_against_the_limit() {
    let (e, s) = engine();
    let (block, t) = boxed_stuffer(&e, &s, "203.0.113.9");
    let id = block.decision_id.clone().unwrap();
    assert!(id.contains('-'), "{id}");
    assert!(block.block_body().contains(&format!(r#""decision_id":"{id}""#)), "{}", block.block_body());
    // Every refusal of the penalty box quotes the block it comes from.
    let again = login(&e, &s, "203.0.113.9", "user99", false, t + 1_000);
    assert!(again.penalized);
    assert_eq!(again.decision_id.as_deref(), Some(id.as_str()));
    let b = batch(&e, &s, t + 2_000);
    let block_event = b.decisions.iter().find(|d| d.action == "block").unwrap();
    assert_eq!(block_event.id, id);
    assert!(block_event.client.starts_with("203.0.113.9"), "{block_event:?}");
    assert_eq!((block_event.address.as_str(), block_event.path.as_str()), ("203.0.113.9", "/login"));
    assert_eq!((block_event.mode.as_str(), block_event.status), ("block", 403));
    assert_eq!(block_event.instance, "envoy-a");
    assert!(block_event.username.as_deref().is_some_and(|u| u.len() == 16), "a hash, never the name: {block_event:?}");
    assert!(block_event.until_ms > t);
    let why = block_event.reasons.iter().find(|r| r.reason == "credential_stuffing").unwrap();
    assert!(why.limit > 0.0 && why.value > why.limit, "{why:?}");
    assert!(why.text.contains("limit"), "{why:?}");
    assert!(!serde_json::to_string(&b).unwrap().contains("user5"), "no raw username leaves the filter");
    // The box's refusal was aggregated onto an event of its own, quoting the block.
    let penalty = b.decisions.iter().find(|d| d.action == "penalty").unwrap();
    assert_eq!((penalty.id.as_str(), penalty.hits), (id.as_str(), 1));
}

#[test]
fn the_penalty_boxs_own_refusals_never_extend_or_renew_it() {
    // The block-loop guard: retries during the penalty are refused before
    // any counting, so the box ends when it said it would.
    let (e, s) = engine();
    let (block, t) = boxed_stuffer(&e, &s, "203.0.113.10");
    let until = block.penalty_until_ms;
    assert!(until > t);
    let mut last = t;
    for i in 1..400u64 {
        last = t + i * 250;
        if last >= until {
            break;
        }
        let v = login(&e, &s, "203.0.113.10", &format!("other{i}"), false, last);
        assert!(v.penalized && !v.newly_blocked, "{v:?}");
        assert_eq!(v.penalty_until_ms, until, "a box hit neither extends nor renews the box");
    }
    assert!(last >= until, "the loop ran to the end of the box");
    // The box ends on time: the client's next attempt is judged afresh
    // (and its retries during the box counted nothing).
    let after = login(&e, &s, "203.0.113.10", "late", false, until + 1);
    assert!(!after.penalized, "{after:?}");
    // Penalty hits leave as aggregated events, not one each.
    let b = batch(&e, &s, until + 10);
    let hits: u32 = b.decisions.iter().filter(|d| d.action == "penalty").map(|d| d.hits).sum();
    assert!(b.decisions.len() <= 4, "{} events", b.decisions.len());
    assert!(hits > 100, "{hits}");
}

#[test]
fn a_lift_releases_the_client_sticks_and_keeps_its_quiet_period() {
    let (e, s) = engine();
    let (block, t) = boxed_stuffer(&e, &s, "203.0.113.11");
    let label = batch(&e, &s, t + 1).decisions.iter().find(|d| d.action == "block").unwrap().client.clone();
    assert!(login(&e, &s, "203.0.113.11", "x", false, t + 500).penalized);
    let lift = FleetVerdicts {
        version: WIRE_VERSION,
        lifts: vec![
            FleetLift { client: label.clone(), reasons: vec![], quiet_until_ms: t + 600_000 },
            FleetLift { client: "203.0.113.11#pool".into(), reasons: vec![], quiet_until_ms: t + 600_000 },
        ],
        ..FleetVerdicts::default()
    };
    assert_eq!(fleet(&e, &s, lift, t + 1_000).lifts, 2);
    let v = login(&e, &s, "203.0.113.11", "owner", true, t + 1_100);
    assert!(!v.penalized && v.action != Action::Block, "{v:?}");
    // The same evidence within the quiet period does not re-box it.
    for i in 0..10u64 {
        let v = login(&e, &s, "203.0.113.11", &format!("typo{i}"), false, t + 2_000 + i * 100);
        assert!(v.action != Action::Block, "re-blocked during the quiet period: {v:?}");
    }
    assert_ne!(block.decision_id, None);
}

#[test]
fn a_lift_is_not_undone_by_a_workers_older_view() {
    // Two workers: B holds the client in its view (boxed), A applies the
    // lift; B's next merge must not bring the box back.
    let (a, s) = engine();
    let b = Engine::new(&Config::from_json(CONFIG.as_bytes()).unwrap(), &[3; SEED_BYTES]).unwrap();
    let (_, t) = boxed_stuffer(&b, &s, "203.0.113.12");
    let label = batch(&b, &s, t + 1).decisions.iter().find(|d| d.action == "block").unwrap().client.clone();
    let f = facts("203.0.113.12", "GET", "/api/items");
    assert!(b.on_request(&s, &f, t + 10).0.penalized, "B's view holds the box");
    let lift = FleetVerdicts {
        version: WIRE_VERSION,
        lifts: vec![FleetLift { client: label, reasons: vec![], quiet_until_ms: t + 60_000 }],
        ..FleetVerdicts::default()
    };
    assert_eq!(fleet(&a, &s, lift, t + 20).lifts, 1);
    // B's view expires (worker_sync_ms), it merges and reads shared data again.
    b.on_tick(&s, t + 2_000);
    a.on_tick(&s, t + 2_000);
    for who in [&a, &b] {
        let v = who.on_request(&s, &f, t + 2_100).0;
        assert!(!v.penalized, "{v:?}");
    }
}

#[test]
fn an_allow_entry_exempts_until_it_expires_and_a_bad_one_is_ignored() {
    let (e, s) = engine();
    let allows = vec![
        AllowEntry { id: "a1".into(), kind: "cidr".into(), value: "198.51.100.0/24".into(), until_ms: T0 + 60_000 },
        AllowEntry { id: "a2".into(), kind: "cidr".into(), value: "not an address".into(), until_ms: T0 + 60_000 },
    ];
    fleet(&e, &s, FleetVerdicts { version: WIRE_VERSION, allows, ..FleetVerdicts::default() }, T0);
    e.on_tick(&s, T0 + 1);
    let f = facts("198.51.100.7", "GET", "/api/items");
    for i in 0..20u64 {
        let v = e.on_request(&s, &f, T0 + 10 + i).0;
        assert!(v.exempt && v.action == Action::Allow, "{v:?}");
    }
    // Another address is judged as ever (its 6th request is over the limit).
    let other = facts("198.51.101.7", "GET", "/api/items");
    let refused = (0..8u64).filter(|i| e.on_request(&s, &other, T0 + 100 + i).0.action == Action::Block).count();
    assert!(refused > 0);
    // Expired: judged again.
    let late: Vec<Verdict> = (0..8u64).map(|i| e.on_request(&s, &f, T0 + 60_001 + i).0).collect();
    assert!(late.iter().all(|v| !v.exempt));
    assert!(late.iter().any(|v| v.action == Action::Block), "over the limit once the entry expired");
    // An empty list in a later answer clears it.
    fleet(&e, &s, FleetVerdicts { version: WIRE_VERSION, ..FleetVerdicts::default() }, T0 + 70_000);
    e.on_tick(&s, T0 + 70_001);
    assert!(!e.on_request(&s, &f, T0 + 70_002).0.exempt);
}

#[test]
fn sheds_are_named_and_aggregated_per_client() {
    let (e, s) = engine();
    let f = facts("198.51.100.20", "GET", "/api/items/17");
    let shed: Vec<Verdict> = (0..30u64)
        .map(|i| {
            let (mut v, ex) = e.on_request(&s, &f, T0 + i * 10);
            e.decided(&ex, &mut v, "GET", "/api/items/17?x=secret", T0 + i * 10);
            v
        })
        .filter(|v| v.action == Action::Block)
        .collect();
    assert!(shed.len() > 10);
    let ids: std::collections::BTreeSet<_> = shed.iter().map(|v| v.decision_id.clone().unwrap()).collect();
    let b = batch(&e, &s, T0 + 1_000);
    let events: Vec<_> = b.decisions.iter().filter(|d| d.address == "198.51.100.20").collect();
    assert!(!events.is_empty() && events.len() <= 2, "{events:?}");
    assert_eq!(events.iter().map(|d| d.hits as usize).sum::<usize>(), shed.len());
    assert!(events.iter().all(|d| d.path == "/api/items/{id}" && d.route_group.as_deref() == Some("api")));
    assert!(ids.len() <= 2, "one id per aggregated event: {ids:?}");
    let rate = events[0].reasons.iter().find(|r| r.reason == "rate_limit").unwrap();
    assert_eq!((rate.limit, rate.window_s), (5.0, 10));
}

#[test]
fn without_a_scorer_refusals_still_carry_an_id_and_nothing_is_queued() {
    let json = CONFIG.replace(r#""scorer":{"enabled":true,"secret":"fleet-secret"},"#, "");
    let e = Engine::new(&Config::from_json(json.as_bytes()).unwrap(), &[3; SEED_BYTES]).unwrap();
    let s = MemoryStore::new();
    e.create_state(&s).unwrap();
    let (block, _) = boxed_stuffer(&e, &s, "203.0.113.13");
    assert!(block.decision_id.is_some());
    assert!(e.tick_batch(&s, T0 + 10_000).is_none());
    assert_eq!(e.decisions_lost(), 0);
    let _ = s.get(crate::engine::WORKERS_KEY);
}
