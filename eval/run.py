#!/usr/bin/env python3
"""`make eval`: detection quality on labelled traffic.

Starts the `make run` stack (demo API, scorer, Envoy with envoy/envoy.yaml
and the filter) on free ports, with two access logs added to the bootstrap,
drives benign clients and attacks at the same time (generator and real
tools), then scores every request from Envoy's JSON access log and prints a
table per scenario, the targets, and writes report.json and blocks.svg.

    .venv/bin/python eval/run.py [--quick] [--duration S] [--only benign|attacks]
                                 [--out target/eval] [--no-fail] [--no-crowdsec]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import attacks  # noqa: E402
import clients  # noqa: E402
import crowdsec  # noqa: E402
import history  # noqa: E402
import report  # noqa: E402
import tools  # noqa: E402
from bootstrap import eval_bootstrap  # noqa: E402
from harness import ROOT, demo_stack, filter_stats, free_port  # noqa: E402
from scenario import PROFILES, Ctx  # noqa: E402

ALL = clients.SCENARIOS + tools.SCENARIOS + attacks.SCENARIOS


def select(only: str | None, skip_tools: set[str]):
    chosen = []
    for s in ALL:
        if only == "benign" and s.kind != "benign":
            continue
        if only == "attacks" and s.kind != "attack":
            continue
        chosen.append(s)
    skipped = {s.name: f"{tools.REQUIRED[s.name]} not installed" for s in chosen
               if s.name in tools.REQUIRED and tools.REQUIRED[s.name] in skip_tools}
    # The stolen token needs its owner.
    names = {s.name for s in chosen}
    if "stolen_token" in names and "token_owner" not in names:
        chosen.append(next(s for s in ALL if s.name == "token_owner"))
    return [s for s in chosen if s.name not in skipped], skipped


async def drive(ctx: Ctx, scenarios) -> dict[str, str]:
    errors = {}

    async def one(s):
        try:
            await s.run(ctx)
        except Exception as e:  # a scenario's failure is reported, not fatal
            errors[s.name] = f"{type(e).__name__}: {e}"

    await asyncio.wait_for(asyncio.gather(*(one(s) for s in scenarios)), ctx.duration + 60)
    return errors


def wasm_sha256() -> str:
    import hashlib
    from harness import WASM
    return hashlib.sha256(WASM.read_bytes()).hexdigest() if WASM.exists() else "missing"


def module_sha256() -> str:
    import hashlib
    from harness import MODULE
    return hashlib.sha256(MODULE.read_bytes()).hexdigest() if MODULE.exists() else "missing"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short profile (~35 s, fewer clients) used by the tests")
    p.add_argument("--duration", type=float, help="seconds of traffic (default: 120, quick: 35)")
    p.add_argument("--only", choices=["benign", "attacks"], help="run only one kind of scenario")
    p.add_argument("--out", type=Path, default=ROOT / "target" / "eval", help="output directory (default target/eval)")
    p.add_argument("--bootstrap", type=Path, default=ROOT / "envoy" / "envoy.yaml")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--build", choices=["wasm", "module"], default=os.environ.get("ABUSE_FILTER_BUILD", "wasm"),
                   help="the filter build Envoy loads: the .wasm (default) or the dynamic module (same targets)")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when a target fails")
    p.add_argument("--no-crowdsec", action="store_true", help="skip the CrowdSec replay")
    p.add_argument("--cold-start", action="store_true",
                   help="skip the history phase: the scored traffic meets a fresh filter (nothing known, baselines cold)")
    p.add_argument("--history-failure-ratio", type=float, metavar="R",
                   help="the login endpoint's failure ratio the history phase posts (default 0.055, what the benign mix fails)")
    args = p.parse_args(argv)

    profile = PROFILES["quick" if args.quick else "default"]
    duration = args.duration or profile.duration
    if not 10 <= duration <= 1800:
        p.error("--duration must be between 10 and 1800 s")
    out = args.out.resolve()
    if out.exists():
        for f in ("access.json", "access.combined.log", "envoy.log", "report.json", "blocks.svg", "table.txt",
                  "history.json", *(f"history.{n}" for n in history.LOGS)):
            (out / f).unlink(missing_ok=True)
        shutil.rmtree(out / "tools", ignore_errors=True)
        # A fresh stack every run: the scorer keeps its state (the warm-start
        # state, the model) in this directory across restarts, and a previous
        # run's known accounts and baselines would warm this run's first Envoy.
        shutil.rmtree(out / "scorer", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    missing = {b for b in ("ffuf", "hydra", "wrk", "wget") if not tools.available(b)}
    scenarios, skipped = select(args.only, missing)

    # The scorer writes every scored sample there: the model's own figures.
    os.environ["SAMPLE_LOG"] = str(out / "scorer" / "samples.jsonl")
    port, admin = free_port(), free_port()
    make_bootstrap = lambda api_port, scorer_port: eval_bootstrap(
        args.bootstrap, out, port=port, admin_port=admin, api_port=api_port, scorer_port=scorer_port, build=args.build)
    print(f"eval: profile {profile.name}, {duration:.0f} s, {len(scenarios)} scenarios, Envoy on 127.0.0.1:{port} "
          f"(admin {admin}), output {out}", flush=True)
    with demo_stack(make_bootstrap, api_port=0, scorer_port=0, port=port, admin_port=admin,
                    log_path=out / "envoy.log", scorer_state_dir=out / "scorer") as stack:
        hist = None
        if not args.cold_start:
            print("eval: history phase (benign users log in once, baselines to the scorer, Envoy restarted warm) ...",
                  flush=True)
            hist = history.run(stack, Ctx(port=port, out_dir=out, profile=profile, duration=duration, seed=args.seed), out,
                                args.history_failure_ratio)
            print(f"eval: history: {hist['logins']} logins ({hist['statuses']}), scorer knows {hist['scorer_known_accounts_added']:.0f} "
                  f"accounts, Envoy restarted in {hist['envoy_restart_s']} s, warm {hist['warm_stats']}, "
                  f"{hist['elapsed_s']} s in all", flush=True)
        ctx = Ctx(port=port, out_dir=out, profile=profile, duration=duration, seed=args.seed)
        t_start = time.time()
        errors = asyncio.run(drive(ctx, scenarios))
        time.sleep(1.2)  # the filter flushes its counters twice a second
        stats = filter_stats(admin)
        alive = stack.running()
    if not alive:
        errors["stack"] = "a stack process died during the run (see envoy.log / scorer log)"

    meta = {s.name: {"kind": s.kind, "tool": s.tool, "what": s.what, "single_source": s.single_source,
                     "per_client": s.per_client, "told_not_blocked": s.told_not_blocked,
                     "planned_clients": s.planned_clients(profile),
                     "model_target": s.model_target, "logins_only": s.logins_only} for s in scenarios}
    result = report.analyse(out / "access.json", out / "envoy.log", meta, stats, t_start,
                            samples_log=out / "scorer" / "samples.jsonl")
    result["run"] = {"profile": profile.name, "duration_s": duration, "seed": args.seed, "bootstrap": str(args.bootstrap),
                     "started_at": t_start, "history": hist, "cold_start": args.cold_start, "envoy_port": port, "admin_port": admin, "build": args.build,
                     **({"module_sha256": module_sha256()} if args.build == "module" else {"wasm_sha256": wasm_sha256()}),
                     "skipped": skipped, "errors": errors, "notes": ctx.notes,
                     "trap": any("panicked at" in (out / f).read_text(errors="replace")
                                 for f in ("envoy.log", "history.envoy.log") if (out / f).exists())}
    if args.no_crowdsec:
        result["crowdsec"] = crowdsec.unavailable("skipped (--no-crowdsec)")
    else:
        print("eval: replaying the access log through CrowdSec ...", flush=True)
        cs = crowdsec.replay(out / "access.combined.log", out)
        if cs.get("available"):
            addrs = {}
            for rec in report.load_requests(out / "access.json"):
                addrs.setdefault(rec.scenario, set()).add(rec.xff)
            cs["per_scenario"] = crowdsec.per_scenario(cs, {n: sorted(a) for n, a in addrs.items() if n in meta})
        result["crowdsec"] = cs
    report.write(result, out, duration)
    print()
    print(report.table(result))
    for name, why in {**skipped, **errors}.items():
        print(f"NOTE  {name}: {why}")
    print(f"\nwrote {out / 'report.json'}, {out / 'blocks.svg'}")
    failed = [t for t in result["targets"] if not t["pass"]] or errors
    return 1 if failed and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
