"""Tests for the demo upstream API (examples/demo_api/server.py).

Run: python3 -m pytest -q tests/test_demo_api.py
"""

import base64
import hashlib
import hmac
import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parent.parent / "examples" / "demo_api" / "server.py"
SECRET = "test-secret"
USERS = 50  # ids 1..50 generated, alice = 51, bob = 52


def start_server(*extra_args):
    """Start the server on a free port; return (process, port)."""
    env = dict(os.environ, DEMO_API_SECRET=SECRET)
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--port", "0", *extra_args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    # readline() blocks, so read the banner in a thread to be able to time out.
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=10)
    except queue.Empty:
        line = ""
    match = re.fullmatch(r"demo-api listening on http://127\.0\.0\.1:(\d+)\n", line)
    if not match:
        stop_server(proc)
        pytest.fail(f"server did not start, got {line!r}")
    return proc, int(match.group(1))


def stop_server(proc):
    proc.terminate()
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
    finally:
        proc.stdout.close()


@pytest.fixture(scope="module")
def port():
    proc, port = start_server("--users", str(USERS))
    try:
        yield port
    finally:
        stop_server(proc)


def request(port, method, path, body=None, headers=None, conn=None):
    """Send one request; return (status, headers, parsed JSON body)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        # Contract for every response: JSON with an explicit length.
        assert resp.getheader("Content-Type") == "application/json"
        assert int(resp.getheader("Content-Length")) == len(data)
        return resp.status, resp, (json.loads(data) if data else None)
    finally:
        if own:
            conn.close()


def login(port, username, password):
    return request(port, "POST", "/api/login", {"username": username, "password": password})


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(payload, secret=SECRET, header=None):
    head = b64url(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(payload).encode())
    sig = b64url(hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


# --- login ---------------------------------------------------------------


@pytest.mark.parametrize(
    "username,password",
    [("alice", "wonderland"), ("bob", "hunter2"), ("user0001", "pass-0001"), ("user0050", "pass-0050")],
)
def test_login_json_ok(port, username, password):
    status, _, body = login(port, username, password)
    assert status == 200
    assert body["username"] == username
    head, payload, _ = body["token"].split(".")
    assert json.loads(base64.urlsafe_b64decode(head + "==")) == {"alg": "HS256", "typ": "JWT"}
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    assert claims["sub"] == username
    assert claims["exp"] - claims["iat"] == 3600
    assert "=" not in body["token"]


@pytest.mark.parametrize(
    "username,password",
    [("alice", "hunter2"), ("mallory", "wonderland"), ("user0051", "pass-0051"), ("user0001", "pass-0002")],
)
def test_login_json_bad_credentials(port, username, password):
    status, _, body = login(port, username, password)
    assert status == 401
    assert body == {"error": "invalid credentials"}


def test_login_form_ok(port):
    form = "username=bob&password=hunter2"
    status, _, body = request(
        port, "POST", "/api/login", form, {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 200 and body["username"] == "bob"


def test_login_form_bad(port):
    form = "username=bob&password=wrong"
    status, _, body = request(
        port, "POST", "/api/login", form, {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 401 and body == {"error": "invalid credentials"}


def test_login_form_without_content_type(port):
    status, _, body = request(port, "POST", "/api/login", "username=alice&password=wonderland")
    assert status == 200 and body["username"] == "alice"


@pytest.mark.parametrize(
    "body,ctype",
    [
        ('{"username": "alice", "password": ', "application/json"),
        ("[1, 2, 3]", "application/json"),
        ("[" * 50000, "application/json"),
        (b"\xff\xfe", "application/json"),
        ('{"username": "alice"}', "application/json"),
        ('{"username": "alice", "password": 123}', "application/json"),
        ("", "application/json"),
        ("password=x", "application/x-www-form-urlencoded"),
        ("garbage", "application/x-www-form-urlencoded"),
        ("garbage", None),
    ],
)
def test_login_malformed(port, body, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    status, _, resp = request(port, "POST", "/api/login", body, headers)
    assert status == 400
    assert isinstance(resp["error"], str)


def test_login_chunked(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        chunks = iter([b'{"username": "alice", ', b'"password": "wonderland"}'])
        conn.request(
            "POST", "/api/login", body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read())["username"] == "alice"
    finally:
        conn.close()


def test_login_wrong_method(port):
    status, resp, body = request(port, "GET", "/api/login")
    assert status == 405 and "POST" in resp.getheader("Allow")


# --- /api/me -------------------------------------------------------------


def test_me_with_token(port):
    token = login(port, "alice", "wonderland")[2]["token"]
    status, _, body = request(port, "GET", "/api/me", headers={"Authorization": f"Bearer {token}"})
    assert status == 200
    assert body == {"username": "alice", "id": USERS + 1}


def test_me_tampered_token(port):
    token = login(port, "alice", "wonderland")[2]["token"]
    head, _, sig = token.split(".")
    forged_payload = b64url(json.dumps({"sub": "bob", "iat": 0, "exp": 2**40}).encode())
    flipped_sig = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    for bad in (f"{head}.{forged_payload}.{sig}", f"{token[:-1]}{flipped_sig[-1]}", token + "!"):
        status, resp, body = request(port, "GET", "/api/me", headers={"Authorization": f"Bearer {bad}"})
        assert status == 401, bad
        assert resp.getheader("WWW-Authenticate", "").startswith("Bearer")


@pytest.mark.parametrize(
    "auth",
    [
        None,
        "Bearer",
        "Bearer not.a.jwt",
        "Basic YWxpY2U6d29uZGVybGFuZA==",
        "Bearer " + make_token({"sub": "alice", "iat": 0, "exp": int(time.time()) - 10}),  # expired
        "Bearer " + make_token({"sub": "alice", "exp": 2**40}, secret="other-secret"),  # wrong key
        "Bearer " + make_token({"sub": "alice", "exp": 2**40}, header={"alg": "none"}),
        "Bearer " + make_token({"sub": "nobody", "exp": 2**40}),  # unknown user
    ],
)
def test_me_rejected(port, auth):
    headers = {"Authorization": auth} if auth else {}
    status, _, body = request(port, "GET", "/api/me", headers=headers)
    assert status == 401 and "error" in body


def test_me_accepts_token_signed_with_shared_secret(port):
    # Sanity check of the JWT format: a token we sign with the same secret is accepted.
    token = make_token({"sub": "user0007", "iat": int(time.time()), "exp": int(time.time()) + 60})
    status, _, body = request(port, "GET", "/api/me", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and body == {"username": "user0007", "id": 7}


# --- users ---------------------------------------------------------------


def test_user_found(port):
    assert request(port, "GET", "/api/users/7")[2] == {
        "id": 7,
        "username": "user0007",
        "email": "user0007@example.com",
    }
    assert request(port, "GET", f"/api/users/{USERS + 1}")[2]["username"] == "alice"
    assert request(port, "GET", f"/api/users/{USERS + 2}")[2]["username"] == "bob"


@pytest.mark.parametrize("uid", [str(USERS + 3), "999999", "9" * 40])
def test_user_not_found(port, uid):
    status, _, body = request(port, "GET", f"/api/users/{uid}")
    assert status == 404 and "error" in body


@pytest.mark.parametrize("uid", ["abc", "0", "-1", "1.5", "%31", "+7", "9" * 100, ""])
def test_user_bad_id(port, uid):
    status, _, body = request(port, "GET", f"/api/users/{uid}")
    assert status == 400 and "error" in body


# --- products ------------------------------------------------------------


def test_products_first_page(port):
    for path in ("/api/products", "/api/products?page=1"):
        status, _, body = request(port, "GET", path)
        assert status == 200
        assert body["page"] == 1 and body["next"] == 2
        assert [item["id"] for item in body["items"]] == list(range(1, 21))


def test_products_paging_to_end(port):
    seen, page = [], 1
    while page is not None:
        status, _, body = request(port, "GET", f"/api/products?page={page}")
        assert status == 200 and body["page"] == page
        seen += body["items"]
        page = body["next"]
    assert [item["id"] for item in seen] == list(range(1, 501))
    assert len({item["name"] for item in seen}) == 500
    # deterministic: the same product comes back identical
    assert request(port, "GET", "/api/products/42")[2] == seen[41]


def test_products_beyond_end(port):
    status, _, body = request(port, "GET", "/api/products?page=26")
    assert status == 200 and body == {"page": 26, "items": [], "next": None}


@pytest.mark.parametrize("page", ["0", "-1", "abc", "", "1.5"])
def test_products_bad_page(port, page):
    status, _, body = request(port, "GET", f"/api/products?page={page}")
    assert status == 400 and "error" in body


def test_product_by_id(port):
    status, _, body = request(port, "GET", "/api/products/500")
    assert status == 200 and body["id"] == 500
    assert request(port, "GET", "/api/products/501")[0] == 404
    assert request(port, "GET", "/api/products/x")[0] == 400


# --- misc ----------------------------------------------------------------


def test_health(port):
    assert request(port, "GET", "/health")[:3:2] == (200, {"status": "ok"})


@pytest.mark.parametrize("path", ["/", "/nope", "/api", "/api/users", "/api/users/1/extra", "/health/x"])
def test_unknown_path(port, path):
    status, _, body = request(port, "GET", path)
    assert status == 404 and body == {"error": "not found"}


def test_wrong_method(port):
    status, resp, body = request(port, "DELETE", "/api/users/1")
    assert status == 405 and "GET" in resp.getheader("Allow")


def test_oversized_body(port):
    body = b'{"username": "' + b"x" * (64 * 1024) + b'"}'
    status, _, resp = request(port, "POST", "/api/login", body, {"Content-Type": "application/json"})
    assert status == 413 and "error" in resp


def test_body_at_limit_is_accepted(port):
    body = b"username=alice&password=wonderland&pad=" + b"x" * (64 * 1024)
    body = body[: 64 * 1024]
    status, _, _ = request(port, "POST", "/api/login", body, {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200


def test_keep_alive(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        for _ in range(3):
            assert request(port, "GET", "/health", conn=conn)[0] == 200
        # an error response (with a drained oversized body) keeps the connection usable
        assert request(port, "POST", "/api/login", b"x" * 70000, conn=conn)[0] == 413
        assert request(port, "GET", "/api/users/nope", conn=conn)[0] == 400
        assert request(port, "GET", "/health", conn=conn)[0] == 200
    finally:
        conn.close()


def test_garbage_request_line(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"\x00\x01garbage here now\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")
    # and the server is still fine afterwards
    assert request(port, "GET", "/health")[0] == 200


def test_sigterm_exits_cleanly():
    proc, port = start_server("--users", "1")
    assert request(port, "GET", "/health")[0] == 200
    # an idle keep-alive connection must not block shutdown
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    request(port, "GET", "/health", conn=idle)
    try:
        assert stop_server(proc) == 0
    finally:
        idle.close()


def test_sigint_exits_cleanly():
    proc, _ = start_server("--users", "1")
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=5) == 0
    finally:
        stop_server(proc)


# --- the endpoints the example rules need (docs/rules.md) ---

def test_otp_send_accepts_a_phone(port):
    status, headers, data = request(port, "POST", "/api/otp/send", {"phone": "+15550100"})
    assert status == 202 and data == {"sent": True, "phone": "+15550100"}


@pytest.mark.parametrize("body", [{}, {"phone": ""}, {"phone": 5}, [1]])
def test_otp_send_needs_a_phone(port, body):
    assert request(port, "POST", "/api/otp/send", body)[0] == 400


def test_otp_verify_takes_the_demo_code_only(port):
    ok = request(port, "POST", "/api/otp/verify", {"phone": "+15550100", "code": "424242"})
    assert ok[0] == 200 and ok[2]["verified"] is True
    assert request(port, "POST", "/api/otp/verify", {"phone": "+15550100", "code": "000000"})[0] == 401
    assert request(port, "POST", "/api/otp/verify", {"phone": "+15550100"})[0] == 400


def test_coupons_know_welcome10_only(port):
    ok = request(port, "POST", "/api/coupons/apply", {"code": "WELCOME10"})
    assert ok[0] == 200 and ok[2] == {"code": "WELCOME10", "percent_off": 10}
    assert request(port, "POST", "/api/coupons/apply", {"code": "GUESS0001"})[0] == 404
    assert request(port, "GET", "/api/coupons/apply")[0] == 405


def test_search_reports_its_cost(port):
    status, headers, data = request(port, "GET", "/api/search?q=lamp")
    assert status == 200 and headers.getheader("x-query-cost") == "1"
    assert all("lamp" in item["name"].lower() for item in data["items"])
    status, headers, data = request(port, "GET", "/api/search?q=*")
    assert status == 200 and headers.getheader("x-query-cost") == "100" and data["items"]
    assert request(port, "GET", "/api/search")[1].getheader("x-query-cost") == "1"
