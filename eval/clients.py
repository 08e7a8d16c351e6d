"""Benign traffic: people and well-behaved machines. Every simulated client
has its own address unless the scenario is about sharing one (the office).
The declared search crawler is driven by wget (tools.py)."""

from __future__ import annotations

import asyncio

from conn import Client
from scenario import Ctx, Scenario, gather_bounded

BROWSER_UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) Gecko/20100101 Firefox/127.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/125.0.0.0 Safari/537.36 Edg/125.0.0.0",
]

# GB addresses known to the MaxMind test City database (tests/data/geoip).
GB_ADDRESSES = ["2.125.160.216", "2.125.160.217", "2.125.160.218", "2.125.160.219", "2.125.160.220",
                "2.125.160.221", "2.125.160.222", "2.125.160.223"]
TOKEN_OWNER_ADDRESS = GB_ADDRESSES[0]
OFFICE_ADDRESS = "198.51.100.10"
PARTNER_ADDRESS = "198.51.100.20"


def browser_headers(rng) -> list[tuple[str, str]]:
    return [
        ("user-agent", rng.choice(BROWSER_UAS)),
        ("accept", "application/json, text/plain, */*"),
        ("accept-language", rng.choice(["en-GB,en;q=0.9", "en-US,en;q=0.8", "de-DE,de;q=0.9,en;q=0.5", "fr-FR,fr;q=0.9"])),
        ("accept-encoding", "gzip, deflate, br"),
        ("referer", "https://shop.example.com/"),
        ("sec-fetch-mode", "cors"),
    ]


def numbered_address(prefix: str, n: int) -> str:
    """n-th address under a /16 prefix such as "100.64", skipping .0 and .255."""
    return f"{prefix}.{n // 254 % 256}.{n % 254 + 1}"


SECOND_FACTOR = "000000"  # the demo API's one-time code


def token_of(r) -> str:
    return r.json().get("token", "") if r is not None and r.status == 200 else ""


def stepped_up(r) -> bool:
    """The demo API asks a `high`-risk login for a second factor (202)."""
    return r is not None and r.status == 202 and bool(r.json().get("mfa_required"))


async def login(c: Client, rng, uid: int, typo_chance: float = 0.1) -> str:
    """Logs user `uid` in, sometimes after a mistyped password; a login the
    application steps up gets its second factor 2-5 s later (the person
    reads the code). Returns the token ('' if refused)."""
    username, password = f"user{uid:04d}", f"pass-{uid:04d}"
    if rng.random() < typo_chance:
        await c.request("POST", "/api/login", {"username": username, "password": password[:-1] + "x"})
        await asyncio.sleep(rng.uniform(1.0, 3.0))
    r = await c.request("POST", "/api/login", {"username": username, "password": password})
    if stepped_up(r):
        await asyncio.sleep(rng.uniform(2.0, 5.0))
        r = await c.request("POST", "/api/login", {"username": username, "password": password, "otp": SECOND_FACTOR})
    return token_of(r)


def browse_path(rng, uid: int) -> str:
    return rng.choice([
        "/api/me", "/api/me",
        f"/api/products?page={rng.randint(1, 3)}", f"/api/products?page={rng.randint(1, 3)}",
        f"/api/products/{rng.randint(1, 500)}", f"/api/products/{rng.randint(1, 500)}",
        f"/api/users/{uid}",
    ])


def app_identity(rng, n: int) -> tuple[str, str, list, int]:
    """(client id, address, headers, account) of app user n; the rng's first draws."""
    return f"u{n:04d}", numbered_address("100.64", n), browser_headers(rng), n + 1


async def app_user(ctx: Ctx, n: int):
    rng = ctx.rng(f"app_users/{n}")
    cid, address, headers, uid = app_identity(rng, n)
    c = Client(ctx.port, "app_users", cid, address, headers)
    try:
        await ctx.at(rng.uniform(0, ctx.duration * 0.5))
        token = await login(c, rng, uid)
        while ctx.left() > 1:
            await asyncio.sleep(rng.uniform(0.5, 5.0))
            r = await c.request("GET", browse_path(rng, uid), headers=[("authorization", f"Bearer {token}")])
            if r is not None and r.status == 401 and ctx.left() > 3:
                token = await login(c, rng, uid, typo_chance=0)
    finally:
        await c.close()


