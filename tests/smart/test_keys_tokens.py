"""Signing keys, RFC 9068 access tokens and id_tokens: round trips and every negative case."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from smart_on_fhir import (
    TOKEN_ERROR_REASONS,
    InvalidToken,
    KeySet,
    KeyStoreError,
    SmartError,
    VerificationKeys,
    at_hash,
    generate_signing_key,
    issue_access_token,
    issue_id_token,
    parse_scopes,
    verify_access_token,
    verify_id_token,
)

ISSUER = "https://auth.example.org/smart"
FHIR = "https://fhir.example.org/r4"
NOW = 1_700_000_000
SCOPE = "launch/patient openid fhirUser patient/*.rs offline_access"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi"}


@pytest.fixture(scope="module")
def keyset() -> KeySet:
    return KeySet.generate()


@pytest.fixture(scope="module")
def other_keyset() -> KeySet:
    return KeySet.generate(["RS256"])


def _token(keyset: KeySet, **overrides: Any) -> str:
    args: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": FHIR,
        "subject": "user-1",
        "client_id": "growth-chart",
        "scope": SCOPE,
        "lifetime_s": 300,
        "now": NOW,
        "jti": "jti-1",
        "patient": "pat-1",
        "fhir_user": "Patient/pat-1",
    }
    args.update(overrides)
    return issue_access_token(keyset, **args)


def _verify(token: str, source: Any, **overrides: Any) -> Any:
    args: dict[str, Any] = {
        "keyset_or_jwks": source,
        "issuer": ISSUER,
        "audience": FHIR,
        "now": NOW + 10,
    }
    args.update(overrides)
    return verify_access_token(token, **args)


def _reason(token: str, source: Any, **overrides: Any) -> str:
    with pytest.raises(InvalidToken) as caught:
        _verify(token, source, **overrides)
    assert caught.value.reason in TOKEN_ERROR_REASONS
    assert isinstance(caught.value, SmartError)
    return caught.value.reason


def _segments(token: str) -> list[str]:
    return token.split(".")


def _b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(segment: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    )
    return decoded


# -- keys ------------------------------------------------------------------------------------


def test_generated_set_has_rs256_and_es384(keyset: KeySet) -> None:
    assert keyset.algorithms == ("RS256", "ES384")
    rsa, ec = keyset.signing_key("RS256"), keyset.signing_key("ES384")
    assert isinstance(rsa, RSAKey) and isinstance(ec, ECKey) and ec.curve_name == "P-384"
    assert rsa.kid == rsa.thumbprint()  # RFC 7638 kid
    with pytest.raises(KeyStoreError):
        keyset.signing_key("HS256")


def test_jwks_is_public_only(keyset: KeySet) -> None:
    jwks = keyset.jwks()
    assert [k["kid"] for k in jwks["keys"]] == list(keyset.kids)
    for key in jwks["keys"]:
        assert not PRIVATE_MEMBERS & set(key)
        assert key["use"] == "sig" and key["alg"] in ("RS256", "ES384")
    rsa = [k for k in jwks["keys"] if k["kty"] == "RSA"]
    assert RSAKey.import_key(rsa[0]).is_private is False  # Inferno smart_openid_retrieve_jwks
    json.dumps(jwks)


def test_repr_and_errors_never_show_private_material(keyset: KeySet) -> None:
    private = keyset.export_private_jwks()
    secrets = [k["d"] for k in private["keys"]]
    assert len(secrets) == 2
    for text in (repr(keyset), str(keyset), repr(keyset.verifier)):
        assert not any(secret in text for secret in secrets)
    broken = json.dumps(private)[:-5]
    with pytest.raises(KeyStoreError) as caught:
        KeySet.from_jwks(broken)
    assert not any(secret in str(caught.value) for secret in secrets)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_private_jwks_round_trip(keyset: KeySet) -> None:
    again = KeySet.from_jwks(keyset.export_private_jwks())
    assert again.kids == keyset.kids and again.algorithms == keyset.algorithms
    token = _token(keyset)
    assert _verify(token, again).jti == "jti-1"


def test_from_jwks_first_private_key_per_alg_is_current(keyset: KeySet) -> None:
    newer = generate_signing_key("RS256")
    older = keyset.signing_key("RS256")
    oldest = generate_signing_key("RS256")
    jwks = {
        "keys": [
            oldest.as_dict(private=False),  # public only: can only be retired
            newer.as_dict(private=True),
            older.as_dict(private=True),
        ]
    }
    loaded = KeySet.from_jwks(json.dumps(jwks))
    assert loaded.signing_key("RS256").kid == newer.kid
    assert loaded.kids == (newer.kid, oldest.kid, older.kid)
    with pytest.raises(KeyStoreError, match="duplicate kid"):
        KeySet.from_jwks({"keys": [newer.as_dict(private=True), newer.as_dict(private=False)]})
    with pytest.raises(KeyStoreError):
        KeySet.from_jwks({"keys": [older.as_dict(private=False)]})


def test_from_jwks_infers_alg_and_kid() -> None:
    raw = generate_signing_key("ES384").as_dict(private=True)
    del raw["alg"], raw["kid"]
    loaded = KeySet.from_jwks({"keys": [raw]})
    assert loaded.algorithms == ("ES384",)
    assert loaded.kids == (loaded.signing_key("ES384").thumbprint(),)


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        "[]",
        json.dumps({"keys": "nope"}),
        json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}),
        json.dumps({"keys": [{"kty": "RSA", "alg": "RS256", "n": "AQAB"}]}),
        json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}]}),
        json.dumps({"keys": ["string"]}),
    ],
)
def test_from_jwks_rejects_bad_input(bad: str) -> None:
    with pytest.raises(KeyStoreError):
        KeySet.from_jwks(bad)


def test_from_jwks_rejects_enc_keys_and_bad_kids() -> None:
    raw = generate_signing_key("RS256").as_dict(private=True)
    with pytest.raises(KeyStoreError):
        KeySet.from_jwks({"keys": [{**raw, "use": "enc"}]})
    with pytest.raises(KeyStoreError):
        KeySet.from_jwks({"keys": [{**raw, "kid": "../etc/passwd"}]})
    with pytest.raises(KeyStoreError):
        KeySet.from_jwks({"keys": [{**raw, "alg": "ES384"}]})


def test_from_env(keyset: KeySet) -> None:
    env = {"SMART_JWKS": json.dumps(keyset.export_private_jwks())}
    assert KeySet.from_env(environ=env).kids == keyset.kids
    with pytest.raises(KeyStoreError, match="MY_JWKS is not set"):
        KeySet.from_env("MY_JWKS", environ={})
    with pytest.raises(KeyStoreError, match="^SMART_JWKS: "):
        KeySet.from_env(environ={"SMART_JWKS": "{"})


def test_generation_limits() -> None:
    with pytest.raises(KeyStoreError):
        generate_signing_key("RS256", rsa_bits=1024)
    with pytest.raises(KeyStoreError):
        generate_signing_key("HS256")
    with pytest.raises(KeyStoreError):
        KeySet([generate_signing_key("RS256"), generate_signing_key("RS256")])
    public = RSAKey.import_key(generate_signing_key("RS256").as_dict(private=False))
    with pytest.raises(KeyStoreError):
        KeySet([public])


def test_save_and_load_directory(tmp_path: Path, keyset: KeySet) -> None:
    rotated = keyset.rotate("RS256")
    directory = tmp_path / "keys"
    rotated.save(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(p.name for p in directory.iterdir())
    assert files == sorted([f"{kid}.jwk.json" for kid in rotated.kids] + ["keyset.json"])
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = KeySet.load(directory)
    assert loaded.kids == rotated.kids
    assert loaded.signing_key("RS256").kid == rotated.signing_key("RS256").kid
    assert loaded.jwks() == rotated.jwks()
    # removing a key and saving again deletes its file
    old_kid = keyset.signing_key("RS256").kid
    assert isinstance(old_kid, str)
    loaded.remove(old_kid).save(directory)
    assert not (directory / f"{old_kid}.jwk.json").exists()
    assert KeySet.load(directory).get(old_kid) is None


def test_load_refuses_readable_key_files(tmp_path: Path, keyset: KeySet) -> None:
    keyset.save(tmp_path)
    kid = keyset.signing_key("RS256").kid
    os.chmod(tmp_path / f"{kid}.jwk.json", 0o644)
    with pytest.raises(KeyStoreError, match="too open"):
        KeySet.load(tmp_path)
    assert KeySet.load(tmp_path, strict_permissions=False).kids == keyset.kids


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="keyset.json"):
        KeySet.load(tmp_path)
    (tmp_path / "keyset.json").write_text('{"current": {"RS256": "missing"}}')
    with pytest.raises(KeyStoreError, match="missing.jwk.json"):
        KeySet.load(tmp_path)


# -- access tokens ---------------------------------------------------------------------------


def test_access_token_round_trip(keyset: KeySet) -> None:
    token = _token(keyset, encounter="enc-1", extra_claims={"tenant": "t1"})
    header = _unb64(_segments(token)[0])
    assert header == {"alg": "RS256", "kid": keyset.signing_key("RS256").kid, "typ": "at+jwt"}
    payload = _unb64(_segments(token)[1])
    assert payload["exp"] - payload["iat"] == 300
    for claim in ("iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope"):
        assert claim in payload  # RFC 9068 §2.2
    claims = _verify(token, keyset)
    assert claims.issuer == ISSUER and claims.subject == "user-1"
    assert claims.audience == (FHIR,) and claims.client_id == "growth-chart"
    assert claims.scope == SCOPE and claims.scopes == parse_scopes(SCOPE)
    assert (claims.issued_at, claims.expires_at) == (NOW, NOW + 300)
    assert claims.patient == "pat-1" and claims.fhir_user == "Patient/pat-1"
    assert claims.encounter == "enc-1" and claims.extra == {"tenant": "t1"}
    assert claims.kid == keyset.signing_key("RS256").kid


def test_optional_context_claims_are_omitted(keyset: KeySet) -> None:
    token = _token(keyset, patient=None, fhir_user=None, subject="backend", client_id="backend")
    payload = _unb64(_segments(token)[1])
    assert "patient" not in payload and "fhirUser" not in payload
    claims = _verify(token, keyset)
    assert claims.patient is None and claims.fhir_user is None


def test_scope_set_and_datetime_are_accepted(keyset: KeySet) -> None:
    when = datetime.fromtimestamp(NOW, tz=UTC)
    token = _token(keyset, scope=parse_scopes("patient/*.read"), now=when)
    claims = _verify(token, keyset, now=datetime.fromtimestamp(NOW + 5, tz=UTC))
    assert claims.scope == "patient/*.read" and claims.issued_at == NOW
    with pytest.raises(ValueError):
        _token(keyset, now=datetime(2024, 1, 1))  # naive
    with pytest.raises(ValueError):
        _token(keyset, lifetime_s=0)
    with pytest.raises(ValueError):
        _token(keyset, extra_claims={"scope": "user/*.*"})


def test_es384_access_token(keyset: KeySet) -> None:
    token = _token(keyset, alg="ES384")
    assert _unb64(_segments(token)[0])["alg"] == "ES384"
    assert _verify(token, keyset).jti == "jti-1"


def test_verifies_from_a_jwks_mapping(keyset: KeySet) -> None:
    token = _token(keyset)
    assert _verify(token, keyset.jwks()).subject == "user-1"
    assert _verify(token, VerificationKeys.from_jwks(keyset.jwks())).subject == "user-1"


def test_audience_list_and_trailing_slash(keyset: KeySet) -> None:
    token = _token(keyset, audience=FHIR + "/")
    assert _verify(token, keyset).audience == (FHIR + "/",)
    assert _verify(token, keyset, audience=["https://other", FHIR]).subject == "user-1"


def test_tampered_payload(keyset: KeySet) -> None:
    header, payload, signature = _segments(_token(keyset))
    claims = _unb64(payload)
    claims["scope"] = "user/*.cruds"
    assert _reason(f"{header}.{_b64(claims)}.{signature}", keyset) == "bad_signature"


def test_tampered_signature(keyset: KeySet) -> None:
    header, payload, signature = _segments(_token(keyset))
    flipped = ("A" if signature[10] != "A" else "B").join((signature[:10], signature[11:]))
    assert _reason(f"{header}.{payload}.{flipped}", keyset) == "bad_signature"
    assert _reason(f"{header}.{payload}.", keyset) == "bad_signature"


def test_alg_none_is_refused(keyset: KeySet) -> None:
    _, payload, _ = _segments(_token(keyset))
    kid = keyset.signing_key("RS256").kid
    for alg in ("none", "None", "NONE"):
        header = _b64({"alg": alg, "typ": "at+jwt", "kid": kid})
        assert _reason(f"{header}.{payload}.", keyset) == "unsupported_alg"


def test_hmac_with_the_public_key_is_refused(keyset: KeySet) -> None:
    """The classic RS256 → HS256 confusion: sign with the public key as HMAC secret."""
    public_pem = keyset.signing_key("RS256").as_pem(private=False)
    kid = keyset.signing_key("RS256").kid
    claims = _unb64(_segments(_token(keyset))[1])
    signing_input = f"{_b64({'alg': 'HS256', 'kid': kid, 'typ': 'at+jwt'})}.{_b64(claims)}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    assert _reason(f"{signing_input}.{_b64(mac)}", keyset) == "unsupported_alg"
    assert _reason(f"{signing_input}.{_b64(mac)}", keyset.jwks()) == "unsupported_alg"


def test_alg_must_match_the_key(keyset: KeySet) -> None:
    header, payload, signature = _segments(_token(keyset))
    swapped = _b64({**_unb64(header), "alg": "ES384"})
    assert _reason(f"{swapped}.{payload}.{signature}", keyset) == "unsupported_alg"


def test_unknown_kid(keyset: KeySet, other_keyset: KeySet) -> None:
    assert _reason(_token(other_keyset), keyset) == "unknown_kid"
    header, payload, signature = _segments(_token(keyset))
    no_kid = _b64({k: v for k, v in _unb64(header).items() if k != "kid"})
    assert _reason(f"{no_kid}.{payload}.{signature}", keyset) == "unknown_kid"  # 2 keys


def test_missing_kid_is_fine_with_a_single_key(other_keyset: KeySet) -> None:
    key = other_keyset.signing_key("RS256")
    claims = _unb64(_segments(_token(other_keyset))[1])
    token = jwt.encode({"alg": "RS256", "typ": "at+jwt"}, claims, key, ["RS256"])
    assert _verify(token, other_keyset).subject == "user-1"


def test_expired_with_injected_clock(keyset: KeySet) -> None:
    token = _token(keyset)  # exp = NOW + 300
    assert _verify(token, keyset, now=NOW + 300 + 29).jti == "jti-1"  # default leeway 30 s
    assert _reason(token, keyset, now=NOW + 300 + 30) == "expired"
    assert _reason(token, keyset, now=NOW + 301, leeway=0) == "expired"
    assert _reason(token, keyset, now=NOW + 10_000) == "expired"


def test_not_yet_valid(keyset: KeySet) -> None:
    token = _token(keyset, now=NOW + 100)
    assert _reason(token, keyset, now=NOW) == "not_yet_valid"
    assert _verify(token, keyset, now=NOW + 75).jti == "jti-1"
    with pytest.raises(ValueError):
        _token(keyset, extra_claims={"nbf": NOW})


def test_wrong_audience_and_issuer(keyset: KeySet) -> None:
    token = _token(keyset)
    assert _reason(token, keyset, audience="https://fhir.example.org/other") == "wrong_audience"
    assert _reason(token, keyset, issuer="https://evil.example") == "wrong_issuer"


def test_wrong_typ(keyset: KeySet) -> None:
    id_token = issue_id_token(
        keyset, issuer=ISSUER, client_id=FHIR, subject="user-1", lifetime_s=300, now=NOW
    )
    assert _reason(id_token, keyset) == "wrong_typ"  # an id_token is not an access token
    key = keyset.signing_key("RS256")
    claims = _unb64(_segments(_token(keyset))[1])
    plain = jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key, ["RS256"])
    assert _reason(plain, keyset) == "wrong_typ"  # typ JWT
    media = jwt.encode(
        {"alg": "RS256", "kid": key.kid, "typ": "application/at+jwt"}, claims, key, ["RS256"]
    )
    assert _verify(media, keyset).jti == "jti-1"


def test_missing_claims(keyset: KeySet) -> None:
    key = keyset.signing_key("RS256")
    full = _unb64(_segments(_token(keyset))[1])
    for claim in ("iss", "sub", "aud", "exp", "iat", "jti", "client_id"):
        claims = {k: v for k, v in full.items() if k != claim}
        token = jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "at+jwt"}, claims, key)
        assert _reason(token, keyset) == "missing_claim", claim
    weird = {**full, "exp": "tomorrow"}
    token = jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "at+jwt"}, weird, key)
    assert _reason(token, keyset) == "missing_claim"


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c.d", "!!!.e30.e30", "e30.e30.e30", "eyJ.e30.sig", "é.e30.e30"],
)
def test_malformed_tokens(keyset: KeySet, token: str) -> None:
    assert _reason(token, keyset) in {"malformed", "unsupported_alg"}


def test_oversized_and_non_string_tokens(keyset: KeySet) -> None:
    assert _reason("a" * 20_000 + ".b.c", keyset) == "malformed"
    assert _reason(None, keyset) == "malformed"  # type: ignore[arg-type]


def test_crit_header_is_refused(keyset: KeySet) -> None:
    key = keyset.signing_key("RS256")
    claims = _unb64(_segments(_token(keyset))[1])
    header, payload, _ = _segments(
        jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "at+jwt"}, claims, key)
    )
    crit = _b64({**_unb64(header), "crit": ["exp"], "exp": 1})
    signing_input = f"{crit}.{payload}".encode()
    from joserfc.jws import JWSRegistry

    signature = _b64(JWSRegistry.algorithms["RS256"].sign(signing_input, key))
    assert _reason(f"{crit}.{payload}.{signature}", keyset) == "malformed"


def test_rotated_key_verifies_old_tokens_until_removed(keyset: KeySet) -> None:
    old_token = _token(keyset)
    rotated = keyset.rotate("RS256")
    old_kid = keyset.signing_key("RS256").kid
    assert isinstance(old_kid, str)
    assert rotated.signing_key("RS256").kid != old_kid
    assert rotated.kids[-1] == old_kid  # retired keys follow current ones
    assert old_kid in {k["kid"] for k in rotated.jwks()["keys"]}
    new_token = _token(rotated)
    assert _unb64(_segments(new_token)[0])["kid"] == rotated.signing_key("RS256").kid
    assert _verify(old_token, rotated).jti == "jti-1"
    assert _verify(new_token, rotated).jti == "jti-1"
    with pytest.raises(KeyStoreError):
        rotated.remove(rotated.signing_key("RS256").kid or "")
    with pytest.raises(KeyStoreError):
        rotated.remove("no-such-kid")
    pruned = rotated.remove(old_kid)
    assert _reason(old_token, pruned) == "unknown_kid"
    assert _verify(new_token, pruned).jti == "jti-1"
    assert _verify(old_token, keyset).jti == "jti-1"  # the original set is unchanged


def test_rotate_with_a_given_key(keyset: KeySet) -> None:
    new_key = generate_signing_key("ES384")
    rotated = keyset.rotate("ES384", new_key=new_key)
    assert rotated.signing_key("ES384") is new_key
    with pytest.raises(KeyStoreError):
        keyset.rotate("RS256", new_key=new_key)


def test_signature_cache_is_bounded_and_still_checks_claims(keyset: KeySet) -> None:
    verifier = VerificationKeys([keyset.signing_key("RS256")], cache_size=2)
    tokens = [_token(keyset, jti=f"j{i}") for i in range(4)]
    for index, token in enumerate(tokens):
        assert _verify(token, verifier).jti == f"j{index}"
    assert len(verifier._cache) == 2
    assert _verify(tokens[-1], verifier, now=NOW + 10).jti == "j3"
    assert _reason(tokens[-1], verifier, now=NOW + 10_000) == "expired"  # a cache hit
    assert _reason(tokens[-1], verifier, audience="https://other") == "wrong_audience"
    uncached = VerificationKeys([keyset.signing_key("RS256")], cache_size=0)
    assert _verify(tokens[0], uncached).jti == "j0" and not uncached._cache


def test_verifier_respects_allowed_algorithms(keyset: KeySet) -> None:
    rs_only = VerificationKeys(
        [keyset.signing_key("RS256"), keyset.signing_key("ES384")], algorithms=["RS256"]
    )
    assert rs_only.kids == {keyset.signing_key("RS256").kid}
    assert _reason(_token(keyset, alg="ES384"), rs_only) == "unknown_kid"
    with pytest.raises(KeyStoreError):
        VerificationKeys([], algorithms=["none"])


# -- id tokens -------------------------------------------------------------------------------


def test_id_token(keyset: KeySet) -> None:
    access = _token(keyset)
    token = issue_id_token(
        keyset,
        issuer=ISSUER,
        client_id="growth-chart",
        subject="user-1",
        lifetime_s=300,
        now=NOW,
        fhir_user="https://fhir.example.org/r4/Patient/pat-1",
        nonce="n-0S6",
        access_token=access,
        auth_time=NOW - 5,
    )
    header = _unb64(_segments(token)[0])
    assert header == {"alg": "RS256", "kid": keyset.signing_key("RS256").kid, "typ": "JWT"}
    claims = verify_id_token(
        token,
        keyset_or_jwks=keyset.jwks(),
        issuer=ISSUER,
        client_id="growth-chart",
        now=NOW + 60,
        nonce="n-0S6",
    )
    assert claims["aud"] == "growth-chart" and claims["sub"] == "user-1"
    assert claims["fhirUser"].endswith("/Patient/pat-1")
    assert claims["auth_time"] == NOW - 5
    digest = hashlib.sha256(access.encode()).digest()[:16]
    assert claims["at_hash"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert claims["at_hash"] == at_hash(access)
    with pytest.raises(InvalidToken):
        verify_id_token(
            token, keyset_or_jwks=keyset, issuer=ISSUER, client_id="other", now=NOW + 60
        )
    with pytest.raises(InvalidToken):
        verify_id_token(
            token,
            keyset_or_jwks=keyset,
            issuer=ISSUER,
            client_id="growth-chart",
            now=NOW + 60,
            nonce="replayed",
        )
    with pytest.raises(InvalidToken, match="expired"):
        verify_id_token(
            token, keyset_or_jwks=keyset, issuer=ISSUER, client_id="growth-chart", now=NOW + 360
        )


def test_id_token_subject_rules(keyset: KeySet) -> None:
    for subject in ("", "x" * 256):
        with pytest.raises(ValueError):
            issue_id_token(
                keyset, issuer=ISSUER, client_id="c", subject=subject, lifetime_s=60, now=NOW
            )


def test_id_token_is_never_es384(keyset: KeySet) -> None:
    es = _token(keyset, alg="ES384")
    with pytest.raises(InvalidToken, match="unsupported_alg"):
        verify_id_token(es, keyset_or_jwks=keyset, issuer=ISSUER, client_id=FHIR, now=NOW)
