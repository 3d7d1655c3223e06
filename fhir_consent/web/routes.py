"""Serving the patient app and wiring its live-updates stream into a FHIR application.

``install(app, app.state.fhir, WebSettings())`` (after :func:`fhir_consent.app.create_app`):

* ``GET {app_path}/`` — the app (``static/index.html``) and its ES modules, styles and icons,
  from this package only (no CDN), with a strict Content-Security-Policy (scripts and styles
  from this origin only, no inline code, no framing, no referrer: the authorization code
  travels in the URL);
* ``GET {app_path}/config.json`` — what the app needs to launch: its SMART client id, the
  FHIR base (the ``aud`` it asks for) and its scopes. It is not a back door: the app then
  talks only to the FHIR API and the authorization server, as any third-party SMART app would;
* ``GET {fhir base}/$events`` — the live-updates stream (:mod:`fhir_consent.web.events`), put
  ahead of the generic ``/{type}`` routes, and declared in the CapabilityStatement.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any
from urllib.parse import urlsplit

import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import RedirectResponse, Response

from fhir_consent.fhir.routes import FHIRContext
from fhir_consent.forwarded import public_root
from fhir_consent.web.config import WebSettings
from fhir_consent.web.events import build_events_router

__all__ = ["OPERATION_EVENTS", "build_app_router", "install"]

#: Canonical URL of the ``$events`` operation's definition (declared in the CapabilityStatement).
OPERATION_EVENTS = "urn:fhir-consent:OperationDefinition:events"

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
}


def _static_root() -> Traversable:
    return resources.files("fhir_consent.web").joinpath("static")


def _origin(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


def _headers(connect: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            f"connect-src 'self'{connect}; manifest-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        ),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",
    }


def _find(root: Traversable, path: str) -> Traversable | None:
    """The static file at ``path`` (segments of letters, digits, ``-_.``; no dot-files)."""
    node = root
    for part in path.split("/"):
        if not part or part.startswith(".") or not all(c.isalnum() or c in "-_." for c in part):
            return None
        node = node.joinpath(part)
    return node if node.is_file() else None


def build_app_router(ctx: FHIRContext, settings: WebSettings) -> APIRouter:
    """The routes that serve the app itself, relative to ``settings.app_path``."""
    router = APIRouter()
    root = _static_root()
    extra = {
        o
        for o in (
            _origin(ctx.settings.public_base_url),
            _origin(ctx.settings.smart_public_auth_url),
        )
        if o
    }
    headers = _headers("".join(f" {o}" for o in sorted(extra)))
    mount = settings.app_path.rstrip("/")

    def serve(path: str) -> Response:
        found = _find(root, path)
        if found is None:
            return Response("Not found", status_code=404, media_type="text/plain", headers=headers)
        suffix = "." + path.rsplit(".", 1)[-1] if "." in path else ""
        return Response(
            found.read_bytes(),
            media_type=_TYPES.get(suffix, "application/octet-stream"),
            headers=headers,
        )

    @router.get("", include_in_schema=False)
    async def app_root(request: Request) -> Response:
        # path-absolute, with the mount point (and a trusted proxy's prefix) in front
        return RedirectResponse(f"{urlsplit(public_root(request)).path}{mount}/", 308)

    @router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> Response:
        return serve("index.html")

    @router.get("/config.json", include_in_schema=False)
    async def config(request: Request) -> Response:
        body: dict[str, Any] = {
            "clientId": settings.client_id,
            "fhirBase": ctx.base(request),
            "scope": settings.scope,
        }
        return Response(orjson.dumps(body), media_type="application/json", headers=headers)

    @router.api_route("/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(path: str) -> Response:
        return serve(path)

    return router


def _capability(statement: dict[str, Any]) -> None:
    rest = statement["rest"][0]
    rest.setdefault("operation", []).append(
        {
            "name": "events",
            "definition": OPERATION_EVENTS,
            "documentation": "Server-Sent Events for the token's patient: new Consent versions "
            "and AuditEvents (GET [base]/$events with Authorization: Bearer; Last-Event-ID "
            "resumes)",
        }
    )


def install(app: FastAPI, ctx: FHIRContext, settings: WebSettings | None = None) -> None:
    """Serve the patient app and the ``$events`` stream on ``app`` (whose ``app.state.fhir``
    is ``ctx``). Call it once, before the app serves requests."""
    if getattr(app.state, "web_installed", False):
        raise RuntimeError("the patient app is already installed on this app")
    settings = settings if settings is not None else WebSettings()
    routes = app.router.routes
    before = len(routes)
    app.include_router(build_events_router(settings), prefix=ctx.settings.fhir_path.rstrip("/"))
    if settings.enabled:
        app.include_router(build_app_router(ctx, settings), prefix=settings.app_path.rstrip("/"))
    ours = routes[before:]
    del routes[before:]
    # ahead of the generic "/{rtype}" routes, which would take "$events" (and, with the FHIR
    # base at the app's root, fhir_path "", the app's own paths)
    routes[0:0] = ours
    ctx.capability_extenders.append(_capability)
    app.state.web_installed = True
    app.state.web = settings
