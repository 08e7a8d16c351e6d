"""Which filter build the real-Envoy tests load: `--filter-build=wasm` (the
default) or `--filter-build=module` (the same tests against the dynamic
module; `make test-integration` runs both). Tests of things only one build
has — the .wasm's exports, its OCI image, the shipped wasm bootstrap and
deployment files, the README stack — are checked once, with the wasm build,
and skipped in the module run (BUILD_INDEPENDENT)."""

from __future__ import annotations

import os

import pytest

# Files whose tests do not load the filter through tests/harness.py's
# build switch: they check artefacts and files (the .wasm, its image, the
# compose/Istio/bootstrap files, the demo API, the docs stack), so a second
# run would check the same things again.
BUILD_INDEPENDENT = {
    "test_wasm_exports.py",
    "test_oci.py",
    "test_compose_stack.py",
    "test_istio_examples.py",
    "test_config_contract.py",
    "test_demo_api.py",
    "test_docs.py",
    "test_dashboard_chromium.py",
    "test_module_envoy.py",
}


def pytest_addoption(parser):
    parser.addoption("--filter-build", choices=("wasm", "module"), default=os.environ.get("ABUSE_FILTER_BUILD", "wasm"),
                     help="the abuse filter build Envoy loads in these tests")


def pytest_configure(config):
    config.addinivalue_line("markers", "wasm_only: tests a behaviour of the wasm host (skipped for the module)")
    build = config.getoption("--filter-build")
    os.environ["ABUSE_FILTER_BUILD"] = build
    import harness  # tests/ is on sys.path (rootdir conftest)
    harness.BUILD = build


# Files whose tests `make test-integration` spreads one by one over its
# pytest-xdist workers: long, clock-paced tests (tens of seconds each,
# waiting on a schedule, not on the CPU) whose only shared fixture is the
# demo API, cheap to start once per worker. Every other file stays on one
# worker as a whole (an `xdist_group`), so its module fixtures (the eval's
# run, a scorer) are made once, as without xdist.
SPREAD = {
    "test_redteam_stuffing_envoy.py",
    "test_redteam_stuffing_more_envoy.py",
    "test_redteam_harvest_envoy.py",
    "test_redteam_identity_envoy.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    if config.getoption("--filter-build") != "module":
        return
    skip = pytest.mark.skip(reason="build-independent: checked in the wasm run")
    # `@pytest.mark.wasm_only`: a behaviour of the wasm host itself (say,
    # Envoy's allow_on_headers_stop_iteration, a Wasm-filter setting).
    wasm_only = pytest.mark.skip(reason="tests the wasm host itself")
    for item in items:
        if item.path.name in BUILD_INDEPENDENT:
            item.add_marker(skip)
        elif item.get_closest_marker("wasm_only"):
            item.add_marker(wasm_only)


def pytest_report_header(config):
    return f"abuse filter build: {config.getoption('--filter-build')}"