async def app_users(ctx: Ctx):
    await gather_bounded(ctx, [app_user(ctx, n) for n in range(ctx.profile.app_users)])


def office_identity(rng, n: int) -> tuple[str, str, list, int]:
    return f"o{n:03d}", OFFICE_ADDRESS, browser_headers(rng), 501 + n


async def office_user(ctx: Ctx, n: int):
    """One of the office's people behind its NAT: log in (one in ten after a
    typo), then a few pages at human pace, as in test_defaults_safe_envoy."""
    rng = ctx.rng(f"office/{n}")
    cid, address, headers, uid = office_identity(rng, n)
    c = Client(ctx.port, "office_nat", cid, address, headers)
    try:
        await ctx.at(rng.uniform(0, max(1.0, ctx.duration - 20)))
        token = await login(c, rng, uid, typo_chance=0.1 if n % 10 == 0 else 0.0)
        for _ in range(5):
            if ctx.left() < 1:
                break
            await asyncio.sleep(rng.uniform(0.5, 5.0))
            await c.request("GET", browse_path(rng, uid), headers=[("authorization", f"Bearer {token}")])
    finally:
        await c.close()


async def office(ctx: Ctx):
    await gather_bounded(ctx, [office_user(ctx, n) for n in range(ctx.profile.office_users)])


def mobile_identity(rng, n: int) -> tuple[str, str, list, int]:
    ua = rng.choice(["AcmeShop/5.2.1 (iPhone; iOS 17.5; Scale/3.00)", "AcmeShop/5.2.0 (Android 14; Pixel 7) okhttp/4.12.0"])
    return (f"d{n:03d}", numbered_address("100.96", n),
            [("user-agent", ua), ("accept", "application/json"), ("x-app-version", "5.2")], 601 + n % 200)


async def mobile_device(ctx: Ctx, n: int):
    """The mobile app: log in, then poll every 30 s with its Bearer token."""
    rng = ctx.rng(f"mobile/{n}")
    cid, address, headers, uid = mobile_identity(rng, n)
    c = Client(ctx.port, "mobile_app", cid, address, headers)
    try:
        start = rng.uniform(0, 30)
        await ctx.at(start)
        token = await login(c, rng, uid, typo_chance=0.0)
        auth = [("authorization", f"Bearer {token}")]
        t = start
        while ctx.left() > 1:
            await c.request("GET", "/api/me", headers=auth)
            await c.request("GET", "/api/products?page=1", headers=auth)
            t += 30
            if t > ctx.duration - 1:
                break
            await ctx.at(t + rng.uniform(-0.3, 0.3))
    finally:
        await c.close()


async def mobile(ctx: Ctx):
    await gather_bounded(ctx, [mobile_device(ctx, n) for n in range(ctx.profile.mobile_devices)])


async def partner(ctx: Ctx):
    """A partner integration: steady well-formed calls at partner_rps from one
    address with its API key (two keep-alive connections)."""
    rps = ctx.profile.partner_rps
    headers = [("user-agent", "acme-sync/3.2"), ("accept", "application/json"), ("x-api-key", "partner-key-1")]
    conns = [Client(ctx.port, "partner_api", "acme", PARTNER_ADDRESS, headers) for _ in range(2)]

    async def lane(k: int, c: Client):
        i = k
        try:
            while True:
                t = 1.0 + i / rps
                late = ctx.now() - t
                if late > 0.1:
                    # Behind the clock (a slow machine, a stall): skip the
                    # missed slots rather than send them in a burst, which
                    # would be a rate no partner has.
                    i += int(late * rps) // len(conns) * len(conns)
                    t = 1.0 + i / rps
                if t > ctx.duration - 1:
                    break
                await ctx.at(t)
                # The whole public catalogue, in order, and its pages.
                path = f"/api/products?page={1 + i % 25}" if i % 10 == 9 else f"/api/products/{1 + i % 500}"
                await c.request("GET", path)
                i += len(conns)
        finally:
            await c.close()

    await gather_bounded(ctx, [lane(k, c) for k, c in enumerate(conns)])


