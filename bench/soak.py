"""make soak (not a test): faults under load.

Two Envoys (the built filter, LDS from a watched file), two scorers sharing
one Redis, the demo API; benign traffic (browsing, real users logging into
their own accounts) and a credential-stuffing tool rotating addresses, all
paced by the clock, while a fault script runs: kill and restart a scorer,
kill and restart Redis, SIGSTOP Redis (calls hang) then SIGCONT, reload the
filter configuration on a running Envoy, restart the other Envoy, fill the
client table with rotating addresses (wrk). Prints the report the issue
asks for and writes target/soak/report.json.

  SOAK_SECONDS (default 600)  total duration; faults at fixed fractions of it
  SOAK_FILL_SECONDS (default 60)  how long wrk fills the client table
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

from harness import DemoApi, Redis, Scorer, request, wait_until  # noqa: E402
from test_disguise_envoy import BROWSERS, blocked, browser, shipped_config  # noqa: E402
from test_reload_envoy import LdsEnvoy  # noqa: E402

DURATION = float(os.environ.get("SOAK_SECONDS", "600"))
FILL_SECONDS = float(os.environ.get("SOAK_FILL_SECONDS", "60"))
SECRET = "soak-secret"
TIMEOUT_MS = 50
TOOL = {"user-agent": "python-requests/2.31.0", "accept": "*/*"}


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


class Stack:
    def __init__(self):
        os.environ["ABUSE_SCORER_SECRET"] = SECRET
        self.api = DemoApi()
        self.redis = Redis()
        self.redis_port = self.redis.port
        self.scorers = [Scorer(redis_url=self.redis.url, secret=SECRET) for _ in range(2)]
        self.envoys = [self.start_envoy(i) for i in range(2)]
        self.lock = threading.Lock()

    def start_envoy(self, i: int) -> LdsEnvoy:
        return LdsEnvoy(config(), self.api.port, scorer_port=self.scorers[i].port, env_keys=["ABUSE_SCORER_SECRET"])

    def restart_scorer(self, i: int):
        port = self.scorers[i].port
        self.scorers[i] = Scorer(port=port, redis_url=self.redis.url, secret=SECRET)

    def restart_redis(self):
        binary = "redis-server"
        self.redis.proc = subprocess.Popen(
            [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

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
    """Paced clients; every answer recorded as (t, kind, status, ms)."""

    def __init__(self, stack: Stack, end: float):
        self.stack, self.end, self.records, self.lock = stack, end, [], threading.Lock()

    def record(self, kind: str, fn):
        t0 = time.monotonic()
        try:
            status = fn()
        except OSError:
            status = 0  # connection refused while an Envoy restarts
        with self.lock:
            self.records.append((t0, kind, status, (time.monotonic() - t0) * 1000))

    def envoy_port(self, n: int) -> int:
        return self.stack.envoys[n % 2].port

    def benign(self, worker: int, rate: float):
        rng, i, start = random.Random(worker), 0, time.monotonic()
        while time.monotonic() < self.end:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            u = rng.randrange(1, 121)
            addr = f"203.0.113.{u}" if u < 100 else f"2001:db8:77::{u:x}"
            headers = {"x-forwarded-for": addr, **browser(BROWSERS[u % 3])}
            port = self.envoy_port(i)
            if i % 10 == 0:
                body = {"username": f"user{u:04d}", "password": f"pass-{u:04d}"}
                self.record("real_login", lambda: request(port, "POST", "/api/login", headers, body).status)
            else:
                self.record("browse", lambda: request(port, "GET", f"/api/products?page={u % 5 + 1}", headers).status)
            i += 1

    def attack(self, rate: float):
        rng, i, start = random.Random(99), 0, time.monotonic()
        while time.monotonic() < self.end:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            addr = f"100.{64 + i % 60}.{i // 60 % 256}.{rng.randrange(1, 255)}"
            body = {"username": f"leak{rng.randrange(10**6)}@mail.example", "password": "Summer1!"}
            port = self.envoy_port(i)
            self.record("attack", lambda: self._attack(port, addr, body))
            i += 1

    def _attack(self, port, addr, body):
        r = request(port, "POST", "/api/login", {"x-forwarded-for": addr, **TOOL}, body)
        return -r.status if blocked(r) else r.status  # negative: refused by the filter


FILL_LUA = """
counter = 0
request = function()
  counter = counter + 1
  local a = counter
  local xff = string.format("%d.%d.%d.%d", 20 + (a >> 24) % 200, (a >> 16) % 256, (a >> 8) % 256, a % 256)
  return wrk.format("GET", "/api/products?page=1", {["x-forwarded-for"] = xff})
