//! End-to-end tests of the real binary over HTTP: each test starts its own
//! scorer(s) on 127.0.0.1:0 with a temporary state directory, reads the port
//! from the banner, and kills every process it started when it ends (Drop).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SECRET: &str = "test-secret";
/// Variables the binary reads; the tests must not inherit them.
const SCORER_ENV: [&str; 7] = [
    "LISTEN",
    "REDIS_URL",
    "ABUSE_SCORER_SECRET",
    "STATE_DIR",
    "WARM_UP",
    "BLOCK_AT",
    "TTL_S",
];

/// One running scorer, killed on drop.
struct Scorer {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Scorer {
    fn start(state_dir: &Path, extra: &[&str]) -> Scorer {
        std::fs::create_dir_all(state_dir).unwrap();
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let log = state_dir.join(format!(
            "scorer-{}.log",
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_abuse-scorer"));
        for var in SCORER_ENV {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state_dir)
            .args(["--secret", SECRET])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start abuse-scorer");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {} // drain until the process exits
        });
        let banner = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "no banner; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let base = banner
            .strip_prefix("abuse-scorer listening on ")
            .unwrap_or_else(|| panic!("unexpected banner {banner:?}"))
            .to_string();
        assert!(
            !base.ends_with(":0"),
            "the banner shows the real port: {base}"
        );
        Scorer { child, base, log }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "scorer did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Scorer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// (status, body) of a POST.
fn post(url: &str, secret: Option<&str>, body: &str) -> (u16, String) {
    let mut req = agent().post(url).content_type("application/json");
    if let Some(s) = secret {
        req = req.header("x-abuse-scorer-secret", s);
    }
    let mut resp = req.send(body).unwrap();
    (
        resp.status().as_u16(),
        resp.body_mut().read_to_string().unwrap(),
    )
}

/// (status, body) of a POST too large for the scorer: it may answer 413 and
/// close before reading the whole body, so a write error is not the test's
/// failure (an HTTP client would report a broken pipe instead of the answer).
fn post_oversized(url: &str, secret: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\nx-abuse-scorer-secret: {secret}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body.as_bytes()));
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn get(url: &str, secret: Option<&str>) -> (u16, String) {
    let mut req = agent().get(url);
    if let Some(s) = secret {
        req = req.header("x-abuse-scorer-secret", s);
    }
    let mut resp = req.call().unwrap();
    (
        resp.status().as_u16(),
        resp.body_mut().read_to_string().unwrap(),
    )
}

fn get_json(url: &str, secret: Option<&str>) -> Value {
    let (status, body) = get(url, secret);
    assert_eq!(status, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn request(client: &str, risk: f32, reasons: &[&str]) -> Value {
    json!({
        "version": 1,
        "client": client,
        "method": "POST",
        "path": "/api/login",
        "reasons": reasons,
        "features": { "risk": risk, "requests": 12, "recent_requests": 3, "login_failures": 1 },
    })
}

/// Scores and returns the answer, which must be a 200.
fn score(s: &Scorer, body: &Value) -> Value {
    let (status, text) = post(&s.url("/v1/score"), Some(SECRET), &body.to_string());
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn error_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {body}"))
        .to_string()
}

#[test]
fn refuses_bad_requests_with_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scorer::start(dir.path(), &[]);
    let url = s.url("/v1/score");
    let valid = request("203.0.113.9", 20.0, &["probing"]).to_string();

    let (status, body) = post(&url, None, &valid);
    assert_eq!(status, 401);
    assert!(error_of(&body).contains("x-abuse-scorer-secret"));
    let (status, body) = post(&url, Some("wrong"), &valid);
    assert_eq!((status, error_of(&body).is_empty()), (401, false));
    let (status, _) = get(&s.url("/v1/verdicts?since=0"), Some("nope"));
    assert_eq!(status, 401);

    let big = format!("{{\"version\":1,\"client\":\"{}\"}}", "a".repeat(20_000));
    let (status, body) = post(&url, Some(SECRET), &big);
    assert_eq!(status, 413);
    assert!(error_of(&body).contains("16384"));

    for (bad, needle) in [
        ("{not json", "invalid score request"),
        (
            "{\"version\":1,\"client\":\"1.2.3.4\",\"nope\":1}",
            "unknown field `nope`",
        ),
        ("{\"version\":2,\"client\":\"1.2.3.4\"}", "wire version 2"),
        ("{\"client\":\"1.2.3.4\"}", "wire version 0"),
        ("{\"version\":1,\"client\":\"\"}", "`client`"),
        (
            "{\"version\":1,\"client\":\"1.2.3.4\",\"features\":{\"risk\":\"high\"}}",
            "invalid type",
        ),
        ("[1, \"1.2.3.4\"]", "must be a JSON object"),
        ("", "must be a JSON object"),
    ] {
        let (status, body) = post(&url, Some(SECRET), bad);
        assert_eq!(status, 400, "{bad}: {body}");
        let error = error_of(&body);
        assert!(error.contains(needle), "{bad}: {error}");
    }
    let (status, body) = get(&s.url("/v1/verdicts?since=-1"), Some(SECRET));
    assert_eq!((status, error_of(&body).contains("since")), (400, true));

    let (status, body) = post(&url, Some(SECRET), &valid);
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["version"], 1);
    assert_eq!(answer["action"], "allow");
    assert_eq!(answer["reasons"], json!(["probing"]));
    assert_eq!(answer["ttl_s"], 30);

    let metrics = get(&s.url("/metrics"), None).1;
    for needle in [
        "abuse_scorer_errors_total{kind=\"unauthorized\"} 3",
        "abuse_scorer_errors_total{kind=\"too_large\"} 1",
        "abuse_scorer_errors_total{kind=\"bad_request\"} 9",
    ] {
        assert!(metrics.contains(needle), "missing {needle}");
    }
}

#[test]
fn health_metrics_dashboard_and_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scorer::start(dir.path(), &["--block-at", "100", "--ttl-s", "20"]);

    let health = get_json(&s.url("/healthz"), None);
    assert_eq!(
        health,
        json!({"status": "ok", "store": "memory", "redis_ok": false, "model": {"trained": 0, "warm": false}})
    );

