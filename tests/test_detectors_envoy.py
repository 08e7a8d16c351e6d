"""Each detector end to end through real Envoy: traffic that looks like the
attack is blocked with the detector's reason, and a benign look-alike is not.

Addresses come from X-Forwarded-For, trusted from loopback as behind a load
balancer; every test uses its own addresses, so they share one Envoy.
"""

import random

import pytest

from harness import DemoApi, Envoy, request

CONFIG = {
    "mode": "block",
    "client": {"trusted_proxies": ["127.0.0.0/8"]},
    "credential_stuffing": {
        "login_routes": [{"path": "/api/login", "username_field": "username"}],
        "max_failures_per_client": 5,
        "max_usernames_per_client": 4,
        "max_failures_per_account": 10,
    },
    "account_takeover": {"min_account_failures": 5},
    "enumeration": {"object_routes": ["/api/users/{id}"], "max_sequential_run": 10, "min_requests": 10},
    "probing": {"max_not_found_paths": 15},
    "good_bots": [{"name": "examplebot", "user_agent": "ExampleBot", "cidrs": ["192.0.2.0/24"]}],
    "penalty": {"duration_s": 120},
}


@pytest.fixture(scope="module")
def envoy():
    api = DemoApi()
    e = Envoy.with_filter(CONFIG, api.port)
    yield e
    e.stop()
    api.stop()


BROWSER = {
    "user-agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "accept": "application/json",
    "accept-language": "en-GB,en;q=0.5",
}


def login(envoy, client, username, password, form=False, ua="python-requests/2.31.0", browser=False):
    headers = {"x-forwarded-for": client, **(BROWSER if browser else {"user-agent": ua})}
    if form:
        headers["content-type"] = "application/x-www-form-urlencoded"
        body = f"username={username}&password={password}"
        return request(envoy.port, "POST", "/api/login", headers, body)
    return request(envoy.port, "POST", "/api/login", headers, {"username": username, "password": password})


def get(envoy, client, path, ua="Mozilla/5.0"):
    return request(envoy.port, "GET", path, {"x-forwarded-for": client, "user-agent": ua})


def first_block(responses):
    for i, r in enumerate(responses):
        if r.status in (403, 429):
            return i
    return None


def test_single_source_stuffing_is_blocked(envoy):
    client = "203.0.113.101"
    responses = [login(envoy, client, f"user{n:04d}", "Password1!") for n in range(1, 31)]
    i = first_block(responses)
    assert i is not None and i <= 5, [r.status for r in responses]
    assert responses[i].status == 403
    assert responses[i].json()["reasons"] == ["credential_stuffing"]
    assert all(r.status == 403 for r in responses[i:])


def test_password_spraying_with_form_bodies_is_blocked(envoy):
    client = "203.0.113.102"
    responses = [login(envoy, client, u, "Summer2026", form=True) for u in ["alice", "bob"] + [f"user{n:04d}" for n in range(40, 60)]]
    i = first_block(responses)
    assert i is not None and i <= 5, [r.status for r in responses]
    assert "credential_stuffing" in responses[i].json()["reasons"]


def test_brute_force_on_one_account_is_blocked(envoy):
    client = "203.0.113.103"
    responses = [login(envoy, client, "user0100", f"guess{n}") for n in range(20)]
    i = first_block(responses)
    assert i is not None and i <= 6, [r.status for r in responses]


def test_user_who_mistypes_twice_logs_in(envoy):
    client = "198.51.100.101"
    assert login(envoy, client, "alice", "wonderlnd", browser=True).status == 401
    assert login(envoy, client, "Alice", "Wonderland", browser=True).status == 401
    ok = login(envoy, client, "alice", "wonderland", browser=True)
    assert ok.status == 200 and "token" in ok.json()
    assert get(envoy, client, "/api/products?page=1").status == 200


