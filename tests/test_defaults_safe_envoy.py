"""The defaults must not block real users: a NATed office of 100 people
behind one address and a partner integration at 50 requests/s, through
real Envoy with every detector on at its default settings (only the login
route and the trusted load balancer are configured, as any user must)."""

import concurrent.futures
import time

from harness import DemoApi, Envoy, request

MINIMAL = {
    "mode": "block",
    "client": {"trusted_proxies": ["127.0.0.0/8"], "api_key_header": "x-api-key", "jwt_claim": "sub"},
    "route_groups": [{"name": "api", "path_prefix": "/api/"}],
    "credential_stuffing": {"login_routes": [{"path": "/api/login"}]},
}

BROWSER = {"user-agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0", "accept-language": "en"}


def test_office_and_partner_on_defaults_are_never_blocked():
    api = DemoApi()
    envoy = Envoy.with_filter(MINIMAL, api.port)
    try:
        office = "10.50.0.1"

        def office_user(n):
            user, password = f"user{n + 1:04d}", f"pass-{n + 1:04d}"
            statuses = []
            h = {"x-forwarded-for": office, **BROWSER}
            if n % 10 == 0:  # one in ten mistypes first
                statuses.append(request(envoy.port, "POST", "/api/login", h, {"username": user, "password": "typo"}).status)
            r = request(envoy.port, "POST", "/api/login", h, {"username": user, "password": password})
            statuses.append(r.status)
            token = r.json().get("token", "") if r.status == 200 else ""
            auth = {**h, "authorization": f"Bearer {token}"}
            for path in ("/api/me", "/api/products?page=1", "/api/products?page=2", f"/api/users/{n + 1}", "/api/products/7"):
                statuses.append(request(envoy.port, "GET", path, auth).status)
            return statuses

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            office_statuses = [s for user in pool.map(office_user, range(100)) for s in user]
        assert not {403, 429} & set(office_statuses), (sorted(set(office_statuses)), [l for l in envoy.log().splitlines() if "event" in l][:3])
        assert office_statuses.count(401) == 10

        # A partner integration: 50 well-formed calls a second for 6 s.
        partner = {"x-forwarded-for": "10.60.0.1", "x-api-key": "partner-key-1", "user-agent": "acme-sync/3.2"}
        partner_statuses = []
        start = time.monotonic()
        for i in range(300):
            path = f"/api/products?page={1 + i % 5}" if i % 2 else f"/api/products/{1 + i % 40}"
            partner_statuses.append(request(envoy.port, "GET", path, partner).status)
            time.sleep(max(0.0, start + (i + 1) / 50 - time.monotonic()))
        assert set(partner_statuses) == {200}, (partner_statuses.index(429) if 429 in partner_statuses else None, [l[-300:] for l in envoy.log().splitlines() if "event" in l][-2:])
        # Counters reach Envoy on the filter's 0.5 s tick: read them once every request is counted.
        envoy.wait_stat("abuse_filter.requests", len(office_statuses) + len(partner_statuses))
        assert envoy.stat("abuse_filter.decisions.block") == 0
    finally:
        envoy.stop()
        api.stop()
