#!/usr/bin/env python3
"""`make bench`: the filter's cost next to bare Envoy.

Starts Envoy (one worker, pinned to CPU 0) in turn with: only the router;
a no-op Rust proxy-wasm filter trimmed to this filter's exports (the
baseline of "vs no-op"), and the same with every SDK export; this filter in
monitor mode (and as built, with every SDK export); this filter in block
mode (nobody over a limit); a no-op dynamic module (bench/noop-module, the
baseline of "vs no-op" for the module rows); this filter as a dynamic module
(module/, monitor and block, without the facts header as it ships, and
block with it: rows named "... dynamic module ..."); Envoy's
native local_ratelimit. Drives each
with wrk pinned to CPU 1 against the direct-response route `/direct`, the
requests spread over 10,000 client addresses (trusted X-Forwarded-For), and
interleaves the variants over several rounds so drift hits all alike.
Prints requests/s, p50, p99 and the ratios. Then, at one fixed offered rate
(half of bare Envoy's peak, lowered to 80 % of the slowest variant's peak if
that is lower) driven by bench/loadgen (constant rate, latency measured from
each request's due time: coordinated omission corrected), over the same
interleaved rounds: Envoy's CPU per request from /proc (the headline: the
filter's addition over the no-op filter as a share of the no-op filter's own
CPU per request) and p50/p99 (printed only when bare Envoy reached the asked
rate). Then the memory of this filter
(fixed shared data, Envoy RSS) before and after 1,000,000 distinct client
addresses, and the share of benign requests that cost a scorer callout (the
eval's benign mix through the `make run` stack). And the VM entries per
request of every wasm variant, counted on a twin build with the same
exports (cargo feature count-entries, `wasm-trim --count-entries`: a
counter at the start of every exported callback, the allocator's
included), never on the priced build. Writes
target/bench/report.json. Asserts nothing: it is a
measurement, not a test.

`--profile VARIANT [--rate R --seconds S]` instead profiles one variant:
`perf record -g` on its Envoy at a fixed offered rate, and where the CPU
went (self time by library and function) in target/bench/profile-*.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import ROOT, WASM, Envoy, envoy_config, facts_filter, free_port, module_http_filter  # noqa: E402

RELEASE = ROOT / "target" / "wasm32-wasip1" / "release"
# The no-op filter as built: the Rust SDK exports every proxy-wasm callback.
NOOP_SDK_WASM = RELEASE / "noop_filter.wasm"
# The no-op filter trimmed to the filter's export set (tools/wasm-trim), as
# `make build` trims the filter: the baseline of "vs no-op", like for like.
NOOP_WASM = RELEASE / "noop_filter.trimmed.wasm"
# The filter before `make build` trimmed it (cargo's own copy): every SDK export.
FILTER_SDK_WASM = RELEASE / "deps" / "abuse_filter.wasm"
TRIM = ROOT / "target" / "release" / "wasm-trim"
# Bench-only builds that count VM entries (cargo feature count-entries +
# wasm-trim --count-entries): never priced, only counted.
COUNT_DIR = ROOT / "target" / "bench" / "count"
LOADGEN = ROOT / "target" / "release" / "loadgen"
CLK_TCK = os.sysconf("SC_CLK_TCK")

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
    # The one worker sees all 10,000 clients: views sized to them, as
    # docs/how-it-works.md says to (the default 8,192 is for a share of the clients).
    "state": {"worker_clients": 16_384},
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


# The no-op dynamic module (bench/noop-module: libnoop_module.so beside
# libabuse_filter.so in target/module, the harness's search path).
NOOP_MODULE = {
    "name": "envoy.filters.http.dynamic_modules",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
        "dynamic_module_config": {"name": "noop_module"},
        "filter_name": "noop",
    },
}
# Rows of the module build: "vs no-op" against the no-op module.
MODULE_ROWS = "dynamic module"
# --only: the variants to measure (a substring each; the baselines always).
ONLY: list[str] = []
BASELINES = ("bare envoy", "no-op wasm", "no-op dynamic module")

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


# Extra builds of the filter to compare in the same interleaved rounds
# (--also LABEL=PATH, monitor mode), e.g. the build before a change.
EXTRA_WASM: dict[str, Path] = {}
# The scorer section of the "decision events on" variant: batches and the
# fleet poll on, callouts never (nobody in the benchmark is borderline).
EVENTS_SCORER = {"enabled": True, "cluster": "abuse_scorer_absent", "events": True, "fleet_verdicts": True,
                 "warm_start": False, "secret": "bench-secret"}
# --ablation: this build without one design step at a time.
ABLATION = False
# --phases: builds of this filter that stop early (cargo features
# phase-headers, phase-request), priced like the rest: what each phase of a
# request costs in Envoy.
PHASES: dict[str, Path] = {}
PHASE_FEATURES = {"headers only": "phase-headers", "no answer phase": "phase-request"}


def build_phases() -> dict[str, Path]:
    built = {}
    for label, feature in PHASE_FEATURES.items():
        target_dir = ROOT / "target" / "phases" / feature
        subprocess.run(["cargo", "build", "-q", "--release", "--target", "wasm32-wasip1", "-p", "abuse-filter",
                        "--features", feature, "--target-dir", str(target_dir)], cwd=ROOT, check=True)
        wasm = target_dir / "wasm32-wasip1" / "release" / "abuse_filter.wasm"
        # Trimmed like the shipped build, so that only the phase differs.
        subprocess.run([str(TRIM), str(wasm)], check=True, capture_output=True)
        built[f"monitor, {label}"] = wasm
    return built


# This filter as shipped: Envoy's header_mutation writes the request's facts
# (peer, start time) into a header that the filter reads instead of two host
# calls; its own cost counts in the filter's columns.
FACTS_HEADER = "x-abuse-facts"


def with_facts(config: dict) -> dict:
    return dict(config, client=dict(config["client"], facts_header=FACTS_HEADER))


def shipped_rules() -> list[dict]:
    """The example rules of envoy/envoy.yaml (docs/rules.md), without
    `fleet` (the scorer is away here: its price is the events variant's)."""
    import yaml

    bootstrap = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm"]
    rules = json.loads(wasm[0]["typed_config"]["config"]["configuration"]["value"])["rules"]
    return [{k: v for k, v in r.items() if k != "fleet"} for r in rules]


def with_rules(config: dict, rules: list[dict]) -> dict:
    client = dict(config["client"], session_cookie="session", api_key_header="x-api-key")
    return dict(config, client=client, rules=rules)


# A rule every benchmark request matches and counts (keyed by client, never
# reached): the price of one rule that counts, beside rules that do not match.
EVERY_REQUEST_RULE = {"name": "every_request", "match": {"path": "/direct"}, "key": ["client"],
                      "window_s": 60, "threshold": 1e9, "action": "tag"}


def exported_callbacks(wasm: Path) -> set[str]:
    from test_wasm_exports import exports  # tests/: the same parser the export test uses
    return {name for name, kind in exports(wasm.read_bytes()).items() if kind == 0 and name.startswith("proxy_on_")}


# Priced .wasm -> its entry-counting twin (same exports), filled by prepare_wasm.
COUNTED: dict[Path, Path] = {}
# Whether the filter's untrimmed build is there to price (every SDK export).
FILTER_SDK = False


def prepare_wasm(count: bool) -> None:
    """The no-op filter trimmed like the filter; the entry-counting twins of
    the no-op filter and of this filter, trimmed and untrimmed."""
    global FILTER_SDK
    subprocess.run([str(TRIM), str(NOOP_SDK_WASM), str(NOOP_WASM)], check=True, capture_output=True)
    FILTER_SDK = FILTER_SDK_WASM.is_file() and "proxy_on_log" in exported_callbacks(FILTER_SDK_WASM)
    if not count:
        return
    subprocess.run(["cargo", "build", "-q", "--release", "--target", "wasm32-wasip1", "-p", "abuse-filter",
                    "-p", "noop-filter", "--features", "abuse-filter/count-entries,noop-filter/count-entries",
                    "--target-dir", str(COUNT_DIR)], cwd=ROOT, check=True)
    built = COUNT_DIR / "wasm32-wasip1" / "release"
    for priced, source, keep_all in ((WASM, "abuse_filter", False), (FILTER_SDK_WASM, "abuse_filter", True),
                                     (NOOP_WASM, "noop_filter", False), (NOOP_SDK_WASM, "noop_filter", True)):
        out = COUNT_DIR / f"{source}{'.sdk' if keep_all else ''}.counting.wasm"
        subprocess.run([str(TRIM), "--count-entries", *(["--keep-all"] if keep_all else []),
                        str(built / f"{source}.wasm"), str(out)], check=True, capture_output=True)
        COUNTED[priced] = out


def variants() -> dict[str, list[dict]]:
    monitor = json.dumps(with_facts(dict(FILTER_CONFIG, mode="monitor")))
    block = json.dumps(with_facts(dict(FILTER_CONFIG, mode="block")))
    # Other builds may not know the newer keys: the plain configuration.
    plain = json.dumps({k: v for k, v in dict(FILTER_CONFIG, mode="monitor").items() if k != "state"})
    extra = {f"{label} (monitor)": [wasm_filter("abuse_filter", path, plain)] for label, path in EXTRA_WASM.items()}
    facts = facts_filter(FACTS_HEADER)
    extra |= {label: [facts, wasm_filter("abuse_filter", path, monitor)] for label, path in PHASES.items()}
    if ABLATION:
        # What each design step buys: without the facts header (host calls
        # for the peer and the clock), and without the per-worker tier.
        no_tier = json.dumps(with_facts(dict(FILTER_CONFIG, mode="monitor", state={"worker_clients": 0})))
        default_tier = json.dumps(with_facts(dict(FILTER_CONFIG, mode="monitor", state={})))
        extra |= {
            "monitor, no facts header": [wasm_filter("abuse_filter", WASM, plain)],
            "monitor, no worker tier": [facts, wasm_filter("abuse_filter", WASM, no_tier)],
            "monitor, 8,192 views": [facts, wasm_filter("abuse_filter", WASM, default_tier)],
        }
    # Decision events and the tick batch on (issue 21), the scorer away (no
    # such cluster: every batch fails and is counted): the request path's
    # share of the operator's view, beside the same filter without it.
    events = json.dumps(with_facts(dict(FILTER_CONFIG, mode="block", scorer=EVENTS_SCORER)))
    # Rules (issue 22): the shipped examples, which the benchmark's route
    # does not match (the common request: each rule's match only), and one
    # more rule that counts every request (a shared-data update each).
    block_config = dict(FILTER_CONFIG, mode="block")
    rules = json.dumps(with_facts(with_rules(block_config, shipped_rules())))
    counting = json.dumps(with_facts(with_rules(block_config, shipped_rules() + [EVERY_REQUEST_RULE])))
    # What trimming the exports buys: both filters with every SDK export.
    extra |= {"no-op wasm (every SDK export)": [wasm_filter("noop", NOOP_SDK_WASM, "")]}
    if FILTER_SDK:
        extra |= {"abuse filter (monitor, every SDK export)": [facts, wasm_filter("abuse_filter", FILTER_SDK_WASM, monitor)]}
    every = extra | {
        "bare envoy": [],
        "no-op wasm": [wasm_filter("noop", NOOP_WASM, "")],
        "abuse filter (monitor)": [facts, wasm_filter("abuse_filter", WASM, monitor)],
        "abuse filter (block)": [facts, wasm_filter("abuse_filter", WASM, block)],
        "abuse filter (block, decision events on)": [facts, wasm_filter("abuse_filter", WASM, events)],
        "abuse filter (block, example rules on)": [facts, wasm_filter("abuse_filter", WASM, rules)],
        "abuse filter (block, rules + one counting every request)": [facts, wasm_filter("abuse_filter", WASM, counting)],
        # The same engine as an Envoy dynamic module (issue 24): the same
        # configurations but the facts header, as the module ships
        # (deploy/module/envoy.yaml): a native module reads the peer and the
        # clock for a plain call, so the header (and Envoy's header_mutation
        # writing it) would buy it nothing; the last row prices it anyway.
        "no-op dynamic module": [NOOP_MODULE],
        "abuse filter dynamic module (monitor)": [module_http_filter(json.dumps(dict(FILTER_CONFIG, mode="monitor")))],
        "abuse filter dynamic module (block)": [module_http_filter(json.dumps(block_config))],
        "abuse filter dynamic module (block, with the facts header)": [facts, module_http_filter(block)],
        "native local_ratelimit": [LOCAL_RATELIMIT],
    }
    if ONLY:
        every = {k: v for k, v in every.items() if k in BASELINES or any(o in k for o in ONLY)}
    return every


def bootstrap(filters: list[dict], port: int, admin: int) -> dict:
    config = envoy_config("", port, admin, upstream_port=9, with_filter=False)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = filters + hcm["http_filters"]
    if facts_filter(FACTS_HEADER) in filters:
        # As shipped: the route removes the facts header before the upstream.
        hcm["route_config"]["request_headers_to_remove"] = [FACTS_HEADER]
    return config


def parse_latency(text: str, label: str) -> float | None:
    """wrk --latency prints e.g. ' 99%  812.00us'; returns microseconds."""
    m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return None
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the whole process (every thread), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14, stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_loadgen(port: int, rate: float, seconds: float, warmup: float, connections: int) -> dict:
    cmd = ["taskset", "-c", "1", str(LOADGEN), "--addr", f"127.0.0.1:{port}", "--rate", f"{rate:.0f}",
           "--seconds", str(seconds), "--warmup", str(warmup), "--connections", str(connections)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    try:
        return json.loads(done.stdout)
    except ValueError:
        return {"asked_rps": rate, "achieved_rps": 0.0, "answered_all": 0, "p50_us": None, "p99_us": None,
                "error": done.stderr[-500:]}


def fixed_rate(args, rate: float) -> dict[str, list[dict]]:
    """Each variant at one constant offered rate (bench/loadgen), interleaved
    over the rounds: Envoy's CPU per request, and latency from each
    request's due time."""
    out: dict[str, list[dict]] = {name: [] for name in variants()}
    for round_no in range(args.rounds):
        for name, filters in variants().items():
            envoy = start_pinned(filters)
            try:
                run_loadgen(envoy.port, rate, 1.5, 0.5, args.connections)  # warm-up
                before = cpu_seconds(envoy.proc.pid)
                r = run_loadgen(envoy.port, rate, args.seconds, 1.0, args.connections)
                cpu = cpu_seconds(envoy.proc.pid) - before
                answered = r.get("answered_all") or 0
                r["cpu_s"] = cpu
                r["cpu_us_per_request"] = cpu * 1e6 / answered if answered else None
                out[name].append(r)
                print(f"fixed {round_no + 1} {name:24s} {r['achieved_rps']:8.0f}/{rate:.0f} req/s  "
                      f"cpu {r['cpu_us_per_request'] or 0:6.2f} us/req  p50 {r['p50_us']}us  p99 {r['p99_us']}us",
                      flush=True)
            finally:
                envoy.stop()
    return out


def counting_twin(filters: list[dict]) -> list[dict] | None:
    """The variant with each wasm filter replaced by its entry-counting twin
    (None when one has none: a phase build, an --also build)."""
    twin = json.loads(json.dumps(filters))
    for f in twin:
        code = f.get("typed_config", {}).get("config", {}).get("vm_config", {}).get("code", {}).get("local")
        if code is not None:
            counted = COUNTED.get(Path(code["filename"]))
            if counted is None:
                return None
            code["filename"] = str(counted)
    return twin


def envoy_counts(envoy: Envoy) -> tuple[int, int, int]:
    """(VM entries, of which allocations, requests served) so far."""
    _, text = envoy.admin("/stats?filter=bench_vm_|downstream_rq_total")
    values = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    num = lambda k: int(values.get(k, "0").strip() or 0)
    return num("wasmcustom.bench_vm_entries"), num("wasmcustom.bench_vm_allocs"), num("http.api.downstream_rq_total")


def vm_entries(args, rate: float) -> dict[str, dict | None]:
    """VM entries per request of every variant, counted on its counting twin
    (same exports, a counter at the start of every callback) under the
    bench's load at `rate` for a few seconds. Variants without wasm: 0.
    The gauges are set at each request's context creation, so a reading
    lags by one request's own entries (both readings alike); the filter's
    tick adds ~2 entries a second, under 0.01 per request at this rate."""
    out: dict[str, dict | None] = {}
    for name, filters in variants().items():
        twin = counting_twin(filters) if COUNTED else None
        if not any(f["name"] == "envoy.filters.http.wasm" for f in filters):
            # No VM: bare Envoy, native filters, the dynamic modules.
            out[name] = {"entries": 0.0, "allocs": 0.0, "requests": None}
            continue
        if twin is None:
            out[name] = None
            continue
        envoy = start_pinned(twin)
        try:
            run_loadgen(envoy.port, rate, 1.0, 0.5, args.connections)  # warm-up, and the gauges defined
            e0, a0, r0 = envoy_counts(envoy)
            run_loadgen(envoy.port, rate, 3.0, 0.0, args.connections)
            e1, a1, r1 = envoy_counts(envoy)
        finally:
            envoy.stop()
        n = r1 - r0
        out[name] = {"entries": (e1 - e0) / n if n else None, "allocs": (a1 - a0) / n if n else None, "requests": n}
        print(f"entries {name:24s} {out[name]['entries'] or 0:6.2f} per request "
              f"(allocations {out[name]['allocs'] or 0:.2f}; {n} requests)", flush=True)
    return out


def million_clients(args, tmp: Path, build: str = "wasm") -> dict:
    """Memory of this filter (block mode, default state size) before and
    after `args.clients` distinct client addresses, two workers."""
    config = json.dumps(dict(FILTER_CONFIG, mode="block"))
    the_filter = module_http_filter(config) if build == "module" else wasm_filter("abuse_filter", WASM, config)
    envoy = start_pinned([the_filter], concurrency=2, pin=False)
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
        print(f"\n{build}: {args.clients:,} distinct clients: shared data {result['shared_data_bytes'] / 2**20:.1f} MiB (fixed), "
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
    noop_module = summary["no-op dynamic module"]["rps"] or 1
    for name, s in summary.items():
        s["vs_bare"] = s["rps"] / bare
        # A module row against the no-op module; the rest against the no-op wasm filter.
        s["vs_noop"] = s["rps"] / (noop_module if MODULE_ROWS in name else noop)
    return summary


def summarize_fixed(summary: dict[str, dict], fixed: dict[str, list[dict]], rate: float, half: float) -> None:
    """Medians of the fixed-rate rounds: CPU per request, the filter's
    addition over the no-op filter (share of the no-op filter's CPU per
    request), p50/p99 — the latency only when bare Envoy reached the asked
    rate (else the generator or the machine, not Envoy, is measured)."""
    def med(runs, key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    for name, runs in fixed.items():
        summary[name]["fixed"] = {
            "rate": rate,
            "achieved_rps": med(runs, "achieved_rps"),
            "cpu_us_per_request": med(runs, "cpu_us_per_request"),
            "p50_us": med(runs, "p50_us"),
            "p99_us": med(runs, "p99_us"),
        }
    bare = summary["bare envoy"]["fixed"]
    bare_cpu = bare["cpu_us_per_request"]
    reached = rate >= half * 0.999 and (bare["achieved_rps"] or 0) >= 0.97 * rate
    for name, s in summary.items():
        f = s["fixed"]
        cpu = f["cpu_us_per_request"]
        noop_cpu = summary["no-op dynamic module" if MODULE_ROWS in name else "no-op wasm"]["fixed"]["cpu_us_per_request"]
        f["cpu_over_noop"] = (cpu - noop_cpu) / noop_cpu if cpu is not None and noop_cpu else None
        # The module's target: CPU per request within 10 % of bare Envoy's.
        f["cpu_over_bare"] = (cpu - bare_cpu) / bare_cpu if cpu is not None and bare_cpu else None
        f["latency_valid"] = reached
        f["p99_over_bare_us"] = (f["p99_us"] - bare["p99_us"]) if reached and f["p99_us"] is not None else None


def print_table(summary: dict[str, dict], rate: float, half: float) -> None:
    valid = summary["bare envoy"]["fixed"]["latency_valid"]
    at = f"@{rate:.0f}/s"
    header = (f"\n{'variant':26s} {'req/s':>9s} {'p50 us':>8s} {'p99 us':>8s} {'vs bare':>8s} {'vs no-op':>9s}"
              f" {'cpu us/req ' + at:>22s} {'cpu vs no-op':>13s} {'cpu vs bare':>12s} {'VM entries/req':>15s}")
    if valid:
        header += f" {'p99 us ' + at:>18s} {'vs bare':>8s}"
    print(header)
    for name, s in summary.items():
        f = s["fixed"]
        over, over_bare = f["cpu_over_noop"], f["cpu_over_bare"]
        line = (f"{name:26s} {s['rps']:9.0f} {s['p50_us']:8.0f} {s['p99_us']:8.0f} "
                f"{s['vs_bare']:7.0%} {s['vs_noop']:8.0%} {f['cpu_us_per_request'] or 0:22.2f} "
                f"{'-' if over is None else format(over, '+.1%'):>13s} "
                f"{'-' if over_bare is None else format(over_bare, '+.1%'):>12s}")
        entries = (s.get("vm_entries") or {}).get("entries")
        line += f" {'-' if entries is None else format(entries, '.2f'):>15s}"
        if valid:
            line += f" {f['p99_us'] or 0:18.0f} {f['p99_over_bare_us'] or 0:+8.0f}"
        print(line)
    if not valid:
        bare = summary["bare envoy"]["fixed"]["achieved_rps"] or 0
        why = (f"bare Envoy answered {bare:.0f} of {rate:.0f} req/s asked" if rate >= half * 0.999
               else f"the fixed rate ({rate:.0f}/s) is below half of bare Envoy's peak ({half:.0f}/s): "
                    "a variant peaks lower")
        print(f"(no latency column at half of bare Envoy's peak: {why})")


def profile(args, name: str, rate: float) -> None:
    """`perf record -g` on one variant's Envoy at a fixed offered rate, and
    the functions its CPU went to (`perf report`, self time), written to
    target/bench/profile-<variant>.txt. A native module is profiled with its
    symbols; the wasm filter shows as V8's generated code."""
    every = variants()
    if name not in every:
        sys.exit(f"--profile {name!r}: no such variant; one of: {', '.join(every)}")
    if not shutil.which("perf"):
        sys.exit("perf is needed (Debian: apt-get install linux-perf)")
    out_dir = ROOT / "target" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    data = out_dir / f"profile-{slug}.data"
    envoy = start_pinned(every[name])
    try:
        perf = subprocess.Popen(["perf", "record", "-g", "-F", "999", "-o", str(data), "-p", str(envoy.proc.pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            r = run_loadgen(envoy.port, rate, args.seconds, 1.0, args.connections)
        finally:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=60)
    finally:
        envoy.stop()
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none",
                             "--percent-limit", "0.7", "--sort", "dso,symbol"],
                            capture_output=True, text=True, timeout=300).stdout
    lines = [l for l in report.splitlines() if l.strip() and not l.startswith("#")]
    text = f"{name} at {rate:.0f} req/s offered ({r.get('achieved_rps', 0):.0f} achieved), {args.seconds} s:\n" + "\n".join(lines)
    (out_dir / f"profile-{slug}.txt").write_text(text + "\n")
    print(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--clients", type=int, default=1_000_000, help="distinct addresses for the memory run (0: skip)")
    parser.add_argument("--no-benign-mix", action="store_true", help="skip the callout share of the benign mix")
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=PATH",
                        help="another build of the filter (.wasm) to measure alongside, in monitor mode")
    parser.add_argument("--ablation", action="store_true",
                        help="also this build without the facts header, and without the worker tier")
    parser.add_argument("--no-entries", action="store_true",
                        help="skip the VM-entry count (it builds the counting twins)")
    parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                        help="measure only the variants naming it (repeatable); the baselines always")
    parser.add_argument("--phases", action="store_true",
                        help="also builds that stop after the request's facts, and after the request (no answer)")
    parser.add_argument("--profile", metavar="VARIANT",
                        help="instead of the bench: perf profile of one variant at --rate req/s for --seconds")
    parser.add_argument("--rate", type=float, default=10_000.0, help="offered rate of --profile")
    args = parser.parse_args()
    global ABLATION
    ABLATION = args.ablation
    ONLY.extend(args.only)
    if not TRIM.exists():
        sys.exit(f"{TRIM} is missing: make build")
    if args.phases:
        PHASES.update(build_phases())
    for item in args.also:
        label, _, path = item.partition("=")
        if not (label and Path(path).is_file()):
            sys.exit(f"--also {item}: want LABEL=PATH of a .wasm file")
        EXTRA_WASM[label] = Path(path)
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (Debian: apt-get install wrk util-linux)")
    if not LOADGEN.exists():
        sys.exit(f"{LOADGEN} is missing: cargo build --release -p loadgen")
    if args.profile:
        prepare_wasm(count=False)
        profile(args, args.profile, args.rate)
        return
    prepare_wasm(count=not args.no_entries)

    tmp = Path(tempfile.mkdtemp(prefix="abuse-bench-"))
    script = tmp / "clients.lua"
    script.write_text(WRK_SCRIPT)
    try:
        results = throughput(args, script)
        summary = summarize(results)
        half = summary["bare envoy"]["rps"] / 2
        slowest = min(v["rps"] for v in summary.values())
        rate = min(half, 0.8 * slowest)
        fixed = fixed_rate(args, rate)
        entries = vm_entries(args, min(rate, 2000.0)) if not args.no_entries else {}
        memory = million_clients(args, tmp) if args.clients else None
        memory_module = million_clients(args, tmp, "module") if args.clients else None
        callouts = None if args.no_benign_mix else benign_callout_share(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summarize_fixed(summary, fixed, rate, half)
    for name, counted in entries.items():
        summary[name]["vm_entries"] = counted
    print_table(summary, rate, half)
    out = ROOT / "target" / "bench" / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname())},
        "method": {"rounds": args.rounds, "seconds": args.seconds, "connections": args.connections,
                   "envoy_cpu": 0, "wrk_cpu": 1, "clients": 10000, "route": "/direct",
                   "fixed_rate": rate, "half_bare_peak": half, "fixed_rate_tool": "bench/loadgen"},
        "summary": summary,
        "memory": memory,
        "memory_dynamic_module": memory_module,
        "benign_callouts": callouts,
        "runs": results,
        "fixed_rate_runs": fixed,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
