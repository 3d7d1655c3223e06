"""authlib grants configured for SMART App Launch 2.2.

* :class:`SmartAuthorizationCodeGrant`: RFC 6749 §4.1 with SMART's authorize parameters
  (app-launch.md §"Obtain authorization code": ``aud`` SHALL be the FHIR base, ``state``
  is required, ``launch`` binds an EHR launch context) and single-use codes whose reuse
  revokes the tokens issued for them (RFC 6749 §4.1.2).
* :class:`SmartCodeChallenge`: RFC 7636 PKCE with ``S256`` only; required for public
  clients, also at the authorization endpoint (SMART conformance: ``plain`` SHALL NOT be
  supported).
* :class:`SmartRefreshTokenGrant`: RFC 6749 §6 with rotation; a rotated refresh token
  presented again revokes its whole family (RFC 9700 §4.14.2). A requested ``scope`` must
  be covered by the original grant, judged by the SMART grammar.
* :class:`SmartClientCredentialsGrant`: SMART backend services (``private_key_jwt`` only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import (
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
)
from authlib.oauth2.rfc7636 import CodeChallenge

from .launches import get_launch
from .records import (
    AuthCodeRecord,
    TokenRecord,
    find_refresh_token,
    load_code,
    mark_refresh_used,
    revoke_family,
)
from .scopes import parse_scopes
from .server import Grantee, current_exchange, sha256_hex
from .tables import auth_codes
from .users import get_user

__all__ = [
    "TOKEN_AUTH_METHODS",
    "AuthorizationDecision",
    "SmartAuthorizationCodeGrant",
    "SmartClientCredentialsGrant",
    "SmartCodeChallenge",
    "SmartRefreshTokenGrant",
]

#: Client authentication at the token endpoint, in the order they are tried.
TOKEN_AUTH_METHODS: Final = [
    "client_secret_basic",
    "private_key_jwt",
    "client_secret_post",
    "none",
]


@dataclass(frozen=True, slots=True)
class AuthorizationDecision:
    """What the user approved on the consent screen: passed to authlib as ``grant_user``."""

    grantee: Grantee
    scope: str


class SmartCodeChallenge(CodeChallenge):  # type: ignore[misc]
    """PKCE, S256 only (SMART 2.2 conformance: ``code_challenge_methods_supported`` SHALL
    include ``S256`` and SHALL NOT include ``plain``)."""

    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        challenge = data.get("code_challenge")
        if challenge is None and getattr(grant.request.client, "is_public", False):
            raise InvalidRequestError("Public clients must send a S256 code_challenge.")
        if challenge is not None and data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256.")
        super().validate_code_challenge(grant, redirect_uri)


def _same_base(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


class SmartAuthorizationCodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    """RFC 6749 §4.1 for SMART standalone and EHR launch."""

    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS

    def validate_authorization_request(self) -> str:
        """authlib's checks (client, redirect URI, response type, scope, PKCE), then SMART's
        (app-launch.md §"Obtain authorization code")."""
        redirect_uri: str = super().validate_authorization_request()
        request = self.request
        data = request.payload.data
        ex = current_exchange()
        audience = data.get("aud") or data.get("resource")
        if not audience or not _same_base(audience, ex.urls.fhir_base):
            raise InvalidRequestError(
                "aud must be this server's FHIR base URL.", redirect_uri=redirect_uri
            )
        if not data.get("state"):
            raise InvalidRequestError("state is required.", redirect_uri=redirect_uri)
        scopes = parse_scopes(request.scope, on_invalid="ignore")
        launch_id = data.get("launch")
        request.smart_launch = None
        if launch_id:
            launch = get_launch(ex.conn, launch_id, now=ex.now)
            client_id = request.client.get_client_id()
            if launch is None or launch.client_id not in (None, client_id):
                raise InvalidRequestError(
                    "The launch parameter is unknown or expired.", redirect_uri=redirect_uri
                )
            request.smart_launch = launch
        elif scopes.ehr_launch:
            raise InvalidRequestError(
                "The launch scope needs the launch parameter of an EHR launch.",
                redirect_uri=redirect_uri,
            )
        return redirect_uri

    def save_authorization_code(self, code: str, request: Any) -> None:
        decision: AuthorizationDecision = request.user
        ex = current_exchange()
        data = request.payload.data
        ex.conn.execute(
            auth_codes.insert().values(
                code_hash=sha256_hex(code),
                client_id=request.client.get_client_id(),
                user_id=decision.grantee.user_id,
                redirect_uri=data.get("redirect_uri") or "",
                scope=decision.scope,
                code_challenge=data.get("code_challenge"),
                code_challenge_method=data.get("code_challenge_method"),
                nonce=data.get("nonce"),
                context=json.dumps(decision.grantee.context()),
                auth_time=decision.grantee.auth_time or ex.now,
                expires_at=ex.now + ex_settings(self).authorization_code_lifetime,
            )
        )

    def query_authorization_code(self, code: str, client: Any) -> AuthCodeRecord | None:
        if not isinstance(code, str) or not code or len(code) > 256:
            return None
        ex = current_exchange()
        record = load_code(ex.conn, sha256_hex(code))
        if record is None or record.client_id != client.get_client_id():
            return None
        if record.used_at is not None:  # RFC 6749 §4.1.2: a code used twice
            if record.family_id:
                revoke_family(ex.conn, record.family_id, now=ex.now)
            return None
        if record.expires_at <= ex.now:
            return None
        return record

    def delete_authorization_code(self, authorization_code: AuthCodeRecord) -> None:
        ex = current_exchange()
        ex.conn.execute(
            auth_codes.update()
            .where(auth_codes.c.code_hash == authorization_code.code_hash)
            .values(used_at=ex.now, family_id=ex.family_id)
        )

    def authenticate_user(self, authorization_code: AuthCodeRecord) -> Grantee | None:
        user = get_user(current_exchange().conn, authorization_code.user_id)
        if user is None or not user.active:
            return None
        return Grantee.from_context(
            authorization_code.user_id, authorization_code.context, authorization_code.nonce
        )


class SmartRefreshTokenGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    """RFC 6749 §6 with rotation and reuse detection."""

    TOKEN_ENDPOINT_AUTH_METHODS = TOKEN_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token: str) -> TokenRecord | None:
        if not isinstance(refresh_token, str) or not refresh_token or len(refresh_token) > 256:
            return None
        ex = current_exchange()
        record = find_refresh_token(ex.conn, sha256_hex(refresh_token), now=ex.now)
        if record is None:
            return None
        if record.refresh_used_at is not None:  # a rotated token came back: stolen?
            revoke_family(ex.conn, record.family_id, now=ex.now)
            return None
        if record.is_revoked() or record.is_expired():
            return None
        return record

    def _validate_token_scope(self, token: TokenRecord) -> None:
        """SMART app-launch §"Refresh": the new scope must be within the original grant."""
        requested = self.request.payload.scope
        if requested and not parse_scopes(requested, on_invalid="ignore").covered_by(
            parse_scopes(token.get_scope(), on_invalid="ignore")
        ):
            raise InvalidScopeError()

    def authenticate_user(self, refresh_token: TokenRecord) -> Grantee | None:
        if refresh_token.user_id is None:
            return None
        return Grantee.from_context(refresh_token.user_id, refresh_token.context, None)

    def revoke_old_credential(self, refresh_token: TokenRecord) -> None:
        ex = current_exchange()
        if not mark_refresh_used(ex.conn, refresh_token.jti, now=ex.now):
            revoke_family(ex.conn, refresh_token.family_id, now=ex.now)  # lost a race: replay
            raise InvalidGrantError()


class SmartClientCredentialsGrant(grants.ClientCredentialsGrant):  # type: ignore[misc]
    """SMART backend services (backend-services.md): asymmetric client assertions only."""

    TOKEN_ENDPOINT_AUTH_METHODS = ["private_key_jwt"]


def ex_settings(grant: Any) -> Any:
    """The server's :class:`~smart_on_fhir.server.AuthSettings`."""
    return grant.server.settings
