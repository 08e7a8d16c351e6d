"""The filter's decision in Envoy's access log: the filter sets filter state
`wasm.abuse_filter` (`action=... score=... reasons=...`) when there is a
decision worth logging, and `%FILTER_STATE(wasm.abuse_filter:PLAIN)%` prints
it. Checked with the shipped envoy/envoy.yaml (its stdout access log) and in
monitor mode (would_block), on the real Envoy."""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))
yaml = pytest.importorskip("yaml")

from harness import ROOT, DemoApi, Envoy, demo_stack, envoy_config, free_port, request, wait_until  # noqa: E402


def test_shipped_bootstrap_logs_each_decision(tmp_path):
    from bootstrap import eval_bootstrap  # the shipped file, ports substituted, filter config untouched

    port, admin = free_port(), free_port()
    make = lambda api_port, scorer_port: eval_bootstrap(ROOT / "envoy" / "envoy.yaml", tmp_path, port=port,
                                                        admin_port=admin, api_port=api_port, scorer_port=scorer_port)
    log_path = tmp_path / "envoy.log"
    with demo_stack(make, api_port=0, scorer_port=0, port=port, admin_port=admin, log_path=log_path,
                    scorer_state_dir=tmp_path / "scorer"):
        xff = {"x-forwarded-for": "203.0.113.7"}
        clean = request(port, "GET", "/api/products?page=1", headers={"x-forwarded-for": "198.51.100.20"})
        assert clean.status == 200
        statuses = [request(port, "POST", "/api/login", headers=xff,
                            body={"username": f"user000{i}", "password": "nope"}).status for i in range(1, 9)]
        assert statuses[-1] == 403, statuses
        scanner = request(port, "GET", "/api/products", headers={"x-forwarded-for": "203.0.113.8", "user-agent": "sqlmap/1.7"})
        assert scanner.status == 403

        def lines():
            return [l for l in log_path.read_text(errors="replace").splitlines() if '" abuse="' in l or ' abuse="' in l]

        wait_until(lambda: len(lines()) >= 10, 10, 0.2, "access log lines")
    by_xff: dict[str, list[str]] = {}
    for line in lines():
        xff_value = re.search(r'xff="([^"]*)"', line).group(1)
        by_xff.setdefault(xff_value, []).append(line)
    # A clean client: nothing written, the formatter prints "-".
    assert all('abuse="-"' in l for l in by_xff["198.51.100.20"]), by_xff["198.51.100.20"]
    stuffer = by_xff["203.0.113.7"]
    blocked = [l for l in stuffer if " 403 " in l]
    assert blocked and all('abuse="action=block score=' in l and "reasons=credential_stuffing" in l for l in blocked), stuffer
    assert all("peer=127.0.0.1" in l for l in stuffer), stuffer
    assert any('abuse="action=block score=' in l and "reasons=probing" in l for l in by_xff["203.0.113.8"]), by_xff


def test_monitor_mode_logs_would_block(tmp_path):
    api = DemoApi()
    port, admin = free_port(), free_port()
    cfg = envoy_config({"mode": "monitor", "client": {"trusted_proxies": ["127.0.0.0/8"]},
                        "rate": {"limits": [{"requests": 2, "window_s": 60}]}}, port, admin, api.port)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    log = tmp_path / "access.json"
    hcm["access_log"] = [{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(log),
            "log_format": {"json_format": {"path": "%REQ(:PATH)%", "status": "%RESPONSE_CODE%",
                                           "abuse": "%FILTER_STATE(wasm.abuse_filter:PLAIN)%"}},
        },
    }]
    envoy = Envoy(cfg, admin, port)
    try:
        for i in range(4):
            assert request(port, "GET", f"/api/products?i={i}", headers={"x-forwarded-for": "203.0.113.50"}).status == 200
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 4, 10, 0.1, "access log")
    finally:
        envoy.stop()
        api.stop()
    records = sorted((json.loads(l) for l in log.read_text().splitlines()), key=lambda r: r["path"])
    assert [r["abuse"] for r in records[:2]] == [None, None], records
    for r in records[2:]:
        assert re.fullmatch(r"action=would_block score=\d+ reasons=rate_limit decision=[0-9a-f]{4}-[0-9a-f]+-[0-9a-f]+", r["abuse"]), records


def test_a_request_and_its_answer_both_decided_log_the_answers(tmp_path):
    """A risky client (a sensitive-file probe: risk 60, tagged) whose next
    request is tagged when it arrives and blocked on its answer (a counted
    404): the filter keeps the latest decision and writes it once, at the
    answer, so the log shows the block; nothing traps."""
    api = DemoApi()
    port, admin = free_port(), free_port()
    cfg = envoy_config({"mode": "block", "client": {"trusted_proxies": ["127.0.0.0/8"]},
                        "probing": {"max_not_found_paths": 2}}, port, admin, api.port)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    log = tmp_path / "access.json"
    hcm["access_log"] = [{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(log),
            "log_format": {"json_format": {"path": "%REQ(:PATH)%", "status": "%RESPONSE_CODE%",
                                           "abuse": "%FILTER_STATE(wasm.abuse_filter:PLAIN)%"}},
        },
    }]
    envoy = Envoy(cfg, admin, port)
    xff = {"x-forwarded-for": "203.0.113.60"}
    try:
        assert request(port, "GET", "/.env", headers=xff).status == 404
        statuses = [request(port, "GET", f"/nope-{i}", headers=xff).status for i in range(4)]
        assert 403 in statuses, statuses
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 5, 10, 0.1, "access log")
    finally:
        envoy.stop()  # fails if the filter trapped
        api.stop()
    records = {r["path"]: r for r in (json.loads(l) for l in log.read_text().splitlines())}
    # Risk 60 (decaying: 59 once a few ms passed), tagged.
    # (a tag is a decision too: it carries its id, as blocks do)
    assert re.fullmatch(r"action=tag score=(59|60) reasons=probing decision=[0-9a-f]{4}-[0-9a-f]+-[0-9a-f]+", records["/.env"]["abuse"]), records
    # The distinct 404 paths are counted in a 64-bit sketch keyed by the
    # per-process secret: /nope-0 is the second distinct path unless its bit
    # is /.env's (1 in 64 draws), then /nope-1 is (unless it too collides).
    # Whichever it is was tagged when it arrived (risk 59) and blocked on its
    # 404 answer: the first refused request is always one whose request
    # passed, and the log shows the answer's decision, not the request's.
    order = [f"/nope-{i}" for i in range(4)]
    first = next(p for p in order if records[p]["status"] == 403)
    assert all(records[p]["status"] == 404 and records[p]["abuse"].startswith("action=tag ")
               for p in order[:order.index(first)]), records
    assert records[first]["abuse"].startswith("action=block score=1") and "probing" in records[first]["abuse"], records
    blocked = [r for r in records.values() if r["status"] == 403]
    assert blocked and all(r["abuse"].startswith("action=block score=") for r in blocked), records
