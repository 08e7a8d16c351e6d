"""Only verified or API-accepted credentials are identities (issue 20), on
real Envoy with the built filter and the demo API:

- Envoy's `jwt_authn` verifies the demo API's HS256 tokens (a local JWKS of
  the demo's secret); a `header_mutation` after it writes the *verified*
  subject into `x-abuse-subject` (client.verified_subject_header), removing
  any copy a client sent. A verified token lifts its client from the
  anonymous limit; a forged one (any subject, wrong signature) does not, and
  a client-sent `x-abuse-subject` is never believed.
- Without jwt_authn, the upstream says it accepted the request's credential
  (`x-api-credential: valid`, client.accepted_credential_header): the token
  lifts the limit only once the API accepted it.

Limits are per 10 s so that no count depends on how fast requests go out.
"""

import base64
import hashlib
import hmac
import json
import os
import time

import pytest

from harness import DemoApi, Envoy, request

SECRET = "credentials-test-secret-0123456789abcdef"
TRUSTED = "127.0.0.0/8"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def token(sub: str, secret: str = SECRET) -> str:
    now = int(time.time())
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps({"sub": sub, "iat": now, "exp": now + 3600}, separators=(",", ":")).encode())
    signature = b64url(hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest())
    return f"{header}.{payload}.{signature}"


def config(**client) -> dict:
    return {
        "mode": "block",
        "client": {"trusted_proxies": [TRUSTED], "jwt_claim": "sub", **client},
        "route_groups": [{"name": "api", "path_prefix": "/api/"}],
        "rate": {"limits": [
            {"route_group": "api", "requests": 15, "window_s": 10, "anonymous_only": True},
            {"route_group": "api", "requests": 100, "window_s": 10},
        ]},
    }


JWT_AUTHN = [
    {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                "demo": {
                    "local_jwks": {"inline_string": json.dumps(
                        {"keys": [{"kty": "oct", "alg": "HS256", "k": b64url(SECRET.encode())}]})},
                    "payload_in_metadata": "jwt_payload",
                    "forward": True,
                }
            },
            # Verify when a token is there; a request without one (or with a
            # bad one) goes on, anonymous: the abuse filter judges it.
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                {"provider_name": "demo"}, {"allow_missing_or_failed": {}}]}}}],
        },
    },
    {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [
                {"remove": "x-abuse-subject"},
                {"append": {"header": {"key": "x-abuse-subject",
                                       "value": "%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:jwt_payload:sub)%"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}},
            ]},
        },
    },
]


@pytest.fixture(scope="module")
def api():
    os.environ["DEMO_API_SECRET"] = SECRET
    try:
        api = DemoApi()
    finally:
        os.environ.pop("DEMO_API_SECRET", None)
    yield api
    api.stop()


def refused(envoy, client: str, headers: dict, n: int = 40) -> int:
    """How many of n quick GETs to the API a client gets refused."""
    statuses = [request(envoy.port, "GET", "/api/products?page=1", {"x-forwarded-for": client, **headers}).status
                for _ in range(n)]
    assert set(statuses) <= {200, 429, 403}, statuses
    return sum(s != 200 for s in statuses)


def anonymous_cut(n_refused: int) -> bool:
    """40 requests against 15 a window: 25 refused, or a request or two
    fewer (a worker's unmerged count near the limit, see state tiers)."""
    return 40 - 15 - 2 <= n_refused <= 40 - 15


def test_a_verified_token_lifts_the_anonymous_limit_and_a_forged_one_does_not(api):
    envoy = Envoy.with_filter(config(verified_subject_header="x-abuse-subject"), api.port, pre_filters=JWT_AUTHN)
    try:
        # The verified subject reaches the application too: jwt_authn + header_mutation work.
        seen = request(envoy.port, "GET", "/debug/headers",
                       {"x-forwarded-for": "198.51.100.1", "authorization": f"Bearer {token('alice')}"}).json()
        assert seen["headers"].get("x-abuse-subject") == "alice", seen
        assert refused(envoy, "198.51.100.2", {"authorization": f"Bearer {token('alice')}"}) == 0
        # Anonymous, a forged token (right subject, wrong key), a random
        # bearer value, and a client-written x-abuse-subject: 15, then refused.
        for client, headers in [
            ("198.51.100.3", {}),
            ("198.51.100.4", {"authorization": f"Bearer {token('alice', secret='not-the-key')}"}),
            ("198.51.100.5", {"authorization": "Bearer 3b1f0e9c-invented"}),
            ("198.51.100.6", {"x-abuse-subject": "alice"}),
        ]:
            assert anonymous_cut(refused(envoy, client, headers)), headers
    finally:
        envoy.stop()


def test_a_token_lifts_the_limit_once_the_api_accepted_it(api):
    envoy = Envoy.with_filter(config(accepted_credential_header="x-api-credential"), api.port)
    try:
        # A real token: the first answers (anonymous budget) tell the filter
        # the API accepted it; from then on the keyed limit applies.
        real = {"authorization": f"Bearer {token('bob')}"}
        first = request(envoy.port, "GET", "/api/me", {"x-forwarded-for": "198.51.100.10", **real})
        assert first.status == 200 and first.headers.get("x-api-credential") == "valid"
        assert refused(envoy, "198.51.100.10", real) == 0
        # An invented token is never accepted: the anonymous limit holds.
        invented = {"authorization": f"Bearer {token('bob', secret='guessed')}"}
        assert anonymous_cut(refused(envoy, "198.51.100.11", invented))
    finally:
        envoy.stop()