    let tagged = score(&s, &request("198.51.100.20", 60.0, &["scraping"]));
    assert_eq!(
        (tagged["action"].as_str(), tagged["score"].as_f64()),
        (Some("tag"), Some(60.0))
    );
    let blocked = score(
        &s,
        &request("198.51.100.21", 140.0, &["credential_stuffing"]),
    );
    assert_eq!(blocked["action"], "block");
    let before = Instant::now();
    let verdicts = get_json(&s.url("/v1/verdicts?since=0"), Some(SECRET));
    assert_eq!(verdicts["version"], 1);
    assert_eq!(verdicts["next"], 1);
    let v = &verdicts["verdicts"][0];
    assert_eq!(
        (v["client"].as_str(), v["reasons"].clone()),
        (Some("198.51.100.21"), json!(["credential_stuffing"]))
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let until = v["until_ms"].as_u64().unwrap();
    assert!(
        until > now_ms + 70_000 && until <= now_ms + 80_000 + before.elapsed().as_millis() as u64,
        "4 × ttl_s"
    );
    assert_eq!(
        get_json(&s.url("/v1/verdicts?since=1"), Some(SECRET))["verdicts"],
        json!([])
    );
    // The block is fleet state now: the same client is blocked at risk 0.
    let again = score(&s, &request("198.51.100.21", 0.0, &[]));
    assert_eq!(
        (again["action"].as_str(), again["reasons"].clone()),
        (Some("block"), json!(["credential_stuffing"]))
    );

    let health = get_json(&s.url("/healthz"), None);
    assert_eq!(health["model"]["trained"], 0, "callouts are scored, never learned");

    let (status, metrics) = get(&s.url("/metrics"), None);
    assert_eq!(status, 200);
    for needle in [
        "abuse_scorer_score_requests_total{action=\"tag\"} 1",
        "abuse_scorer_score_requests_total{action=\"block\"} 2",
        "abuse_scorer_score_requests_total{action=\"allow\"} 0",
        "abuse_scorer_detections_total{reason=\"credential_stuffing\"} 2",
        "abuse_scorer_detections_total{reason=\"scraping\"} 1",
        "abuse_scorer_fleet_verdicts_total 1",
        "abuse_scorer_model_samples 0",
        "abuse_scorer_model_warm 0",
        "abuse_scorer_store_errors_total 0",
        "abuse_scorer_store_fallbacks_total 0",
        "abuse_scorer_request_duration_seconds_bucket{route=\"score\"",
        "abuse_scorer_errors_total{kind=\"bad_request\"} 0",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }

    let data = get_json(&s.url("/v1/dashboard"), None);
    let top = data["top_clients"].as_array().unwrap();
    assert_eq!(top[0]["client"], "198.51.100.21");
    assert_eq!(top[0]["requests"], 2);
    let scraper = top
        .iter()
        .find(|c| c["client"] == "198.51.100.20")
        .expect("scored client is listed");
    assert_eq!(scraper["reasons"], json!(["scraping"]));
    assert_eq!(scraper["action"], "tag");
    assert_eq!(
        data["detections"]["series"]["credential_stuffing"]
            .as_array()
            .unwrap()
            .len(),
        60
    );
    assert_eq!(
        data["callouts"]["total"],
        json!({"allow": 0, "tag": 1, "block": 2})
    );
    assert_eq!(
        data["model"],
        json!({"trained": 0, "warm": false, "warm_up": 200, "excluded": 0, "gated": 0, "groups": []})
    );
    assert_eq!(data["store"], json!({"kind": "memory", "redis_ok": false}));

    let (status, page) = get(&s.url("/"), None);
    assert_eq!(status, 200);
    for id in [
        "id=\"top-clients\"",
        "id=\"detections-chart\"",
        "id=\"callout-rate\"",
        "id=\"model-state\"",
        "data-client",
        "/v1/dashboard",
    ] {
        assert!(page.contains(id), "dashboard lacks {id}");
    }
    for external in ["<script src", "<link", "@import", "url("] {
        assert!(
            !page.contains(external),
            "the dashboard loads nothing from elsewhere: {external}"
        );
    }
    assert_eq!(get(&s.url("/nope"), None).0, 404);
}

#[test]
fn model_snapshot_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Scorer::start(dir.path(), &["--warm-up", "20"]);
    // Callouts alone never warm it: they are scored, not learned.
    for i in 0..30 {
        let answer = score(&s, &request(&format!("192.0.2.{i}"), (i % 7) as f32, &[]));
        assert!(answer["anomaly"].is_null(), "request {i}: {answer}");
    }
    // The batches' samples do.
    let samples: Vec<Value> = (0..31)
        .map(|i| sample(&format!("192.0.2.{i}"), (i % 7) as f32, false))
        .collect();
    send(&s, &sample_batch(&samples[..20]));
    send(&s, &sample_batch(&samples[20..]));
    let warm = score(&s, &request("192.0.2.200", 3.0, &[]));
    assert!(warm["anomaly"].as_f64().unwrap() >= 0.0, "{warm}");
    let status = s.terminate();
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status:?}\n{}",
        s.log()
    );
    assert!(s.log().contains("saved the model snapshot"), "{}", s.log());
    assert!(dir.path().join("model.json").is_file());

    let s = Scorer::start(dir.path(), &["--warm-up", "20"]);
    let health = get_json(&s.url("/healthz"), None);
    assert_eq!(health["model"], json!({"trained": 31, "warm": true}));
    let again = score(&s, &request("192.0.2.201", 3.0, &[]));
    assert!(
        again["anomaly"].is_f64(),
        "warm at once, no second warm-up: {again}"
    );

    // A corrupt snapshot is logged and ignored.
    drop(s);
    std::fs::write(dir.path().join("model.json"), "{\"format\":1,").unwrap();
    let s = Scorer::start(dir.path(), &[]);
    assert_eq!(get_json(&s.url("/healthz"), None)["model"]["trained"], 0);
    assert!(s.log().contains("ignoring the model snapshot"));
}

