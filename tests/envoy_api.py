"""Envoy bootstraps parsed against Envoy's own API (PyPI `xds-protos`, the
generated protobufs of envoyproxy/data-plane-api): every field name and enum
value must exist, including inside the typed_config `Any`s. It does not check
Envoy's own semantic constraints (the real Envoy does, in other tests)."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def _load_types(node: Any, seen: set[str]) -> None:
    """Imports the generated modules of every `@type` in the tree, so that
    protobuf's json_format can resolve the Anys."""
    if isinstance(node, dict):
        url = node.get("@type")
        if isinstance(url, str) and url not in seen:
            seen.add(url)
            package = url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            try:
                mod = importlib.import_module(package)
                for info in pkgutil.iter_modules(mod.__path__):
                    if info.name.endswith("_pb2"):
                        importlib.import_module(f"{package}.{info.name}")
            except ModuleNotFoundError:
                pass  # google.protobuf.* well-known types are built in
        for v in node.values():
            _load_types(v, seen)
    elif isinstance(node, list):
        for v in node:
            _load_types(v, seen)


def parse_bootstrap(config: dict):
    """Parses a bootstrap (as loaded from YAML/JSON) into
    envoy.config.bootstrap.v3.Bootstrap; raises json_format.ParseError on a
    misspelt field, a wrong type or an unknown enum value."""
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from google.protobuf import json_format

    _load_types(config, set())
    return json_format.ParseDict(config, bootstrap_pb2.Bootstrap())
