"""authlib endpoints: RFC 7662 introspection, RFC 7009 revocation, RFC 7591 registration.

* **Introspection** (SMART token-introspection.md): always answers 200; ``{"active": false}``
  for anything that is not an active token of ours. An active access token yields
  ``scope``, ``client_id``, ``exp``, ``iat``, ``iss``, ``sub``, ``aud``, ``token_type`` and
  the launch context (``patient``, ``encounter``, ``fhirUser``) — the same values as the
  token response and the id_token. The caller authenticates as a client (which may then
  introspect only its own tokens) or, as a resource server, with
  ``Authorization: Bearer <an active access token>`` (the endpoint "MAY be protected by a
  bearer token").
* **Revocation**: a client revokes its own access or refresh token; the whole
  authorization (token family) is revoked, so the FHIR API rejects its access tokens at
  their next use. Unknown tokens get 200 as RFC 7009 §2.2 requires.
* **Registration**: open by default (or behind an initial access token) for user-facing
  apps only: ``authorization_code`` (+ ``refresh_token``), public, symmetric or
  asymmetric with an inline ``jwks``. ``client_credentials`` clients and ``jwks_uri``
  (which the server would fetch) are reserved to the administrator's CLI.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, Final

from authlib.oauth2.rfc6749.errors import InvalidClientError, OAuth2Error
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7591 import ClientRegistrationEndpoint
from authlib.oauth2.rfc7591.errors import InvalidClientMetadataError
from authlib.oauth2.rfc7662 import IntrospectionEndpoint

from .clients import ClientError, create_client, new_client_id
from .errors import InvalidToken
from .grants import TOKEN_AUTH_METHODS
from .keys import KeySet
from .records import TokenRecord, find_refresh_token, find_token, revoke_family
from .scopes import Context, ScopeSet, parse_scopes
from .server import current_exchange, sha256_hex
from .tokens import AccessTokenClaims, verify_access_token

__all__ = [
    "RESOURCE_SERVER",
    "SmartIntrospectionEndpoint",
    "SmartRegistrationEndpoint",
    "SmartRevocationEndpoint",
    "find_access_token",
    "query_token",
]


class _ResourceServer:
    """The caller of introspection when it authenticated with a bearer token."""

    client_id = "__resource_server__"

    def get_client_id(self) -> str:
        return self.client_id


RESOURCE_SERVER: Final = _ResourceServer()


def _verify(keys: KeySet, token: str) -> AccessTokenClaims | None:
    ex = current_exchange()
    try:
        return verify_access_token(
            token,
            keyset_or_jwks=keys,
            issuer=ex.urls.issuer,
            audience=ex.urls.fhir_base,
            now=ex.now,
            leeway=0,
        )
    except InvalidToken:
        return None


def find_access_token(keys: KeySet, token: str) -> TokenRecord | None:
    """The stored row of an access token: a JWT of ours with a valid signature and claims."""
    if not isinstance(token, str) or token.count(".") != 2 or len(token) > 16 * 1024:
        return None
    claims = _verify(keys, token)
    if claims is None:
        return None
    ex = current_exchange()
    return find_token(ex.conn, claims.jti, now=ex.now)


def _find_refresh(token: str) -> TokenRecord | None:
    if not isinstance(token, str) or not token or len(token) > 256:
        return None
    ex = current_exchange()
    return find_refresh_token(ex.conn, sha256_hex(token), now=ex.now)


def query_token(keys: KeySet, token: str, hint: str | None) -> TokenRecord | None:
    """The stored token for a presented access or refresh token, the hinted type first
    (RFC 7009 §2.1 and RFC 7662 §2.1: a wrong hint only changes the search order)."""
    if hint == "refresh_token":
        return _find_refresh(token) or find_access_token(keys, token)
    return find_access_token(keys, token) or _find_refresh(token)


def _bearer(request: Any) -> str | None:
    value = request.headers.get("Authorization") or ""
    scheme, _, credentials = value.partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


class SmartIntrospectionEndpoint(IntrospectionEndpoint):  # type: ignore[misc]
    """RFC 7662 for SMART (token-introspection.md)."""

    CLIENT_AUTH_METHODS = TOKEN_AUTH_METHODS

    def __init__(self, server: Any, keys: Callable[[], KeySet]) -> None:
        super().__init__(server)
        self._keys = keys

    def authenticate_endpoint_client(self, request: Any) -> Any:
        bearer = _bearer(request)
        if bearer is not None:
            record = find_access_token(self._keys(), bearer)
            if record is None or record.is_expired() or record.is_revoked():
                raise InvalidClientError(status_code=401, description="Invalid bearer token.")
            request.client = RESOURCE_SERVER
            return RESOURCE_SERVER
        return super().authenticate_endpoint_client(request)

    def check_permission(self, token: TokenRecord, client: Any, request: Any) -> bool:
        return client is RESOURCE_SERVER or token.check_client(client)

    def query_token(self, token_string: str, token_type_hint: str | None) -> TokenRecord | None:
        return query_token(self._keys(), token_string, token_type_hint)

    def introspect_token(self, token: TokenRecord) -> dict[str, Any]:
        ex = current_exchange()
        context = token.context
        payload: dict[str, Any] = {
            "active": True,
            "scope": token.scope,
            "client_id": token.client_id,
            "token_type": "Bearer" if token.kind == "access_token" else "refresh_token",
            "exp": token.expires_at if token.kind == "access_token" else token.refresh_expires_at,
            "iat": token.issued_at,
            "iss": ex.urls.issuer,
            "sub": token.user_id or token.client_id,
            "aud": ex.urls.fhir_base,
        }
        for name in ("patient", "encounter", "intent"):
            if context.get(name):
                payload[name] = context[name]
        if token.user_id is not None:  # the launch context fields of the token response
            payload["need_patient_banner"] = bool(context.get("need_patient_banner", True))
            payload["smart_style_url"] = ex.urls.style
        if context.get("fhir_user"):
            payload["fhirUser"] = ex.urls.absolute_fhir_user(context["fhir_user"])
        if token.kind == "access_token":
            payload["jti"] = token.jti
        return payload


class SmartRevocationEndpoint(RevocationEndpoint):  # type: ignore[misc]
    """RFC 7009; revoking any token of an authorization revokes all of it."""

    CLIENT_AUTH_METHODS = TOKEN_AUTH_METHODS

    def __init__(self, server: Any, keys: Callable[[], KeySet]) -> None:
        super().__init__(server)
        self._keys = keys

    def query_token(self, token_string: str, token_type_hint: str | None) -> TokenRecord | None:
        return query_token(self._keys(), token_string, token_type_hint)

    def revoke_token(self, token: TokenRecord, request: Any) -> None:
        ex = current_exchange()
        revoke_family(ex.conn, token.family_id, now=ex.now)


class _InvalidInitialToken(OAuth2Error):  # type: ignore[misc]
    """RFC 6750 §3.1 for the registration endpoint's initial access token."""

    error = "invalid_token"
    status_code = 401

    def get_headers(self) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = super().get_headers()
        return [*headers, ("WWW-Authenticate", 'Bearer error="invalid_token"')]


