"""From Envoy's JSON access log (the ground truth for every request, the
tools' included) to per-scenario metrics, the targets, a text table, JSON
and an SVG chart of blocks over time."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# Targets (issue 5).
SINGLE_SOURCE_MAX_REQUESTS = 20
DISTRIBUTED_MAX_ATTEMPTS = 200
DISTRIBUTED_MIN_LATER_SHARE = 0.95
MIN_RECALL_AFTER = 0.95
# Distributed harvest of a private object route (issue 23).
HARVEST = "distributed_harvest"
HARVEST_MAX_REQUESTS = 300
HARVEST_MIN_LATER_SHARE = 0.80
# The anomaly model's tag on benign clients (issue 23): a risk header on more
# than this share of real users is noise the application learns to ignore.
MAX_BENIGN_TAGGED_ANOMALY = 0.01
# Distributed stuffing targets, per scenario.
DISTRIBUTED = ("distributed_stuffing", "browser_stuffing", "disguised_stuffing", "disguised_combo_list",
               "disguised_site_names")
# Label prefix of the history phase (eval/history.py): never scored.
HISTORY = "history"


@dataclass
class Req:
    t: float
    scenario: str
    client: str
    status: int
    upstream: bool
    blocked: bool
    xff: str
    method: str
    path: str
    ua: str | None = None
    login_risk: str | None = None  # x-abuse-login-risk the filter sent upstream (request-level evidence)
    abuse: str | None = None       # the filter's decision for the access log (action=... score=... reasons=...)

    @property
    def agent(self) -> str | None:
        """The filter's tag of the user agent (FNV-1a, `engine/src/identity.rs`
        agent_tag), as its block log lines name it; None without one."""
        return agent_tag(self.ua) if self.ua is not None else None

    @property
    def login(self) -> bool:
        return self.method == "POST" and self.path.split("?")[0] == "/api/login"


def agent_tag(user_agent: str) -> str:
    h = 0x811C9DC5
    for b in user_agent.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return f"{h:08x}"


def _missing(v) -> bool:
    return v in (None, "", "-")


def filter_blocked(rec: dict) -> bool:
    """The filter answered this request. Envoy logs no response-code details
    for a proxy-wasm local reply (send_http_response passes none), while an
    upstream answer is `via_upstream` and Envoy's own replies name their cause
    (`route_not_found`, `upstream_reset_...`). The filter's replies carry
    `retry-after` and are 403 or 429; this holds both for requests refused
    before the upstream and for upstream answers the filter replaced (a
    takeover's 200, a stuffer's 401 - the upstream was reached, details are
    empty, the upstream never sends retry-after). The dynamic-module build's
    replies name themselves: details `abuse_filter`."""
    status = int(rec.get("status") or 0)
    details = rec.get("details")
    return (status in (403, 429) and (_missing(details) or details == "abuse_filter")
            and not _missing(rec.get("retry_after")))


def load_requests(path: Path, history: bool = False) -> list[Req]:
    """The labelled requests of the log; the history phase's only when `history`."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        label = rec.get("label")
        if _missing(label) or "/" not in label:
            continue
        scenario, _, client = label.partition("/")
        if (scenario == HISTORY) != history:
            continue
        opt = lambda k: None if _missing(rec.get(k)) else rec.get(k)
        out.append(Req(float(rec["t"]), scenario, label, int(rec.get("status") or 0), not _missing(rec.get("upstream")),
                       filter_blocked(rec), rec.get("xff") or "", rec.get("method") or "", rec.get("path") or "",
                       opt("ua"), opt("login_risk"), opt("abuse")))
    out.sort(key=lambda r: r.t)
    return out


def block_reasons(envoy_log: Path) -> dict[tuple[str, str | None], dict[str, int]]:
    """Block decisions per client from the filter's log lines — a client is
    its address and its user agent's tag (`client.key_by_user_agent`, on in
    the shipped config; the line's `agent`, null without a user agent):
    {(address, agent): {reason: count}}."""
    out: dict[tuple[str, str | None], dict[str, int]] = {}
    if not envoy_log.exists():
        return out
    for line in envoy_log.read_text(errors="replace").splitlines():
        m = re.search(r'(\{.*"event":"block".*\})', line)
        if not m:
            continue
        try:
            ev = json.loads(m.group(1))
        except ValueError:
            continue
        reasons = out.setdefault((ev.get("client", ""), ev.get("agent")), {})
        for r in ev.get("reasons", []):
            reasons[r] = reasons.get(r, 0) + 1
    return out


def stepped_up(r: Req) -> bool:
    """A login that reached the application marked `high` (second factor)."""
    return r.login and not r.blocked and (r.login_risk or "").startswith("high")


