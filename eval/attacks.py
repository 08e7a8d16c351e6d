"""Attacks driven by the generator (the ones a stock tool cannot express:
hundreds of rotating addresses, random ids, a stolen token used abroad, a
slow cadence). The tool-driven attacks are in tools.py."""

from __future__ import annotations

import asyncio

from clients import BROWSER_UAS, benign_accounts, browser_headers, owner_identity, stepped_up
from conn import Client
from scenario import Ctx, Scenario, gather_bounded

# One tool fingerprint for every distributed-stuffing address: same user
# agent, same header names in the same order.
STUFFER_HEADERS = [("user-agent", "python-requests/2.31.0"), ("accept-encoding", "gzip, deflate"),
                   ("accept", "*/*"), ("connection", "keep-alive")]

# The stolen token, used from abroad (MaxMind test City database).
THIEF_ADDRESSES = {"CN": "175.16.199.1", "US": "216.160.83.56", "SE": "89.160.20.112", "PH": "202.196.224.1"}

SCRAPER_ADDRESS = "203.0.113.40"
BOLA_RANDOM_ADDRESS = "203.0.113.32"
SLOW_ADDRESS = "203.0.113.50"
SLOW_TARGET = "user0999"
ODD_MIX_ADDRESS = "203.0.113.60"
# Paths no page links to: a tool probing the API's surface, a word list's
# worth, never the same twice, none a sensitive file or an object id.
ODD_MIX_WORDS = ["export", "v2", "internal", "admin-api", "graphql", "search", "feed", "bulk", "catalog", "stock",
                 "prices", "inventory", "sitemap", "archive", "legacy", "beta", "mobile", "partners", "reports",
                 "metrics", "status", "health", "webhooks", "batch", "sync", "changes", "deltas", "snapshot"]


def combo_list(rng, n: int) -> list[tuple[str, str]]:
    """A leaked combo list: each credential once, real and unknown usernames mixed."""
    names = [f"user{i:04d}" for i in rng.sample(range(1, 1001), min(n, 600))]
    first = ["james", "mary", "john", "linda", "wei", "olga", "ahmed", "sofia", "raj", "emma", "noah", "yuki"]
    while len(names) < n:
        names.append(f"{rng.choice(first)}.{rng.choice(first)}{rng.randint(1, 9999)}@mail.example")
    rng.shuffle(names)
    return [(u, f"{rng.choice(['Summer', 'Qwerty', 'Dragon', 'Monkey', 'Welcome'])}{rng.randint(1, 9999)}!")
            for u in names[:n]]


async def distributed_stuffing(ctx: Ctx):
    """Credential stuffing over rotating addresses (198.18.0.0/15), 1-3 tries
    each, one fingerprint, spread over the attack window by 16 workers."""
    rng = ctx.rng("distributed")
    n_addr = ctx.profile.distributed_addresses
    plan = [(f"198.18.{k // 250}.{k % 250 + 1}", rng.randint(1, 3)) for k in range(n_addr)]
    combos = iter(combo_list(rng, sum(t for _, t in plan)))
    start, end = ctx.attack_start, ctx.duration - 2
    per_addr = (end - start) / n_addr
    queue: asyncio.Queue = asyncio.Queue()
    for k, item in enumerate(plan):
        queue.put_nowait((k, item))

    async def worker():
        while not queue.empty():
            k, (address, tries) = queue.get_nowait()
            await ctx.at(start + k * per_addr)
            if ctx.left() < 1:
                return
            c = Client(ctx.port, "distributed_stuffing", address, address, STUFFER_HEADERS)
            try:
                for _ in range(tries):
                    user, password = next(combos)
                    await c.request("POST", "/api/login", {"username": user, "password": password})
                    await asyncio.sleep(rng.uniform(0.05, 0.3))
            finally:
                await c.close()

    await gather_bounded(ctx, [worker() for _ in range(16)])


# First octets the browser-copying stuffing scatters over: public-looking
# /8s, none used by another scenario (or by the declared crawler's range)
# and none CrowdSec whitelists.
SCATTER_OCTETS = [o for o in range(11, 224)
                  if o not in {66, 89, 100, 127, 169, 172, 175, 192, 198, 202, 203, 216}]


