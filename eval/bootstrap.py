"""The shipped Envoy bootstrap (envoy/envoy.yaml) for an eval run: the same
file, with its four ports substituted (so an eval never collides with
`make run` or a test) and two access logs added to the listener. The
filter's own configuration is never touched (checked)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

LABEL_HEADER = "x-eval-client"

# nginx "combined", with the client taken from X-Forwarded-For (the peer is
# always 127.0.0.1 here), for CrowdSec's nginx parser.
COMBINED = (
    '%REQ(X-FORWARDED-FOR)% - - [%START_TIME(%d/%b/%Y:%H:%M:%S %z)%] '
    '"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% %BYTES_SENT% '
    '"%REQ(REFERER)%" "%REQ(USER-AGENT)%"\n'
)

# The ground truth: one JSON object per request.
JSON_FIELDS = {
    "t": "%START_TIME(%s.%6f)%",
    "label": f"%REQ({LABEL_HEADER.upper()})%",
    "xff": "%REQ(X-FORWARDED-FOR)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "status": "%RESPONSE_CODE%",
    "upstream": "%UPSTREAM_HOST%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "retry_after": "%RESP(RETRY-AFTER)%",
    "duration_ms": "%DURATION%",
    "ua": "%REQ(USER-AGENT)%",
    # What the filter said about the request: the login-risk header it sent
    # upstream (a login's request-level evidence, e.g. "medium; score=1;
    # reasons=endpoint_under_attack,new_client") and its access-log decision.
    "login_risk": "%REQ(X-ABUSE-LOGIN-RISK)%",
    "abuse": "%FILTER_STATE(wasm.abuse_filter:PLAIN)%",
}


def _file_log(path: Path, fmt: dict) -> dict:
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": fmt,
        },
    }


def _hcm(listener: dict) -> dict:
    for chain in listener["filter_chains"]:
        for f in chain["filters"]:
            if f["name"] == "envoy.filters.network.http_connection_manager":
                return f["typed_config"]
    raise ValueError("no http_connection_manager in the listener")


def _filter_config(cfg: dict) -> str:
    from harness import plugin_config_of
    for listener in cfg["static_resources"]["listeners"]:
        for f in _hcm(listener).get("http_filters", []):
            value = plugin_config_of(f)
            if value is not None:
                return value
    raise ValueError("no abuse filter in the bootstrap")


def eval_bootstrap(src: Path, out_dir: Path, *, port: int, admin_port: int, api_port: int, scorer_port: int,
                   build: str = "wasm") -> Path:
    """Writes out_dir/envoy.json: `src` with the ports substituted and the
    access logs out_dir/access.combined.log and out_dir/access.json added,
    the abuse filter as `build` ("wasm" or "module")."""
    from harness import as_build
    original = yaml.safe_load(Path(src).read_text())
    cfg = as_build(copy.deepcopy(original), build)
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listeners = cfg["static_resources"]["listeners"]
    if len(listeners) != 1:
        raise ValueError(f"expected one listener in {src}, found {len(listeners)}")
    listeners[0]["address"]["socket_address"]["port_value"] = port
    ports = {"demo_api": api_port, "abuse_scorer": scorer_port}
    for cluster in cfg["static_resources"]["clusters"]:
        if cluster["name"] not in ports:
            continue
        for group in cluster["load_assignment"]["endpoints"]:
            for ep in group["lb_endpoints"]:
                ep["endpoint"]["address"]["socket_address"]["port_value"] = ports[cluster["name"]]
    hcm = _hcm(listeners[0])
    hcm.setdefault("access_log", []).extend([
        _file_log(out_dir / "access.combined.log", {"text_format_source": {"inline_string": COMBINED}}),
        _file_log(out_dir / "access.json", {"json_format": JSON_FIELDS}),
    ])
    shipped = _filter_config(original)
    if build == "module":
        # The module goes without the facts header (harness.as_build).
        from harness import without_facts_header
        shipped = without_facts_header(shipped)[0]
    if _filter_config(cfg) != shipped:
        raise AssertionError("the filter configuration must stay as shipped")
    path = out_dir / "envoy.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path