def scenario_metrics(reqs: list[Req], kind: str, t_start: float, reasons_by_addr: dict) -> dict:
    n = len(reqs)
    blocked = [r for r in reqs if r.blocked]
    clients = {r.client for r in reqs}
    addresses = sorted({r.xff for r in reqs if r.xff})
    first = next((i for i, r in enumerate(reqs) if r.blocked), None)
    after = reqs[first + 1:] if first is not None else []
    reasons: dict[str, int] = {}
    shed: dict[tuple, list[Req]] = {}
    for r in blocked:
        shed.setdefault((r.xff, r.agent), []).append(r)
    for key in sorted({(r.xff, r.agent) for r in reqs if r.xff}, key=str):
        logged = reasons_by_addr.get(key, {})
        for k, v in logged.items():
            reasons[k] = reasons.get(k, 0) + v
        if logged:
            continue
        # A client with no block line: shed requests (rate_limit's default
        # action) log none; their access-log decision names the reason.
        for r in shed.get(key, []):
            m = re.search(r"reasons=(\S*)", r.abuse or "")
            for k in filter(None, (m.group(1) if m else "").split(",")):
                reasons[k] = reasons.get(k, 0) + 1
    statuses: dict[str, int] = {}
    for r in reqs:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {
        "kind": kind,
        "clients": len(clients),
        "addresses": len(addresses),
        "requests": n,
        "reached_upstream": sum(r.upstream for r in reqs),
        "blocked": len(blocked),
        "first_block_request": None if first is None else first + 1,
        "first_block_s": None if first is None else round(reqs[first].t - reqs[0].t, 2),
        "first_block_at_s": None if first is None else round(reqs[first].t - t_start, 2),
        "started_at_s": round(reqs[0].t - t_start, 2) if reqs else None,
        "after_first_block": len(after),
        "blocked_after_first_block": sum(r.blocked for r in after),
        "share_blocked_after_first": (sum(r.blocked for r in after) / len(after)) if after else None,
        # Refused, or let through to the application told `high` (a login it
        # then steps up to a second factor): during an attack an attempt on
        # an account that exists, with nothing specific to it, is told, not
        # refused, since an owner's new phone looks the same (docs/security.md).
        "stepped_up_after_first": sum(1 for r in after if stepped_up(r)),
        "share_handled_after_first": (sum(r.blocked or stepped_up(r) for r in after) / len(after)) if after else None,
        "clients_blocked": len({r.client for r in blocked}),
        "blocked_clients": sorted({r.client for r in blocked})[:20],
        "statuses": dict(sorted(statuses.items())),
        "block_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "per_client_first_block": per_client_first_block(reqs),
        "logins": login_metrics(reqs, reasons_by_addr),
    }


def per_client_first_block(reqs: list[Req]) -> dict[str, dict]:
    """For rows of few clients (at most 8): each client's requests and the
    1-based index of its first blocked one."""
    clients = sorted({r.client for r in reqs})
    if len(clients) > 8:
        return {}
    out = {}
    for c in clients:
        mine = [r for r in reqs if r.client == c]
        fb = next((i for i, r in enumerate(mine) if r.blocked), None)
        out[c] = {"requests": len(mine), "blocked": sum(r.blocked for r in mine),
                  "first_block_request": None if fb is None else fb + 1}
    return out


REFUSE_AT = 4  # credential_stuffing.distributed.refuse_at (default, as shipped)


def risk_score(login_risk: str | None) -> int:
    """The score of an x-abuse-login-risk value (`high; score=4; reasons=...`), -1 without one."""
    for part in (login_risk or "").split("; "):
        if part.startswith("score="):
            try:
                return int(part.removeprefix("score="))
            except ValueError:
                break
    return -1


# The account profile's reasons in x-abuse-login-risk (detectors/login_profile.rs).
PROFILE_REASONS = ["new_country", "impossible_travel", "anonymous_source", "failures_elsewhere", "new_network",
                   "new_device"]
TAKEOVER_MIN_SIGNALLED = 0.9


def profile_signals(logins: list[Req]) -> dict:
    """What the application was told about the logins that reached it:
    how many it was told were `high` (a second factor asked), and per
    profile reason how many logins carried it."""
    reached = [r for r in logins if not r.blocked]
    per_reason = {}
    for name in PROFILE_REASONS:
        n = sum(1 for r in reached if r.login_risk and name in r.login_risk.split("reasons=")[-1].split(","))
        if n:
            per_reason[name] = n
    return {"attempts": len(logins), "refused": len(logins) - len(reached), "reached": len(reached),
            "high": sum(1 for r in reached if (r.login_risk or "").startswith("high")), "per_reason": per_reason}


