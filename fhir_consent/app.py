"""The ASGI application factories.

* :func:`create_app` is **the server**: the FHIR REST API behind the SMART authorization
  server, with consent enforcement and the inquiry workflow, the audit trail, the permissions
  ledger, the encrypted document store and the patient app. ``fhir-consent serve`` runs it
  (``fhir_consent.main:app``); each layer reads its own settings from the environment unless
  given (:class:`~fhir_consent.ledger.config.LedgerSettings`,
  :class:`~fhir_consent.documents.config.DocumentSettings`,
  :class:`~fhir_consent.consent.config.ConsentSettings`,
  :class:`~fhir_consent.web.config.WebSettings`).
* :func:`create_core_app` is the FHIR REST API and the authorization server alone, for tests
  and tools that install (or replace) the layers above one by one.

Nothing happens at import time; the database engine is created here and disposed on shutdown.

SMART App Launch 2.2 (:mod:`smart_on_fhir`) is wired here: the authorization server's routes
at ``settings.smart_auth_path``, discovery at ``{fhir base}/.well-known/smart-configuration``
and ``/.well-known/openid-configuration`` (also under the FHIR base, which is the issuer),
the ``oauth-uris`` security extension in the CapabilityStatement, bearer-token
authentication and the per-request revocation check on every FHIR interaction (unless
``open_access``, for local development only), and CORS as SMART requires.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import sqlalchemy.exc as sa_exc
from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fhir_consent.auth import (
    fhir_user_exists,
    patient_picker,
    smart_authenticator,
    smart_token_check,
    smart_token_check_async,
)
from fhir_consent.config import Settings, get_settings
from fhir_consent.consent.auditing import ConsentAuditSink
from fhir_consent.consent.config import ConsentSettings
from fhir_consent.consent.decider import install as install_decider
from fhir_consent.consent.workflow import install as install_consent
from fhir_consent.documents import install as install_documents
from fhir_consent.documents.auditing import SinkDownloadAudit
from fhir_consent.documents.config import DocumentSettings
from fhir_consent.errors import FHIRError, Issue, operation_outcome
from fhir_consent.fhir.fastpath import FastRead
from fhir_consent.fhir.http import fhir_response
from fhir_consent.fhir.routes import FHIRContext, build_router
from fhir_consent.fhir.services import Clock, system_clock
from fhir_consent.forwarded import ProxyPolicy, PublicURLs
from fhir_consent.ledger.api import install as install_ledger
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.limits import BodyLimit
from fhir_consent.ops import install as install_ops
from fhir_consent.ops import route_template
from fhir_consent.store.db import Database
from fhir_consent.store.migrate import upgrade
from fhir_consent.web import install as install_web
from fhir_consent.web.config import WebSettings
from smart_on_fhir.clients import client_origins
from smart_on_fhir.cors import SmartCORS
from smart_on_fhir.keys import KeySet, load_or_create
from smart_on_fhir.routes import SmartAuth
from smart_on_fhir.routes import build_router as build_auth_router
from smart_on_fhir.server import AuthSettings, Urls

__all__ = [
    "SmartKeys",
    "create_app",
    "create_core_app",
    "fhir_user_exists",
    "freeze_heap_after_startup",
    "install_layers",
    "mounted_lifespan",
    "smart_auth_settings",
]

log = logging.getLogger("fhir_consent")


def _version() -> str:
    try:
        return version("fhir-consent")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0+source"


class SmartKeys:
    """The signing keys, loaded on first use and re-read when ``keyset.json`` changes
    (so ``fhir-consent keys rotate --smart`` reaches running workers within a minute).

    From ``settings.smart_jwks`` when set, else from ``settings.smart_keys_dir`` (created
    with fresh keys when missing, safely across workers).
    """

    def __init__(self, settings: Settings, recheck: float = 60.0) -> None:
        self._settings = settings
        self._recheck = recheck
        self._keys: KeySet | None = None
        self._stamp: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def _manifest_mtime(self) -> float | None:
        try:
            return (Path(self._settings.smart_keys_dir) / "keyset.json").stat().st_mtime
        except OSError:
            return None

    def __call__(self) -> KeySet:
        keys = self._keys
        now = time.monotonic()
        if keys is not None and (self._settings.smart_jwks or now - self._checked < self._recheck):
            return keys
        with self._lock:
            if self._settings.smart_jwks is not None:
                if self._keys is None:
                    self._keys = KeySet.from_jwks(self._settings.smart_jwks.get_secret_value())
                return self._keys
            stamp = self._manifest_mtime()
            if self._keys is None or stamp != self._stamp:
                self._keys, created = load_or_create(self._settings.smart_keys_dir)
                if created:
                    log.warning(
                        "generated new SMART signing keys in %s", self._settings.smart_keys_dir
                    )
                self._stamp = self._manifest_mtime()
            self._checked = now
            return self._keys


def smart_auth_settings(settings: Settings) -> AuthSettings:
    """The authorization server's policies from the application settings."""
    token = settings.registration_token
    return AuthSettings(
        access_token_lifetime=settings.access_token_lifetime,
        backend_token_lifetime=settings.backend_token_lifetime,
        refresh_token_lifetime=settings.refresh_token_lifetime,
        online_refresh_token_lifetime=settings.online_refresh_token_lifetime,
        authorization_code_lifetime=settings.authorization_code_lifetime,
        login_max_failures=settings.login_max_failures,
        login_window=settings.login_window,
        insecure_transport=settings.smart_insecure_transport,
        dynamic_registration=settings.dynamic_registration,
        registration_token=token.get_secret_value() if token is not None else None,
    )