/// A throwaway redis-server, killed on drop.
struct Redis {
    child: Child,
    url: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Option<Redis> {
    if Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let redis = Redis {
        child,
        url: format!("redis://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(redis)
}

fn has_reason(answer: &Value, reason: &str) -> bool {
    answer["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r == reason)
}

#[test]
fn two_scorers_share_fleet_state_through_redis_and_survive_its_loss() {
    let Some(redis) = start_redis() else {
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server); the Redis fleet test did not run");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = Scorer::start(&dir.path().join("a"), &["--redis-url", &redis.url]);
    let b = Scorer::start(&dir.path().join("b"), &["--redis-url", &redis.url]);
    assert_eq!(get_json(&a.url("/healthz"), None)["redis_ok"], true);
    assert_eq!(get_json(&b.url("/healthz"), None)["store"], "redis");

    // One account tried from many addresses, through two scorers: 12 via A,
    // then B sees the fleet-wide count pass 20.
    let attempt = |s: &Scorer, i: usize| {
        let mut body = request(&format!("203.0.113.{i}"), 10.0, &[]);
        body["username"] = json!(if i.is_multiple_of(2) {
            "Victim"
        } else {
            " victim "
        });
        score(s, &body)
    };
    for i in 0..12 {
        assert!(
            !has_reason(&attempt(&a, i), "credential_stuffing"),
            "attempt {i} via A"
        );
    }
    let via_b: Vec<Value> = (12..22).map(|i| attempt(&b, i)).collect();
    for (n, answer) in via_b.iter().enumerate().take(6) {
        assert!(
            !has_reason(answer, "credential_stuffing"),
            "attempt {} overall",
            13 + n
        );
    }
    let last = via_b.last().unwrap();
    assert!(
        has_reason(last, "credential_stuffing"),
        "22 attempts fleet-wide: {last}"
    );
    assert!(last["score"].as_f64().unwrap() >= 60.0);

    // A verdict issued by A shows in B's verdict feed and blocks there.
    let cursor = get_json(&b.url("/v1/verdicts?since=0"), Some(SECRET))["next"]
        .as_u64()
        .unwrap();
    let blocked = score(&a, &request("198.51.100.99", 150.0, &["probing"]));
    assert_eq!(blocked["action"], "block");
    let feed = get_json(
        &b.url(&format!("/v1/verdicts?since={cursor}")),
        Some(SECRET),
    );
    let clients: Vec<&str> = feed["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["client"].as_str().unwrap())
        .collect();
    assert_eq!(clients, ["198.51.100.99"], "{feed}");
    assert!(feed["next"].as_u64().unwrap() > cursor);
    assert_eq!(
        score(&b, &request("198.51.100.99", 0.0, &[]))["action"],
        "block"
    );

    // Redis goes away: still 200s, from the local store, with a warning.
    drop(redis);
    for i in 0..5 {
        let mut body = request(&format!("192.0.2.{i}"), 10.0, &[]);
        body["username"] = json!("someone");
        let started = Instant::now();
        score(&a, &body);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "fallback is quick"
        );
    }
    assert_eq!(
        get_json(&a.url("/v1/verdicts?since=0"), Some(SECRET))["version"],
        1
    );
    let health = get_json(&a.url("/healthz"), None);
    assert_eq!(
        (health["status"].as_str(), health["redis_ok"].as_bool()),
        (Some("ok"), Some(false))
    );
    let log = a.log();
    assert!(
        log.contains("WARN") && log.contains("falling back to the local memory store"),
        "{log}"
    );
    let metrics = get(&a.url("/metrics"), None).1;
    let fallbacks: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("abuse_scorer_store_fallbacks_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(fallbacks >= 5.0, "{metrics}");
    assert!(metrics.contains("abuse_scorer_redis_up 0"));
    // The block A decided before the outage is still honoured from its mirror.
    assert_eq!(
        score(&a, &request("198.51.100.99", 0.0, &[]))["action"],
        "block"
    );
}

/// Mangled bodies (cut, flipped bytes, extreme numbers, deep nesting) get a
/// 200 or a 4xx, and the scorer keeps answering.
#[test]
fn never_breaks_on_mangled_input() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scorer::start(dir.path(), &["--warm-up", "10"]);
    let url = s.url("/v1/score");
    let mut valid = request("203.0.113.50", 30.0, &["probing"]);
    valid["username"] = json!("bob");
    valid["session"] = json!("a1b2c3");
    let valid = valid.to_string();
    let mut bodies: Vec<String> = vec![
        valid.replace("30.0", "1e39"),
        valid.replace("30.0", "1e309"),
        valid.replace("30.0", "-1e38"),
        valid.replace("30.0", "NaN"),
        valid.replace("\"bob\"", "\"\""),
        valid.replace("\"bob\"", "null"),
        valid.replace("\"bob\"", &format!("\"{}\"", "\\u0000".repeat(50))),
        valid.replace("\"a1b2c3\"", "\"\""),
        format!("{}{}", "{\"a\":".repeat(200), "}".repeat(200)),
        format!(
            "{{\"version\":1,\"client\":\"x\",\"reasons\":[{}]}}",
            vec!["\"a\""; 2000].join(",")
        ),
        "{\"version\":18446744073709551616}".into(),
        "{\"version\":1,\"client\":\"x\"}\u{0}".into(),
        "\u{feff}{}".into(),
    ];
    // Deterministic byte-level mangling of the valid body.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let bytes = valid.as_bytes();
    for _ in 0..150 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut b = bytes.to_vec();
        let i = (seed % b.len() as u64) as usize;
        match seed % 3 {
            0 => b.truncate(i),
            1 => b[i] = (seed >> 8) as u8,
            _ => b.insert(i, b"{[\",:0-e9"[(seed >> 16) as usize % 9]),
        }
        bodies.push(String::from_utf8_lossy(&b).into_owned());
    }
    let mut ok = 0;
    for body in &bodies {
        let (status, text) = post(&url, Some(SECRET), body);
        assert!(
            status == 200 || status == 400,
            "{status} for {body:?}: {text}"
        );
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("JSON answer for {body:?}: {text}"));
        if status == 200 {
            ok += 1;
            assert!(v["score"].as_f64().unwrap().is_finite());
        }
    }
    assert!(ok > 0, "some mangled bodies are still valid requests");
    assert_eq!(get_json(&s.url("/healthz"), None)["status"], "ok");
    assert!(!s.log().contains("panicked"), "{}", s.log());
}

// ---- The tick-batch channel (`POST /v1/events`) and the warm start (`GET /v1/warm`).

use abuse_engine::known_accounts::bit_positions;
use base64::Engine as _;
use std::collections::BTreeMap;

/// Distinct shards for distinct `i < 1024` (an odd multiplier permutes the low bits).
fn account(i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn baseline(name: &str, samples: u32, value: f64) -> Value {
    json!({"name": name, "baseline": value, "unknown_baseline": 0.2, "samples": samples, "successes_seen": 2})
}

/// A sampled client: ordinary browsing with `requests` in it, varied.
fn sample(client: &str, risk: f32, penalized: bool) -> Value {
    let k = client.bytes().map(u32::from).sum::<u32>() as f32;
    let mut f = vec![0.0f32; 18];
    f[0] = risk;
    f[1] = 5.0 + k % 40.0;
    f[2] = 1.0 + k % 7.0;
    f[13] = 800.0 + (k * 37.0) % 3000.0;
    f[14] = 0.5 + (k % 10.0) / 10.0;
    f[15] = 1.0;
    f[16] = 20.0 + k % 90.0;
    json!({"client": client, "route_group": "api", "features": f, "penalized": penalized})
}

fn sample_batch(samples: &[Value]) -> String {
    json!({"version": 1, "samples": samples}).to_string()
}

fn batch(accounts: &[u64], baselines: &[Value], dropped: u64) -> String {
    json!({"version": 1, "known_accounts": accounts, "baselines": baselines, "dropped": dropped})
        .to_string()
}

/// Posts a batch, which must be accepted; the `accepted` count.
fn send(s: &Scorer, body: &str) -> u64 {
    let (status, text) = post(&s.url("/v1/events"), Some(SECRET), body);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str::<Value>(&text).unwrap()["accepted"]
        .as_u64()
        .unwrap()
}

/// The bytes every shard must hold after these accounts, by `bit_positions`.
fn expected_shards(accounts: &[u64]) -> BTreeMap<u64, Vec<u8>> {
    let mut shards: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for a in accounts {
        let (shard, bits) = bit_positions(*a);
        let bytes = shards.entry(shard as u64).or_insert_with(|| vec![0; 1024]);
        for b in bits {
            bytes[(b / 8) as usize] |= 1 << (b % 8);
        }
    }
    shards
}

/// Every page of `/v1/warm` from 0, following `next`.
fn warm_pages(s: &Scorer) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut from = Some(0);
    while let Some(n) = from {
        let page = get_json(&s.url(&format!("/v1/warm?from={n}")), Some(SECRET));
        assert_eq!(page["version"], 1, "{page}");
        from = page["next"].as_u64();
        if let Some(next) = from {
            assert!(next > n, "next moves on: {n} → {next}");
        }
        pages.push(page);
        assert!(pages.len() <= 1024, "paging ends");
    }
    pages
}

/// The decoded shards of all pages, checked to be ascending and non-empty.
fn warm_shards(pages: &[Value]) -> BTreeMap<u64, Vec<u8>> {
    let mut shards = BTreeMap::new();
    let mut last = None;
    for page in pages {
        for shard in page["known_shards"].as_array().unwrap() {
            let index = shard["index"].as_u64().unwrap();
            assert!(last < Some(index), "ascending, each once: {index}");
            last = Some(index);
            let bits = base64::engine::general_purpose::STANDARD
                .decode(shard["bits"].as_str().unwrap())
                .unwrap();
            assert_eq!(bits.len(), 1024);
            assert!(bits.iter().any(|b| *b != 0), "only non-empty shards");
            shards.insert(index, bits);
        }
    }
    shards
}

fn metric(s: &Scorer, name: &str) -> f64 {
    get(&s.url("/metrics"), None)
        .1
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn event_batches_feed_the_warm_start_and_it_pages_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Scorer::start(dir.path(), &[]);

    // Nothing learned yet: one empty last page.
    let empty = get_json(&s.url("/v1/warm"), Some(SECRET));
    assert_eq!(
        empty,
        json!({"version": 1, "baselines": [], "known_shards": [], "profiles": [], "next": null})
    );

    // 150 accounts in 150 shards, and 40 more in shards already used.
    let mut accounts: Vec<u64> = (0..150).map(account).collect();
    accounts.extend((0..40).map(|i| account(i) + 1024 * (i + 1)));
    let baselines = [
        baseline("login:/api/login", 500, 0.05),
        baseline("group:api", 20, 12.5),
    ];
    assert_eq!(send(&s, &batch(&accounts, &baselines, 3)), 192);
    // The same accounts again are nothing new; a colder baseline loses.
    assert_eq!(
        send(
            &s,
            &batch(
                &accounts[..10],
                &[baseline("login:/api/login", 499, 0.9)],
                0
            )
        ),
        11
    );

    let pages = warm_pages(&s);
    assert_eq!(pages.len(), 3, "150 shards: 64 + 64 + 22");
    let counts: Vec<usize> = pages
        .iter()
        .map(|p| p["known_shards"].as_array().unwrap().len())
        .collect();
    assert_eq!(counts, [64, 64, 22]);
    let first_next = pages[0]["next"].as_u64().unwrap();
    let last_of_first = pages[0]["known_shards"][63]["index"].as_u64().unwrap();
    assert_eq!(
        first_next,
        last_of_first + 1,
        "next = the index after the page's last shard"
    );
    assert!(pages[2]["next"].is_null());
    assert_eq!(
        warm_shards(&pages),
        expected_shards(&accounts),
        "exactly the bits bit_positions names"
    );

    // Baselines: on the first page only, the warmer kept.
    assert_eq!(
        pages[0]["baselines"],
        json!([
            baseline("group:api", 20, 12.5),
            baseline("login:/api/login", 500, 0.05)
        ])
    );
    assert_eq!(pages[1]["baselines"], json!([]));
    assert_eq!(pages[2]["baselines"], json!([]));
    // A tie goes to the newer, a warmer one replaces.
    send(
        &s,
        &batch(
            &[],
            &[
                baseline("group:api", 20, 13.0),
                baseline("login:/api/login", 900, 0.07),
            ],
            0,
        ),
    );
    assert_eq!(
        get_json(&s.url("/v1/warm?from=0"), Some(SECRET))["baselines"],
        json!([
            baseline("group:api", 20, 13.0),
            baseline("login:/api/login", 900, 0.07)
        ])
    );
    // A page from the middle starts there; one beyond the shards is empty and last.
    let mid = get_json(&s.url(&format!("/v1/warm?from={first_next}")), Some(SECRET));
    assert_eq!(mid, pages[1]);
    assert_eq!(
        get_json(&s.url("/v1/warm?from=5000"), Some(SECRET)),
        json!({"version": 1, "baselines": [], "known_shards": [], "profiles": [], "next": null})
    );

    assert_eq!(metric(&s, "abuse_scorer_batches_total"), 3.0);
    assert_eq!(metric(&s, "abuse_scorer_known_accounts_added_total"), 190.0);
    assert_eq!(
        metric(&s, "abuse_scorer_batch_items_dropped_total{by=\"filter\"}"),
        3.0
    );
    assert_eq!(
        metric(&s, "abuse_scorer_batch_items_dropped_total{by=\"scorer\"}"),
        0.0
    );
    assert!(get(&s.url("/metrics"), None)
        .1
        .contains("abuse_scorer_request_duration_seconds_count{route=\"warm\"}"));

    // Without Redis, warm.json carries it over a restart.
    let before = warm_pages(&s);
    let status = s.terminate();
    assert!(status.success(), "{}", s.log());
    assert!(
        s.log().contains("saved the warm-start snapshot"),
        "{}",
        s.log()
    );
    assert!(dir.path().join("warm.json").is_file());
    let s = Scorer::start(dir.path(), &[]);
    assert!(
        s.log().contains("loaded the warm-start snapshot"),
        "{}",
        s.log()
    );
    assert_eq!(warm_pages(&s), before);
}

/// A profile as the filter sends it: one device, GB, a last success at `at_ms`.
fn profile(account: u64, device: u32, at_ms: u64) -> Value {
    let at_s = at_ms / 1000;
    json!({"account": account, "profile": {
        "devices": [[device, at_s], [0, 0], [0, 0], [0, 0]],
        "countries": [[17735, at_s], [0, 0], [0, 0], [0, 0]],
        "asns": [[0, 0], [0, 0], [0, 0], [0, 0]],
        "networks": [[0, 0], [0, 0], [0, 0], [0, 0]],
        "last_success_ms": at_ms, "last_country": 17735}})
}

#[test]
fn account_profiles_merge_page_most_recent_first_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Scorer::start(dir.path(), &[]);
    let t0 = 1_764_000_000_000u64;
    // 200 accounts in two batches; account 7 from two Envoys.
    let first: Vec<Value> = (0..128).map(|i| profile(1_000 + i, 7, t0 + i * 1000)).collect();
    let second: Vec<Value> = (128..200).map(|i| profile(1_000 + i, 7, t0 + i * 1000)).chain([profile(1_000, 9, t0 + 500_000)]).collect();
    for profiles in [first, second] {
        let body = json!({"version": 1, "known_accounts": [], "baselines": [], "profiles": profiles, "dropped": 0});
        send(&s, &body.to_string());
    }
    assert_eq!(metric(&s, "abuse_scorer_profiles_merged_total"), 201.0);
    let pages = warm_pages(&s);
    let profiles: Vec<&Value> = pages.iter().flat_map(|p| p["profiles"].as_array().unwrap()).collect();
    assert_eq!(profiles.len(), 200, "every account once");
    assert_eq!(pages.len(), 2, "128 + 72, the first with the (empty) shards page");
    assert_eq!(profiles[0]["account"], 1_000, "the latest success first");
    let devices = profiles[0]["profile"]["devices"].as_array().unwrap();
    assert!(devices.contains(&json!([9, (t0 + 500_000) / 1000])) && devices.contains(&json!([7, t0 / 1000])),
            "both Envoys' devices: {devices:?}");
    assert_eq!(profiles[1]["account"], 1_199);
    // Over a restart (no Redis: warm.json).
    let status = s.terminate();
    assert!(status.success(), "{}", s.log());
    let s = Scorer::start(dir.path(), &[]);
    assert_eq!(warm_pages(&s), pages);
    // Too many in one batch: refused with its reason.
    let many: Vec<Value> = (0..129).map(|i| profile(i, 1, t0)).collect();
    let body = json!({"version": 1, "known_accounts": [], "baselines": [], "profiles": many, "dropped": 0});
    let (status, text) = post(&s.url("/v1/events"), Some(SECRET), &body.to_string());
    assert_eq!(status, 400, "{text}");
    assert!(error_of(&text).contains("too many `profiles`"), "{text}");
}

#[test]
fn events_and_warm_refuse_bad_requests_with_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scorer::start(dir.path(), &[]);
    let events = s.url("/v1/events");
    let valid = batch(&[1, 2, 3], &[baseline("login:/l", 1, 0.1)], 0);

