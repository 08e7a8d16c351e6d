"""Reusable red-team traffic: realistic user agents to rotate through,
leak-style usernames, the people of an office NAT and the phones of a
carrier NAT, forged credentials, and an HTTP client that connects from a
chosen loopback source address (an untrusted peer).

Everything that draws at random takes a `random.Random`, so a test that
seeds it sends the same traffic on every run. Nothing here knows how the
filter detects anything: it only describes what the traffic looks like.
"""

from __future__ import annotations

import base64
import heapq
import http.client
import itertools
import json
import random
import threading
import time
from dataclasses import dataclass, field

from harness import Response, sleep_until

# --- user agents ---------------------------------------------------------

DESKTOP_PLATFORMS = {
    "windows": "Windows NT 10.0; Win64; x64",
    "mac": "Macintosh; Intel Mac OS X 10_15_7",
    "linux": "X11; Linux x86_64",
}
FIREFOX_PLATFORMS = {
    "windows": "Windows NT 10.0; Win64; x64",
    "mac": "Macintosh; Intel Mac OS X 10.15",
    "linux": "X11; Linux x86_64",
    "ubuntu": "X11; Ubuntu; Linux x86_64",
}
# Chrome majors with a plausible build number each (major -> build).
CHROME_BUILDS = {v: 4430 + (v - 90) * 56 for v in range(90, 132)}
SAFARI_VERSIONS = ["15.6.1", "16.0", "16.1", "16.2", "16.3", "16.4", "16.5", "16.6", "17.0", "17.1", "17.2",
                   "17.2.1", "17.3", "17.3.1", "17.4", "17.4.1", "17.5", "17.6", "18.0", "18.0.1", "18.1",
                   "18.1.1", "18.2"]
IOS_VERSIONS = ["16_6", "16_7_8", "17_1_2", "17_3_1", "17_4_1", "17_5_1", "17_6_1", "18_0", "18_1_1", "18_2"]
ANDROID_MODELS = ["SM-S921B", "SM-A546B", "SM-G991B", "Pixel 7", "Pixel 8 Pro", "moto g54 5G", "CPH2581", "2201117TG"]


def chrome_ua(major: int, platform: str = "windows", patch: int | None = None) -> str:
    """Chrome on a desktop. With `patch`, the full build number older
    builds and some embedders still send; without, the reduced
    `major.0.0.0` every current Chrome sends."""
    version = f"{major}.0.{CHROME_BUILDS[major]}.{patch}" if patch is not None else f"{major}.0.0.0"
    return (f"Mozilla/5.0 ({DESKTOP_PLATFORMS[platform]}) AppleWebKit/537.36 (KHTML, like Gecko) "
            f"Chrome/{version} Safari/537.36")


def edge_ua(major: int, patch: int) -> str:
    return (f"Mozilla/5.0 ({DESKTOP_PLATFORMS['windows']}) AppleWebKit/537.36 (KHTML, like Gecko) "
            f"Chrome/{major}.0.0.0 Safari/537.36 Edg/{major}.0.{CHROME_BUILDS[major] - 40}.{patch}")


def firefox_ua(major: int, platform: str = "windows") -> str:
    return f"Mozilla/5.0 ({FIREFOX_PLATFORMS[platform]}; rv:{major}.0) Gecko/20100101 Firefox/{major}.0"


def safari_ua(version: str) -> str:
    return (f"Mozilla/5.0 ({DESKTOP_PLATFORMS['mac']}) AppleWebKit/605.1.15 (KHTML, like Gecko) "
            f"Version/{version} Safari/605.1.15")


def iphone_ua(ios: str) -> str:
    version = ".".join(ios.split("_")[:2]) if ios.count("_") else ios
    return (f"Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 "
            f"(KHTML, like Gecko) Version/{version} Mobile/15E148 Safari/604.1")


def android_chrome_ua(major: int) -> str:
    # Chrome on Android sends the reduced "Android 10; K" whatever the phone.
    return (f"Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
            f"Chrome/{major}.0.0.0 Mobile Safari/537.36")


def samsung_ua(model: str, android: int = 14) -> str:
    return (f"Mozilla/5.0 (Linux; Android {android}; SAMSUNG {model}) AppleWebKit/537.36 (KHTML, like Gecko) "
            f"SamsungBrowser/24.0 Chrome/117.0.0.0 Mobile Safari/537.36")


def desktop_browser_universe() -> list[str]:
    """Every distinct desktop browser string the generators can make
    (well over a thousand): Chrome reduced and full builds, Edge, Firefox
    on four platforms, Safari."""
    out = []
    for v in CHROME_BUILDS:
        for p in DESKTOP_PLATFORMS:
            out.append(chrome_ua(v, p))
            out.extend(chrome_ua(v, p, patch) for patch in (61, 105, 129, 160, 199, 224))
    for v in range(100, 132):
        out.extend(edge_ua(v, patch) for patch in (51, 63, 88))
    for v in range(91, 134):
        out.extend(firefox_ua(v, p) for p in FIREFOX_PLATFORMS)
    out.extend(safari_ua(v) for v in SAFARI_VERSIONS)
    return sorted(set(out))


