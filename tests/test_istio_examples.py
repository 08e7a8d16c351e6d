"""examples/istio, validated offline: the WasmPlugin against Istio's CRD
schema (npm @kubernetes-models/istio, in deploy/validate) plus an unknown-key
check, the core kinds with PyPI kubernetes-validate (strict), the files
consistent with each other — and the plugin configuration run on the real
Envoy the way Istio hands it over: pluginConfig as JSON in a StringValue,
plugin name <namespace>.<name>, the scorer reached through a cluster named
like Istio's outbound cluster."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from harness import FACTS_HEADER_VALUE, ROOT, DemoApi, Envoy, Scorer, envoy_config, free_port, request  # noqa: E402

ISTIO = ROOT / "examples" / "istio"
VALIDATE = ROOT / "deploy" / "validate"
VENV_BIN = Path(sys.executable).parent


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ISTIO / name).read_text()) if d]


def plugin() -> dict:
    (wp,) = [d for d in docs("wasmplugin.yaml") if d["kind"] == "WasmPlugin"]
    return wp


def validate_istio(objects: list[dict]) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    assert node, "node is needed (Debian: apt-get install nodejs)"
    assert (VALIDATE / "node_modules" / "@kubernetes-models" / "istio").exists(), \
        "run `make test-deps` (npm ci in deploy/validate)"
    return subprocess.run([node, str(VALIDATE / "validate-istio.mjs")], input=json.dumps(objects),
                          capture_output=True, text=True, timeout=60)


def test_wasmplugin_against_istios_schema():
    result = validate_istio([plugin()])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: WasmPlugin shop/abuse-filter")
    # The checks bite: a wrong enum (schema) and a misspelt key (ours).
    bad = plugin()
    bad["spec"]["phase"] = "AUTHENTICATION"
    bad["spec"]["vmConfig"]["envs"] = bad["spec"]["vmConfig"].pop("env")
    result = validate_istio([bad])
    assert result.returncode == 1
    assert "spec/phase must be equal to one of the allowed values" in result.stdout
    assert ".spec.vmConfig.envs: unknown key" in result.stdout


def test_request_facts_envoyfilter():
    """The EnvoyFilter that writes the facts header: valid against Istio's
    schema, the same header the WasmPlugin reads, the same value as the
    harness (and envoy/envoy.yaml) write, overwriting a client's copy."""
    (ef,) = docs("request-facts.yaml")
    result = validate_istio([ef])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: EnvoyFilter shop/abuse-filter-facts")
    (patch, removal) = ef["spec"]["configPatches"]
    assert patch["match"]["context"] == "SIDECAR_INBOUND" and patch["patch"]["operation"] == "INSERT_FIRST"
    # The application never receives the facts: the inbound routes remove the header.
    assert removal["applyTo"] == "ROUTE_CONFIGURATION" and removal["match"]["context"] == "SIDECAR_INBOUND"
    assert removal["patch"] == {"operation": "MERGE", "value": {"request_headers_to_remove": [
        plugin()["spec"]["pluginConfig"]["client"]["facts_header"]]}}
    (mutation,) = patch["patch"]["value"]["typed_config"]["mutations"]["request_mutations"]
    assert mutation["append"]["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"
    assert mutation["append"]["header"]["key"] == plugin()["spec"]["pluginConfig"]["client"]["facts_header"]
    assert mutation["append"]["header"]["value"] == FACTS_HEADER_VALUE
    assert ef["spec"]["workloadSelector"]["labels"] == plugin()["spec"]["selector"]["matchLabels"]


def test_core_kinds_against_kubernetes_schemas():
    files = [str(ISTIO / "scorer.yaml"), str(ISTIO / "api-deployment.yaml")]
    result = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "--strict", *files],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == 3, result.stdout


def test_no_secret_values_are_shipped():
    """The Secrets are the user's to create (documented in scorer.yaml):
    no value in the examples, no placeholder anyone could copy."""
    for path in ISTIO.glob("*.yaml"):
        text = path.read_text()
        assert "change-me" not in text and "demo-secret" not in text, path
        assert not [d for d in yaml.safe_load_all(text) if d and d["kind"] == "Secret"], path
    text = (ISTIO / "scorer.yaml").read_text()
    assert "kubectl -n shop create secret generic abuse-scorer " in text
    assert "kubectl -n shop create secret generic abuse-scorer-operator " in text


