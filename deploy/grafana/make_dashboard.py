#!/usr/bin/env python3
"""Writes deploy/grafana/abuse-filter.json, the Grafana dashboard of the
filter and the scorer (raw dashboard JSON, for file provisioning or the
import dialog), from the lists below: `make dashboard`.

Prometheus names: the filter's Envoy counters `wasmcustom.abuse_filter.x.y`
appear as `abuse_filter_x_y` (Envoy strips its custom-namespace prefix), one
series per Envoy (`instance`); the per-detector counters are one metric per
reason, so each reason is its own query. tests/test_compose_stack.py checks
every metric named here against a live Envoy and scorer, and every reason
Envoy exports against REASONS."""

from __future__ import annotations

import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "abuse-prometheus"}
OUT = Path(__file__).resolve().parent / "abuse-filter.json"

# Reason::ALL (engine/src/reason.rs), as the filter names its counters.
REASONS = [
    "rate_limit", "credential_stuffing", "account_takeover", "enumeration", "scraping", "machine_rhythm",
    "probing", "session_sharing", "session_churn", "impossible_travel", "anonymous_network", "endpoint_spike",
    "anomaly", "harvest",
]
# The account profile's reasons (engine/src/detectors/login_profile.rs).
LOGIN_RISK_REASONS = ["new_country", "impossible_travel", "anonymous_source", "failures_elsewhere", "new_network",
                      "new_device"]

SEL = '{instance=~"$instance"}'
RATE = "$__rate_interval"