def rotating_browser_uas(rng, n: int) -> list[str]:
    """`n` distinct realistic desktop browser user agents in random order:
    a new one for every request of a rotating flood."""
    universe = desktop_browser_universe()
    if n > len(universe):
        raise ValueError(f"only {len(universe)} distinct browser user agents")
    return rng.sample(universe, n)


def rotating_firefox_builds(rng, n: int) -> list[str]:
    """`n` distinct Firefox builds (major version x platform), in random order."""
    universe = [firefox_ua(v, p) for v in range(91, 134) for p in FIREFOX_PLATFORMS]
    return rng.sample(universe, n)


def common_office_uas() -> list[str]:
    """What one office's managed machines run: a handful of current builds,
    so several colleagues share the exact same string."""
    return [
        chrome_ua(131, "windows"), chrome_ua(130, "windows"), chrome_ua(131, "mac"), chrome_ua(129, "windows"),
        edge_ua(131, 51), edge_ua(130, 88), firefox_ua(133, "windows"), firefox_ua(128, "windows"),
        firefox_ua(132, "ubuntu"), safari_ua("18.1.1"), safari_ua("17.6"), chrome_ua(131, "linux"),
    ]


def mobile_uas() -> list[str]:
    """Phones on a carrier network: few distinct strings, many phones each."""
    return [iphone_ua(v) for v in IOS_VERSIONS[-5:]] + [android_chrome_ua(v) for v in (129, 130, 131)] + [
        samsung_ua(m) for m in ANDROID_MODELS[:3]]


LANGUAGES = ["en-GB,en;q=0.9", "en-US,en;q=0.9", "en-GB,en-US;q=0.9,en;q=0.8", "de-DE,de;q=0.9,en;q=0.8",
             "fr-FR,fr;q=0.9,en;q=0.7", "en-US,en;q=0.5"]


def browser_headers(ua: str, language: str = "en-GB,en;q=0.9") -> dict[str, str]:
    """What a browser's fetch() to a JSON API sends besides the cookie."""
    return {
        "user-agent": ua,
        "accept": "application/json, text/plain, */*",
        "accept-language": language,
        "sec-fetch-mode": "cors",
        "sec-fetch-site": "same-origin",
    }


# --- usernames -------------------------------------------------------------

FIRST = ["james", "mary", "john", "patricia", "robert", "jennifer", "michael", "linda", "david", "elizabeth",
         "william", "susan", "richard", "jessica", "joseph", "sarah", "thomas", "karen", "chris", "nancy",
         "daniel", "lisa", "matthew", "betty", "anthony", "sandra", "mark", "ashley", "paul", "emily"]
LAST = ["smith", "johnson", "williams", "brown", "jones", "garcia", "miller", "davis", "rodriguez", "martinez",
        "wilson", "anderson", "taylor", "thomas", "moore", "jackson", "martin", "lee", "thompson", "white"]
DOMAINS = ["gmail.com", "yahoo.com", "hotmail.com", "outlook.com", "aol.com", "icloud.com", "gmx.de", "web.de"]


def leak_usernames(rng, n: int, existing_share: float = 0.1, existing_range: tuple[int, int] = (1, 1000),
                   avoid: set[str] = frozenset()) -> list[str]:
    """`n` distinct usernames as a combo list has them: e-mail addresses and
    handles, about `existing_share` of them naming an account of the demo
    API (userNNNN in `existing_range`), none in `avoid`."""
    out: list[str] = []
    seen = set(avoid)
    while len(out) < n:
        r = rng.random()
        if r < existing_share:
            name = f"user{rng.randrange(*existing_range):04d}"
        elif r < 0.75:
            f, l = rng.choice(FIRST), rng.choice(LAST)
            style = rng.randrange(4)
            local = [f"{f}.{l}", f"{f}{l}{rng.randrange(60, 100)}", f"{f[0]}{l}", f"{f}_{l}{rng.randrange(1, 999)}"][style]
            name = f"{local}@{rng.choice(DOMAINS)}"
        else:
            name = f"{rng.choice(FIRST)}{rng.choice(['', '_', '.'])}{rng.choice(LAST)[:rng.randrange(1, 6)]}{rng.randrange(1, 9999)}"
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def leak_passwords(rng, n: int) -> list[str]:
    base = ["123456", "password", "qwerty123", "iloveyou", "Summer2024!", "Welcome1", "letmein", "dragon",
            "monkey123", "football", "Passw0rd", "abc123", "sunshine1", "princess", "Qwerty!23"]
    return [rng.choice(base) if rng.random() < 0.4 else f"{rng.choice(base)}{rng.randrange(100)}" for _ in range(n)]


# --- people behind one address ------------------------------------------------


