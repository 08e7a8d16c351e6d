"""`make eval` in its quick profile (~35 s of traffic) on free ports, through
the shipped bootstrap: benign clients and attacks at the same time, scored
from Envoy's access log. Asserts the issue-5 targets from report.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    proc = subprocess.run([sys.executable, str(ROOT / "eval" / "run.py"), "--quick", "--no-fail", "--no-crowdsec",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((out / "report.json").read_text())
    assert (out / "blocks.svg").read_text().startswith("<svg")
    return data


def describe(rows, names):
    return {n: {k: rows[n][k] for k in ("requests", "blocked", "first_block_request", "share_blocked_after_first",
                                         "clients_blocked", "block_reasons")} for n in names}


def test_quick_eval_runs_every_scenario(report):
    assert not report["run"]["errors"], report["run"]["errors"]
    assert not report["run"]["trap"]
    empty = [n for n, r in report["scenarios"].items() if r["requests"] == 0]
    assert not empty, f"scenarios that sent nothing: {empty} (skipped: {report['run']['skipped']})"


def test_no_benign_client_is_blocked(report):
    rows = report["scenarios"]
    blocked = [n for n, r in rows.items() if r["kind"] == "benign" and r["clients_blocked"]]
    assert not blocked, describe(rows, blocked)


def test_single_source_attacks_are_blocked_within_20_requests(report):
    rows = report["scenarios"]
    late = [n for n, r in rows.items() if r["kind"] == "attack" and r["single_source"]
            and (r["first_block_request"] is None or r["first_block_request"] > 20)]
    assert not late, describe(rows, late)


def test_distributed_stuffing_is_recognised_and_then_blocked(report):
    d = report["scenarios"]["distributed_stuffing"]
    assert d["first_block_request"] is not None and d["first_block_request"] <= 200, d
    assert d["share_blocked_after_first"] >= 0.95, d


def test_every_attack_is_recognised(report):
    assert not report["overall"]["attack_scenarios_never_blocked"], report["overall"]["attack_scenarios_never_blocked"]


def test_recall_after_recognition(report):
    o = report["overall"]
    assert o["recall_after_recognition"] >= 0.95, o
