"""Spec §2G: SMART backend services (Inferno 3.2.xx, G10 bulk auth) and every assertion
negative §2G.36 asks for: bad signature, wrong ``iss``/``aud``, expired, ``exp`` more than 5
minutes ahead, replayed ``jti``, unknown ``kid``, non-whitelisted ``jku``."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest

from smart_on_fhir.client_auth import ASSERTION_TYPE, sign_client_assertion
from smart_on_fhir.keys import SigningKey, generate_signing_key

from .kit import AUTH, World

TOKEN_URL = f"{AUTH}/token"
JWKS_URL = "https://clinic.example/.well-known/jwks.json"


@pytest.fixture(scope="module")
def rs384() -> SigningKey:
    return generate_signing_key("RS384")


@pytest.fixture(scope="module")
def es384() -> SigningKey:
    return generate_signing_key("ES384")


def _public(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [dict(k.as_dict(private=False)) for k in keys]}


def _backend(world: World, *keys: SigningKey, **kwargs: Any) -> str:
    if "jwks_uri" not in kwargs:
        kwargs["jwks"] = _public(*keys)
    created = world.add_client(
        "confidential-asymmetric",
        scope=kwargs.pop("scope", "system/*.rs system/Patient.cruds"),
        redirect_uris=(),
        organization="Organization/clinic-1",
        client_name="Clinic EHR",
        **kwargs,
    )
    assert created.client.grant_types == ("client_credentials",)
    return created.client.client_id


def _request(world: World, assertion: str, **overrides: str) -> httpx.Response:
    data = {
        "grant_type": "client_credentials",
        "scope": "system/Patient.rs",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }
    data.update(overrides)
    return world.http.post(TOKEN_URL, data=data)


def _claims(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return data


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_3_2_auth_request_success_and_body(
    world: World, rs384: SigningKey, es384: SigningKey, alg: str
) -> None:
    """37 ``auth_request_success`` and 38 ``auth_response_body``; then the clinic system
    searches (G10 bulk auth), its token carrying its bound Organization."""
    key = rs384 if alg == "RS384" else es384
    cid = _backend(world, rs384, es384)
    world.add_patient()
    assertion = sign_client_assertion(key, client_id=cid, token_url=TOKEN_URL)
    r = _request(world, assertion)
    assert r.status_code in (200, 201), r.text
    body = r.json()
    assert isinstance(body["access_token"], str)
    assert body["token_type"].lower() == "bearer"
    assert isinstance(body["expires_in"], int) and body["expires_in"] <= 300
    assert body["scope"] == "system/Patient.rs"
    assert "refresh_token" not in body and "id_token" not in body
    claims = _claims(body["access_token"])
    assert claims["sub"] == claims["client_id"] == cid
    assert claims["organization"] == "Organization/clinic-1"
    assert claims["exp"] - claims["iat"] <= 300
    search = world.get("Patient?_count=5", body["access_token"])
    assert search.status_code == 200
    assert search.json()["resourceType"] == "Bundle"
    assert world.get("DocumentReference", body["access_token"]).status_code == 403


def test_3_2_invalid_grant_type(world: World, rs384: SigningKey) -> None:
    """34 ``invalid_grant_type``: 400."""
    cid = _backend(world, rs384)
    r = _request(
        world,
        sign_client_assertion(rs384, client_id=cid, token_url=TOKEN_URL),
        grant_type="not_a_grant_type",
    )
    assert r.status_code == 400
    assert r.json()["error"] == "unsupported_grant_type"


def test_3_2_invalid_client_assertion_type(world: World, rs384: SigningKey) -> None:
    """35 ``invalid_client_assertion`` (and 36 as v1.0.0 runs it): 400 or 401."""
    cid = _backend(world, rs384)
    r = _request(
        world,
        sign_client_assertion(rs384, client_id=cid, token_url=TOKEN_URL),
        client_assertion_type="not_an_assertion_type",
    )
    assert r.status_code in (400, 401)
    assert r.json()["error"] == "invalid_client"


def _bad_assertions(cid: str, key: SigningKey, other: SigningKey) -> dict[str, str]:
    now = int(time.time())
    forged = generate_signing_key("RS384")
    forged_dict = dict(forged.as_dict(private=True))
    forged_dict["kid"] = key.kid
    from joserfc.jwk import RSAKey

    impostor = RSAKey.import_key(forged_dict)
    return {
        "bad signature": sign_client_assertion(impostor, client_id=cid, token_url=TOKEN_URL),
        "wrong iss": _sign_claims(key, {"iss": "someone-else", "sub": cid, "aud": TOKEN_URL}),
        "wrong aud": sign_client_assertion(key, client_id=cid, token_url="https://testserver/fhir"),
        "expired": sign_client_assertion(
            key, client_id=cid, token_url=TOKEN_URL, now=now - 600, lifetime=120
        ),
        "exp more than 5 min ahead": sign_client_assertion(
            key, client_id=cid, token_url=TOKEN_URL, lifetime=900
        ),
        "unknown kid": sign_client_assertion(other, client_id=cid, token_url=TOKEN_URL),
        "jku not registered": sign_client_assertion(
            key,
            client_id=cid,
            token_url=TOKEN_URL,
            extra_header={"jku": "https://attacker.example/jwks.json"},
        ),
        "RS256 not allowed": sign_client_assertion(
            RSAKey.import_key({k: v for k, v in key.as_dict(private=True).items() if k != "alg"}),
            client_id=cid,
            token_url=TOKEN_URL,
            alg="RS256",
        ),
        "unknown client": sign_client_assertion(key, client_id="nobody", token_url=TOKEN_URL),
    }


def _sign_claims(key: SigningKey, claims: dict[str, Any]) -> str:
    from joserfc import jwt

    now = int(time.time())
    payload = {"iat": now, "exp": now + 120, "jti": f"j{now}{id(claims)}", **claims}
    return jwt.encode({"alg": "RS384", "kid": key.kid, "typ": "JWT"}, payload, key, ["RS384"])


def test_3_2_invalid_jwt_cases(world: World, rs384: SigningKey, es384: SigningKey) -> None:
    """36: every bad assertion → ``invalid_client`` (400 or 401)."""
    cid = _backend(world, rs384)
    for name, assertion in _bad_assertions(cid, rs384, es384).items():
        r = _request(world, assertion)
        assert r.status_code in (400, 401), name
        assert r.json()["error"] == "invalid_client", name
        assert "access_token" not in r.json(), name


def test_3_2_replayed_jti(world: World, rs384: SigningKey) -> None:
    """36: the same assertion (same ``jti``) twice → the second is ``invalid_client``."""
    cid = _backend(world, rs384)
    assertion = sign_client_assertion(rs384, client_id=cid, token_url=TOKEN_URL, jti="once")
    assert _request(world, assertion).status_code == 200
    replay = _request(world, assertion)
    assert replay.status_code in (400, 401)
    assert replay.json()["error"] == "invalid_client"


def test_scope_stays_within_registration(world: World, rs384: SigningKey) -> None:
    """backend-services.md: the granted scope SHALL stay within what was pre-authorized."""
    cid = _backend(world, rs384, scope="system/Patient.rs")
    r = _request(
        world,
        sign_client_assertion(rs384, client_id=cid, token_url=TOKEN_URL),
        scope="system/*.cruds",
    )
    assert r.status_code == 200
    assert r.json()["scope"] == "system/Patient.rs"
    r = _request(
        world,
        sign_client_assertion(rs384, client_id=cid, token_url=TOKEN_URL),
        scope="system/DocumentReference.rs",
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"


def test_jwks_uri_fetched_with_cache_and_jku(world: World, rs384: SigningKey) -> None:
    """Keys from the registered ``jwks_uri``: honours ``Cache-Control: max-age``, accepts a
    ``jku`` equal to the registered URL and refetches once for an unknown ``kid``."""
    fetched: list[str] = []
    jwks = _public(rs384)

    def handler(request: httpx.Request) -> httpx.Response:
        fetched.append(str(request.url))
        return httpx.Response(200, json=jwks, headers={"cache-control": "max-age=120"})

    smart = world.http.app.state.smart  # type: ignore[attr-defined]
    smart.jwks_fetcher._client = httpx.Client(transport=httpx.MockTransport(handler))
    cid = _backend(world, jwks_uri=JWKS_URL)
    for extra in (None, {"jku": JWKS_URL}):
        assertion = sign_client_assertion(
            rs384, client_id=cid, token_url=TOKEN_URL, extra_header=extra
        )
        assert _request(world, assertion).status_code == 200
    assert fetched == [JWKS_URL]  # cached
    rotated = generate_signing_key("RS384")
    jwks["keys"].append(dict(rotated.as_dict(private=False)))
    assertion = sign_client_assertion(rotated, client_id=cid, token_url=TOKEN_URL)
    assert _request(world, assertion).status_code == 200
    assert fetched == [JWKS_URL, JWKS_URL]


def test_public_client_cannot_use_client_credentials(world: World) -> None:
    client = world.add_client().client
    r = world.http.post(
        TOKEN_URL, data={"grant_type": "client_credentials", "client_id": client.client_id}
    )
    assert r.status_code in (400, 401)
    assert r.json()["error"] in ("invalid_client", "unauthorized_client")
