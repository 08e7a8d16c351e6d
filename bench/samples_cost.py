#!/usr/bin/env python3
"""What the model's feature samples cost a request (issue 14).

Envoy (one worker, pinned to CPU 0) with this filter in block mode and the
scorer enabled, in two variants that differ only in `scorer.events`: on
(each request offered to the window's bottom-k sample, the samples sent
on the tick) and off. wrk (pinned to CPU 1, with the scorer) drives
`/direct` from 10,000 client addresses; the variants are interleaved over
rounds, alternating which goes first, so drift hits both alike (the
machine is shared: read the median of several rounds, and the spread). Prints requests/s and p50/p99 per variant
and the ratio; writes target/bench/samples_cost.json. A measurement, not a
test: it asserts nothing.

    .venv/bin/python bench/samples_cost.py [--rounds 6] [--seconds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from harness import ROOT, Envoy, Scorer  # noqa: E402
from run import FILTER_CONFIG, WRK_SCRIPT, parse_latency  # noqa: E402

SECRET = "bench-secret"


def config(events: bool) -> dict:
    return dict(FILTER_CONFIG, mode="block", scorer={
        "enabled": True, "ask_at": 50, "timeout_ms": 1000, "secret_env": "ABUSE_SCORER_SECRET",
        "events": events, "fleet_verdicts": False, "warm_start": False})


def drive(port: int, seconds: int, script: Path) -> dict:
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{seconds}s", "--latency", "-s", str(script),
                          f"http://127.0.0.1:{port}/direct"], capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = float(out.split("Requests/sec:")[1].split()[0]) if "Requests/sec:" in out else 0.0
    return {"rps": rps, "p50_us": parse_latency(out, "50"), "p99_us": parse_latency(out, "99")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=int, default=6)
    args = p.parse_args()
    os.environ["ABUSE_SCORER_SECRET"] = SECRET
    tmp = Path(tempfile.mkdtemp(prefix="abuse-bench-samples-"))
    script = tmp / "wrk.lua"
    script.write_text(WRK_SCRIPT)
    scorer = Scorer(secret=SECRET, state_dir=tmp / "scorer")
    subprocess.run(["taskset", "-a", "-p", "-c", "1", str(scorer.proc.pid)], check=True, capture_output=True)
    runs: dict[str, list[dict]] = {"samples on": [], "samples off": []}
    samples_sent = 0
    try:
        for i in range(args.rounds):
            order = (("samples on", True), ("samples off", False))
            # Alternating which goes first: neither gets the quieter half of a round.
            for name, events in (order if i % 2 == 0 else order[::-1]):
                envoy = Envoy.with_filter(config(events), 9, concurrency=1, scorer_port=scorer.port,
                                          env_keys=["ABUSE_SCORER_SECRET"])
                try:
                    subprocess.run(["taskset", "-a", "-p", "-c", "0", str(envoy.proc.pid)], check=True, capture_output=True)
                    drive(envoy.port, 2, script)  # warm-up
                    runs[name].append(drive(envoy.port, args.seconds, script))
                    if events:
                        samples_sent += envoy.stat("abuse_filter.scorer.samples_sent")
                finally:
                    envoy.stop()
    finally:
        scorer.stop()
    result = {}
    for name, rs in runs.items():
        result[name] = {k: statistics.median(r[k] or 0 for r in rs) for k in ("rps", "p50_us", "p99_us")}
        print(f"{name:12s} {result[name]['rps']:9.0f} req/s  p50 {result[name]['p50_us']:7.0f} us  "
              f"p99 {result[name]['p99_us']:7.0f} us  (median of {len(rs)} rounds)")
    ratio = result["samples on"]["rps"] / result["samples off"]["rps"] if result["samples off"]["rps"] else None
    print(f"samples on / off: {ratio:.3f} of the throughput; {samples_sent} samples sent in the 'on' rounds")
    out = ROOT / "target" / "bench" / "samples_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": args.rounds, "seconds": args.seconds, "results": result, "ratio": ratio,
                               "samples_sent": samples_sent, "runs": runs}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
