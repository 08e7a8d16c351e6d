"""The scorer in the loop, end to end: real Envoy (two workers), the built
filter, the real scoring service binary, and a real redis-server for the
fleet tests.

Borderline clients are made with one request for /.env: the probing
detector adds 60, inside the band [ask_at 50, block_at 100).
"""

import time

import pytest

from harness import DemoApi, Envoy, Redis, Scorer, request, wait_until

SECRET = "s3cret-for-tests"


def config(**scorer):
    return {
        "mode": "block",
        "client": {"trusted_proxies": ["127.0.0.0/8"]},
        "credential_stuffing": {"login_routes": [{"path": "/api/login"}]},
        "scorer": {"enabled": True, "ask_at": 50, "timeout_ms": 200, "secret_env": "ABUSE_SCORER_SECRET",
                   "breaker_failures": 3, "breaker_cooldown_s": 2, "fleet_poll_s": 1, **scorer},
    }


@pytest.fixture(scope="module")
def api():
    server = DemoApi()
    yield server
    server.stop()


@pytest.fixture
def stack(api, monkeypatch):
    """start(scorer_args, **scorer_config) -> (envoy, scorer)."""
    started = []
    monkeypatch.setenv("ABUSE_SCORER_SECRET", SECRET)

    def start(*scorer_args, scorer=None, redis_url=None, **scorer_config):
        scorer = scorer or Scorer(*scorer_args, secret=SECRET, redis_url=redis_url)
        envoy = Envoy.with_filter(config(**scorer_config), api.port, scorer_port=scorer.port,
                                  env_keys=["ABUSE_SCORER_SECRET"])
        started.extend([envoy, scorer])
        return envoy, scorer

    yield start
    for p in started:
        p.stop()


def get(envoy, client, path="/api/products?page=1"):
    return request(envoy.port, "GET", path, {"x-forwarded-for": client, "user-agent": "curl/8"})


def make_borderline(envoy, client):
    return get(envoy, client, "/.env")


def scored(scorer) -> float:
    return scorer.metric("abuse_scorer_score_requests_total")


def test_borderline_client_costs_one_callout_per_ttl_and_is_allowed_as_answered(stack):
    envoy, scorer = stack("--ttl-s", "3")
    client = "203.0.113.61"
    first = make_borderline(envoy, client)
    assert first.status == 404  # asked, answered "tag", forwarded
    for _ in range(10):
        r = get(envoy, client, "/debug/headers")
        assert r.status == 200
    assert scored(scorer) == 1, "one callout per TTL"
    assert "probing" in r.json()["headers"]["x-abuse-reasons"]
    envoy.wait_stat("abuse_filter.scorer.cache_hits", 10)
    time.sleep(3.2)
    assert get(envoy, client).status == 200
    assert scored(scorer) == 2, "a new callout once the TTL is over"


def test_scorer_block_is_enforced(stack):
    envoy, scorer = stack("--block-at", "50")
    client = "203.0.113.62"
    blocked = make_borderline(envoy, client)
    assert blocked.status == 403
    assert "probing" in blocked.json()["reasons"]
    # Later requests meet the penalty box, without asking again.
    assert get(envoy, client).status == 403
    assert scored(scorer) == 1
    assert get(envoy, "198.51.100.62").status == 200


def test_stopped_scorer_fails_open_within_the_timeout(stack):
    envoy, scorer = stack()
    scorer.stop()
    start = time.monotonic()
    r = make_borderline(envoy, "203.0.113.63")
    assert r.status == 404, "fail open: the request goes on"
    assert time.monotonic() - start < 1.0
    envoy.wait_stat("abuse_filter.scorer.failed", 1)


def test_fail_closed_blocks_borderline_clients_when_the_scorer_is_away(stack):
    envoy, scorer = stack(failure_mode="fail_closed")
    scorer.stop()
    assert make_borderline(envoy, "203.0.113.64").status == 403
    # Clients outside the band are not affected.
    assert get(envoy, "198.51.100.64").status == 200


def test_breaker_opens_and_recovers(stack, api):
    scorer = Scorer(secret=SECRET, port=0)
    port = scorer.port
    envoy, _ = stack(scorer=scorer)
    scorer.stop()
    # 12 requests over two workers: one of them sees at least 6 > 3 failures.
    for n in range(12):
        make_borderline(envoy, f"203.0.113.{100 + n}")
    envoy.wait_stat("abuse_filter.scorer.skipped_breaker_open", 1)
    assert envoy.stat("abuse_filter.scorer.failed") <= 2 * 3, "each worker stops after 3 failures"
    # The scorer comes back on the same port; after the cool-down it is asked again.
    revived = Scorer(secret=SECRET, port=port)
    try:
        time.sleep(2.2)

        def answered():
            make_borderline(envoy, f"203.0.113.{110 + int(time.monotonic() * 10) % 100}")
            return envoy.stat("abuse_filter.scorer.answered") >= 1

        wait_until(answered, 10, 0.2, "the breaker to close")
    finally:
        revived.stop()


