"""Registered clients: the three SMART client types, as authlib client models.

SMART App Launch 2.2 defines the client types (conformance.md §"Capabilities"):

``public``
    ``token_endpoint_auth_method=none``; PKCE is mandatory (RFC 7636, S256 only).
``confidential-symmetric``
    a client secret sent with HTTP Basic (``client_secret_basic``) or in the form
    (``client_secret_post``), client-confidential-symmetric.md. Only a SHA-256 digest of
    the generated secret is kept.
``confidential-asymmetric``
    ``private_key_jwt`` client assertions (RFC 7523 §2.2) signed RS384 or ES384, verified
    with the client's registered JWK Set, inline or at a ``jwks_uri``
    (client-confidential-asymmetric.md). With ``client_credentials`` this is a backend
    service (backend-services.md), such as a clinic's EHR system, optionally bound to a FHIR
    ``Organization``.

:class:`Client` implements authlib's :class:`~authlib.oauth2.rfc6749.ClientMixin`, with
scope narrowing by the SMART grammar (:func:`smart_on_fhir.scopes.narrow`) instead of
string-set comparison.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import sqlalchemy as sa
from authlib.oauth2.rfc6749 import ClientMixin
from sqlalchemy.engine import Connection

from .errors import SmartError
from .keys import VerificationKeys
from .scopes import ScopeSet, parse_scopes
from .tables import clients

__all__ = [
    "AUTH_METHODS",
    "CLIENT_TYPES",
    "Client",
    "ClientError",
    "NewClient",
    "client_origins",
    "create_client",
    "new_client_id",
    "get_client",
    "origin_of",
    "set_client_active",
]

#: Token endpoint authentication methods per SMART client type (RFC 7591 §2 names).
AUTH_METHODS: Final[Mapping[str, frozenset[str]]] = {
    "public": frozenset({"none"}),
    "confidential-symmetric": frozenset({"client_secret_basic", "client_secret_post"}),
    "confidential-asymmetric": frozenset({"private_key_jwt"}),
}
CLIENT_TYPES: Final = tuple(AUTH_METHODS)
_GRANTS: Final = frozenset({"authorization_code", "refresh_token", "client_credentials"})
_ORG_RE: Final = re.compile(r"Organization/[A-Za-z0-9\-.]{1,64}")


class ClientError(SmartError, ValueError):
    """Client metadata that cannot be registered (the message says which field)."""


def new_client_id() -> str:
    """A fresh client id: 192 random bits, URL-safe, never starting with ``-`` (an id that
    did would read as an option to every command line it is pasted into)."""
    return "c" + secrets.token_urlsafe(24)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def origin_of(uri: str) -> str | None:
    """The RFC 6454 origin ``scheme://host[:port]`` of an absolute http(s) URI."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}".lower()


@dataclass(frozen=True)
class Client(ClientMixin):  # type: ignore[misc]
    """A registered client, as authlib's grants and endpoints see it."""

    client_id: str
    client_name: str
    client_type: str
    token_endpoint_auth_method: str
    redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    scope: str
    secret_hash: str | None = field(default=None, repr=False)
    jwks: Mapping[str, Any] | None = None
    jwks_uri: str | None = None
    organization: str | None = None
    launch_uri: str | None = None
    active: bool = True

    @property
    def scopes(self) -> ScopeSet:
        """The scopes this client may ever be granted."""
        return parse_scopes(self.scope, on_invalid="ignore")

    @property
    def is_public(self) -> bool:
        return self.client_type == "public"

    @property
    def origins(self) -> frozenset[str]:
        """Origins of the redirect URIs: where this app's browser code runs (CORS)."""
        return frozenset(o for o in map(origin_of, self.redirect_uris) if o)

    def verification_keys(self) -> VerificationKeys | None:
        """The inline JWK Set as prepared keys (RS384/ES384 only), or ``None``."""
        if self.jwks is None:
            return None
        return VerificationKeys.from_jwks(self.jwks, algorithms=("RS384", "ES384"), cache_size=0)

    # -- authlib ClientMixin (RFC 6749 §2) ---------------------------------------------------

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        """Only a client with exactly one redirect URI has a default (RFC 6749 §3.1.2.3)."""
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        """The requested scope narrowed to what this client is registered for (SMART 2.2
        scopes: a server may grant less than requested). ``None`` (→ ``invalid_scope``)
        when nothing of the request can be granted."""
        if not scope:
            return None
        granted = parse_scopes(scope, on_invalid="ignore").narrow(self.scopes)
        return str(granted) if granted else None

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        """Exact string match with a registered URI (RFC 6749 §3.1.2.3, RFC 9700 §4.1.3)."""
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        if self.secret_hash is None:
            return False
        return hmac.compare_digest(_digest(client_secret), self.secret_hash)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in AUTH_METHODS.get(self.client_type, frozenset())

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


