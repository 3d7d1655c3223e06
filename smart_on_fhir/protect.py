"""The resource server's side: bearer tokens on FHIR requests (RFC 6750, RFC 9068 §4).

:class:`SmartResourceProtector` is authlib's :class:`~authlib.oauth2.rfc6749.ResourceProtector`
with one validator, :class:`JWTAccessTokenValidator`: the ``Authorization: Bearer`` header is
parsed by authlib, the token is verified with :func:`smart_on_fhir.tokens.verify_access_token`
(precomputed public keys by ``kid`` and a cache of verified signatures), and the verified
claims are kept in a bounded LRU by the token's exact bytes with the expected audience and
issuer, until the token's ``exp``: a repeat token costs a dictionary look-up. Expected
``aud`` (the FHIR base) and ``iss`` come with each request, so one protector serves any host
name.

Failures raise :class:`AuthenticationRequired`, which carries the RFC 6750 §3 challenge for
the ``WWW-Authenticate`` header: no token → ``Bearer realm="…"`` without an error code; a
bad, expired or wrong-audience token → ``error="invalid_token"``. Descriptions are fixed
reason codes, never token text.

Revocation and deactivation are checked per request against the database with
:func:`token_state` (one primary-key look-up), inside the request's own transaction, or on
an event-loop connection with :data:`TOKEN_STATE_PG_SQL` and :func:`token_state_of`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from authlib.oauth2.rfc6749 import ResourceProtector, TokenValidator
from authlib.oauth2.rfc6749.errors import MissingAuthorizationError, UnsupportedTokenTypeError

from .errors import InvalidToken, SmartError
from .keys import KeySet
from .records import (
    TOKEN_STATE_PG_SQL,
    TokenState,
    cached_token_state,
    token_state,
    token_state_of,
)
from .tokens import AccessTokenClaims, Timestamp, _seconds, verify_access_token

__all__ = [
    "TOKEN_STATE_PG_SQL",
    "AuthenticationRequired",
    "JWTAccessTokenValidator",
    "SmartResourceProtector",
    "TokenState",
    "cached_token_state",
    "token_state",
    "token_state_of",
    "www_authenticate",
]


def www_authenticate(realm: str, error: str | None = None, description: str | None = None) -> str:
    """An RFC 6750 §3 ``WWW-Authenticate`` challenge for the Bearer scheme."""
    parts = [f'realm="{realm}"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{description}"')
    return "Bearer " + ", ".join(parts)


class AuthenticationRequired(SmartError):
    """The request has no usable access token: answer 401 with :attr:`challenge`.

    :param error: ``None`` when no credentials were sent (RFC 6750 §3.1: no error code
        then), otherwise ``invalid_token`` or ``invalid_request``
    :param reason: a fixed machine-readable code (see
        :data:`~smart_on_fhir.errors.TOKEN_ERROR_REASONS`), safe to log
    """

    def __init__(self, realm: str, error: str | None, reason: str | None = None) -> None:
        self.realm = realm
        self.error = error
        self.reason = reason
        super().__init__(reason or "authentication required")

    @property
    def challenge(self) -> str:
        return www_authenticate(self.realm, self.error, self.reason)


@dataclass(frozen=True, slots=True)
class _ProtectedRequest:
    headers: Mapping[str, str]
    audience: str
    issuer: str
    now: Timestamp


class JWTAccessTokenValidator(TokenValidator):  # type: ignore[misc]
    """Validates our RFC 9068 access tokens for authlib's resource protector."""

    TOKEN_TYPE = "bearer"

    def __init__(self, keys: Callable[[], KeySet], *, realm: str, leeway: int = 30) -> None:
        super().__init__(realm=realm)
        self._keys = keys
        self._leeway = leeway

    def authenticate_token(self, token_string: str) -> str:
        return token_string.strip()

    def validate_token(self, token: str, scopes: Any, request: _ProtectedRequest) -> None:
        """Everything is checked in :meth:`SmartResourceProtector.authenticate`."""


