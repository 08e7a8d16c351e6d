"""Account takeover with valid credentials, end to end through real Envoy
with its GeoIP filter (MaxMind's test databases) and the shipped filter
configuration: each login is compared with its account's profile, and what
the filter knows goes to the application in x-abuse-login-risk. The demo
API asks for a second factor (202 mfa_required) when it says high.

Time here is the test's own: the only wait is for `min_travel_s` (1 s in
this configuration), by the clock, and stats are waited on."""

import time

import pytest

from harness import DemoApi, Envoy, request, wait_until
from test_disguise_envoy import BROWSERS, SECRET, browser, scorer_metric, shipped_config, with_scorer

CHROME, FIREFOX, IPHONE = BROWSERS[0], BROWSERS[2], BROWSERS[4]
# GB, Boxford in the test database (81.2.69.0/24 is GB too, but marked VPN,
# hosting, proxy and Tor: no home).
GB_HOME, GB_PHONE = "2.125.160.216", "2.125.160.223"


def home(i: int) -> str:
    """Owner i's home address (2.125.160.216/29: neighbours share some)."""
    return f"2.125.160.{216 + i % 7}"


def abroad(i: int) -> str:
    """Addresses in China, the Philippines and Sweden, in turn."""
    return [f"175.16.199.{1 + i % 250}", f"202.196.224.{1 + i % 250}", f"89.160.20.{112 + i % 16}"][i % 3]


def config() -> dict:
    c = shipped_config()
    c["account_takeover"] = {"profile": {"min_travel_s": 1}}
    return c


@pytest.fixture(scope="module")
def api():
    server = DemoApi()
    yield server
    server.stop()


def login(envoy, address, ua, user):
    number = user.removeprefix("user")
    return request(envoy.port, "POST", "/api/login", {"x-forwarded-for": address, **browser(ua)},
                   {"username": user, "password": f"pass-{number}"})


def stepped_up(r) -> bool:
    return r.status == 202 and r.json().get("mfa_required") is True


def test_stolen_passwords_used_abroad_are_stepped_up_and_their_owners_are_not(api):
    envoy = Envoy.with_filter(config(), api.port, geoip=True)
    try:
        owners = [f"user{700 + i:04d}" for i in range(10)]
        for day in range(3):
            for i, user in enumerate(owners):
                assert login(envoy, home(i), CHROME, user).status == 200
        # The owner with a new phone at home: let in, no second factor.
        assert login(envoy, GB_PHONE, IPHONE, owners[0]).status == 200
        # The right passwords from China, the Philippines and Sweden, on another browser.
        takeovers = [login(envoy, abroad(i), FIREFOX, user) for i, user in enumerate(owners)]
        assert all(stepped_up(r) for r in takeovers), [(r.status, r.body) for r in takeovers]
        told = [r.json()["login_risk"] for r in takeovers]
        assert all(t.startswith("high; ") and "new_country" in t and "new_device" in t for t in told), told
        envoy.wait_stat("abuse_filter.login_risk.high", 10)
        envoy.wait_stat("abuse_filter.login_risk.reason.new_country", 10)
        # Stepped up, not learned: the same place is still new.
        assert stepped_up(login(envoy, abroad(0), FIREFOX, owners[0]))
        # The owners at home, on their own laptops, are never asked.
        assert all(login(envoy, home(i), CHROME, user).status == 200 for i, user in enumerate(owners))
        # A client cannot tell the application its own risk: its header is replaced.
        forged = request(envoy.port, "POST", "/api/login",
                         {"x-forwarded-for": abroad(1), "x-abuse-login-risk": "low", **browser(FIREFOX)},
                         {"username": owners[1], "password": "pass-0701"})
        assert stepped_up(forged)
    finally:
        envoy.stop()


def test_an_owners_trip_is_learned(api):
    envoy = Envoy.with_filter(config(), api.port, geoip=True)
    try:
        user = "user0750"
        for _ in range(3):
            assert login(envoy, GB_HOME, CHROME, user).status == 200
        time.sleep(1.1)  # min_travel_s: a flight, by the clock
        medium = envoy.stat("abuse_filter.login_risk.medium")
        # Sweden with their own laptop: told (medium: a new country), never stepped up.
        assert login(envoy, "89.160.20.112", CHROME, user).status == 200
        envoy.wait_stat("abuse_filter.login_risk.medium", medium + 1)
        assert envoy.stat("abuse_filter.login_risk.reason.impossible_travel") == 0
        # Learned: the next login there is nothing to tell. (Stats flush on
        # the tick: once all five requests are counted, so is any risk.)
        assert login(envoy, "89.160.20.112", CHROME, user).status == 200
        envoy.wait_stat("abuse_filter.requests", 5)
        assert envoy.stat("abuse_filter.login_risk.medium") == medium + 1
    finally:
        envoy.stop()


def test_profiles_survive_an_envoy_restart_through_the_scorer(api, monkeypatch):
    monkeypatch.setenv("ABUSE_SCORER_SECRET", SECRET)
    from harness import Scorer

    scorer = Scorer(secret=SECRET)
    envoys = []
    try:
        def start():
            e = Envoy.with_filter(with_scorer(config()), api.port, geoip=True, scorer_port=scorer.port,
                                  env_keys=["ABUSE_SCORER_SECRET"])
            envoys.append(e)
            return e

        first = start()
        owners = [f"user{760 + i:04d}" for i in range(5)]
        for i, user in enumerate(owners):
            assert login(first, home(i), CHROME, user).status == 200
        wait_until(lambda: scorer_metric(scorer, "abuse_scorer_profiles_merged_total") >= 5, 15, 0.2,
                   "the profiles to reach the scorer")
        first.stop()
        # A new Envoy process: its shared data is empty until it warms.
        second = start()
        second.wait_stat("abuse_filter.scorer.warm_shards", 1)
        # The profile came back: the owner at home is nothing new; the password abroad is.
        assert login(second, home(0), CHROME, owners[0]).status == 200
        assert stepped_up(login(second, abroad(3), FIREFOX, owners[1]))
        second.wait_stat("abuse_filter.requests", 2)
        assert second.stat("abuse_filter.login_risk.reason.new_device") == 1, "only the stolen password's"
    finally:
        for p in (*envoys, scorer):
            p.stop()
