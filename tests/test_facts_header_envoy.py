"""The request's facts in one header (`client.facts_header`): Envoy's native
header_mutation filter, placed before the abuse filter, writes the peer
address and the request's start time into a header, and the filter reads
them from the header map instead of two host calls. Real Envoy, the built
.wasm, no trusted proxies: the client is its peer address.

A client must never be able to choose the address it is judged by: the
header it sends is overwritten before the filter runs.
"""

import http.client

import pytest

from harness import DemoApi, Envoy, envoy_config, free_port, request

HEADER = "x-request-facts"

CONFIG = {
    "mode": "block",
    "client": {"facts_header": HEADER},
    "route_groups": [{"name": "direct", "path_prefix": "/direct"}],
    # Keyed on the peer (no trusted proxies): three per minute, the rest shed.
    "rate": {"limits": [{"route_group": "direct", "requests": 3, "window_s": 60}]},
}


@pytest.fixture
def started():
    envoys = []
    yield envoys
    for e in envoys:
        e.stop()


def start(started, config, facts_value=None, facts=True, upstream_port=9):
    port, admin = free_port(), free_port()
    bootstrap = envoy_config(config, port, admin, upstream_port=upstream_port, facts_header=HEADER if facts else None)
    if facts_value is not None:
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"][0]["typed_config"]["mutations"]["request_mutations"][0]["append"]["header"]["value"] = facts_value
    envoy = Envoy(bootstrap, admin, port)
    started.append(envoy)
    return envoy


def get_with_copies(port, values):
    """GET /direct carrying the facts header once per value (forged copies)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", "/direct")
        for v in values:
            conn.putheader(HEADER, v)
        conn.endheaders()
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_client_cannot_inject_its_facts(started):
    """Forged facts (another address each time, one or two copies, an old
    timestamp) are overwritten by Envoy: every request counts against the
    real peer, and the fourth within the minute is refused. Were a forged
    copy read, each request would be a new client and none refused."""
    envoy = start(started, CONFIG)
    statuses = [get_with_copies(envoy.port, [f"203.0.113.{i} 1000"] if i % 2 else
                                [f"203.0.113.{i} 1000", f"198.51.100.{i} 2000"])
                for i in range(6)]
    assert statuses[:3] == [200, 200, 200], statuses
    assert all(s == 429 for s in statuses[3:]), statuses


def test_the_header_is_what_the_filter_reads(started):
    """With header_mutation writing a fixed address that is allowlisted, the
    peer's requests are never refused: the filter took its address from the
    header, not from `source.address` (127.0.0.1, not allowlisted)."""
    config = dict(CONFIG, allowlist={"cidrs": ["192.0.2.7/32"]})
    envoy = start(started, config, facts_value="192.0.2.7 %START_TIME(%s%3f)%")
    statuses = [request(envoy.port, "GET", "/direct").status for _ in range(6)]
    assert statuses == [200] * 6, statuses


def test_without_the_header_the_host_calls_are_the_fallback(started):
    """The key set but no header_mutation filter (no header arrives): the
    filter falls back to `source.address` and the clock, and limits keyed on
    the peer still hold."""
    envoy = start(started, CONFIG, facts=False)
    statuses = [request(envoy.port, "GET", "/direct").status for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429], statuses


def test_the_upstream_never_sees_the_header(started):
    """The facts (the client's address, the time, its TLS fingerprint) are
    for the filter only: the route configuration removes the header before
    the upstream (`request_headers_to_remove`, in the router: no wasm cost),
    whether Envoy wrote it or a client sent a copy too. The filter still read
    it: the peer's fourth request within the minute is refused."""
    api = DemoApi()
    try:
        config = dict(CONFIG, route_groups=[{"name": "direct", "path_prefix": "/"}])
        envoy = start(started, config, upstream_port=api.port)
        echoed = [request(envoy.port, "GET", "/debug/headers", headers).json()["headers"]
                  for headers in ({}, {HEADER: "203.0.113.9 1000"}, {})]
        for headers in echoed:
            assert HEADER not in {k.lower() for k in headers}, headers
        assert request(envoy.port, "GET", "/debug/headers").status == 429
    finally:
        api.stop()
