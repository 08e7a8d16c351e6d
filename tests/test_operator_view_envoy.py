"""The operator's view end to end (issue 21): two real Envoys with the built
filter, two scorer replicas, one real Redis. Decisions leave the filters
with the tick batch, the scorer keeps them fleet-wide, a refusal's decision
id is explained, an unblock reaches both Envoys and sticks, an allow entry
expires, and the operator routes want the operator token.

Nothing here depends on speed: every wait is on a stat or on the scorer's
state, bounded; the times asserted are the design's bounds (a tick batch
every 0.5 s, a fleet poll every second, worker views 1 s old at most).
"""

from __future__ import annotations

import time

import pytest

from harness import DemoApi, Envoy, Redis, Scorer, request, wait_until

SECRET = "s3cret-operator-tests"
TOKEN = "operator-token-for-tests-0123456789"

CONFIG = {
    "mode": "block",
    "client": {"trusted_proxies": ["127.0.0.0/8"]},
    "credential_stuffing": {"login_routes": [{"path": "/api/login"}], "distributed": {"enabled": False}},
    "penalty": {"duration_s": 120},
    # ask_at just under block_at: (almost) no callouts, the filter decides
    # alone (what the operator's view must show is exactly those decisions).
    "scorer": {"enabled": True, "ask_at": 99, "timeout_ms": 1000, "secret_env": "ABUSE_SCORER_SECRET",
               "fleet_poll_s": 1},
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    import os
    os.environ["ABUSE_SCORER_SECRET"] = SECRET
    api, redis = DemoApi(), Redis()
    procs = []
    try:
        scorers = [Scorer(secret=SECRET, redis_url=redis.url, operator_token=TOKEN) for _ in range(2)]
        procs += scorers
        envoys = [Envoy.with_filter(CONFIG, api.port, scorer_port=s.port, env_keys=["ABUSE_SCORER_SECRET"])
                  for s in scorers]
        procs += envoys
        yield envoys, scorers, api
    finally:
        for p in procs:
            p.stop()
        redis.stop()
        api.stop()


def op(scorer, method, path, body=None, token=TOKEN):
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return request(scorer.port, method, path, headers, body)


def stuff(envoy, client, n=12, ua="python-requests/2.32"):
    """Failed logins on n usernames; returns the responses."""
    return [request(envoy.port, "POST", "/api/login",
                    {"x-forwarded-for": client, "content-type": "application/json", "user-agent": ua},
                    {"username": f"victim{i:03d}", "password": "nope"}) for i in range(n)]


def decisions_of(scorer, client):
    r = op(scorer, "GET", f"/v1/decisions?client={client}")
    assert r.status == 200, (r.status, r.body[:300])
    body = r.json()
    return body["decisions"] if isinstance(body, dict) else body


def test_an_attack_is_explained_by_the_id_its_refusal_quotes(fleet):
    envoys, scorers, _ = fleet
    client = "203.0.113.71"
    answers = stuff(envoys[0], client)
    refused = [r for r in answers if r.status == 403]
    assert refused, [r.status for r in answers]
    first = refused[0]
    decision = first.headers["x-abuse-decision"]
    assert first.json()["decision_id"] == decision
    # Within two ticks the event is in the scorer (either replica: Redis).
    # The block itself, not a placeholder: a later refusal of the box, counted
    # by another worker, can reach the scorer first (action "penalty", no
    # figures) and the block replaces it on that worker's next batch.
    wait_until(lambda: any(d.get("id") == decision and d.get("action") == "block"
                           for d in decisions_of(scorers[1], client)), 5, 0.1,
               "the block's event in the fleet store")
    r = op(scorers[1], "GET", f"/v1/decisions/{decision}")
    assert r.status == 200, (r.status, r.body[:300])
    record = r.json()
    record = record.get("decision", record)
    assert record["client"].startswith(client) and record["path"] == "/api/login"
    stuffing = [x for x in record["reasons"] if x["reason"] == "credential_stuffing"]
    # The detector's figure against its limit (or, when the scorer was asked
    # at the border and boxed it, the scorer's score against block_at).
    assert stuffing and stuffing[0]["limit"] > 0 and stuffing[0]["value"] >= stuffing[0]["limit"], \
        (record, decisions_of(scorers[1], client), [(r.status, r.headers.get("x-abuse-decision")) for r in answers])
    assert "limit" in stuffing[0]["text"], record
    # Later refusals of the box quote the same decision.
    assert all(r.headers.get("x-abuse-decision") == decision for r in refused), [r.headers for r in refused]


def test_an_unblock_reaches_both_envoys_and_sticks(fleet):
    envoys, scorers, _ = fleet
    client = "203.0.113.72"
    ua = "python-requests/2.32"
    stuff(envoys[0], client, ua=ua)
    # Boxed here; the other Envoy learns it from the fleet store (the scorer
    # boxes fleet-wide what a filter boxed, or the client is boxed there
    # by its own attempts: make it so, then lift).
    stuff(envoys[1], client, ua=ua)
    probe = lambda e: request(e.port, "GET", "/api/products", {"x-forwarded-for": client, "user-agent": ua})
    assert all(probe(e).status == 403 for e in envoys)
    wait_until(lambda: decisions_of(scorers[0], client), 5, 0.1, "its decisions in the scorer")
    lifted_at = time.monotonic()
    r = op(scorers[0], "DELETE", f"/v1/decisions?client={client}&quiet_s=300")
    assert r.status in (200, 202, 204), (r.status, r.body[:300])
    # Each Envoy polls every second and its workers' views are at most 1 s
    # old: let through by both within a few seconds.
    for e in envoys:
        wait_until(lambda: probe(e).status == 200, 10, 0.2, "the lift on every Envoy")
        e.wait_stat("abuse_filter.operator.lifts_applied", 1)
    took = time.monotonic() - lifted_at
    print(f"unblocked on both Envoys {took:.1f} s after the DELETE")
    # The first answer came from one worker; the other worker's view of the
    # client is at most state.worker_sync_ms (1 s) older: the stated bound.
    time.sleep(1.2)
    # It sticks: more requests (and the same failures, within the quiet
    # period) do not bring the box back.
    for e in envoys:
        for _ in range(5):
            assert probe(e).status == 200
    retry = stuff(envoys[0], client, n=3, ua=ua)
    assert all(r.status == 401 for r in retry), [r.status for r in retry]
    # The change is recorded.
    audit = op(scorers[1], "GET", "/v1/audit")
    assert audit.status == 200 and client in audit.body.decode()


def test_an_allow_entry_lets_a_client_through_until_it_expires(fleet):
    envoys, scorers, _ = fleet
    client = "203.0.113.73"
    r = op(scorers[0], "POST", "/v1/allow",
           {"kind": "cidr", "value": client, "ttl_s": 4, "note": "partner migration", "author": "test"})
    assert r.status in (200, 201), (r.status, r.body[:300])
    for e in envoys:
        e.wait_stat("abuse_filter.scorer.fleet_polls", 2)
    # Allowed: even a scanner's probe is not judged.
    scan = lambda e: request(e.port, "GET", "/.env", {"x-forwarded-for": client, "user-agent": "sqlmap/1.7"})
    for e in envoys:
        wait_until(lambda: scan(e).status == 404, 5, 0.2, "the allow entry on every Envoy")
    e.wait_stat("abuse_filter.decisions.allowlisted", 1)
    # Expired: judged again (a scanner is blocked on its first request).
    wait_until(lambda: all(scan(e).status == 403 for e in envoys), 15, 0.3, "the entry's expiry")
    listed = op(scorers[1], "GET", "/v1/allow")
    assert listed.status == 200


def test_operator_routes_want_the_token(fleet):
    _, scorers, _ = fleet
    for method, path in [("GET", "/v1/decisions?client=203.0.113.71"), ("GET", "/v1/decisions/abcd-1-1"),
                         ("DELETE", "/v1/decisions?client=203.0.113.71"), ("GET", "/v1/allow"),
                         ("POST", "/v1/allow"), ("DELETE", "/v1/allow/x"), ("GET", "/v1/audit")]:
        for token in (None, "wrong-token"):
            r = op(scorers[0], method, path, {"kind": "cidr", "value": "10.0.0.1", "ttl_s": 5}, token=token)
            assert r.status == 401, (method, path, token, r.status)
            assert TOKEN not in r.body.decode()
    assert TOKEN not in scorers[0].log()


def test_with_the_scorer_away_nothing_slows_and_events_are_dropped_and_counted(fleet):
    _, _, api = fleet
    # A third Envoy whose scorer is gone: the attack is refused by the
    # filter alone, every request is answered, the events are counted lost.
    lone = Scorer(secret=SECRET, operator_token=TOKEN)
    envoy = Envoy.with_filter(CONFIG, api.port, scorer_port=lone.port, env_keys=["ABUSE_SCORER_SECRET"])
    try:
        lone.stop()
        answers = stuff(envoy, "203.0.113.74", n=20)
        assert all(r.status in (401, 403) for r in answers), [r.status for r in answers]
        assert any(r.status == 403 and r.headers.get("x-abuse-decision") for r in answers)
        envoy.wait_stat("abuse_filter.decision_events.dropped", 1, timeout=10)
        assert envoy.stat("abuse_filter.decision_events.sent") == 0
        assert request(envoy.port, "GET", "/api/products", {"x-forwarded-for": "198.51.100.74"}).status == 200
    finally:
        envoy.stop()
