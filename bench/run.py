#!/usr/bin/env python3
"""`make bench`: the filter's cost next to bare Envoy.

Starts Envoy (one worker, pinned to CPU 0) in turn with: only the router;
a no-op Rust proxy-wasm filter; this filter in monitor mode; this filter in
block mode (nobody over a limit); Envoy's native local_ratelimit. Drives each
with wrk pinned to CPU 1 against the direct-response route `/direct`, the
requests spread over 10,000 client addresses (trusted X-Forwarded-For), and
interleaves the variants over several rounds so drift hits all alike.
Prints requests/s, p50, p99 and the ratios. Then: p50/p99 of each variant
at half of bare Envoy's peak rate (paced wrk), and the memory of this filter
(fixed shared data, Envoy RSS) before and after 1,000,000 distinct client
addresses, and the share of benign requests that cost a scorer callout (the
eval's benign mix through the `make run` stack). Writes
target/bench/report.json. Asserts nothing: it is a
measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import ROOT, WASM, Envoy, envoy_config, free_port  # noqa: E402

NOOP_WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "noop_filter.wasm"

# Limits nobody in the benchmark reaches, so every request does the full work.
FILTER_CONFIG = {
    "client": {"trusted_proxies": ["127.0.0.0/8"]},
    "route_groups": [
        {"name": "login", "path_prefix": "/api/login", "methods": ["POST"]},
        {"name": "direct", "path_prefix": "/direct"},
    ],
    "rate": {
        "limits": [
            {"route_group": "login", "requests": 10, "window_s": 60},
            {"route_group": "direct", "requests": 10_000_000, "window_s": 60},
        ]
    },
}

WRK_SCRIPT = """
-- Each request comes from one of 10,000 client addresses.
local n = 0
request = function()
  n = n + 1
  local c = n % 10000
  return wrk.format("GET", "/direct", { ["x-forwarded-for"] = "10.1." .. math.floor(c / 256) .. "." .. (c % 256) })
end
"""


def wasm_filter(name: str, wasm: Path, configuration: str) -> dict:
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": name,
                "failure_policy": "FAIL_RELOAD",
                "vm_config": {
                    "vm_id": name,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(wasm)}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": configuration,
                },
            },
        },
    }


LOCAL_RATELIMIT = {
    "name": "envoy.filters.http.local_ratelimit",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "local_rl",
        "token_bucket": {"max_tokens": 100000000, "tokens_per_fill": 100000000, "fill_interval": "1s"},
        "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "rl_enabled"},
        "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "rl_enforced"},
    },
}


def variants() -> dict[str, list[dict]]:
    monitor = json.dumps(dict(FILTER_CONFIG, mode="monitor"))
    block = json.dumps(dict(FILTER_CONFIG, mode="block"))
    return {
        "bare envoy": [],
        "no-op wasm": [wasm_filter("noop", NOOP_WASM, "")],
        "abuse filter (monitor)": [wasm_filter("abuse_filter", WASM, monitor)],
        "abuse filter (block)": [wasm_filter("abuse_filter", WASM, block)],
        "native local_ratelimit": [LOCAL_RATELIMIT],
    }


def bootstrap(filters: list[dict], port: int, admin: int) -> dict:
    config = envoy_config("", port, admin, upstream_port=9, with_filter=False)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = filters + hcm["http_filters"]
    return config


def parse_latency(text: str, label: str) -> float | None:
    """wrk --latency prints e.g. ' 99%  812.00us'; returns microseconds."""
    m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return None
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


# Paced: every connection sends its next request a random 0..2*DELAY_MS
# after the last answer (DELAY_MS on average; the jitter keeps connections
# from firing in lockstep bursts), so the rate is about
# connections * 1000 / DELAY_MS.
PACED_SCRIPT = WRK_SCRIPT + """
delay = function()
  return math.random(0, 2 * DELAY_MS)
end
"""
DELAY_MS = 4

# One new client address per request, 1,000,000 in all.
MILLION_SCRIPT = """
local n = 0
request = function()
  n = n + 1
  local c = n % LIMIT
  return wrk.format("GET", "/direct", { ["x-forwarded-for"] = "10." .. (math.floor(c / 65536) % 256) .. "." .. (math.floor(c / 256) % 256) .. "." .. (c % 256) })
