//! Distributed stuffing end to end through every phase, with explicit time
//! (issue 23, login side): an API user who shares the attack's tool, the
//! filter's own refusals as the endpoint's evidence (and never a person's),
//! recognition at any pace, and stuffing that copies real browsers exactly.

use super::*;
use crate::state::store::MemoryStore;
use crate::verdict::Action;

const T0: u64 = 1_700_000_000_000;

/// The shipped login section (hold_login_headers, one route, 401/200).
const LOGIN: &str = r#"{"mode":"block","client":{"trusted_proxies":["127.0.0.1"]},
    "credential_stuffing":{"hold_login_headers":true,
      "login_routes":[{"path":"/api/login","method":"POST","failure_statuses":[401],"success_statuses":[200]}]},
    "risk":{"block_at":100,"tag_at":30,"half_life_s":300},"penalty":{"duration_s":60}}"#;

const CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
const FIREFOX: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0";
const SAFARI: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15";
/// A real browser's exact header set and order (what a careful tool copies).
const BROWSER_NAMES: &str = ":authority,:method,:path,:scheme,content-type,accept,accept-language,accept-encoding,user-agent,origin,referer,cookie";
const BROWSER_GET: &str = ":authority,:method,:path,:scheme,accept,accept-language,accept-encoding,user-agent,referer,cookie";
const CURL: &str = "curl/8.5.0";
const CURL_NAMES: &str = ":authority,:path,:method,:scheme,user-agent,accept,content-type,content-length";

fn engine(json: &str) -> Engine {
    let e = Engine::new(&Config::from_json(json.as_bytes()).unwrap(), &[9; SEED_BYTES]).unwrap();
    e
}

/// One login attempt.
struct Try<'a> {
    xff: &'a str,
    ua: &'a str,
    names: &'a str,
    country: &'a str,
    user: &'a str,
    password: &'a str,
    /// The application's answer when it is reached.
    ok: bool,
}

/// What came of an attempt: refused by the filter (any phase), and what
/// the application was told.
#[derive(Debug)]
struct Outcome {
    refused: bool,
    told: Option<String>,
}

