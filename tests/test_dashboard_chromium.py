"""The scorer's dashboard in a real headless Chromium (Debian's package):
the page loads, runs its script, and shows a detection this test caused
through real Envoy."""

import shutil
import subprocess
import tempfile

import pytest

import json
import re
import time

from harness import DemoApi, Envoy, Scorer, request, sleep_until, wait_until

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
        row = re.search(r'<tr data-client="203\.0\.113\.99">(.*?)</tr>', dom).group(1)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert re.fullmatch(r"\d\.\d\d", cells[4]), f"the client's anomaly is shown: {cells}"
    finally:
        envoy.stop()
        scorer.stop()
        api.stop()