    for secret in [None, Some("wrong")] {
        let (status, body) = post(&events, secret, &valid);
        assert_eq!(status, 401, "{body}");
        assert!(error_of(&body).contains("x-abuse-scorer-secret"));
        let (status, body) = get(&s.url("/v1/warm?from=0"), secret);
        assert_eq!((status, error_of(&body).is_empty()), (401, false));
    }

    // 256 KiB at most: 12,500 accounts of 20 digits are ~263 KB.
    let big = batch(&vec![u64::MAX; 12_500], &[], 0);
    assert!(big.len() > 262_144 && big.len() < 280_000);
    let (status, body) = post_oversized(&events, SECRET, &big);
    assert_eq!(status, 413);
    assert!(error_of(&body).contains("262144"), "{body}");

    let many_baselines: Vec<Value> = (0..65)
        .map(|i| baseline(&format!("g{i}"), 1, 0.0))
        .collect();
    let too_many_accounts = batch(&vec![1; 2_049], &[], 0);
    let too_many_baselines = batch(&[], &many_baselines, 0);
    for (bad, needle) in [
        ("{not json".to_string(), "invalid event batch"),
        ("[1, [2]]".to_string(), "must be a JSON object"),
        (String::new(), "must be a JSON object"),
        (
            valid.replace("\"version\":1", "\"version\":2"),
            "wire version 2",
        ),
        ("{\"known_accounts\":[1]}".to_string(), "wire version 0"),
        (
            "{\"version\":1,\"nope\":1}".to_string(),
            "unknown field `nope`",
        ),
        (
            "{\"version\":1,\"known_accounts\":[-1]}".to_string(),
            "invalid value",
        ),
        (
            "{\"version\":1,\"known_accounts\":[\"a\"]}".to_string(),
            "invalid type",
        ),
        (too_many_accounts, "too many `known_accounts`: 2049"),
        (too_many_baselines, "too many `baselines`: 65"),
    ] {
        let (status, body) = post(&events, Some(SECRET), &bad);
        assert_eq!(status, 400, "{bad:.80}: {body}");
        let error = error_of(&body);
        assert!(error.contains(needle), "{bad:.80}: {error}");
    }
    for query in ["from=-1", "from=abc", "since=0", "from=4294967296"] {
        let (status, body) = get(&s.url(&format!("/v1/warm?{query}")), Some(SECRET));
        assert_eq!(status, 400, "{query}: {body}");
        assert!(error_of(&body).contains("invalid query"), "{query}: {body}");
    }
    assert_eq!(
        get_json(&s.url("/v1/warm"), Some(SECRET))["known_shards"],
        json!([]),
        "nothing refused was stored"
    );
    let (status, body) = post(&events, Some(SECRET), &valid);
    assert_eq!((status, body.as_str()), (200, "{\"accepted\":4,\"flags\":[]}"));
    // Bad baselines are skipped and counted; the batch's accounts still land.
    let mixed = batch(
        &[9],
        &[
            baseline("", 1, 0.0),
            baseline("g", 1, 1e39),
            baseline("group:ok", 1, 0.5),
        ],
        0,
    );
    let (status, body) = post(&events, Some(SECRET), &mixed);
    assert_eq!((status, body.as_str()), (200, "{\"accepted\":2,\"flags\":[]}"));
    let warm = get_json(&s.url("/v1/warm"), Some(SECRET));
    assert_eq!(warm["known_shards"].as_array().unwrap().len(), 4);
    assert_eq!(
        warm["baselines"],
        json!([baseline("group:ok", 1, 0.5), baseline("login:/l", 1, 0.1)])
    );
    assert_eq!(
        metric(&s, "abuse_scorer_batch_items_dropped_total{by=\"scorer\"}"),
        2.0
    );
    assert_eq!(
        metric(&s, "abuse_scorer_errors_total{kind=\"unauthorized\"}"),
        4.0
    );
    assert_eq!(
        metric(&s, "abuse_scorer_errors_total{kind=\"too_large\"}"),
        1.0
    );
    assert_eq!(
        metric(&s, "abuse_scorer_errors_total{kind=\"bad_request\"}"),
        14.0
    );
    assert_eq!(metric(&s, "abuse_scorer_batches_total"), 2.0);
}

