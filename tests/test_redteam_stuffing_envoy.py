"""Red team, issue 23 items 3-5: distributed credential stuffing against
the people who log in during it — API users who share the attacker's
tools, slow runs, users retrying after a refusal, and stuffing disguised
as the site's own browsers.

Real Envoy, the built filter and the demo API (accounts user0001..user1000
with passwords pass-NNNN), with the shipped configuration (`envoy/envoy.yaml`'s
filter config) except that only 127.0.0.1 is a trusted proxy and the scorer
is off. Every client has its own loopback address (127.x.y.z scattered over
127.0.0.0/8): an untrusted peer, so the address the filter sees is the
client's. Every request carries the exact header set, in its order, of the
browser or tool that sends it (tests/redteam_traffic: Browser,
curl_headers, requests_headers); the attacker draws from the same builders
as the people it imitates.

Written from the issue's text only (not from the detection code), as the
required behaviour. Each test names its item, has its own Envoy and seeded
random traffic, is bounded by request counts, and runs its people and its
attacker on one clock (tests/redteam_traffic.Schedule).

Definitions used throughout:
- an attack attempt is *stopped* when it is refused (403/429), or — on an
  account that exists here only — when the filter tells the application
  the login risk is `high` (the application then asks for the second
  factor: a right password would not get in; an attempt there looks like
  the owner's new phone, which the project answers that way, issue 20). An
  attempt on a name that is no account here is stopped only by a refusal;
- the attack is *recognised* at its first stopped attempt, which must come
  within RECOGNISE_WITHIN attempts (the project's standing budget for
  distributed stuffing: 200; a run of fewer than 400 attempts: half of it);
- *later attempts* are every attack attempt sent after that first stopped one.
"""

from __future__ import annotations

import random

import pytest

from redteam_traffic import (
    REFUSED,
    SEASONAL_PASSWORDS,
    SEASONAL_VARIANTS,
    SITE,
    SITE_BROWSERS,
    SITE_LANGUAGES,
    Attempt,
    Recognition,
    Site,
    curl_headers,
    exact_login,
    leak_emails,
    leak_passwords,
    leak_usernames,
    login_risk,
    redteam_config,
    requests_headers,
)
from redteam_fixtures import ANSWERED, api, check_answered, start_envoy  # noqa: F401 (api: a fixture)

N_USERS = 1000


