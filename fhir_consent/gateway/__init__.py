"""Gateway mode: fhir-consent in front of an existing FHIR server (``docs/gateway.md``).

``fhir-consent serve --upstream https://ehr.example/fhir`` serves :func:`create_gateway_app`:
the whole server of :func:`fhir_consent.app.create_app` — our SMART authorization server, the
Consents and their ledger, the audit trail, the patient app — with reads and searches of the
forwarded types (``FHIR_CONSENT_GATEWAY_TYPES``) sent to the upstream and what comes back
filtered by our consent engine for the requester, and audited in our store.

* :mod:`.config` — :class:`GatewaySettings`;
* :mod:`.upstream` — the pooled upstream client and our credentials for it;
* :mod:`.decide` — the visibility of one upstream resource (scope, compartment, consent);
* :mod:`.search` — re-paging forwarded searches without leaking hidden records;
* :mod:`.paging` — sealed paging tokens;
* :mod:`.routes` — the routes ahead of the local ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy.engine import Connection

from fhir_consent.auth import patient_picker
from fhir_consent.config import Settings, get_settings
from fhir_consent.fhir.services import Clock, system_clock
from fhir_consent.fhir.validation import is_valid_id
from fhir_consent.gateway.config import DEFAULT_TYPES, LOCAL_ONLY, GatewaySettings
from fhir_consent.gateway.paging import Sealer, load_page_key
from fhir_consent.gateway.routes import Gateway, GatewayNotSupported, install_routes
from fhir_consent.gateway.upstream import (
    Upstream,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    credentials_from,
)
from smart_on_fhir.users import User

__all__ = [
    "DEFAULT_TYPES",
    "LOCAL_ONLY",
    "Gateway",
    "GatewayNotSupported",
    "GatewaySettings",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "create_gateway_app",
    "install",
]


def gateway_picker(conn: Connection, user: User, query: str) -> list[tuple[str, str]]:
    """The SMART patient picker when Patient records live upstream: a Patient user may open
    their own record even though our store does not hold it."""
    found = patient_picker(conn, user, query)
    kind, _, rid = (user.fhir_user or "/").partition("/")
    if not found and kind == "Patient" and is_valid_id(rid) and not query.strip():
        return [(rid, f"Patient {rid}")]
    return found


def install(
    app: FastAPI,
    settings: GatewaySettings,
    *,
    upstream: Upstream | None = None,
) -> Gateway:
    """Turn an app from :func:`fhir_consent.app.create_app` into a gateway to
    ``settings.upstream``. Call it once, before the app serves requests."""
    if settings.upstream is None:
        raise ValueError("gateway mode needs an upstream URL")
    ctx = app.state.fhir
    if ctx.settings.open_access:
        raise ValueError("gateway mode needs the SMART authorization server (not open_access)")
    if getattr(app.state, "gateway", None) is not None:
        raise RuntimeError("the gateway is already installed on this app")
    up = upstream or Upstream(settings, credentials_from(settings))
    sealer = Sealer(load_page_key(settings), lifetime=settings.page_lifetime)
    gw = Gateway(ctx, settings, up, sealer)
    install_routes(app, gw)
    smart = getattr(app.state, "smart", None)
    if smart is not None:
        smart.flow.picker = gateway_picker
    original = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(the_app: Any) -> AsyncIterator[Any]:
        async with original(the_app) as state:
            try:
                yield state
            finally:
                await up.close()

    app.router.lifespan_context = lifespan
    app.state.gateway = gw
    return gw


def create_gateway_app(
    settings: Settings | None = None,
    gateway: GatewaySettings | None = None,
    *,
    clock: Clock = system_clock,
    **layers: Any,
) -> FastAPI:
    """The whole server (:func:`fhir_consent.app.create_app`) as a gateway; settings default
    to the environment's (``FHIR_CONSENT_GATEWAY_UPSTREAM`` and friends)."""
    from fhir_consent.app import create_app

    app = create_app(settings or get_settings(), clock=clock, **layers)
    install(app, gateway if gateway is not None else GatewaySettings())
    return app