#[test]
fn scorers_on_one_redis_share_the_warm_start_and_keep_it_over_restarts() {
    let Some(redis) = start_redis() else {
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server); the Redis warm-start test did not run");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = Scorer::start(&dir.path().join("a"), &["--redis-url", &redis.url]);
    let mut b = Scorer::start(&dir.path().join("b"), &["--redis-url", &redis.url]);

    let via_a: Vec<u64> = (0..80).map(account).collect();
    let via_b: Vec<u64> = (60..120).map(account).chain([account(3) + 1024]).collect();
    send(
        &a,
        &batch(&via_a, &[baseline("login:/api/login", 300, 0.04)], 0),
    );
    send(
        &b,
        &batch(
            &via_b,
            &[
                baseline("login:/api/login", 100, 0.5),
                baseline("group:api", 7, 2.0),
            ],
            0,
        ),
    );
    let all: Vec<u64> = via_a.iter().chain(&via_b).copied().collect();
    let expected = expected_shards(&all);
    assert_eq!(expected.len(), 120);
    let expected_baselines = json!([
        baseline("group:api", 7, 2.0),
        baseline("login:/api/login", 300, 0.04)
    ]);
    for s in [&a, &b] {
        let pages = warm_pages(s);
        assert_eq!(pages.len(), 2, "120 shards: 64 + 56");
        assert_eq!(
            warm_shards(&pages),
            expected,
            "each sees the other's accounts"
        );
        assert_eq!(
            pages[0]["baselines"], expected_baselines,
            "the warmer, whoever sent it"
        );
    }
    // B learned 20 new accounts (60..80 were A's) and one in a used shard.
    assert_eq!(metric(&b, "abuse_scorer_known_accounts_added_total"), 41.0);
    assert_eq!(metric(&a, "abuse_scorer_store_fallbacks_total"), 0.0);

    // The layout in Redis: versioned keys, our bit b at offset (b/8)*8 + 7 - b%8.
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let (shard, bits) = bit_positions(via_a[0]);
    let key = format!("abuse:v1:known_accounts:{shard}");
    for bit in bits {
        let offset = u64::from(bit / 8) * 8 + u64::from(7 - bit % 8);
        let set: u8 = redis::cmd("GETBIT")
            .arg(&key)
            .arg(offset)
            .query(&mut conn)
            .unwrap();
        assert_eq!(set, 1, "bit {bit} of {key}");
    }
    let names: Vec<String> = redis::cmd("HKEYS")
        .arg("abuse:v1:baselines")
        .query(&mut conn)
        .unwrap();
    assert_eq!(names.len(), 2, "{names:?}");

    // A restarted scorer (a fresh state directory: nothing on disk) has it all from Redis.
    assert!(b.terminate().success());
    let c = Scorer::start(&dir.path().join("c"), &["--redis-url", &redis.url]);
    let pages = warm_pages(&c);
    assert_eq!(warm_shards(&pages), expected);
    assert_eq!(pages[0]["baselines"], expected_baselines);

    // Redis gone: A still answers 200s, from what it learned itself.
    drop(redis);
    send(&a, &batch(&[account(500)], &[], 0));
    let pages = warm_pages(&a);
    let mut own = via_a.clone();
    own.push(account(500));
    assert_eq!(warm_shards(&pages), expected_shards(&own));
    assert_eq!(
        pages[0]["baselines"],
        json!([baseline("login:/api/login", 300, 0.04)])
    );
    assert!(metric(&a, "abuse_scorer_store_fallbacks_total") >= 2.0);
}

