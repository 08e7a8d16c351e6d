"""Real processes for integration tests: the demo API and Envoy with the built
filter, on free loopback ports, always stopped at the end.

Also used by `make run` (python3 tests/harness.py run) so that the stack the
tests exercise is the stack users start.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "abuse_filter.wasm"
# The dynamic-module build (libabuse_filter.so) and the directory Envoy
# searches for it (ENVOY_DYNAMIC_MODULES_SEARCH_PATH, set below for every
# Envoy the tests start).
MODULE_DIR = ROOT / "target" / "module"
MODULE = MODULE_DIR / "libabuse_filter.so"
# Which build the Envoys of this run load: "wasm" (the default) or
# "module" (`pytest --filter-build=module`, or ABUSE_FILTER_BUILD=module).
BUILDS = ("wasm", "module")
BUILD = os.environ.get("ABUSE_FILTER_BUILD", "wasm")
os.environ.setdefault("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", str(MODULE_DIR))
SCORER = ROOT / "target" / "release" / "abuse-scorer"
DEMO_API = ROOT / "examples" / "demo_api" / "server.py"
GEOIP_DIR = ROOT / "tests" / "data" / "geoip"

# Headers the GeoIP filter sets (as in envoy/envoy.yaml). They are stripped
# from incoming requests first: when a lookup finds nothing the GeoIP filter
# leaves a client-sent value in place.
GEO_HEADERS = {
    "country": "x-geo-country",
    "asn": "x-geo-asn",
    "anon_vpn": "x-geo-anon-vpn",
    "anon_hosting": "x-geo-anon-hosting",
    "anon_tor": "x-geo-anon-tor",
    "anon_proxy": "x-geo-anon-proxy",
}


def geoip_filters(geoip_dir: Path = GEOIP_DIR) -> list[dict]:
    """Strip client-sent geo headers, then Envoy's own GeoIP filter (MaxMind),
    looking up the connection manager's remote address: the peer, or the
    X-Forwarded-For entry a trusted proxy vouches for (see trusted_xff)."""
    return [
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {"request_mutations": [{"remove": h} for h in GEO_HEADERS.values()]},
            },
        },
        {
            "name": "envoy.filters.http.geoip",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.geoip.v3.Geoip",
                "provider": {
                    "name": "envoy.geoip_providers.maxmind",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.geoip_providers.maxmind.v3.MaxMindConfig",
                        "common_provider_config": {"geo_headers_to_add": GEO_HEADERS},
                        "city_db_path": str(geoip_dir / "GeoLite2-City-Test.mmdb"),
                        "asn_db_path": str(geoip_dir / "GeoLite2-ASN-Test.mmdb"),
                        "anon_db_path": str(geoip_dir / "GeoIP2-Anonymous-IP-Test.mmdb"),
                    },
                },
            },
        },
    ]


def envoy_binary() -> str:
    """The project-local Envoy (make deps), else one on PATH."""
    if os.environ.get("ENVOY"):
        return os.environ["ENVOY"]
    local = ROOT / ".venv" / "bin" / "envoy"
    if local.exists():
        return str(local)
    found = shutil.which("envoy")
    if not found:
        raise RuntimeError("no envoy binary: run `make deps`")
    return found


def envoy_command(*args: str) -> list[str]:
    """Envoy's command line; under ABUSE_TEST_ENVOY_CPUS (a CPU list such as
    `0`) every Envoy the tests start runs pinned there (`taskset`, which
    execs Envoy: the pid stays Envoy's) — the contention run of
    docs/development.md shares that CPU with a busy loop."""
    cpus = os.environ.get("ABUSE_TEST_ENVOY_CPUS")
    return [*(["taskset", "-c", cpus] if cpus else []), envoy_binary(), *args]


# Ports for the servers the tests start come from below the kernel's
# ephemeral range, one block per test process: an ephemeral port the OS
# handed us (bind to 0, close) may be handed next to any other socket —
# another test's server, or the local end of any outgoing connection — in
# the moment before our server binds it, and with the suite's passes and
# workers side by side that happened (a listener refused). Blocks are keyed
# by the build and the pytest-xdist worker, so no two concurrent test
# processes draw from the same one; within a block a port is handed out only
# if it binds now (nothing listening, nothing in TIME_WAIT).
PORT_BASE = 20000
PORT_SLOTS = 16  # two builds x eight workers


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_block() -> range:
    low = max(_ephemeral_low(), PORT_BASE + PORT_SLOTS * 64)
    size = (low - PORT_BASE) // PORT_SLOTS
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    slot = (1 if BUILD == "module" else 0) * 8 + (int(worker) if worker.isdigit() else 0) % 8
    start = PORT_BASE + slot * size
    return range(start, start + size)


_next_port: list[int] = []


def free_port() -> int:
    """A free port for a server a test starts (see PORT_BASE)."""
    block = _port_block()
    if not _next_port:
        # Another process of the same slot (the eval's subprocess) starts
        # elsewhere in the block.
        _next_port.append(os.getpid() * 7919 % len(block))
    for _ in range(len(block)):
        port = block[_next_port[0] % len(block)]
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    with socket.socket() as s:  # the whole block busy: the OS's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sleep_until(deadline: float):
    """Sleeps until time.monotonic() reaches `deadline` (at once if it has).
    Tests pace requests by this clock (request i at start + i * gap), so that a
    slow request does not push every later one back."""
    time.sleep(max(0.0, deadline - time.monotonic()))


def read_port_banner(proc: subprocess.Popen, timeout: float = 15) -> tuple[int | None, str]:
    """The port from a server's first stdout line, `... listening on
    http://127.0.0.1:PORT` (None if it did not come in time)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = ""
    m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
    return (int(m.group(1)) if m else None), line


class DemoApi:
    """The demo upstream on a free port."""

    def __init__(self, port: int = 0):
        self.proc = subprocess.Popen(
            [sys.executable, str(DEMO_API), "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        port, line = read_port_banner(self.proc)
        if port is None:
            self.stop()
            raise RuntimeError(f"demo api did not start: {line!r}")
        self.port = port

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def plugin_config_value(config: dict | str) -> str:
    return config if isinstance(config, str) else json.dumps(config)


# The direct peer's address, the request's start time (epoch ms) and the
# TLS JA4 fingerprint, as the filter's `client.facts_header` reads them (the
# same text as abuse_engine::facts::FACTS_HEADER_VALUE). The direct peer: the
# filter decides itself whether that peer is a proxy whose XFF it believes.
FACTS_HEADER_VALUE = "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT% %START_TIME(%s%3f)% %TLS_JA4_FINGERPRINT%"


def trusted_xff(plugin_config: dict | str) -> list[dict]:
    """The connection manager's original-IP detection for the filter's own
    `client.trusted_proxies`: X-Forwarded-For is believed only from those
    peers, so Envoy's remote address (GeoIP, access logs, source.address)
    is the client the filter sees. None trusted: the peer, whatever XFF says."""
    config = json.loads(plugin_config) if isinstance(plugin_config, str) else plugin_config
    try:
        proxies = (config.get("client") or {}).get("trusted_proxies") or []
    except AttributeError:
        proxies = []
    cidrs = []
    for text in proxies if isinstance(proxies, list) else []:
        if not isinstance(text, str):
            continue
        address, _, length = text.partition("/")
        if not length:
            length = "128" if ":" in address else "32"
        if not length.isdigit():
            continue
        cidrs.append({"address_prefix": address, "prefix_len": int(length)})
    xff = {"@type": "type.googleapis.com/envoy.extensions.http.original_ip_detection.xff.v3.XffConfig"}
    if cidrs:
        xff["xff_trusted_cidrs"] = {"cidrs": cidrs}
    else:
        # No trusted proxy: the peer is the client (Envoy still appends it to XFF).
        return []
    return [{"name": "envoy.http.original_ip_detection.xff", "typed_config": xff}]


def facts_filter(header: str, value: str = FACTS_HEADER_VALUE) -> dict:
    """Envoy's native header_mutation filter writing the facts header; it
    overwrites any copy the client sent."""
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"append": {
                "header": {"key": header, "value": value},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }}]},
        },
    }


