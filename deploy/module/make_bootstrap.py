#!/usr/bin/env python3
"""Writes the dynamic-module twins of the shipped wasm bootstraps, comments
kept: every line the same but the abuse filter's block, which becomes the
`envoy.filters.http.dynamic_modules` filter with the very same JSON
configuration (byte for byte, re-indented).

    envoy/envoy.yaml          -> deploy/module/envoy.yaml
    deploy/compose/envoy.yaml -> deploy/compose/envoy.module.yaml

`python3 deploy/module/make_bootstrap.py` after changing either source;
tests/test_module_envoy.py fails while a twin is stale."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PAIRS = [
    (ROOT / "envoy" / "envoy.yaml", ROOT / "deploy" / "module" / "envoy.yaml"),
    (ROOT / "deploy" / "compose" / "envoy.yaml", ROOT / "deploy" / "compose" / "envoy.module.yaml"),
]

MODULE_BLOCK = """\
{i}- name: envoy.filters.http.dynamic_modules
{i}  typed_config:
{i}    "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
{i}    # libabuse_filter.so (`make build`: target/module/), found in
{i}    # ENVOY_DYNAMIC_MODULES_SEARCH_PATH. Built for Envoy 1.40's module ABI:
{i}    # it loads on Envoy 1.40 and 1.41 only (docs/deploying.md#dynamic-module).
{i}    # A native module is trusted code: it runs with Envoy's privileges.
{i}    dynamic_module_config: {{ name: abuse_filter }}
{i}    filter_name: abuse_filter
{i}    filter_config:
{i}      "@type": type.googleapis.com/google.protobuf.StringValue
{i}      # The same configuration as the wasm filter's (docs/configuration.md).
{i}      # The module reads Envoy's own environment (the scorer's secret).
"""


def transform(text: str, source: str) -> str:
    lines = text.splitlines(keepends=True)
    start = next((n for n, l in enumerate(lines) if l.strip() == "- name: envoy.filters.http.wasm"), None)
    if start is None:
        raise ValueError(f"{source}: no envoy.filters.http.wasm filter")
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    value = next(n for n in range(start, len(lines)) if lines[n].strip() == "value: |")
    value_indent = len(lines[value]) - len(lines[value].lstrip())
    # The JSON: every following line indented deeper than `value: |`.
    end = value + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > value_indent):
        end += 1
    new_value_indent = len(indent) + 6
    shift = value_indent - new_value_indent
    body = [l[shift:] if l.strip() else l for l in lines[value + 1:end]]
    header = [f"# Generated from {source} by deploy/module/make_bootstrap.py: the abuse\n",
              "# filter as an Envoy dynamic module, everything else as there.\n"]
    out = lines[:start] + [MODULE_BLOCK.format(i=indent), " " * new_value_indent + "value: |\n"] + body + lines[end:]
    text = "".join(header + out)
    return re.sub(r"\(the wasm path is relative to it\)", "(start Envoy with ENVOY_DYNAMIC_MODULES_SEARCH_PATH=target/module)", text)


def generated() -> dict[Path, str]:
    return {dst: transform(src.read_text(), str(src.relative_to(ROOT))) for src, dst in PAIRS}


if __name__ == "__main__":
    for path, text in generated().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    sys.exit(0)
