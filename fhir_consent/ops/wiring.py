"""``install(app)``: put the operations layer on the whole server.

It adds, on an app from :func:`fhir_consent.app.create_app` (after its other layers):

* :class:`~fhir_consent.ops.middleware.OpsMiddleware` as the outermost layer (request ids,
  the access log, request metrics);
* ``GET /healthz`` and ``GET /readyz`` (:mod:`fhir_consent.ops.health`), unauthenticated, with
  no data beyond check names and states;
* ``GET /metrics`` (:mod:`fhir_consent.ops.metrics`), guarded by :func:`metrics_allowed`;
* an observer on the audit sink that counts access decisions, and a once-a-second update of
  the audit queue gauge, started and stopped with the app.

The objects are on ``app.state.ops`` (:class:`Ops`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fhir_consent.audit import AuditSink
from fhir_consent.config import Settings
from fhir_consent.fhir.routes import FHIRContext
from fhir_consent.ops.health import Readiness
from fhir_consent.ops.metrics import Metrics
from fhir_consent.ops.middleware import OpsMiddleware

__all__ = ["Ops", "install", "metrics_allowed"]

_FORWARDED = ("x-forwarded-for", "forwarded", "x-real-ip")
_NO_STORE = {"cache-control": "no-store"}


@dataclass(slots=True)
class Ops:
    """The operations layer of one app."""

    metrics: Metrics
    readiness: Readiness


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def metrics_allowed(request: Request, settings: Settings) -> bool:
    """``/metrics`` access: the bearer token when one is configured (compared in constant
    time), else direct loopback clients only (no forwarding header: not through a proxy)."""
    token = settings.metrics_token
    if token is not None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), token.get_secret_value().encode()
        )
    if any(name in request.headers for name in _FORWARDED):
        return False
    return _is_loopback(request.client.host if request.client else None)


def _key_loader(app: FastAPI, settings: Settings) -> Any:
    def load() -> None:
        ledger = getattr(app.state, "ledger", None)
        if ledger is not None and ledger.keyring.signing is None:
            raise LookupError("ledger signing key")
        documents = getattr(app.state, "documents", None)
        if documents is not None:
            _ring = documents.store.keys.ring  # loads it (or raises MasterKeyError)
        if not settings.open_access:
            app.state.smart.keys()

    return load


def _add_routes(app: FastAPI, settings: Settings, ops: Ops, ctx_sink: AuditSink | None) -> None:
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"}, headers=_NO_STORE)

    async def readyz() -> Response:
        code, body = await ops.readiness.report()
        return JSONResponse(body, status_code=code, headers=_NO_STORE)

    async def metrics(request: Request) -> Response:
        if not settings.metrics_enabled:
            return JSONResponse({"error": "not found"}, status_code=404)
        if not metrics_allowed(request, settings):
            if settings.metrics_token is not None:
                return JSONResponse(
                    {"error": "invalid_token"},
                    status_code=401,
                    headers={"www-authenticate": 'Bearer realm="metrics"'},
                )
            return JSONResponse({"error": "forbidden"}, status_code=403)
        if ctx_sink is not None:  # this worker's own value, up to date
            ops.metrics.audit_queue.set(ctx_sink.pending)
        body, media_type = await run_in_threadpool(ops.metrics.render)
        return Response(body, media_type=media_type, headers=_NO_STORE)

    app.add_api_route("/healthz", healthz, methods=["GET"], include_in_schema=False)
    app.add_api_route("/readyz", readyz, methods=["GET"], include_in_schema=False)
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)


def _wrap_lifespan(app: FastAPI, ops: Ops, sink: AuditSink | None) -> None:
    original = app.router.lifespan_context

    async def update_gauges() -> None:
        while True:
            ops.metrics.audit_queue.set(sink.pending if sink is not None else 0)
            await asyncio.sleep(1.0)

    @asynccontextmanager
    async def lifespan(the_app: Any) -> AsyncIterator[Any]:
        async with original(the_app) as state:
            task = asyncio.create_task(update_gauges())
            try:
                yield state
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                ops.metrics.process_exit()
                ops.readiness.dispose()

    app.router.lifespan_context = lifespan


def install(app: FastAPI) -> Ops:
    """Install the operations layer (see the module docstring) and return it."""
    ctx: FHIRContext = app.state.fhir
    settings = ctx.settings
    ops = Ops(metrics=Metrics(ctx.db), readiness=Readiness(settings, _key_loader(app, settings)))
    app.state.ops = ops
    sink = ctx.audit
    if sink is not None:
        sink.observers.append(ops.metrics.observe_decision)
    _add_routes(app, settings, ops, sink)
    web = getattr(getattr(app.state, "web", None), "app_path", "/app")
    app.add_middleware(
        OpsMiddleware,
        metrics=ops.metrics,
        prefixes=(settings.fhir_path, settings.smart_auth_path, web),
        trust_request_id=settings.trust_request_id,
        access_log_enabled=settings.access_log,
    )
    _wrap_lifespan(app, ops, sink)
    return ops
