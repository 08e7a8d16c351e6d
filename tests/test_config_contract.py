"""Configuration as a contract: every shipped filter configuration valid
against the committed JSON Schema (schema/abuse-filter.schema.json, generated
from the engine's types; `cargo test -p abuse-filter-check` keeps it in step
with them), the key reference (docs/configuration-reference.md) generated
from that schema and naming every key, and the .wasm built without the schema code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

from harness import ROOT, WASM  # noqa: E402

SCHEMA = json.loads((ROOT / "schema" / "abuse-filter.schema.json").read_text())


def wasm_filter_config(path) -> dict:
    bootstrap = yaml.safe_load(path.read_text())
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")
    return json.loads(wasm["typed_config"]["config"]["configuration"]["value"])


def shipped_configs() -> dict[str, dict]:
    (plugin,) = [d for d in yaml.safe_load_all((ROOT / "examples/istio/wasmplugin.yaml").read_text()) if d]
    return {
        "envoy/envoy.yaml": wasm_filter_config(ROOT / "envoy" / "envoy.yaml"),
        "deploy/compose/envoy.yaml": wasm_filter_config(ROOT / "deploy" / "compose" / "envoy.yaml"),
        # As Istio hands it over: the pluginConfig as JSON.
        "examples/istio/wasmplugin.yaml": json.loads(json.dumps(plugin["spec"]["pluginConfig"])),
    }


def test_shipped_configurations_match_the_schema():
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for name, config in shipped_configs().items():
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]
        assert not errors, f"{name}: {errors}"
    # The schema refuses what the filter refuses: unknown keys, wrong types and values.
    for bad in ({"rate": {"limitz": []}}, {"mode": "blocc"}, {"penalty": {"duration_s": "60"}},
                {"actions": {"rate_limit": "drop"}}, {"route_groups": [{"name": "a"}]}):
        assert list(validator.iter_errors(bad)), bad


def schema_key_paths(node: dict, prefix: str = "") -> list[str]:
    def resolve(n):
        while "$ref" in n:
            n = SCHEMA["$defs"][n["$ref"].rsplit("/", 1)[-1]]
        options = [o for o in n.get("anyOf", []) if o.get("type") != "null"]
        return resolve(options[0]) if len(options) == 1 else n

    out = []
    for name, prop in resolve(node).get("properties", {}).items():
        path = prefix + name
        out.append(path)
        target = resolve(prop)
        if "properties" in target:
            out += schema_key_paths(target, path + ".")
        elif target.get("type") == "array" and "properties" in resolve(target["items"]):
            out += schema_key_paths(target["items"], path + "[].")
    return out


def test_reference_page_names_every_key_of_the_schema():
    check = subprocess.run([sys.executable, str(ROOT / "schema" / "reference.py"), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    page = (ROOT / "docs" / "configuration-reference.md").read_text()
    paths = schema_key_paths(SCHEMA)
    assert len(paths) > 100
    missing = [p for p in paths if f"`{p}`" not in page]
    assert not missing, f"keys of the schema missing from docs/configuration-reference.md: {missing}"


def test_the_wasm_carries_no_schema_code():
    wasm = WASM.read_bytes()
    assert b"abuse_engine" in wasm, "the module has no function names: this check would prove nothing"
    assert b"schemars" not in wasm and b"JsonSchema" not in wasm
