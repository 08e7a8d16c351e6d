"""Reloads keep state, on real Envoy: the listener comes from a watched LDS
file, and the test rewrites it (Envoy applies a new filter configuration to
the running process, shared data stays) while a client sits in the penalty
box and the login endpoint is under a distributed attack.

1. A threshold, action and allowlist change: same record layout, nothing to
   migrate, no log line; the client is still blocked, the endpoint still
   under attack (the first attempts after the reload are refused at once).
2. A change of the layout (half the client shards, another rate window):
   the records are carried over and one log line says what was kept and
   dropped; the client is still blocked, the endpoint still under attack.

Every step waits on Envoy's own stats or log, never on how fast it answers.
"""

import copy
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from harness import DemoApi, Envoy, envoy_config, free_port, request, set_plugin_config, wait_until
from test_disguise_envoy import BROWSERS, blocked, browser, login, shipped_config

PENALIZED = "198.18.0.7"
TOOL = {"user-agent": "python-requests/2.31.0", "accept": "*/*"}
CONFIGURED = "abuse_filter: configured"


def base_config() -> dict:
    """The shipped configuration, plus one long rate window that blocks (so
    that putting a client in the penalty box takes a count, not a speed)."""
    config = shipped_config()
    # (in place of the 6000-in-60-s one: at most 4 limits)
    config["rate"]["limits"][-1] = {"route_group": "api", "requests": 10, "window_s": 600}
    config["actions"] = {"rate_limit": "block"}
    config["penalty"] = {"duration_s": 900}
    return config


class LdsEnvoy:
    """Envoy whose only listener is read from a watched LDS file
    (`hot_restart`: see harness.Envoy; other keywords go to envoy_config)."""

    def __init__(self, config: dict, upstream_port: int, hot_restart: bool = False, **kw):
        self.dir = Path(tempfile.mkdtemp(prefix="abuse-lds-"))
        self.lds = self.dir / "lds.json"
        port, admin = free_port(), free_port()
        self.upstream_port, self.port_, self.admin_port = upstream_port, port, admin
        bootstrap = envoy_config(config, port, admin, upstream_port, **kw)
        self.listener = bootstrap["static_resources"].pop("listeners")[0]
        self.version = 0
        self.write(config)
        bootstrap["node"] = {"id": "reload-test", "cluster": "reload-test"}
        bootstrap["dynamic_resources"] = {
            "lds_config": {
                "resource_api_version": "V3",
                "path_config_source": {"path": str(self.lds), "watched_directory": {"path": str(self.dir)}},
            }
        }
        self.envoy = Envoy(bootstrap, admin, port, hot_restart=hot_restart)
        wait_until(lambda: self.configured() >= 1, 30, 0.1, "the filter to configure")

    def write(self, config: dict):
        """Replaces the LDS file atomically (a rename is what the watch sees)."""
        self.version += 1
        listener = copy.deepcopy(self.listener)
        for f in listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
            set_plugin_config(f, json.dumps(config))
        body = {
            "version_info": str(self.version),
            "resources": [{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **listener}],
        }
        tmp = self.dir / f"lds.{self.version}.tmp"
        tmp.write_text(json.dumps(body))
        os.rename(tmp, self.lds)

    def admin_stat(self, name: str) -> int:
        status, body = self.envoy.admin(f"/stats?filter=^{name}$")
        for line in body.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def configured(self) -> int:
        return self.envoy.log().count(CONFIGURED)

    def reload(self, config: dict):
        """Pushes `config` and waits until Envoy has applied it: the LDS
        update accepted, the new filter configured, no listener warming."""
        updates, configured = self.admin_stat("listener_manager.lds.update_success"), self.configured()
        self.write(config)
        wait_until(lambda: self.admin_stat("listener_manager.lds.update_success") > updates, 30, 0.1, "the LDS update")
        wait_until(lambda: self.configured() > configured, 30, 0.1, "the new filter configuration")
        wait_until(lambda: self.admin_stat("listener_manager.total_listeners_warming") == 0
                   and self.admin_stat("listener_manager.total_listeners_active") == 1, 30, 0.1, "the new listener")
        assert "rejected" not in self.envoy.log().split(CONFIGURED)[-1], self.envoy.log()[-3000:]

    @property
    def port(self) -> int:
        return self.port_

    def stop(self):
        try:
            self.envoy.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def api():
    server = DemoApi()
    yield server
    server.stop()