def remote_address(plugin_config: dict | str) -> dict:
    """How the connection manager names the client: from trusted proxies'
    XFF only (trusted_xff), else the peer itself (use_remote_address)."""
    try:
        detection = trusted_xff(plugin_config)
    except (ValueError, TypeError):
        detection = []
    if detection:
        return {"original_ip_detection_extensions": detection}
    return {"use_remote_address": True}


def wasm_http_filter(plugin_config: dict | str, wasm: Path = WASM, env_keys: list[str] | None = None,
                     stop_iteration: bool = True) -> dict:
    """The abuse filter as Envoy's Wasm HTTP filter."""
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "abuse_filter",
                "root_id": "abuse_filter",
                "failure_policy": "FAIL_RELOAD",
                # Needed by credential_stuffing.hold_login_headers (Envoy >= 1.35).
                "allow_on_headers_stop_iteration": stop_iteration,
                "vm_config": {
                    "vm_id": "abuse_filter",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(wasm)}},
                    **({"environment_variables": {"host_env_keys": env_keys}} if env_keys else {}),
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": plugin_config_value(plugin_config),
                },
            },
        },
    }


def module_http_filter(plugin_config: dict | str, module: str = "abuse_filter") -> dict:
    """The abuse filter as an Envoy dynamic module (libabuse_filter.so in
    ENVOY_DYNAMIC_MODULES_SEARCH_PATH): the same JSON configuration, as a
    StringValue. A native module reads the process environment itself (no
    host_env_keys), and keeps request headers while it reads the body (no
    allow_on_headers_stop_iteration)."""
    return {
        "name": "envoy.filters.http.dynamic_modules",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": {"name": module},
            "filter_name": "abuse_filter",
            "filter_config": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": plugin_config_value(plugin_config),
            },
        },
    }


