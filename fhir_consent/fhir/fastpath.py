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
        self._routes_key: tuple[int, int, int] | None = None
        self._served: dict[tuple[str, str], Any] = {}

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
            route = (
                self._route(scope, rtype, "create")
                if len(parts) == 1 and rtype in _SUPPORTED
                else None
            )
            if route is None:
                await self.app(scope, receive, send)
                return
            _record(scope, route, {"rtype": rtype})
            request = Request(scope, receive)
            await self._answer(scope, receive, send, request, serve_create, rtype)
            return
        if len(parts) == 2:
            rtype, rid, vid, kind = parts[0], parts[1], None, "read"
        elif len(parts) == 4 and parts[2] == "_history" and parts[3]:
            rtype, rid, vid, kind = parts[0], parts[1], parts[3], "vread"
        else:
            await self.app(scope, receive, send)
            return
        valid = rtype in _SUPPORTED and is_valid_id(rid)
        route = self._route(scope, rtype, kind) if valid else None
        if route is None:
            await self.app(scope, receive, send)
            return
        _record(scope, route, {"rtype": rtype, "rid": rid} | ({"vid": vid} if vid else {}))
        request = Request(scope, receive)
        await self._answer(scope, receive, send, request, serve_read, rtype, rid, vid)

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, request: Request, serve: Any, *args: Any
    ) -> None:
        app = scope["app"]
        ctx: FHIRContext = app.state.fhir
        try:
            response = await serve(ctx, request, *args)
        except FHIRError as exc:  # as the application's FHIRError handler renders it
            response = fhir_response(exc.outcome(), exc.status, exc.headers)
        except Exception as exc:
            # This layer sits outside Starlette's ExceptionMiddleware: answer as the router's
            # exception layer would (a database that is down: 503); anything without a handler
            # goes on to the server-error layer, as there.
            handler = _handler_for(app, exc)
            if handler is None:
                raise
            response = handler(request, exc)
            if inspect.isawaitable(response):
                response = await response
        await response(scope, receive, send)

    def _route(self, scope: Scope, rtype: str, kind: str) -> Any:
        """The router's generic read/vread/create route if the router would send this
        request to it, else None."""
        app = scope.get("app")
        routes = getattr(getattr(app, "router", None), "routes", None)
        if routes is None:
            return None
        # Routes are added by appending (include_router, add_route, mount): the list, its
        # length and its last entry tell whether it changed, without a pass over every route
        # on each request (~100 routes with every layer installed).
        key = (id(routes), len(routes), id(routes[-1]) if routes else 0)
        if key != self._routes_key:
            self._served = {}
            self._routes_key = key
        if (rtype, kind) not in self._served:
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
            found = [_endpoint(routes, probe) for probe in probes]
            first = found[0][1] if found[0] is not None else None
            same = all(f is not None and f[0] == kind and f[1] is first for f in found)
            self._served[(rtype, kind)] = first if same else None
        return self._served[(rtype, kind)]


def _record(scope: Scope, route: Any, params: dict[str, str]) -> None:
    """Record the route as the router would have (the ops layer names requests by it)."""
    scope["route"] = route
    scope["path_params"] = params


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


def _endpoint(routes: list[Any], probe: Scope) -> tuple[str, Any] | None:
    """The ``fhir_fast_path`` mark of the endpoint the router picks for ``probe`` and that
    route, if it has a mark."""
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
            return (mark, found) if isinstance(mark, str) else None
        if match == Match.PARTIAL:
            return None
    return None