class SmartResourceProtector(ResourceProtector):  # type: ignore[misc]
    """Authenticates FHIR requests by their bearer access token.

    :param keys: returns the authorization server's current :class:`KeySet`
    :param realm: the ``realm`` of the challenges
    :param leeway: seconds of clock skew allowed on ``exp``/``iat``
    """

    def __init__(
        self,
        keys: Callable[[], KeySet],
        *,
        realm: str = "fhir",
        leeway: int = 30,
        cache_size: int = 4096,
    ):
        super().__init__()
        self.realm = realm
        self._keys = keys
        self._leeway = leeway
        self.register_token_validator(JWTAccessTokenValidator(keys, realm=realm, leeway=leeway))
        # Verified claims by (token, audience, issuer): a repeat token skips the claim
        # checks and keeps its parsed scopes. Each entry remembers the KeySet it was verified
        # with (a rotation or a removed key verifies anew) and holds only until ``exp``.
        self._cache_size = cache_size
        self._verified: OrderedDict[tuple[str, str, str], tuple[KeySet, AccessTokenClaims]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    def authenticate(
        self,
        headers: Mapping[str, str],
        *,
        audience: str,
        issuer: str,
        now: Timestamp,
    ) -> AccessTokenClaims:
        """Verify the request's bearer token: signature, ``typ``, ``iss``, ``aud`` (the FHIR
        base) and times (RFC 9068 §4).

        :raises AuthenticationRequired: no token, or an invalid one
        """
        keys = self._keys()
        # A repeat token is served from the cache before authlib parses the header (the same
        # split as its parse_request_authorization: scheme, then the token; a miss, or any
        # header that is not a well-formed Bearer one, takes authlib's path below).
        auth = headers.get("Authorization") if self._cache_size else None
        parts = auth.split(None, 1) if auth else ()
        if len(parts) == 2 and parts[0].lower() == "bearer":
            hit = self._hit((parts[1].strip(), audience, issuer), keys, now)
            if hit is not None:
                return hit
        request = _ProtectedRequest(headers, audience, issuer, now)
        try:
            token = self.validate_request(None, request)
        except MissingAuthorizationError:
            raise AuthenticationRequired(self.realm, None) from None
        except UnsupportedTokenTypeError:
            raise AuthenticationRequired(self.realm, "invalid_request", "not_bearer") from None
        key = (token, audience, issuer)
        hit = self._hit(key, keys, now)
        if hit is not None:
            return hit
        try:
            claims = verify_access_token(
                token,
                keyset_or_jwks=keys,
                issuer=issuer,
                audience=audience,
                now=now,
                leeway=self._leeway,
            )
        except InvalidToken as error:
            raise AuthenticationRequired(self.realm, "invalid_token", error.reason) from None
        if self._cache_size:
            claims.scopes  # noqa: B018 - parse once, while the entry lives
            with self._lock:
                self._verified[key] = (keys, claims)
                self._verified.move_to_end(key)
                while len(self._verified) > self._cache_size:
                    self._verified.popitem(last=False)
        return claims

    def keys(self) -> KeySet:
        """The authorization server's current keys (what tokens are verified with now)."""
        return self._keys()

    def still_valid(self, keys: KeySet, claims: AccessTokenClaims, now: Timestamp) -> bool:
        """Whether ``claims``, verified by :meth:`authenticate` while ``keys`` were the
        current keys, still hold at ``now``: the keys were not rotated since (a rotation or
        a removed key verifies anew) and the token has not expired. What a repeat token's
        cache hit checks; a caller keeping verified tokens of its own checks the same.
        Never, when this protector keeps no tokens (``cache_size=0``: verify every time)."""
        return bool(self._cache_size) and self._holds(keys, claims, self._keys(), now)

    def _holds(
        self, verified_with: KeySet, claims: AccessTokenClaims, keys: KeySet, now: Timestamp
    ) -> bool:
        """Claims verified with ``verified_with`` still hold while ``keys`` are current, at
        ``now``: the same key set, and not expired (with the leeway)."""
        return verified_with is keys and _seconds(now) - self._leeway < claims.expires_at

    def _hit(
        self, key: tuple[str, str, str], keys: KeySet, now: Timestamp
    ) -> AccessTokenClaims | None:
        """The cached claims of ``key`` if verified with ``keys`` and not expired at ``now``."""
        if not self._cache_size:
            return None
        with self._lock:
            hit = self._verified.get(key)
        if hit is None or not self._holds(hit[0], hit[1], keys, now):
            return None
        return hit[1]
