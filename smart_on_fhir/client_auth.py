"""``private_key_jwt`` client authentication (RFC 7523 §2.2, §3) for SMART asymmetric clients.

SMART App Launch 2.2 client-confidential-asymmetric.md and backend-services.md:

* the assertion's header has ``alg`` RS384 or ES384 (nothing else is accepted), a ``kid``,
  and optionally a ``jku`` that SHALL equal the JWKS URL registered for the client;
* claims: ``iss`` = ``sub`` = the client id, ``aud`` = the token endpoint URL, ``exp`` no
  more than five minutes ahead, and a ``jti`` never seen before for that issuer;
* the key is the one registered key whose ``kid`` matches and whose type fits ``alg``,
  taken from the inline JWK Set or fetched from the registered ``jwks_uri`` (its
  ``Cache-Control: max-age`` is honoured);
* every failure is ``invalid_client``.

Built on authlib's :class:`~authlib.oauth2.rfc7523.JWTBearerClientAssertion`, which checks
the registered claims and calls :meth:`PrivateKeyJWT.validate_jti`.
:func:`sign_client_assertion` is the client side, for tests and tools.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import httpx
import sqlalchemy as sa
from authlib.oauth2.rfc6749.errors import InvalidClientError
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from sqlalchemy.exc import IntegrityError

from .server import current_exchange
from .tables import assertion_jtis

__all__ = [
    "ASSERTION_ALGORITHMS",
    "ASSERTION_TYPE",
    "JWKSFetcher",
    "PrivateKeyJWT",
    "sign_client_assertion",
]

ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: SMART asymmetric client authentication: the server verifies RS384 and ES384.
ASSERTION_ALGORITHMS: Final = ("RS384", "ES384")
_KEY_TYPES: Final = {"RS384": ("RSA", None), "ES384": ("EC", "P-384")}
_MAX_AGE_RE: Final = re.compile(r"max-age=(\d+)")
_MAX_JWKS_BYTES: Final = 256 * 1024


def _fail(description: str) -> InvalidClientError:
    return InvalidClientError(description=description)


class JWKSFetcher:
    """Fetches client JWK Sets from their registered URLs, cached per ``Cache-Control``
    ``max-age`` (clamped to [*min_ttl*, *max_ttl*]; *default_ttl* without one).

    :param client: the injected HTTP client (swap its transport in tests)
    """

    def __init__(
        self,
        client: httpx.Client | None = None,
        *,
        default_ttl: int = 300,
        min_ttl: int = 10,
        max_ttl: int = 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._default_ttl = default_ttl
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._clock = clock
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def _http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(timeout=5.0, follow_redirects=False)
        return self._client

    def get(self, url: str, *, refresh: bool = False) -> dict[str, Any]:
        """The JWK Set at *url*; raises ``invalid_client`` if it cannot be fetched."""
        now = self._clock()
        with self._lock:
            hit = self._cache.get(url)
        if hit is not None and hit[0] > now and not refresh:
            return hit[1]
        try:
            response = self._http().get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError:
            raise _fail("The client's JWKS URL could not be fetched.") from None
        if response.status_code != 200 or len(response.content) > _MAX_JWKS_BYTES:
            raise _fail("The client's JWKS URL did not return a JWK Set.")
        try:
            data = response.json()
        except ValueError:
            raise _fail("The client's JWKS URL did not return a JWK Set.") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise _fail("The client's JWKS URL did not return a JWK Set.")
        ttl = self._default_ttl
        cache_control = response.headers.get("cache-control", "")
        match = _MAX_AGE_RE.search(cache_control)
        if "no-store" in cache_control or "no-cache" in cache_control:
            ttl = 0
        elif match:
            ttl = max(self._min_ttl, min(self._max_ttl, int(match[1])))
        with self._lock:
            self._cache[url] = (now + ttl, data)
        return data


def _select_key(jwks: Mapping[str, Any], kid: str, alg: str) -> RSAKey | ECKey | None:
    """The one key with this ``kid`` whose ``kty`` (and curve) fits ``alg``."""
    kty, curve = _KEY_TYPES[alg]
    found = [
        k
        for k in jwks.get("keys", ())
        if isinstance(k, dict)
        and k.get("kid") == kid
        and k.get("kty") == kty
        and (curve is None or k.get("crv") == curve)
        and k.get("use", "sig") == "sig"
        and k.get("alg", alg) == alg
    ]
    if len(found) != 1:
        return None
    public = {name: value for name, value in found[0].items() if name not in ("d", "p", "q")}
    try:
        key: RSAKey | ECKey = (RSAKey if kty == "RSA" else ECKey).import_key(public)
    except (JoseError, ValueError, TypeError):
        return None
    return key


class PrivateKeyJWT(JWTBearerClientAssertion):  # type: ignore[misc]
    """The ``private_key_jwt`` method, registered with
    ``server.register_client_auth_method("private_key_jwt", PrivateKeyJWT(...))``.

    :param fetcher: fetches ``jwks_uri`` documents
    :param max_lifetime: how far ahead ``exp`` may be (SMART: five minutes)
    :param leeway: clock skew allowed on ``exp``/``iat``/``nbf``
    """

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, fetcher: JWKSFetcher, *, max_lifetime: int = 300, leeway: int = 30):
        super().__init__(validate_jti=True, leeway=leeway)
        self.fetcher = fetcher
        self.max_lifetime = max_lifetime

    def __call__(self, query_client: Callable[[str], Any], request: Any) -> Any:
        """Authenticate the client of *request*, or return ``None`` when it sent no
        assertion (so another method can be tried)."""
        data = request.form
        assertion = data.get("client_assertion")
        if data.get("client_assertion_type") != ASSERTION_TYPE or not assertion:
            return None
        header, claims = self.extract_assertion(assertion)
        alg = header.get("alg")
        if alg not in ASSERTION_ALGORITHMS:
            raise _fail("Client assertions must be signed with RS384 or ES384.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _fail("The client assertion header needs a kid.")
        client_id = claims.get("sub")
        if not isinstance(client_id, str) or claims.get("iss") != client_id:
            raise _fail("iss and sub must both be the client_id.")
        client = query_client(client_id)
        if client is None or not client.check_endpoint_auth_method(
            self.CLIENT_AUTH_METHOD, "token"
        ):
            raise _fail("The client is unknown or does not use private_key_jwt.")
        key = self._resolve_key(client, header, kid, alg)
        try:
            token = jwt.decode(assertion, key, algorithms=[alg])
        except (JoseError, ValueError):
            raise _fail("The client assertion signature is not valid.") from None
        self._check_lifetime(token.claims)
        self.verify_claims(token.claims)
        request.client = client
        return client

    def _resolve_key(self, client: Any, header: Mapping[str, Any], kid: str, alg: str) -> Any:
        jku = header.get("jku")
        if jku is not None and jku != client.jwks_uri:
            raise _fail("jku does not match the client's registered JWKS URL.")
        if client.jwks is not None:
            key = _select_key(client.jwks, kid, alg)
        elif client.jwks_uri is not None:
            key = _select_key(self.fetcher.get(client.jwks_uri), kid, alg)
            if key is None:  # rotated keys: fetch once more, ignoring the cache
                key = _select_key(self.fetcher.get(client.jwks_uri, refresh=True), kid, alg)
        else:
            key = None
        if key is None:
            raise _fail("No registered key matches the assertion's kid and alg.")
        return key

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise _fail("The client assertion needs a numeric exp.")
        if exp > current_exchange().now + self.max_lifetime + self.leeway:
            raise _fail("The client assertion exp is more than five minutes ahead.")

    def get_audiences(self) -> list[str]:
        """RFC 7523 §3 item 3: the token endpoint URL (SMART backend-services)."""
        return [current_exchange().urls.token]

    def validate_jti(self, claims: Mapping[str, Any], jti: Any) -> bool:
        """RFC 7523 §3 item 7: record ``(iss, jti)`` until the assertion expires; a second
        use within that time fails the insert."""
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            return False
        ex = current_exchange()
        try:
            with ex.conn.begin_nested():
                ex.conn.execute(
                    assertion_jtis.insert().values(
                        issuer=str(claims["iss"])[:64],
                        jti=jti,
                        expires_at=int(claims["exp"]) + self.leeway,
                    )
                )
        except IntegrityError:
            stale = ex.conn.execute(
                sa.select(assertion_jtis.c.expires_at).where(
                    assertion_jtis.c.issuer == str(claims["iss"])[:64],
                    assertion_jtis.c.jti == jti,
                )
            ).scalar()
            return stale is not None and stale < ex.now and self._reuse_expired(claims, jti)
        return True

    def _reuse_expired(self, claims: Mapping[str, Any], jti: str) -> bool:
        """An id seen long ago (its assertion expired) may be used again."""
        ex = current_exchange()
        ex.conn.execute(
            assertion_jtis.update()
            .where(assertion_jtis.c.issuer == str(claims["iss"])[:64], assertion_jtis.c.jti == jti)
            .values(expires_at=int(claims["exp"]) + self.leeway)
        )
        return True


def sign_client_assertion(
    key: RSAKey | ECKey,
    *,
    client_id: str,
    token_url: str,
    now: int | None = None,
    lifetime: int = 240,
    jti: str | None = None,
    alg: str | None = None,
    extra_header: Mapping[str, Any] | None = None,
) -> str:
    """A SMART backend-services client assertion (backend-services.md §"Request").

    :param key: the client's private key; its ``kid`` goes into the header
    :param alg: RS384 for RSA keys and ES384 for EC P-384 keys unless given
    """
    issued = int(time.time()) if now is None else now
    algorithm = alg or ("RS384" if isinstance(key, RSAKey) else "ES384")
    header: dict[str, Any] = {"alg": algorithm, "typ": "JWT", "kid": key.kid}
    if extra_header:
        header.update(extra_header)
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "iat": issued,
        "exp": issued + lifetime,
        "jti": jti or secrets.token_urlsafe(16),
    }
    return jwt.encode(header, claims, key, algorithms=[algorithm])
