"""The authorization server: authlib's :class:`~authlib.oauth2.AuthorizationServer`, wired to
our tables, keys and SMART token format.

authlib's core is synchronous and framework-free; it calls back into the server for clients
(:meth:`SmartAuthorizationServer.query_client`), token generation (the registered
``default`` generator) and storage (:meth:`~SmartAuthorizationServer.save_token`). Those
callbacks have no request parameter, so each call runs inside :func:`exchange`, which binds
the request's database connection, URLs and time to a :class:`contextvars.ContextVar` for
the duration of one synchronous call on one worker thread.

Tokens (RFC 9068 JWTs, see :mod:`smart_on_fhir.tokens`) carry ``scope``, ``client_id``,
``aud`` = the FHIR base, and the SMART launch context (``patient``, ``encounter``) plus
``fhirUser``; backend-services tokens live at most 5 minutes and carry the client's bound
``organization``. The token response adds the SMART launch context fields
(app-launch.md §"Response": ``patient``, ``encounter``, ``need_patient_banner``,
``smart_style_url``), an OpenID Connect ``id_token`` when ``openid`` was granted, and a
refresh token when ``offline_access``/``online_access`` was granted and the grant allows
it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

from authlib.oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749.errors import InvalidScopeError
from sqlalchemy.engine import Connection

from .clients import Client, get_client
from .keys import KeySet
from .scopes import ScopeSet, parse_scopes
from .tables import tokens
from .tokens import issue_access_token, issue_id_token

__all__ = [
    "AuthSettings",
    "Exchange",
    "Grantee",
    "IssuedToken",
    "OAuthResponse",
    "SmartAuthorizationServer",
    "Urls",
    "current_exchange",
    "exchange",
    "sha256_hex",
]

log = logging.getLogger("smart_on_fhir")

_CURRENT: ContextVar[Exchange | None] = ContextVar("smart_exchange", default=None)
_BEARER: Final = "Bearer"


def sha256_hex(value: str) -> str:
    """Hex SHA-256 of a high-entropy secret (codes, refresh tokens, client secrets)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Lifetimes (seconds) and policies of the authorization server."""

    access_token_lifetime: int = 3600  # SMART app-launch: SHOULD be at most one hour
    backend_token_lifetime: int = 300  # backend-services.md: SHOULD be at most 5 minutes
    refresh_token_lifetime: int = 30 * 24 * 3600  # offline_access
    online_refresh_token_lifetime: int = 12 * 3600  # online_access
    authorization_code_lifetime: int = 60  # app-launch.md: about one minute
    auth_request_lifetime: int = 900  # login + picker + consent
    id_token_lifetime: int = 3600
    assertion_max_lifetime: int = 300  # backend-services.md: exp at most 5 minutes ahead
    login_max_failures: int = 5
    login_window: int = 900
    insecure_transport: bool = False
    dynamic_registration: bool = True
    registration_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.access_token_lifetime <= 3600:
            raise ValueError("access tokens live at most one hour (SMART app-launch)")
        if not 0 < self.backend_token_lifetime <= 300:
            raise ValueError("backend-services tokens live at most five minutes")


@dataclass(frozen=True, slots=True)
class Urls:
    """The absolute URLs of one deployment, as the requesting client sees them.

    :param fhir_base: the FHIR base; the ``aud`` of every access token
    :param auth_base: where the authorization endpoints are mounted
    :param issuer: ``iss`` of access tokens and id_tokens (defaults to the FHIR base, so
        ``{iss}/.well-known/openid-configuration`` is served next to the SMART document)
    """

    fhir_base: str
    auth_base: str
    issuer: str

    @classmethod
    def derive(
        cls,
        fhir_base: str,
        *,
        fhir_path: str,
        auth_path: str = "/auth",
        public_auth_url: str | None = None,
        issuer: str | None = None,
    ) -> Urls:
        """URLs from the FHIR base: the auth server sits at the same origin, *auth_path*."""
        fhir_base = fhir_base.rstrip("/")
        if public_auth_url:
            auth_base = public_auth_url.rstrip("/")
        else:
            suffix = fhir_path.rstrip("/")
            root = fhir_base[: -len(suffix)] if suffix and fhir_base.endswith(suffix) else fhir_base
            auth_base = root + "/" + auth_path.strip("/")
        return cls(fhir_base, auth_base, (issuer or fhir_base).rstrip("/"))

    @property
    def authorize(self) -> str:
        return f"{self.auth_base}/authorize"

    @property
    def token(self) -> str:
        return f"{self.auth_base}/token"

    @property
    def introspect(self) -> str:
        return f"{self.auth_base}/introspect"

    @property
    def revoke(self) -> str:
        return f"{self.auth_base}/revoke"

    @property
    def register(self) -> str:
        return f"{self.auth_base}/register"

    @property
    def jwks(self) -> str:
        return f"{self.auth_base}/jwks"

    @property
    def manage(self) -> str:
        return f"{self.auth_base}/manage"

    @property
    def style(self) -> str:
        return f"{self.auth_base}/smart-style.json"

    @property
    def interact(self) -> str:
        return f"{self.auth_base}/interact"

    def absolute_fhir_user(self, fhir_user: str | None) -> str | None:
        """``Patient/1`` → ``{fhir_base}/Patient/1`` (absolute URLs pass through)."""
        if fhir_user is None or "://" in fhir_user:
            return fhir_user
        return f"{self.fhir_base}/{fhir_user}"


@dataclass(frozen=True, slots=True)
class Grantee:
    """Who an authorization code or refresh token was granted to, with the launch context
    that goes into the token (authlib passes this as the grant's "user")."""

    user_id: str
    fhir_user: str | None
    patient: str | None = None
    encounter: str | None = None
    need_patient_banner: bool = True
    auth_time: int | None = None
    nonce: str | None = None
    intent: str | None = None

    def context(self) -> dict[str, Any]:
        """The JSON stored with codes and tokens."""
        return {
            "fhir_user": self.fhir_user,
            "patient": self.patient,
            "encounter": self.encounter,
            "need_patient_banner": self.need_patient_banner,
            "auth_time": self.auth_time,
            "intent": self.intent,
        }

    @classmethod
    def from_context(cls, user_id: str, context: Mapping[str, Any], nonce: str | None) -> Grantee:
        return cls(
            user_id=user_id,
            fhir_user=context.get("fhir_user"),
            patient=context.get("patient"),
            encounter=context.get("encounter"),
            need_patient_banner=bool(context.get("need_patient_banner", True)),
            auth_time=context.get("auth_time"),
            nonce=nonce,
            intent=context.get("intent"),
        )


@dataclass(slots=True)
class IssuedToken:
    """What the token generator made, for :meth:`SmartAuthorizationServer.save_token`."""

    jti: str
    grant_type: str
    client_id: str
    user_id: str | None
    scope: str
    context: dict[str, Any]
    issued_at: int
    expires_at: int
    refresh_hash: str | None
    refresh_expires_at: int | None


@dataclass(slots=True)
class Exchange:
    """One request's view of the world, bound while authlib runs (see :func:`exchange`)."""

    conn: Connection
    urls: Urls
    now: int
    issued: IssuedToken | None = None
    family_id: str | None = None


def current_exchange() -> Exchange:
    """The :class:`Exchange` bound by :func:`exchange`.

    :raises RuntimeError: outside :func:`exchange`
    """
    value = _CURRENT.get()
    if value is None:
        raise RuntimeError("no authorization exchange is active on this thread")
    return value


@contextmanager
def exchange(conn: Connection, urls: Urls, now: int) -> Iterator[Exchange]:
    """Bind *conn*, *urls* and *now* for authlib's callbacks on this thread."""
    value = Exchange(conn, urls, now)
    token = _CURRENT.set(value)
    try:
        yield value
    finally:
        _CURRENT.reset(token)


@dataclass(frozen=True, slots=True)
class OAuthResponse:
    """A framework-neutral response: what authlib's ``handle_response`` receives."""

    status: int
    body: Any
    headers: tuple[tuple[str, str], ...]

    @property
    def location(self) -> str | None:
        for name, value in self.headers:
            if name.lower() == "location":
                return value
        return None


class SmartAuthorizationServer(AuthorizationServer):  # type: ignore[misc]
    """authlib's authorization server with SMART tokens and our storage.

    :param keys: returns the current :class:`KeySet` (loaded lazily, cached by the caller)
    :param settings: lifetimes and policies
    """

    def __init__(self, keys: Callable[[], KeySet], settings: AuthSettings) -> None:
        super().__init__(scopes_supported=None)
        self.keys = keys
        self.settings = settings
        self.register_token_generator("default", self._generate_token)

    # -- authlib framework hooks ---------------------------------------------------------

    def query_client(self, client_id: str) -> Client | None:
        """RFC 6749 §2.2: the active client with this id."""
        return get_client(current_exchange().conn, client_id)

    def create_oauth2_request(self, request: Any) -> Any:
        return request  # built by the Starlette adapter before the thread hop

    def create_json_request(self, request: Any) -> Any:
        return request

    def handle_response(self, status: int, body: Any, headers: Any) -> OAuthResponse:
        return OAuthResponse(status, body, tuple((str(k), str(v)) for k, v in headers))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        if name == "after_revoke_token":
            log.info("token revoked for client %s", getattr(kwargs.get("client"), "client_id", "?"))

    def validate_requested_scope(self, scope: str | None) -> None:
        """SMART scopes are a grammar, not a list (SAL §"Scopes"): a request is acceptable
        when at least one of its tokens parses; the rest MAY be ignored."""
        if scope and not parse_scopes(scope, on_invalid="ignore"):
            raise InvalidScopeError()

    # -- tokens ----------------------------------------------------------------------------

    def _generate_token(
        self,
        grant_type: str,
        client: Client,
        user: Grantee | None = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        """authlib's token generator: RFC 9068 access token + SMART response fields."""
        ex = current_exchange()
        requested = parse_scopes(scope if scope else client.scope, on_invalid="ignore")
        granted = requested.narrow(client.scopes)  # never beyond the registration
        if not granted or (user is None and not granted.resource_scopes):
            raise InvalidScopeError(description="None of the requested scopes can be granted.")
        keys = self.keys()
        jti = secrets.token_urlsafe(24)
        backend = user is None
        lifetime = (
            self.settings.backend_token_lifetime if backend else self.settings.access_token_lifetime
        )
        fhir_user = None if user is None else ex.urls.absolute_fhir_user(user.fhir_user)
        extra = {"organization": client.organization} if backend and client.organization else None
        access_token = issue_access_token(
            keys,
            issuer=ex.urls.issuer,
            audience=ex.urls.fhir_base,
            subject=client.client_id if user is None else user.user_id,
            client_id=client.client_id,
            scope=granted,
            lifetime_s=lifetime,
            now=ex.now,
            jti=jti,
            patient=None if user is None else user.patient,
            encounter=None if user is None else user.encounter,
            fhir_user=fhir_user,
            extra_claims=extra,
        )
        response: dict[str, Any] = {
            "access_token": access_token,
            "token_type": _BEARER,
            "expires_in": lifetime,
            "scope": str(granted),
        }
        refresh_token = refresh_hash = refresh_expires = None
        if user is not None and include_refresh_token and granted.requests_refresh_token:
            refresh_token = secrets.token_urlsafe(32)
            refresh_hash = sha256_hex(refresh_token)
            offline = granted.has("offline_access")
            refresh_expires = ex.now + (
                self.settings.refresh_token_lifetime
                if offline
                else self.settings.online_refresh_token_lifetime
            )
            response["refresh_token"] = refresh_token
        context: dict[str, Any] = {"organization": client.organization} if backend else {}
        if user is not None:
            context = user.context()
            self._launch_fields(response, user, granted, ex.urls)
            if granted.has("openid"):
                response["id_token"] = issue_id_token(
                    keys,
                    issuer=ex.urls.issuer,
                    client_id=client.client_id,
                    subject=user.user_id,
                    lifetime_s=self.settings.id_token_lifetime,
                    now=ex.now,
                    fhir_user=fhir_user,
                    nonce=user.nonce,
                    access_token=access_token,
                    auth_time=user.auth_time,
                )
        ex.issued = IssuedToken(
            jti=jti,
            grant_type=grant_type,
            client_id=client.client_id,
            user_id=None if user is None else user.user_id,
            scope=str(granted),
            context=context,
            issued_at=ex.now,
            expires_at=ex.now + lifetime,
            refresh_hash=refresh_hash,
            refresh_expires_at=refresh_expires,
        )
        return response

    @staticmethod
    def _launch_fields(
        response: dict[str, Any], user: Grantee, granted: ScopeSet, urls: Urls
    ) -> None:
        """SMART app-launch §"Response": launch context fields."""
        if user.patient is not None:
            response["patient"] = user.patient
        if user.encounter is not None:
            response["encounter"] = user.encounter
        if user.intent is not None:
            response["intent"] = user.intent
        response["need_patient_banner"] = user.need_patient_banner
        response["smart_style_url"] = urls.style

    def save_token(self, token: Mapping[str, Any], request: Any) -> None:
        """Store the token row; rows of one authorization share a family id (so reuse of
        a rotated refresh token or of the code can revoke them all)."""
        ex = current_exchange()
        issued = ex.issued
        if issued is None:  # pragma: no cover - generator always sets it
            raise RuntimeError("save_token without a generated token")
        previous = getattr(request, "refresh_token", None)
        family = getattr(previous, "family_id", None) or secrets.token_urlsafe(24)
        ex.family_id = family
        ex.conn.execute(
            tokens.insert().values(
                jti=issued.jti,
                family_id=family,
                client_id=issued.client_id,
                user_id=issued.user_id,
                grant_type=issued.grant_type,
                scope=issued.scope,
                context=json.dumps(issued.context),
                issued_at=issued.issued_at,
                expires_at=issued.expires_at,
                refresh_hash=issued.refresh_hash,
                refresh_expires_at=issued.refresh_expires_at,
            )
        )


#: A connection factory: a context manager yielding a connection inside a transaction.
ConnectionScope = Callable[[], AbstractContextManager[Connection]]
