"""The Starlette/FastAPI face of the authorization server: :class:`SmartAuth` and its routes.

authlib has no Starlette server integration (authlib#278), so this module is the thin
adapter: each endpoint awaits the body, builds an authlib request, runs the synchronous
authlib core on a worker thread inside one database transaction
(:meth:`SmartAuth.run`), and maps the neutral :class:`~smart_on_fhir.server.OAuthResponse`
to a Starlette response.

Routes, relative to the auth base (``/auth`` by default):

=====================  ================================================================
``/authorize``         GET/POST, RFC 6749 §4.1.1 (see :mod:`smart_on_fhir.login`)
``/interact``          the login, patient picker and consent pages
``/token``             POST, RFC 6749 §3.2 (authorization_code, refresh_token,
                       client_credentials)
``/introspect``        POST, RFC 7662
``/revoke``            POST, RFC 7009
``/register``          POST, RFC 7591 (when enabled)
``/manage``            SMART ``management_endpoint``: connected apps, revoke
``/jwks``              the public JWK Set (RFC 7517 §5)
``/smart-style.json``  SMART ``smart_style_url`` document
=====================  ================================================================

Discovery (``{fhir base}/.well-known/smart-configuration`` and
``/.well-known/openid-configuration``) is built by :meth:`SmartAuth.smart_configuration`
and :meth:`SmartAuth.openid_configuration`; the host mounts them where its FHIR base is.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from authlib.oauth2.rfc6749.errors import OAuth2Error
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .client_auth import JWKSFetcher, PrivateKeyJWT
from .discovery import capability_security, openid_configuration, smart_configuration
from .endpoints import (
    SmartIntrospectionEndpoint,
    SmartRegistrationEndpoint,
    SmartRevocationEndpoint,
)
from .grants import (
    SmartAuthorizationCodeGrant,
    SmartClientCredentialsGrant,
    SmartCodeChallenge,
    SmartRefreshTokenGrant,
)
from .keys import KeySet
from .login import (
    AuthFlow,
    PatientPicker,
    authorize_endpoint,
    interact_get,
    interact_post,
    oauth_request,
    public_uri,
)
from .manage import manage_get, manage_post
from .protect import SmartResourceProtector
from .requests import SmartJsonRequest
from .server import (
    AuthSettings,
    ConnectionScope,
    OAuthResponse,
    SmartAuthorizationServer,
    Urls,
    exchange,
)

__all__ = ["SMART_STYLE", "SmartAuth", "build_router", "oauth_response"]

#: The ``smart_style_url`` document (SMART app-launch §"Styling"), neutral colours.
SMART_STYLE: dict[str, Any] = {
    "color_background": "#f4f6f8",
    "color_error": "#8a1c12",
    "color_highlight": "#0b5cad",
    "color_modal_backdrop": "",
    "color_success": "#1e7d32",
    "color_text": "#1b2430",
    "dim_border_radius": "6px",
    "dim_font_size": "16px",
    "dim_spacing_size": "16px",
    "font_family_body": "system-ui, sans-serif",
    "font_family_heading": "system-ui, sans-serif",
}


@dataclass
class SmartAuth:
    """Everything the authorization server needs from its host, and the built server.

    :param transaction: opens a write transaction (``with transaction() as conn``)
    :param keys: returns the signing :class:`KeySet` (load lazily; cache it)
    :param urls_for: the deployment's URLs as seen by this request
    :param patient_picker: the patients a user may choose (for ``launch/patient``)
    :param jwks_fetcher: fetches asymmetric clients' ``jwks_uri`` documents
    :param clock: seconds since the epoch
    """

    transaction: ConnectionScope
    keys: Callable[[], KeySet]
    urls_for: Callable[[Request], Urls]
    patient_picker: PatientPicker
    settings: AuthSettings = field(default_factory=AuthSettings)
    jwks_fetcher: JWKSFetcher = field(default_factory=JWKSFetcher)
    clock: Callable[[], float] = time.time
    server: SmartAuthorizationServer = field(init=False)
    protector: SmartResourceProtector = field(init=False)
    flow: AuthFlow = field(init=False)

    def __post_init__(self) -> None:
        server = SmartAuthorizationServer(self.keys, self.settings)
        server.register_client_auth_method(
            "private_key_jwt",
            PrivateKeyJWT(self.jwks_fetcher, max_lifetime=self.settings.assertion_max_lifetime),
        )
        server.register_grant(SmartAuthorizationCodeGrant, [SmartCodeChallenge(required=True)])
        server.register_grant(SmartRefreshTokenGrant)
        server.register_grant(SmartClientCredentialsGrant)
        server.register_endpoint(SmartIntrospectionEndpoint(server, self.keys))
        server.register_endpoint(SmartRevocationEndpoint(server, self.keys))
        if self.settings.dynamic_registration:
            server.register_endpoint(
                SmartRegistrationEndpoint(server, initial_token=self.settings.registration_token)
            )
        self.server = server
        self.protector = SmartResourceProtector(self.keys)
        self.flow = AuthFlow(server, self.patient_picker, insecure=self.settings.insecure_transport)

    def now(self) -> int:
        return int(self.clock())

    def run(self, urls: Urls, fn: Callable[..., Any], *args: Any) -> Any:
        """Run *fn* (synchronous) inside one write transaction and one exchange."""
        with self.transaction() as conn, exchange(conn, urls, self.now()):
            return fn(*args)

    # -- discovery ---------------------------------------------------------------------

    def smart_configuration(self, urls: Urls) -> dict[str, Any]:
        """SMART 2.2 conformance.md §"Metadata" for this deployment."""
        return smart_configuration(
            urls.issuer,
            token_endpoint=urls.token,
            authorization_endpoint=urls.authorize,
            jwks_uri=urls.jwks,
            registration_endpoint=urls.register if self.settings.dynamic_registration else None,
            management_endpoint=urls.manage,
            introspection_endpoint=urls.introspect,
            revocation_endpoint=urls.revoke,
            grant_types_supported=("authorization_code", "client_credentials", "refresh_token"),
        )

    def openid_configuration(self, urls: Urls) -> dict[str, Any]:
        """OpenID Connect Discovery 1.0 §3 for this deployment."""
        return openid_configuration(
            urls.issuer,
            authorization_endpoint=urls.authorize,
            token_endpoint=urls.token,
            jwks_uri=urls.jwks,
            registration_endpoint=urls.register if self.settings.dynamic_registration else None,
        )

    def capability_security(self, urls: Urls) -> dict[str, Any]:
        """``CapabilityStatement.rest[0].security`` with the ``oauth-uris`` extension."""
        return capability_security(
            urls.authorize,
            urls.token,
            register=urls.register if self.settings.dynamic_registration else None,
            manage=urls.manage,
            introspect=urls.introspect,
            revoke=urls.revoke,
        )


def oauth_response(result: OAuthResponse) -> Response:
    """Map authlib's ``(status, body, headers)`` to a Starlette response."""
    headers = dict(result.headers)
    if isinstance(result.body, dict | list):
        headers.pop("Content-Type", None)
        return Response(
            json.dumps(result.body),
            status_code=result.status,
            headers=headers,
            media_type="application/json",
        )
    return Response(result.body or "", status_code=result.status, headers=headers)


