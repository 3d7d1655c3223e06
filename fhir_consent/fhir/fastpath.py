"""A short path for the hottest interactions: ``GET [base]/{type}/{id}`` (read),
``GET [base]/{type}/{id}/_history/{vid}`` (vread) and ``POST [base]/{type}`` (create), without
query parameters.

:class:`FastRead` is an ASGI layer just in front of the router (inside CORS, the body limit
and the error handlers). For a request of exactly that shape it calls
:func:`~fhir_consent.fhir.routes.serve_read` — the very function behind the router's read and
vread routes, so authentication (SMART bearer tokens, the per-request revocation check),
scopes, the patient compartment, consent enforcement, the audit trail, ETag/Last-Modified and
404/410 are the same code — but skips route matching and dependency resolution, which cost
more than the database look-up itself. Anything else goes to the router untouched: other
methods, any query string (``_format``, ``_pretty``, ``_summary``, ``_elements``, …), ids that
are not valid FHIR ids (the router answers 400), types this server does not store, and any
type whose read the application routes elsewhere (the document store's ``Binary`` routes):
for each type the layer asks the router which endpoint it would pick, and serves only those
where that is the generic read or vread (re-checked whenever the routes change).

A create is served likewise by :func:`~fhir_consent.fhir.routes.serve_create` (the router's
create endpoint) for the types whose ``POST`` the router sends there (not ``Binary``: the
document store takes those); exceptions with an application handler (a database that is
down: 503) are answered by that handler, as the router's exception layer would.
"""

from __future__ import annotations

import inspect
from typing import Any

from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from fhir_consent.errors import FHIRError
from fhir_consent.fhir.http import fhir_response
from fhir_consent.fhir.routes import FHIRContext, serve_create, serve_read
from fhir_consent.fhir.validation import SUPPORTED_TYPES, is_valid_id

__all__ = ["FAST_PATH_ATTRIBUTE", "FastRead"]

#: Attribute the router's read and vread endpoints carry ("read" / "vread").
FAST_PATH_ATTRIBUTE = "fhir_fast_path"
_SUPPORTED = frozenset(SUPPORTED_TYPES)
_METHODS = frozenset({"GET", "POST"})
#: Ids the route probe tries per type: a route of another layer that takes only some ids
#: (e.g. ``{rid:uuid}``) still turns the short path off for that type.
_PROBE_IDS = ("x", "1", "0f8fad5b-d9cb-469f-a165-70867728950e")


class FastRead:
    """See the module docstring. ``fhir_path`` is the FHIR base inside the app (``/fhir``)."""

    def __init__(self, app: ASGIApp, *, fhir_path: str) -> None:
        self.app = app
        self.prefix = fhir_path.rstrip("/") + "/"
        self._routes_key: tuple[int, ...] | None = None
        self._served: dict[tuple[str, str], bool] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method")
        if scope["type"] != "http" or method not in _METHODS or scope.get("query_string"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if not path.startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        parts = path[len(self.prefix) :].split("/")
        if method == "POST":
            rtype = parts[0]
            if len(parts) == 1 and rtype in _SUPPORTED and self._serves(scope, rtype, "create"):
                await self._create(scope, receive, send, rtype)
            else:
                await self.app(scope, receive, send)
            return
        if len(parts) == 2:
            rtype, rid, vid, kind = parts[0], parts[1], None, "read"
        elif len(parts) == 4 and parts[2] == "_history" and parts[3]:
            rtype, rid, vid, kind = parts[0], parts[1], parts[3], "vread"
        else:
            await self.app(scope, receive, send)
            return
        if rtype not in _SUPPORTED or not is_valid_id(rid) or not self._serves(scope, rtype, kind):
            await self.app(scope, receive, send)
            return
        ctx: FHIRContext = scope["app"].state.fhir
        request = Request(scope, receive)
        try:
            response = await serve_read(ctx, request, rtype, rid, vid)
        except FHIRError as exc:  # as the application's FHIRError handler renders it
            response = fhir_response(exc.outcome(), exc.status, exc.headers)
        await response(scope, receive, send)

    async def _create(self, scope: Scope, receive: Receive, send: Send, rtype: str) -> None:
        app = scope["app"]
        ctx: FHIRContext = app.state.fhir
        request = Request(scope, receive)
        try:
            response = await serve_create(ctx, request, rtype)
        except FHIRError as exc:
            response = fhir_response(exc.outcome(), exc.status, exc.headers)
        except Exception as exc:
            # as the router's exception layer would answer it (e.g. a database that is down:
            # 503); anything without a handler goes on to the server-error layer, as there
            handler = _handler_for(app, exc)
            if handler is None:
                raise
            response = handler(request, exc)
            if inspect.isawaitable(response):
                response = await response
        await response(scope, receive, send)

    def _serves(self, scope: Scope, rtype: str, kind: str) -> bool:
        """Whether the router would send this request to its generic read/vread/create
        endpoint."""
        app = scope.get("app")
        routes = getattr(getattr(app, "router", None), "routes", None)
        if routes is None:
            return False
        key = tuple(map(id, routes))
        if key != self._routes_key:
            self._served = {}
            self._routes_key = key
        served = self._served.get((rtype, kind))
        if served is None:
            root = scope.get("root_path", "")
            suffix = "/_history/1" if kind == "vread" else ""
            paths = (
                [f"{self.prefix}{rtype}"]
                if kind == "create"
                else [f"{self.prefix}{rtype}/{rid}{suffix}" for rid in _PROBE_IDS]
            )
            probes: list[Scope] = [
                {
                    "type": "http",
                    "method": "POST" if kind == "create" else "GET",
                    "path": f"{root}{path}",
                    "root_path": root,
                    "query_string": b"",
                    "headers": [],
                }
                for path in paths
            ]
            served = self._served[(rtype, kind)] = all(
                _endpoint_kind(routes, probe) == kind for probe in probes
            )
        return served


def _handler_for(app: Any, exc: Exception) -> Any:
    """The application's exception handler for ``exc`` (by class, most specific first),
    except the catch-all ``Exception`` one, which belongs to the server-error layer."""
    handlers = getattr(app, "exception_handlers", {})
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        handler = handlers.get(cls)
        if handler is not None:
            return handler
    return None


def _endpoint_kind(routes: list[Any], probe: Scope) -> str | None:
    """The ``fhir_fast_path`` mark of the endpoint the router picks for ``probe``, if any."""
    for route in routes:
        try:
            if hasattr(route, "_match"):  # FastAPI's included routers
                match, _child, found, _context = route._match(probe)
            else:
                match, _child = route.matches(probe)
                found = route
        except Exception:  # noqa: BLE001 - an unknown kind of route: no short path
            return None
        if match == Match.FULL:
            mark = getattr(getattr(found, "endpoint", None), FAST_PATH_ATTRIBUTE, None)
            return mark if isinstance(mark, str) else None
        if match == Match.PARTIAL:
            return None
    return None