end
"""


def run_wrk(port: int, seconds: int, connections: int, script: Path) -> dict:
    cmd = [
        "taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
        "-s", str(script), f"http://127.0.0.1:{port}/direct",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_us": parse_latency(out, "50"),
        "p99_us": parse_latency(out, "99"),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def start_pinned(filters: list[dict], concurrency: int = 1, pin: bool = True) -> Envoy:
    port, admin = free_port(), free_port()
    envoy = Envoy(bootstrap(filters, port, admin), admin, port, concurrency=concurrency)
    if pin:
        # The running Envoy (all its threads) on CPU 0; wrk runs on CPU 1.
        subprocess.run(["taskset", "-a", "-p", "-c", "0", str(envoy.proc.pid)], check=True, capture_output=True)
    return envoy


def rss_kib(pid: int) -> int:
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def throughput(args, script: Path) -> dict[str, list[dict]]:
    """Peak requests/s of every variant, interleaved over the rounds."""
    results: dict[str, list[dict]] = {name: [] for name in variants()}
    for round_no in range(args.rounds):
        for name, filters in variants().items():
            envoy = start_pinned(filters)
            try:
                run_wrk(envoy.port, 1, args.connections, script)  # warm-up
                r = run_wrk(envoy.port, args.seconds, args.connections, script)
                results[name].append(r)
                print(f"round {round_no + 1} {name:24s} {r['rps']:10.0f} req/s  "
                      f"p50 {r['p50_us']}us  p99 {r['p99_us']}us", flush=True)
            finally:
                envoy.stop()
    return results


def paced_latency(args, tmp: Path, rate: float) -> dict[str, dict]:
    """p50/p99 of each variant at a fixed rate well below its peak."""
    script = tmp / "paced.lua"
    script.write_text(PACED_SCRIPT.replace("DELAY_MS", str(DELAY_MS)))
    # Each connection waits DELAY_MS after an answer: calibrate the number
    # of connections on bare Envoy so that the rate comes out right.
    connections = max(1, round(rate * DELAY_MS / 1000))
    envoy = start_pinned([])
    try:
        achieved = run_wrk(envoy.port, 2, connections, script)["rps"] or rate
        connections = max(1, round(connections * rate / achieved))
    finally:
        envoy.stop()
    out = {}
    for name, filters in variants().items():
        envoy = start_pinned(filters)
        try:
            run_wrk(envoy.port, 1, connections, script)
            r = run_wrk(envoy.port, args.seconds, connections, script)
            out[name] = r
            print(f"paced {name:24s} {r['rps']:8.0f} req/s  p50 {r['p50_us']}us  p99 {r['p99_us']}us", flush=True)
        finally:
            envoy.stop()
    return out


def million_clients(args, tmp: Path) -> dict:
    """Memory of this filter (block mode, default state size) before and
    after `args.clients` distinct client addresses, two workers."""
    config = json.dumps(dict(FILTER_CONFIG, mode="block"))
    envoy = start_pinned([wasm_filter("abuse_filter", WASM, config)], concurrency=2, pin=False)
    try:
        script = tmp / "million.lua"
        script.write_text(MILLION_SCRIPT.replace("LIMIT", str(args.clients)))
        run_wrk(envoy.port, 1, 4, tmp / "clients.lua")
        before = rss_kib(envoy.proc.pid)
        cmd = ["wrk", "-t1", "-c64", "-d900s", "-s", str(script), f"http://127.0.0.1:{envoy.port}/direct"]
        wrk = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # Stop once every address was seen (the filter's counter is
            # flushed every 0.5 s); wrk itself would run its whole duration.
            deadline = time.monotonic() + 900
            while envoy.stat("abuse_filter.requests") < args.clients and time.monotonic() < deadline:
                time.sleep(1)
        finally:
            wrk.terminate()
            wrk.wait(timeout=10)
        after = rss_kib(envoy.proc.pid)
        stats = envoy.stats()
        result = {
            "clients": args.clients,
            "requests_counted": stats.get("abuse_filter.requests", 0),
            "evictions": stats.get("abuse_filter.shared_data.evictions", 0),
            "shared_data_bytes": stats.get("abuse_filter.shared_data.bytes", 0),
            "rss_before_kib": before,
            "rss_after_kib": after,
        }
        print(f"\n{args.clients:,} distinct clients: shared data {result['shared_data_bytes'] / 2**20:.1f} MiB (fixed), "
              f"Envoy RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB, "
              f"{result['evictions']:,} idle clients evicted", flush=True)
        return result
    finally:
        envoy.stop()


def benign_callout_share(args) -> dict | None:
    """The share of benign requests that cost a scorer callout: the eval's
    benign mix (quick profile) through the `make run` stack."""
    out = ROOT / "target" / "bench" / "benign-mix"
    cmd = [sys.executable, str(ROOT / "eval" / "run.py"), "--quick", "--only", "benign", "--no-crowdsec",
           "--no-fail", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    try:
        overall = json.loads((out / "report.json").read_text())["overall"]
    except (OSError, ValueError, KeyError):
        print(f"benign mix failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}", flush=True)
        return None
    result = {
        "benign_requests": overall.get("benign_requests"),
        "callouts": overall.get("scorer_callouts"),
        "callouts_per_benign_request": overall.get("scorer_callouts_per_benign_request"),
        "benign_clients_blocked": overall.get("benign_clients_blocked"),
    }
    share = result["callouts_per_benign_request"]
    print(f"\nbenign mix: {result['benign_requests']} requests, {result['callouts']} scorer callouts "
          f"({'-' if share is None else f'{share:.3%}'} of benign requests)", flush=True)
    return result


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for name, runs in results.items():
        summary[name] = {
            "rps": statistics.median(r["rps"] for r in runs),
            "p50_us": statistics.median(r["p50_us"] or 0 for r in runs),
            "p99_us": statistics.median(r["p99_us"] or 0 for r in runs),
            "non_2xx": sum(r["non_2xx"] for r in runs),
        }
    bare = summary["bare envoy"]["rps"] or 1
    noop = summary["no-op wasm"]["rps"] or 1
    for s in summary.values():
        s["vs_bare"] = s["rps"] / bare
        s["vs_noop"] = s["rps"] / noop
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--clients", type=int, default=1_000_000, help="distinct addresses for the memory run (0: skip)")
    parser.add_argument("--no-benign-mix", action="store_true", help="skip the callout share of the benign mix")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (Debian: apt-get install wrk util-linux)")

    tmp = Path(tempfile.mkdtemp(prefix="abuse-bench-"))
    script = tmp / "clients.lua"
    script.write_text(WRK_SCRIPT)
    try:
        results = throughput(args, script)
        summary = summarize(results)
        half = summary["bare envoy"]["rps"] / 2
        paced = paced_latency(args, tmp, half)
        memory = million_clients(args, tmp) if args.clients else None
        callouts = None if args.no_benign_mix else benign_callout_share(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    bare_p99 = paced["bare envoy"]["p99_us"] or 0
    print(f"\n{'variant':26s} {'req/s':>9s} {'p50 us':>8s} {'p99 us':>8s} {'vs bare':>8s} {'vs no-op':>9s}"
          f" {'p99 us @' + format(half, '.0f') + '/s':>16s} {'vs bare':>8s}")
    for name, s in summary.items():
        p = paced[name]
        s["paced"] = p
        s["paced_p99_over_bare_us"] = (p["p99_us"] or 0) - bare_p99
        print(f"{name:26s} {s['rps']:9.0f} {s['p50_us']:8.0f} {s['p99_us']:8.0f} "
              f"{s['vs_bare']:7.0%} {s['vs_noop']:8.0%} {p['p99_us'] or 0:16.0f} {s['paced_p99_over_bare_us']:+8.0f}")
    out = ROOT / "target" / "bench" / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
        "method": {"rounds": args.rounds, "seconds": args.seconds, "connections": args.connections,
                   "envoy_cpu": 0, "wrk_cpu": 1, "clients": 10000, "route": "/direct",
                   "paced_rate": half, "paced_delay_ms": DELAY_MS},
        "summary": summary,
        "memory": memory,
        "benign_callouts": callouts,
        "runs": results,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