// ---- Input limits (docs/input-limits.md): each at the limit and one past it.

/// `body` padded with trailing spaces (JSON whitespace) to exactly `len` bytes.
fn padded(body: &str, len: usize) -> String {
    assert!(body.len() <= len, "{} > {len}", body.len());
    format!("{body}{}", " ".repeat(len - body.len()))
}

#[test]
fn every_input_at_its_limit_and_one_past() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scorer::start(dir.path(), &[]);
    let (score_url, events_url) = (s.url("/v1/score"), s.url("/v1/events"));

    // Score requests: 16 KiB.
    let valid = request("203.0.113.9", 20.0, &["probing"]).to_string();
    let (status, body) = post(&score_url, Some(SECRET), &padded(&valid, 16 * 1024));
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&score_url, Some(SECRET), &padded(&valid, 16 * 1024 + 1));
    assert_eq!(status, 413, "{body}");
    // 16 reasons, a 64-byte client name.
    let reasons: Vec<String> = (0..17).map(|i| format!("reason_{i}")).collect();
    let names: Vec<&str> = reasons.iter().map(String::as_str).collect();
    let (status, body) = post(&score_url, Some(SECRET), &request("203.0.113.9", 20.0, &names[..16]).to_string());
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&score_url, Some(SECRET), &request("203.0.113.9", 20.0, &names).to_string());
    assert_eq!(status, 400, "{body}");
    let long = "c".repeat(64);
    let (status, body) = post(&score_url, Some(SECRET), &request(&long, 20.0, &[]).to_string());
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&score_url, Some(SECRET), &request(&format!("{long}c"), 20.0, &[]).to_string());
    assert_eq!(status, 400, "{body}");

    // Event batches: 256 KiB, 2,048 known accounts, 64 baselines.
    let small = batch(&[1], &[], 0);
    let (status, body) = post(&events_url, Some(SECRET), &padded(&small, 256 * 1024));
    assert_eq!(status, 200, "{body}");
    let (status, body) = post_oversized(&events_url, SECRET, &padded(&small, 256 * 1024 + 1));
    assert_eq!(status, 413, "{body}");
    let accounts: Vec<u64> = (0..2049).map(account).collect();
    assert!(batch(&accounts[..2048], &[], 0).len() <= 64 * 1024);
    let (status, body) = post(&events_url, Some(SECRET), &batch(&accounts[..2048], &[], 0));
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&events_url, Some(SECRET), &batch(&accounts, &[], 0));
    assert_eq!(status, 400, "{body}");
    let baselines: Vec<Value> = (0..65).map(|i| baseline(&format!("group:g{i}"), 50, 1.0)).collect();
    let (status, body) = post(&events_url, Some(SECRET), &batch(&[], &baselines[..64], 0));
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&events_url, Some(SECRET), &batch(&[], &baselines, 0));
    assert_eq!(status, 400, "{body}");
}