def login_metrics(reqs: list[Req], reasons_by_addr: dict) -> dict | None:
    """The row's login attempts: statuses, how many were made while the
    endpoint was under attack (the filter says so in x-abuse-login-risk, which
    the access log records), refused ones with the filter's reasons, and the
    first attempt made under attack. None when the row made no login."""
    logins = [r for r in reqs if r.login]
    if not logins:
        return None
    statuses: dict[str, int] = {}
    levels: dict[str, int] = {}
    for r in logins:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        level = (r.login_risk or "none").split(";")[0]
        levels[level] = levels.get(level, 0) + 1
    under = [i for i, r in enumerate(logins) if (r.login_risk and "endpoint_under_attack" in r.login_risk)
             or (r.blocked and not r.login_risk)]
    refused = [r for r in logins if r.blocked]
    first_refused = next((i for i, r in enumerate(logins) if r.blocked), len(logins))
    before = logins[:first_refused]
    scores: dict[str, int] = {}
    for r in logins:
        if r.login_risk and not r.blocked:
            k = str(risk_score(r.login_risk))
            scores[k] = scores.get(k, 0) + 1
    return {
        "attempts": len(logins),
        "statuses": dict(sorted(statuses.items())),
        "succeeded": sum(r.status == 200 for r in logins),
        # The demo API asks a login the filter marks `high` for a second factor (202).
        "stepped_up": sum(r.status == 202 for r in logins),
        "stepped_up_clients": len({r.client for r in logins if r.status == 202}),
        "logged_in_clients": len({r.client for r in logins if r.status == 200}),
        "during_attack": len(under),
        "first_under_attack_attempt": under[0] + 1 if under else None,
        "risk_levels": dict(sorted(levels.items())),
        # Attempts that reached the upstream, by the score their login-risk
        # header gave (refused attempts send none).
        "upstream_scores": dict(sorted(scores.items())),
        "before_first_refusal": len(before),
        # ... of which already scored refuse_at (4) by their login-risk header:
        # attributable, not yet refused (the endpoint was not under attack).
        "before_first_refusal_attributable": sum(risk_score(r.login_risk) >= REFUSE_AT for r in before),
        "profile": profile_signals(logins),
        "refused": len(refused),
        "refused_clients": len({r.client for r in refused}),
        "refused_detail": [{"client": r.client, "xff": r.xff, "status": r.status, "login_risk": r.login_risk,
                            "decision": r.abuse, "block_reasons": reasons_by_addr.get((r.xff, r.agent), {})}
                           for r in refused[:10]],
    }


def auc(benign: list[float], attack: list[float]) -> float | None:
    """Probability that an attack client scores above a benign one (ties
    half): the Mann-Whitney AUC, None without both kinds."""
    if not benign or not attack:
        return None
    ranked = sorted([(v, 0) for v in benign] + [(v, 1) for v in attack])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mid = (i + j + 1) / 2  # 1-based average rank of the tie group
        rank_sum += mid * sum(1 for k in range(i, j) if ranked[k][1] == 1)
        i = j
    n1 = len(attack)
    return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * len(benign))


def anomaly_flagged(r: Req) -> bool:
    """The filter's decision for this request names the model's reason."""
    m = re.search(r"reasons=(\S*)", r.abuse or "")
    return bool(m) and "anomaly" in m.group(1).split(",")


