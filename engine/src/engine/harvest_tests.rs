//! Object routes end to end, with explicit time: a distributed harvest of a
//! private route among people browsing, a keyed partner reading the public
//! catalogue, a keyed client walking private objects.

use super::*;
use crate::state::store::MemoryStore;
use crate::verdict::{Action, Verdict};

const T0: u64 = 1_700_000_000_000;
const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
const SAFARI: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15";

/// The shipped configuration's object-route, identity and limit parts.
const SHIPPED: &str = r#"{"mode":"block",
    "client":{"trusted_proxies":["127.0.0.1"],"api_key_header":"x-api-key","session_cookie":"session",
              "jwt_claim":"sub","accepted_credential_header":"x-api-credential"},
    "route_groups":[{"name":"login","path_prefix":"/api/login","methods":["POST"]},{"name":"api","path_prefix":"/api/"}],
    "rate":{"limits":[{"route_group":"login","requests":120,"window_s":60},
                      {"route_group":"api","requests":15,"window_s":1,"anonymous_only":true},
                      {"route_group":"api","requests":100,"window_s":1},
                      {"route_group":"api","requests":6000,"window_s":60}]},
    "enumeration":{"object_routes":[{"path":"/api/users/{id}","objects":"private"},
                                    {"path":"/api/products/{id}","objects":"public"}]},
    "risk":{"block_at":100,"tag_at":30,"half_life_s":300},
    "penalty":{"duration_s":60}}"#;

fn engine() -> (Engine, MemoryStore) {
    let e = Engine::new(&Config::from_json(SHIPPED.as_bytes()).unwrap(), &[7; SEED_BYTES]).unwrap();
    let s = MemoryStore::new();
    e.create_state(&s).unwrap();
    (e, s)
}

/// splitmix64: a seeded, reproducible draw.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One client's request and its answer (200 unless the id does not exist);
/// a credential the API knows is accepted with the answer, as the demo API
/// says with `x-api-credential`. Returns the request's verdict.
fn call(e: &Engine, s: &MemoryStore, xff: &str, ua: &str, path: &str, key: Option<&str>, bearer: Option<&str>, t: u64) -> Verdict {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let mut facts = RequestFacts {
        identity: IdentityInput {
            peer: Some(b"127.0.0.1:1"),
            forwarded_for: Some(xff.as_bytes()),
            api_key: key.map(str::as_bytes),
            authorization: auth.as_deref().map(str::as_bytes),
            ..IdentityInput::default()
        },
        method: "GET",
        path,
        ..RequestFacts::default()
    };
    facts.user_agent = Some(ua);
    let (v, ex) = e.on_request(s, &facts, t);
    if v.action == Action::Block {
        return v;
    }
    e.on_response(s, &ex, 200, None, t + 2);
    if e.credential_header_for(&ex).is_some() {
        e.on_credential_accepted(s, &ex, t + 2);
    }
    v
}

fn harvested(e: &Engine, s: &MemoryStore, t: u64) -> bool {
    let key = e.object_route_keys.first().copied().unwrap();
    e.object_routes.peek(s, key).unwrap().is_some_and(|r| r.harvested(t))
}

#[derive(Default, Debug)]
struct Tally {
    harvest: u32,
    recognised_at: Option<u32>,
    later: u32,
    later_refused: u32,
    benign: u32,
    benign_refused: Vec<String>,
}