def test_wrong_secret_is_a_failure_not_a_verdict(stack, api):
    scorer = Scorer(secret="another-secret")
    envoy, _ = stack(scorer=scorer)
    assert make_borderline(envoy, "203.0.113.65").status == 404
    envoy.wait_stat("abuse_filter.scorer.failed", 1)
    assert scorer.metric("abuse_scorer_errors_total", kind="unauthorized") >= 1


def test_fleet_shares_one_picture_through_redis(api, monkeypatch):
    """Two Envoys, two scorer replicas, one Redis: an account attacked through
    both Envoys is recognised from the fleet-wide count, and a block decided
    behind one Envoy reaches the other."""
    monkeypatch.setenv("ABUSE_SCORER_SECRET", SECRET)
    # Each attacking client makes one login attempt with a scanner's user
    # agent (probing +60: borderline, so the scorer is asked, with the
    # username). Each Envoy's own per-account detector is off: only the
    # fleet-wide picture in Redis can recognise that one account is attacked
    # through both Envoys (+50 on the scorer: 110, a block).
    fleet_config = config()
    fleet_config["credential_stuffing"].update({"max_failures_per_account": 100000, "distributed": {"enabled": False}})
    fleet_config["probing"] = {"scanner_weight": 60}
    redis = Redis()
    procs = []
    try:
        scorers = [Scorer(secret=SECRET, redis_url=redis.url) for _ in range(2)]
        procs += scorers
        envoys = [Envoy.with_filter(fleet_config, api.port, scorer_port=s.port, env_keys=["ABUSE_SCORER_SECRET"])
                  for s in scorers]
        procs += envoys
        blocked_client = None
        for n in range(40):
            envoy = envoys[n % 2]
            client = f"100.70.0.{n + 1}"
            r = request(envoy.port, "POST", "/api/login",
                        {"x-forwarded-for": client, "content-type": "application/json", "user-agent": "Nikto/2.5"},
                        {"username": "user0777", "password": f"guess{n}"})
            if r.status == 403:
                assert "credential_stuffing" in r.json()["reasons"]
                blocked_client = (client, n % 2)
                break
        assert blocked_client, "the account attacked through both Envoys was never recognised"
        assert n + 1 >= 20, f"blocked at attempt {n + 1}: the fleet threshold is 20"
        assert scorers[0].metric("abuse_scorer_score_requests_total") > 0
        assert scorers[1].metric("abuse_scorer_score_requests_total") > 0
        client, behind = blocked_client
        other = envoys[1 - behind]
        # The verdict names the client as address + user agent: the same
        # client behind the other Envoy is blocked, not its whole address.
        same = lambda: request(other.port, "GET", "/health", {"x-forwarded-for": client, "user-agent": "Nikto/2.5"})
        wait_until(lambda: same().status == 403, 8, 0.25, "the fleet verdict on the other Envoy")
        other.wait_stat("abuse_filter.scorer.fleet_verdicts_applied", 1)
        assert get(other, "198.51.100.99").status == 200
    finally:
        for p in procs:
            p.stop()
        redis.stop()


def test_concurrent_requests_wait_for_the_one_callout(stack):
    """`concurrent: "wait"`: while one request of a client asks the scorer,
    the client's other requests wait for that answer instead of asking again
    or going on. A scorer whose Redis never answers (each call hits its
    250 ms limit) keeps the callout in flight long enough to see it."""
    import socket
    import threading
    from concurrent.futures import ThreadPoolExecutor

    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(64)
    held = []
    stop = threading.Event()

    def swallow():
        blackhole.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(blackhole.accept()[0])
            except OSError:
                pass

    threading.Thread(target=swallow, daemon=True).start()
    try:
        slow = Scorer("--block-at", "50", secret=SECRET, redis_url=f"redis://127.0.0.1:{blackhole.getsockname()[1]}")
        envoy, _ = stack(scorer=slow, concurrent="wait", timeout_ms=3000)
        client = "203.0.113.66"
        start = time.monotonic()
        first = request(envoy.port, "GET", "/health", {"x-forwarded-for": "198.51.100.66"})
        assert first.status == 200 and slow.metric("abuse_scorer_score_requests_total") == 0

        def one(path_delay):
            path, delay = path_delay
            time.sleep(delay)
            return get(envoy, client, path).status

        with ThreadPoolExecutor(max_workers=3) as pool:
            statuses = list(pool.map(one, [("/.env", 0), ("/api/products?page=1", 0.1), ("/api/users/1", 0.15)]))
        assert statuses == [403, 403, 403], statuses
        assert slow.metric("abuse_scorer_score_requests_total") == 1, "one callout for the three requests"
        assert time.monotonic() - start < 5
    finally:
        stop.set()
        for c in held:
            c.close()
        blackhole.close()
