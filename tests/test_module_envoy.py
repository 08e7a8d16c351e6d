"""The dynamic-module build's own facts, checked once (the rest of the
suite runs against it with --filter-build=module): it loads on this Envoy
with a matching ABI version, exports every hook Envoy resolves, the
deployment bootstraps for it are the shipped ones with only the filter
swapped and the facts header left out (and parse against Envoy's API), and a real Envoy started from that
bootstrap judges like the wasm filter does."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy" / "module"))
from envoy_api import parse_bootstrap  # noqa: E402
from harness import (MODULE, MODULE_DIR, ROOT, DemoApi, Envoy, as_build, envoy_binary, envoy_config, free_port,  # noqa: E402
                     plugin_config_of, request, wait_until)
import make_bootstrap  # noqa: E402

# The hooks Envoy 1.40 resolves in an HTTP-filter module (a missing one
# refuses the filter configuration).
HOOKS = [
    "envoy_dynamic_module_on_program_init",
    "envoy_dynamic_module_on_http_filter_config_new",
    "envoy_dynamic_module_on_http_filter_config_destroy",
    "envoy_dynamic_module_on_http_filter_new",
    "envoy_dynamic_module_on_http_filter_request_headers",
    "envoy_dynamic_module_on_http_filter_request_body",
    "envoy_dynamic_module_on_http_filter_response_headers",
    "envoy_dynamic_module_on_http_filter_destroy",
    "envoy_dynamic_module_on_http_filter_http_callout_done",
    "envoy_dynamic_module_on_http_filter_scheduled",
    "envoy_dynamic_module_on_http_filter_config_scheduled",
    "envoy_dynamic_module_on_http_filter_config_http_callout_done",
]


@pytest.fixture(scope="module")
def api():
    a = DemoApi()
    yield a
    a.stop()


def test_module_exports_the_hooks_envoy_resolves():
    out = subprocess.run(["nm", "-D", "--defined-only", str(MODULE)], capture_output=True, text=True, check=True).stdout
    exported = set(re.findall(r" T (envoy_dynamic_module_on_\w+)", out))
    assert set(HOOKS) <= exported, set(HOOKS) - exported


def test_module_loads_with_envoys_abi_version_and_judges(api):
    port, admin = free_port(), free_port()
    envoy = Envoy(as_build(envoy_config({"mode": "block"}, port, admin, api.port), "module"), admin, port)
    try:
        log = envoy.log()
        # Envoy checks the version the module reports at load: an exact match, no warning.
        assert "Dynamic module ABI version v0.2.0 matched." in log
        assert "is deprecated" not in log
        assert "abuse_filter: configured (dynamic module), mode Block" in log
        r = request(port, "GET", "/api/products", headers={"user-agent": "sqlmap/1.7"})
        assert r.status == 403 and r.json()["reasons"] == ["probing"]
        assert r.headers.get("x-abuse-decision") == r.json()["decision_id"]
        # The stats carry the wasm filter's names (the host's prefix aside).
        assert envoy.wait_stat("abuse_filter.decisions.block", 1) >= 1
        _, raw = envoy.admin("/stats?filter=abuse_filter.decisions.block")
        assert raw.startswith("dynamicmodulescustom.abuse_filter.decisions.block:")
    finally:
        envoy.stop()


def test_module_bootstraps_are_the_shipped_ones_with_the_filter_swapped():
    for path, text in make_bootstrap.generated().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: python3 deploy/module/make_bootstrap.py"
    for src, dst in make_bootstrap.PAIRS:
        wasm, module = yaml.safe_load(src.read_text()), yaml.safe_load(dst.read_text())
        assert as_build(wasm, "module") == module
        hcm = module["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        configs = [plugin_config_of(f) for f in hcm["http_filters"] if plugin_config_of(f) is not None]
        shipped = json.loads(plugin_config_of(
            next(f for f in yaml.safe_load(src.read_text())["static_resources"]["listeners"][0]["filter_chains"][0]
                 ["filters"][0]["typed_config"]["http_filters"] if plugin_config_of(f) is not None)))
        # The same configuration less the facts header, which nothing writes
        # or removes here (the module reads the peer and the clock itself).
        assert shipped["client"].pop("facts_header") == "x-abuse-facts"
        assert configs and json.loads(configs[0]) == shipped
        assert "x-abuse-facts" not in json.dumps(hcm)
        parse_bootstrap(module)  # Envoy's API: a misspelt field fails here


def test_shipped_module_bootstrap_is_valid():
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", "deploy/module/envoy.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**__import__("os").environ, "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(MODULE_DIR)},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shipped_module_bootstrap_blocks_a_scanner(api, tmp_path):
    """deploy/module/envoy.yaml as a user starts it (ports swapped, no
    scorer running: the filter fails open on it)."""
    cfg = yaml.safe_load((ROOT / "deploy" / "module" / "envoy.yaml").read_text())
    cfg = copy.deepcopy(cfg)
    port, admin = free_port(), free_port()
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin
    cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = port
    for cluster in cfg["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for ep in group["lb_endpoints"]:
                sa = ep["endpoint"]["address"]["socket_address"]
                sa["port_value"] = api.port if cluster["name"] == "demo_api" else free_port()
    # Relative paths (GeoIP databases) are from the repository root.
    text = json.dumps(cfg).replace('"tests/data/', f'"{ROOT}/tests/data/')
    envoy = Envoy(json.loads(text), admin, port)
    try:
        r = request(port, "GET", "/api/products", headers={"user-agent": "sqlmap/1.7", "x-forwarded-for": "203.0.113.8"})
        assert r.status == 403, r.body
        assert r.json()["reasons"] == ["probing"]
        clean = request(port, "GET", "/api/products", headers={"x-forwarded-for": "198.51.100.1"})
        assert clean.status == 200
        wait_until(lambda: 'abuse="action=block score=100 reasons=probing' in envoy.log(), 10, 0.1, "the access log line")
    finally:
        envoy.stop()