@dataclass
class Person:
    """Someone with an account of the demo API (userNNNN / pass-NNNN) and one
    device they keep using."""

    user_id: int
    ua: str
    language: str
    token: str | None = None
    cookie: str | None = None
    statuses: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    @property
    def username(self) -> str:
        return f"user{self.user_id:04d}"

    @property
    def password(self) -> str:
        return f"pass-{self.user_id:04d}"

    def headers(self) -> dict[str, str]:
        """The device's headers plus whatever the API issued at login."""
        h = browser_headers(self.ua, self.language)
        if self.token:
            h["authorization"] = f"Bearer {self.token}"
        if self.cookie:
            h["cookie"] = self.cookie
        return h

    def refused(self) -> list[tuple[str, int]]:
        return [(p, s) for p, s in zip(self.paths, self.statuses) if s in (403, 429)]


def office_people(rng, n: int = 30, first_user: int = 101) -> list[Person]:
    """An office behind one NAT address: `n` colleagues, each on their own
    machine (drawn from the office's few browser builds, so some strings are
    shared), each with their own account."""
    pool = common_office_uas()
    return [Person(first_user + i, rng.choice(pool), rng.choice(LANGUAGES[:3])) for i in range(n)]


def carrier_phones(rng, n: int = 40, first_user: int = 301) -> list[Person]:
    """Phones behind one carrier-grade NAT address, each with its own account."""
    pool = mobile_uas()
    return [Person(first_user + i, rng.choice(pool), rng.choice(LANGUAGES)) for i in range(n)]


def browsing_path(rng, person: Person) -> str:
    """One ordinary page view's API call for a logged-in person."""
    r = rng.random()
    if r < 0.25:
        return "/api/me"
    if r < 0.55:
        return f"/api/products?page={rng.randrange(1, 6)}"
    if r < 0.9:
        return f"/api/products/{rng.randrange(1, 501)}"
    return f"/api/users/{person.user_id}"


# --- forged credentials -----------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_jwt(sub: str, kind: str = "none", rng=None) -> str:
    """A JWT naming `sub` that the API never issued: `none` (alg none, no
    signature) or `wrong_sig` (HS256 with a made-up signature)."""
    now = int(time.time())
    payload = _b64url(json.dumps({"sub": sub, "iat": now, "exp": now + 3600}, separators=(",", ":")).encode())
    if kind == "none":
        none = _b64url(b'{"alg":"none","typ":"JWT"}')
        return f"{none}.{payload}."
    header = _b64url(b'{"alg":"HS256","typ":"JWT"}')
    sig = _b64url(bytes((rng.randrange(256) if rng else i * 37 % 256) for i in range(32)))
    return f"{header}.{payload}.{sig}"


def random_token(rng, n: int = 32) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(n))


# --- an HTTP client from a chosen source address ---------------------------------------

REFUSED = (403, 429)


