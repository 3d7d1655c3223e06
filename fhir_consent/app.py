"""The ASGI application factory: ``create_app(settings)`` wires routes, storage and handlers.

Nothing happens at import time; the database engine is created here and disposed on shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from fhir_consent.config import Settings, get_settings
from fhir_consent.errors import FHIRError, Issue, operation_outcome
from fhir_consent.fhir.http import fhir_response
from fhir_consent.fhir.routes import FHIRContext, build_router
from fhir_consent.fhir.services import Clock, system_clock
from fhir_consent.limits import BodyLimit
from fhir_consent.store.db import Database
from fhir_consent.store.migrate import upgrade

__all__ = ["create_app"]

log = logging.getLogger("fhir_consent")


def _version() -> str:
    try:
        return version("fhir-consent")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0+source"


def create_app(settings: Settings | None = None, *, clock: Clock = system_clock) -> FastAPI:
    """Build the application. ``settings`` defaults to the environment's."""
    settings = settings or get_settings()
    db = Database(settings.database_url, pool_size=settings.db_pool_size)
    ctx = FHIRContext(
        settings=settings,
        db=db,
        clock=clock,
        version=_version(),
        started=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            upgrade(settings.database_url)
        yield
        db.dispose()

    app = FastAPI(
        title="fhir-consent",
        version=ctx.version,
        description="FHIR R4 server with patient-controlled access",
        lifespan=lifespan,
    )
    app.state.fhir = ctx
    app.include_router(build_router(), prefix=settings.fhir_path)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FHIRError)
    async def fhir_error(_request: Request, exc: FHIRError) -> Response:
        return fhir_response(exc.outcome(), exc.status, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        text = {404: "No such endpoint", 405: "Method not allowed on this endpoint"}.get(
            exc.status_code, "Request failed"
        )
        headers = dict(exc.headers or {})
        return fhir_response(operation_outcome([Issue(text, code)]), exc.status_code, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, _exc: RequestValidationError) -> Response:
        return fhir_response(operation_outcome([Issue("Invalid request", "invalid")]), 400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # Log the type and where, never the message: library messages can carry input values.
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
        log.error(
            "internal error %s at %s on %s %s",
            type(exc).__name__,
            where,
            request.method,
            request.url.path,
        )
        return fhir_response(
            operation_outcome([Issue("Internal server error", "exception", "fatal")]), 500
        )