def _install_smart(app: FastAPI, ctx: FHIRContext, settings: Settings) -> SmartAuth:
    """Mount the authorization server and put it in front of the FHIR API."""

    # by base: the same few bases (host names) on every request
    @functools.lru_cache(maxsize=256)
    def urls_from_base(base: str) -> Urls:
        return Urls.derive(
            base,
            fhir_path=settings.fhir_path,
            auth_path=settings.smart_auth_path,
            public_auth_url=settings.smart_public_auth_url,
            issuer=settings.smart_issuer,
        )

    def urls_for(request: Request) -> Urls:
        return urls_from_base(ctx.base(request))

    auth = SmartAuth(
        transaction=ctx.db.write,
        keys=SmartKeys(settings),
        urls_for=urls_for,
        patient_picker=patient_picker,
        settings=smart_auth_settings(settings),
    )
    app.state.smart = auth
    app.include_router(build_auth_router(auth), prefix=settings.smart_auth_path.rstrip("/"))

    discovery = APIRouter()

    async def smart_configuration(request: Request) -> Response:
        """SMART App Launch 2.2 conformance.md: always JSON, whatever Accept says."""
        return JSONResponse(auth.smart_configuration(urls_for(request)))

    async def openid_configuration(request: Request) -> Response:
        return JSONResponse(auth.openid_configuration(urls_for(request)))

    fhir = settings.fhir_path.rstrip("/")
    for prefix in dict.fromkeys((fhir, "")):
        discovery.add_api_route(f"{prefix}/.well-known/smart-configuration", smart_configuration)
        discovery.add_api_route(f"{prefix}/.well-known/openid-configuration", openid_configuration)
    app.include_router(discovery)

    def security(statement: dict[str, Any]) -> None:
        base = statement.get("implementation", {}).get("url", "")
        for rest in statement.get("rest", []):
            rest["security"] = auth.capability_security(urls_from_base(base))

    ctx.capability_extenders.append(security)
    if settings.open_access:
        log.warning("FHIR API is open: no access token needed (open_access, development only)")
    else:
        ctx.authenticate = smart_authenticator(auth.protector, urls_for, time.time)
        ctx.token_check = smart_token_check(auth.protector.realm)
        ctx.token_check_async = smart_token_check_async(auth.protector.realm)
    return auth


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock = system_clock,
    consent: ConsentSettings | None = None,
    ledger: LedgerSettings | None = None,
    documents: DocumentSettings | None = None,
    web: WebSettings | None = None,
) -> FastAPI:
    """The whole server (see the module docstring). ``settings`` defaults to the
    environment's, and so does each layer's settings object."""
    app = create_core_app(settings, clock=clock)
    install_layers(app, consent=consent, ledger=ledger, documents=documents, web=web)
    install_ops(app)  # outermost: request ids, access log, metrics, /healthz, /readyz
    return app


