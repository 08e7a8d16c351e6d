"""The scorer in the loop, end to end: real Envoy (two workers), the built
filter, the real scoring service binary, and a real redis-server for the
fleet tests.

Borderline clients are made with one request for /.env: the probing
detector adds 60, inside the band [ask_at 50, block_at 100).
"""

import socket
import threading
import time

import pytest

from harness import DemoApi, Envoy, Redis, Scorer, request, sleep_until, wait_until

SECRET = "s3cret-for-tests"


def config(**scorer):
    # timeout_ms: an answer takes a few ms; 1 s leaves a loaded or slow
    # machine a wide margin (a late answer would fail open and change what
    # the tests count). No test here waits for this timeout to pass.
    return {
        "mode": "block",
        "client": {"trusted_proxies": ["127.0.0.0/8"]},
        "credential_stuffing": {"login_routes": [{"path": "/api/login"}]},
        "scorer": {"enabled": True, "ask_at": 50, "timeout_ms": 1000, "secret_env": "ABUSE_SCORER_SECRET",
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
    ttl = 4
    envoy, scorer = stack("--ttl-s", str(ttl))
    client = "203.0.113.61"
    # The filter caches the answer from the moment it arrives, somewhere
    # between these two instants, for `ttl` seconds.
    asked = time.monotonic()
    first = make_borderline(envoy, client)
    answered = time.monotonic()
    assert first.status == 404  # asked, answered "tag", forwarded
    for _ in range(10):
        r = get(envoy, client, "/debug/headers")
        assert r.status == 200
    # Precondition, not a speed test: the 10 requests (a few ms each) must
    # have gone out inside the TTL for the count below to mean anything.
    assert time.monotonic() < asked + ttl, "the 10 requests took longer than the TTL: nothing to judge"
    assert scored(scorer) == 1, "one callout per TTL"
    assert "probing" in r.json()["headers"]["x-abuse-reasons"]
    envoy.wait_stat("abuse_filter.scorer.cache_hits", 10)
    # 0.5 s after the latest possible end of the TTL.
    sleep_until(answered + ttl + 0.5)
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
    # Only "it did not hang", far from any threshold: a refused connection
    # fails at once, the callout timeout is 1 s, and a request the filter
    # never resumed would hang until the client's own 10 s timeout.
    assert time.monotonic() - start < 5.0
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
    # A cool-down of 5 s: the 12 failing requests (a few ms each) all fall
    # inside it however slow the machine, so no half-open trial adds failures.
    cooldown = 5
    envoy, _ = stack(scorer=scorer, breaker_cooldown_s=cooldown)
    scorer.stop()
    # 12 requests over two workers: one of them sees at least 6 > 3 failures.
    for n in range(12):
        make_borderline(envoy, f"203.0.113.{100 + n}")

    def outcomes():
        return sum(envoy.stat(f"abuse_filter.scorer.{k}") for k in ("failed", "timed_out", "skipped_breaker_open"))

    # Every one of the 12 ends as a failure or a skip: wait until all are counted.
    wait_until(lambda: outcomes() >= 12, 10, 0.1, "the 12 callout outcomes")
    assert envoy.stat("abuse_filter.scorer.skipped_breaker_open") >= 1
    assert envoy.stat("abuse_filter.scorer.failed") + envoy.stat("abuse_filter.scorer.timed_out") <= 2 * 3, \
        "each worker stops after 3 failures"
    # The scorer comes back on the same port; after the cool-down it is asked again.
    revived = Scorer(secret=SECRET, port=port)
    try:
        def answered():
            make_borderline(envoy, f"203.0.113.{110 + int(time.monotonic() * 10) % 100}")
            return envoy.stat("abuse_filter.scorer.answered") >= 1

        wait_until(answered, cooldown + 10, 0.2, "the breaker to close")
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


class HoldingRelay:
    """A TCP relay between Envoy and the scorer that holds what Envoy sends
    until `release` is set: a callout stays in flight exactly as long as the
    test needs, whatever the machine's speed. `arrived` is set when the first
    bytes of a callout came in."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.arrived, self.release = threading.Event(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [downstream, upstream]
            threading.Thread(target=self._pump, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, False), daemon=True).start()

    def _pump(self, src, dst, hold: bool):
        try:
            while data := src.recv(65536):
                if hold:
                    self.arrived.set()
                    self.release.wait(30)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self):
        self.release.set()
        self.listener.close()
        for s in self.sockets:
            s.close()


def test_concurrent_requests_wait_for_the_one_callout(stack):
    """`concurrent: "wait"`: while one request of a client asks the scorer,
    the client's other requests wait for that answer instead of asking again
    or going on. The callout is held in a relay until both later requests
    are parked (their `coalesced` count), then let through: no race with
    the machine's speed in either direction."""
    from concurrent.futures import ThreadPoolExecutor

    scorer = Scorer("--block-at", "50", secret=SECRET)
    relay = HoldingRelay(scorer.port)
    pool = ThreadPoolExecutor(max_workers=3)
    try:
        envoy, _ = stack(scorer=relay, concurrent="wait", timeout_ms=10000)
        client = "203.0.113.66"
        first = request(envoy.port, "GET", "/health", {"x-forwarded-for": "198.51.100.66"})
        assert first.status == 200 and scorer.metric("abuse_scorer_score_requests_total") == 0

        asking = pool.submit(get, envoy, client, "/.env")
        assert relay.arrived.wait(10), "the borderline request never asked the scorer"
        others = [pool.submit(get, envoy, client, path) for path in ("/api/products?page=1", "/api/users/1")]
        # Both are parked behind the callout in flight (counted when parked).
        envoy.wait_stat("abuse_filter.scorer.coalesced", 2)
        assert not asking.done() and not any(f.done() for f in others)
        assert scorer.metric("abuse_scorer_score_requests_total") == 0, "the callout is still held"
        relay.release.set()
        # Woken by the answer (at once, or on the other worker's next 0.5 s
        # tick), not by their deadline 10 s after parking: 5 s is far from both.
        statuses = [f.result(timeout=5).status for f in [asking, *others]]
        assert statuses == [403, 403, 403], statuses
        assert scorer.metric("abuse_scorer_score_requests_total") == 1, "one callout for the three requests"
    finally:
        relay.stop()  # releases anything still held
        pool.shutdown(wait=True)
        scorer.stop()