def test_takeover_after_many_failures_on_the_account(envoy):
    # (Its own tool fingerprint: the stuffing tests above may have put the
    # endpoint under attack for the python-requests one.)
    ua = "curl/8.5.0"
    # A low-and-slow attack on user0200 from many addresses, 1 try each...
    for n in range(8):
        assert login(envoy, f"203.0.113.{150 + n}", "user0200", f"wrong{n}", ua=ua).status == 401
    # ...then the attacker, who failed on it before, gets the password right:
    attacker = "203.0.113.149"
    assert login(envoy, attacker, "user0200", "wrong-again", ua=ua).status == 401
    won = login(envoy, attacker, "user0200", "pass-0200", ua=ua)
    assert won.status == 403, "the takeover's token must not be delivered"
    assert "account_takeover" in won.json()["reasons"]
    assert "token" not in won.json()
    envoy.wait_stat("abuse_filter.detector.account_takeover.fired", 1)


def test_sequential_enumeration_is_blocked(envoy):
    client = "203.0.113.110"
    responses = [get(envoy, client, f"/api/users/{n}") for n in range(1, 40)]
    i = first_block(responses)
    assert i is not None and i <= 11, [r.status for r in responses]
    assert responses[i].json()["reasons"] == ["enumeration"]


def test_random_id_guessing_is_blocked(envoy):
    client = "203.0.113.111"
    rng = random.Random(7)
    responses = [get(envoy, client, f"/api/users/{rng.randrange(5000, 10**9)}") for _ in range(40)]
    i = first_block(responses)
    assert i is not None and i <= 12, [r.status for r in responses]
    assert "enumeration" in responses[i].json()["reasons"]


def test_user_revisiting_a_few_profiles_is_fine(envoy):
    client = "198.51.100.110"
    for _ in range(10):
        for n in (3, 17, 42, 17):
            assert get(envoy, client, f"/api/users/{n}").status == 200


def test_sensitive_files_and_scanners_are_blocked(envoy):
    client = "203.0.113.120"
    first = get(envoy, client, "/.env")
    assert first.status == 404  # one request is suspicious, not yet a verdict
    second = get(envoy, client, "/.git/config")
    assert second.status == 403 and second.json()["reasons"] == ["probing"]
    scanner = get(envoy, "203.0.113.121", "/api/products?page=1", ua="sqlmap/1.7.2#stable (https://sqlmap.org)")
    assert scanner.status == 403 and scanner.json()["reasons"] == ["probing"]


def test_forced_browsing_is_blocked(envoy):
    client = "203.0.113.122"
    words = ["admin", "backup", "old", "test", "dev", "api2", "private", "hidden", "debug", "console",
             "secret", "tmp", "logs", "stats", "metrics", "internal", "v0", "beta", "staging", "uploads",
             "files", "download", "export", "dump", "cfg"]
    responses = [get(envoy, client, f"/{w}") for w in words]
    i = first_block(responses)
    # 15 distinct paths, as a 64-bit sketch with the process's random seed
    # counts them (it reaches 15 between the 14th and ~19th path), plus one
    # request the other worker allows before its view (at most T old) sees
    # the block: 1 time in ~20 the block came at the 20th or 21st.
    assert i is not None and i <= 21, [r.status for r in responses]
    assert responses[i].json()["reasons"] == ["probing"]


def test_declared_good_bot_is_exempt_but_its_impostor_is_not(envoy):
    ua = "Mozilla/5.0 (compatible; ExampleBot/2.1; +https://example.com/bot)"
    crawler = [get(envoy, "192.0.2.50", f"/page-{n}", ua=ua) for n in range(30)]
    assert {r.status for r in crawler} == {404}
    impostor = [get(envoy, "203.0.113.130", f"/page-{n}", ua=ua) for n in range(30)]
    assert first_block(impostor) is not None


def test_oversized_or_malformed_login_bodies_pass_unread(envoy):
    client = "198.51.100.120"
    big = request(envoy.port, "POST", "/api/login", {"x-forwarded-for": client, "content-type": "application/json"},
                  '{"username":"alice","password":"' + "x" * 20000 + '"}')
    assert big.status in (401, 413)
    bad = request(envoy.port, "POST", "/api/login", {"x-forwarded-for": client, "content-type": "application/json"},
                  "{not json")
    assert bad.status == 400
    assert login(envoy, client, "alice", "wonderland", browser=True).status == 200
    envoy.wait_stat("abuse_filter.login_bodies_skipped", 1)