def test_examples_agree_with_each_other():
    wp = plugin()
    spec = wp["spec"]
    ns = wp["metadata"]["namespace"]
    service = next(d for d in docs("scorer.yaml") if d["kind"] == "Service")
    port = service["spec"]["ports"][0]["port"]
    scorer = spec["pluginConfig"]["scorer"]
    assert scorer["cluster"] == f"outbound|{port}||{service['metadata']['name']}.{ns}.svc.cluster.local"
    assert scorer["authority"] == f"{service['metadata']['name']}.{ns}.svc.cluster.local"
    assert service["metadata"]["namespace"] == ns
    assert {"name": scorer["secret_env"], "valueFrom": "HOST"} in spec["vmConfig"]["env"]
    proxy = next(c for c in docs("api-deployment.yaml")[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "istio-proxy")
    (deployment,) = [d for d in docs("scorer.yaml") if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert proxy["env"][0]["name"] == scorer["secret_env"]
    # The filters and the scorer read the same Secret key; the operator
    # token is another Secret, which the filters' pods never reference.
    assert proxy["env"][0]["valueFrom"] == env["ABUSE_SCORER_SECRET"]["valueFrom"]
    operator = env["ABUSE_OPERATOR_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    assert operator != proxy["env"][0]["valueFrom"]["secretKeyRef"]["name"]
    assert operator not in (ISTIO / "api-deployment.yaml").read_text()
    assert spec["failStrategy"] in ("FAIL_RELOAD", "FAIL_OPEN") and spec["phase"] and "priority" in spec
    assert re.fullmatch(r"[0-9a-f]{64}", spec["sha256"])
    version = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
    assert spec["url"].startswith("oci://") and spec["url"].endswith(f"/abuse-filter:{version}")
    # The same policy as envoy/envoy.yaml but for who is trusted and where the scorer is.
    shipped_bootstrap = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    hcm = shipped_bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    shipped = json.loads(next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")
                         ["typed_config"]["config"]["configuration"]["value"])
    istio = json.loads(json.dumps(spec["pluginConfig"]))
    for c in (shipped, istio):
        c["client"].pop("trusted_proxies")
        c["scorer"].pop("cluster")
        c["scorer"].pop("authority", None)
    shipped.pop("geo", None)  # no GeoIP filter in the mesh example
    shipped.pop("good_bots", None)
    # Istio's WasmPlugin cannot set Envoy's allow_on_headers_stop_iteration,
    # so login headers are not held there (docs/detectors/credential-stuffing.md).
    shipped["credential_stuffing"].pop("hold_login_headers", None)
    assert istio == shipped, "examples/istio/wasmplugin.yaml's pluginConfig drifted from envoy/envoy.yaml"


def test_plugin_config_runs_on_envoy_as_istio_hands_it(monkeypatch):
    """What Istio's xDS gives the sidecar: the pluginConfig as JSON (protobuf
    Struct -> JSON; integral numbers print as integers) in a StringValue,
    the plugin named <namespace>.<name>, root_id = pluginName, the scorer
    behind a cluster named outbound|8081||abuse-scorer.shop.svc.cluster.local,
    the secret from the proxy's environment."""
    wp = plugin()
    spec = wp["spec"]
    monkeypatch.setenv("ABUSE_SCORER_SECRET", "istio-test-secret")
    api = DemoApi()
    scorer = Scorer(secret="istio-test-secret")
    envoy = None
    try:
        port, admin = free_port(), free_port()
        cfg = envoy_config(json.dumps(spec["pluginConfig"]), port, admin, api.port, scorer_port=scorer.port,
                           env_keys=[e["name"] for e in spec["vmConfig"]["env"] if e["valueFrom"] == "HOST"])
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        wasm = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")["typed_config"]["config"]
        wasm["name"] = f"{wp['metadata']['namespace']}.{wp['metadata']['name']}"
        wasm["root_id"] = spec["pluginName"]
        cluster = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "abuse_scorer")
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = spec["pluginConfig"]["scorer"]["cluster"]
        envoy = Envoy(cfg, admin, port)
        assert request(port, "GET", "/api/products?page=1").status == 200
        # A sensitive file: risk 60, borderline, so the scorer is asked through the Istio-named cluster.
        request(port, "GET", "/.env")
        envoy.wait_stat("abuse_filter.scorer.answered", 1)
        assert envoy.stat("abuse_filter.scorer.failed") == 0
        assert scorer.metric("abuse_scorer_errors_total", kind="unauthorized") == 0
    finally:
        if envoy is not None:
            envoy.stop()
        scorer.stop()
        api.stop()
