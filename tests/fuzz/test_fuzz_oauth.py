"""Bad input against the SMART authorization server and the token check (issue 8 §2).

The whole server with SMART on (no open access), on SQLite and PostgreSQL. Hypothesis sends
hostile forms to the token, introspection and revocation endpoints, hostile client metadata to
dynamic registration, hostile authorize parameters, and hostile ``Authorization`` headers to
the FHIR API. Answers are never 5xx; the OAuth endpoints answer RFC 6749 §5.2 / RFC 7591 §3.2.2
JSON errors, the FHIR API an OperationOutcome with ``WWW-Authenticate: Bearer`` (RFC 6750 §3);
nothing the authorization server stores (clients, codes, tokens) changes on a refused request.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from fuzz_kit import (
    BASE,
    EXAMPLES,
    NASTY_STRINGS,
    assert_fhir_error,
    assert_no_leak,
    assert_oauth_error,
)
from fuzz_kit import full_app as _full_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smart_on_fhir.clients import create_client
from smart_on_fhir.keys import KeySet
from smart_on_fhir.tables import metadata as smart_metadata

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FORM = {"content-type": "application/x-www-form-urlencoded"}
hostile = st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=40))


class OAuth:
    def __init__(self, client: TestClient, engine: sa.Engine, client_id: str, secret: str):
        self.client = client
        self.engine = engine
        self.client_id = client_id
        self.secret = secret
        self.before = self.counts()

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
                for t in smart_metadata.sorted_tables
            }

    def unchanged(self) -> None:
        assert self.counts() == self.before


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smart") / "keys"
    KeySet.generate().save(path)
    return path


@pytest.fixture
def oauth(db_url: str, tmp_path: Path, keys_dir: Path) -> Iterator[OAuth]:
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    if db_url.startswith("postgresql"):  # the session's schema is shared: start empty
        with engine.begin() as conn:
            for table in reversed(smart_metadata.sorted_tables):
                conn.execute(table.delete())
    app = _full_app(db_url, tmp_path, open_access=False, smart_keys_dir=str(keys_dir))
    with TestClient(app, base_url=BASE) as client:
        with engine.begin() as conn:
            made = create_client(
                conn,
                client_name="Fuzz clinic",
                client_type="confidential-symmetric",
                redirect_uris=["https://app.example.org/cb"],
                scope="openid fhirUser launch/patient patient/*.rs offline_access",
                now=1_700_000_000,
            )
        assert made.client_secret is not None
        yield OAuth(client, engine, made.client.client_id, made.client_secret)
    engine.dispose()


def _basic(user: str, password: str) -> str:
    raw = f"{user}:{password}".encode("utf-8", "surrogatepass")
    return "Basic " + base64.b64encode(raw).decode()


@FUZZ
@given(
    grant=st.sampled_from(
        ["authorization_code", "refresh_token", "client_credentials", "password", "implicit", ""]
    )
    | hostile,
    fields=st.dictionaries(
        st.sampled_from(
            [
                "code",
                "redirect_uri",
                "code_verifier",
                "client_id",
                "client_secret",
                "client_assertion_type",
                "client_assertion",
                "scope",
                "refresh_token",
                "aud",
            ]
        ),
        hostile,
        max_size=5,
    ),
    auth=st.sampled_from(["none", "good", "hostile", "malformed"]),
    hostile_user=hostile,
)
def test_token_endpoint(
    oauth: OAuth, grant: str, fields: dict[str, str], auth: str, hostile_user: str
) -> None:
    headers = dict(FORM)
    if auth == "good":
        headers["authorization"] = _basic(oauth.client_id, oauth.secret)
    elif auth == "hostile":
        headers["authorization"] = _basic(hostile_user, hostile_user)
    elif auth == "malformed":
        headers["authorization"] = "Basic " + hostile_user.encode("latin-1", "replace").decode(
            "latin-1"
        ).replace("\r", "").replace("\n", "")
    data = {"grant_type": grant, **fields}
    try:
        r = oauth.client.post("/auth/token", data=data, headers=headers)
    except UnicodeEncodeError:  # a header value httpx will not send
        return
    assert_oauth_error(r)
    assert r.status_code in (400, 401), r.text[:300]
    oauth.unchanged()


@FUZZ
@given(
    endpoint=st.sampled_from(["/auth/introspect", "/auth/revoke"]),
    token=hostile,
    hint=st.sampled_from(["access_token", "refresh_token", "x"]) | hostile,
    good_client=st.booleans(),
)
def test_introspection_and_revocation(
    oauth: OAuth, endpoint: str, token: str, hint: str, good_client: bool
) -> None:
    headers = dict(FORM)
    if good_client:
        headers["authorization"] = _basic(oauth.client_id, oauth.secret)
    r = oauth.client.post(endpoint, data={"token": token, "token_type_hint": hint}, headers=headers)
    assert_oauth_error(r)
    if good_client and endpoint == "/auth/introspect" and r.status_code == 200:
        assert r.json() == {"active": False}
    oauth.unchanged()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)


@FUZZ
@given(
    metadata=st.dictionaries(
        st.sampled_from(
            [
                "redirect_uris",
                "grant_types",
                "response_types",
                "token_endpoint_auth_method",
                "client_name",
                "scope",
                "jwks",
                "jwks_uri",
                "contacts",
                "logo_uri",
                "software_statement",
            ]
        ),
        json_values | hostile | st.lists(hostile, max_size=3),
        max_size=6,
    )
    | json_values
)
def test_dynamic_registration(oauth: OAuth, metadata: Any) -> None:
    r = oauth.client.post(
        "/auth/register",
        content=orjson.dumps(metadata),
        headers={"content-type": "application/json"},
    )
    assert_oauth_error(r)
    if r.status_code >= 400:
        oauth.unchanged()
    else:
        assert r.status_code == 201
        oauth.before = oauth.counts()


@FUZZ
@given(
    params=st.dictionaries(
        st.sampled_from(
            [
                "response_type",
                "client_id",
                "redirect_uri",
                "scope",
                "state",
                "aud",
                "code_challenge",
                "code_challenge_method",
                "launch",
            ]
        ),
        hostile,
        max_size=9,
    ),
    good_client=st.booleans(),
)
def test_authorize_parameters(oauth: OAuth, params: dict[str, str], good_client: bool) -> None:
    if good_client:
        params["client_id"] = oauth.client_id
    r = oauth.client.get("/auth/authorize", params=params, follow_redirects=False)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    assert_no_leak(r)
    if r.status_code in (302, 303):
        assert r.headers["location"].startswith(("https://app.example.org/cb", "/", BASE))
    oauth.unchanged()


@FUZZ
@given(
    scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", "", "Bearer  ", "DPoP "]),
    token=st.one_of(
        hostile,
        st.sampled_from(
            [
                "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
                "eyJhbGciOiJIUzI1NiJ9.e30.ZmFrZQ",
                "a.b.c",
                "...",
                "eyJ" * 300,
            ]
        ),
    ),
    path=st.sampled_from(
        ["/fhir/Patient", "/fhir/Patient/p1", "/fhir/Binary/b1", "/fhir/Consent?patient=p1"]
    ),
)
def test_hostile_bearer_tokens_are_401(oauth: OAuth, scheme: str, token: str, path: str) -> None:
    value = (scheme + token).encode("utf-8", "replace")
    if b"\r" in value or b"\n" in value or b"\x00" in value:
        value = value.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
    r = oauth.client.get(path, headers={"authorization": value, "accept": "application/fhir+json"})
    assert_fhir_error(r)
    assert r.status_code == 401, r.text[:300]
    assert r.headers["www-authenticate"].startswith("Bearer")
    oauth.unchanged()


@FUZZ
@given(
    endpoint=st.sampled_from(["/auth/interact", "/auth/manage"]),
    fields=st.dictionaries(
        st.sampled_from(["txn", "step", "username", "password", "patient", "decision", "client"]),
        hostile,
        max_size=5,
    ),
)
def test_login_forms(oauth: OAuth, endpoint: str, fields: dict[str, str]) -> None:
    r = oauth.client.post(endpoint, data=fields, headers=FORM, follow_redirects=False)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    assert_no_leak(r, [v for v in fields.values() if len(v) >= 6 and "<" not in v])
    oauth.unchanged()


def test_registration_nesting_and_nul(oauth: OAuth) -> None:
    deep = b'{"client_name":' + b"[" * 5000 + b"]" * 5000 + b"}"
    for body in (deep, b'{"client_name":"a\\u0000b","redirect_uris":["https://x.example/cb"]}'):
        r = oauth.client.post(
            "/auth/register", content=body, headers={"content-type": "application/json"}
        )
        assert_oauth_error(r)
        assert r.status_code == 400
    oauth.unchanged()


@pytest.mark.parametrize(
    "metadata",
    [
        {"jwks": {}},
        {"jwks": {"keys": "x"}},
        {"jwks": {"keys": [1]}},
        {"jwks": {"keys": [{"kty": "RSA"}]}},
        {"redirect_uris": ["https://x.example/cb"], '\x00"bad': "\x00"},
        {"redirect_uris": ["https://x.example/cb"], "client_name": '"\\\x07'},
    ],
)
def test_malformed_registration_metadata(oauth: OAuth, metadata: dict[str, Any]) -> None:
    """Found by a deep run: a ``jwks`` without ``keys`` crashed joserfc (KeyError)."""
    r = oauth.client.post(
        "/auth/register",
        content=orjson.dumps(metadata),
        headers={"content-type": "application/json"},
    )
    assert_oauth_error(r)
    assert r.status_code in (201, 400)