def test_distributed_stuffing_over_rotating_addresses(api_for_distributed):
    """250 addresses, 1-3 tries each, one tool fingerprint, usernames from the
    site's own range (a few known to have logged in, most never); a real
    user logs in meanwhile from a browser."""
    api = api_for_distributed
    envoy = Envoy.with_filter(CONFIG, api.port)
    try:
        rng = random.Random(42)
        # A live site first: 40 people log in from their browsers, so the
        # filter knows these accounts exist and how their owners log in.
        for u in range(1, 41):
            assert login(envoy, f"198.51.99.{u}", f"user{u:04d}", f"pass-{u:04d}", browser=True).status == 200
        outcomes = []  # (attempt number, blocked)
        real_user_statuses = []
        attempt = 0
        for n in range(250):
            client = f"100.{64 + n // 250}.{(n // 16) % 256}.{(n * 7) % 256}"
            for _ in range(rng.randint(1, 3)):
                r = login(envoy, client, f"user{rng.randrange(1, 1000):04d}", f"pw{rng.randrange(10**6)}")
                assert r.status in (401, 403), r.status
                outcomes.append((attempt, r.status == 403))
                attempt += 1
            if n % 25 == 0:
                real = login(envoy, f"198.51.100.{200 + n // 25}", "bob", "hunter2", browser=True)
                real_user_statuses.append(real.status)
        first = next((a for a, blocked in outcomes if blocked), None)
        assert first is not None and first < 200, f"recognised at attempt {first}"
        later = [blocked for a, blocked in outcomes if a > first]
        share = sum(later) / len(later)
        print(f"distributed stuffing: {len(outcomes)} attempts, recognised at attempt {first}, "
              f"{share:.1%} of the {len(later)} later attempts blocked")
        assert share >= 0.95
        assert real_user_statuses == [200] * len(real_user_statuses), real_user_statuses
    finally:
        envoy.stop()


@pytest.fixture(scope="module")
def api_for_distributed():
    api = DemoApi()
    yield api
    api.stop()


def test_garbage_requests_never_trap_the_filter(api_for_distributed):
    """Malformed everything, through every detector: each request gets an
    answer and the filter never traps (the harness fails the test if the
    Envoy log shows a trap)."""
    import socket

    config = dict(CONFIG, client={"trusted_proxies": ["127.0.0.0/8"], "api_key_header": "x-api-key",
                                  "session_cookie": "session", "jwt_claim": "sub"},
                  geo={"country_header": "x-geo-country", "asn_header": "x-geo-asn",
                       "anonymous_headers": ["x-geo-anon"]},
                  scraping={"max_kib_per_window": 10})
    envoy = Envoy.with_filter(config, api_for_distributed.port)
    try:
        nasty = [
            {"x-forwarded-for": "999.1.1.1, ::ffff:zz, [::1, , ,"},
            {"x-forwarded-for": "1.2.3.4:99999" + ", 5.6.7.8" * 500},
            {"cookie": "session=" + "A" * 6000 + "; session=; =x; ;;"},
            {"authorization": "Bearer " + "e30." * 3 + "x"},
            {"authorization": "Bearer a.eyJzdWIiOnsidHdvIjpbMSwyXX19.c"},
            {"authorization": "Bearer ..", "x-api-key": "\t"},
            {"x-geo-country": "ZZZ", "x-geo-asn": "-1", "x-geo-anon": "maybe"},
            {"user-agent": "x" * 8000},
        ]
        for i, headers in enumerate(nasty):
            r = request(envoy.port, "GET", f"/api/users/{'9' * 30}?page=-1&offset=1e9&page=%FF", headers)
            assert r.status in (200, 400, 403, 404, 413, 429, 431), (i, r.status)
        for body in [b"\xff\xfe\x00{", b'{"username": {"a": [1, 2]}}', b"username=%ZZ%&password", b"[]" * 3000]:
            r = request(envoy.port, "POST", "/api/login", {"x-forwarded-for": "198.51.100.231",
                                                           "content-type": "application/json"}, body)
            assert r.status in (400, 401, 403, 413, 415), r.status
        # Raw bytes on the wire: a non-UTF-8 path.
        with socket.create_connection(("127.0.0.1", envoy.port), timeout=5) as s:
            s.sendall(b"GET /api/\xc3\x28/\xff HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 198.51.100.232\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.1 ")
        assert envoy.stat("abuse_filter.requests") >= 12 or envoy.wait_stat("abuse_filter.requests", 12)
    finally:
        envoy.stop()
