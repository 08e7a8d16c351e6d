"""Session anomalies through real Envoy, with Envoy's own GeoIP filter
(MaxMind test databases from ../shared/data/geoip) in front of the filter."""

import pytest

from harness import GEO_HEADERS, DemoApi, Envoy, request

CONFIG = {
    "mode": "block",
    "client": {"trusted_proxies": ["127.0.0.0/8"], "session_cookie": "session", "jwt_claim": "sub"},
    "sessions": {"max_addresses": 3, "max_sessions_per_client": 10},
    "geo": {
        "country_header": GEO_HEADERS["country"],
        "asn_header": GEO_HEADERS["asn"],
        "anonymous_headers": [GEO_HEADERS[k] for k in ("anon_vpn", "anon_hosting", "anon_tor", "anon_proxy")],
    },
}

GB_HOME, GB_MOBILE, CHINA = "2.125.160.216", "2.125.160.218", "175.16.199.1"
VPN_TOR = "1.124.213.1"
BROWSER = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Mobile/15E148"


@pytest.fixture(scope="module")
def envoy():
    api = DemoApi()
    e = Envoy.with_filter(CONFIG, api.port, geoip=True)
    yield e
    e.stop()
    api.stop()


def call(envoy, client, path="/api/me", token=None, cookie=None, ua=BROWSER):
    headers = {"x-forwarded-for": client, "user-agent": ua}
    if token:
        headers["authorization"] = f"Bearer {token}"
    if cookie:
        headers["cookie"] = f"session={cookie}"
    return request(envoy.port, "GET", path, headers)


def token_for(envoy, client, user, password):
    r = request(envoy.port, "POST", "/api/login", {"x-forwarded-for": client, "user-agent": BROWSER},
                {"username": user, "password": password})
    assert r.status == 200
    return r.json()["token"]


def test_geo_headers_reach_the_filter(envoy):
    echoed = call(envoy, GB_HOME, "/debug/headers").json()["headers"]
    assert echoed["x-geo-country"] == "GB"
    # A client cannot choose its country: its own header is stripped.
    spoof = request(envoy.port, "GET", "/debug/headers", {"x-forwarded-for": "10.9.9.9", "x-geo-country": "GB"})
    assert "x-geo-country" not in spoof.json()["headers"]


def test_mobile_user_switching_networks_in_one_country_is_fine(envoy):
    token = token_for(envoy, GB_HOME, "user0301", "pass-0301")
    for i in range(12):
        assert call(envoy, GB_HOME if i % 2 else GB_MOBILE, token=token).status == 200


def test_stolen_token_used_from_another_country_is_blocked(envoy):
    token = token_for(envoy, GB_HOME, "user0302", "pass-0302")
    assert call(envoy, GB_HOME, token=token).status == 200
    stolen = call(envoy, CHINA, token=token, ua="python-requests/2.31.0")
    assert stolen.status == 403
    assert "impossible_travel" in stolen.json()["reasons"]
    # The owner at home keeps working.
    assert call(envoy, GB_HOME, token=token).status == 200


def test_one_session_cookie_from_many_addresses_is_blocked(envoy):
    statuses = [call(envoy, f"10.20.0.{n}", "/api/products?page=1", cookie="shared-cookie-1").status for n in range(1, 8)]
    assert statuses[:3] == [200, 200, 200]
    assert 403 in statuses, statuses


def test_anonymous_networks_are_tagged_not_blocked(envoy):
    for _ in range(20):
        r = call(envoy, VPN_TOR, "/debug/headers")
        assert r.status == 200
    headers = r.json()["headers"]
    assert "anonymous_network" in headers["x-abuse-reasons"]
    assert 30 <= int(headers["x-abuse-score"]) < 100


def test_session_churn_is_tagged(envoy):
    client = "10.30.0.1"
    for n in range(25):
        r = call(envoy, client, "/debug/headers", cookie=f"fresh-{n}")
        assert r.status == 200
    assert "session_churn" in r.json()["headers"]["x-abuse-reasons"]