def roaming_identity(rng, n: int) -> tuple[str, str, list, int]:
    return f"r{n:02d}", GB_ADDRESSES[1 + n % 7], browser_headers(rng), 801 + n


async def roaming_user(ctx: Ctx, n: int):
    """A user whose phone moves between networks inside GB (Wi-Fi, LTE):
    one session token, addresses changing between GB addresses."""
    rng = ctx.rng(f"roaming/{n}")
    cid, home, headers, uid = roaming_identity(rng, n)
    away = GB_ADDRESSES[1 + (n + 3) % 7]
    c = Client(ctx.port, "gb_roaming", cid, home, headers)
    try:
        await ctx.at(rng.uniform(0, 10))
        token = await login(c, rng, uid, typo_chance=0.0)
        auth = [("authorization", f"Bearer {token}")]
        where = home
        while ctx.left() > 1:
            await asyncio.sleep(rng.uniform(1.0, 5.0))
            if rng.random() < 0.3:
                where = away if where == home else home
            await c.request("GET", browse_path(rng, uid), headers=auth, address=where)
    finally:
        await c.close()


async def roaming(ctx: Ctx):
    await gather_bounded(ctx, [roaming_user(ctx, n) for n in range(ctx.profile.roaming_users)])


def token_owner_identity(rng, _n: int = 0) -> tuple[str, str, list, int]:
    return "user0900", TOKEN_OWNER_ADDRESS, browser_headers(rng), 900


async def token_owner(ctx: Ctx):
    """The victim of the stolen-token attack: logs in at home in GB and keeps
    using the app from there. Its token is handed to the thief (attacks.py)."""
    rng = ctx.rng("token_owner")
    cid, address, headers, _uid = token_owner_identity(rng, 0)
    c = Client(ctx.port, "token_owner", cid, address, headers)
    stolen = ctx.future("stolen_token")
    try:
        await ctx.at(1.0)
        token = await login(c, rng, 900, typo_chance=0.0)
        stolen.set_result(token)
        auth = [("authorization", f"Bearer {token}")]
        while ctx.left() > 1:
            await c.request("GET", rng.choice(["/api/me", "/api/products?page=1", "/api/users/900"]), headers=auth)
            await asyncio.sleep(rng.uniform(2.0, 6.0))
    finally:
        if not stolen.done():
            stolen.set_result("")
        await c.close()


CGNAT_ADDRESS = "100.120.0.1"
RETURNING_BASE = 821     # returning_users' accounts: user0821 ...
FIRST_TIME_BASE = 901    # first_time_logins' accounts: user0901 ... (never logged in before)


def returning_identity(rng, n: int) -> tuple[str, str, list, int]:
    return f"ret{n:03d}", numbered_address("100.72", n), browser_headers(rng), RETURNING_BASE + n


def during_attack(ctx: Ctx, rng) -> float:
    """A moment well inside the attack window (the browser-copying stuffing
    runs from attack_start to the end): after its first 30 %."""
    lo = ctx.attack_start + 0.3 * (ctx.duration - ctx.attack_start)
    return rng.uniform(lo, max(lo, ctx.duration - 4))


async def paced_login(c: Client, rng, uid: int, t: float, ctx: Ctx, typo: bool, address: str | None = None):
    """Logs user `uid` in at `t` (after a mistyped password at `t` when
    `typo`, the right one 1-3 s later; the second factor 2-5 s after a
    step-up; on the clock); returns (token, time of the last attempt)."""
    username, password = f"user{uid:04d}", f"pass-{uid:04d}"
    if typo:
        await ctx.at(t)
        await c.request("POST", "/api/login", {"username": username, "password": password[:-1] + "x"}, address=address)
        t += rng.uniform(1.0, 3.0)
    await ctx.at(t)
    r = await c.request("POST", "/api/login", {"username": username, "password": password}, address=address)
    if stepped_up(r):
        # Asked for the second factor: the person types it 2-5 s later.
        t += rng.uniform(2.0, 5.0)
        await ctx.at(t)
        r = await c.request("POST", "/api/login", {"username": username, "password": password, "otp": SECOND_FACTOR},
                            address=address)
    return token_of(r), t


