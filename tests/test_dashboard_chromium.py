"""The scorer's dashboard in a real headless Chromium (Debian's package):
the page loads, runs its script, and shows a detection this test caused
through real Envoy."""

import shutil
import subprocess
import tempfile

import pytest

import json
import os
import re
import time
from pathlib import Path

from cdp import Browser, count_color, png_size
from harness import DemoApi, Envoy, Redis, Scorer, request, sleep_until, wait_until

SECRET = "dashboard-test-secret"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("chromium is needed (Debian: apt-get install chromium)")


def rendered_dom(url: str) -> str:
    """The DOM after the page's scripts ran (fetches included)."""
    profile = tempfile.mkdtemp(prefix="abuse-chromium-")
    try:
        out = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--dump-dom", url],
            capture_output=True, text=True, timeout=90,
        )
        return out.stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_dashboard_shows_a_detection_caused_through_envoy(monkeypatch):
    monkeypatch.setenv("ABUSE_SCORER_SECRET", SECRET)
    api = DemoApi()
    scorer = Scorer("--warm-up", "10", secret=SECRET)
    # timeout_ms: the answer takes ms; 2 s keeps a slow or loaded machine far
    # from a timeout, which would leave `answered` at 0 below.
    envoy = Envoy.with_filter(
        {
            "mode": "block",
            "client": {"trusted_proxies": ["127.0.0.0/8"]},
            "scorer": {"enabled": True, "ask_at": 50, "timeout_ms": 2000, "secret_env": "ABUSE_SCORER_SECRET"},
        },
        api.port, scorer_port=scorer.port, env_keys=["ABUSE_SCORER_SECRET"],
    )
    try:
        # Ordinary browsing by 20 clients, paced by the clock, until the
        # batches' samples have warmed the model (bounded: 40 s).
        start = time.monotonic()
        for i in range(400):
            sleep_until(start + i * 0.1)
            request(envoy.port, "GET", f"/api/products?page={i % 3 + 1}", {"x-forwarded-for": f"198.18.7.{i % 20 + 1}"})
            if i % 10 == 9 and json.loads(request(scorer.port, "GET", "/healthz").body)["model"]["warm"]:
                break
        wait_until(lambda: json.loads(request(scorer.port, "GET", "/v1/dashboard").body)["anomaly_distribution"]["samples"] > 0,
                   15, 0.2, "scored samples")
        client = "203.0.113.99"
        # One request for /.env: probing makes the client borderline, the
        # filter asks the scorer, the scorer records the detection.
        request(envoy.port, "GET", "/.env", {"x-forwarded-for": client})
        envoy.wait_stat("abuse_filter.scorer.answered", 1)
        # The filter's own decision reaches the scorer on a tick batch, with
        # its reasons, and passes the scorer's checks.
        def story():
            d = json.loads(request(scorer.port, "GET", f"/v1/decisions?client={client}").body)
            return d["decisions"] and d
        found = wait_until(story, 10, 0.2, "the decision event at the scorer")
        assert any(r["reason"] == "probing" for r in found["decisions"][0]["reasons"]), found
        assert scorer.metric("abuse_scorer_decisions_dropped_total", by="scorer") == 0
        wait_until(lambda: client in request(scorer.port, "GET", "/v1/dashboard").body.decode(), 10, 0.2,
                   "the dashboard data")

        dom = rendered_dom(f"http://127.0.0.1:{scorer.port}/")
        assert 'id="top-clients"' in dom, dom[:2000]
        assert f'data-client="{client}"' in dom, "the scored client is listed"
        assert "probing" in dom, "with its reason"
        assert 'id="detections-chart"' in dom and 'id="model-state"' in dom and 'id="callout-rate"' in dom
        # The model's story: the distribution of sampled clients' anomaly
        # (20 bars, some non-empty), and the scored client's own anomaly.
        assert 'id="anomaly-distribution"' in dom
        bars = re.findall(r'data-bin="\d+" data-count="(\d+)"', dom)
        assert len(bars) == 20 and sum(map(int, bars)) > 0, bars
        assert "sampled clients scored" in dom
        # The callouts' table (the fleet's top clients list it too, first).
        callouts = dom[dom.index('id="top-clients"'):]
        row = re.search(r'<tr data-client="203\.0\.113\.99">(.*?)</tr>', callouts).group(1)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert re.fullmatch(r"\d\.\d\d", cells[4]), f"the client's anomaly is shown: {cells}"
    finally:
        envoy.stop()
        scorer.stop()
        api.stop()


