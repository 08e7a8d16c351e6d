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
import http.client
import itertools
import json
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