class Peer:
    """HTTP/1.1 keep-alive client to Envoy (on 127.0.0.1) whose connection
    comes from `source`, any address of 127.0.0.0/8 (all of it is on `lo` on
    Linux): that address is the peer Envoy and the filter see."""

    def __init__(self, port: int, source: str = "127.0.0.2", timeout: float = 10):
        self.port, self.source, self.timeout = port, source, timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout,
                                                   source_address=(self.source, 0))
        return self.conn

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, headers: dict | None = None, body=None) -> Response:
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers.setdefault("content-type", "application/json")
        for attempt in range(2):
            conn = self._connect()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                out = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed the idle keep-alive connection under us:
                # the request did not get an answer, send it again once.
                self.close()
                if attempt:
                    raise
                continue
            if out.headers.get("connection", "").lower() == "close":
                self.close()
            return out
        raise AssertionError("unreachable")

    def get(self, path: str, headers: dict | None = None) -> Response:
        return self.request("GET", path, headers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def login(peer: Peer, person_or_user, password: str | None = None, headers: dict | None = None,
          otp: bool = True) -> tuple[list[int], dict]:
    """Logs in the way the demo's web app does: POST /api/login; when the API
    asks for a second factor (202 mfa_required) the person gives it (the
    demo's code, 000000). Returns the statuses of the attempts made and the
    last answer's JSON (with `token` on success). A Person gets its token and
    any session cookie the API set."""
    person = person_or_user if isinstance(person_or_user, Person) else None
    username = person.username if person else person_or_user
    password = person.password if person else password
    headers = headers if headers is not None else (person.headers() if person else {})
    statuses = []
    body = {"username": username, "password": password}
    r = peer.request("POST", "/api/login", headers, body)
    statuses.append(r.status)
    if r.status == 202 and otp:
        r = peer.request("POST", "/api/login", headers, {**body, "otp": "000000"})
        statuses.append(r.status)
    try:
        data = r.json()
    except ValueError:
        data = {}
    if person is not None:
        person.statuses.extend(statuses)
        person.paths.extend(["POST /api/login"] * len(statuses))
        if r.status == 200 and isinstance(data, dict):
            person.token = data.get("token")
            cookie = r.headers.get("set-cookie")
            if cookie:
                person.cookie = cookie.split(";", 1)[0]
    return statuses, data if isinstance(data, dict) else {}


def flood(port: int, source: str, requests: list[tuple[str, dict]], connections: int = 4,
          method: str = "GET") -> list[int]:
    """Sends every (path, headers) of `requests` from `source` as fast as
    `connections` keep-alive connections allow; returns the statuses in the
    order the requests were sent (each connection takes the next unsent one)."""
    statuses: list[int | None] = [None] * len(requests)
    counter = itertools.count()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker():
        with Peer(port, source) as peer:
            while True:
                with lock:
                    i = next(counter)
                if i >= len(requests):
                    return
                path, headers = requests[i]
                try:
                    statuses[i] = peer.request(method, path, headers).status
                except BaseException as e:  # noqa: BLE001 - reported by the caller
                    errors.append(e)
                    return

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise RuntimeError(f"flood client failed: {errors[0]!r}")
    missing = [i for i, s in enumerate(statuses) if s is None]
    if missing:
        raise RuntimeError(f"flood: {len(missing)} requests got no answer")
    return statuses  # type: ignore[return-value]


@dataclass
class Cut:
    """How a run of requests was refused: the index of the first refusal and
    the share refused after it."""

    statuses: list[int]

    @property
    def first(self) -> int | None:
        return next((i for i, s in enumerate(self.statuses) if s in REFUSED), None)

    @property
    def refused(self) -> int:
        return sum(s in REFUSED for s in self.statuses)

    @property
    def later_share(self) -> float:
        if self.first is None:
            return 0.0
        later = self.statuses[self.first + 1:]
        return sum(s in REFUSED for s in later) / len(later) if later else 1.0

    def __str__(self) -> str:
        counts: dict[int, int] = {}
        for s in self.statuses:
            counts[s] = counts.get(s, 0) + 1
        return (f"{self.refused} of {len(self.statuses)} refused, first at #{self.first}, "
                f"{self.later_share:.1%} of later refused, statuses {dict(sorted(counts.items()))}")


def paced(events, gap_s: float):
    """Runs each callable of `events` at start + i * gap_s (a clock, so one
    slow request does not push the rest back)."""
    start = time.monotonic()
    for i, event in enumerate(events):
        sleep_until(start + i * gap_s)
        event()


# --- exact header sets: what a browser or a tool sends, in its order ------------------------
#
# A careful attacker copies the real users' browsers exactly: the same header
# names, values and order. The site's people and such an attacker both send
# through Peer.send, from the same builders, so nothing but behaviour tells
# them apart. `None` values are filled in by Peer.send (Host, Content-Length).

SITE_HOST = "shop.example.com"
SITE = f"https://{SITE_HOST}"


@dataclass(frozen=True)
class Browser:
    """One browser build as a real user runs it, and the headers its fetch()
    to the site's JSON API sends, in its own order."""

    family: str  # chrome | edge | android | firefox | safari
    ua: str
    major: int = 131
    platform: str = "Windows"
    mobile: bool = False

    def _brands(self) -> str:
        brand = {"edge": "Microsoft Edge"}.get(self.family, "Google Chrome")
        return f'"{brand}";v="{self.major}", "Chromium";v="{self.major}", "Not_A Brand";v="24"'

    def headers(self, method: str = "GET", referer: str = f"{SITE}/", language: str = "en-GB,en;q=0.9",
                auth: str | None = None) -> list[tuple[str, str | None]]:
        post = method == "POST"
        a = [("Authorization", f"Bearer {auth}")] if auth else []
        if self.family in ("chrome", "edge", "android"):
            h = [("Host", None), ("Connection", "keep-alive")]
            h += [("Content-Length", None)] if post else []
            h += [("sec-ch-ua-platform", f'"{self.platform}"'), *a, ("User-Agent", self.ua),
                  ("Accept", "application/json, text/plain, */*"), ("sec-ch-ua", self._brands())]
            h += [("Content-Type", "application/json")] if post else []
            h += [("sec-ch-ua-mobile", "?1" if self.mobile else "?0")]
            h += [("Origin", SITE)] if post else []
            return h + [("Sec-Fetch-Site", "same-origin"), ("Sec-Fetch-Mode", "cors"), ("Sec-Fetch-Dest", "empty"),
                        ("Referer", referer), ("Accept-Encoding", "gzip, deflate, br, zstd"),
                        ("Accept-Language", language)]
        if self.family == "firefox":
            h = [("Host", None), ("User-Agent", self.ua), ("Accept", "application/json, text/plain, */*"),
                 ("Accept-Language", language), ("Accept-Encoding", "gzip, deflate, br, zstd"), *a]
            h += [("Content-Type", "application/json"), ("Content-Length", None), ("Origin", SITE)] if post else []
            return h + [("Connection", "keep-alive"), ("Referer", referer), ("Sec-Fetch-Dest", "empty"),
                        ("Sec-Fetch-Mode", "cors"), ("Sec-Fetch-Site", "same-origin"),
                        ("Priority", "u=0" if post else "u=4")]
        # Safari (macOS and iPhone)
        h = [("Host", None)]
        h += [("Content-Type", "application/json")] if post else []
        h += [("Accept", "application/json, text/plain, */*"), *a, ("Sec-Fetch-Site", "same-origin"),
              ("Accept-Language", language), ("Accept-Encoding", "gzip, deflate, br"), ("Sec-Fetch-Mode", "cors")]
        h += [("Origin", SITE)] if post else []
        h += [("User-Agent", self.ua), ("Referer", referer)]
        h += [("Content-Length", None)] if post else []
        return h + [("Connection", "keep-alive"), ("Sec-Fetch-Dest", "empty")]


# The browsers the site's real users run (a shop's audience: current Chrome
# and Edge on Windows, Chrome on Mac, Firefox, Safari, phones). A disguised
# attacker draws from the very same list.
SITE_BROWSERS = [
    Browser("chrome", chrome_ua(131, "windows"), 131, "Windows"),
    Browser("chrome", chrome_ua(130, "windows"), 130, "Windows"),
    Browser("chrome", chrome_ua(131, "mac"), 131, "macOS"),
    Browser("edge", chrome_ua(131, "windows") + " Edg/131.0.0.0", 131, "Windows"),
    Browser("firefox", firefox_ua(133, "windows"), 133),
    Browser("firefox", firefox_ua(132, "mac"), 132),
    Browser("safari", safari_ua("18.1.1"), 18),
    Browser("safari", iphone_ua("18_1_1"), 18, mobile=True),
    Browser("android", android_chrome_ua(131), 131, "Android", mobile=True),
]
SITE_LANGUAGES = ["en-GB,en;q=0.9", "en-US,en;q=0.9", "en-GB,en-US;q=0.9,en;q=0.8", "de-DE,de;q=0.9,en;q=0.8",
                  "fr-FR,fr;q=0.9,en;q=0.7"]


def curl_headers(method: str = "GET", auth: str | None = None, version: str = "8.5.0") -> list[tuple[str, str | None]]:
    """curl's request: Host, User-Agent, Accept, then what the script adds."""
    h = [("Host", None), ("User-Agent", f"curl/{version}"), ("Accept", "*/*")]
    h += [("Authorization", f"Bearer {auth}")] if auth else []
    return h + ([("Content-Type", "application/json"), ("Content-Length", None)] if method == "POST" else [])


def requests_headers(method: str = "GET", auth: str | None = None) -> list[tuple[str, str | None]]:
    """python-requests 2.31's request, in its order."""
    h = [("Host", None), ("User-Agent", "python-requests/2.31.0"), ("Accept-Encoding", "gzip, deflate"),
         ("Accept", "*/*"), ("Connection", "keep-alive")]
    h += [("Authorization", f"Bearer {auth}")] if auth else []
    return h + ([("Content-Length", None), ("Content-Type", "application/json")] if method == "POST" else [])


def _send_exact(self: "Peer", method: str, path: str, header_list, body=None) -> Response:
    """Sends exactly `header_list` in its order (nothing added: no
    Accept-Encoding: identity, no Host first unless the list says so); a
    `None` Host is SITE_HOST, a `None` Content-Length the body's length."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    for attempt in range(2):
        conn = self._connect()
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            has_length = False
            for name, value in header_list:
                if name.lower() == "host":
                    value = value or SITE_HOST
                elif name.lower() == "content-length":
                    if body is None:
                        continue
                    value, has_length = str(len(body)), True
                conn.putheader(name, value)
            if body is not None and not has_length:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            out = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.close()
            if attempt:
                raise
            continue
        if out.headers.get("connection", "").lower() == "close":
            self.close()
        return out
    raise AssertionError("unreachable")


Peer.send = _send_exact  # type: ignore[attr-defined]


# --- addresses ---------------------------------------------------------------------------------


class Addresses:
    """Distinct loopback addresses scattered over 127.0.0.0/8 (other /16s,
    other /24s: a botnet's or a city's worth of homes), never 127.0.0.1 (the
    trusted load balancer) and never one handed out before."""

    def __init__(self, rng):
        self.rng = rng
        self.used = {"127.0.0.1"}

    def take(self, n: int = 1) -> list[str]:
        out = []
        while len(out) < n:
            a = f"127.{self.rng.randrange(1, 255)}.{self.rng.randrange(256)}.{self.rng.randrange(1, 255)}"
            if a not in self.used:
                self.used.add(a)
                out.append(a)
        return out

    def one(self) -> str:
        return self.take(1)[0]


# --- a clock for many actors ------------------------------------------------------------------


class Schedule:
    """Events at given times (seconds from the run's start), run in time
    order by one thread on a clock: event i waits for its time, never for
    how long the ones before it took (a slow answer makes the next event
    late, not the whole run longer). An event may add later events."""

    def __init__(self):
        self.events: list[tuple[float, int, object]] = []
        self._seq = itertools.count()
        self.max_lag = 0.0
        self.start: float | None = None

    def at(self, t: float, fn) -> None:
        heapq.heappush(self.events, (t, next(self._seq), fn))

    def now(self) -> float:
        return time.monotonic() - self.start if self.start is not None else 0.0

    def run(self) -> float:
        self.start = time.monotonic()
        while self.events:
            t, _, fn = heapq.heappop(self.events)
            sleep_until(self.start + t)
            self.max_lag = max(self.max_lag, self.now() - t)
            fn()
        return self.now()


class PeerPool:
    """One keep-alive connection per (actor, address); closed at the end."""

    def __init__(self, port: int):
        self.port = port
        self.peers: dict[object, Peer] = {}

    def get(self, key, source: str) -> Peer:
        if key not in self.peers:
            self.peers[key] = Peer(self.port, source)
        return self.peers[key]

    def drop(self, key) -> None:
        peer = self.peers.pop(key, None)
        if peer is not None:
            peer.close()

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close()
        self.peers.clear()


# --- names and passwords of a stuffing list -------------------------------------------------

SEASONAL_PASSWORDS = ["Summer2024!", "Winter2024!", "Spring2025!", "Autumn2024!", "Summer2025!"]
SEASONAL_VARIANTS = ["Summer2024!", "summer2024", "Summer24!", "Winter2023!", "Winter2024", "Spring2025!",
                     "Autumn2024!", "Fall2024!", "Summer2025!", "Winter25!"]


def leak_emails(rng, n: int, avoid: set[str] = frozenset()) -> list[str]:
    """`n` distinct e-mail addresses as a leaked list has them (none is an
    account of the demo API, whose accounts are userNNNN, alice and bob)."""
    out: list[str] = []
    seen = set(avoid)
    while len(out) < n:
        f, l = rng.choice(FIRST), rng.choice(LAST)
        local = [f"{f}.{l}", f"{f}{l}{rng.randrange(60, 100)}", f"{f[0]}{l}", f"{f}_{l}{rng.randrange(1, 999)}",
                 f"{f}.{l}{rng.randrange(1, 99)}"][rng.randrange(5)]
        name = f"{local}@{rng.choice(DOMAINS)}"
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def account_exists(username: str, n_users: int = 1000) -> bool:
    """Whether the demo API (--users n_users) has this account."""
    if username in ("alice", "bob"):
        return True
    return len(username) == 8 and username.startswith("user") and username[4:].isdigit() and \
        1 <= int(username[4:]) <= n_users


# --- how an attack run was stopped ------------------------------------------------------------


@dataclass
class Attempt:
    """One attack request as the attacker saw it."""

    status: int
    username: str | None = None
    risk: str | None = None  # the login risk the filter told the API (the demo API echoes it)
    nth: int = 0  # the attempt's place among its address's attempts (0: the address's first)

    @property
    def refused(self) -> bool:
        return self.status in REFUSED

    @property
    def stopped(self) -> bool:
        """Refused; or, on an account that exists here, told `high` (the
        application then asks for the second factor, so even a right password
        would not get in: how the project treats an attempt that looks like
        the owner's new phone, issue 20). An attempt on an account that does
        not exist is stopped only by a refusal."""
        if self.refused:
            return True
        return bool(self.username and account_exists(self.username) and (self.risk or "").startswith("high"))


@dataclass(repr=False)
class Recognition:
    """An attack run in the order it was sent: recognised at the first
    stopped attempt; `later` is every attempt after that one."""

    attempts: list[Attempt]

    @property
    def first(self) -> int | None:
        return next((i for i, a in enumerate(self.attempts) if a.stopped), None)

    @property
    def later(self) -> list[Attempt]:
        return [] if self.first is None else self.attempts[self.first + 1:]

    @property
    def later_share(self) -> float:
        later = self.later
        return sum(a.stopped for a in later) / len(later) if later else 0.0

    @property
    def later_refused_share(self) -> float:
        later = self.later
        return sum(a.refused for a in later) / len(later) if later else 0.0

    def __str__(self) -> str:
        counts: dict[int, int] = {}
        for a in self.attempts:
            counts[a.status] = counts.get(a.status, 0) + 1
        reached = sum(a.status not in REFUSED for a in self.attempts)
        return (f"{len(self.attempts)} attempts, {reached} reached the upstream, first stopped at #{self.first}, "
                f"{self.later_share:.1%} of the {len(self.later)} later stopped "
                f"({self.later_refused_share:.1%} refused), statuses {dict(sorted(counts.items()))}")

    __repr__ = __str__

    def by_try(self) -> str:
        """Later attempts stopped, split by their place at their address
        (an address's first attempt, or a later one)."""
        out = []
        for label, pick in (("first at their address", lambda a: a.nth == 0), ("repeat", lambda a: a.nth > 0)):
            sel = [a for a in self.later if pick(a)]
            if sel:
                out.append(f"{label}: {sum(a.stopped for a in sel)} of {len(sel)} stopped")
        return "; ".join(out)


def login_risk(resp: Response) -> str | None:
    """The login risk the filter told the demo API, as the API echoes it
    (x-demo-login-risk on a failure, login_risk in a success's body)."""
    if resp.headers.get("x-demo-login-risk"):
        return resp.headers["x-demo-login-risk"]
    try:
        data = resp.json()
    except ValueError:
        return None
    return data.get("login_risk") if isinstance(data, dict) else None


# --- logging in with an exact header set ----------------------------------------------------


def exact_login(peer: Peer, headers_for, username: str, password: str, otp: bool = True
                ) -> tuple[list[Response], str | None]:
    """POST /api/login with `headers_for("POST", None)`; when the API asks
    for the second factor (202) and `otp`, the person gives it (the demo's
    000000). Returns the answers and the token (None unless let in)."""
    body = {"username": username, "password": password}
    answers = [peer.send("POST", "/api/login", headers_for("POST", None), body)]
    if answers[-1].status == 202 and otp:
        answers.append(peer.send("POST", "/api/login", headers_for("POST", None), {**body, "otp": "000000"}))
    token = None
    if answers[-1].status == 200:
        try:
            token = answers[-1].json().get("token")
        except ValueError:
            token = None
    return answers, token


# --- the shipped configuration, red-team style ---------------------------------------------


def shipped_filter_config() -> dict:
    """The filter configuration of envoy/envoy.yaml (the JSON under the Wasm
    filter's `configuration: value: |`)."""
    import re

    from harness import ROOT

    lines = (ROOT / "envoy" / "envoy.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*value:\s*\|\s*$", line):
            indent = len(line) - len(line.lstrip())
            block = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                block.append(nxt)
            return json.loads("\n".join(block))
    raise RuntimeError("no filter configuration block in envoy/envoy.yaml")


def redteam_config(trusted: str = "127.0.0.1", **changes) -> dict:
    """The shipped filter configuration with only `trusted` as a trusted
    proxy and no scorer: every other loopback address is an untrusted peer,
    i.e. a client of its own."""
    config = shipped_filter_config()
    config["client"]["trusted_proxies"] = [f"{trusted}/32"]
    config.pop("scorer", None)
    config.update(changes)
    return config


# --- a live shop: people on a clock, every answer kept per person ----------------------------


class Site:
    """The people of a live shop through one Envoy, on one Schedule: each
    person has their own address, one browser build from SITE_BROWSERS (its
    exact header set), and every answer they get is kept (`people`). Accounts
    are handed out once each (`account()`), so nobody shares one.

    The shapes (`resident`, `shopper`, `flash_sale`, `first_login`) only
    schedule requests; `schedule.run()` sends them."""

    def __init__(self, port: int, seed: int, n_users: int = 1000, avoid_accounts: set[int] = frozenset()):
        self.port = port
        self.rng = random.Random(seed)
        self.addresses = Addresses(random.Random(seed * 7919 + 1))
        self.schedule = Schedule()
        self.pool = PeerPool(port)
        self.people: dict[str, list[tuple[str, int]]] = {}
        self.tokens: dict[str, str | None] = {}
        self.kinds: dict[str, str] = {}
        self.risks: dict[str, list[str | None]] = {}
        # who -> (account id, address, headers builder): to bring a person back
        self.personas: dict[str, tuple[int, str, object]] = {}
        # every come-back of a returning person: (who, time, answers of that visit's login)
        self.comebacks: list[tuple[str, float, list[int]]] = []
        free = [u for u in range(1, n_users + 1) if u not in avoid_accounts]
        self.rng.shuffle(free)
        self.free_accounts = free

    # --- bookkeeping

    def account(self) -> int:
        return self.free_accounts.pop()

    def record(self, who: str, what: str, status: int) -> None:
        self.people.setdefault(who, []).append((what, status))

    def refused_people(self, kind: str | None = None) -> dict[str, list[tuple[str, int]]]:
        return {who: [(w, s) for w, s in answers if s in REFUSED] for who, answers in self.people.items()
                if (kind is None or self.kinds.get(who) == kind) and any(s in REFUSED for _, s in answers)}

    def statuses(self, kind: str | None = None) -> list[int]:
        return [s for who, answers in self.people.items() for _, s in answers
                if kind is None or self.kinds.get(who) == kind]

    def summary(self) -> str:
        by_kind: dict[str, list[int]] = {}
        for who, answers in self.people.items():
            k = self.kinds.get(who, "?")
            by_kind.setdefault(k, [0, 0, 0])
            by_kind[k][0] += 1
            by_kind[k][1] += len(answers)
            by_kind[k][2] += sum(s in REFUSED for _, s in answers)
        return ", ".join(f"{k}: {n} people, {r} requests, {x} refused" for k, (n, r, x) in sorted(by_kind.items()))

    def _person(self, kind: str, label: str, address: str | None = None, browser: Browser | None = None):
        who = f"{kind}/{label}"
        self.kinds[who] = kind
        self.people.setdefault(who, [])
        address = address or self.addresses.one()
        browser = browser or self.rng.choice(SITE_BROWSERS)
        language = self.rng.choice(SITE_LANGUAGES)

        def headers(method: str, auth: str | None = None, referer: str = f"{SITE}/") -> list:
            return browser.headers(method, referer, language, auth)

        return who, address, headers

    def get(self, who: str, address: str, path: str, headers) -> Response:
        r = self.pool.get(who, address).send("GET", path, headers)
        self.record(who, f"GET {path}", r.status)
        return r

    def login(self, who: str, address: str, headers_for, uid: int, password: str | None = None) -> str | None:
        answers, token = exact_login(self.pool.get(who, address), headers_for, f"user{uid:04d}",
                                     password or f"pass-{uid:04d}")
        for r in answers:
            self.record(who, "POST /api/login", r.status)
            self.risks.setdefault(who, []).append(login_risk(r))
        if password is None or password == f"pass-{uid:04d}":
            self.tokens[who] = token
        return token

    # --- shapes of benign traffic

    def resident(self, t: float, until: float, every: float = 8.0, kind: str = "resident") -> str:
        """Someone who uses the shop: opens it, logs in with their own
        account, then comes back every ~`every` s until `until` (their own
        profile, /api/me, products), with the token the API gave them."""
        uid = self.account()
        who, address, headers = self._person(kind, f"user{uid:04d}")
        self.personas[who] = (uid, address, headers)
        rng = random.Random(self.rng.random())

        def arrive():
            self.get(who, address, "/api/products?page=1", headers("GET"))
            self.login(who, address, lambda m, a: headers(m, a, f"{SITE}/login"), uid)

        def visit():
            token = self.tokens.get(who)
            r = rng.random()
            if r < 0.35:
                self.get(who, address, f"/api/users/{uid}", headers("GET", token, f"{SITE}/account"))
            elif r < 0.55:
                self.get(who, address, "/api/me", headers("GET", token, f"{SITE}/account"))
            elif r < 0.75:
                self.get(who, address, f"/api/products?page={rng.randrange(1, 6)}", headers("GET", token))
            else:
                self.get(who, address, f"/api/products/{rng.randrange(1, 501)}",
                         headers("GET", token, f"{SITE}/products"))

        self.schedule.at(t, arrive)
        tv = t + rng.uniform(1.0, every)
        while tv < until:
            self.schedule.at(tv, visit)
            tv += rng.uniform(0.5 * every, 1.5 * every)
        return who

    def come_back(self, who: str, t: float, typo: bool = False) -> None:
        """A resident returns (a new visit: a new connection, from the same
        address and browser as their last login): opens a product page,
        logs in again (after a mistyped password if `typo`), reads /api/me."""
        uid, address, headers = self.personas[who]

        def visit():
            self.pool.drop(who)
            before = len(self.people[who])
            self.get(who, address, f"/api/products/{self.rng.randrange(1, 501)}", headers("GET"))
            if typo:
                self.login(who, address, lambda m, a: headers(m, a, f"{SITE}/login"), uid, f"pass-{uid:04d}!")
            self.login(who, address, lambda m, a: headers(m, a, f"{SITE}/login"), uid)
            self.get(who, address, "/api/me", headers("GET", self.tokens.get(who), f"{SITE}/account"))
            self.comebacks.append((who, t, [s for w, s in self.people[who][before:] if w == "POST /api/login"]))

        self.schedule.at(t, visit)

    def shopper(self, t: float, kind: str = "shopper") -> str:
        """A visitor who never logs in: a product list page, then 2-4
        random products a few seconds apart."""
        rng = random.Random(self.rng.random())
        who, address, headers = self._person(kind, f"s{len(self.people)}")
        self.schedule.at(t, lambda: self.get(who, address, f"/api/products?page={rng.randrange(1, 26)}",
                                             headers("GET")))
        for _ in range(rng.randint(2, 4)):
            t += rng.uniform(1.0, 3.5)
            path = f"/api/products/{rng.randrange(1, 501)}"
            self.schedule.at(t, lambda p=path: self.get(who, address, p, headers("GET", None, f"{SITE}/products")))
        return who

    def flash_sale(self, t: float, buyers: int, span: float, hot: list[int], kind: str = "flash_sale") -> list[str]:
        """A sale announced by e-mail: `buyers` new visitors within `span` s
        each open one of the few `hot` products, and refresh it 0-2 times."""
        out = []
        for _ in range(buyers):
            rng = random.Random(self.rng.random())
            who, address, headers = self._person(kind, f"b{len(self.people)}")
            pid = rng.choice(hot)
            tb = t + rng.uniform(0, span)
            for _ in range(1 + rng.randint(0, 2)):
                self.schedule.at(tb, lambda p=pid, w=who, a=address, h=headers:
                                 self.get(w, a, f"/api/products/{p}", h("GET", None, f"{SITE}/sale")))
                tb += rng.uniform(0.5, 2.0)
            out.append(who)
        return out

    def first_login(self, t: float, kind: str = "first_login", reads: int = 2, typo: bool = False) -> str:
        """A new customer signing in for the first time (an account nobody
        logged into before, from an address and browser never seen): opens a
        product page, logs in, then reads their own profile `reads` times."""
        uid = self.account()
        rng = random.Random(self.rng.random())
        who, address, headers = self._person(kind, f"user{uid:04d}")
        self.personas[who] = (uid, address, headers)

        def arrive():
            self.get(who, address, f"/api/products/{rng.randrange(1, 501)}", headers("GET"))
            if typo:
                self.login(who, address, lambda m, a: headers(m, a, f"{SITE}/login"), uid, f"pass-{uid:04d}x")
            self.login(who, address, lambda m, a: headers(m, a, f"{SITE}/login"), uid)

        self.schedule.at(t, arrive)
        for k in range(reads):
            self.schedule.at(t + 1.0 + 1.5 * k + rng.uniform(0, 1), lambda: self.get(
                who, address, f"/api/users/{uid}", headers("GET", self.tokens.get(who), f"{SITE}/account")))
        return who