def scattered_address(rng) -> str:
    return f"{rng.choice(SCATTER_OCTETS)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def leaked_combos(rng, n: int, real_accounts: list[int], real_share: float = 0.1) -> list[tuple[str, str]]:
    """A combo list leaked from another site: about `real_share` of it names
    accounts real users use here (with passwords from elsewhere), the rest
    accounts that do not exist here."""
    first = ["anna", "li", "omar", "kate", "james", "mary", "wei", "olga", "ahmed", "sofia", "raj", "yuki"]
    out = []
    for _ in range(n):
        if real_accounts and rng.random() < real_share:
            user = f"user{rng.choice(real_accounts):04d}"
        else:
            user = f"{rng.choice(first)}.{rng.choice(first)}{rng.randrange(10**5)}@mail.example"
        out.append((user, f"{rng.choice(['Summer', 'Qwerty', 'Dragon', 'Monkey', 'Welcome'])}{rng.randrange(10**4)}!"))
    return out


async def browser_stuffing(ctx: Ctx):
    """Distributed stuffing that copies the real users' browsers exactly:
    each address sends one of the benign app users' browser header sets
    (browser_headers(): the same user agents, the same headers in the same
    order), scattered addresses over many /8s, 1-3 tries each, a leaked list
    of which ~10 % names accounts benign users use here. Address k starts at
    attack_start + k * gap, its tries 0.4-1.2 s apart, all on the clock."""
    rng = ctx.rng("browser_stuffing")
    n_addr = ctx.profile.browser_stuffing_addresses
    plan = [(scattered_address(rng), browser_headers(rng), rng.randint(1, 3)) for _ in range(n_addr)]
    combos = iter(leaked_combos(rng, sum(t for *_, t in plan), benign_accounts(ctx)))
    start, end = ctx.attack_start, ctx.duration - 2
    gap = (end - start) / n_addr
    schedule = []
    for k, (address, headers, tries) in enumerate(plan):
        t = start + k * gap
        attempts = []
        for _ in range(tries):
            attempts.append((t, next(combos)))
            t += rng.uniform(0.4, 1.2)
        schedule.append((address, headers, attempts))

    async def one(address, headers, attempts):
        await ctx.at(attempts[0][0])
        c = Client(ctx.port, "browser_stuffing", address, address, headers)
        try:
            for t, (user, password) in attempts:
                if t > ctx.duration - 1:
                    return
                await ctx.at(t)
                await c.request("POST", "/api/login", {"username": user, "password": password})
        finally:
            await c.close()

    await gather_bounded(ctx, [one(*s) for s in schedule])


SEASONAL = ["Summer2024!", "Winter2024!", "Spring2025!", "Autumn2024!", "Summer2025!"]
LEAK_FIRST = ["anna", "li", "omar", "kate", "james", "mary", "wei", "olga", "ahmed", "sofia", "raj", "yuki"]


def disguised_names(kind: str, rng, real_accounts: list[int]) -> str:
    """emails: a leak list's e-mail addresses; mixed: a combo list from
    another site (~10 % name accounts real users use here); site_names: this
    site's own format (`userNNNN`), accounts that exist but nobody logged
    into here (~10 % real users' accounts)."""
    if kind != "emails" and real_accounts and rng.random() < 0.1:
        return f"user{rng.choice(real_accounts):04d}"
    if kind == "site_names":
        taken = set(real_accounts)
        while True:
            n = rng.randrange(1, 1001)
            if n not in taken:
                return f"user{n:04d}"
    return f"{rng.choice(LEAK_FIRST)}.{rng.choice(LEAK_FIRST)}{rng.randrange(10**5)}@mail.example"


def disguised_password(kind: str, rng) -> str:
    if kind == "seasonal":
        return rng.choice(SEASONAL)
    if kind == "spray":
        return rng.choice(["Summer2025!", "Welcome1!"])
    return f"{rng.choice(LEAK_FIRST).capitalize()}{rng.randrange(10**4)}!"