def abuse_http_filter(plugin_config: dict | str, build: str | None = None, **wasm_options) -> dict:
    """The abuse filter of this run's build (BUILD) or of `build`."""
    if (build or BUILD) == "module":
        return module_http_filter(plugin_config)
    return wasm_http_filter(plugin_config, **wasm_options)


def plugin_config_of(http_filter: dict) -> str | None:
    """The abuse filter's JSON configuration in an HTTP filter of either
    build (None for any other filter)."""
    tc = http_filter.get("typed_config", {})
    if http_filter.get("name") == "envoy.filters.http.wasm" and tc.get("config", {}).get("root_id") == "abuse_filter":
        return tc["config"]["configuration"]["value"]
    if http_filter.get("name") == "envoy.filters.http.dynamic_modules" and tc.get("filter_name") == "abuse_filter":
        return tc["filter_config"]["value"]
    return None


def set_plugin_config(http_filter: dict, value: str) -> bool:
    """Replaces the abuse filter's JSON configuration in an HTTP filter of
    either build; False for any other filter."""
    if plugin_config_of(http_filter) is None:
        return False
    tc = http_filter["typed_config"]
    if http_filter["name"] == "envoy.filters.http.wasm":
        tc["config"]["configuration"]["value"] = value
    else:
        tc["filter_config"]["value"] = value
    return True