def _malformed_basic(value: str | None) -> bool:
    """An ``Authorization: Basic`` header that is not base64 of UTF-8 ``id:secret`` (RFC 7617
    §2, RFC 6749 §2.3.1). authlib's parser assumes well-formed input and raises on the rest."""
    if value is None or " " not in value:
        return False
    parts = value.split(None, 1)
    if parts[0].lower() != "basic":
        return False
    if len(parts) < 2:
        return True
    try:
        decoded = base64.b64decode(parts[1]).decode("utf-8")
    except (binascii.Error, ValueError):
        return True
    return ":" not in decoded


def _error(status: int, error: str, description: str) -> Response:
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=status,
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


def build_router(auth: SmartAuth) -> APIRouter:
    """The authorization server's routes (mount at the auth path)."""
    router = APIRouter()
    insecure = auth.settings.insecure_transport

    def auth_path(request: Request) -> str:
        """The cookie path: the auth base's path as the browser sees it (behind a host
        mount or a path-prefixing proxy the request's own path is not that)."""
        return urlsplit(auth.urls_for(request).auth_base).path.rstrip("/")

    @router.api_route("/authorize", methods=["GET", "POST"], include_in_schema=False)
    async def authorize(request: Request) -> Response:
        return await authorize_endpoint(
            request,
            flow=auth.flow,
            urls=auth.urls_for(request),
            run=auth.run,
            cookie_path=auth_path(request) or "/",
        )

    @router.get("/interact", include_in_schema=False)
    async def interact(request: Request) -> Response:
        return await interact_get(
            request, flow=auth.flow, urls=auth.urls_for(request), run=auth.run
        )

    @router.post("/interact", include_in_schema=False)
    async def interact_submit(request: Request) -> Response:
        return await interact_post(
            request, flow=auth.flow, urls=auth.urls_for(request), run=auth.run
        )

    async def _endpoint(request: Request, call: Callable[[Any], OAuthResponse]) -> Response:
        urls = auth.urls_for(request)
        if _malformed_basic(request.headers.get("authorization")):
            return _error(401, "invalid_client", "Malformed HTTP Basic credentials.")
        try:
            oreq = await oauth_request(request, urls, insecure_transport=insecure)
        except OAuth2Error as error:
            return _error(400, error.error or "invalid_request", error.description or "Use https.")
        result = await run_in_threadpool(auth.run, urls, call, oreq)
        return oauth_response(result)

    @router.post("/token")
    async def token(request: Request) -> Response:
        """RFC 6749 §3.2 token endpoint."""
        return await _endpoint(request, auth.server.create_token_response)

    @router.post("/introspect")
    async def introspect(request: Request) -> Response:
        """RFC 7662 token introspection."""
        return await _endpoint(
            request, lambda r: auth.server.create_endpoint_response("introspection", r)
        )

    @router.post("/revoke")
    async def revoke(request: Request) -> Response:
        """RFC 7009 token revocation."""
        return await _endpoint(
            request, lambda r: auth.server.create_endpoint_response("revocation", r)
        )

    if auth.settings.dynamic_registration:

        @router.post("/register")
        async def register(request: Request) -> Response:
            """RFC 7591 dynamic client registration (JSON body)."""
            try:
                data = json.loads(await request.body() or b"null")
            except (ValueError, RecursionError):  # not JSON, or nested past Python's limit
                data = None
            if not isinstance(data, dict):
                return _error(400, "invalid_client_metadata", "The body must be a JSON object.")
            try:
                jreq = SmartJsonRequest(
                    "POST",
                    public_uri(request, auth.urls_for(request)),
                    request.headers,
                    data,
                    insecure_transport=insecure,
                )
            except OAuth2Error:
                return _error(400, "invalid_request", "Use https.")

            def call(r: Any) -> OAuthResponse:
                result: OAuthResponse = auth.server.create_endpoint_response(
                    "client_registration", r
                )
                return result

            result = await run_in_threadpool(auth.run, auth.urls_for(request), call, jreq)
            return oauth_response(result)

    @router.get("/manage", include_in_schema=False)
    async def manage(request: Request) -> Response:
        """SMART ``management_endpoint``: the apps a person connected, with revoke buttons."""
        return await manage_get(
            request, server=auth.server, urls=auth.urls_for(request), run=auth.run
        )

    @router.post("/manage", include_in_schema=False)
    async def manage_submit(request: Request) -> Response:
        return await manage_post(
            request,
            server=auth.server,
            urls=auth.urls_for(request),
            run=auth.run,
            cookie_path=auth_path(request) or "/",
        )

    @router.get("/jwks")
    async def jwks() -> Response:
        """The public keys that verify our access tokens and id_tokens (RFC 7517 §5)."""
        keys = await run_in_threadpool(auth.keys)
        return JSONResponse(keys.jwks(), headers={"Cache-Control": "public, max-age=300"})

    @router.get("/smart-style.json")
    async def style() -> Response:
        """SMART ``smart_style_url`` (app-launch §"Customizing an app's style")."""
        return JSONResponse(SMART_STYLE, headers={"Cache-Control": "public, max-age=3600"})

    return router