async def disguised(ctx: Ctx, name: str, names: str, passwords: str, tries: tuple[int, int], pages: int):
    """Distributed stuffing the way careful tools disguise it (issue 23):
    each new address (scattered over many /8s) first opens `pages` catalogue
    pages (a product, then the list) 1-2.5 s apart, then logs in 1-2.5 s
    later with the exact header set and order of the real users' browsers
    (browser_headers(), the app users' own builder), `tries` (lo, hi)
    attempts 0.4-1.2 s apart; address k starts at attack_start + k * gap,
    on the clock."""
    rng = ctx.rng(name)
    n_addr = ctx.profile.disguised_addresses
    real = benign_accounts(ctx)
    start, end = ctx.attack_start, ctx.duration - 2
    gap = (end - start) / n_addr
    schedule = []
    for k in range(n_addr):
        headers = browser_headers(rng)
        t = start + k * gap
        views = []
        for p in range(pages):
            views.append(f"/api/products/{rng.randint(1, 500)}" if p == 0 else f"/api/products?page={rng.randint(1, 5)}")
        attempts = []
        for _ in range(rng.randint(*tries)):
            attempts.append((t, disguised_names(names, rng, real), disguised_password(passwords, rng)))
            t += rng.uniform(0.4, 1.2)
        view_gaps = [rng.uniform(1.0, 2.5) for _ in views]
        schedule.append((scattered_address(rng), headers, views, view_gaps, attempts))

    async def one(address, headers, views, view_gaps, attempts):
        t = attempts[0][0] - sum(view_gaps)
        c = Client(ctx.port, name, address, address, headers)
        try:
            for path, g in zip(views, view_gaps):
                await ctx.at(max(0.0, t))
                await c.request("GET", path)
                t += g
            for t, user, password in attempts:
                if t > ctx.duration - 1:
                    return
                await ctx.at(t)
                await c.request("POST", "/api/login", {"username": user, "password": password})
        finally:
            await c.close()

    await gather_bounded(ctx, [one(*s) for s in schedule])


async def disguised_stuffing(ctx: Ctx):
    await disguised(ctx, "disguised_stuffing", "emails", "seasonal", (1, 2), 1)


async def disguised_combo_list(ctx: Ctx):
    await disguised(ctx, "disguised_combo_list", "mixed", "combos", (1, 2), 2)


async def disguised_site_names(ctx: Ctx):
    await disguised(ctx, "disguised_site_names", "site_names", "spray", (1, 1), 2)


async def bola_random(ctx: Ctx):
    """BOLA: random user ids (most do not exist) from one address, 5/s."""
    rng = ctx.rng("bola_random")
    c = Client(ctx.port, "bola_random_ids", "enum-1", BOLA_RANDOM_ADDRESS,
               [("user-agent", "Go-http-client/1.1"), ("accept-encoding", "gzip")])
    try:
        await ctx.at(ctx.attack_start + 8)
        while ctx.left() > 1:
            await c.request("GET", f"/api/users/{rng.randint(1, 5000)}")
            await asyncio.sleep(0.2)
    finally:
        await c.close()


async def scraping(ctx: Ctx):
    """Scraping by pagination: /api/products?page=1..N, 4 pages a second."""
    c = Client(ctx.port, "scraping_pagination", "scraper-1", SCRAPER_ADDRESS,
               [("user-agent", "Mozilla/5.0 (compatible; DataHarvester/1.4)"), ("accept", "*/*")])
    try:
        start = ctx.attack_start + 10
        page = 1
        # Page n at start + (n - 1) * 0.25 s, on the clock: slow answers do
        # not stretch the pace.
        while True:
            await ctx.at(start + (page - 1) * 0.25)
            if ctx.left() <= 1:
                break
            await c.request("GET", f"/api/products?page={page}")
            page += 1
    finally:
        await c.close()


HARVEST_IDS = 1000  # the demo API's generated users (ids 1..1000)


async def distributed_harvest(ctx: Ctx):
    """A distributed harvest of /api/users/{id} (private profiles): 250
    scattered addresses with the app users' browser headers, each reading 4
    consecutive ids, together the whole id space in ~40 s (25 a second), all
    on the clock. The shape of the 533-million-record scrape."""
    rng = ctx.rng("distributed_harvest")
    per_address, n_addr = 4, HARVEST_IDS // 4
    start = ctx.attack_start + 2
    span = min(40.0, max(5.0, ctx.duration - 3 - start))
    gap = span / HARVEST_IDS
    plan = [(scattered_address(rng), browser_headers(rng)) for _ in range(n_addr)]

    async def one(k, address, headers):
        await ctx.at(start + k * per_address * gap)
        c = Client(ctx.port, "distributed_harvest", address, address, headers)
        try:
            for j in range(per_address):
                t = start + (k * per_address + j) * gap
                if t > ctx.duration - 1:
                    return
                await ctx.at(t)
                await c.request("GET", f"/api/users/{k * per_address + j + 1}")
        finally:
            await c.close()

    await gather_bounded(ctx, [one(k, *p) for k, p in enumerate(plan)])


