"""The anomaly model learns normal from a sample of all traffic, on real
Envoy (two workers), the built filter and the real scorer: ordinary
traffic paced by the clock warms it without a single callout, and the model
then scores — a slow client whose 404s stay under every rule is tagged
`anomaly` through the scorer, beyond the tag line calibrated on the ordinary
clients (scorer/src/model.rs, **Tag line**), while the ordinary clients are
not.
"""

import json
import random
import time

import pytest

from harness import DemoApi, Envoy, Scorer, request, sleep_until, wait_until

SECRET = "model-test-secret"
# The scorer's own default: a model warm after 40 samples tagged an
# ordinary client now and then (2 clean-clone CI runs in ~5), a young model
# finding the first few samples of each client odd.
WARM_UP = 200
CONFIG = {
    "mode": "block",
    "client": {"trusted_proxies": ["127.0.0.0/8"]},
    "route_groups": [
        {"name": "products", "path_prefix": "/api/products"},
        {"name": "debug", "path_prefix": "/debug/"},
    ],
    "scorer": {"enabled": True, "ask_at": 50, "timeout_ms": 1000, "secret_env": "ABUSE_SCORER_SECRET"},
}
CLIENTS = [f"198.18.{i // 200}.{i % 200 + 1}" for i in range(60)]


@pytest.fixture
def stack(monkeypatch):
    monkeypatch.setenv("ABUSE_SCORER_SECRET", SECRET)
    api = DemoApi()
    scorer = Scorer("--warm-up", str(WARM_UP), secret=SECRET)
    envoy = Envoy.with_filter(CONFIG, api.port, scorer_port=scorer.port, env_keys=["ABUSE_SCORER_SECRET"])
    yield envoy, scorer
    envoy.stop()
    scorer.stop()
    api.stop()


def ordinary_schedule(seconds: float, seed: int = 7):
    """(offset_s, client, path): each client browses every 1.5-4.5 s (a
    person's irregular gaps, so no machine rhythm), a few product pages and
    the odd look at its headers. A fixed seed: the same traffic every run."""
    rng = random.Random(seed)
    events = []
    for client in CLIENTS:
        t = rng.uniform(0, 3)
        while t < seconds:
            path = f"/api/products?page={rng.randint(1, 3)}" if rng.random() < 0.8 else "/debug/headers"
            events.append((t, client, path))
            t += rng.uniform(1.5, 4.5)
    return sorted(events)


def healthz(scorer):
    return json.loads(request(scorer.port, "GET", "/healthz").body)["model"]


def test_ordinary_traffic_warms_the_model_without_callouts_and_the_model_then_tags_an_odd_client(stack):
    envoy, scorer = stack
    # Phase 1: at most 60 s of ordinary traffic, paced by the clock, until
    # the model is warm (samples leave each worker every 5 s window).
    start = time.monotonic()
    checked = start
    for offset, client, path in ordinary_schedule(60):
        sleep_until(start + offset)
        assert request(envoy.port, "GET", path, {"x-forwarded-for": client}).status == 200
        if time.monotonic() - checked > 1:
            checked = time.monotonic()
            m = json.loads(request(scorer.port, "GET", "/v1/dashboard").body)["model"]
            # A client is judged by its route group's model alone (silent
            # while that one warms): the products group's must be warm too.
            if m["warm"] and any(g["group"] == "products" and g["warm"] for g in m["groups"]):
                break
    warmed_after = time.monotonic() - start
    model = healthz(scorer)
    assert model["warm"] and model["trained"] >= WARM_UP, model
    assert envoy.stat("abuse_filter.scorer.callouts_sent") == 0, "warmed without asking about anyone"
    assert scorer.metric("abuse_scorer_score_requests_total") == 0
    # (stats reach Envoy on the next tick)
    envoy.wait_stat("abuse_filter.scorer.samples_sent", WARM_UP, timeout=5)
    print(f"model warm after {warmed_after:.1f} s of ordinary traffic ({model['trained']} samples)")
    # The tag line, calibrated on the warm-up's ordinary clients (leave-one-out)
    # or, a window later, on the candidates of the windows before the reference:
    # the k-th smallest of n log-masses (k = 2 per 250, rounded down), 1.5 bits
    # under it; a normal client is beyond it with probability at most k/(n+1)
    # per sample (< 2/250), whatever the traffic.
    view = json.loads(request(scorer.port, "GET", "/v1/dashboard").body)["model"]
    cal = view["calibration"]
    assert cal["rank"] == max(1, 2 * cal["points"] // 250) and cal["points"] >= WARM_UP, cal
    assert abs(cal["tag_line"] - (cal["kth_log_mass"] - 1.5)) < 0.01, cal
    assert cal["false_tag_bound"] < 2 / 250 and cal["median_log_mass"] > cal["kth_log_mass"], cal
    for g in view["groups"]:
        assert ("calibration" in g) == g["warm"], g

    # Phase 2: one client, 16 distinct unknown paths (404) over ~5 s — under
    # probing's 20 paths per minute, not object ids (no enumeration): no rule
    # fires — paced by the clock.
    odd = "203.0.113.150"
    start = time.monotonic()
    for i in range(16):
        sleep_until(start + i * 0.33 + (i % 3) * 0.05)
        r = request(envoy.port, "GET", f"/api/products-{'abcdefghijklmnopq'[i]}", {"x-forwarded-for": odd})
        assert r.status == 404, (i, r.status, r.headers, r.body[:300])
        assert "x-abuse-reasons" not in r.headers or not r.headers["x-abuse-reasons"], "no rule fired"
    # Its sample leaves with the next window; the scorer answers with a flag.
    envoy.wait_stat("abuse_filter.scorer.anomaly_flags_applied", 1, timeout=20)
    tagged = request(envoy.port, "GET", "/debug/headers", {"x-forwarded-for": odd})
    assert tagged.status == 200, "tagged, never blocked by the model alone"
    seen = tagged.json()["headers"]
    assert "anomaly" in seen.get("x-abuse-reasons", ""), seen
    # The ordinary clients are not.
    for client in CLIENTS[:10]:
        headers = request(envoy.port, "GET", "/debug/headers", {"x-forwarded-for": client}).json()["headers"]
        assert "anomaly" not in headers.get("x-abuse-reasons", ""), (client, headers)
    # And the scorer shows it: the distribution, and the client's row with its score.
    dash = json.loads(request(scorer.port, "GET", "/v1/dashboard").body)
    assert dash["anomaly_distribution"]["samples"] > 0
    row = next(c for c in dash["top_clients"] if c["client"] == odd)
    # What a flag implies, whatever the model's draws: the client was beyond
    # its group's tag line (anomaly > 0.5), where the model's points alone
    # (at least block_at / 2 = 50) make a tag. The row keeps the anomaly it was
    # flagged at: a later ordinary sample of the same client (its
    # /debug/headers look) must not rewrite the figure behind the reason.
    assert row["action"] == "tag" and "anomaly" in row["reasons"], row
    assert row["anomaly"] > 0.5 and row["score"] >= 50, row
    assert envoy.stat("abuse_filter.decisions.block") == 0