def without_facts_header(value: str) -> tuple[str, str | None]:
    """The filter's JSON configuration without `client.facts_header`, and the
    header it named (deploy/module/make_bootstrap.py's rule, shared)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_bootstrap", ROOT / "deploy" / "module" / "make_bootstrap.py")
    mb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mb)
    return mb.without_facts_header(value)


def _drop_facts_writer(hcm: dict, header: str) -> None:
    """The connection manager without what exists for the facts header: the
    header_mutation entry writing it (the filter too, when that was all it
    did) and the route's removal of it."""
    filters = hcm.get("http_filters", [])
    for f in list(filters):
        if f.get("name") != "envoy.filters.http.header_mutation":
            continue
        mutations = f["typed_config"].get("mutations", {})
        request_mutations = mutations.get("request_mutations", [])
        kept = [m for m in request_mutations if m.get("append", {}).get("header", {}).get("key", "").lower() != header.lower()]
        if len(kept) == len(request_mutations):
            continue
        if kept:
            mutations["request_mutations"] = kept
        elif len(mutations) == 1 and len(f["typed_config"]) == 2:
            filters.remove(f)
        else:
            mutations.pop("request_mutations")
    route_config = hcm.get("route_config", {})
    remove = route_config.get("request_headers_to_remove")
    if remove is not None:
        remove = [h for h in remove if h.lower() != header.lower()]
        if remove:
            route_config["request_headers_to_remove"] = remove
        else:
            route_config.pop("request_headers_to_remove")


def as_build(bootstrap: dict, build: str | None = None) -> dict:
    """A bootstrap with every abuse filter swapped for the given build's
    (default: this run's): the shipped bootstrap (envoy/envoy.yaml, the wasm
    filter) as the module build. The module goes without the facts header
    (`client.facts_header` and the header_mutation entry writing it): it
    reads the peer and the clock for a plain call (docs/deploying.md)."""
    import copy
    out = copy.deepcopy(bootstrap)
    module = (build or BUILD) == "module"
    for listener in out.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for net in chain.get("filters", []):
                hcm = net.get("typed_config", {})
                filters = hcm.get("http_filters", [])
                facts = []
                for i, f in enumerate(filters):
                    value = plugin_config_of(f)
                    if value is None:
                        continue
                    if module:
                        value, header = without_facts_header(value)
                        facts += [header] if header else []
                        filters[i] = module_http_filter(value)
                    elif f["name"] != "envoy.filters.http.wasm":
                        filters[i] = wasm_http_filter(value)
                for header in facts:
                    _drop_facts_writer(hcm, header)
    return out