/// The model warms from the batches' samples alone, flags the odd sampled
/// client (a tag, never a block), and never learns a penalized one.
#[test]
fn samples_warm_the_model_and_flag_only_the_odd_unpenalized_client() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scorer::start(dir.path(), &["--warm-up", "100"]);
    let ordinary: Vec<Value> = (0..150).map(|i| sample(&format!("10.1.{}.{}", i / 200, i % 200), 0.0, false)).collect();
    for chunk in ordinary.chunks(50) {
        let (status, body) = post(&s.url("/v1/events"), Some(SECRET), &sample_batch(chunk));
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(get_json(&s.url("/healthz"), None)["model"], json!({"trained": 150, "warm": true}));
    // A slow prober: few requests, but mostly 404s over many paths.
    let mut odd = sample("10.9.9.9", 0.0, false);
    odd["features"][6] = json!(40.0);
    odd["features"][7] = json!(35.0);
    odd["features"][14] = json!(0.05);
    let mut boxed = odd.clone();
    boxed["client"] = json!("10.9.9.8");
    boxed["penalized"] = json!(true);
    let (status, body) = post(
        &s.url("/v1/events"),
        Some(SECRET),
        &sample_batch(&[odd, boxed, sample("10.1.0.7", 0.0, false)]),
    );
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let flags = answer["flags"].as_array().unwrap();
    assert_eq!(flags.len(), 1, "{answer}");
    assert_eq!((flags[0]["client"].as_str(), flags[0]["reasons"].clone()), (Some("10.9.9.9"), json!(["anomaly"])));
    let health = get_json(&s.url("/healthz"), None);
    // Learned: the ordinary one. Not: the penalized one (excluded) and the
    // odd one (already anomalous: gated).
    assert_eq!(health["model"]["trained"], 151);
    let (_, metrics) = get(&s.url("/metrics"), None);
    for needle in [
        "abuse_scorer_samples_total{kind=\"excluded\"} 1",
        "abuse_scorer_samples_total{kind=\"gated\"} 1",
        "abuse_scorer_samples_total{kind=\"learned\"} 151",
        "abuse_scorer_anomaly_flags_total 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle}");
    }
    let dash = get_json(&s.url("/v1/dashboard"), None);
    // Scored samples: the 50 after warm-up and the last 3.
    assert_eq!(dash["anomaly_distribution"]["samples"], 53);
    assert_eq!(dash["anomaly_distribution"]["counts"].as_array().unwrap().len(), 20);
    let row = dash["top_clients"].as_array().unwrap().iter().find(|c| c["client"] == "10.9.9.9").cloned().unwrap();
    assert_eq!((row["action"].as_str(), row["reasons"].clone()), (Some("tag"), json!(["anomaly"])));
    assert!(row["anomaly"].as_f64().unwrap() > 0.9, "{row}");
}

// ---- issue 20: the scorer trusts no caller's word beyond bounds ----

const STRONG_SECRET: &str = "3d1f5b7a9c0e2f4a6b8c0d1e3f5a7b9c1d3e5f7a9b0c2d4e6f8a0b1c3d5e7f9a";
const OPERATOR_TOKEN: &str = "a7f3c9e1b5d7f9a1c3e5b7d9f1a3c5e7b9d1f3a5c7e9b1d3f5a7c9e1b3d5f7a9";

