"""What the red-team test files share: the demo API (one per file), an
Envoy starter with the red-team configuration, and the check that every
answer is one a verdict explains. Imported by name into each file (pytest
finds fixtures in a test module's namespace)."""

from __future__ import annotations

import pytest

from harness import DemoApi, Envoy
from redteam_traffic import redteam_config

# Anything else (503, ...) is a harness problem, not a verdict.
ANSWERED = {200, 202, 400, 401, 403, 404, 429}


@pytest.fixture(scope="module")
def api():
    a = DemoApi()
    yield a
    a.stop()


@pytest.fixture
def start_envoy(api):
    """start_envoy(**config changes) -> an Envoy with the red-team config
    (the shipped one, one trusted proxy, no scorer), Envoy's GeoIP filter and
    the facts header when the config names one; stopped at the end."""
    started = []

    def start(**changes):
        config = redteam_config(**changes)
        e = Envoy.with_filter(config, api.port, geoip=True, facts_header=config["client"].get("facts_header"))
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()


def check_answered(statuses, what):
    odd = sorted({s for s in statuses if s not in ANSWERED})
    assert not odd, f"{what}: unexpected statuses {odd} (a harness problem, not a verdict)"