end
"""


def fill_table(port: int, seconds: float) -> int:
    script = ROOT / "target" / "soak" / "fill.lua"
    script.write_text(FILL_LUA)
    out = subprocess.run(["wrk", "-t1", "-c16", f"-d{max(1, int(seconds))}s", "-s", str(script), f"http://127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    for line in out.splitlines():
        if "requests in" in line:
            return int(line.split()[0])
    return 0


def main():
    (ROOT / "target" / "soak").mkdir(parents=True, exist_ok=True)
    stack = Stack()
    start = time.monotonic()
    end = start + DURATION
    traffic = Traffic(stack, end)
    threads = [threading.Thread(target=traffic.benign, args=(w, 15.0), daemon=True) for w in range(2)]
    threads.append(threading.Thread(target=traffic.attack, args=(10.0,), daemon=True))
    for t in threads:
        t.start()
    rss, windows, filled = [], [], 0

    def sample():
        while time.monotonic() < end:
            rss.append({"t": round(time.monotonic() - start), **{f"envoy{i}": rss_kib(e.envoy.proc.pid) for i, e in enumerate(stack.envoys)},
                        **{f"scorer{i}": rss_kib(s.proc.pid) for i, s in enumerate(stack.scorers)}})
            time.sleep(max(1.0, DURATION / 30))
    threading.Thread(target=sample, daemon=True).start()

    def at(fraction: float):
        time.sleep(max(0.0, start + fraction * DURATION - time.monotonic()))
        return time.monotonic()

    def window(name, t0, t1):
        windows.append((name, t0, t1))

    t0 = at(0.10); stack.scorers[0].proc.send_signal(signal.SIGKILL); stack.scorers[0].proc.wait()
    at(0.18); stack.restart_scorer(0); window("scorer A killed", t0, time.monotonic())
    t0 = at(0.25); stack.redis.proc.send_signal(signal.SIGKILL); stack.redis.proc.wait()
    at(0.32); stack.restart_redis(); window("redis killed", t0, time.monotonic())
    t0 = at(0.40); stack.redis.proc.send_signal(signal.SIGSTOP)
    at(0.47); stack.redis.proc.send_signal(signal.SIGCONT); window("redis paused (SIGSTOP)", t0, time.monotonic())
    t0 = at(0.55)
    reloaded = copy.deepcopy(config()); reloaded["risk"]["block_at"] = 90; reloaded["state"] = {"shards": 1024, "slots_per_shard": 32}
    stack.envoys[0].reload(reloaded); window("envoy A reloaded (new layout)", t0, time.monotonic() + 5)
    t0 = at(0.65)
    old = stack.envoys[1]; stack.envoys[1] = stack.start_envoy(1)
    try:
        old.stop()
    except AssertionError as err:
        print("TRAP:", err)
    window("envoy B restarted", t0, time.monotonic() + 5)
    t0 = at(0.75); filled = fill_table(stack.envoys[0].port, min(FILL_SECONDS, 0.15 * DURATION))
    window(f"client table filled ({filled:,} addresses)", t0, time.monotonic())
    for t in threads:
        t.join(timeout=DURATION)
    stats = [e.envoy.stats() for e in stack.envoys]
    traps = stack.stop()

    recs = traffic.records
    def share(rs, pred):
        return (sum(1 for r in rs if pred(r)), len(rs))
    five = sum(1 for r in recs if r[2] >= 500)
    slow = sum(1 for r in recs if r[3] > TIMEOUT_MS + 10 and r[1] != "attack")
    report = {"duration_s": DURATION, "requests_answered": sum(1 for r in recs if r[2] != 0),
              "connection_errors": sum(1 for r in recs if r[2] == 0), "status_5xx": five, "wasm_traps": len(traps),
              "slow_past_timeout_plus_10ms": slow, "client_table_fill": filled, "rss_kib": rss, "windows": []}
    print(f"{'window':38} {'requests':>9} {'5xx':>5} {'attack refused':>15} {'real users refused':>19}")
    for name, a, b in [("steady", start, start + 0.10 * DURATION)] + windows:
        rs = [r for r in recs if a <= r[0] < b]
        att = [r for r in rs if r[1] == "attack"]
        real = [r for r in rs if r[1] == "real_login"]
        refused, n = share(att, lambda r: r[2] < 0)
        real_refused = sum(1 for r in real if r[2] in (403, 429))
        row = {"window": name, "requests": len(rs), "5xx": sum(1 for r in rs if r[2] >= 500),
               "attack_refused": refused, "attack": n, "real_refused": real_refused, "real": len(real)}
        report["windows"].append(row)
        print(f"{name:38} {len(rs):>9} {row['5xx']:>5} {f'{refused}/{n}':>15} {f'{real_refused}/{len(real)}':>19}")
    lost = {k: sum(s.get(k, 0) for s in stats) for k in ("abuse_filter.scorer.batch_items_dropped",
            "abuse_filter.scorer.batches_sent", "abuse_filter.scorer.fleet_verdicts_applied", "abuse_filter.scorer.failed",
            "abuse_filter.scorer.timed_out", "abuse_filter.shared_data.errors")}
    report["counters"] = lost
    print(json.dumps({k: v for k, v in report.items() if k not in ("windows", "rss_kib")}, indent=1))
    print("RSS KiB over time (envoy0 envoy1 scorer0 scorer1):",
          " | ".join(f"{s['t']}s {s['envoy0']} {s['envoy1']} {s['scorer0']} {s['scorer1']}" for s in rss[:: max(1, len(rss) // 8)]))
    (ROOT / "target" / "soak" / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