def target(expr: str, legend: str, ref: int) -> dict:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + ref % 26) + ("" if ref < 26 else str(ref // 26))}


def panel(pid: int, title: str, description: str, targets: list[tuple[str, str]], grid: tuple[int, int, int, int],
          unit: str = "reqps", kind: str = "timeseries", stack: bool = False) -> dict:
    x, y, w, h = grid
    p = {
        "id": pid, "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [target(e, l, i) for i, (e, l) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal" if stack else "none"}, "fillOpacity": 15 if stack else 0}
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value", "graphMode": "area"}
    return p


def rate(metric: str, by: str = "instance") -> str:
    return f"sum by ({by}) (rate({metric}{SEL}[{RATE}]))" if by else f"sum(rate({metric}{SEL}[{RATE}]))"


def dashboard() -> dict:
    panels = [
        panel(1, "Decisions by action", "Requests judged by the filter, per Envoy and action (block = refused; would_block = what block mode would refuse, in monitor mode).",
              [(rate(f"abuse_filter_decisions_{a}"), "{{instance}} " + a) for a in ("allow", "tag", "block", "would_block", "allowlisted")],
              (0, 0, 16, 8), stack=True),
        panel(2, "Blocked share", "Blocked requests / all requests judged, over the selected Envoys.",
              [(f"{rate('abuse_filter_decisions_block', '')} / clamp_min({rate('abuse_filter_requests', '')}, 1e-9)", "blocked")],
              (16, 0, 8, 8), unit="percentunit", kind="stat"),
        panel(3, "Detections per reason", "Requests on which each detector fired (abuse_filter_detector_<reason>_fired).",
              [(rate(f"abuse_filter_detector_{r}_fired", ""), r) for r in REASONS], (0, 8, 12, 9)),
        panel(4, "Blocks per reason", "Requests blocked (or would-blocked) with each reason among the block's reasons (abuse_filter_detector_<reason>_blocked).",
              [(rate(f"abuse_filter_detector_{r}_blocked", ""), r) for r in REASONS], (12, 8, 12, 9)),
        panel(5, "Penalty-box hits", "Requests of already-blocked clients refused before any other work.",
              [(rate("abuse_filter_penalty_box_hits"), "{{instance}}")], (0, 17, 8, 8)),
        panel(6, "Scorer callouts (filter side)", "Borderline requests: callouts sent and their fate, and the ones decided without a callout.",
              [(rate(f"abuse_filter_scorer_{c}"), "{{instance}} " + c) for c in
               ("callouts_sent", "answered", "failed", "timed_out", "cache_hits", "coalesced", "skipped_breaker_open")],
              (8, 17, 8, 8)),
        panel(7, "Scorer circuit breaker", "1 while a worker's breaker is open (the scorer failed breaker_failures times in a row). Defined at the first callout.",
              [("max by (instance) (abuse_filter_scorer_breaker_open" + SEL + ")", "{{instance}}")], (16, 17, 8, 8), unit="short"),
        panel(8, "Shared data", "Client records evicted from a full probe window, updates given up (the request was let through) and CAS retries.",
              [(rate(f"abuse_filter_shared_data_{c}"), "{{instance}} " + c) for c in ("evictions", "errors", "cas_retries")],
              (0, 25, 8, 8), unit="ops"),
        panel(9, "Shared-data size", "The fixed size of the filter's shared-data tables; it never grows with traffic.",
              [("max by (instance) (abuse_filter_shared_data_bytes" + SEL + ")", "{{instance}}")], (8, 25, 8, 8), unit="bytes"),
        panel(10, "Fleet verdicts", "Fleet-verdict polls and blocks taken over from other Envoys (filter), blocks published (scorer).",
              [(rate("abuse_filter_scorer_fleet_polls"), "{{instance}} polls"),
               (rate("abuse_filter_scorer_fleet_verdicts_applied"), "{{instance}} applied"),
               ("sum(rate(abuse_scorer_fleet_verdicts_total[" + RATE + "]))", "scorer published")],
              (16, 25, 8, 8), unit="ops"),
        panel(11, "Scorer answers by action", "Score requests the scoring service answered, by resulting action, and refused requests by kind.",
              [("sum by (action) (rate(abuse_scorer_score_requests_total[" + RATE + "]))", "{{action}}"),
               ("sum by (kind) (rate(abuse_scorer_errors_total[" + RATE + "]))", "error {{kind}}")],
              (0, 33, 8, 8)),
        panel(12, "Scorer latency", "Time the scorer takes to answer (p50, p99), by route.",
              [("histogram_quantile(0.5, sum by (le, route) (rate(abuse_scorer_request_duration_seconds_bucket[" + RATE + "])))", "p50 {{route}}"),
               ("histogram_quantile(0.99, sum by (le, route) (rate(abuse_scorer_request_duration_seconds_bucket[" + RATE + "])))", "p99 {{route}}")],
              (8, 33, 8, 8), unit="s"),
        panel(13, "Scorer state", "Model warm (1 once it scores), Redis reachable, and Redis failures answered from the in-process store.",
              [("max(abuse_scorer_model_warm)", "model warm"), ("max(abuse_scorer_redis_up)", "redis up"),
               ("sum(rate(abuse_scorer_store_fallbacks_total[" + RATE + "]))", "store fallbacks/s")],
              (16, 33, 8, 8), unit="short"),
        panel(14, "Filter VM reloads", "Wasm VMs Envoy reloaded after a trap (failure_policy FAIL_RELOAD); the filter never panics, so this stays 0.",
              [(rate("envoy_wasm_abuse_filter_vm_reload"), "{{instance}}")], (0, 41, 8, 6), unit="ops"),
        panel(15, "Logins told a risk", "Answered logins (successes and step-ups) that differed from their account's profile: by level, and per reason (abuse_filter_login_risk_*).",
              [(rate(f"abuse_filter_login_risk_{level}", ""), level) for level in ("medium", "high")]
              + [(rate(f"abuse_filter_login_risk_reason_{r}", ""), r) for r in LOGIN_RISK_REASONS],
              (8, 41, 16, 6)),
    ]
    return {
        "uid": "abuse-filter",
        "title": "Abuse filter",
        "description": "The abuse filter on each Envoy, and its scoring service (deploy/grafana/make_dashboard.py).",
        "tags": ["envoy", "abuse-filter"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "browser",
        "templating": {"list": [{
            "name": "instance", "label": "Envoy", "type": "query", "datasource": DATASOURCE,
            "query": {"query": "label_values(abuse_filter_requests, instance)", "refId": "instance"},
            "definition": "label_values(abuse_filter_requests, instance)",
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        }]},
        "annotations": {"list": []},
        "panels": panels,
    }


def text() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(text())
    print(f"wrote {OUT}")
