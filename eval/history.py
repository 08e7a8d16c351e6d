"""The history phase: what a live site has and a fresh eval stack lacks.

A deployed filter restarts with its fleet's history warm in the scorer: the
accounts that ever logged in (the filter sends each new one to the scorer on
its ticks) and the login endpoint's learned baselines. A fresh eval stack
has neither, and the filter then (rightly) does not count "unknown account"
as evidence — after a cold start every first login is to an "unknown"
account — so a stuffing run that copies real browsers exactly cannot be told
from the real users. Before the scored traffic, this phase:

1. logs every benign user that logs in during the run in once, through Envoy,
   from the address and browser they will use (labelled `history/...`);
2. waits until the scorer counted them (`abuse_scorer_known_accounts_added_total`
   on its /metrics);
3. POSTs to the scorer's `/v1/events` (header `x-abuse-scorer-secret`) the
   baselines a live site has after hours of traffic — the one thing a short
   eval cannot produce: the login endpoint's (LOGIN_BASELINE) and the route
   groups' request rates (GROUP_RATES);
4. restarts Envoy (a new process: its shared data, known accounts and
   baselines are gone; the scorer and the demo API keep running), with the
   first process's logs moved aside (history.*: never scored);
5. waits until the new Envoy warmed from the scorer
   (`abuse_filter.scorer.warm_shards` >= 1 and `abuse_filter.baselines.learning` 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from clients import IDENTITIES, history_logins
from conn import Client
from harness import DemoStack, request, wait_until
from scenario import Ctx

# Hours of history of the login endpoint, as another Envoy of the fleet
# would have sent them: failure ratio 0.055 (what this benign mix's logins
# fail, measured: 5.5 %), logins to unknown accounts 5 %.
LOGIN_BASELINE = {"name": "login:/api/login", "baseline": 0.055, "unknown_baseline": 0.05,
                  "samples": 5000, "successes_seen": 5000}
# The route groups' normal request rates (requests/s; endpoint_spike judges
# against them): the benign mix's mean rate in each profile, measured on
# `--cold-start` runs. Without them the restarted Envoy would learn them from
# its own first seconds (`baselines.learning` stays > 0 for ~10 s), idle —
# a rate near 0 that every benign burst would "spike" over.
GROUP_RATES = {"quick": {"api": 120.0, "login": 8.0}, "default": {"api": 240.0, "login": 8.0}}
HISTORY_LOGINS_PER_S = 80


def history_baselines(profile: str, failure_ratio: float | None = None) -> dict:
    login = dict(LOGIN_BASELINE, **({} if failure_ratio is None else {"baseline": failure_ratio}))
    groups = [{"name": f"group:{g}", "baseline": rps, "unknown_baseline": 0.0, "samples": 5000, "successes_seen": 0}
              for g, rps in GROUP_RATES[profile].items()]
    return {"version": 1, "baselines": [login, *groups]}
SECRET_HEADER = "x-abuse-scorer-secret"
LOGS = ("envoy.log", "access.json", "access.combined.log")


async def _logins(port: int, logins, rate: float) -> dict[str, int]:
    """Each user logs in once with the right password, login i at i / rate
    seconds (on the clock), each on its own connection."""
    t0 = time.monotonic()
    statuses: dict[str, int] = {}

    async def one(i, scenario, cid, address, headers, uid):
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        c = Client(port, "history", f"{scenario}-{cid}", address, headers)
        try:
            r = await c.request("POST", "/api/login", {"username": f"user{uid:04d}", "password": f"pass-{uid:04d}"})
        finally:
            await c.close()
        key = str(r.status) if r is not None else "error"
        statuses[key] = statuses.get(key, 0) + 1

    await asyncio.gather(*(one(i, *login) for i, login in enumerate(logins)))
    return statuses


def run(stack: DemoStack, ctx: Ctx, out: Path, failure_ratio: float | None = None) -> dict:
    """The history phase on the running stack; returns what it did."""
    started = time.monotonic()
    logins = history_logins(ctx, set(IDENTITIES))
    # Interleaved: the office's hundred people do not all log in in the same
    # second (its address would meet the anonymous per-second limit).
    ctx.rng("history").shuffle(logins)
    accounts = len({uid for *_, uid in logins})
    statuses = asyncio.run(_logins(stack.port, logins, HISTORY_LOGINS_PER_S))
    logged_in = time.monotonic() - started

    metric = "abuse_scorer_known_accounts_added_total"
    known = wait_until(lambda: (v := stack.scorer.metric(metric)) >= accounts and v, 30, 0.2,
                       f"{metric} >= {accounts} on the scorer")

    secret = os.environ.get("ABUSE_SCORER_SECRET", "")
    baselines = history_baselines(ctx.profile.name, failure_ratio)
    posted = request(stack.scorer.port, "POST", "/v1/events", {SECRET_HEADER: secret}, baselines)
    if posted.status not in (200, 202, 204):
        raise RuntimeError(f"the scorer refused the history baselines: {posted.status} {posted.body[:300]!r}")

    def move_aside():
        for name in LOGS:
            if (out / name).exists():
                (out / name).replace(out / f"history.{name}")

    t_restart = time.monotonic()
    stack.restart_envoy(before_start=move_aside)
    restarted = time.monotonic() - t_restart

    def warm():
        s = stack.stats()
        ok = s.get("abuse_filter.scorer.warm_shards", 0) >= 1 and s.get("abuse_filter.baselines.learning", 1) == 0
        return ok and s

    stats = wait_until(warm, 30, 0.2, "the restarted Envoy to warm from the scorer "
                                      "(abuse_filter.scorer.warm_shards >= 1, abuse_filter.baselines.learning 0)")
    info = {
        "logins": len(logins),
        "accounts": accounts,
        "statuses": statuses,
        "login_s": round(logged_in, 2),
        "scorer_known_accounts_added": known,
        "baselines_posted": baselines["baselines"],
        "events_status": posted.status,
        "envoy_restart_s": round(restarted, 2),
        "warm_stats": {k: v for k, v in stats.items() if k.startswith(("abuse_filter.scorer.warm", "abuse_filter.baselines"))},
        "elapsed_s": round(time.monotonic() - started, 2),
    }
    (out / "history.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
