#!/usr/bin/env python3
"""`make bench-scorer`: the scoring service's throughput and latency.

Starts the scorer (release build) pinned to CPU 0, in memory and then with a
real redis-server (pinned with it), and drives `POST /v1/score` with wrk
pinned to CPU 1: 32 connections, a realistic borderline feature summary,
usernames and sessions varying per request so the fleet state really works.
Before that, the model learns from `POST /v1/events` tick batches of 64
feature samples (the filters' sample of their clients, see
scorer/src/models.rs), also driven by wrk: the "samples" row counts
batches/s, and scored vectors/s per core = 64 x that (the scorer is pinned
to one CPU; each sample is scored by two models, `all` and its group's, and
learned). The score rows then run against the warm model.
Prints requests/s, p50 and p99 for each; writes target/bench/scorer.json.
A measurement, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import ROOT, Redis, Scorer  # noqa: E402

SECRET = "bench-secret"

WRK_SCRIPT = r"""
local n = 0
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["x-abuse-scorer-secret"] = "%s"
request = function()
  n = n + 1
  local body = string.format('{"version":1,"client":"10.9.%%d.%%d","route_group":"login","method":"POST",' ..
    '"path":"/api/login","reasons":["credential_stuffing"],"features":{"risk":60,"requests":%%d,' ..
    '"login_failures":%%d,"failed_usernames":3,"recent_requests":12,"interval_mean_ms":850,"interval_cv":0.4},' ..
    '"username":"user%%04d","session":"%%016x","user_agent":"curl/8","country":"GB"}',
    math.floor(n / 256) %% 256, n %% 256, 10 + n %% 50, n %% 7, n %% 1000, n %% 5000)
  return wrk.format(nil, "/v1/score", nil, body)
end
""" % SECRET

# One tick batch of 64 samples; the features vary per request so the trees
# really walk and learn (ordinary browsing, as in the unit tests).
EVENTS_SCRIPT = r"""
local n = 0
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["x-abuse-scorer-secret"] = "%s"
request = function()
  local samples = {}
  for i = 1, 64 do
    n = n + 1
    samples[i] = string.format('{"client":"10.8.%%d.%%d","route_group":"api","penalized":false,' ..
      '"features":[%%d,%%d,%%d,%%d,0,%%d,%%d,0,%%d,0,%%d,0,%%d,%%d,%%.2f,1,%%d,0]}',
      math.floor(n / 256) %% 256, n %% 256, n %% 15, 5 + n %% 60, 1 + n %% 10, n %% 3, n %% 3, n %% 2,
      n %% 20, n %% 10, n %% 4, 500 + (n * 37) %% 5000, 0.5 + (n %% 10) / 10, 10 + (n * 13) %% 200)
  end
  return wrk.format(nil, "/v1/events", nil, '{"version":1,"samples":[' .. table.concat(samples, ",") .. ']}')
end
""" % SECRET
SAMPLES_PER_BATCH = 64


def latency_us(text: str, label: str) -> float | None:
    m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return None
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]


def drive(port: int, seconds: int, script: Path, connections: int = 32) -> dict:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
         f"http://127.0.0.1:{port}/v1/score"],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_us": latency_us(out, "50"),
        "p99_us": latency_us(out, "99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def pin(pid: int):
    subprocess.run(["taskset", "-a", "-p", "-c", "0", str(pid)], check=True, capture_output=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    for tool in ("wrk", "taskset", "redis-server"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (Debian packages wrk, util-linux, redis-server)")
    tmp = Path(tempfile.mkdtemp(prefix="abuse-bench-scorer-"))
    script = tmp / "score.lua"
    script.write_text(WRK_SCRIPT)
    events = tmp / "events.lua"
    events.write_text(EVENTS_SCRIPT)
    results = {}
    try:
        scorer = Scorer(secret=SECRET, state_dir=tmp / "memory")
        try:
            pin(scorer.proc.pid)
            drive(scorer.port, 2, events, 4)  # model warm-up from samples
            samples = drive(scorer.port, args.seconds, events, 4)
            samples["vectors_per_s_per_core"] = samples["rps"] * SAMPLES_PER_BATCH
            results["samples"] = samples
            drive(scorer.port, 2, script)  # warm-up
            results["in memory"] = drive(scorer.port, args.seconds, script)
        finally:
            scorer.stop()
        redis = Redis()
        try:
            pin(redis.proc.pid)
            scorer = Scorer(secret=SECRET, redis_url=redis.url, state_dir=tmp / "redis")
            try:
                pin(scorer.proc.pid)
                drive(scorer.port, 2, script)
                results["with Redis"] = drive(scorer.port, args.seconds, script)
            finally:
                scorer.stop()
        finally:
            redis.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'route':12s} {'req/s':>9s} {'p50 us':>8s} {'p99 us':>8s} {'non-2xx':>8s}")
    for name, r in results.items():
        print(f"{name:12s} {r['rps']:9.0f} {r['p50_us'] or 0:8.0f} {r['p99_us'] or 0:8.0f} {r['non_2xx']:8d}")
    out = ROOT / "target" / "bench" / "scorer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    v = results["samples"]["vectors_per_s_per_core"]
    print(f"samples: {results['samples']['rps']:.0f} batches/s of {SAMPLES_PER_BATCH} = {v:.0f} scored and learned "
          f"vectors/s on one core")
    out.write_text(json.dumps({"seconds": args.seconds, "connections": 32, "results": results}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
