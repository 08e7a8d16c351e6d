"""make soak (not a test): faults under load.

Two Envoys (the built filter, LDS from a watched file), two scorers sharing
one Redis, the demo API; benign traffic (browsing, real users logging into
their own accounts), a credential-stuffing tool rotating addresses, VPN
users in the scorer's band (the callouts) and an account guesser the
scorer blocks (the fleet verdicts), all paced by the clock, while a fault
script runs: kill and restart a scorer,
kill and restart Redis, SIGSTOP Redis (calls hang) then SIGCONT, reload the
filter configuration on a running Envoy, hot-restart the other Envoy (a new
process takes its listen sockets over; a cold restart if hot restart
fails), and fill the first Envoy's client table with a million rotating
addresses (wrk on a direct-response route the filter still judges). Prints
the report the issue asks for and writes target/soak/report.json.

Latency is measured by Envoy, not by the clients: each Envoy writes an
access log with its own durations and the filter's callout mark
(`wasm.abuse_filter_callout`), so requests that waited on a scorer callout
(allowed up to the scorer timeout) are told apart from all the others
(which must never take longer than the timeout + 10 ms).

  SOAK_SECONDS (default 600)  total duration; faults at fixed fractions of it
  SOAK_FILL_ADDRESSES (default 1000000)  distinct client addresses of the
      fill, half IPv4, half IPv6 (one /64 each)
  SOAK_FILL_SECONDS (default 180)  the fill's time bound (at most 30 % of
      SOAK_SECONDS): it stops at the address count or at this bound
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import DemoApi, Redis, Scorer, request  # noqa: E402
from test_disguise_envoy import BROWSERS, blocked, browser, shipped_config  # noqa: E402
from test_reload_envoy import LdsEnvoy  # noqa: E402

DURATION = float(os.environ.get("SOAK_SECONDS", "600"))
FILL_ADDRESSES = int(os.environ.get("SOAK_FILL_ADDRESSES", "1000000"))
FILL_SECONDS = min(float(os.environ.get("SOAK_FILL_SECONDS", "180")), 0.30 * DURATION)
OUT = ROOT / "target" / "soak"
SECRET = "soak-secret"
TIMEOUT_MS = 50
SLOW_MS = TIMEOUT_MS + 10  # the bound: the scorer timeout + 10 ms
TOOL = {"user-agent": "python-requests/2.31.0", "accept": "*/*"}
FILTER_COUNTERS = ("abuse_filter.requests", "abuse_filter.shared_data.evictions", "abuse_filter.shared_data.errors",
                   "abuse_filter.scorer.callouts_sent", "abuse_filter.scorer.answered", "abuse_filter.scorer.failed",
                   "abuse_filter.scorer.timed_out", "abuse_filter.scorer.skipped_breaker_open",
                   "abuse_filter.scorer.batches_sent", "abuse_filter.scorer.batch_items_dropped",
                   "abuse_filter.scorer.fleet_polls", "abuse_filter.scorer.fleet_verdicts_applied",
                   "abuse_filter.scorer.warm_shards")
SCORER_COUNTERS = ("abuse_scorer_score_requests_total", "abuse_scorer_batches_total",
                   "abuse_scorer_fleet_verdicts_total", "abuse_scorer_store_fallbacks_total",
                   "abuse_scorer_store_errors_total")


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def config() -> dict:
    c = shipped_config()
    c["scorer"] = {"enabled": True, "cluster": "abuse_scorer", "ask_at": 50, "timeout_ms": TIMEOUT_MS,
                   "failure_mode": "fail_open", "secret_env": "ABUSE_SCORER_SECRET"}
    return c


def access_log(path: Path) -> list[dict]:
    """Envoy's own timing of every request but the fill's (`/direct`, a
    million lines of no interest). `proxy` time is the request's duration
    without the upstream's part (its answer time, RESPONSE_DURATION −
    REQUEST_TX_DURATION): what the filter and Envoy add, whatever the
    single-threaded demo API does. `callout` is the filter's mark on a
    request held for a scorer callout."""
    fields = {"start": "%START_TIME(%s.%3f)%", "path": "%REQ(:PATH)%", "status": "%RESPONSE_CODE%",
              "flags": "%RESPONSE_FLAGS%", "xff": "%REQ(X-FORWARDED-FOR)%", "duration": "%DURATION%",
              "request_tx": "%REQUEST_TX_DURATION%", "response": "%RESPONSE_DURATION%",
              "callout": "%FILTER_STATE(wasm.abuse_filter_callout:PLAIN)%",
              "decision": "%FILTER_STATE(wasm.abuse_filter:PLAIN)%"}
    return [{
        "name": "envoy.access_loggers.file",
        "filter": {"header_filter": {"header": {"name": ":path", "string_match": {"prefix": "/direct"},
                                                "invert_match": True}}},
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                         "path": str(path), "log_format": {"json_format": fields}},
    }]


def scorer_counters(scorer: Scorer) -> dict[str, float]:
    try:
        return {name: scorer.metric(name) for name in SCORER_COUNTERS}
    except OSError:
        return {name: 0.0 for name in SCORER_COUNTERS}


class Stack:
    """The processes, and the faults done to them. Counters of a process
    about to go away are kept first (a new process starts from 0)."""

    def __init__(self):
        os.environ["ABUSE_SCORER_SECRET"] = SECRET
        self.api = DemoApi()
        self.redis = Redis()
        self.redis_port = self.redis.port
        self.scorers = [Scorer(redis_url=self.redis.url, secret=SECRET) for _ in range(2)]
        self.gone_scorer_counters: list[dict] = []
        self.gone_envoy_counters: dict[int, list[dict]] = {0: [], 1: []}
        self.access_logs = [OUT / f"access-{i}.log" for i in range(2)]
        for path in self.access_logs:
            path.unlink(missing_ok=True)
        self.envoys = [self.start_envoy(i) for i in range(2)]

    def start_envoy(self, i: int) -> LdsEnvoy:
        # Envoy B (1) is the one restarted: it runs as epoch 0 of a hot restart.
        return LdsEnvoy(config(), self.api.port, scorer_port=self.scorers[i].port, env_keys=["ABUSE_SCORER_SECRET"],
                        access_log=access_log(self.access_logs[i]), hot_restart=(i == 1))

    def kill_scorer(self, i: int):
        self.gone_scorer_counters.append(scorer_counters(self.scorers[i]))
        self.scorers[i].proc.send_signal(signal.SIGKILL)
        self.scorers[i].proc.wait()

    def restart_scorer(self, i: int):
        port = self.scorers[i].port
        self.scorers[i] = Scorer(port=port, redis_url=self.redis.url, secret=SECRET)

    def restart_redis(self):
        self.redis.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def restart_envoy(self, i: int) -> dict:
        """Hot restart of Envoy i (same port: clients see no gap if it works);
        if it fails, the old process is stopped and a new one started
        (cold, on a new port). Returns what happened."""
        envoy = self.envoys[i]
        self.gone_envoy_counters[i].append(envoy.envoy.stats())
        t0 = time.monotonic()
        try:
            envoy.envoy.hot_restart()
            return {"kind": "hot", "seconds": round(time.monotonic() - t0, 2), "epoch": envoy.envoy.epoch}
        except RuntimeError as err:
            error = str(err)[:2000]
        self.envoys[i] = self.start_envoy(i)
        envoy.stop()
        return {"kind": "cold", "hot_restart_error": error, "seconds": round(time.monotonic() - t0, 2)}

    def stop(self):
        traps = []
        for e in self.envoys:
            try:
                e.stop()
            except AssertionError as err:  # the harness fails on a wasm trap
                traps.append(str(err))
        for s in self.scorers:
            s.stop()
        self.redis.stop()
        self.api.stop()
        return traps


class Traffic:
    """Paced clients; every answer recorded as (t, kind, status, ms, envoy)."""

    def __init__(self, stack: Stack, end: float):
        self.stack, self.end, self.records, self.lock = stack, end, [], threading.Lock()

    def record(self, kind: str, n: int, fn):
        t0 = time.monotonic()
        try:
            status = fn(self.stack.envoys[n % 2].port)
        except OSError:
            status = 0  # connection refused or reset: counted as a connection error
        with self.lock:
            self.records.append((t0, kind, status, (time.monotonic() - t0) * 1000, n % 2))

    def benign(self, worker: int, rate: float):
        rng, i, start = random.Random(worker), 0, time.monotonic()
        while time.monotonic() < self.end:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            u = rng.randrange(1, 121)
            addr = f"203.0.113.{u}" if u < 100 else f"2001:db8:77::{u:x}"
            headers = {"x-forwarded-for": addr, **browser(BROWSERS[u % 3])}
            if i % 10 == 0:
                body = {"username": f"user{u:04d}", "password": f"pass-{u:04d}"}
                self.record("real_login", i, lambda port: request(port, "POST", "/api/login", headers, body).status)
            else:
                self.record("browse", i, lambda port: request(port, "GET", f"/api/products?page={u % 5 + 1}", headers).status)
            i += 1

    def borderline(self, rate: float):
        """Users behind an anonymising VPN (the header the GeoIP filter
        would set; the soak runs none), each from a new address, two
        requests half a second apart: the second one's risk (2 x 30) lies in
        the scorer's band [ask_at 50, block_at 100), so the filter asks the
        scorer and holds the request (up to the timeout): the callout band."""
        i, start = 0, time.monotonic()
        while time.monotonic() < self.end:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            user = i // 2
            addr = f"198.18.{user // 250 % 250}.{user % 250 + 1}"
            headers = {"x-forwarded-for": addr, "x-geo-anon-vpn": "true", **browser(BROWSERS[user % 5])}
            self.record("vpn_browse", user, lambda port: request(port, "GET", "/api/products?page=2", headers).status)
            i += 1

    def account_thief(self, rate: float):
        """One account at a time guessed from new VPN addresses, alternating
        Envoys: each address browses once, then tries the password (risk 2 x
        30: in the scorer's band, so the scorer is asked, with the username).
        From the 20th attempt on the account fleet-wide the scorer adds
        credential_stuffing (+50), blocks, and publishes the block to the
        fleet, which both Envoys poll: fleet verdicts to count."""
        i, start = 0, time.monotonic()
        while time.monotonic() < self.end:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            n = i // 2
            headers = {"x-forwarded-for": f"198.19.{n // 250 % 250}.{n % 250 + 1}", "x-geo-anon-vpn": "true",
                       **browser(BROWSERS[3])}
            if i % 2 == 0:
                self.record("account_thief", n, lambda port: request(port, "GET", "/api/products?page=3", headers).status)
            else:
                body = {"username": f"victim{n // 30:04d}", "password": f"guess-{n}"}
                self.record("account_thief", n, lambda port: request(port, "POST", "/api/login", headers, body).status)
            i += 1

    def attack(self, rate: float):
        """Every attempt from an address never used before (100.64.0.0/10):
        only the endpoint-level detectors can refuse it."""
        rng, i, start = random.Random(99), 0, time.monotonic()
        while time.monotonic() < self.end:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            addr = f"100.{64 + i % 60}.{i // 60 % 256}.{rng.randrange(1, 255)}"
            body = {"username": f"leak{rng.randrange(10**6)}@mail.example", "password": "Summer1!"}
            self.record("attack", i, lambda port: self._attack(port, addr, body))
            i += 1

    @staticmethod
    def _attack(port, addr, body):
        r = request(port, "POST", "/api/login", {"x-forwarded-for": addr, **TOOL}, body)
        return -r.status if blocked(r) else r.status  # negative: refused by the filter


# wrk script of the fill: thread t of T sends addresses t, t+T, t+2T, ...
# (even: 10.x.y.z, odd: 2001:db8:x:y::1, one /64 each, the filter's IPv6
# client key), as the trusted proxy's X-Forwarded-For (the shipped config
# trusts loopback for one hop). After its quota each thread leaves a mark
# file and stops; wrk itself only stops at -d, so the script is told by
# the marks to interrupt it (SIGINT: wrk then prints its figures).
FILL_LUA = """
local threads = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end
function init(args)
  quota, nthreads, mark = tonumber(args[1]), tonumber(args[2]), args[3]
  sent, done = 0, 0
end
function request()
  local k = id + nthreads * sent
  sent = sent + 1
  local v = math.floor(k / 2)
  local xff
  if k % 2 == 0 then
    xff = string.format("10.%d.%d.%d", math.floor(v / 65536) % 256, math.floor(v / 256) % 256, v % 256)
  else
    xff = string.format("2001:db8:%x:%x::1", math.floor(v / 65536) % 65536, v % 65536)
  end
  return wrk.format("GET", "/direct", {["x-forwarded-for"] = xff})
end
function response(status, headers, body)
  done = done + 1
  if done == quota then
    io.open(mark .. id, "w"):close()
    wrk.thread:stop()
  end
end
"""


def wrk_figures(out: str) -> dict:
    figures = {"requests": 0, "requests_per_s": 0.0, "non_2xx": 0, "socket_errors": ""}
    for line in out.splitlines():
        if "requests in" in line:
            figures["requests"] = int(line.split()[0])
        elif line.startswith("Requests/sec:"):
            figures["requests_per_s"] = float(line.split()[1])
        elif "Non-2xx" in line:
            figures["non_2xx"] = int(line.split()[-1])
        elif "Socket errors" in line:
            figures["socket_errors"] = line.strip()
    return figures


def fill_table(envoy: LdsEnvoy, addresses: int, seconds: float, threads: int = 2) -> dict:
    """`addresses` distinct clients, one request each, on `/direct` (Envoy
    answers it itself: the demo API is not the bottleneck, the filter still
    judges every request and writes each new client to shared data).
    Bounded by `seconds`."""
    script = OUT / "fill.lua"
    script.write_text(FILL_LUA)
    mark = OUT / "fill-done-"
    for t in range(threads):
        Path(f"{mark}{t}").unlink(missing_ok=True)
    before = envoy.envoy.stats()
    rss_before = envoy.envoy.rss_kib()
    t0 = time.monotonic()
    # Load generator below the proxy's priority: on a shared 2-core box it
    # would otherwise take the CPU the measured traffic needs.
    wrk = subprocess.Popen(["nice", "-n", "5", "wrk", f"-t{threads}", "-c32", f"-d{max(1, int(seconds))}s",
                            "-s", str(script), f"http://127.0.0.1:{envoy.port}", "--",
                            str(-(-addresses // threads)), str(threads), str(mark)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss_during = []
    deadline = t0 + seconds + 5
    while wrk.poll() is None and time.monotonic() < deadline:
        if all(Path(f"{mark}{t}").exists() for t in range(threads)):
            wrk.send_signal(signal.SIGINT)
            break
        rss_during.append((round(time.monotonic() - t0), envoy.envoy.rss_kib()))
        time.sleep(2)
    try:
        out = wrk.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        wrk.kill()
        out = wrk.communicate()[0]
    seconds_taken = time.monotonic() - t0
    time.sleep(1.5)  # the filter hands its counters to Envoy on its tick
    after = envoy.envoy.stats()
    figures = wrk_figures(out)
    return {**figures, "addresses_asked": addresses, "seconds": round(seconds_taken, 1),
            "evictions": after.get("abuse_filter.shared_data.evictions", 0) - before.get("abuse_filter.shared_data.evictions", 0),
            "shared_data_errors": after.get("abuse_filter.shared_data.errors", 0) - before.get("abuse_filter.shared_data.errors", 0),
            "envoy_rss_kib_before": rss_before, "envoy_rss_kib_after": envoy.envoy.rss_kib(),
            "envoy_rss_kib_during": rss_during[:: max(1, len(rss_during) // 10)]}


def server_timings(paths: list[Path], clock_offset: float) -> list[dict]:
    """Envoy's access-log entries, each with `t` on this script's monotonic
    clock, its envoy index and its `proxy_ms` (see access_log)."""
    entries = []
    for i, path in enumerate(paths):
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                e = json.loads(line)
                start = float(e["start"])
            except (ValueError, KeyError, TypeError):
                continue
            duration = e.get("duration")
            if not isinstance(duration, (int, float)):
                continue
            tx, response = e.get("request_tx"), e.get("response")
            upstream = response - tx if isinstance(tx, (int, float)) and isinstance(response, (int, float)) else 0
            entries.append({**e, "t": start - clock_offset, "envoy": i, "proxy_ms": duration - upstream,
                            "asked": e.get("callout") in ("asked", "waited")})
    return entries


def slow_counts(entries: list[dict]) -> dict:
    callout = [e for e in entries if e["asked"]]
    rest = [e for e in entries if not e["asked"]]
    return {"callout_requests": len(callout),
            "callout_slow": sum(1 for e in callout if e["proxy_ms"] > SLOW_MS),
            "callout_max_ms": max((e["proxy_ms"] for e in callout), default=0),
            "other_requests": len(rest),
            "other_slow": sum(1 for e in rest if e["proxy_ms"] > SLOW_MS),
            "other_max_ms": max((e["proxy_ms"] for e in rest), default=0),
            "other_slow_with_upstream": sum(1 for e in rest if e["duration"] > SLOW_MS)}


def window_row(name: str, a: float, b: float, faulted: int | None, recs: list, entries: list[dict]) -> dict:
    """One window's figures; `faulted`: the Envoy the fault was done to
    (its attacks counted apart), None when both."""
    rs = [r for r in recs if a <= r[0] < b]
    att = [r for r in rs if r[1] == "attack"]
    on_faulted = [r for r in att if faulted is None or r[4] == faulted]
    real = [r for r in rs if r[1] == "real_login"]
    slow = slow_counts([e for e in entries if a <= e["t"] < b])
    return {"window": name, "seconds": round(b - a), "requests": len(rs),
            "5xx": sum(1 for r in rs if r[2] >= 500), "connection_errors": sum(1 for r in rs if r[2] == 0),
            "attack_refused": sum(1 for r in att if r[2] < 0), "attack": len(att),
            "faulted_envoy": "both" if faulted is None else "AB"[faulted],
            "attack_refused_on_faulted": sum(1 for r in on_faulted if r[2] < 0), "attack_on_faulted": len(on_faulted),
            "real_refused": sum(1 for r in real if r[2] in (403, 429)), "real": len(real),
            "slow_callout": slow["callout_slow"], "callout": slow["callout_requests"],
            "slow_other": slow["other_slow"], "other": slow["other_requests"]}


def print_table(rows: list[dict]):
    """The windows as a table: `a/b` is a of b (refused of attempts, slow of
    requests); `on faulted` the attack on the Envoy the fault was done to."""
    head = ("window", "s", "requests", "5xx", "conn err", "attack refused", "on faulted", "real refused",
            "slow: callout", "slow: other")
    widths = (44, 4, 8, 4, 8, 14, 14, 12, 13, 12)
    print(" ".join(f"{h:<{w}}" if k == 0 else f"{h:>{w}}" for k, (h, w) in enumerate(zip(head, widths))))
    for r in rows:
        cells = (r["window"], r["seconds"], r["requests"], r["5xx"], r["connection_errors"],
                 f"{r['attack_refused']}/{r['attack']}",
                 f"{r['faulted_envoy']} {r['attack_refused_on_faulted']}/{r['attack_on_faulted']}",
                 f"{r['real_refused']}/{r['real']}", f"{r['slow_callout']}/{r['callout']}",
                 f"{r['slow_other']}/{r['other']}")
        print(" ".join(f"{c:<{w}}" if k == 0 else f"{c:>{w}}" for k, (c, w) in enumerate(zip(cells, widths))))


def recognition(recs: list, t_live: float, envoy: int, horizon: float = 30) -> dict:
    """The attack on `envoy` in the `horizon` seconds after its new process
    went live (until then the old one answered): attempts passed and
    refused, the last passed one, and the sequence (x refused, . passed)."""
    att = sorted(r for r in recs if t_live <= r[0] < t_live + horizon and r[1] == "attack" and r[4] == envoy)
    passed = [r for r in att if r[2] > 0]
    return {"attack_after_live": f"{len(att) - len(passed)}/{len(att)} refused in {horizon:.0f} s",
            "last_passed_s_after_live": round(passed[-1][0] - t_live, 1) if passed else None,
            "sequence": "".join("x" if r[2] < 0 else "." for r in att)}


def attack_bursts(recs: list, start: float, gap: float = 2.0) -> list[dict]:
    """The attack attempts that were not refused, per Envoy, grouped into
    bursts (passed attempts less than `gap` seconds apart): when and how
    long the filter let the attack through, fault or no fault."""
    bursts = []
    for envoy in (0, 1):
        passed = sorted(r[0] for r in recs if r[1] == "attack" and r[4] == envoy and r[2] > 0)
        for t in passed:
            if bursts and bursts[-1]["envoy"] == "AB"[envoy] and t - bursts[-1]["_last"] < gap:
                bursts[-1]["_last"], bursts[-1]["passed"] = t, bursts[-1]["passed"] + 1
            else:
                bursts.append({"envoy": "AB"[envoy], "at_s": round(t - start, 1), "_last": t, "passed": 1})
    for b in bursts:
        b["seconds"] = round(b.pop("_last") - start - b["at_s"], 1)
    return bursts


def penalized(port: int, addr: str) -> bool:
    r = request(port, "GET", "/api/products?page=1", {"x-forwarded-for": addr, **browser(BROWSERS[0])})
    return blocked(r)


def put_in_penalty_box(port: int, addr: str) -> bool:
    """A client over the anonymous per-second limit (15/s): at most 40
    quick requests, until the filter refuses it (penalty box, 60 s)."""
    for _ in range(40):
        if penalized(port, addr):
            return True
    return False


def sum_counters(dicts: list[dict], names) -> dict:
    return {k: int(sum(d.get(k, 0) for d in dicts)) for k in names}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    stack = Stack()
    start = time.monotonic()
    clock_offset = time.time() - time.monotonic()  # access-log epoch times -> monotonic
    end = start + DURATION
    traffic = Traffic(stack, end)
    threads = [threading.Thread(target=traffic.benign, args=(w, 15.0), daemon=True) for w in range(2)]
    threads.append(threading.Thread(target=traffic.attack, args=(10.0,), daemon=True))
    threads.append(threading.Thread(target=traffic.borderline, args=(2.0,), daemon=True))
    threads.append(threading.Thread(target=traffic.account_thief, args=(0.8,), daemon=True))
    for t in threads:
        t.start()
    rss, windows = [], []

    def sample():
        while time.monotonic() < end:
            rss.append({"t": round(time.monotonic() - start), **{f"envoy{i}": rss_kib(e.envoy.proc.pid) for i, e in enumerate(stack.envoys)},
                        **{f"scorer{i}": rss_kib(s.proc.pid) for i, s in enumerate(stack.scorers)}})
            time.sleep(max(1.0, DURATION / 30))
    threading.Thread(target=sample, daemon=True).start()

    def at(fraction: float):
        time.sleep(max(0.0, start + fraction * DURATION - time.monotonic()))
        return time.monotonic()

    def window(name, t0, t1, faulted=None):
        windows.append((name, t0, t1, faulted))

    t0 = at(0.08); stack.kill_scorer(0)
    at(0.15); stack.restart_scorer(0); window("scorer A killed", t0, time.monotonic(), 0)
    t0 = at(0.20); stack.redis.proc.send_signal(signal.SIGKILL); stack.redis.proc.wait()
    at(0.27); stack.restart_redis(); window("redis killed", t0, time.monotonic())
    t0 = at(0.32); stack.redis.proc.send_signal(signal.SIGSTOP)
    at(0.39); stack.redis.proc.send_signal(signal.SIGCONT); window("redis paused (SIGSTOP)", t0, time.monotonic())
    t0 = at(0.45)
    reloaded = copy.deepcopy(config()); reloaded["risk"]["block_at"] = 90; reloaded["state"] = {"shards": 1024, "slots_per_shard": 32}
    stack.envoys[0].reload(reloaded); window("envoy A reloaded (new layout)", t0, time.monotonic() + 5, 0)
    t0 = at(0.53)
    # Does the filter's state survive? A client in B's penalty box before...
    probe = "198.51.100.77"
    boxed_before = put_in_penalty_box(stack.envoys[1].port, probe)
    restart = stack.restart_envoy(1)
    restart_live = time.monotonic()
    # ... and after (Envoy's shared data is per process; the scorer's warm
    # start refills it in pages, on the new process's first ticks).
    restart["probe_in_penalty_box_before"] = boxed_before
    restart["probe_in_penalty_box_after"] = penalized(stack.envoys[1].port, probe)
    time.sleep(3)
    restart["probe_in_penalty_box_3s_after"] = penalized(stack.envoys[1].port, probe)
    if restart.get("hot_restart_error"):
        print("hot restart failed, cold restart instead:", restart["hot_restart_error"])
    # Ten seconds from the new process's start: the old one drains for 2 s and
    # exits at 5 s; the attack's recognition in the new shared data shows here.
    window(f"envoy B {restart['kind']} restart", t0, time.monotonic() + 10, 1)
    t0 = at(0.62)
    fill = fill_table(stack.envoys[0], FILL_ADDRESSES, FILL_SECONDS)
    window(f"client table fill on A ({fill['requests']:,} addresses)", t0, time.monotonic(), 0)
    for t in threads:
        t.join(timeout=DURATION)
    stats = [e.envoy.stats() for e in stack.envoys]
    scorer_totals = sum_counters([*stack.gone_scorer_counters, *(scorer_counters(s) for s in stack.scorers)], SCORER_COUNTERS)
    traps = stack.stop()

    recs = traffic.records
    entries = server_timings(stack.access_logs, clock_offset)
    rows = [window_row("steady (includes the attack's recognition)", start, start + 0.08 * DURATION, None, recs, entries)]
    rows += [window_row(name, a, b, faulted, recs, entries) for name, a, b, faulted in windows]
    rows.append(window_row("whole run", start, end + 1, None, recs, entries))
    report = {"duration_s": DURATION, "requests_answered": sum(1 for r in recs if r[2] != 0),
              "connection_errors": sum(1 for r in recs if r[2] == 0), "status_5xx": sum(1 for r in recs if r[2] >= 500),
              "wasm_traps": len(traps), "traps": traps, "slow_ms_bound": SLOW_MS,
              "server_side_latency": slow_counts(entries), "access_log_entries": len(entries),
              "borderline_vpn_refused": sum(1 for r in recs if r[1] == "vpn_browse" and r[2] in (403, 429)),
              "borderline_vpn_requests": sum(1 for r in recs if r[1] == "vpn_browse"),
              "envoy_b_restart": {**restart, **recognition(recs, restart_live, 1)}, "fill": fill,
              "account_thief_refused": sum(1 for r in recs if r[1] == "account_thief" and r[2] in (403, 429)),
              "account_thief_requests": sum(1 for r in recs if r[1] == "account_thief"),
              "filter_counters": {"AB"[i]: sum_counters([*stack.gone_envoy_counters[i], stats[i]], FILTER_COUNTERS)
                                  for i in (0, 1)},
              "scorer_counters": scorer_totals, "attack_passed_bursts": attack_bursts(recs, start),
              "windows": rows, "rss_kib": rss}
    print_table(rows)
    print(json.dumps({k: v for k, v in report.items() if k not in ("windows", "rss_kib", "attack_passed_bursts")}, indent=1))
    print("Attack attempts not refused, in bursts (Envoy, seconds into the run, passed, lasting):",
          ", ".join(f"{b['envoy']} {b['at_s']:.0f} s: {b['passed']} in {b['seconds']} s" for b in report["attack_passed_bursts"]))
    print("RSS KiB over time (envoy0 envoy1 scorer0 scorer1):",
          " | ".join(f"{s['t']}s {s['envoy0']} {s['envoy1']} {s['scorer0']} {s['scorer1']}" for s in rss[:: max(1, len(rss) // 10)]))
    (OUT / "report.json").write_text(json.dumps(report, indent=1))
    # Every client-side answer, for a closer look (t relative to the start).
    (OUT / "records.json").write_text(json.dumps([(round(r[0] - start, 3), r[1], r[2], round(r[3], 1), r[4]) for r in recs]))


if __name__ == "__main__":
    main()
