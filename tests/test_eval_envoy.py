"""`make eval` in its quick profile (~35 s of traffic, after the history
phase and an Envoy restart warmed by the scorer) on free ports, through the
shipped bootstrap: benign clients and attacks at the same time, scored from
Envoy's access log. Asserts the issue-5 and issue-10 targets from report.json."""

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
    return {n: {k: rows[n].get(k) for k in ("requests", "blocked", "first_block_request", "share_blocked_after_first",
                                         "share_handled_after_first",
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


def test_a_distributed_harvest_is_recognised_and_then_refused(report):
    """Issue 23, part 1: within 300 harvest requests, then >= 80 % of the
    rest; its look-alikes (the flash sale, the partner reading the whole
    catalogue, app users reading their own profiles) are in
    test_no_benign_client_is_blocked."""
    h = report["scenarios"]["distributed_harvest"]
    assert h["first_block_request"] is not None and h["first_block_request"] <= 300, describe(report["scenarios"], ["distributed_harvest"])
    assert h["share_blocked_after_first"] >= 0.80, describe(report["scenarios"], ["distributed_harvest"])


def test_every_attack_is_recognised(report):
    assert not report["overall"]["attack_scenarios_never_blocked"], report["overall"]["attack_scenarios_never_blocked"]


def test_recall_after_recognition(report):
    o = report["overall"]
    assert o["recall_after_recognition"] >= 0.95, o


def test_history_phase_warmed_the_restarted_envoy(report):
    """Before the scored traffic the benign users logged in once, the scorer
    counted their accounts and took the login baselines, and the restarted
    Envoy warmed from it; none of that traffic is scored."""
    h = report["run"]["history"]
    assert h, "no history phase"
    assert h["statuses"] == {"200": h["logins"]}, h["statuses"]
    assert h["scorer_known_accounts_added"] >= h["accounts"], h
    assert h["warm_stats"].get("abuse_filter.scorer.warm_shards", 0) >= 1, h["warm_stats"]
    assert h["warm_stats"].get("abuse_filter.baselines.learning") == 0, h["warm_stats"]
    assert "history" not in report["scenarios"]
    assert report["overall"]["unlabelled_or_unknown"] == 0, report["overall"]


def test_browser_copying_stuffing_is_recognised_and_then_refused(report):
    d = report["scenarios"]["browser_stuffing"]
    assert d["first_block_request"] is not None and d["first_block_request"] <= 200, describe(report["scenarios"], ["browser_stuffing"])
    # Refused, or (on accounts that exist, nothing specific to the attempt)
    # told `high` so the application asks for a second factor (issue 20).
    assert d["share_handled_after_first"] >= 0.95, describe(report["scenarios"], ["browser_stuffing"])


def test_real_users_log_in_during_the_browser_copying_attack(report):
    """People logging into their own accounts, and people logging in for the
    first time, while the endpoint is under attack: none refused, all in."""
    rows = report["scenarios"]
    for name in ("returning_users", "first_time_logins"):
        r, lg = rows[name], rows[name]["logins"]
        assert lg["refused"] == 0 and r["clients_blocked"] == 0, (name, lg)
        assert lg["logged_in_clients"] == r["clients"], (name, lg)
        assert lg["during_attack"] >= r["clients"] // 2, (name, "logins not made during the attack", lg)


def test_attackers_inside_the_office_are_blocked_and_the_office_is_not(report):
    rows = report["scenarios"]
    inside = rows["office_inside_attackers"]["per_client_first_block"]
    assert set(inside) == {"office_inside_attackers/ffuf-1", "office_inside_attackers/wrk-1"}, inside
    late = {c: v for c, v in inside.items() if v["first_block_request"] is None or v["first_block_request"] > 20}
    assert not late, late
    assert rows["office_nat"]["clients_blocked"] == 0 and rows["office_nat"]["requests"] > 0, describe(rows, ["office_nat"])


def test_a_carrier_nat_of_phones_is_never_blocked(report):
    r = report["scenarios"]["cgnat_phones"]
    assert r["clients"] == 120 and r["requests"] > 120 * 3, r
    assert r["blocked"] == 0, describe(report["scenarios"], ["cgnat_phones"])


def test_the_anomaly_model_learned_from_the_sample_and_scores_the_rule_evading_scraper(report):
    # Issue 14: the model warms from the batches' samples (not callouts) and
    # reports its own figures; the odd-mix scraper stays under every rule.
    # What is asserted holds for any draw. Whether the scraper's one client
    # is drawn into a sample at all depends on the per-process secret rank
    # (bottom-k of ~hundreds of clients per window: ~1 in 4 per window, so
    # in ~7 windows of the quick run it is missed in ~1 run of 8), and the
    # AUC of one client against the benign ones moves with which windows the
    # model learned from (0.945, 0.871, once below 0.75 in ~10 CI runs).
    # Neither is a property of the build: `make eval`'s report states them
    # as a target, and tests/test_model_envoy.py asserts that the model tags
    # an odd client, with fewer clients than a sample holds (every one drawn).
    m = report["overall"]["model"]
    assert m["samples_scored"] > 100, m
    row = report["scenarios"]["odd_mix_scraper"]
    assert row["requests"] > 0 and row["blocked"] == 0, describe(report["scenarios"], ["odd_mix_scraper"])
    model = row["model"]
    print("odd_mix_scraper model row:", model)
    assert model["sampled_clients"] <= 1, model
    if model["sampled_clients"] == 1:
        # Scored like every sampled client: a figure in [0, 1], and an AUC.
        assert model["max"] is not None and 0.0 <= model["max"] <= 1.0, model
        assert model["auc_vs_benign"] is not None, model
    assert report["overall"]["scorer_callouts_per_benign_request"] <= 0.01, report["overall"]
