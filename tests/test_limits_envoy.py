"""Input limits on real Envoy, each at the limit and one past it (the
"Input limits" table of docs/input-limits.md; the engine's own limits are unit-tested in
engine/tests/limits.rs, the scorer's in scorer/tests/http.rs):

- header bytes and header count are Envoy's (max_request_headers_kb 60,
  max_headers_count 100 with the pseudo-headers): at the limit the request
  goes through the filter, which reads the whole map; past it Envoy answers
  431 before any filter runs;
- login bodies: credential_stuffing.max_body_bytes is read, one byte more is
  let through unread (counted in abuse_filter.login_bodies_skipped).
"""

import json
import socket

import pytest

from harness import DemoApi, Envoy

CONFIG = {
    "mode": "block",
    "client": {"trusted_proxies": ["127.0.0.1"]},
    "credential_stuffing": {
        "max_body_bytes": 1024,
        "login_routes": [{"path": "/api/login", "method": "POST", "username_field": "username",
                          "failure_statuses": [401], "success_statuses": [200]}],
    },
}


@pytest.fixture(scope="module")
def envoy():
    api = DemoApi()
    e = Envoy.with_filter(CONFIG, api.port)
    yield e
    e.stop()
    api.stop()


def raw(envoy, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> int:
    """The status of one HTTP/1.1 request written byte for byte (Host and
    Connection first, then `headers`), so the header count is exact."""
    head = f"{method} {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    if body:
        head += f"content-length: {len(body)}\r\n"
    with socket.create_connection(("127.0.0.1", envoy.port), timeout=10) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_header_count_at_envoys_limit_and_one_past(envoy):
    # 100 = :method :path :scheme :authority (from Host) + Connection + 95 more.
    seen = envoy.stat("abuse_filter.requests")
    at = [(f"x-h{i}", "v") for i in range(95)]
    assert raw(envoy, "GET", "/api/products?page=1", at) == 200
    # On a login route the filter also takes the header names for the fingerprint (first 64).
    # (a request with a body counts two more: Content-Length, and one Envoy adds)
    assert raw(envoy, "POST", "/api/login", at[:-2], b'{"username":"u","password":"p"}') in (200, 401)
    envoy.wait_stat("abuse_filter.requests", seen + 2)
    assert raw(envoy, "GET", "/api/products?page=1", at + [("x-one-more", "v")]) == 431


def test_header_bytes_at_envoys_limit_and_one_past(envoy):
    # 60 KiB of request headers in all, counted as Envoy counts them (name + value of each).
    fixed = len("host") + len("api") + len("connection") + len("close") + len(":method") + len("GET") \
        + len(":path") + len("/api/products?page=1") + len(":scheme") + len("http") + len("x-big")
    assert raw(envoy, "GET", "/api/products?page=1", [("x-big", "a" * (60 * 1024 - fixed - 200))]) == 200
    assert raw(envoy, "GET", "/api/products?page=1", [("x-big", "a" * (60 * 1024))]) == 431


def login_body(size: int) -> bytes:
    body = json.dumps({"username": "someone@example.com", "password": "p"})
    return (body + " " * (size - len(body))).encode()


def test_login_body_at_the_limit_is_read_one_byte_more_is_not(envoy):
    skipped = envoy.stat("abuse_filter.login_bodies_skipped")
    json_headers = [("content-type", "application/json")]
    assert raw(envoy, "POST", "/api/login", json_headers, login_body(1024)) in (200, 401)
    assert raw(envoy, "POST", "/api/login", json_headers, login_body(1025)) in (200, 401)
    envoy.wait_stat("abuse_filter.login_bodies_skipped", skipped + 1)
    assert envoy.stat("abuse_filter.login_bodies_skipped") == skipped + 1, "the 1024-byte body was skipped too"
