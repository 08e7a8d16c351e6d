#!/usr/bin/env python3
"""Writes the dynamic-module twins of the shipped wasm bootstraps, comments
kept: every line the same but the abuse filter's block, which becomes the
`envoy.filters.http.dynamic_modules` filter with the same JSON
configuration (byte for byte, re-indented) less `client.facts_header` — and
with it the header_mutation entry that writes that header and the route's
removal of it. The facts header saves the wasm filter two host calls (the
peer, the clock); the module reads both for a plain function call
(docs/deploying.md#dynamic-module), so the header only cost it a
header_mutation filter and a header to parse.

    envoy/envoy.yaml          -> deploy/module/envoy.yaml
    deploy/compose/envoy.yaml -> deploy/compose/envoy.module.yaml

`python3 deploy/module/make_bootstrap.py` after changing either source;
tests/test_module_envoy.py fails while a twin is stale."""

from __future__ import annotations

import json
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


def without_facts_header(value: str) -> tuple[str, str | None]:
    """The filter's JSON configuration without `client.facts_header`, and the
    header it named (None: there was none, the text is unchanged). A key on
    a line of its own goes with its line (the rest byte for byte), else the
    JSON is written anew."""
    config = json.loads(value)
    header = config.get("client", {}).get("facts_header") if isinstance(config.get("client"), dict) else None
    if header is None:
        return value, None
    config["client"].pop("facts_header")
    lines = value.splitlines(keepends=True)
    at = [n for n, line in enumerate(lines) if line.lstrip().startswith('"facts_header"')]
    if len(at) == 1:
        n = at[0]
        kept = lines[:n] + lines[n + 1:]
        if not lines[n].rstrip().endswith(","):
            # It was the last key of `client`: the key before loses its comma.
            prev = max(i for i in range(n) if kept[i].strip())
            kept[prev] = re.sub(r",(\s*)$", r"\1", kept[prev])
        text = "".join(kept)
        try:
            if json.loads(text) == config:
                return text, header
        except ValueError:
            pass
    return json.dumps(config), header


def _drop_block(lines: list[str], n: int) -> list[str]:
    """Lines without line n and the lines indented deeper below it."""
    indent = len(lines[n]) - len(lines[n].lstrip())
    end = n + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    return lines[:n] + lines[end:]


def _drop_comment_above(lines: list[str], n: int) -> list[str]:
    """Lines without the comment lines right above line n."""
    start = n
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return lines[:start] + lines[n:]


def drop_facts_writer(text: str, header: str) -> str:
    """A bootstrap's text without what exists for the facts header: the
    header_mutation entry writing it (and the comment sentence on it), the
    route's `request_headers_to_remove` of it (and its comment)."""
    lines = text.splitlines(keepends=True)
    key = next((n for n, l in enumerate(lines) if l.strip() == f"key: {header}"), None)
    if key is not None:
        append = next(n for n in range(key, -1, -1) if lines[n].strip() == "- append:")
        lines = _drop_block(lines, append)
    remove = next((n for n, l in enumerate(lines) if l.strip() == f"request_headers_to_remove: [{header}]"), None)
    if remove is not None:
        lines = _drop_comment_above(lines, remove)
        remove = next(n for n, l in enumerate(lines) if l.strip() == f"request_headers_to_remove: [{header}]")
        del lines[remove]
    out = "".join(lines)
    # The header_mutation comment's sentence on the facts header.
    return re.sub(r"(?m)(^\s*#.*?)\s*And the\s*\n(\s*#) request's facts for the abuse filter(?:.*\n\s*#)*?.*a\s*\n\s*# client's copy is overwritten\.\n",
                  lambda m: m.group(1) + "\n" + m.group(2) + " (No facts header: the dynamic module reads the peer and the clock itself.)\n", out)


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
    json_text, facts = without_facts_header("".join(body))
    body = json_text.splitlines(keepends=True)
    header = [f"# Generated from {source} by deploy/module/make_bootstrap.py: the abuse\n",
              "# filter as an Envoy dynamic module without the facts header (the module\n",
              "# reads the peer and the clock itself), everything else as there.\n"]
    out = lines[:start] + [MODULE_BLOCK.format(i=indent), " " * new_value_indent + "value: |\n"] + body + lines[end:]
    text = "".join(header + out)
    if facts:
        text = drop_facts_writer(text, facts)
    return re.sub(r"\(the wasm path is relative to it\)", "(start Envoy with ENVOY_DYNAMIC_MODULES_SEARCH_PATH=target/module)", text)


def generated() -> dict[Path, str]:
    return {dst: transform(src.read_text(), str(src.relative_to(ROOT))) for src, dst in PAIRS}


if __name__ == "__main__":
    for path, text in generated().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    sys.exit(0)