async def stolen_token(ctx: Ctx):
    """A real user's JWT (obtained by logging in as them from GB, see
    token_owner) used from CN, US, SE and PH."""
    rng = ctx.rng("stolen_token")
    token = await ctx.future("stolen_token")
    if not token:
        ctx.notes["stolen_token"] = "the owner's login failed: no token to steal"
        return
    await ctx.at(ctx.attack_start + 5)
    thieves = {cc: Client(ctx.port, "stolen_token", f"thief-{cc}", addr,
                          [("user-agent", "python-requests/2.31.0"), ("accept", "*/*")])
               for cc, addr in THIEF_ADDRESSES.items()}
    auth = [("authorization", f"Bearer {token}")]
    try:
        for _round in range(6):
            for c in thieves.values():
                if ctx.left() < 1:
                    return
                await c.request("GET", rng.choice(["/api/me", "/api/users/900", "/api/products?page=1"]), headers=auth)
                await asyncio.sleep(rng.uniform(0.5, 1.5))
    finally:
        for c in thieves.values():
            await c.close()


async def low_and_slow(ctx: Ctx):
    """Brute force on one account from one address, one guess every 2.2 s:
    under every per-client rate limit (the shipped login limit: 120/min)."""
    rng = ctx.rng("low_and_slow")
    c = Client(ctx.port, "low_and_slow", "slow-1", SLOW_ADDRESS,
               [("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
                ("accept", "application/json")])
    try:
        n = 0
        # Guess n at 2.0 + (n - 1) * 2.2 s, on the clock: slow answers do not
        # stretch the cadence (a sleep after each answer would, and fewer
        # guesses would fit in the quick profile).
        while True:
            await ctx.at(2.0 + n * 2.2)
            if ctx.left() <= 1:
                break
            n += 1
            await c.request("POST", "/api/login", {"username": SLOW_TARGET, "password": f"guess-{n}-{rng.randint(0, 99)}"})
    finally:
        await c.close()


def takeover_address(n: int) -> str:
    """China, the Philippines and Sweden in turn (MaxMind test City database)."""
    return [f"175.16.199.{10 + n % 240}", f"202.196.224.{10 + n % 240}", f"89.160.20.{112 + n % 16}"][n % 3]


async def takeover(ctx: Ctx, n: int):
    """The right password of account_owners' account n, bought or phished,
    used once from abroad on another browser than the owner's: the even ones
    before the other attacks start (only the account's profile can tell),
    the odd ones during them. Asked for a second factor it does not have,
    it gives up."""
    rng = ctx.rng(f"takeover/{n}")
    _cid, _home, owner_headers, uid = owner_identity(ctx.rng(f"owner/{n}"), n)
    ua = next(u for u in BROWSER_UAS[1:] if u != owner_headers[0][1] and "iPhone" not in u)
    c = Client(ctx.port, "valid_credential_takeover", f"t{n:02d}", takeover_address(n),
               [("user-agent", ua), *browser_headers(rng)[1:]])
    try:
        if n % 2 == 0:
            await ctx.at(rng.uniform(1.0, max(1.5, ctx.attack_start - 2)))
        else:
            await ctx.at(ctx.attack_start + rng.uniform(0, max(1.0, ctx.duration - ctx.attack_start - 10)))
        r = await c.request("POST", "/api/login", {"username": f"user{uid:04d}", "password": f"pass-{uid:04d}"})
        if r is not None and r.status == 200 and not stepped_up(r):
            await c.request("GET", "/api/me", headers=[("authorization", f"Bearer {r.json().get('token', '')}")])
    finally:
        await c.close()


async def odd_mix_scraper(ctx: Ctx):
    """A slow scraper that stays under every rule threshold but has no real
    client's mix: one request every 0.9-2.1 s (irregular: no machine
    rhythm), spread over product pages, product details and paths nobody
    links to — a third of its answers are 404, ~12 distinct 404 paths a
    minute (probing counts 20), on no object route (no enumeration) — with a
    header set no browser sends."""
    rng = ctx.rng("odd_mix_scraper")
    c = Client(ctx.port, "odd_mix_scraper", "odd-mix-1", ODD_MIX_ADDRESS,
               [("user-agent", "okhttp/4.12.0"), ("accept", "application/json"), ("x-client-build", "7731"),
                ("accept-encoding", "identity")])
    words = iter(rng.sample(ODD_MIX_WORDS, len(ODD_MIX_WORDS)))
    try:
        t = ctx.attack_start
        while ctx.left() > 1:
            await ctx.at(t)
            roll = rng.random()
            if roll < 0.33:
                word = next(words, None) or f"x{rng.randrange(10**6)}"
                path = f"/api/{word}"
            elif roll < 0.66:
                path = f"/api/products?page={rng.randint(1, 25)}"
            else:
                path = f"/api/products/{rng.randint(1, 500)}"
            await c.request("GET", path)
            t += rng.uniform(0.9, 2.1)
    finally:
        await c.close()


COUPON_ADDRESS = "203.0.113.70"


async def coupon_enumeration(ctx: Ctx):
    """Coupon enumeration: guessed codes on /api/coupons/apply, 4/s, one
    address (the shipped rule `coupon_enumeration`: 20 distinct codes per
    client in 10 minutes)."""
    rng = ctx.rng("coupon_enumeration")
    c = Client(ctx.port, "coupon_enumeration", "coupons-1", COUPON_ADDRESS,
               [("user-agent", "python-httpx/0.27"), ("accept", "*/*")])
    try:
        start = ctx.attack_start + 5
        n = 0
        while True:
            await ctx.at(start + n * 0.25)
            if ctx.left() <= 1:
                break
            code = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(8))
            await c.request("POST", "/api/coupons/apply", {"code": code})
            n += 1
    finally:
        await c.close()