TOKEN = "0f4c1e2d3b5a69788796a5b4c3d2e1f00f4c1e2d3b5a69788796a5b4c3d2e1f0"
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
STUFFER = "203.0.113.7"


def decision(i: int, now_ms: int, **over) -> dict:
    """A decision event as a filter sends it on its tick batch."""
    event = {
        "id": f"3f2a-0-{i:x}", "time_ms": now_ms, "instance": "envoy-a", "client": STUFFER, "address": STUFFER,
        "username": "9c1d4e7a2b3f5a60", "route_group": "login", "method": "POST", "path": "/api/login",
        "action": "block", "mode": "block", "status": 403, "risk": 100.0, "until_ms": now_ms + 60_000, "hits": 1,
        "reasons": [{"reason": "credential_stuffing", "what": "failed-login usernames", "value": 29.0, "limit": 5.0,
                     "window_s": 600, "text": "29 failed-login usernames in 600 s; limit 5"}],
    }
    event.update(over)
    return event


def test_dashboard_shows_the_fleet_a_clients_story_and_unblocks(tmp_path):
    """Synthetic tick batches (as two Envoys send them) into a real scorer on
    Redis; the page in a real headless Chromium shows the attack's reason
    and endpoint, the client's story with its figures, and its unblock
    button lands a lift on /v1/verdicts. Screenshots are checked and kept
    for the docs."""
    redis = Redis()
    scorer = Scorer(redis_url=redis.url, secret=SECRET, operator_token=TOKEN)
    browser = None
    try:
        now = int(time.time() * 1000)
        scraper = "198.51.100.23#1a2b3c4d"
        batches = [
            ("envoy-a", [decision(1, now), decision(1, now + 500, action="penalty", hits=41)]),
            ("envoy-b", [decision(2, now, instance="envoy-b", id="77c1-1-1", client=scraper, address="198.51.100.23",
                                  agent="1a2b3c4d", username=None, route_group="api", method="GET",
                                  path="/api/products", action="tag", status=0, risk=55.0, until_ms=0, hits=12,
                                  reasons=[{"reason": "scraping", "what": "pages in a run", "value": 60.0, "limit": 40.0,
                                            "window_s": 60, "text": "60 pages in a run in 60 s; limit 40"}])]),
        ]
        for _, events in batches:
            resp = request(scorer.port, "POST", "/v1/events", {"x-abuse-scorer-secret": SECRET},
                           {"version": 1, "decisions": events, "decisions_dropped": 2})
            assert resp.status == 200, resp.body
        wait_until(lambda: scorer.metric("abuse_scorer_decisions_total", kind="stored") >= 2, 10, 0.1, "stored decisions")
        assert scorer.metric("abuse_scorer_decisions_total", kind="aggregated") == 1
        assert scorer.metric("abuse_scorer_decisions_dropped_total", by="filter") == 4
        # Without the token: 401 on the data and on every operator route.
        for method, path in [("GET", "/v1/dashboard"), ("GET", f"/v1/decisions?client={STUFFER}"),
                             ("DELETE", f"/v1/decisions?client={STUFFER}"), ("GET", "/v1/allow"), ("GET", "/v1/audit")]:
            assert request(scorer.port, method, path).status == 401, path

        browser = Browser(width=1280, height=1000)
        # The token from a link, once (the page removes it from the address bar).
        browser.goto(f"http://127.0.0.1:{scorer.port}/?token={TOKEN}#client={STUFFER}")
        browser.wait_for("document.querySelector('#under-attack tr[data-endpoint=\"POST /api/login\"]') !== null",
                         what="the attacked endpoint")
        assert TOKEN not in browser.eval("location.href + document.documentElement.outerHTML"), "the token is not in the page"
        attacked = browser.eval("document.querySelector('#under-attack tr[data-endpoint=\"POST /api/login\"]').textContent")
        assert "credential_stuffing" in attacked and "42" in attacked, attacked
        assert browser.eval("document.querySelector('#fleet-reasons-chart polyline[data-reason=\"credential_stuffing\"]') !== null")
        assert browser.eval("document.querySelector('#fleet-endpoints-chart polyline[data-endpoint=\"GET /api/products\"]') !== null")
        instances = browser.eval("[...document.querySelectorAll('#fleet-instances tr[data-instance]')].map(t => t.dataset.instance)")
        assert instances == ["envoy-a", "envoy-b"], instances
        assert browser.eval(f"document.querySelector('#fleet-clients tr[data-client=\"{STUFFER}\"]') !== null")

        # The client's story (opened by the link's #client=): figures and state.
        browser.wait_for("document.querySelector('#story-decisions tr[data-decision=\"3f2a-0-1\"]') !== null",
                         what="the story's decision")
        row = browser.eval("document.querySelector('#story-decisions tr[data-decision=\"3f2a-0-1\"]').textContent")
        assert "29 failed-login usernames in 600 s; limit 5" in row and "+41 refused by the penalty box" in row, row
        boxed = browser.eval("document.querySelector('[data-state=\"penalty until\"]').textContent")
        assert "UTC" in boxed, boxed
        browser.eval("window.scrollTo(0, 0)")
        fleet_png = browser.screenshot(tmp_path / "fleet.png", "#fleet", "#fleet-clients")
        story_png = browser.screenshot(tmp_path / "story.png", "#story")

        # The unblock button: a DELETE lands, the lift is on every poll.
        browser.eval("const n = document.getElementById('operator-name'); n.value = 'alice';"
                     "n.dispatchEvent(new Event('change'))")
        browser.eval("document.getElementById('unblock-quiet').value = '600';"
                     "document.getElementById('unblock-note').value = 'customer called: shared office NAT'")
        browser.eval("document.getElementById('unblock-button').click()")
        result = browser.wait_for("(t => t.includes('lifted') && t)(document.getElementById('unblock-result').textContent)",
                                  what="the unblock's answer")
        assert f"{STUFFER}#pool" in result, result
        verdicts = request(scorer.port, "GET", "/v1/verdicts?since=0", {"x-abuse-scorer-secret": SECRET}).json()
        lifted = {l["client"]: l for l in verdicts["lifts"]}
        assert STUFFER in lifted and f"{STUFFER}#pool" in lifted, verdicts
        assert lifted[STUFFER]["quiet_until_ms"] >= now + 600_000
        browser.wait_for("(t => t.includes('never') === false && t)(document.querySelector('[data-state=\"lifted\"]').textContent)",
                         what="the story showing the lift")
        assert "not boxed" in browser.eval("document.querySelector('[data-state=\"penalty until\"]').textContent")
        audit = request(scorer.port, "GET", "/v1/audit", scorer.operator_headers()).json()
        assert audit["records"][0]["note"] == "customer called: shared office NAT"
        assert audit["records"][0]["author"] == "alice"
        assert "unblock" in audit["records"][0]["change"]

        # Screenshot-checked: real PNGs of the rendered page, with the
        # charts' and the unblock button's colours in them.
        for png, min_w, min_h in [(fleet_png, 1000, 600), (story_png, 1000, 200)]:
            w, h = png_size(png)
            assert w >= min_w and h >= min_h, (w, h)
        assert count_color(story_png, (0xC6, 0x28, 0x28)) > 200, "the red unblock button is drawn"
        assert count_color(fleet_png, (0x15, 0x65, 0xC0), 30) > 50, "chart lines are drawn"
        # The docs' screenshots come from here: UPDATE_SCREENSHOTS=1 rewrites them.
        if os.environ.get("UPDATE_SCREENSHOTS") == "1":
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            (DOCS_IMG / "dashboard-fleet.png").write_bytes(fleet_png)
            (DOCS_IMG / "client-story.png").write_bytes(story_png)
    finally:
        if browser:
            browser.close()
        scorer.stop()
        redis.stop()