def model_metrics(samples_log: Path | None, by: dict[str, list[Req]], kinds: dict[str, str], t_start: float) -> dict:
    """The anomaly model's own figures, from the scorer's --sample-log: per
    scenario the sampled clients' anomaly (each client's mean over the run), the AUC of each attack scenario's clients against all benign
    clients, and the clients the model got tagged."""
    owners: dict[tuple[str, str | None], set[str]] = {}
    for name, reqs in by.items():
        for r in reqs:
            owners.setdefault((r.xff, r.agent), set()).add(name)
    scores: dict[str, dict] = {name: {} for name in by}
    lines = ambiguous = 0
    if samples_log and samples_log.exists():
        for line in samples_log.read_text(errors="replace").splitlines():
            try:
                s = json.loads(line)
            except ValueError:
                continue
            if s.get("t_ms", 0) < t_start * 1000:
                continue  # the history phase
            if s.get("anomaly") is None:
                continue  # its model was warming: learned, not scored
            lines += 1
            addr, _, tag = s["client"].partition("#")
            names = owners.get((addr, tag or None), set())
            if len(names) != 1:
                ambiguous += 1  # a shared address (office NAT, carrier NAT) or unlabelled
                continue
            name = next(iter(names))
            scores[name].setdefault(s["client"], []).append(float(s["anomaly"]))
    # A client's anomaly: the mean of its samples (the max would favour the
    # clients sampled most often, i.e. the long-lived benign ones).
    scores = {n: {c: sum(v) / len(v) for c, v in cs.items()} for n, cs in scores.items()}
    benign = [v for n, c in scores.items() if kinds[n] == "benign" for v in c.values()]
    per = {}
    for name, clients in scores.items():
        vals = sorted(clients.values())
        flagged = {r.client for r in by[name] if anomaly_flagged(r)}
        per[name] = {
            "sampled_clients": len(vals),
            "median": round(vals[len(vals) // 2], 3) if vals else None,
            "max": round(vals[-1], 3) if vals else None,
            "share_at_least_half": round(sum(v >= 0.5 for v in vals) / len(vals), 3) if vals else None,
            "auc_vs_benign": (None if kinds[name] != "attack" else
                              (lambda a: None if a is None else round(a, 3))(auc(benign, vals))),
            "clients_tagged_anomaly": len(flagged),
        }
    return {"samples_scored": lines, "samples_unattributed": ambiguous, "per_scenario": per}


def analyse(access_json: Path, envoy_log: Path, scenarios: dict[str, dict], stats: dict, t_start: float,
            samples_log: Path | None = None) -> dict:
    """scenarios: name -> {kind, tool, what, single_source}."""
    reqs = load_requests(access_json)
    by: dict[str, list[Req]] = {name: [] for name in scenarios}
    unknown = 0
    for r in reqs:
        if r.scenario in by:
            by[r.scenario].append(r)
        else:
            unknown += 1
    reasons_by_addr = block_reasons(envoy_log)
    rows = {}
    for name, meta in scenarios.items():
        picked = by[name]
        if meta.get("logins_only"):
            # The disguise's page views are not attempts: scored apart.
            pages = [r for r in picked if not r.login]
            picked = [r for r in picked if r.login]
        m = scenario_metrics(picked, meta["kind"], t_start, reasons_by_addr)
        rows[name] = {**meta, **m}
        if meta.get("logins_only"):
            rows[name]["page_views"] = len(pages)
            rows[name]["page_views_blocked"] = sum(r.blocked for r in pages)

    attack = [n for n, r in rows.items() if r["kind"] == "attack"]
    benign = [n for n, r in rows.items() if r["kind"] == "benign"]
    blocked_attack = sum(rows[n]["blocked"] for n in attack)
    blocked_all = sum(r["blocked"] for r in rows.values())
    after = sum(rows[n]["after_first_block"] for n in attack)
    after_blocked = sum(rows[n]["blocked_after_first_block"] for n in attack)
    attack_requests = sum(rows[n]["requests"] for n in attack)
    benign_requests = sum(rows[n]["requests"] for n in benign)
    callouts = stats.get("abuse_filter.scorer.callouts_sent", 0)
    overall = {
        "requests": len(reqs),
        "unlabelled_or_unknown": unknown,
        "attack_requests": attack_requests,
        "benign_requests": benign_requests,
        "blocked": blocked_all,
        "blocked_attack": blocked_attack,
        "precision": blocked_attack / blocked_all if blocked_all else None,
        "recall_after_recognition": after_blocked / after if after else None,
        "recall_after_recognition_counts": [after_blocked, after],
        "recall_all_attack_requests": blocked_attack / attack_requests if attack_requests else None,
        "attack_scenarios_never_blocked": [n for n in attack if rows[n]["requests"] and rows[n]["blocked"] == 0
                                           and not rows[n].get("told_not_blocked")
                                           and not rows[n].get("model_target")],
        "benign_clients": sum(rows[n]["clients"] for n in benign),
        "benign_clients_blocked": sum(rows[n]["clients_blocked"] for n in benign),
        "scorer_callouts": callouts,
        "scorer_callouts_per_benign_request": callouts / benign_requests if benign_requests else None,
        "scorer": {k.removeprefix("abuse_filter.scorer."): v for k, v in stats.items() if k.startswith("abuse_filter.scorer.")},
    }
    model = model_metrics(samples_log, by, {n: r["kind"] for n, r in rows.items()}, t_start)
    for name, m in model["per_scenario"].items():
        rows[name]["model"] = m
    overall["model"] = {k: v for k, v in model.items() if k != "per_scenario"}
    overall["benign_clients_tagged_anomaly"] = sum(model["per_scenario"][n]["clients_tagged_anomaly"] for n in benign)
    overall["benign_tagged_anomaly_share"] = (overall["benign_clients_tagged_anomaly"] / overall["benign_clients"]
                                              if overall["benign_clients"] else None)
    targets = check_targets(rows, overall)
    series = {name: [round(r.t - t_start, 3) for r in by[name] if r.blocked] for name in scenarios}
    return {"scenarios": rows, "overall": overall, "targets": targets, "filter_stats": stats, "block_series": series}


def check_targets(rows: dict, overall: dict) -> list[dict]:
    targets = []
    benign_blocked = {n: r["blocked_clients"] for n, r in rows.items() if r["kind"] == "benign" and r["clients_blocked"]}
    targets.append({
        "target": "no benign client blocked",
        "pass": not benign_blocked and overall["benign_clients"] > 0,
        "detail": "; ".join(f"{n}: {rows[n]['clients_blocked']}/{rows[n]['clients']} clients, {rows[n]['blocked']} requests "
                            f"(reasons {rows[n]['block_reasons'] or '?'})" for n in benign_blocked) or
                  f"0 of {overall['benign_clients']} benign clients",
    })
    for n, r in rows.items():
        if r["kind"] != "attack" or not r.get("single_source"):
            continue
        fb = r["first_block_request"]
        ok = fb is not None and fb <= SINGLE_SOURCE_MAX_REQUESTS
        detail = (f"never blocked in {r['requests']} requests" if fb is None else
                  f"first block at request {fb} after {r['first_block_s']} s ({', '.join(r['block_reasons']) or '?'})")
        if n == "low_and_slow":
            detail += (f"; {r['requests']} attempts, {r['reached_upstream']} reached the upstream, "
                       f"statuses {r['statuses']}")
        targets.append({"target": f"{n}: blocked within {SINGLE_SOURCE_MAX_REQUESTS} requests", "pass": ok, "detail": detail})
    for n, r in rows.items():
        if r["kind"] != "attack" or not r.get("per_client"):
            continue
        for client, c in r["per_client_first_block"].items():
            fb = c["first_block_request"]
            targets.append({
                "target": f"{client}: blocked within {SINGLE_SOURCE_MAX_REQUESTS} of its requests",
                "pass": fb is not None and fb <= SINGLE_SOURCE_MAX_REQUESTS,
                "detail": (f"never blocked in {c['requests']} requests" if fb is None else
                           f"first block at its request {fb} of {c['requests']} ({c['blocked']} blocked)"),
            })
    for name in DISTRIBUTED:
        d = rows.get(name)
        if not d or not d["requests"]:
            continue
        fb, share = d["first_block_request"], d["share_handled_after_first"]
        lg = d.get("logins") or {}
        seen = lg.get("first_under_attack_attempt")
        missed = {k: v for k, v in (lg.get("upstream_scores") or {}).items()}
        targets.append({
            "target": f"{name}: recognised within {DISTRIBUTED_MAX_ATTEMPTS} attempts",
            "pass": fb is not None and fb <= DISTRIBUTED_MAX_ATTEMPTS,
            "detail": (f"first block at attempt {fb} of {d['requests']}" if fb else f"never blocked in {d['requests']} attempts")
                      + (f"; endpoint under attack from its attempt {seen} on (x-abuse-login-risk)" if seen else "")
                      + (f"; before it, {lg['before_first_refusal_attributable']} of {lg['before_first_refusal']} "
                         f"attempts already scored >= {REFUSE_AT}" if fb and lg else ""),
        })
        targets.append({
            "target": f"{name}: >= {DISTRIBUTED_MIN_LATER_SHARE:.0%} of later attempts blocked or stepped up",
            "pass": share is not None and share >= DISTRIBUTED_MIN_LATER_SHARE,
            "detail": ("n/a" if share is None else f"{d['blocked_after_first_block']} blocked + {d['stepped_up_after_first']} "
                       f"stepped up of {d['after_first_block']} = {share:.1%}")
                      + (f"; attempts that reached the upstream by login-risk score: {missed}" if missed else ""),
        })
    h = rows.get(HARVEST)
    if h and h["requests"]:
        fb, share = h["first_block_request"], h["share_handled_after_first"]
        targets.append({
            "target": f"{HARVEST}: recognised within {HARVEST_MAX_REQUESTS} harvest requests",
            "pass": fb is not None and fb <= HARVEST_MAX_REQUESTS,
            "detail": f"first refusal at request {fb} of {h['requests']}" if fb else f"never refused in {h['requests']} requests",
        })
        targets.append({
            "target": f"{HARVEST}: >= {HARVEST_MIN_LATER_SHARE:.0%} of later harvest requests refused",
            "pass": share is not None and share >= HARVEST_MIN_LATER_SHARE,
            "detail": "n/a" if share is None else f"{h['blocked_after_first_block']} of {h['after_first_block']} = {share:.1%}",
        })
    for name, what in (("returning_users", "real users logging into their own accounts during the attack"),
                       ("first_time_logins", "first-time logins during the attack")):
        r = rows.get(name)
        if not r or not r["requests"]:
            continue
        lg = r.get("logins") or {"attempts": 0, "refused": 0, "during_attack": 0, "statuses": {}, "refused_detail": []}
        why = "; ".join(f"{x['client']} {x['status']} risk={x['login_risk']} decision={x['decision']} "
                        f"reasons={x['block_reasons'] or '?'}" for x in lg["refused_detail"][:3])
        targets.append({
            "target": f"{name}: 0 refused ({what})",
            "pass": lg["refused"] == 0 and r["clients_blocked"] == 0,
            "detail": (f"{lg['refused']} of {lg['attempts']} logins refused ({r['clients_blocked']}/{r['clients']} people "
                       f"blocked at all); {lg['during_attack']} logins made while the endpoint was under attack; "
                       f"{lg.get('stepped_up_clients', 0)} people asked for a second factor; "
                       f"{lg.get('logged_in_clients', 0)}/{r['clients']} logged in; statuses {lg['statuses']}") + (f"; refused: {why}" if why else ""),
        })
    takeover, owners = rows.get("valid_credential_takeover"), rows.get("account_owners")
    if takeover and takeover["requests"]:
        p = (takeover.get("logins") or {}).get("profile") or {"attempts": 0, "refused": 0, "reached": 0, "high": 0,
                                                              "per_reason": {}}
        stopped = p["refused"] + p["high"]
        share = stopped / p["attempts"] if p["attempts"] else None
        targets.append({
            "target": f"valid_credential_takeover: >= {TAKEOVER_MIN_SIGNALLED:.0%} of takeovers stopped or signalled high",
            "pass": share is not None and share >= TAKEOVER_MIN_SIGNALLED,
            "detail": ("n/a" if share is None else
                       f"{stopped}/{p['attempts']} = {share:.0%}: {p['refused']} refused by the filter (during the "
                       f"stuffing attack: unlike the owner), {p['high']} of {p['reached']} that reached the application "
                       f"told high (a second factor asked); told per reason {p['per_reason']}"),
        })
    if owners and owners["requests"]:
        p = (owners.get("logins") or {}).get("profile") or {"reached": 0, "high": 0, "per_reason": {}}
        targets.append({
            "target": "account_owners: 0 real logins signalled high (false alarms)",
            "pass": p["high"] == 0 and owners["clients_blocked"] == 0,
            "detail": f"{p['high']} of {p['reached']} logins told high; told per reason {p['per_reason']}; "
                      f"{owners['clients_blocked']} of {owners['clients']} blocked",
        })
    for name, attackers in (("office_nat", "office_inside_attackers"), ("cgnat_phones", None)):
        r = rows.get(name)
        if not r or not r["requests"]:
            continue
        inside = rows.get(attackers) if attackers else None
        extra = (f" while {attackers} worked from its address ({inside['blocked']} of their {inside['requests']} "
                 f"requests blocked)") if inside and inside["requests"] else ""
        targets.append({
            "target": f"{name}: 0 blocked",
            "pass": r["clients_blocked"] == 0,
            "detail": f"{r['clients_blocked']} of {r['clients']} people blocked, {r['blocked']} of {r['requests']} "
                      f"requests{extra}" + (f" (reasons {r['block_reasons']})" if r["blocked"] else ""),
        })
    for n, r in rows.items():
        if r["kind"] != "attack" or not r.get("model_target") or not r["requests"]:
            continue
        m = r.get("model") or {}
        flagged = m.get("clients_tagged_anomaly", 0) + r["clients_blocked"]
        targets.append({
            "target": f"{n}: flagged by the anomaly model (tag or block through the scorer), under every rule",
            "pass": m.get("clients_tagged_anomaly", 0) > 0,
            "detail": (f"{m.get('clients_tagged_anomaly', 0)}/{r['clients']} clients tagged `anomaly`, {flagged} flagged in "
                       f"all; anomaly max {m.get('max')}, AUC vs benign {m.get('auc_vs_benign')}; rules blocked "
                       f"{r['blocked']} requests ({', '.join(r['block_reasons']) or 'none'}); benign clients tagged "
                       f"`anomaly`: {overall.get('benign_clients_tagged_anomaly', 0)}"),
        })
    if overall["benign_clients"] and overall.get("model", {}).get("samples_scored"):
        share = overall["benign_tagged_anomaly_share"]
        tagged_by = {n: (r.get("model") or {}).get("clients_tagged_anomaly", 0) for n, r in rows.items()
                     if r["kind"] == "benign" and (r.get("model") or {}).get("clients_tagged_anomaly", 0)}
        targets.append({
            "target": f"benign clients tagged `anomaly` <= {MAX_BENIGN_TAGGED_ANOMALY:.0%}",
            "pass": share is not None and share <= MAX_BENIGN_TAGGED_ANOMALY,
            "detail": f"{overall['benign_clients_tagged_anomaly']} of {overall['benign_clients']} = {share:.1%}"
                      + (f" ({', '.join(f'{n} {c}' for n, c in sorted(tagged_by.items(), key=lambda x: -x[1]))})"
                         if tagged_by else ""),
        })
    if not any(r["kind"] == "attack" for r in rows.values()):
        return targets
    rec = overall["recall_after_recognition"]
    a, b = overall["recall_after_recognition_counts"]
    never = overall["attack_scenarios_never_blocked"]
    targets.append({
        "target": "every attack scenario blocked at least once",
        "pass": not never,
        "detail": f"never blocked: {', '.join(never)}" if never else "all were",
    })
    targets.append({
        "target": f"overall recall after recognition >= {MIN_RECALL_AFTER:.0%}",
        "pass": rec is not None and rec >= MIN_RECALL_AFTER,
        "detail": ("n/a" if rec is None else f"{a}/{b} = {rec:.1%}") +
                  f"; recall on all attack requests {overall['recall_all_attack_requests']:.1%}",
    })
    return targets


def _fmt(v, pct=False):
    if v is None:
        return "-"
    if pct:
        return f"{v:.1%}"
    return str(v)


def table(report: dict) -> str:
    cs = report.get("crowdsec", {})
    cols = ["scenario", "kind", "tool", "clients", "requests", "upstream", "blocked", "1st blk req", "1st blk s",
            "blk after 1st", "clients blk", "crowdsec", "model AUC", "anomaly med/max", "tagged anom", "reasons"]
    lines = []
    for name, r in report["scenarios"].items():
        crowd = "n/a"
        if cs.get("available"):
            f = cs.get("per_scenario", {}).get(name, {})
            crowd = f"{f.get('flagged', 0)}/{f.get('addresses', 0)}"
        lines.append([name, r["kind"], r["tool"], str(r["clients"]), str(r["requests"]), str(r["reached_upstream"]),
                      str(r["blocked"]), _fmt(r["first_block_request"]), _fmt(r["first_block_s"]),
                      _fmt(r["share_blocked_after_first"], pct=True), f"{r['clients_blocked']}/{r['clients']}", crowd,
                      _fmt((r.get("model") or {}).get("auc_vs_benign")),
                      f"{_fmt((r.get('model') or {}).get('median'))}/{_fmt((r.get('model') or {}).get('max'))}",
                      f"{(r.get('model') or {}).get('clients_tagged_anomaly', 0)}/{(r.get('model') or {}).get('sampled_clients', 0)}",
                      ",".join(r["block_reasons"]) or "-"])
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    fmt = lambda row: "  ".join(v.ljust(w) if i in (0, 1, 2, 15) else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
    out = [fmt(l).rstrip() for l in [cols, ["-" * w for w in widths], *lines]]
    o = report["overall"]
    out.append("")
    out.append(f"requests {o['requests']} (attack {o['attack_requests']}, benign {o['benign_requests']}); "
               f"blocked {o['blocked']} (attack {o['blocked_attack']})")
    out.append(f"precision {_fmt(o['precision'], True)}   recall after recognition {_fmt(o['recall_after_recognition'], True)} "
               f"({o['recall_after_recognition_counts'][0]}/{o['recall_after_recognition_counts'][1]})   "
               f"recall on all attack requests {_fmt(o['recall_all_attack_requests'], True)}")
    cpr = o["scorer_callouts_per_benign_request"]
    out.append(f"scorer callouts {o['scorer_callouts']} ({'-' if cpr is None else f'{cpr:.4f}'} per benign request); "
               + ", ".join(f"{k} {v}" for k, v in o["scorer"].items() if k in ("answered", "failed", "timed_out", "cache_hits", "coalesced")))
    mo = o.get("model") or {}
    out.append(f"anomaly model: {mo.get('samples_scored', 0)} samples scored in the run "
               f"({mo.get('samples_unattributed', 0)} on shared or unlabelled addresses, not attributed); "
               f"benign clients tagged `anomaly`: {o.get('benign_clients_tagged_anomaly', 0)}; "
               f"'model AUC' = attack clients' mean anomaly vs all benign clients'; 'tagged anom' = tagged/sampled clients")
    run = report.get("run") or {}
    h = run.get("history")
    if h:
        out.append(f"history phase (not scored): {h['logins']} logins of {h['accounts']} accounts {h['statuses']}, scorer "
                   f"knew {h['scorer_known_accounts_added']:.0f}; baselines posted "
                   + ", ".join(f"{b['name']} {b['baseline']}/{b['unknown_baseline']} ({b['samples']} samples)"
                               for b in h["baselines_posted"])
                   + f"; Envoy restarted, warm {h['warm_stats']}; {h['elapsed_s']} s")
    elif run.get("cold_start"):
        out.append("history phase skipped (--cold-start): the scored traffic met a fresh filter")
    if not cs.get("available"):
        out.append(f"crowdsec: not available ({cs.get('reason', 'not run')})")
    else:
        per = cs.get("per_scenario", {})
        kinds = {n: r["kind"] for n, r in report["scenarios"].items()}
        benign = [f"{n} {v['flagged']}/{v['addresses']}" for n, v in per.items() if kinds.get(n) == "benign" and v["flagged"]]
        out.append(f"crowdsec: {cs.get('alerts', 0)} alerts on {len(cs.get('flagged', {}))} addresses "
                   f"({cs.get('version', '')}, stock nginx parser + base HTTP scenarios, {cs.get('elapsed_s', '?')} s replay); "
                   f"benign addresses flagged: {', '.join(benign) or 'none'}")
    out.append("")
    for t in report["targets"]:
        out.append(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['detail']}")
    return "\n".join(out)


COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d"]


def svg(report: dict, duration: float) -> str:
    """Cumulative blocked requests over time, one line per scenario with
    blocks (log scale on y: floods and single probes on one chart)."""
    import math
    series = {n: s for n, s in report["block_series"].items() if s}
    W, H, L, R, T, B = 900, 480, 60, 250, 30, 45
    pw, ph = W - L - R, H - T - B
    ymax = max([len(s) for s in series.values()] + [1])
    ytop = math.log10(ymax + 1)
    xmax = max([duration] + [s[-1] for s in series.values()])
    x = lambda t: L + pw * max(0.0, t) / xmax
    y = lambda n: T + ph - ph * math.log10(n + 1) / ytop
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{L}" y="18" font-size="13">Cumulative requests blocked by the filter, per scenario</text>',
             f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="black"/>',
             f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="black"/>']
    step = 10 if xmax <= 60 else 20
    for t in range(0, int(xmax) + 1, step):
        parts.append(f'<line x1="{x(t):.1f}" y1="{T + ph}" x2="{x(t):.1f}" y2="{T + ph + 4}" stroke="black"/>'
                     f'<text x="{x(t):.1f}" y="{T + ph + 16}" text-anchor="middle">{t}</text>')
    parts.append(f'<text x="{L + pw / 2}" y="{H - 8}" text-anchor="middle">seconds since the start of the run</text>')
    k = 0
    while 10 ** k <= ymax * 10:
        v = 10 ** k
        if v <= ymax * 1.01 or k == 0:
            parts.append(f'<line x1="{L - 4}" y1="{y(v):.1f}" x2="{L + pw}" y2="{y(v):.1f}" stroke="#ddd"/>'
                         f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v}</text>')
        k += 1
    parts.append(f'<text x="14" y="{T + ph / 2}" transform="rotate(-90 14 {T + ph / 2})" text-anchor="middle">'
                 f'blocked requests (cumulative, log)</text>')
    for i, (name, times) in enumerate(sorted(series.items())):
        color = COLORS[i % len(COLORS)]
        kind = report["scenarios"][name]["kind"]
        pts = [(x(times[0]), y(0))]
        for n, t in enumerate(times, 1):
            pts.append((x(t), y(n - 1)))
            pts.append((x(t), y(n)))
        pts.append((x(xmax), y(len(times))))
        # Thin out very long series (a flood) for a small file.
        if len(pts) > 2000:
            stride = len(pts) // 1000
            pts = pts[::stride] + [pts[-1]]
        dash = ' stroke-dasharray="5,3"' if kind == "benign" else ""
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6"{dash} points="'
                     + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        ly = T + 14 * i + 8
        parts.append(f'<line x1="{L + pw + 12}" y1="{ly}" x2="{L + pw + 32}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>'
                     f'<text x="{L + pw + 36}" y="{ly + 4}">{name} ({kind}, {len(times)})</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write(report: dict, out_dir: Path, duration: float):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "blocks.svg").write_text(svg(report, duration))
    (out_dir / "table.txt").write_text(table(report) + "\n")