async def returning_user(ctx: Ctx, n: int):
    """Someone with an account here who logged in before (in the history
    phase and again before the attack, from their usual browser and
    address) and logs in again during the browser-copying stuffing: a new
    session from the same browser, one in ten after a typo; one in four from
    another network (same browser, a new address)."""
    rng = ctx.rng(f"returning/{n}")
    cid, address, headers, uid = returning_identity(rng, n)
    c = Client(ctx.port, "returning_users", cid, address, headers)
    try:
        t = rng.uniform(0.5, max(1.0, ctx.attack_start - 4))
        token, t = await paced_login(c, rng, uid, t, ctx, typo=False)
        for _ in range(2):
            t += rng.uniform(0.5, 1.5)
            await ctx.at(t)
            await c.request("GET", browse_path(rng, uid), headers=[("authorization", f"Bearer {token}")])
        t = during_attack(ctx, rng)
        elsewhere = numbered_address("100.73", n) if n % 4 == 3 else None
        token, t = await paced_login(c, rng, uid, t, ctx, typo=rng.random() < 0.1, address=elsewhere)
        for _ in range(2):
            t += rng.uniform(0.5, 1.5)
            if t > ctx.duration - 1:
                break
            await ctx.at(t)
            await c.request("GET", browse_path(rng, uid), headers=[("authorization", f"Bearer {token}")], address=elsewhere)
    finally:
        await c.close()


async def returning_users(ctx: Ctx):
    await gather_bounded(ctx, [returning_user(ctx, n) for n in range(ctx.profile.returning_users)])


async def first_time_login(ctx: Ctx, n: int):
    """Someone logging in for the first time ever (an account that never
    logged in, not even in the history phase) during the browser-copying
    stuffing, from a new address and browser: a product page first, then
    the login 2-5 s later, then their own pages."""
    rng = ctx.rng(f"first_time/{n}")
    uid = FIRST_TIME_BASE + n
    c = Client(ctx.port, "first_time_logins", f"new{n:03d}", numbered_address("100.74", n), browser_headers(rng))
    try:
        t = during_attack(ctx, rng)
        await ctx.at(t)
        await c.request("GET", f"/api/products?page={rng.randint(1, 3)}")
        token, t = await paced_login(c, rng, uid, t + rng.uniform(2.0, 5.0), ctx, typo=False)
        for path in ("/api/me", f"/api/users/{uid}"):
            t += rng.uniform(0.5, 1.5)
            if t > ctx.duration - 1:
                break
            await ctx.at(t)
            await c.request("GET", path, headers=[("authorization", f"Bearer {token}")])
    finally:
        await c.close()


async def first_time_logins(ctx: Ctx):
    await gather_bounded(ctx, [first_time_login(ctx, n) for n in range(ctx.profile.first_time_logins)])


def phone_agent(n: int) -> str:
    return f"ShopApp/5.{n % 7} (Android 14; Pixel {6 + n % 4}; build {1000 + n})"


async def cgnat_phone(ctx: Ctx, n: int):
    """One of the phones behind the carrier-grade NAT: anonymous product
    browsing, a request every 3-8 s on the clock, its own app user agent."""
    rng = ctx.rng(f"cgnat/{n}")
    c = Client(ctx.port, "cgnat_phones", f"p{n:03d}", CGNAT_ADDRESS,
               [("user-agent", phone_agent(n)), ("accept", "application/json"), ("accept-encoding", "gzip")])
    try:
        t = rng.uniform(0.5, 8.0)
        while t < ctx.duration - 1:
            await ctx.at(t)
            path = (f"/api/products?page={rng.randint(1, 5)}" if rng.random() < 0.5
                    else f"/api/products/{rng.randint(1, 500)}")
            await c.request("GET", path)
            t += rng.uniform(3.0, 8.0)
    finally:
        await c.close()


async def cgnat_phones(ctx: Ctx):
    await gather_bounded(ctx, [cgnat_phone(ctx, n) for n in range(ctx.profile.cgnat_phones)])


OWNER_BASE = 950  # account_owners' accounts: user0950...
PHONE_UA = BROWSER_UAS[4]


def owner_identity(rng, n: int) -> tuple[str, str, list, int]:
    """An account owner at home in GB, on their laptop (never the phone's browser)."""
    headers = browser_headers(rng)
    if headers[0][1] == PHONE_UA:
        headers[0] = ("user-agent", BROWSER_UAS[0])
    return f"o{n:02d}", GB_ADDRESSES[n % len(GB_ADDRESSES)], headers, OWNER_BASE + n