@dataclass(frozen=True, slots=True)
class NewClient:
    """A client just registered; ``client_secret`` is shown once and never stored."""

    client: Client
    client_secret: str | None


def _check_uri(name: str, uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.fragment:
        raise ClientError(f"{name} must be an absolute http(s) URI without a fragment")
    if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        raise ClientError(f"{name} must use https (plain http only for loopback)")
    return uri


def _check_jwks(jwks: Mapping[str, Any]) -> dict[str, Any]:
    keys = jwks.get("keys")
    if not isinstance(keys, list) or not keys:
        raise ClientError("jwks must be a JWK Set with a non-empty 'keys' array")
    for key in keys:
        if not isinstance(key, dict) or not key.get("kty") or not key.get("kid"):
            raise ClientError("every JWK needs 'kty' and 'kid' (backend-services.md)")
        if any(name in key for name in ("d", "p", "q", "k")):
            raise ClientError("jwks must hold public keys only")
    if not VerificationKeys.from_jwks(jwks, algorithms=("RS384", "ES384")).kids:
        raise ClientError("jwks holds no usable RS384 (RSA) or ES384 (EC P-384) key")
    return dict(jwks)


def create_client(
    conn: Connection,
    *,
    client_name: str,
    client_type: str,
    redirect_uris: Sequence[str] = (),
    scope: str,
    now: int,
    grant_types: Iterable[str] | None = None,
    jwks: Mapping[str, Any] | None = None,
    jwks_uri: str | None = None,
    organization: str | None = None,
    launch_uri: str | None = None,
    client_id: str | None = None,
    auth_method: str | None = None,
    dynamic: bool = False,
) -> NewClient:
    """Register a client (the service behind ``fhir-consent clients add`` and RFC 7591).

    :param client_type: ``public``, ``confidential-symmetric`` or ``confidential-asymmetric``
    :param grant_types: defaults to ``authorization_code`` + ``refresh_token``, or
        ``client_credentials`` for an asymmetric client without redirect URIs
    :param organization: ``Organization/<id>`` for a clinic system (backend services)
    :raises ClientError: for metadata SMART or RFC 7591 would reject
    """
    if client_type not in AUTH_METHODS:
        raise ClientError(f"client_type must be one of {', '.join(CLIENT_TYPES)}")
    if not client_name.strip() or len(client_name) > 256:
        raise ClientError("client_name must be 1-256 characters")
    uris = tuple(_check_uri("redirect_uri", u) for u in redirect_uris)
    if grant_types is None:
        backend = client_type == "confidential-asymmetric" and not uris
        grant_types = (
            ("client_credentials",) if backend else ("authorization_code", "refresh_token")
        )
    grants = tuple(dict.fromkeys(grant_types))
    if not grants or not set(grants) <= _GRANTS:
        raise ClientError(
            "grant_types must be authorization_code, refresh_token, client_credentials"
        )
    if "authorization_code" in grants and not uris:
        raise ClientError("authorization_code clients need at least one redirect_uri")
    if "client_credentials" in grants and client_type != "confidential-asymmetric":
        raise ClientError("client_credentials needs a confidential-asymmetric client")
    method = auth_method or min(AUTH_METHODS[client_type])
    if method not in AUTH_METHODS[client_type]:
        raise ClientError(f"{client_type} clients cannot use {method}")
    scopes = parse_scopes(scope)  # strict: a registration names real scopes
    if not scopes:
        raise ClientError("scope must name at least one scope")
    if client_type == "confidential-asymmetric":
        if (jwks is None) == (jwks_uri is None):
            raise ClientError("asymmetric clients need exactly one of jwks and jwks_uri")
    elif jwks is not None or jwks_uri is not None:
        raise ClientError("only confidential-asymmetric clients register keys")
    checked_jwks = _check_jwks(jwks) if jwks is not None else None
    if jwks_uri is not None:
        _check_uri("jwks_uri", jwks_uri)
    if organization is not None and not _ORG_RE.fullmatch(organization):
        raise ClientError("organization must be Organization/<id>")
    if launch_uri is not None:
        _check_uri("launch_uri", launch_uri)
    cid = client_id or new_client_id()
    if not re.fullmatch(r"[A-Za-z0-9_\-.]{1,64}", cid):
        raise ClientError("client_id must be 1-64 letters, digits or _ - .")
    if conn.execute(sa.select(clients.c.client_id).where(clients.c.client_id == cid)).first():
        raise ClientError(f"the client_id {cid} is taken")
    secret = secrets.token_urlsafe(32) if client_type == "confidential-symmetric" else None
    client = Client(
        client_id=cid,
        client_name=client_name.strip(),
        client_type=client_type,
        token_endpoint_auth_method=method,
        redirect_uris=uris,
        grant_types=grants,
        scope=str(scopes),
        secret_hash=_digest(secret) if secret else None,
        jwks=checked_jwks,
        jwks_uri=jwks_uri,
        organization=organization,
        launch_uri=launch_uri,
    )
    conn.execute(
        clients.insert().values(
            client_id=cid,
            client_name=client.client_name,
            client_type=client_type,
            token_endpoint_auth_method=method,
            secret_hash=client.secret_hash,
            redirect_uris=json.dumps(list(uris)),
            grant_types=json.dumps(list(grants)),
            scope=client.scope,
            jwks=json.dumps(checked_jwks) if checked_jwks is not None else None,
            jwks_uri=jwks_uri,
            organization=organization,
            launch_uri=launch_uri,
            active=True,
            dynamic=dynamic,
            created_at=now,
        )
    )
    return NewClient(client, secret)


def _row_to_client(row: Any) -> Client:
    m = row._mapping
    return Client(
        client_id=m["client_id"],
        client_name=m["client_name"],
        client_type=m["client_type"],
        token_endpoint_auth_method=m["token_endpoint_auth_method"],
        redirect_uris=tuple(json.loads(m["redirect_uris"])),
        grant_types=tuple(json.loads(m["grant_types"])),
        scope=m["scope"],
        secret_hash=m["secret_hash"],
        jwks=json.loads(m["jwks"]) if m["jwks"] else None,
        jwks_uri=m["jwks_uri"],
        organization=m["organization"],
        launch_uri=m["launch_uri"],
        active=bool(m["active"]),
    )


def get_client(conn: Connection, client_id: str, *, active_only: bool = True) -> Client | None:
    """The client with this id (only an active one unless ``active_only=False``)."""
    if not isinstance(client_id, str) or len(client_id) > 64:
        return None
    stmt = sa.select(clients).where(clients.c.client_id == client_id)
    if active_only:
        stmt = stmt.where(clients.c.active.is_(True))
    row = conn.execute(stmt).first()
    return _row_to_client(row) if row is not None else None


def set_client_active(conn: Connection, client_id: str, active: bool) -> bool:
    """Enable or disable a client; its tokens stop working at once when disabled."""
    result = conn.execute(
        clients.update().where(clients.c.client_id == client_id).values(active=active)
    )
    return bool(result.rowcount)


def client_origins(conn: Connection) -> frozenset[str]:
    """Every origin of every active client's redirect URIs (for CORS)."""
    out: set[str] = set()
    for (uris,) in conn.execute(
        sa.select(clients.c.redirect_uris).where(clients.c.active.is_(True))
    ):
        out.update(o for o in map(origin_of, json.loads(uris)) if o)
    return frozenset(out)
