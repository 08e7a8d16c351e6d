#!/usr/bin/env python3
"""Demo upstream API that sits behind Envoy in demos and integration tests.

Endpoints (every response is JSON):
  POST /api/login            JSON or form credentials -> HS256 JWT; a login the
                             filter marks high risk (x-abuse-login-risk: high; ...)
                             gets 202 {"mfa_required": true} unless it sends "otp": "000000"
  GET  /api/me               Authorization: Bearer <jwt>
  GET  /api/users/{id}       ids 1..N are user0001..userNNNN; alice = N+1, bob = N+2
  GET  /api/products?page=N  20 per page, 500 products
  GET  /api/products/{id}
  POST /api/otp/send         {"phone"} -> 202 (a code is "sent"; the demo's code is always 424242)
  POST /api/otp/verify       {"phone","code"} -> 200 when the code is 424242, else 401
  POST /api/coupons/apply    {"code"} -> 200 for WELCOME10, else 404
  GET  /api/search?q=        -> 200 with x-query-cost: what the query cost the API
                             (100 for a wildcard query containing "*", else 1)
  GET  /health
  GET  /debug/headers        echoes the request headers (shows what Envoy added)

Standard library only. Usage:
  python3 examples/demo_api/server.py [--host 127.0.0.1] [--port 8080] [--users 1000] [--verbose]
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import socket
import socketserver
import sys
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

MAX_BODY = 64 * 1024
# Oversized bodies up to this size are read and thrown away before answering 413,
# so the client gets the response rather than a connection reset.
DRAIN_LIMIT = 1024 * 1024
TOKEN_TTL = 3600
PAGE_SIZE = 20
PRODUCT_COUNT = 500
ADJECTIVES = ["Sturdy", "Shiny", "Compact", "Deluxe", "Rustic", "Quiet", "Rapid", "Classic"]
NOUNS = ["Widget", "Gadget", "Lamp", "Kettle", "Backpack", "Notebook", "Speaker", "Chair"]


# The API keys this API issued to its partners (x-api-key); any other value
# is unknown to it.
API_KEYS = frozenset({"partner-key-1", "partner-key-2"})


class HTTPError(Exception):
    """Raised by handlers; turned into a JSON error response."""

    def __init__(self, status, message, headers=None, close=False):
        super().__init__(message)
        self.status, self.message, self.headers, self.close = status, message, headers or {}, close


def positive_int(text, what):
    # Decimal digits only (int() would also accept "+7", " 7", "7_0", ...).
    if not re.fullmatch(r"[0-9]{1,64}", text) or int(text) < 1:
        raise HTTPError(400, f"{what} must be a positive integer")
    return int(text)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Tokens:
    """Minimal HS256 JWT issue/verify."""

    def __init__(self, secret):
        self.secret = secret

    def _sign(self, signing_input):
        return b64url(hmac.new(self.secret, signing_input.encode("ascii"), hashlib.sha256).digest())

    def issue(self, username):
        now = int(time.time())
        compact = {"separators": (",", ":")}
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, **compact).encode())
        payload = b64url(json.dumps({"sub": username, "iat": now, "exp": now + TOKEN_TTL}, **compact).encode())
        return f"{header}.{payload}.{self._sign(header + '.' + payload)}"

    def verify(self, token):
        """Return the subject of a valid, unexpired token, else None."""
        parts = token.split(".")
        if len(parts) != 3:
            return None
        try:
            expected = self._sign(parts[0] + "." + parts[1])
            # Compare the encoded signatures: base64 decoding is lenient (it skips
            # stray characters), so comparing decoded bytes would accept altered tokens.
            if not hmac.compare_digest(expected.encode(), parts[2].encode("utf-8", "replace")):
                return None
            header = json.loads(b64url_decode(parts[0]))
            payload = json.loads(b64url_decode(parts[1]))
        except (ValueError, RecursionError):
            return None
        if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(payload, dict):
            return None
        sub, exp = payload.get("sub"), payload.get("exp")
        if not isinstance(sub, str) or type(exp) is not int or exp <= time.time():
            return None
        return sub


class Store:
    """Users and products, generated deterministically."""

    def __init__(self, n_users):
        # ids 1..N are the generated accounts so /api/users/7 is user0007;
        # the two named accounts come right after them.
        self.users = {i: (f"user{i:04d}", f"pass-{i:04d}") for i in range(1, n_users + 1)}
        self.users[n_users + 1] = ("alice", "wonderland")
        self.users[n_users + 2] = ("bob", "hunter2")
        self.by_name = {name: (uid, pw) for uid, (name, pw) in self.users.items()}

    @staticmethod
    def product(pid):
        name = f"{ADJECTIVES[pid % len(ADJECTIVES)]} {NOUNS[pid // len(ADJECTIVES) % len(NOUNS)]} #{pid}"
        return {"id": pid, "name": name, "sku": f"SKU-{pid:05d}", "price": (pid * 7919 % 9900 + 100) / 100}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle
    # and the peer's delayed ACK hold every keep-alive answer for ~40 ms.
    disable_nagle_algorithm = True
    server_version = "demo-api/1.0"
    timeout = 60  # drop idle keep-alive connections

    # (path regex, {method: handler name}); regex groups become handler arguments.
    ROUTES = [
        (re.compile(r"/health"), {"GET": "health"}),
        (re.compile(r"/debug/headers"), {"GET": "echo_headers"}),
        (re.compile(r"/api/login"), {"POST": "login"}),
        (re.compile(r"/api/me"), {"GET": "me"}),
        (re.compile(r"/api/users/([^/]*)"), {"GET": "user"}),
        (re.compile(r"/api/products"), {"GET": "products"}),
        (re.compile(r"/api/products/([^/]*)"), {"GET": "product"}),
        (re.compile(r"/api/otp/send"), {"POST": "otp_send"}),
        (re.compile(r"/api/otp/verify"), {"POST": "otp_verify"}),
        (re.compile(r"/api/coupons/apply"), {"POST": "coupon_apply"}),
        (re.compile(r"/api/search"), {"GET": "search"}),
    ]

    def version_string(self):
        return self.server_version  # no Python version in the Server header

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    def send_error(self, code, message=None, explain=None):
        # Protocol-level errors from http.server itself (bad request line, huge
        # headers, unknown method): answer in JSON like everything else.
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        # An unparseable request line leaves the version at HTTP/0.9, which would
        # suppress the status line and headers; answer as HTTP/1.1 instead.
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.1"
        self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def credential_valid(self):
        """The request's bearer token is one this API issued (and unexpired),
        or its x-api-key one of the API keys it gave its partners."""
        if self.headers.get("x-api-key", "").strip() in API_KEYS:
            return True
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.server.tokens.verify(token.strip()) is not None

    def send_json(self, status, obj, headers=None):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status < 300 and getattr(self, "headers", None) is not None and self.credential_valid():
            # Tells the abuse filter the credential is the API's own
            # (client.accepted_credential_header): only then does it lift
            # the client from the anonymous limits.
            self.send_header("x-api-credential", "valid")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(body)

    def dispatch(self):
        path, _, query = self.path.partition("?")
        try:
            body = self.read_body()  # always consumed, so keep-alive stays in sync
            for pattern, methods in self.ROUTES:
                match = pattern.fullmatch(path)
                if match:
                    break
            else:
                raise HTTPError(404, "not found")
            method = "GET" if self.command == "HEAD" else self.command
            if method not in methods:
                allow = sorted(methods) + (["HEAD"] if "GET" in methods else [])
                raise HTTPError(405, "method not allowed", {"Allow": ", ".join(allow)})
            status, obj, *headers = getattr(self, methods[method])(query, body, *match.groups())
            self.send_json(status, obj, headers[0] if headers else None)
        except HTTPError as err:
            self.close_connection = self.close_connection or err.close
            self.send_json(err.status, {"error": err.message}, err.headers)
        except Exception:
            self.log_error("unhandled error:\n%s", traceback.format_exc())
            self.close_connection = True
            self.send_json(500, {"error": "internal server error"})

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = dispatch

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self.read_chunked()  # e.g. Envoy forwarding an HTTP/2 body without length
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not re.fullmatch(r"[0-9]{1,18}", length.strip()):
            raise HTTPError(400, "invalid Content-Length", close=True)
        length = int(length)
        if length > MAX_BODY:
            if length <= DRAIN_LIMIT:
                self.rfile.read(length)
            raise HTTPError(413, "request body too large", close=length > DRAIN_LIMIT)
        body = self.rfile.read(length)
        if len(body) < length:
            raise HTTPError(400, "truncated body", close=True)
        return body

    def read_chunked(self):
        body = bytearray()
        while True:
            size_line = self.rfile.readline(1024).split(b";")[0].strip()
            if not re.fullmatch(rb"[0-9a-fA-F]{1,8}", size_line):
                raise HTTPError(400, "malformed chunked body", close=True)
            size = int(size_line, 16)
            if size == 0:
                break
            if len(body) + size > MAX_BODY:
                raise HTTPError(413, "request body too large", close=True)
            chunk = self.rfile.read(size)
            if len(chunk) < size or self.rfile.readline(1024).strip():
                raise HTTPError(400, "malformed chunked body", close=True)
            body += chunk
        while self.rfile.readline(1024).strip():  # skip trailers up to the blank line
            pass
        return bytes(body)

    # --- endpoints: (query, body, *path groups) -> (status, json object) ---

    def health(self, query, body):
        return 200, {"status": "ok"}

    def echo_headers(self, query, body):
        return 200, {"headers": {k.lower(): v for k, v in self.headers.items()}}

    def login(self, query, body):
        username, password = self.credentials(body)
        account = self.server.store.by_name.get(username)
        risk = self.headers.get("x-abuse-login-risk")
        # Constant-time compare; surrogatepass because JSON can smuggle lone surrogates.
        if account is None or not hmac.compare_digest(
            account[1].encode(), password.encode("utf-8", "surrogatepass")
        ):
            # What the filter told the application, shown so that scripts
            # and tests can see it (a real API would keep it to itself).
            raise HTTPError(401, "invalid credentials", {"x-demo-login-risk": risk} if risk else None)
        # Step-up, the way an application uses the filter's login risk: a
        # "high" login must also give its second factor (the demo's code is
        # 000000). 202 is neither a success nor a failure for the filter, so
        # a stepped-up attempt teaches the account's profile nothing.
        if risk and risk.startswith("high") and self.login_fields.get("otp") != "000000":
            return 202, {"mfa_required": True, "login_risk": risk}
        return 200, {"token": self.server.tokens.issue(username), "username": username, "login_risk": risk}

    def credentials(self, body):
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not body.strip():
            data = {}
        elif ctype == "application/json" or (not ctype and body.lstrip().startswith(b"{")):
            try:
                data = json.loads(body.decode("utf-8"))
            except (ValueError, RecursionError):  # RecursionError: "[[[[..." bombs
                raise HTTPError(400, "malformed JSON body") from None
            if not isinstance(data, dict):
                raise HTTPError(400, "JSON body must be an object")
        elif ctype in ("application/x-www-form-urlencoded", ""):
            try:
                form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
            except ValueError:
                raise HTTPError(400, "malformed form body") from None
            data = {key: values[0] for key, values in form.items()}
        else:
            raise HTTPError(415, "use application/json or application/x-www-form-urlencoded")
        self.login_fields = data
        username, password = data.get("username"), data.get("password")
        if not (isinstance(username, str) and isinstance(password, str) and username and password):
            raise HTTPError(400, "username and password are required")
        return username, password

    def json_object(self, body):
        """A JSON object body (the OTP and coupon endpoints), else 400."""
        try:
            data = json.loads(body.decode("utf-8")) if body.strip() else {}
        except (ValueError, RecursionError):
            raise HTTPError(400, "malformed JSON body") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "JSON body must be an object")
        return data

    def required(self, data, *fields):
        values = [data.get(f) for f in fields]
        if not all(isinstance(v, str) and v for v in values):
            raise HTTPError(400, " and ".join(fields) + " required")
        return values

    # The demo's one-time code: every phone "receives" it (no SMS is sent).
    OTP_CODE = "424242"
    COUPONS = {"WELCOME10": 10}

    def otp_send(self, query, body):
        (phone,) = self.required(self.json_object(body), "phone")
        return 202, {"sent": True, "phone": phone}

    def otp_verify(self, query, body):
        phone, code = self.required(self.json_object(body), "phone", "code")
        if not hmac.compare_digest(code.encode("utf-8", "surrogatepass"), self.OTP_CODE.encode()):
            raise HTTPError(401, "wrong code")
        return 200, {"verified": True, "phone": phone}

    def coupon_apply(self, query, body):
        (code,) = self.required(self.json_object(body), "code")
        if code not in self.COUPONS:
            raise HTTPError(404, "no such coupon")
        return 200, {"code": code, "percent_off": self.COUPONS[code]}

    def search(self, query, body):
        q = parse_qs(query, keep_blank_values=True).get("q", [""])[0]
        # What the query cost the API, for a cost budget (rules count it):
        # a wildcard scans everything.
        cost = 100 if "*" in q else 1
        items = [p for p in (Store.product(pid) for pid in range(1, 21)) if q.strip("*").lower() in p["name"].lower()]
        return 200, {"q": q, "items": items[:PAGE_SIZE]}, {"x-query-cost": str(cost)}

    def me(self, query, body):
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        sub = self.server.tokens.verify(token.strip()) if scheme.lower() == "bearer" else None
        account = self.server.store.by_name.get(sub) if sub else None
        if account is None:
            raise HTTPError(401, "missing or invalid bearer token", {"WWW-Authenticate": 'Bearer realm="demo-api"'})
        return 200, {"username": sub, "id": account[0]}

    def user(self, query, body, raw_id):
        uid = positive_int(raw_id, "user id")
        if uid not in self.server.store.users:
            raise HTTPError(404, "user not found")
        name = self.server.store.users[uid][0]
        return 200, {"id": uid, "username": name, "email": f"{name}@example.com"}

    def products(self, query, body):
        page = positive_int(parse_qs(query, keep_blank_values=True).get("page", ["1"])[0], "page")
        start = (page - 1) * PAGE_SIZE
        items = [Store.product(pid) for pid in range(start + 1, min(start + PAGE_SIZE, PRODUCT_COUNT) + 1)]
        return 200, {"page": page, "items": items, "next": page + 1 if start + PAGE_SIZE < PRODUCT_COUNT else None}

    def product(self, query, body, raw_id):
        pid = positive_int(raw_id, "product id")
        if pid > PRODUCT_COUNT:
            raise HTTPError(404, "product not found")
        return 200, Store.product(pid)


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not block shutdown
    # The listen backlog (socketserver's default is 5): a burst of new
    # connections from Envoy's workers must wait in the queue, not be dropped
    # into a connect timeout that Envoy answers with 503.
    request_queue_size = 1024

    def __init__(self, address, store, tokens, verbose):
        self.store, self.tokens, self.verbose = store, tokens, verbose
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall on a
        # reverse DNS lookup in containers; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        # Client resets and timeouts are routine; only report them with --verbose.
        if self.verbose:
            super().handle_error(request, client_address)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Demo upstream API for the abuse-prevention filter.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--users", type=int, default=1000, help="number of generated userNNNN accounts")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)
    if args.users < 0:
        parser.error("--users must be >= 0")

    secret = os.environ.get("DEMO_API_SECRET", "").encode() or secrets.token_bytes(32)
    try:
        httpd = DemoServer((args.host, args.port), Store(args.users), Tokens(secret), args.verbose)
    except OSError as err:
        print(f"demo-api: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1

    def stop(signum, frame):
        raise KeyboardInterrupt  # unwinds serve_forever() in the main thread

    # Installed before announcing, so tests can signal right away. SIGINT is set
    # explicitly because shells start background jobs with it ignored.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host = f"[{args.host}]" if ":" in args.host else args.host
    try:
        # Announced inside the try: a signal right after the banner must
        # still end in a clean exit.
        print(f"demo-api listening on http://{host}:{httpd.server_address[1]}", flush=True)
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
