"""Scraping (pagination, rhythm, volume) and endpoint spikes, end to end."""

import concurrent.futures
import http.client
import time

import pytest

from harness import DemoApi, Envoy, request, sleep_until

# Thresholds chosen for margins both ways on any machine: a fast page walk
# has gaps of one request's latency (ms), far under 500 ms, and the slow
# partner sleeps 600 ms between pages, so its gaps are over 500 ms however
# fast the machine. The rhythm test paces by a clock at 200 ms; its jitter
# (a few ms, tens under load) stays far under a CV of 0.25, and a human's
# (~0.5) far over it.
SCRAPING = {
    "mode": "block",
    "client": {"trusted_proxies": ["127.0.0.0/8"]},
    "scraping": {"max_page_run": 10, "max_page_interval_ms": 500, "max_kib_per_window": 50, "window_s": 60,
                 "rhythm_min_requests": 20, "rhythm_max_cv": 0.25},
}


@pytest.fixture(scope="module")
def api():
    server = DemoApi()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def envoy(api):
    e = Envoy.with_filter(SCRAPING, api.port)
    yield e
    e.stop()


def get(envoy, client, path):
    return request(envoy.port, "GET", path, {"x-forwarded-for": client, "user-agent": "harvester/1.0"})


def test_fast_deep_pagination_is_blocked(envoy):
    responses = [get(envoy, "203.0.113.201", f"/api/products?page={p}") for p in range(1, 25)]
    statuses = [r.status for r in responses]
    assert 403 in statuses, statuses
    first = statuses.index(403)
    assert 9 <= first <= 12, statuses
    assert responses[first].json()["reasons"] == ["scraping"]


def test_partner_paging_an_export_slowly_is_fine(envoy):
    # 13 pages: a run of 10 would have been blocked. A sleep after each
    # answer (not a clock), so every gap is at least 600 ms > 500 ms.
    for p in range(1, 14):
        assert get(envoy, "198.51.100.201", f"/api/products?page={p}").status == 200
        time.sleep(0.6)


def test_machine_rhythm_is_tagged_not_blocked(envoy):
    client = "203.0.113.202"
    last = None
    # Request i at start + i * 200 ms: the gaps stay regular however long
    # each request takes. 22 requests: judged at the 20th interval. One
    # keep-alive connection (one worker), as a script's HTTP session: a
    # quiet client's requests stay in its worker's view (docs/state-tiers.md), so the rhythm is that of the requests each worker sees.
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
    try:
        for i in range(22):
            sleep_until(start + i * 0.2)
            last = request(envoy.port, "GET", "/debug/headers",
                           {"x-forwarded-for": client, "user-agent": "harvester/1.0"}, conn=conn)
            assert last.status == 200
    finally:
        conn.close()
    headers = last.json()["headers"]
    assert headers["x-abuse-reasons"] == "machine_rhythm", headers
    assert 30 <= int(headers["x-abuse-score"]) < 100


def test_abnormal_response_volume_is_blocked(envoy):
    # The same page (no pagination run), ~2 KiB each, 50 KiB allowed per minute.
    statuses = [get(envoy, "203.0.113.203", "/api/products?page=3").status for _ in range(40)]
    assert 403 in statuses, statuses
    assert statuses.index(403) >= 20, "blocked before it used its volume"
    # A normal reader of a few pages is fine.
    assert all(get(envoy, "198.51.100.202", "/api/products?page=3").status == 200 for _ in range(10))


SPIKES = {
    "mode": "block",
    "client": {"trusted_proxies": ["127.0.0.0/8"]},
    "route_groups": [{"name": "users", "path_prefix": "/api/users/"}],
    "enumeration": {"enabled": False},
    "spikes": {"window_s": 5, "factor": 4, "min_rps": 20, "min_client_requests": 40, "client_share": 0.2},
    # Spikes only tag by default (a partner ramping up is a spike too).
    "actions": {"endpoint_spike": "block"},
}


def learn_normal_rate(envoy, rps: float, at_least_s: float, timeout_s: float = 90):
    """~`rps` requests/s from ten regular clients, paced by the clock, until
    both workers report the group's baseline learned (and at least `at_least_s`)."""
    start = time.monotonic()
    n = 0
    while True:
        elapsed = time.monotonic() - start
        if elapsed > at_least_s and n % 20 == 0 and envoy.stat("abuse_filter.baselines.learning") == 0:
            return n
        assert elapsed < timeout_s, "the spike baseline never finished learning"
        assert get(envoy, f"198.51.100.{10 + n % 10}", f"/api/users/{1 + n % 50}").status == 200
        n += 1
        time.sleep(max(0.0, start + n / rps - time.monotonic()))


def test_endpoint_spike_is_charged_to_the_clients_driving_it(api):
    envoy = Envoy.with_filter(SPIKES, api.port)
    try:
        # Learn the normal rate (~8 requests/s); the gauge says when both
        # workers have a learned baseline, however fast ticks and requests go.
        learn_normal_rate(envoy, rps=8, at_least_s=10)

        def flood(i):
            return get(envoy, "203.0.113.250", f"/api/users/{1 + i % 50}").status

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(flood, range(600)))
        # Refused inside the burst, whether it lasts a tenth of a tick
        # (a worker merges early once its count jumps) or many ticks.
        assert 429 in statuses, statuses[-20:]
        assert statuses.index(429) <= 300, statuses.index(429)
        blocked = get(envoy, "203.0.113.250", "/api/users/1")
        assert blocked.status == 429 and blocked.json()["reasons"] == ["endpoint_spike"]
        # A regular client calling the endpoint during the spike is not charged.
        assert get(envoy, "198.51.100.10", "/api/users/2").status == 200
        envoy.wait_stat("abuse_filter.detector.endpoint_spike.fired", 1)
    finally:
        envoy.stop()


def test_a_burst_shorter_than_a_tick_is_refused_inside_it(api):
    """Two hundred requests sent at once over many connections — on a fast
    machine all inside one 0.5 s tick — from several addresses: the burst
    is recognised while it lasts (early merge), not after it is over."""
    envoy = Envoy.with_filter(dict(SPIKES, spikes=dict(SPIKES["spikes"], min_client_requests=20, client_share=0.1)),
                              api.port)
    try:
        learn_normal_rate(envoy, rps=8, at_least_s=10)
        clients = [f"203.0.113.{160 + i}" for i in range(4)]

        def burst(i):
            return get(envoy, clients[i % 4], f"/api/users/{1 + i % 50}").status

        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            statuses = list(pool.map(burst, range(400)))
        refused = statuses.count(429)
        assert refused >= 100, f"{refused} of 400 refused inside the burst"
        # Everyone outside the burst still gets through.
        assert get(envoy, "198.51.100.11", "/api/users/3").status == 200
    finally:
        envoy.stop()