def envoy_config(
    plugin_config: dict | str,
    port: int,
    admin_port: int,
    upstream_port: int,
    wasm: Path = WASM,
    with_filter: bool = True,
    geoip: bool = False,
    scorer_port: int | None = None,
    env_keys: list[str] | None = None,
    stop_iteration: bool = True,
    facts_header: str | None = None,
    access_log: list[dict] | None = None,
    pre_filters: list[dict] | None = None,
) -> dict:
    """An Envoy bootstrap: the abuse filter in front of the demo API, plus a
    direct-response route `/direct` (no upstream) for load tests.
    `facts_header`: Envoy's header_mutation filter first, writing the
    request's facts into that header (set `client.facts_header` to match),
    and the route configuration removing it before the upstream.
    `access_log`: the connection manager's access loggers."""
    # `pre_filters`: HTTP filters first of all (say jwt_authn and the
    # header_mutation writing its verified subject).
    filters = list(pre_filters or [])
    filters += [facts_filter(facts_header)] if facts_header else []
    filters += geoip_filters() if geoip else []
    if with_filter:
        filters.append(abuse_http_filter(plugin_config, wasm=wasm, env_keys=env_keys, stop_iteration=stop_iteration))
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }
    )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "api",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "api",
                                        "http_protocol_options": {"accept_http_10": True},
                                        **remote_address(plugin_config),
                                        "route_config": {
                                            # The facts header is for the abuse filter only: the
                                            # router drops it on the way upstream (no wasm cost).
                                            **({"request_headers_to_remove": [facts_header]} if facts_header else {}),
                                            "virtual_hosts": [
                                                {
                                                    "name": "api",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/direct"},
                                                            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
                                                        },
                                                        {"match": {"prefix": "/"}, "route": {"cluster": "demo_api"}},
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": filters,
                                        **({"access_log": access_log} if access_log else {}),
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": ([scorer_cluster(scorer_port)] if scorer_port else []) + [
                {
                    "name": "demo_api",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    # Envoy closes an idle upstream connection before the demo
                    # API does (60 s): else a request can go out on a connection
                    # the upstream is closing, and Envoy answers 503.
                    "typed_extension_protocol_options": UPSTREAM_IDLE,
                    "load_assignment": {
                        "cluster_name": "demo_api",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": "127.0.0.1", "port_value": upstream_port}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


UPSTREAM_IDLE = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "common_http_protocol_options": {"idle_timeout": "30s"},
        "explicit_http_config": {"http_protocol_options": {}},
    }
}


def scorer_cluster(port: int) -> dict:
    return {
        "name": "abuse_scorer",
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": "abuse_scorer",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }


class Scorer:
    """The scoring service binary on a free port (memory store unless redis_url)."""

    def __init__(self, *args: str, port: int = 0, redis_url: str | None = None, secret: str | None = None,
                 state_dir: Path | None = None, env: dict | None = None, operator_token: str | None = None):
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="abuse-scorer-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(SCORER), "--listen", f"127.0.0.1:{port}", "--state-dir", str(self.state_dir), *args]
        if redis_url:
            cmd += ["--redis-url", redis_url]
        full_env = dict(os.environ, **(env or {}))
        full_env.pop("ABUSE_SCORER_SECRET", None)
        full_env.pop("ABUSE_OPERATOR_TOKEN", None)
        if secret:
            full_env["ABUSE_SCORER_SECRET"] = secret
        # Without a token the dashboard and /metrics answer 127.0.0.1 only
        # (the harness's own address); with one they need it as a bearer.
        self.operator_token = operator_token
        if operator_token:
            full_env["ABUSE_OPERATOR_TOKEN"] = operator_token
        self.log_path = self.state_dir / "scorer.log"
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env=full_env)
        port, line = read_port_banner(self.proc)
        if port is None:
            self.stop()
            raise RuntimeError(f"scorer did not start: {line!r} {self.log()[-2000:]}")
        self.port = port
        # Keep draining stdout so the scorer never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def operator_headers(self) -> dict:
        return {"authorization": f"Bearer {self.operator_token}"} if self.operator_token else {}

    def metrics(self) -> str:
        resp = request(self.port, "GET", "/metrics", headers=self.operator_headers())
        assert resp.status == 200, f"/metrics: {resp.status} {resp.body[:200]!r}"
        return resp.body.decode()

    def metric(self, name: str, **labels) -> float:
        """Sum of a Prometheus metric's samples whose labels include `labels`."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, label_text = head.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Redis:
    """A real redis-server on a free loopback port, no persistence."""

    def __init__(self):
        binary = shutil.which("redis-server")
        if not binary:
            raise RuntimeError("redis-server is needed (Debian: apt-get install redis-server)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        def up():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False
        wait_until(up, 10, 0.05, "redis")
        self.url = f"redis://127.0.0.1:{self.port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class Envoy:
    """A real Envoy process with the given bootstrap, on free ports.

    `hot_restart`: started as epoch 0 of Envoy's hot restart (else with it
    disabled), so that `hot_restart()` can replace the process in place."""

    def __init__(self, bootstrap: dict, admin_port: int, port: int, concurrency: int = 2, wait: bool = True,
                 hot_restart: bool = False, drain_s: int = 2, parent_shutdown_s: int = 5):
        self.port = port
        self.admin_port = admin_port
        self.concurrency = concurrency
        self.dir = Path(tempfile.mkdtemp(prefix="abuse-envoy-"))
        self.config_path = self.dir / "envoy.json"
        self.config_path.write_text(json.dumps(bootstrap, indent=1))
        self.log_path = self.dir / "envoy.log"
        self._log = open(self.log_path, "w")
        self.epoch = 0 if hot_restart else None
        self.restart_flags = ["--drain-time-s", str(drain_s), "--parent-shutdown-time-s", str(parent_shutdown_s)]
        self.parents: list[subprocess.Popen] = []
        self.proc = self._spawn()
        if wait:
            try:
                wait_until(self.ready, 30, 0.1, "envoy to be ready")
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"envoy did not start:\n{self.log()[-4000:]}")

    def _spawn(self) -> subprocess.Popen:
        """The Envoy process of the current epoch (all epochs share the log:
        the same open file, so their lines interleave, never overwrite)."""
        restart = ["--disable-hot-restart"] if self.epoch is None else ["--restart-epoch", str(self.epoch), *self.restart_flags]
        return subprocess.Popen(
            envoy_command(
                "-c", str(self.config_path),
                "--concurrency", str(self.concurrency),
                "--base-id", str(self.port),  # lets several Envoys run side by side
                "--log-level", os.environ.get("ABUSE_ENVOY_LOG_LEVEL", "info"),
                *restart,
            ),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def hot_restart(self, timeout: float = 30):
        """Envoy's hot restart: a new process (the next epoch, same base id
        and bootstrap) takes the listen sockets over from the running one
        through the hot-restart domain socket; the old one drains for
        `drain_s` and is told to exit after `parent_shutdown_s`. Returns
        when the new process is ready: the admin (the old one closes its own
        when the new one starts) says LIVE for the new epoch."""
        if self.epoch is None:
            raise RuntimeError("this Envoy was started with hot restart disabled")
        self.epoch += 1
        self.parents.append(self.proc)
        self.proc = self._spawn()

        def new_epoch_live() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy epoch {self.epoch} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                status, body = self.admin("/server_info")
                info = json.loads(body) if status == 200 else {}
            except (OSError, ValueError):
                return False
            return info.get("state") == "LIVE" and info.get("command_line_options", {}).get("restart_epoch") == self.epoch

        try:
            wait_until(new_epoch_live, timeout, 0.05, f"envoy epoch {self.epoch} to be live")
        except TimeoutError:
            raise RuntimeError(f"hot restart to epoch {self.epoch} failed:\n{self.log()[-4000:]}")

    @classmethod
    def with_filter(cls, plugin_config, upstream_port: int, concurrency: int = 2, wait: bool = True, **kw):
        port, admin = free_port(), free_port()
        return cls(envoy_config(plugin_config, port, admin, upstream_port, **kw), admin, port, concurrency, wait)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        try:
            status, body = self.admin("/ready")
            return status == 200 and body.strip() == "LIVE"
        except OSError:
            return False

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def admin(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def stats(self) -> dict[str, int]:
        """Counters of this filter, without the host's prefix."""
        return filter_stats(self.admin_port)

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)

    def wait_stat(self, name: str, at_least: int, timeout: float = 10) -> int:
        return wait_until(
            lambda: (v := self.stat(name)) >= at_least and v, timeout, 0.1, f"stat {name} >= {at_least}"
        )

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        """Stops Envoy; fails if the filter ever trapped (a panic is a bug
        even when FAIL_RELOAD hides it from clients)."""
        for proc in [*self.parents, self.proc]:  # earlier epochs normally exited already
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._log.closed:
            return
        log = self.log()
        self._log.close()
        if os.environ.get("ABUSE_KEEP_ENVOY_LOGS"):
            keep = Path(os.environ["ABUSE_KEEP_ENVOY_LOGS"])
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.log_path, keep / f"{self.dir.name}.log")
        shutil.rmtree(self.dir, ignore_errors=True)
        trap = re.search(r"panicked at .*|Function: proxy_\w+ failed.*|abuse_filter: a hook panicked.*", log)
        if trap:
            raise AssertionError(f"the filter trapped (or, as a module, panicked): {trap.group(0)}")