def recognise_within(attempts: int) -> int:
    return min(200, attempts // 2)


# --- the attack -----------------------------------------------------------------------------


def names_for(kind: str, rng, n: int, site: Site, residents: list[str]) -> list[str]:
    """The usernames of a stuffing list.
    emails: e-mail addresses from a leak (no account here is named so);
    site_names: this site's own style (userNNNN): accounts that exist, nine
      in ten never logged into, one in ten a resident's;
    mixed: a combo list from another site, ~10 % naming accounts here;
    half: half e-mails, half this site's style."""
    if kind == "emails":
        return leak_emails(rng, n)
    resident_ids = [site.personas[w][0] for w in residents]
    if kind == "site_names":
        taken = set(resident_ids)
        never = [u for u in range(1, N_USERS + 1) if u not in taken]
        rng.shuffle(never)
        return [f"user{rng.choice(resident_ids):04d}" if rng.random() < 0.1 else f"user{never.pop():04d}"
                for _ in range(n)]
    if kind == "mixed":
        return leak_usernames(rng, n, existing_share=0.1, existing_range=(1, N_USERS + 1))
    if kind == "half":
        emails, own = leak_emails(rng, n), names_for("site_names", rng, n, site, residents)
        return [emails[i] if rng.random() < 0.5 else own[i] for i in range(n)]
    raise ValueError(kind)


def passwords_for(kind: str, rng, n: int) -> list[str]:
    """seasonal: a handful of seasonal passwords; spray: two; variants: ten
    spellings of seasons; combos: each credential's own (leaked) password."""
    if kind == "seasonal":
        return [rng.choice(SEASONAL_PASSWORDS) for _ in range(n)]
    if kind == "spray":
        return [rng.choice(["Summer2025!", "Welcome1!"]) for _ in range(n)]
    if kind == "variants":
        return [rng.choice(SEASONAL_VARIANTS) for _ in range(n)]
    if kind == "combos":
        return [f"{p}{rng.randrange(10, 10 ** 4)}" for p in leak_passwords(rng, n)]
    raise ValueError(kind)


def headers_for(kind: str, rng):
    """A (method, auth, referer) -> header list builder for one attacking address."""
    if kind == "site_browser":
        b, lang = rng.choice(SITE_BROWSERS), rng.choice(SITE_LANGUAGES)
        return lambda m, a=None, r=f"{SITE}/": b.headers(m, r, lang, a)
    if kind == "curl":
        return lambda m, a=None, r=None: curl_headers(m, a)
    if kind == "requests":
        return lambda m, a=None, r=None: requests_headers(m, a)
    raise ValueError(kind)


def schedule_stuffing(site: Site, start: float, attempts: int, rate: float, tries: tuple[int, int],
                      headers: str, names: str, passwords: str, residents: list[str], seed: int,
                      browse: int = 0) -> list[Attempt]:
    """Distributed stuffing on the site's clock: `attempts` login attempts at
    ~`rate` a second, from new scattered addresses, `tries` (lo, hi) each
    0.4-1.2 s apart; each address first opens `browse` catalogue pages
    (a product list and products, 1-2.5 s apart, the last one 1-2.5 s
    before its first attempt; 0: straight to the login).
    Returns the list its attempts are appended to, in the order sent."""
    rng = random.Random(seed)
    per_address = []
    left = attempts
    while left > 0:
        k = min(left, rng.randint(*tries))
        per_address.append(k)
        left -= k
    user_list = names_for(names, rng, attempts, site, residents)
    pw_list = passwords_for(passwords, rng, attempts)
    sources = site.addresses.take(len(per_address))
    out: list[Attempt] = []
    n = 0
    t0 = start
    for a, (k, source) in enumerate(zip(per_address, sources)):
        h = headers_for(headers, rng)
        key = ("stuffer", a)
        # The catalogue pages come before the address's first attempt (at t0,
        # on the attack's pace), 1-2.5 s apart.
        gaps = [rng.uniform(1.0, 2.5) for _ in range(browse)]
        t = t0 - sum(gaps)
        for b in range(browse):
            path = f"/api/products?page={rng.randrange(1, 26)}" if b == 0 else f"/api/products/{rng.randrange(1, 501)}"
            site.schedule.at(max(0.2, t), lambda p=path, key=key, source=source, h=h: site.pool.get(key, source).send(
                "GET", p, h("GET", None, f"{SITE}/products")))
            t += gaps[b]
        t = t0
        for j in range(k):
            user, pw = user_list[n], pw_list[n]
            n += 1

            def attempt(user=user, pw=pw, key=key, source=source, h=h, last=j == k - 1, nth=j):
                r = site.pool.get(key, source).send("POST", "/api/login", h("POST", None, f"{SITE}/login"),
                                                    {"username": user, "password": pw})
                out.append(Attempt(r.status, user, login_risk(r), nth))
                if last:
                    site.pool.drop(key)

            site.schedule.at(t, attempt)
            t += rng.uniform(0.4, 1.2)
        t0 += k / rate
    return out


def warm_up(site: Site, n: int, end: float, every: float = 10.0) -> list[str]:
    """The live site before the attack: `n` residents log in from their own
    addresses and browsers within ~n * 0.12 s, and keep browsing until `end`."""
    return [site.resident(0.12 * i, end, every=every) for i in range(n)]


def assert_attack_stopped(rec: Recognition, what: str, share: float, within: int):
    assert rec.first is not None and rec.first < within, f"{what}: not recognised within {within} attempts: {rec}"
    assert rec.later_share >= share, f"{what}: under {share:.0%} of later attempts stopped: {rec}"


# --- 3. API users who share the attacker's tools ------------------------------------------------


def test_returning_curl_user_logs_in_during_curl_stuffing(start_envoy):
    """Issue 23 item 3: a returning API user whose script uses curl — the
    same client, the same exact header set, as a distributed stuffing run
    (scattered addresses, 1-3 tries each, a combo list, ~10 attempts/s) —
    logs in from the address it last logged in from successfully, every 50
    attack attempts (8 times): it logs in every time (200; the login-risk
    header may say `medium`, a second factor its script cannot give is not
    logging in), while >= 90 % of the attack's later attempts are stopped."""
    envoy = start_envoy()
    site = Site(envoy.port, seed=2500)
    start, attempts, rate = 4.0, 400, 10.0
    end = start + attempts / rate + 2
    residents = warm_up(site, 30, end)
    # The API user: its account, its address, curl. It logged in twice
    # before the attack (its last successful login is from here, with curl).
    uid = 977
    site.free_accounts.remove(uid)
    home = site.addresses.one()
    api_user: list[tuple[float, list[int], str | None]] = []

    def script_login(when: float):
        def run():
            site.pool.drop("api_user")
            peer = site.pool.get("api_user", home)
            answers, token = exact_login(peer, lambda m, a: curl_headers(m, a), f"user{uid:04d}", f"pass-{uid:04d}",
                                         otp=False)
            if token:
                peer.send("GET", "/api/me", curl_headers("GET", token))
            api_user.append((when, [r.status for r in answers], login_risk(answers[-1])))
        return run

    site.schedule.at(1.0, script_login(-1))
    site.schedule.at(3.0, script_login(-1))
    attack = schedule_stuffing(site, start, attempts, rate, (1, 3), "curl", "mixed", "combos", residents, seed=2501)
    for k in range(1, 9):
        site.schedule.at(start + (50 * k) / rate + 0.05, script_login(50 * k))
    try:
        elapsed = site.schedule.run()
    finally:
        site.pool.close()
    rec = Recognition(attack)
    print(f"curl stuffing: {rec}; {rec.by_try()}")
    print(f"API user (curl, its last login's address): {api_user}")
    print(f"people: {site.summary()}; {elapsed:.1f} s, max lag {site.schedule.max_lag:.2f} s")
    check_answered([a.status for a in attack] + site.statuses() + [s for _, ss, _ in api_user for s in ss],
                   "curl stuffing")
    before = [ss for when, ss, _ in api_user if when < 0]
    assert before == [[200], [200]], f"control: the API user's logins before the attack: {before}"
    during = [(when, ss, risk) for when, ss, risk in api_user if when >= 0]
    assert len(during) == 8
    failed = [(when, ss, risk) for when, ss, risk in during if ss != [200]]
    assert not failed, f"the returning curl user did not log in {len(failed)} of 8 times: {failed}"
    assert not site.refused_people(), f"residents refused: {site.refused_people()}"
    assert_attack_stopped(rec, "curl stuffing", 0.90, recognise_within(attempts))


# --- 4. slow runs, and users retrying after a refusal ----------------------------------------------


# (fingerprint, attempts): at 3 attempts/s. The tool's run lasts over a
# minute (186 attempts, ~62 s): the leak is "~5 attempts a minute"
# once a refused attempt no longer counts as evidence and the window empties,
# which a shorter run cannot show (the one test here above ~60 s of wall time).
SLOW_RUNS = {"requests": 186, "site_browser": 132}


@pytest.mark.parametrize("fingerprint", list(SLOW_RUNS))
def test_slow_distributed_stuffing_is_refused_after_recognition(start_envoy, fingerprint):
    """Issue 23 item 4: a slower distributed run — one try per new address,
    3 attempts a second — by a tool (python-requests, 186 attempts, over a
    minute) or copying the site's browsers exactly (132 attempts):
    recognised within the first half of the run, and >= 90 % of its later
    attempts stopped (the issue's run: 57 %); residents browsing and logging
    in throughout are not refused."""
    envoy = start_envoy()
    site = Site(envoy.port, seed=2600 + (fingerprint == "site_browser"))
    start, attempts, rate = 2.5, SLOW_RUNS[fingerprint], 3.0
    end = start + attempts / rate + 1
    residents = warm_up(site, 20, end)
    attack = schedule_stuffing(site, start, attempts, rate, (1, 1), fingerprint, "mixed", "combos", residents,
                               seed=2602 + (fingerprint == "site_browser"))
    k = 0
    while start + 4 + k * 4.0 < end - 1:
        site.come_back(residents[k % len(residents)], start + 4 + k * 4.0)
        k += 1
    try:
        elapsed = site.schedule.run()
    finally:
        site.pool.close()
    rec = Recognition(attack)
    # Stopped attempts per 10 s of the run (30 attempts each): a leak shows as a dip.
    blocks = [sum(a.stopped for a in attack[i:i + 30]) for i in range(0, len(attack), 30)]
    print(f"slow stuffing ({fingerprint}): {rec}; stopped per 30 attempts {blocks}")
    print(f"people: {site.summary()}; come-backs {[c[2] for c in site.comebacks]}; {elapsed:.1f} s, "
          f"max lag {site.schedule.max_lag:.2f} s")
    check_answered([a.status for a in attack] + site.statuses(), "slow stuffing")
    assert not site.refused_people(), f"residents refused: {site.refused_people()}"
    assert_attack_stopped(rec, f"slow stuffing ({fingerprint})", 0.90, recognise_within(attempts))


RETRY_ATTACKS = {
    # A tool (python-requests), 1-3 tries per address.
    "tool": dict(headers="requests", tries=(1, 3), browse=0, names="mixed", passwords="combos"),
    # Copies of the site's browsers, a product page first, 1-2 tries: here a
    # new customer looks most like the attack.
    "disguised": dict(headers="site_browser", tries=(1, 2), browse=1, names="emails", passwords="seasonal"),
}


@pytest.mark.parametrize("attack_kind", list(RETRY_ATTACKS))
def test_a_user_retrying_after_a_refusal_does_not_lock_themselves_out(start_envoy, attack_kind):
    """Issue 23 item 4 (the filter's refusals count as evidence for the
    endpoint, never for a person's own record): during a distributed run
    (~10 attempts/s for 30 s; by a tool, or disguised as the site's
    browsers),
    - A, a returning resident, mistypes twice, then retries the right
      password every 1.5 s (at most 6 times): they get in;
    - B, a new customer logging in for the first time, refused or not,
      retries every 2 s until let in (at most 6 times) during the attack;
      after the attack stops, B (if still out) and C, a second new customer
      who never tried (same browser build), try at the same moments, 5
      times 2 s apart: B is never worse off — in no later than C, and
      refused no more often than C after the attack."""
    envoy = start_envoy()
    spec = RETRY_ATTACKS[attack_kind]
    site = Site(envoy.port, seed=2700 + list(RETRY_ATTACKS).index(attack_kind))
    start, attempts, rate = 4.0, 300, 10.0
    attack_end = start + attempts / rate
    residents = warm_up(site, 30, attack_end + 10)
    attack = schedule_stuffing(site, start, attempts, rate, spec["tries"], spec["headers"], spec["names"],
                               spec["passwords"], residents, seed=2711, browse=spec["browse"])
    # A: the returning resident with two typos.
    a_who = residents[7]
    a_uid, a_addr, a_headers = site.personas[a_who]
    a_log: list[int] = []

    def a_try(password: str):
        def run():
            if 200 in a_log:
                return
            answers, _ = exact_login(site.pool.get(a_who, a_addr), lambda m, a: a_headers(m, a, f"{SITE}/login"),
                                     f"user{a_uid:04d}", password)
            a_log.extend(r.status for r in answers)
        return run

    ta = start + 14
    site.schedule.at(ta, a_try(f"pass-{a_uid:04d}1"))
    site.schedule.at(ta + 1.5, a_try(f"Pass-{a_uid:04d}"))
    for k in range(6):
        site.schedule.at(ta + 3 + 1.5 * k, a_try(f"pass-{a_uid:04d}"))
    # B (tries during the attack) and C (never tried), new customers on the same browser build.
    browser = SITE_BROWSERS[0]
    b_uid, c_uid = site.account(), site.account()
    b_addr, c_addr = site.addresses.one(), site.addresses.one()
    b_log: list[tuple[str, int]] = []
    c_log: list[tuple[str, int]] = []

    def new_customer_try(uid, addr, log, phase):
        def run():
            if any(s == 200 for _, s in log):
                return
            peer = site.pool.get(("new", uid), addr)
            h = lambda m, a=None: browser.headers(m, f"{SITE}/login", "en-GB,en;q=0.9", a)  # noqa: E731
            if not log:
                peer.send("GET", f"/api/products/{uid % 500 + 1}", browser.headers("GET", f"{SITE}/", "en-GB,en;q=0.9"))
            answers, _ = exact_login(peer, h, f"user{uid:04d}", f"pass-{uid:04d}")
            log.extend((phase, r.status) for r in answers)
        return run

    for k in range(6):
        site.schedule.at(start + 12 + 2 * k, new_customer_try(b_uid, b_addr, b_log, "during"))
    for k in range(5):
        t = attack_end + 1 + 2 * k
        site.schedule.at(t, new_customer_try(b_uid, b_addr, b_log, f"after{k}"))
        site.schedule.at(t + 0.01, new_customer_try(c_uid, c_addr, c_log, f"after{k}"))
    try:
        elapsed = site.schedule.run()
    finally:
        site.pool.close()
    rec = Recognition(attack)
    b_refused_during = sum(s in REFUSED for p, s in b_log if p == "during")
    print(f"stuffing ({attack_kind}): {rec}; {rec.by_try()}")
    print(f"A (returning, two typos, then retries): {a_log}")
    print(f"B (new, tried during the attack, refused {b_refused_during} times there): {b_log}")
    print(f"C (new, never tried before the attack ended): {c_log}")
    print(f"people: {site.summary()}; {elapsed:.1f} s, max lag {site.schedule.max_lag:.2f} s")
    check_answered([a.status for a in attack] + site.statuses() + a_log + [s for _, s in b_log + c_log], "retry")
    assert a_log[:2] == [401, 401] or any(s in REFUSED for s in a_log[:2]), f"control: A's typos {a_log}"
    assert a_log[-1] == 200, f"the returning resident who mistyped locked themselves out: {a_log}"

    def in_at(log) -> int | None:
        """The after-attack try (0-4) by which the person was in; -1: in during the attack."""
        for p, s in log:
            if s == 200:
                return -1 if p == "during" else int(p.removeprefix("after"))
        return None

    b_in, c_in = in_at(b_log), in_at(c_log)
    print(f"after the attack: B in by try {b_in}, C by try {c_in}")
    if c_in is not None:
        assert b_in is not None and b_in <= c_in, \
            f"retrying during the attack locked B out: B {b_log}, C (never tried) {c_log}"
    b_after_refused = sum(s in REFUSED for p, s in b_log if p.startswith("after"))
    c_after_refused = sum(s in REFUSED for p, s in c_log if p.startswith("after"))
    assert b_after_refused <= c_after_refused, f"retrying during the attack counted against B: B {b_log}, C {c_log}"
    assert not site.refused_people(kind="resident"), f"residents refused: {site.refused_people('resident')}"


# --- 5. disguised stuffing ----------------------------------------------------------------------

# Each variant: attempts, pace (attempts/s), tries per address, catalogue
# pages opened first, names, passwords. Every one copies the site's real
# browsers exactly (header set and order) and comes from new scattered addresses.
DISGUISES = {
    # The held-back run: a product page first, then the login; e-mail
    # names from a leak list; a handful of seasonal passwords; 1-2 tries.
    "issue": dict(attempts=320, rate=8.0, tries=(1, 2), browse=1, names="emails", passwords="seasonal"),
    # Password spraying with this site's own naming: userNNNN names (accounts
    # that exist, nearly all never logged into), two passwords, one try per
    # address, after a product list and a product.
    "site_names_spray": dict(attempts=320, rate=8.0, tries=(1, 1), browse=2, names="site_names",
                             passwords="spray"),
    # A combo list from another site's breach: each credential its own
    # password, ~10 % of names accounts here; 1-2 tries, slower (5/s).
    "combo_list": dict(attempts=210, rate=5.0, tries=(1, 2), browse=1, names="mixed", passwords="combos"),
    # A trickle that shops first: a product list and two products, seconds
    # apart, then one try; names half e-mails half this site's style; ten
    # spellings of seasonal passwords; 4 attempts/s.
    "shopper_trickle": dict(attempts=160, rate=4.0, tries=(1, 1), browse=3, names="half", passwords="variants"),
}


def test_disguise_shapes_are_distinct():
    """The variants differ in more than one way each (do not tune to one)."""
    keys = ["rate", "tries", "browse", "names", "passwords"]
    shapes = [tuple(str(v[k]) for k in keys) for v in DISGUISES.values()]
    for i, a in enumerate(shapes):
        for b in shapes[i + 1:]:
            assert sum(x != y for x, y in zip(a, b)) >= 2, (a, b)


@pytest.mark.parametrize("variant", list(DISGUISES))
def test_disguised_stuffing_is_refused_and_real_users_log_in(start_envoy, variant):
    """Issue 23 item 5: distributed stuffing disguised as the site's own
    users — each new address opens catalogue pages first, then logs in with
    the exact header set and order the real users' browsers send — in the
    issue's shape and three further variants of our own (DISGUISES), while
    residents come back and log in again (a few after a typo) and new
    customers sign in for the first time: >= 95 % of later attempts
    stopped in every variant, 0 returning users refused (and all of them
    let in), first-time logins measured and reported."""
    envoy = start_envoy()
    spec = DISGUISES[variant]
    index = list(DISGUISES).index(variant)
    site = Site(envoy.port, seed=2800 + index)
    start = 4.0
    end = start + spec["attempts"] / spec["rate"] + 1
    residents = warm_up(site, 30, end, every=12.0)
    attack = schedule_stuffing(site, start, spec["attempts"], spec["rate"], spec["tries"], "site_browser",
                               spec["names"], spec["passwords"], residents, seed=2820 + index, browse=spec["browse"])
    # Returning residents: every ~2.5 s one comes back (one in ten after a typo).
    rng = random.Random(2830 + index)
    t = start + 1.5
    k = 0
    while t < end - 1:
        site.come_back(residents[k % len(residents)], t, typo=rng.random() < 0.1)
        k += 1
        t += rng.uniform(2.0, 3.0)
    # New customers signing in for the first time, every ~3.5 s.
    t = start + 2.0
    while t < end - 2:
        site.first_login(t, kind="first_login", reads=1)
        t += rng.uniform(3.0, 4.0)
    try:
        elapsed = site.schedule.run()
    finally:
        site.pool.close()
    rec = Recognition(attack)
    firsts = {w: [s for what, s in a if what == "POST /api/login"] for w, a in site.people.items()
              if site.kinds.get(w) == "first_login"}
    first_in = sum(bool(site.tokens.get(w)) for w in firsts)
    first_refused = sum(any(s in REFUSED for s in ss) for ss in firsts.values())
    first_stepped = sum(202 in ss for ss in firsts.values())
    back_in = sum(ss[-1:] == [200] for _, _, ss in site.comebacks)
    print(f"disguised stuffing ({variant}): {rec}; {rec.by_try()}")
    print(f"disguised stuffing ({variant}): returning users let in {back_in} of {len(site.comebacks)} come-backs; "
          f"first-time logins: {first_in} of {len(firsts)} let in, {first_stepped} asked for the second factor, "
          f"{first_refused} refused; {site.summary()}; {elapsed:.1f} s, max lag {site.schedule.max_lag:.2f} s")
    check_answered([a.status for a in attack] + site.statuses(), f"disguised stuffing ({variant})")
    refused = site.refused_people(kind="resident")
    assert not refused, f"{variant}: {len(refused)} returning users refused: {refused}"
    assert back_in == len(site.comebacks), f"{variant}: returning users not let in: {site.comebacks}"
    # Issue 23's target, >= 95 % in every variant. The combo list's and the
    # trickle's leftovers looked like first-time logins (85.7 % and 87.6 %
    # before): a handle of the site's shape but not its format (the site
    # issues userNNNN) is now unlike its names, and an account that exists
    # but never logged in is told `high` (a second factor) while most
    # attempts on unknown accounts fail.
    target = 0.95
    assert_attack_stopped(rec, f"disguised stuffing ({variant})", target, recognise_within(spec["attempts"]))