async def account_owner(ctx: Ctx, n: int):
    """Someone who logged in from home before (the history phase: their
    profile is in the scorer, and back in the restarted Envoy) logs in
    again at home on their laptop; one in four also from a new phone at home."""
    rng = ctx.rng(f"owner/{n}")
    cid, address, headers, uid = owner_identity(rng, n)
    c = Client(ctx.port, "account_owners", cid, address, headers)
    phone = Client(ctx.port, "account_owners", f"{cid}-phone", address,
                   [("user-agent", PHONE_UA), *headers[1:]])
    try:
        await ctx.at(rng.uniform(1.0, max(2.0, ctx.duration - 10)))
        token = await login(c, rng, uid, typo_chance=0.0)
        await c.request("GET", "/api/me", headers=[("authorization", f"Bearer {token}")])
        if n % 4 == 1:
            await asyncio.sleep(rng.uniform(1.0, 4.0))
            await login(phone, rng, uid, typo_chance=0.0)
    finally:
        await c.close()
        await phone.close()


async def account_owners(ctx: Ctx):
    await gather_bounded(ctx, [account_owner(ctx, n) for n in range(ctx.profile.account_owners)])


IDENTITIES = {  # scenario -> (rng name of client n, identity function, clients in a profile)
    "app_users": (lambda n: f"app_users/{n}", app_identity, lambda p: p.app_users),
    "office_nat": (lambda n: f"office/{n}", office_identity, lambda p: p.office_users),
    "mobile_app": (lambda n: f"mobile/{n}", mobile_identity, lambda p: p.mobile_devices),
    "gb_roaming": (lambda n: f"roaming/{n}", roaming_identity, lambda p: p.roaming_users),
    "token_owner": (lambda n: "token_owner", token_owner_identity, lambda p: 1),
    "returning_users": (lambda n: f"returning/{n}", returning_identity, lambda p: p.returning_users),
    "account_owners": (lambda n: f"owner/{n}", owner_identity, lambda p: p.account_owners),
}


def history_logins(ctx: Ctx, scenarios: set[str]) -> list[tuple[str, str, str, list, int]]:
    """Every benign user of the chosen scenarios that logs in, as they will
    during the run (the same address and browser, drawn from the same
    seeded rng): (scenario, client id, address, headers, account)."""
    out = []
    for name, (rng_name, identity, count) in IDENTITIES.items():
        if name not in scenarios:
            continue
        for n in range(count(ctx.profile)):
            cid, address, headers, uid = identity(ctx.rng(rng_name(n)), n)
            out.append((name, cid, address, headers, uid))
    return out


def benign_accounts(ctx: Ctx) -> list[int]:
    """The accounts benign users log into during the run (first-timers' excluded)."""
    return sorted({uid for *_, uid in history_logins(ctx, set(IDENTITIES))})


async def coupon_shopper(ctx: Ctx, n: int):
    """A shopper at checkout: a product page, then one to three coupon codes
    (a typo, an expired one, the real WELCOME10), seconds apart: the benign
    look-alike of coupon enumeration."""
    rng = ctx.rng(f"coupon_shoppers/{n}")
    c = Client(ctx.port, "coupon_shoppers", f"s{n:03d}", f"100.70.{n // 200}.{n % 200 + 1}", browser_headers(rng))
    try:
        await ctx.at(rng.uniform(0, max(1.0, ctx.duration - 15)))
        await c.request("GET", f"/api/products/{rng.randint(1, 500)}")
        codes = rng.sample(["WELCOM10", "SPRING24", "FREESHIP", "SUMMER"], rng.randint(0, 2)) + ["WELCOME10"]
        for code in codes:
            if ctx.left() < 1:
                break
            await asyncio.sleep(rng.uniform(1.0, 4.0))
            await c.request("POST", "/api/coupons/apply", {"code": code})
    finally:
        await c.close()


async def coupon_shoppers(ctx: Ctx):
    await gather_bounded(ctx, [coupon_shopper(ctx, n) for n in range(ctx.profile.coupon_shoppers)])