def filter_stats(admin_port: int) -> dict[str, int]:
    """The abuse filter's counters from an Envoy admin, without the host's
    prefix (the same names for both builds)."""
    text = request(admin_port, "GET", "/stats?filter=abuse_filter").body.decode(errors="replace")
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            # wasm: `wasmcustom.`; dynamic module: `dynamicmodulescustom.`.
            out[name.removeprefix("wasmcustom.").removeprefix("dynamicmodulescustom.")] = int(value)
    return out


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def request(port: int, method: str = "GET", path: str = "/", headers: dict | None = None, body=None,
            conn: http.client.HTTPConnection | None = None) -> Response:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers = {"content-type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        if own:
            conn.close()


def blast(port: int, raw_requests: list[bytes], connections: int = 32, timeout: float = 300) -> list[int]:
    """Sends many HTTP/1.1 requests over `connections` keep-alive connections
    (one in flight per connection: Envoy does not serve pipelined requests)
    and returns the statuses. Responses must carry a content-length."""
    import asyncio

    async def worker(chunk: list[bytes]) -> list[int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        statuses = []
        try:
            for raw in chunk:
                writer.write(raw)
                head = await reader.readuntil(b"\r\n\r\n")
                text = head.decode("latin-1")
                m = re.search(r"content-length:\s*(\d+)", text, re.I)
                if m:
                    await reader.readexactly(int(m.group(1)))
                statuses.append(int(text.split(" ", 2)[1]))
        finally:
            writer.close()
        return statuses

    async def main() -> list[int]:
        chunks = [raw_requests[i::connections] for i in range(connections)]
        results = await asyncio.wait_for(asyncio.gather(*(worker(c) for c in chunks if c)), timeout)
        return [s for r in results for s in r]

    return asyncio.run(main())


class DemoStack:
    """The running `make run` stack: demo API, scorer and Envoy (a process
    started with a bootstrap file)."""

    def __init__(self, api: DemoApi, scorer: Scorer, port: int, admin_port: int, bootstrap: Path, log_path: Path,
                 concurrency: int = 2):
        self.api, self.scorer, self.envoy = api, scorer, None
        self.port, self.admin_port, self.bootstrap, self.log_path = port, admin_port, bootstrap, log_path
        self.concurrency = concurrency

    def start_envoy(self, log_path: Path | None = None, append: bool = False):
        """Starts Envoy with the stack's bootstrap (from the repository root:
        its paths are relative to it) and waits until it is ready."""
        self.log_path = log_path or self.log_path
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a" if append else "w") as log:
            self.envoy = subprocess.Popen(
                envoy_command("-c", str(self.bootstrap), "--concurrency", str(self.concurrency), "--log-level", "info",
                              "--base-id", str(self.admin_port), "--disable-hot-restart"),
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )

        def envoy_ready() -> bool:
            if self.envoy.poll() is not None:
                raise RuntimeError(f"envoy exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                return request(self.admin_port, "GET", "/ready").status == 200
            except OSError:
                return False

        wait_until(envoy_ready, 30, 0.1, "envoy")

    def stop_envoy(self):
        if self.envoy is not None and self.envoy.poll() is None:
            self.envoy.terminate()
            try:
                self.envoy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.envoy.kill()
                self.envoy.wait()

    def restart_envoy(self, log_path: Path | None = None, before_start=None):
        """Stops Envoy and starts it again with the same bootstrap (a new
        process: its shared data is gone; the demo API and the scorer keep
        running). `before_start` runs in between, e.g. to move the first
        process's logs aside."""
        self.stop_envoy()
        if before_start is not None:
            before_start()
        self.start_envoy(log_path)

    def running(self) -> bool:
        return (self.envoy is not None and self.envoy.poll() is None and self.api.proc.poll() is None
                and self.scorer.proc.poll() is None)

    def stats(self) -> dict[str, int]:
        return filter_stats(self.admin_port)


@contextlib.contextmanager
def demo_stack(bootstrap, api_port: int = 8080, scorer_port: int = 8081, port: int = 10000, admin_port: int = 9901,
               log_path: Path = ROOT / "target" / "run" / "envoy.log",
               scorer_state_dir: Path = ROOT / "target" / "scorer", concurrency: int = 2,
               operator_token: str | None = None):
    """Starts the `make run` stack and stops it on exit: the demo API, the
    scoring service (Redis when REDIS_URL is set) and Envoy with `bootstrap`,
    run from the repository root (its paths are relative to it).

    `bootstrap` is a path, or a function (api_port, scorer_port) -> path for
    when the servers pick free ports (api_port/scorer_port 0); `port` and
    `admin_port` must be the ones the bootstrap uses."""
    # Envoy and the scorer share it through the environment; a fresh random
    # one per run unless the caller set one (never a published placeholder).
    os.environ.setdefault("ABUSE_SCORER_SECRET", secrets.token_hex(32))
    api = DemoApi(api_port)
    scorer = stack = None
    try:
        scorer = Scorer(port=scorer_port, redis_url=os.environ.get("REDIS_URL"),
                        secret=os.environ["ABUSE_SCORER_SECRET"], state_dir=scorer_state_dir,
                        operator_token=operator_token)
        path = Path(bootstrap(api.port, scorer.port) if callable(bootstrap) else bootstrap)
        stack = DemoStack(api, scorer, port, admin_port, path, log_path, concurrency)
        stack.start_envoy()
        yield stack
    finally:
        if stack is not None:
            stack.stop_envoy()
        if scorer is not None:
            scorer.stop()
        api.stop()


def run_stack(bootstrap: Path, api_port: int = 8080, port: int = 10000, admin_port: int = 9901):
    """`make run`: the demo API and Envoy with the shipped bootstrap
    (envoy/envoy.yaml), in the foreground until Ctrl-C. The operator token
    (dashboard, operator API, `abuse-scorer ctl`) is ABUSE_OPERATOR_TOKEN
    when set, else a fresh random one, printed below."""
    token = os.environ.get("ABUSE_OPERATOR_TOKEN") or secrets.token_hex(32)
    generated = not os.environ.get("ABUSE_OPERATOR_TOKEN")
    try:
        with demo_stack(bootstrap, api_port=api_port, port=port, admin_port=admin_port,
                        operator_token=token) as stack:
            scorer_url = f"http://127.0.0.1:{stack.scorer.port}"
            # A token the user chose is never echoed; a generated one must be,
            # or nobody could sign in.
            if generated:
                token_line = f"{token}  (generated; export ABUSE_OPERATOR_TOKEN=... to choose one)"
                signed_in = f"{scorer_url}/?token={token}"
                cli = f"ABUSE_OPERATOR_TOKEN={token} ABUSE_SCORER_URL={scorer_url} target/release/abuse-scorer ctl decisions list"
            else:
                token_line = "from ABUSE_OPERATOR_TOKEN"
                signed_in = f"{scorer_url}/  (the page asks for the token once per tab)"
                cli = f"ABUSE_SCORER_URL={scorer_url} target/release/abuse-scorer ctl decisions list"

            print(
                f"""
abuse filter demo stack is up (Ctrl-C to stop)
  API through Envoy + filter : http://127.0.0.1:{port}  (curl -i http://127.0.0.1:{port}/api/products?page=1)
  demo API, direct           : http://127.0.0.1:{stack.api.port}
  scorer + dashboard         : {scorer_url}/  ({'Redis ' + os.environ['REDIS_URL'] if os.environ.get('REDIS_URL') else 'in memory; REDIS_URL=... to use Redis'})
  operator token             : {token_line}
  dashboard, signed in       : {signed_in}
  operator CLI               : {cli}
  Envoy admin                : http://127.0.0.1:{admin_port}  (stats: /stats?filter=abuse_filter, /stats/prometheus)
  Envoy bootstrap            : {bootstrap}
  Envoy log (block lines)    : {stack.log_path}
""",
                flush=True,
            )
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            while not stop.is_set() and stack.running():
                stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    print("stopped", flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Start the demo stack.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--bootstrap", type=Path, default=ROOT / "envoy" / "envoy.yaml")
    run.add_argument("--build", choices=BUILDS, default=BUILD,
                     help="the filter build: the .wasm (default) or the dynamic module (make run FILTER=module)")
    args = parser.parse_args()
    bootstrap = args.bootstrap
    if args.build != "wasm":
        # The same bootstrap with the abuse filter as the dynamic module.
        import yaml
        out = ROOT / "target" / "run" / f"{bootstrap.stem}.{args.build}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(as_build(yaml.safe_load(bootstrap.read_text()), args.build), indent=1))
        bootstrap = out
    run_stack(bootstrap)