async def takeovers(ctx: Ctx):
    await gather_bounded(ctx, [takeover(ctx, n) for n in range(min(ctx.profile.takeovers, ctx.profile.account_owners))])


SCENARIOS = [
    Scenario("distributed_stuffing", "attack", "generator",
             "credential stuffing over rotating addresses (198.18.0.0/15), 1-3 tries each from a combo list, "
             "one tool fingerprint (python-requests UA and header order)",
             distributed_stuffing, planned_clients=lambda p: p.distributed_addresses),
    Scenario("browser_stuffing", "attack", "generator",
             "distributed credential stuffing copying the app users' browsers exactly (same user agents and header "
             "sets), scattered addresses over many /8s, 1-3 tries each, a leaked list ~10 % real accounts",
             browser_stuffing, planned_clients=lambda p: p.browser_stuffing_addresses),
    Scenario("disguised_stuffing", "attack", "generator",
             "disguised stuffing, the issue 23 shape: each new scattered address opens a product page, then logs in "
             "with the real users' exact header set and order; e-mail names from a leak list, five seasonal "
             "passwords, 1-2 tries each",
             disguised_stuffing, planned_clients=lambda p: p.disguised_addresses, logins_only=True),
    Scenario("disguised_combo_list", "attack", "generator",
             "disguised stuffing with a combo list from another site (each credential its own password, ~10 % "
             "names of real users here): a product and a product list first, exact browser headers, 1-2 tries",
             disguised_combo_list, planned_clients=lambda p: p.disguised_addresses, logins_only=True),
    Scenario("disguised_site_names", "attack", "generator",
             "disguised password spraying in this site's own naming (userNNNN accounts nobody logged into here, "
             "~10 % real users'), two passwords, one try per address after two catalogue pages",
             disguised_site_names, planned_clients=lambda p: p.disguised_addresses, logins_only=True),
    Scenario("bola_random_ids", "attack", "generator",
             "BOLA enumeration of random ids 1..5000 on /api/users/{id}, 5/s, one address",
             bola_random, single_source=True),
    Scenario("scraping_pagination", "attack", "generator",
             "scraping by pagination: /api/products?page=1,2,3,... 4 pages/s, one address",
             scraping, single_source=True),
    Scenario("stolen_token", "attack", "generator",
             "token_owner's JWT used from CN, US, SE and PH addresses (one client per country)",
             stolen_token, planned_clients=lambda p: len(THIEF_ADDRESSES)),
    Scenario("valid_credential_takeover", "attack", "generator",
             "account_owners' right passwords used once each from CN, PH and SE on another browser (no failures), "
             "half before the other attacks start, half during them",
             takeovers, planned_clients=lambda p: min(p.takeovers, p.account_owners), told_not_blocked=True),
    Scenario("low_and_slow", "attack", "generator",
             f"brute force on {SLOW_TARGET} from one address, one guess every 2.2 s (under every per-client rate)",
             low_and_slow, single_source=True),
    Scenario("coupon_enumeration", "attack", "generator",
             "coupon enumeration: random 8-character codes on /api/coupons/apply, 4/s, one address "
             "(stopped by a rule, not a built-in detector: the shipped `coupon_enumeration`)",
             coupon_enumeration),
    Scenario("distributed_harvest", "attack", "generator",
             "distributed harvest of /api/users/{id} (private profiles): 250 scattered addresses with the app users' "
             "browser headers, 4 consecutive ids each, the whole id space in ~40 s",
             distributed_harvest, planned_clients=lambda p: HARVEST_IDS // 4),
    Scenario("odd_mix_scraper", "attack", "generator",
             "slow scraper under every rule threshold: ~0.7 req/s over product pages, details and never-linked "
             "paths (a third 404), an okhttp header set; the anomaly model must flag it",
             odd_mix_scraper, model_target=True),
]