FLASH_SALE_SHOPPERS = 80


async def flash_shopper(ctx: Ctx, n: int):
    """A shopper arriving for a flash sale: straight to one of three sale
    products, then a look at it again and a page of the catalogue — the
    benign look-alike of a harvest (many new clients, all at once)."""
    rng = ctx.rng(f"flash_sale/{n}")
    c = Client(ctx.port, "flash_sale", f"f{n:03d}", f"100.71.{n // 200}.{n % 200 + 1}", browser_headers(rng))
    try:
        # Everyone within the same ten seconds, during the attacks.
        await ctx.at(ctx.attack_start + 4 + rng.uniform(0, 10))
        product = rng.choice([7, 8, 9])
        for path in (f"/api/products/{product}", f"/api/products/{product}", "/api/products?page=1"):
            if ctx.left() < 1:
                break
            await c.request("GET", path)
            await asyncio.sleep(rng.uniform(0.5, 2.0))
    finally:
        await c.close()


async def flash_sale(ctx: Ctx):
    await gather_bounded(ctx, [flash_shopper(ctx, n) for n in range(FLASH_SALE_SHOPPERS)])


SCENARIOS = [
    Scenario("app_users", "benign", "generator",
             "app users, each its own address and browser: log in (1 in 10 after a typo), then /api/me, "
             "/api/products?page=1..3, /api/products/{id}, their own /api/users/{id} every 0.5-5 s",
             app_users, planned_clients=lambda p: p.app_users),
    Scenario("office_nat", "benign", "generator",
             "a NATed office: 100 people behind ONE address, each logs in (one in ten after a typo) and opens 5 pages",
             office, planned_clients=lambda p: p.office_users),
    Scenario("mobile_app", "benign", "generator",
             "mobile app devices, each its own address: log in, then poll /api/me and products every 30 s with a Bearer token",
             mobile, planned_clients=lambda p: p.mobile_devices),
    Scenario("partner_api", "benign", "generator",
             "a partner integration: 50 well-formed requests/s with x-api-key from one address, all run long, "
             "reading the whole public catalogue (/api/products/{id} 1..500 in order, and its pages)",
             partner),
    Scenario("gb_roaming", "benign", "generator",
             "users whose phones move between GB networks: one session token, two GB addresses",
             roaming, planned_clients=lambda p: p.roaming_users),
    Scenario("token_owner", "benign", "generator",
             "the owner of the token stolen below: logs in at home in GB and keeps using it there",
             token_owner),
    Scenario("returning_users", "benign", "generator",
             "people with an account here who logged in before (history phase, again before the attack) and log in "
             "again during the browser-copying stuffing from their usual browser (1 in 10 after a typo; 1 in 4 from "
             "another network)",
             returning_users, planned_clients=lambda p: p.returning_users),
    Scenario("first_time_logins", "benign", "generator",
             "people logging in for the first time ever during the browser-copying stuffing, each from a new address "
             "and browser, after a product page",
             first_time_logins, planned_clients=lambda p: p.first_time_logins),
    Scenario("account_owners", "benign", "generator",
             "account owners who logged in from home in GB before (their profile is known) log in again at home "
             "on their laptop; one in four also from a new phone at home",
             account_owners, planned_clients=lambda p: p.account_owners + (p.account_owners + 2) // 4),
    Scenario("cgnat_phones", "benign", "generator",
             "120 phones behind ONE carrier-grade NAT address browsing products anonymously, each a request every "
             "3-8 s (~25 requests/s from the address), each its own app user agent",
             cgnat_phones, planned_clients=lambda p: p.cgnat_phones),
    Scenario("coupon_shoppers", "benign", "generator",
             "shoppers at checkout, each its own address: a product page, then one to three coupon codes "
             "(typos, an expired one, WELCOME10) a few seconds apart",
             coupon_shoppers, planned_clients=lambda p: p.coupon_shoppers),
    Scenario("flash_sale", "benign", "generator",
             f"a flash sale: {FLASH_SALE_SHOPPERS} new shoppers, each its own address, on three products within ten "
             "seconds during the attacks (the benign look-alike of a harvest)",
             flash_sale, planned_clients=lambda p: FLASH_SALE_SHOPPERS),
]