def install_layers(
    app: FastAPI,
    *,
    consent: ConsentSettings | None = None,
    ledger: LedgerSettings | None = None,
    documents: DocumentSettings | None = None,
    web: WebSettings | None = None,
) -> None:
    """Put every layer above the core into an app from :func:`create_core_app`.

    The order matters: the ledger and the document store put their routes ahead of the
    generic FHIR routes; the consent layer wraps the (SMART) authenticator, so it comes after
    it, and it always runs — its consent index and the ledger must see every Consent write,
    open access included, or a later secured start would enforce a stale index.
    """
    ctx: FHIRContext = app.state.fhir
    install_ledger(app, ctx, ledger if ledger is not None else LedgerSettings())
    layer = install_consent(ctx, consent if consent is not None else ConsentSettings())
    install_decider(app, ctx, layer)  # POST [base]/Consent/$decide for gateways
    sink = ConsentAuditSink(
        ctx.db,
        flush_interval=ctx.settings.audit_flush_interval,
        coalescing=ctx.settings.audit_coalesce,
    )
    ctx.audit = sink
    store = install_documents(
        app, ctx, documents if documents is not None else DocumentSettings()
    )
    store.access = layer.binary_access(store.access)
    store.audit = SinkDownloadAudit(sink, ctx.db, ctx.clock)
    install_web(app, ctx, web)
    _run_with_app(app, sink.start, sink.stop)