_DYNAMIC_GRANTS: Final = frozenset({"authorization_code", "refresh_token"})
_DYNAMIC_METHODS: Final = {
    "none": "public",
    "client_secret_basic": "confidential-symmetric",
    "client_secret_post": "confidential-symmetric",
    "private_key_jwt": "confidential-asymmetric",
}
_DEFAULT_APP_SCOPE: Final = (
    "openid fhirUser profile launch launch/patient offline_access online_access "
    "patient/*.cruds user/*.cruds patient/*.* user/*.*"
)


#: JSON types of the RFC 7591 §2 client metadata members (``list``: an array of strings).
_METADATA_TYPES: Final[dict[str, type]] = {
    "redirect_uris": list,
    "grant_types": list,
    "response_types": list,
    "contacts": list,
    "token_endpoint_auth_method": str,
    "client_name": str,
    "client_uri": str,
    "logo_uri": str,
    "scope": str,
    "tos_uri": str,
    "policy_uri": str,
    "jwks_uri": str,
    "jwks": dict,
    "software_id": str,
    "software_version": str,
    "software_statement": str,
}


def _has_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str) and "\x00" in item:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class SmartRegistrationEndpoint(ClientRegistrationEndpoint):  # type: ignore[misc]
    """RFC 7591 dynamic registration of SMART apps (not backend services)."""

    def __init__(self, server: Any, *, initial_token: str | None) -> None:
        super().__init__(server)
        self._initial_token = initial_token

    def authenticate_token(self, request: Any) -> Any:
        """RFC 7591 §3: open registration, or an initial access token (RFC 6750)."""
        if self._initial_token is None:
            return True
        presented = _bearer(request) or ""
        if not hmac.compare_digest(presented.encode(), self._initial_token.encode()):
            raise _InvalidInitialToken()
        return True

    def extract_client_metadata(self, request: Any) -> dict[str, Any]:
        """RFC 7591 §2 metadata, after a type check of every member we know (authlib's claim
        checks assume the declared JSON types and fail on, say, a number in redirect_uris)."""
        data = request.payload.data
        if isinstance(data, dict):
            for name, value in data.items():
                kind = _METADATA_TYPES.get(name)
                if kind is list and not (
                    isinstance(value, list) and all(isinstance(v, str) for v in value)
                ):
                    raise InvalidClientMetadataError(f"{name} must be an array of strings.")
                if kind is not None and kind is not list and not isinstance(value, kind):
                    raise InvalidClientMetadataError(f"{name} has the wrong JSON type.")
                if _has_nul(value):  # PostgreSQL cannot store U+0000
                    raise InvalidClientMetadataError("A metadata value contains a NUL character.")
            jwks = data.get("jwks")
            keys = jwks.get("keys") if isinstance(jwks, dict) else None
            if jwks is not None and not (
                isinstance(keys, list) and all(isinstance(k, dict) for k in keys)
            ):
                raise InvalidClientMetadataError("jwks must be a JWK Set with a 'keys' array.")
        try:
            metadata: dict[str, Any] = super().extract_client_metadata(request)
        except (KeyError, TypeError, ValueError):  # a claim check choked on a malformed value
            raise InvalidClientMetadataError("The client metadata is malformed.") from None
        return metadata

    def get_server_metadata(self) -> dict[str, Any]:
        return {
            "grant_types_supported": sorted(_DYNAMIC_GRANTS),
            "response_types_supported": ["code"],
            "token_endpoint_auth_methods_supported": sorted(_DYNAMIC_METHODS),
        }

    def generate_client_info(self, request: Any) -> dict[str, Any]:
        return {
            "client_id": new_client_id(),
            "client_id_issued_at": current_exchange().now,
        }

    def save_client(
        self, client_info: dict[str, Any], client_metadata: dict[str, Any], request: Any
    ) -> Any:
        method = client_metadata.get("token_endpoint_auth_method", "client_secret_basic")
        if method not in _DYNAMIC_METHODS:
            raise InvalidClientMetadataError("token_endpoint_auth_method is not supported.")
        grants = client_metadata.get("grant_types") or ["authorization_code"]
        if not set(grants) <= _DYNAMIC_GRANTS:
            raise InvalidClientMetadataError(
                "Only authorization_code and refresh_token can be registered dynamically."
            )
        if "jwks_uri" in client_metadata:
            raise InvalidClientMetadataError("Register an inline jwks instead of a jwks_uri.")
        requested = parse_scopes(
            client_metadata.get("scope") or _DEFAULT_APP_SCOPE, on_invalid="ignore"
        )
        scope = ScopeSet(
            s
            for s in requested
            if getattr(s, "context", None) is not Context.SYSTEM  # never system/ scopes
        )
        ex = current_exchange()
        try:
            created = create_client(
                ex.conn,
                client_name=client_metadata.get("client_name") or "Unnamed app",
                client_type=_DYNAMIC_METHODS[method],
                redirect_uris=client_metadata.get("redirect_uris") or [],
                scope=str(scope),
                now=ex.now,
                grant_types=grants,
                jwks=client_metadata.get("jwks"),
                client_id=client_info["client_id"],
                auth_method=method,
                dynamic=True,
            )
        except ClientError as error:
            raise InvalidClientMetadataError(_ascii(str(error))) from None
        request.smart_new_client = created
        return created.client

    def generate_client_registration_info(self, client: Any, request: Any) -> dict[str, Any]:
        """What the server decided (RFC 7591 §3.2.1): the granted scope and, for
        confidential-symmetric clients, the secret (shown once, only its digest is kept)."""
        created = request.smart_new_client
        info: dict[str, Any] = {
            "scope": created.client.scope,
            "grant_types": list(created.client.grant_types),
            "token_endpoint_auth_method": created.client.token_endpoint_auth_method,
        }
        if created.client_secret is not None:
            info["client_secret"] = created.client_secret
            info["client_secret_expires_at"] = 0
        return info


def _ascii(text: str) -> str:
    return "".join(c for c in text if 0x20 <= ord(c) <= 0x7E and c not in '"\\')