/// 120 s of people: 40 shoppers browsing products (pages and random
/// items), 30 signed-in users reading their own profile now and then, and a
/// flash sale (60 new shoppers on 3 products); from 60 s on, a harvest of
/// `/api/users/{id}` from 250 addresses with browser headers, each reading
/// `per_address` ids — consecutive, or scattered when `scattered` — at
/// 25 requests a second. `browse_first`: each harvesting address opens a
/// product page first.
fn run(per_address: u64, scattered: bool, browse_first: bool) -> Tally {
    let (e, s) = engine();
    let mut tally = Tally::default();
    let benign = |v: &Verdict, who: String, tally: &mut Tally| {
        tally.benign += 1;
        if v.would_block {
            tally.benign_refused.push(format!("{who}: {:?}", v.reasons_header()));
        }
    };
    let harvest_start = T0 + 60_000;
    let mut next_harvest = 0u64;
    let total = 250 * per_address;
    for step in 0..2_400u64 {
        // 50 ms steps over 120 s.
        let t = T0 + step * 50;
        // Shoppers: one request each every 2 s, staggered.
        let shopper = step % 40;
        {
            let xff = format!("10.1.0.{}", shopper + 10);
            let r = mix(step);
            let path = if r.is_multiple_of(4) { format!("/api/products?page={}", 1 + r % 25) } else { format!("/api/products/{}", 1 + (r >> 8) % 500) };
            let v = call(&e, &s, &xff, if shopper % 2 == 0 { CHROME } else { SAFARI }, &path, None, None, t);
            benign(&v, format!("shopper {shopper} {path}"), &mut tally);
        }
        // Signed-in users: each reads its own profile every ~6 s.
        if step % 4 == 1 {
            let user = (step / 4) % 30;
            let xff = format!("10.2.0.{}", user + 10);
            let path = format!("/api/users/{}", 100 + user);
            let token = format!("token-of-user-{user}");
            let v = call(&e, &s, &xff, SAFARI, &path, None, Some(&token), t);
            benign(&v, format!("user {user}"), &mut tally);
        }
        // A flash sale at 70–85 s: new shoppers on three products.
        if (1_400..1_700).contains(&step) && step % 5 == 0 {
            let n = (step - 1_400) / 5;
            let xff = format!("10.3.{}.{}", n / 200, n % 200 + 10);
            let path = format!("/api/products/{}", [7, 8, 9][(n % 3) as usize]);
            let v = call(&e, &s, &xff, CHROME, &path, None, None, t + 1);
            benign(&v, format!("flash sale {n}"), &mut tally);
        }
        // The harvest: 25 a second from 60 s on.
        if t >= harvest_start && step % 2 == 0 && next_harvest < total {
            for _ in 0..1 {
                let address = next_harvest / per_address;
                let xff = format!("198.18.{}.{}", address / 200, address % 200 + 10);
                let ua = if address.is_multiple_of(3) { SAFARI } else { CHROME };
                if browse_first && next_harvest.is_multiple_of(per_address) {
                    call(&e, &s, &xff, ua, "/api/products/3", None, None, t + 3);
                }
                let id = if scattered { 1 + mix(next_harvest) % 1000 } else { 1 + next_harvest };
                let v = call(&e, &s, &xff, ua, &format!("/api/users/{id}"), None, None, t + 4);
                let n = tally.harvest;
                tally.harvest += 1;
                if tally.recognised_at.is_some() {
                    tally.later += 1;
                    tally.later_refused += u32::from(v.would_block);
                }
                if tally.recognised_at.is_none() && harvested(&e, &s, t + 4) {
                    tally.recognised_at = Some(n);
                }
                next_harvest += 1;
            }
        }
    }
    tally
}

fn assert_targets(t: &Tally) {
    eprintln!("harvest: recognised at {:?}, {} of {} later refused, {} benign requests", t.recognised_at, t.later_refused, t.later, t.benign);
    let at = t.recognised_at.unwrap_or(u32::MAX);
    assert!(at <= 300, "recognised within 300 harvest requests: {t:?}");
    assert!(t.later > 0 && f64::from(t.later_refused) >= 0.8 * f64::from(t.later), "{} of {} later refused", t.later_refused, t.later);
    assert!(t.benign > 3_000 && t.benign_refused.is_empty(), "{} benign refused: {:?}", t.benign_refused.len(), t.benign_refused.first());
}

#[test]
fn a_distributed_harvest_of_consecutive_ids_is_recognised_and_refused_and_people_go_on() {
    let t = run(4, false, false);
    assert_targets(&t);
}

#[test]
fn a_harvest_in_random_order_by_addresses_that_browse_first_is_refused_too() {
    let t = run(4, true, true);
    assert_targets(&t);
}

#[test]
fn a_harvest_reading_one_id_per_address_is_refused() {
    let t = run(1, false, true);
    assert_targets(&t);
}

#[test]
fn a_keyed_partner_reads_the_public_catalogue_and_a_keyed_walker_of_private_objects_is_refused() {
    let (e, s) = engine();
    // 40 requests a second for 90 s: items in order, and every page.
    let mut refused = Vec::new();
    for i in 0..3_600u64 {
        let t = T0 + i * 25;
        let path = if i % 10 == 9 { format!("/api/products?page={}", 1 + (i / 10) % 25) } else { format!("/api/products/{}", 1 + i % 500) };
        let v = call(&e, &s, "192.0.2.77", "partner-sync/2.1 (python-requests/2.31)", &path, Some("partner-key-1"), None, t);
        if v.would_block {
            refused.push((i, v.reasons_header()));
        }
    }
    assert!(refused.is_empty(), "{} refused, first: {:?}", refused.len(), refused.first());
    // The same kind of client walking other people's profiles.
    let t = T0 + 200_000;
    let first = (0..100u64)
        .position(|i| call(&e, &s, "192.0.2.78", "sync/1.0", &format!("/api/users/{}", 1 + i), Some("partner-key-2"), None, t + i * 25).would_block);
    assert!(first.is_some_and(|n| n < 30), "{first:?}");
    // Scattered ids too.
    let first = (0..100u64).position(|i| {
        call(&e, &s, "192.0.2.79", "sync/1.0", &format!("/api/users/{}", 1 + mix(i) % 1000), Some("partner-key-2"), None, t + i * 25)
            .would_block
    });
    assert!(first.is_some_and(|n| n < 30), "{first:?}");
}
