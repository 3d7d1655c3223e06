"""The resource server's cache of verified claims (``SmartResourceProtector``): a repeat token
is a look-up, but never past its ``exp``, never for another audience or issuer, and never
after the key set changed (a removed key stops its tokens at once)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from fhir_consent.auth import smart_authenticator
from fhir_consent.errors import Unauthorized
from smart_on_fhir import KeySet, issue_access_token
from smart_on_fhir.protect import AuthenticationRequired, SmartResourceProtector
from smart_on_fhir.server import Urls

ISSUER = "https://fhir.example.org/r4"
FHIR = "https://fhir.example.org/r4"
NOW = 1_700_000_000


def _token(keys: KeySet, jti: str = "j1", lifetime: int = 300) -> str:
    return issue_access_token(
        keys,
        issuer=ISSUER,
        audience=FHIR,
        subject="user-1",
        client_id="app",
        scope="patient/*.rs",
        lifetime_s=lifetime,
        now=NOW,
        jti=jti,
        patient="p1",
    )


def _auth(
    protector: SmartResourceProtector, token: str, *, now: int = NOW + 5, aud: str = FHIR
) -> str:
    claims = protector.authenticate(
        {"Authorization": f"Bearer {token}"}, audience=aud, issuer=ISSUER, now=now
    )
    return claims.jti


def _reason(protector: SmartResourceProtector, token: str, **kwargs: int | str) -> str | None:
    with pytest.raises(AuthenticationRequired) as caught:
        _auth(protector, token, **kwargs)  # type: ignore[arg-type]
    return caught.value.reason


def test_repeat_token_is_served_from_the_cache_until_exp() -> None:
    keys = KeySet.generate(["RS256"])
    protector = SmartResourceProtector(lambda: keys)
    token = _token(keys)
    first = protector.authenticate(
        {"Authorization": f"Bearer {token}"}, audience=FHIR, issuer=ISSUER, now=NOW + 5
    )
    again = protector.authenticate(
        {"Authorization": f"Bearer {token}"}, audience=FHIR, issuer=ISSUER, now=NOW + 6
    )
    assert again is first  # the very claims object: no second verification
    assert "patient/*.rs" in str(again.scopes)
    assert _reason(protector, token, now=NOW + 300 + 31) == "expired"  # leeway 30 s
    assert _reason(protector, token, aud="https://other.example.org/fhir") == "wrong_audience"


def test_a_new_key_set_verifies_again() -> None:
    keys = KeySet.generate(["RS256"])
    current = {"keys": keys}
    protector = SmartResourceProtector(lambda: current["keys"])
    token = _token(keys)
    assert _auth(protector, token) == "j1"
    rotated = keys.rotate("RS256")
    current["keys"] = rotated
    assert _auth(protector, token) == "j1"  # the retired key still verifies
    old_kid = keys.signing_key("RS256").kid
    assert old_kid is not None
    current["keys"] = rotated.remove(old_kid)
    assert _reason(protector, token) == "unknown_kid"  # not the cached claims


def test_cache_is_bounded() -> None:
    keys = KeySet.generate(["RS256"])
    protector = SmartResourceProtector(lambda: keys, cache_size=2)
    tokens = [_token(keys, jti=f"j{i}") for i in range(4)]
    assert [_auth(protector, t) for t in tokens] == ["j0", "j1", "j2", "j3"]
    assert len(protector._verified) == 2
    uncached = SmartResourceProtector(lambda: keys, cache_size=0)
    assert _auth(uncached, tokens[0]) == "j0" and not uncached._verified


def test_the_fhir_layer_maps_a_repeat_token_to_the_same_access_context() -> None:
    """``fhir_consent.auth.smart_authenticator`` keeps the context of each claims object:
    the same token is the same context, a new token (or an expired one) is not served from
    it, and the context names what the token says."""
    keys = KeySet.generate(["RS256"])
    protector = SmartResourceProtector(lambda: keys)
    now = [NOW + 5]
    urls = Urls.derive(FHIR, fhir_path="/r4")
    authenticate = smart_authenticator(protector, lambda _r: urls, lambda: now[0])

    def call(token: str) -> object:
        scope = {
            "type": "http",
            "headers": [(b"authorization", f"Bearer {token}".encode())],
        }
        return asyncio.run(authenticate(Request(scope)))

    first, second = _token(keys, "j1"), _token(keys, "j2")
    a = call(first)
    assert call(first) is a
    b = call(second)
    assert b is not a and (b.jti, a.jti) == ("j2", "j1")  # type: ignore[attr-defined]
    assert a.patient == "p1" and a.client_id == "app"  # type: ignore[attr-defined]
    now[0] = NOW + 300 + 31
    with pytest.raises(Unauthorized):
        call(first)  # expired: the protector refuses it before any context is looked up


def test_the_fhir_layers_repeat_look_up_checks_what_the_protector_checks() -> None:
    """``smart_authenticator`` serves a repeat request by its raw ``Authorization`` header
    and FHIR base: never after the key set changed in a way the protector would refuse,
    never past ``exp``, never for another base (audience), and a header it has not seen
    (another spelling of the same token) is verified by the protector."""
    keys = KeySet.generate(["RS256"])
    current = {"keys": keys}
    protector = SmartResourceProtector(lambda: current["keys"])
    now = [NOW + 5]
    bases = {"base": FHIR}
    authenticate = smart_authenticator(
        protector, lambda _r: Urls.derive(bases["base"], fhir_path="/r4"), lambda: now[0]
    )

    def call(header: str) -> object:
        scope = {"type": "http", "headers": [(b"authorization", header.encode())]}
        return asyncio.run(authenticate(Request(scope)))

    def refused(header: str) -> str:
        with pytest.raises(Unauthorized) as caught:
            call(header)
        return str(caught.value.headers.get("WWW-Authenticate"))

    token = _token(keys)
    a = call(f"Bearer {token}")
    assert call(f"Bearer {token}") is a
    assert call(f"bearer   {token} ") is a  # another spelling: verified, the same context
    bases["base"] = "https://other.example.org/r4"
    assert "invalid_token" in refused(f"Bearer {token}")  # another audience
    bases["base"] = FHIR
    assert call(f"Bearer {token}") is a
    rotated = keys.rotate("RS256")
    current["keys"] = rotated
    assert call(f"Bearer {token}") == a  # the retired key still verifies (verified anew)
    old_kid = keys.signing_key("RS256").kid
    assert old_kid is not None
    current["keys"] = rotated.remove(old_kid)
    assert "invalid_token" in refused(f"Bearer {token}")  # its key is gone
    current["keys"] = keys
    assert call(f"Bearer {token}") == a
    now[0] = NOW + 300 + 31
    assert "invalid_token" in refused(f"Bearer {token}")  # expired

    uncached = SmartResourceProtector(lambda: keys, cache_size=0)
    now[0] = NOW + 5
    authenticate = smart_authenticator(
        uncached, lambda _r: Urls.derive(FHIR, fhir_path="/r4"), lambda: now[0]
    )
    first = call(f"Bearer {token}")
    assert call(f"Bearer {token}") is not first  # a protector that keeps nothing: verified anew