fn attempt(e: &Engine, s: &MemoryStore, a: &Try<'_>, t: u64) -> Outcome {
    let facts = RequestFacts {
        identity: IdentityInput { peer: Some(b"127.0.0.1:1"), forwarded_for: Some(a.xff.as_bytes()), ..IdentityInput::default() },
        method: "POST",
        path: "/api/login",
        user_agent: Some(a.ua),
        header_names: Some(a.names),
        country: Some(a.country),
        ..RequestFacts::default()
    };
    let (v, mut ex) = e.on_request(s, &facts, t);
    if v.action == Action::Block {
        return Outcome { refused: true, told: v.login_risk };
    }
    let body = format!(r#"{{"username":"{}","password":"{}"}}"#, a.user, a.password);
    if let Some(refused) = e.on_request_body(s, &mut ex, body.as_bytes(), t) {
        return Outcome { refused: refused.action == Action::Block, told: refused.login_risk };
    }
    let told = e.login_risk(&ex).or(v.login_risk);
    let answer = e.on_response(s, &ex, if a.ok { 200 } else { 401 }, None, t + 5);
    Outcome { refused: answer.is_some_and(|a| a.action == Action::Block), told }
}

fn browse(e: &Engine, s: &MemoryStore, xff: &str, ua: &str, names: &str, path: &str, t: u64) -> bool {
    let facts = RequestFacts {
        identity: IdentityInput { peer: Some(b"127.0.0.1:1"), forwarded_for: Some(xff.as_bytes()), ..IdentityInput::default() },
        method: "GET",
        path,
        user_agent: Some(ua),
        header_names: Some(names),
        country: Some("GB"),
        ..RequestFacts::default()
    };
    let (v, ex) = e.on_request(s, &facts, t);
    if v.action == Action::Block {
        return true;
    }
    e.on_response(s, &ex, 200, None, t + 3).is_some_and(|a| a.action == Action::Block)
}

/// A tiny seeded generator (xorshift), so that every run draws alike.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A live site: `hours` of its 200 users' logins (one every 2 s, ~20 %
/// after a typo), each from their own address and browser, so that the
/// baseline is warm and the accounts and their owners are known.
fn live_site(e: &Engine, s: &MemoryStore, t: &mut u64, logins: u64) {
    let uas = [CHROME, FIREFOX, SAFARI];
    for i in 0..logins {
        *t += if i < 200 { 500 } else { 2_000 };
        let u = i % 200;
        let (xff, user, password) = (format!("198.51.{}.{}", u / 100, u % 100 + 1), format!("user{u:04}"), format!("pass-{u:04}"));
        let ua = uas[(u % 3) as usize];
        if i % 5 == 1 {
            // A typo of the user's own password (no two alike).
            let typo = format!("pass-{u:04}{}", i % 7);
            attempt(e, s, &Try { xff: &xff, ua, names: BROWSER_NAMES, country: "GB", user: &user, password: &typo, ok: false }, *t);
            *t += 100;
        }
        let out = attempt(e, s, &Try { xff: &xff, ua, names: BROWSER_NAMES, country: "GB", user: &user, password: &password, ok: true }, *t);
        assert!(!out.refused, "real login {i} refused: {out:?}");
    }
}

/// Later attempts refused after the first refusal, as a share.
fn later_share(refused: &[bool]) -> (Option<usize>, f64, usize) {
    let Some(first) = refused.iter().position(|&r| r) else {
        return (None, 0.0, 0);
    };
    let later = &refused[first + 1..];
    let n = later.iter().filter(|&&r| r).count();
    (Some(first), n as f64 / later.len().max(1) as f64, later.len())
}

// ---- part 3: API users who share the attacker's tools ----

#[test]
fn an_api_user_with_the_attacks_client_library_logs_in_from_its_own_place_during_the_attack() {
    // A live site, and one just started (nothing known: only the tool's
    // fingerprint tells the attack's attempts apart).
    for history in [3000, 20] {
        api_user_during_curl_stuffing(history);
    }
}

fn api_user_during_curl_stuffing(history: u64) {
    let (e, s) = (engine(LOGIN), MemoryStore::new());
    e.create_state(&s).unwrap();
    let mut t = T0;
    live_site(&e, &s, &mut t, history);
    // The API user's script: curl, from its server's address, logs in
    // every few minutes (its last successful login is from here).
    let script = |password: &'static str| Try {
        xff: "203.0.113.5",
        ua: CURL,
        names: CURL_NAMES,
        country: "GB",
        user: "api-bot@partner.example",
        password,
        ok: password == "right",
    };
    for _ in 0..3 {
        t += 180_000;
        assert!(!attempt(&e, &s, &script("right"), t).refused);
    }
    // A distributed run with the same client library: one try per new
    // address, four a second, a leaked list; the script logs in every ~50
    // attempts from its own address.
    let mut rng = Rng(0x5eed_2023);
    let (mut refused, mut script_refused, mut told) = (Vec::new(), 0, Vec::new());
    for a in 0..1200u64 {
        t += 250;
        let xff = format!("100.{}.{}.{}", 64 + a % 60, a / 60 % 256, rng.below(250) + 1);
        let (user, password) = (format!("leak{}@mail.example", rng.below(1_000_000)), format!("pw{}", rng.below(1_000_000)));
        let out = attempt(&e, &s, &Try { xff: &xff, ua: CURL, names: CURL_NAMES, country: "US", user: &user, password: &password, ok: false }, t);
        refused.push(out.refused);
        if a % 50 == 25 {
            let out = attempt(&e, &s, &script("right"), t + 1);
            script_refused += usize::from(out.refused);
            told.push(out.told);
        }
    }
    let (first, share, later) = later_share(&refused);
    println!("curl stuffing after {history} logins: first refused {first:?}, {:.1} % of {later} later refused; the API user refused {script_refused} of {}, told {:?}", share * 100.0, told.len(), told.last());
    assert!(first.is_some_and(|f| f < 200), "recognised at {first:?}");
    assert!(share >= 0.95, "{:.1} % of later attempts refused", share * 100.0);
    assert_eq!(script_refused, 0, "the account's owner, from its own address with its own tool");
    assert!(told.iter().flatten().all(|t| !t.starts_with("high")), "{told:?}");
}