def mounted_lifespan(*apps: FastAPI) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A ``lifespan`` for a host application that mounts these apps.

    Starlette runs only the host's own lifespan, never a mounted app's, and ours migrates the
    database, starts the audit writer and the ledger relay and flushes them on shutdown. Use
    ``FastAPI(lifespan=mounted_lifespan(fhir_app))`` (or enter
    ``fhir_app.router.lifespan_context(fhir_app)`` from the host's own lifespan).
    """

    @asynccontextmanager
    async def lifespan(_host: Any) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for app in apps:
                await stack.enter_async_context(app.router.lifespan_context(app))
            yield

    return lifespan


def _freeze_heap() -> None:
    """Move everything alive once the app has started (modules, models, schemas, keys: some
    hundred thousand objects) out of the garbage collector's reach (``gc.freeze``): a full
    collection then walks only what requests allocated since, ~4 ms instead of ~90 ms, which
    each request queued behind it would wait for (the p99 of an audited read: 90 → 16 ms).
    Garbage that exists now is collected first."""
    gc.collect()
    gc.freeze()


def freeze_heap_after_startup(app: Any) -> None:
    """For a server process's app (``fhir_consent.main``): :func:`_freeze_heap` once its
    startup is done. Apps built in-process (tests, a host that mounts us) are left alone."""
    _run_with_app(app, _freeze_heap, lambda: None)


def _run_with_app(app: Any, start: Callable[[], None], stop: Callable[[], None]) -> None:
    """Call ``start`` when the app starts serving and ``stop`` when it shuts down."""
    original = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(the_app: Any) -> AsyncIterator[Any]:
        async with original(the_app) as state:
            start()
            try:
                yield state
            finally:
                stop()

    app.router.lifespan_context = lifespan


def create_core_app(settings: Settings | None = None, *, clock: Clock = system_clock) -> FastAPI:
    """The FHIR REST API behind the SMART authorization server, without the layers of
    :func:`install_layers`. ``settings`` defaults to the environment's."""
    settings = settings or get_settings()
    db = Database(
        settings.database_url,
        pool_size=settings.db_pool_size,
        commit_delay=settings.sqlite_commit_delay_ms / 1000,
    )
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
        # FastAPI's own OpenTelemetry hook looks the global providers up (environment
        # variables included) on every request, ~5 µs, to find none: this server exports
        # Prometheus metrics (fhir_consent.ops) and configures no OpenTelemetry.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.fhir = ctx
    _install_smart(app, ctx, settings)  # before the FHIR routes: .well-known paths
    fhir_router = build_router()
    if not settings.fhir_path.rstrip("/"):
        # the FHIR base is the app's root (a host app mounts us at the base itself): the
        # base's own route is "/", and FastAPI refuses an empty path without a prefix
        fhir_router.routes[:] = [r for r in fhir_router.routes if getattr(r, "path", "/")]
    app.include_router(fhir_router, prefix=settings.fhir_path.rstrip("/"))
    _install_error_handlers(app)
    app.add_middleware(FastRead, fhir_path=settings.fhir_path)  # innermost: next to the router
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    def load_origins() -> frozenset[str]:
        with db.read() as conn:
            return client_origins(conn)

    app.add_middleware(
        SmartCORS,
        fhir_path=settings.fhir_path,
        auth_path=settings.smart_auth_path,
        extra_origins=frozenset(o.rstrip("/").lower() for o in settings.cors_origins),
        load_origins=load_origins,
    )
    # outermost: everything inside sees the public root and a trusted proxy's scheme/client
    app.add_middleware(PublicURLs, policy=ProxyPolicy.parse(settings.trusted_proxies))
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

    auth_prefix = (app.state.fhir.settings.smart_auth_path.rstrip("/") or "/auth") + "/"

    async def database_error(request: Request, exc: Exception) -> Response:
        """A database that is down or restarting is a 503 with Retry-After (the next request
        reconnects: the pool pings connections before use); anything else is a 500."""
        if not database_unavailable(exc):
            return await internal_error(request, exc)
        orig = getattr(exc, "orig", None)
        code = getattr(orig, "sqlstate", None)
        log.warning(
            "database unavailable (%s%s) on %s %s: answered 503",
            type(orig if orig is not None else exc).__name__,
            f" sqlstate {code}" if code else "",
            request.method,
            request.url.path,
        )
        headers = {"Retry-After": "2"}
        if request.url.path.startswith(auth_prefix):  # RFC 6749 §4.1.2.1 error code
            body = {
                "error": "temporarily_unavailable",
                "error_description": "The server cannot reach its database; try again.",
            }
            return JSONResponse(body, 503, {**headers, "Cache-Control": "no-store"})
        issue = Issue("The database is unavailable; try again shortly", "transient")
        return fhir_response(operation_outcome([issue]), 503, headers)

    app.add_exception_handler(sa_exc.DBAPIError, database_error)
    app.add_exception_handler(sa_exc.TimeoutError, database_error)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # Log the type and where, never the message: library messages can carry input values;
        # the route template, not the path, which can carry a patient's id.
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
        log.error(
            "internal error %s at %s on %s %s",
            type(exc).__name__,
            where,
            request.method,
            route_template(request.scope, (request.app.state.fhir.settings.fhir_path,)),
        )
        return fhir_response(
            operation_outcome([Issue("Internal server error", "exception", "fatal")]), 500
        )


#: PostgreSQL SQLSTATE classes and codes of a database that is down, restarting or
#: overloaded (PostgreSQL Appendix A): connection exceptions, insufficient resources, operator
#: intervention (admin/crash shutdown, cannot connect now), serialization failure, deadlock.
_TRANSIENT_CLASSES = ("08", "53", "57")
_TRANSIENT_CODES = ("40001", "40P01")


def database_unavailable(exc: BaseException) -> bool:
    """Whether a SQLAlchemy error means the database is (momentarily) out of reach rather
    than a bug or bad data: worth a 503 and a retry."""
    if isinstance(exc, sa_exc.TimeoutError):  # no pooled connection came free in time
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    code = getattr(orig, "sqlstate", None)
    if type(orig).__module__.startswith("sqlite3"):
        text = str(orig).lower()
        return "locked" in text or "busy" in text
    if code:
        return code[:2] in _TRANSIENT_CLASSES or code in _TRANSIENT_CODES
    # psycopg raises OperationalError without a SQLSTATE when it cannot connect at all, and
    # InterfaceError when the connection was closed under it
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
