#!/usr/bin/env python3
"""`make bench-hostcalls`: what one proxy-wasm host call costs in Envoy.

Runs `bench/hostcall-filter` (a filter that makes N calls of one kind per
request and nothing else) for each kind, interleaved over several rounds,
Envoy pinned to CPU 0 and wrk to CPU 1 as in `make bench`, and measures
Envoy's CPU time per request (from /proc: less sensitive to a busy machine
than requests/s). The price of a call is the median difference to `none`
divided by N. Writes target/bench/hostcalls.json. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402

FILTER = bench.ROOT / "target" / "wasm32-wasip1" / "release" / "hostcall_filter.wasm"
KINDS = ["none", "header", "headers", "property", "time", "shared", "set_header", "filter_state"]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICK


def measure(kind: str, n: int, seconds: int, script: Path) -> float:
    envoy = bench.start_pinned([bench.wasm_filter("probe", FILTER, f"{kind}:{n}")])
    try:
        bench.run_wrk(envoy.port, 1, 32, script)
        before = cpu_seconds(envoy.proc.pid)
        cmd = ["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{seconds}s", "-s", str(script),
               f"http://127.0.0.1:{envoy.port}/direct"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
        used = cpu_seconds(envoy.proc.pid) - before
        m = re.search(r"(\d+) requests in", out)
        return used * 1e6 / max(int(m.group(1)) if m else 1, 1)
    finally:
        envoy.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset (none is always run)")
    args = parser.parse_args()
    kinds = ["none"] + [k for k in args.kinds.split(",") if k in KINDS and k != "none"]
    script = Path(tempfile.mkdtemp(prefix="abuse-hostcalls-")) / "clients.lua"
    script.write_text(bench.WRK_SCRIPT)
    runs: dict[str, list[float]] = {k: [] for k in kinds}
    for round_no in range(args.rounds):
        for kind in kinds:
            us = measure(kind, 0 if kind == "none" else args.calls, args.seconds, script)
            runs[kind].append(us)
            print(f"round {round_no + 1} {kind:10s} {us:7.1f} CPU µs per request", flush=True)
    base = statistics.median(runs["none"])
    prices = {k: (statistics.median(v) - base) / args.calls for k, v in runs.items() if k != "none"}
    print(f"\nno calls: {base:.1f} CPU µs per request (Envoy + an empty wasm filter)")
    for kind, price in prices.items():
        print(f"{kind:10s} {price:+6.2f} µs per call")
    out = bench.ROOT / "target" / "bench" / "hostcalls.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"calls_per_request": args.calls, "base_us": base, "price_us": prices, "runs": runs}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
