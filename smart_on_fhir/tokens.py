"""Access tokens (RFC 9068 JWTs) and OpenID Connect id_tokens, as pure functions.

Time, token ids and keys are parameters: nothing here reads the clock or draws random
numbers, so tests are deterministic (as cryptography's ``Fernet.encrypt_at_time``).

* :func:`issue_access_token` makes an RFC 9068 JWT: header ``typ: at+jwt`` (§2.1),
  claims ``iss exp aud sub client_id iat jti`` (§2.2) and ``scope`` (§2.2.3), plus SMART's
  launch context ``patient``/``encounter`` and ``fhirUser`` when present.
* :func:`verify_access_token` is what a resource server runs per request (RFC 9068 §4,
  RFC 6750): signature, ``typ``, issuer, audience and times, raising
  :class:`~smart_on_fhir.errors.InvalidToken` with a ``reason`` code. Public keys are
  imported once and kept by ``kid``, and verified signatures are cached per token
  (see :class:`~smart_on_fhir.keys.VerificationKeys`).
* :func:`issue_id_token` makes the OpenID Connect Core §2 id_token, RS256 as SMART 2.2
  requires (§"Scopes for requesting identity data"), with ``fhirUser``, ``nonce`` and
  ``at_hash`` (OIDC Core §3.1.3.6) when given.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from types import MappingProxyType
from typing import Any, Final, TypeAlias

from joserfc import jwt

from .errors import InvalidToken
from .keys import KeySet, VerificationKeys
from .scopes import ScopeSet, parse_scopes

__all__ = [
    "ACCESS_TOKEN_TYP",
    "AccessTokenClaims",
    "KeySource",
    "Timestamp",
    "at_hash",
    "issue_access_token",
    "issue_id_token",
    "verify_access_token",
    "verify_id_token",
]

#: The JWT ``typ`` header of RFC 9068 §2.1.
ACCESS_TOKEN_TYP: Final = "at+jwt"
_ACCEPTED_TYPS: Final = frozenset({"at+jwt", "application/at+jwt"})

#: Seconds since the epoch, or an aware :class:`~datetime.datetime`.
Timestamp: TypeAlias = int | float | datetime
#: Where verification keys come from: a :class:`KeySet`, prepared
#: :class:`VerificationKeys` (fastest), or a JWK Set mapping.
KeySource: TypeAlias = KeySet | VerificationKeys | Mapping[str, Any]

_REGISTERED_AT: Final = frozenset(
    {"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "scope"}
    | {"patient", "encounter", "fhirUser"}
)
_REGISTERED_ID: Final = frozenset(
    {"iss", "sub", "aud", "exp", "iat", "nbf", "nonce", "at_hash", "auth_time", "fhirUser"}
)


def _seconds(value: Timestamp) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("pass an aware datetime (with tzinfo), or epoch seconds")
        return int(value.timestamp())
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("a timestamp is epoch seconds or an aware datetime")
    return int(value)


def _check_lifetime(lifetime_s: int) -> None:
    if isinstance(lifetime_s, bool) or not isinstance(lifetime_s, int) or lifetime_s <= 0:
        raise ValueError("lifetime_s must be a positive number of seconds")


def _check_extra(extra: Mapping[str, Any] | None, registered: frozenset[str]) -> dict[str, Any]:
    if not extra:
        return {}
    clash = registered & set(extra)
    if clash:
        raise ValueError(f"extra claims may not override {sorted(clash)}")
    return dict(extra)


def issue_access_token(
    keyset: KeySet,
    *,
    issuer: str,
    audience: str,
    subject: str,
    client_id: str,
    scope: str | ScopeSet,
    lifetime_s: int,
    now: Timestamp,
    jti: str,
    patient: str | None = None,
    encounter: str | None = None,
    fhir_user: str | None = None,
    alg: str = "RS256",
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """Sign an RFC 9068 access token with the current *alg* key of *keyset*.

    :param audience: the FHIR base URL the token is for (RFC 9068 §2.2 ``aud``; SMART
        app-launch: the resource server SHALL check ``aud``)
    :param subject: the user's id; for ``client_credentials`` the client id (§2.2 ``sub``)
    :param scope: the granted scopes, as granted (a v1 request keeps its v1 spelling)
    :param lifetime_s: seconds until ``exp``; SMART: SHOULD be at most 3600
    :param now: the issue time, ``iat``
    :param jti: a unique id, e.g. ``secrets.token_urlsafe(16)``, also the revocation handle
    :param patient: the launch context patient id (SMART token response ``patient``)
    :param encounter: the launch context encounter id
    :param fhir_user: the user's FHIR resource URL (SMART ``fhirUser``)
    :param extra_claims: further private claims; registered names are refused
    """
    _check_lifetime(lifetime_s)
    issued_at = _seconds(now)
    claims: dict[str, Any] = _check_extra(extra_claims, _REGISTERED_AT)
    claims.update(
        {
            "iss": issuer,
            "sub": subject,
            "aud": audience,
            "exp": issued_at + lifetime_s,
            "iat": issued_at,
            "jti": jti,
            "client_id": client_id,
            "scope": str(scope),
        }
    )
    if patient is not None:
        claims["patient"] = patient
    if encounter is not None:
        claims["encounter"] = encounter
    if fhir_user is not None:
        claims["fhirUser"] = fhir_user
    key = keyset.signing_key(alg)
    header = {"alg": alg, "kid": key.kid, "typ": ACCESS_TOKEN_TYP}
    return jwt.encode(header, claims, key, algorithms=[alg])


def at_hash(access_token: str, alg: str = "RS256") -> str:
    """The ``at_hash`` of OpenID Connect Core §3.1.3.6: base64url of the left half of the
    hash of the access token, with the hash of *alg* (SHA-256 for RS256)."""
    bits = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}[alg[-3:]]
    digest = bits(access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode("ascii")


def issue_id_token(
    keyset: KeySet,
    *,
    issuer: str,
    client_id: str,
    subject: str,
    lifetime_s: int,
    now: Timestamp,
    fhir_user: str | None = None,
    nonce: str | None = None,
    access_token: str | None = None,
    auth_time: Timestamp | None = None,
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """Sign an OpenID Connect id_token (OIDC Core §2) with the current RS256 key.

    :param client_id: the ``aud`` (OIDC Core §2: the client id of the relying party)
    :param subject: ``sub``: non-blank and under 256 characters (Inferno
        ``smart_openid_token_payload``)
    :param fhir_user: SMART's ``fhirUser`` claim: a Patient, Practitioner,
        PractitionerRole, RelatedPerson or Person URL, absolute or relative to the base
    :param nonce: echoed from the authorization request when it had one
    :param access_token: when given, ``at_hash`` is added
    """
    if not subject or len(subject) >= 256:
        raise ValueError("sub must be non-blank and shorter than 256 characters")
    _check_lifetime(lifetime_s)
    issued_at = _seconds(now)
    claims: dict[str, Any] = _check_extra(extra_claims, _REGISTERED_ID)
    claims.update(
        {
            "iss": issuer,
            "sub": subject,
            "aud": client_id,
            "exp": issued_at + lifetime_s,
            "iat": issued_at,
        }
    )
    if fhir_user is not None:
        claims["fhirUser"] = fhir_user
    if nonce is not None:
        claims["nonce"] = nonce
    if access_token is not None:
        claims["at_hash"] = at_hash(access_token, "RS256")
    if auth_time is not None:
        claims["auth_time"] = _seconds(auth_time)
    key = keyset.signing_key("RS256")
    return jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "JWT"}, claims, key, ["RS256"])


@dataclass(frozen=True)
class AccessTokenClaims:
    """The verified claims of an access token (RFC 9068 §2.2).

    :param audience: every ``aud`` value, in order
    :param extra: every other claim, read-only
    """

    issuer: str
    subject: str
    audience: tuple[str, ...]
    client_id: str
    scope: str
    expires_at: int
    issued_at: int
    jti: str
    kid: str | None = None
    patient: str | None = None
    encounter: str | None = None
    fhir_user: str | None = None
    not_before: int | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @cached_property
    def scopes(self) -> ScopeSet:
        """The ``scope`` claim parsed; tokens that do not parse are ignored."""
        return parse_scopes(self.scope, on_invalid="ignore")


_JWKS_CACHE: OrderedDict[str, VerificationKeys] = OrderedDict()
_JWKS_LOCK: Final = threading.Lock()


def _verification_keys(source: KeySource) -> VerificationKeys:
    """Prepared keys for *source*; a JWKS mapping is imported once per distinct content."""
    if isinstance(source, VerificationKeys):
        return source
    if isinstance(source, KeySet):
        return source.verifier
    marker = json.dumps(source, sort_keys=True, separators=(",", ":"))
    with _JWKS_LOCK:
        keys = _JWKS_CACHE.get(marker)
    if keys is None:
        keys = VerificationKeys.from_jwks(source)
        with _JWKS_LOCK:
            _JWKS_CACHE[marker] = keys
            while len(_JWKS_CACHE) > 16:
                _JWKS_CACHE.popitem(last=False)
    return keys


def _string(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidToken("missing_claim")
    return value


def _optional_string(payload: Mapping[str, Any], name: str) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidToken("missing_claim")
    return value


def _number(payload: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    value = payload.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken("missing_claim")
    return int(value)


def _audiences(payload: Mapping[str, Any]) -> tuple[str, ...]:
    value = payload.get("aud")
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InvalidToken("missing_claim")


def _check_times(payload: Mapping[str, Any], now: int, leeway: int) -> tuple[int, int, int | None]:
    expires_at = _number(payload, "exp", required=True)
    issued_at = _number(payload, "iat", required=True)
    not_before = _number(payload, "nbf", required=False)
    assert expires_at is not None and issued_at is not None
    if now - leeway >= expires_at:
        raise InvalidToken("expired")
    if issued_at > now + leeway or (not_before is not None and not_before > now + leeway):
        raise InvalidToken("not_yet_valid")
    return expires_at, issued_at, not_before


def _check_audience(audiences: tuple[str, ...], expected: str | Collection[str]) -> None:
    wanted = {expected} if isinstance(expected, str) else set(expected)
    normal = {a.rstrip("/") for a in wanted}
    if not any(a.rstrip("/") in normal for a in audiences):
        raise InvalidToken("wrong_audience")


def verify_access_token(
    token: str,
    *,
    keyset_or_jwks: KeySource,
    issuer: str,
    audience: str | Collection[str],
    now: Timestamp,
    leeway: int = 30,
) -> AccessTokenClaims:
    """Verify an access token as RFC 9068 §4 asks a resource server to.

    Checks, in order: the JWS signature with a known ``kid`` and an allowed ``alg``
    (never ``none`` or HMAC), ``typ`` = ``at+jwt``, the required claims, ``iss``,
    ``aud`` (trailing slashes ignored), then ``exp``, ``iat`` and ``nbf`` against *now*
    with *leeway* seconds of clock skew.

    :raises InvalidToken: with one of :data:`~smart_on_fhir.errors.TOKEN_ERROR_REASONS`;
        answer it with 401 and ``WWW-Authenticate: Bearer error="invalid_token"``
        (RFC 6750 §3.1)
    """
    header, payload = _verification_keys(keyset_or_jwks).verify_compact(token)
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYPS:
        raise InvalidToken("wrong_typ")
    claim_issuer = _string(payload, "iss")
    subject = _string(payload, "sub")
    client_id = _string(payload, "client_id")
    jti = _string(payload, "jti")
    scope = payload.get("scope", "")
    if not isinstance(scope, str):
        raise InvalidToken("missing_claim")
    audiences = _audiences(payload)
    if claim_issuer != issuer:
        raise InvalidToken("wrong_issuer")
    _check_audience(audiences, audience)
    expires_at, issued_at, not_before = _check_times(payload, _seconds(now), leeway)
    extra = {k: v for k, v in payload.items() if k not in _REGISTERED_AT}
    return AccessTokenClaims(
        issuer=claim_issuer,
        subject=subject,
        audience=audiences,
        client_id=client_id,
        scope=scope,
        expires_at=expires_at,
        issued_at=issued_at,
        jti=jti,
        kid=header.get("kid"),
        patient=_optional_string(payload, "patient"),
        encounter=_optional_string(payload, "encounter"),
        fhir_user=_optional_string(payload, "fhirUser"),
        not_before=not_before,
        extra=MappingProxyType(extra),
    )


def verify_id_token(
    token: str,
    *,
    keyset_or_jwks: KeySource,
    issuer: str,
    client_id: str,
    now: Timestamp,
    nonce: str | None = None,
    leeway: int = 60,
) -> dict[str, Any]:
    """Validate an id_token as OIDC Core §3.1.3.7 and Inferno
    ``smart_openid_token_payload`` do: RS256 signature, ``iss``, ``aud`` contains
    *client_id*, ``exp``/``iat`` with 60 s leeway, non-blank ``sub`` under 256 characters,
    and ``nonce`` when one was sent. Returns a copy of the claims.

    :raises InvalidToken: as :func:`verify_access_token`
    """
    header, payload = _verification_keys(keyset_or_jwks).verify_compact(token)
    if header.get("alg") != "RS256":
        raise InvalidToken("unsupported_alg")
    subject = _string(payload, "sub")
    if len(subject) >= 256:
        raise InvalidToken("missing_claim")
    if _string(payload, "iss") != issuer:
        raise InvalidToken("wrong_issuer")
    if client_id not in _audiences(payload):
        raise InvalidToken("wrong_audience")
    _check_times(payload, _seconds(now), leeway)
    if nonce is not None and payload.get("nonce") != nonce:
        raise InvalidToken("missing_claim")
    return dict(payload)