/// Runs the binary to its exit with `args` (no inherited configuration);
/// whether it started (printed its banner) and its stderr.
fn start_or_refuse(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_abuse-scorer"));
    for var in SCORER_ENV.iter().chain(&["ABUSE_OPERATOR_TOKEN"]) {
        cmd.env_remove(var);
    }
    let mut child = cmd
        .args(["--state-dir"])
        .arg(dir.path())
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let line = BufReader::new(stdout).lines().next();
        let _ = tx.send(line.and_then(Result::ok).unwrap_or_default());
    });
    let banner = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    let started = banner.starts_with("abuse-scorer listening on ");
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (started, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn refuses_to_start_off_loopback_without_a_strong_secret() {
    let (started, log) = start_or_refuse(&["--listen", "0.0.0.0:0"], &[]);
    assert!(!started, "{log}");
    assert!(log.contains("refusing to listen on 0.0.0.0:0 without a secret"), "{log}");
    assert!(log.contains("ABUSE_SCORER_SECRET"), "{log}");

    for weak in ["demo-secret", "change-me", "secret", "0123456789"] {
        let (started, log) = start_or_refuse(&["--listen", "0.0.0.0:0"], &[("ABUSE_SCORER_SECRET", weak)]);
        assert!(!started, "{weak}: {log}");
        assert!(log.contains("weak ABUSE_SCORER_SECRET"), "{weak}: {log}");
    }
    // An operator token must be strong and not the secret, wherever it listens.
    let (started, log) = start_or_refuse(
        &["--listen", "127.0.0.1:0", "--secret", STRONG_SECRET, "--operator-token", "admin"],
        &[],
    );
    assert!(!started && log.contains("ABUSE_OPERATOR_TOKEN is 5 bytes long"), "{log}");
    let (started, log) = start_or_refuse(
        &["--listen", "127.0.0.1:0", "--secret", STRONG_SECRET],
        &[("ABUSE_OPERATOR_TOKEN", STRONG_SECRET)],
    );
    assert!(!started && log.contains("must differ"), "{log}");

    // A strong one starts, and says who may read the dashboard.
    let (started, log) = start_or_refuse(&["--listen", "0.0.0.0:0"], &[("ABUSE_SCORER_SECRET", STRONG_SECRET)]);
    assert!(started, "{log}");
    assert!(!log.contains(STRONG_SECRET), "the secret is never logged");
    // On loopback a weak secret is a warning only (tests, `make run`).
    let (started, log) = start_or_refuse(&["--listen", "127.0.0.1:0", "--secret", "demo-secret"], &[]);
    assert!(started && log.contains("refused on any other address"), "{log}");
}

/// (status, body) of a GET with `Authorization: Bearer token`.
fn get_bearer(url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = agent().get(url);
    if let Some(t) = token {
        req = req.header("authorization", &format!("Bearer {t}"));
    }
    let mut resp = req.call().unwrap();
    (
        resp.status().as_u16(),
        resp.body_mut().read_to_string().unwrap(),
    )
}

fn metric_with(s: &Scorer, token: Option<&str>, name: &str) -> f64 {
    get_bearer(&s.url("/metrics"), token)
        .1
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn the_operator_token_guards_the_dashboard_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scorer::start(dir.path(), &["--operator-token", OPERATOR_TOKEN]);
    score(&s, &request("198.51.100.40", 150.0, &["probing"]));
    for path in ["/metrics", "/v1/dashboard"] {
        let (status, body) = get_bearer(&s.url(path), None);
        assert_eq!(status, 401, "{path}: {body}");
        assert!(error_of(&body).contains("operator token"), "{body}");
        assert_eq!(get_bearer(&s.url(path), Some("wrong")).0, 401, "{path}");
        assert_eq!(get_bearer(&s.url(path), Some(SECRET)).0, 401, "{path}: the filters' secret is not it");
        let (status, body) = get_bearer(&s.url(path), Some(OPERATOR_TOKEN));
        assert_eq!(status, 200, "{path}: {body}");
    }
    // The page itself: without the token a 401 carrying only the form that
    // asks for it (a browser cannot send a header on a navigation).
    let (status, page) = get_bearer(&s.url("/?token=nope"), None);
    assert_eq!(status, 401);
    assert!(page.contains("id=\"login\"") && page.contains("sessionStorage"), "the login form");
    assert!(!page.contains("198.51.100.40"), "no data in it");
    let (status, page) = get_bearer(&s.url("/"), Some(OPERATOR_TOKEN));
    assert_eq!(status, 200);
    assert!(page.contains("id=\"top-clients\""));
    assert_eq!(
        metric_with(&s, Some(OPERATOR_TOKEN), "abuse_scorer_errors_total{kind=\"operator_unauthorized\"}"),
        7.0
    );
    assert_eq!(get(&s.url("/healthz"), None).0, 200, "probes need nothing");
    let log = s.log();
    for never in [OPERATOR_TOKEN, SECRET, "198.51.100.40", "token=nope"] {
        assert!(!log.contains(never), "the log shows {never}:\n{log}");
    }
    assert!(log.contains("fleet block"), "{log}");
}

#[test]
fn what_callers_write_is_bounded_and_every_refusal_counted() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scorer::start(
        dir.path(),
        &["--ttl-s", "30", "--caller-known-accounts-per-min", "100", "--caller-blocks-per-min", "2"],
    );
    let rejected = |kind: &str| metric(&s, &format!("abuse_scorer_rejected_total{{kind=\"{kind}\"}}"));

    // A login-failure baseline of 1.0 (and an unknown share of 1.0) would
    // switch recognition off in every Envoy that warms from it: clamped.
    let poisoned = json!({"name": "login:/api/login", "baseline": 1.0, "unknown_baseline": 1.0,
                          "samples": 500, "successes_seen": 9});
    let huge_group = json!({"name": "group:api", "baseline": 1e12, "unknown_baseline": 0.0,
                            "samples": 50, "successes_seen": 0});
    let implausible = json!({"name": "group:other", "baseline": 3.0, "unknown_baseline": 0.0,
                             "samples": u32::MAX, "successes_seen": 0});
    let odd_name = json!({"name": "admin:everything", "baseline": 0.1, "unknown_baseline": 0.0,
                          "samples": 5, "successes_seen": 0});
    assert_eq!(send(&s, &batch(&[], &[poisoned, huge_group, implausible, odd_name], 0)), 2);
    let warm = get_json(&s.url("/v1/warm"), Some(SECRET));
    assert_eq!(
        warm["baselines"],
        json!([
            {"name": "group:api", "baseline": 100_000.0, "unknown_baseline": 0.0, "samples": 50, "successes_seen": 0},
            {"name": "login:/api/login", "baseline": 0.35, "unknown_baseline": 0.35, "samples": 500, "successes_seen": 9},
        ])
    );
    assert_eq!(rejected("baseline_clamped"), 2.0);
    assert_eq!(rejected("baseline_invalid"), 2.0);

    // risk 1e6: an ordinary block (score block_at), published for 4 × ttl_s.
    let answer = score(&s, &request("198.51.100.50", 1e6, &["probing"]));
    assert_eq!((answer["action"].as_str(), answer["score"].as_f64()), (Some("block"), Some(100.0)));
    assert_eq!(rejected("risk_capped"), 1.0);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let verdicts = get_json(&s.url("/v1/verdicts?since=0"), Some(SECRET));
    let until = verdicts["verdicts"][0]["until_ms"].as_u64().unwrap();
    assert!(until <= now_ms + 120_000 + 1_000, "no 24-hour block: {until} vs {now_ms}");

    // Blocks: 2 a minute per caller reach the fleet; the third still
    // answers block to its caller, but is not published.
    let second = score(&s, &request("198.51.100.51", 150.0, &["probing"]));
    let third = score(&s, &request("198.51.100.52", 150.0, &["probing"]));
    assert_eq!((second["action"].as_str(), third["action"].as_str()), (Some("block"), Some("block")));
    let published = get_json(&s.url("/v1/verdicts?since=0"), Some(SECRET))["verdicts"].as_array().unwrap().len();
    assert_eq!(published, 2);
    assert_eq!(rejected("block_quota"), 1.0);
    assert_eq!(metric(&s, "abuse_scorer_fleet_verdicts_total"), 2.0);

    // Known accounts: 100 a minute per caller.
    let accounts: Vec<u64> = (0..150).map(account).collect();
    assert_eq!(send(&s, &batch(&accounts, &[], 0)), 100);
    assert_eq!(metric(&s, "abuse_scorer_known_accounts_added_total"), 100.0);
    assert_eq!(rejected("known_accounts_quota"), 50.0);
    assert_eq!(send(&s, &batch(&accounts[..5], &[], 0)), 0, "the minute's allowance is spent");

    // Profiles: times after now are clamped; into a known profile an
    // update adds one new device at a time.
    let t0 = now_ms - 3_600_000;
    let owner = profile(77, 7, t0);
    let far = now_ms + 10 * 365 * 86_400_000;
    let forged = json!({"account": 77, "profile": {
        "devices": [[100, far / 1000], [101, far / 1000], [102, far / 1000], [103, far / 1000]],
        "countries": [[0, 0], [0, 0], [0, 0], [0, 0]],
        "asns": [[0, 0], [0, 0], [0, 0], [0, 0]],
        "networks": [[0, 0], [0, 0], [0, 0], [0, 0]],
        "last_success_ms": far, "last_country": 0}});
    for p in [owner, forged] {
        let body = json!({"version": 1, "profiles": [p]});
        send(&s, &body.to_string());
    }
    let pages = warm_pages(&s);
    let kept = pages.iter().flat_map(|p| p["profiles"].as_array().unwrap()).find(|p| p["account"] == 77).unwrap();
    let devices: Vec<u64> = kept["profile"]["devices"].as_array().unwrap().iter().map(|d| d[0].as_u64().unwrap()).collect();
    assert!(devices.contains(&7), "the owner's device stays: {devices:?}");
    assert_eq!(devices.iter().filter(|d| **d >= 100).count(), 1, "{devices:?}");
    assert!(kept["profile"]["last_success_ms"].as_u64().unwrap() <= now_ms + 120_000);
    assert_eq!(rejected("profile_time_clamped"), 1.0);
    assert_eq!(rejected("profile_new_values"), 3.0);

    let log = s.log();
    assert!(!log.contains("198.51.100.5"), "no client address in the log:\n{log}");
}