def fresh_attempts(envoy, rng, n: int, base: int) -> list[bool]:
    """`n` tool-like login attempts, each from an address never seen before."""
    return [
        blocked(login(envoy, f"100.{64 + (base + a) % 60}.{(base + a) // 60}.{rng.randrange(1, 255)}", TOOL,
                      f"leak{rng.randrange(10**6)}@mail.example", f"pw{rng.randrange(10**6)}"))
        for a in range(n)
    ]


def still_blocked(envoy) -> bool:
    r = request(envoy.port, "GET", "/api/products?page=1", {"x-forwarded-for": PENALIZED, **browser(BROWSERS[0])})
    return blocked(r)


def test_a_reload_keeps_the_penalty_box_and_the_attack(api):
    config = base_config()
    envoy = LdsEnvoy(config, api.port)
    try:
        # A client over the long window: penalty box (a count, at any pace).
        statuses = [request(envoy.port, "GET", "/api/products?page=1",
                            {"x-forwarded-for": PENALIZED, **browser(BROWSERS[0])}).status for _ in range(12)]
        assert statuses[:10] == [200] * 10 and statuses[-1] in (403, 429), statuses
        assert still_blocked(envoy)
        # Real users, then a distributed attack by a tool until the endpoint is under attack.
        for u in range(1, 21):
            assert login(envoy, f"198.51.100.{u}", browser(BROWSERS[u % 3]), f"user{u:04d}", f"pass-{u:04d}").status == 200
        rng = random.Random(5)
        outcomes = fresh_attempts(envoy, rng, 300, 0)
        assert True in outcomes, "the attack was never recognised"
        envoy.envoy.wait_stat("abuse_filter.login.under_attack", 1)
        assert all(fresh_attempts(envoy, rng, 10, 300)), "the attack is not refused before any reload"

        # 1. Threshold, action and allowlist: the same layout.
        same_layout = copy.deepcopy(config)
        same_layout["risk"]["block_at"] = 90
        same_layout["actions"]["probing"] = "tag"
        same_layout["allowlist"] = {"cidrs": ["192.0.2.0/24"]}
        same_layout["rate"]["limits"][-1]["requests"] = 11
        envoy.reload(same_layout)
        assert "state layout changed" not in envoy.envoy.log()
        assert still_blocked(envoy), "the penalty box was emptied by a threshold change"
        after = fresh_attempts(envoy, rng, 10, 400)
        assert all(after), f"the endpoint forgot the attack: {after}"
        # The allowlist took effect (the new configuration really runs).
        for _ in range(15):
            assert request(envoy.port, "GET", "/api/products?page=1", {"x-forwarded-for": "192.0.2.9"}).status == 200

        # 2. Another layout: half the client shards, another long window.
        other = copy.deepcopy(same_layout)
        other["state"] = {"shards": 1024, "slots_per_shard": 16}
        other["rate"]["limits"][-1]["window_s"] = 900
        envoy.reload(other)
        assert still_blocked(envoy), "the penalty box was emptied by a layout change"
        after = fresh_attempts(envoy, rng, 10, 500)
        assert all(after), f"the endpoint forgot the attack: {after}"
        line = wait_until(lambda: next((l for l in envoy.envoy.log().splitlines() if "state layout changed" in l), None),
                          10, 0.1, "the layout-change log line")
        assert "clients: 2048x16 -> 1024x16 shards, kept " in line and "reset [api/600s]" in line, line
        assert envoy.envoy.log().count("state layout changed") == 1, "more than one VM migrated"
    finally:
        envoy.stop()
