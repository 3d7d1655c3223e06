"""The gateway's FHIR routes for the forwarded types, ahead of the local ones.

For each forwarded type ``T`` (``docs/gateway.md``):

* ``GET T/id``, ``GET T/id/_history/vid`` — forwarded, decided (:mod:`.decide`), audited; a
  refused record answers 404 exactly like a missing one, and the refusal is audited;
* ``GET T``, ``POST T/_search`` — forwarded, filtered and re-paged (:mod:`.search`), audited;
* ``POST T``, ``PUT/PATCH/DELETE T/id`` — forwarded only for ``write_types`` (scope, patient
  compartment, and for existing records the consent decision for ``correct``), audited;
  otherwise 405 with an OperationOutcome;
* anything else under ``T`` (history, ``$everything``, other operations) — 501: never served
  from our own store, whatever it may hold.

Batch/transaction Bundles that touch a forwarded type are refused (501); others run locally.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
import jsonpatch
import orjson
from fastapi import APIRouter, FastAPI, Request
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_consent.consent.enforcement import ConsentEnforcement, RequestFilter
from fhir_consent.errors import (
    BadRequest,
    Conflict,
    FHIRError,
    Gone,
    Issue,
    MethodNotAllowed,
    NotFound,
    PreconditionFailed,
    Unprocessable,
    operation_outcome,
)
from fhir_consent.fhir import searchparams
from fhir_consent.fhir.http import check_accept, check_content_type, fhir_response, parse_prefer
from fhir_consent.fhir.query import parse_search
from fhir_consent.fhir.routes import FHIRContext, Gate, entry_gate
from fhir_consent.fhir.validation import is_valid_id, parse_json_body, validate_resource
from fhir_consent.fhir.visibility import PATIENT_COMPARTMENT, visibility_for
from fhir_consent.forwarded import route_path
from fhir_consent.gateway.config import GatewaySettings
from fhir_consent.gateway.decide import Decider, Upstreamed, as_row
from fhir_consent.gateway.paging import PageState, Sealer, query_digest, requester_digest
from fhir_consent.gateway.search import (
    SearchPlan,
    collect_page,
    count_visible,
    render_count,
    render_page,
    upstream_params,
)
from fhir_consent.gateway.upstream import Answer, Upstream, UpstreamError
from fhir_consent.requestctx import current_access
from fhir_consent.store.db import DatabaseBusy
from smart_on_fhir.scopes import Interaction

__all__ = ["Gateway", "GatewayNotSupported", "install_routes"]

_FORM = "application/x-www-form-urlencoded"
_PATCH_TYPES = frozenset({"application/json-patch+json"})


class GatewayNotSupported(FHIRError):
    """This interaction is not available on forwarded types in gateway mode."""

    status = 501
    code = "not-supported"


class _Hidden(NotFound):
    def __init__(self, ref: str) -> None:
        super().__init__(f"{ref} is not known")


def _etag_version(value: str | None) -> str | None:
    if not value:
        return None
    text = value.strip()
    text = text[2:] if text.startswith("W/") else text
    text = text.strip('"')
    return text if text.isdigit() and len(text) < 12 else None


class Gateway:
    """One gateway: the app's FHIR context, the upstream and the paging sealer."""

    def __init__(
        self,
        ctx: FHIRContext,
        settings: GatewaySettings,
        upstream: Upstream,
        sealer: Sealer,
    ) -> None:
        self.ctx = ctx
        self.settings = settings
        self.upstream = upstream
        self.sealer = sealer
        self.forwarded = frozenset(settings.types)
        self.writable = frozenset(settings.write_types)

    # -- who is asking --------------------------------------------------------------------

    async def gate(self, request: Request, rtype: str, interaction: Interaction, name: str) -> Gate:
        access = await self.ctx.authenticate(request)
        current_access.set(access)
        if access.is_open:
            raise GatewayNotSupported("The gateway never serves forwarded data without a token")
        return entry_gate(self.ctx, access, rtype, interaction, name)

    def _filter_in(self, conn: Connection, gate: Gate) -> RequestFilter | None:
        """The per-request token check (a revoked token fails at once), then the request's
        consent filter: the one place the gateway calls ``ConsentEnforcer.filter_for``."""
        ctx = self.ctx
        if ctx.token_check is not None:
            ctx.token_check(conn, gate.access)
        flt = ctx.consent.filter_for(conn, gate.access, gate.now) if ctx.consent else None
        return flt if isinstance(flt, RequestFilter) else None

    async def consent_filter(self, gate: Gate, *, write: bool = False) -> RequestFilter | None:
        """:meth:`_filter_in` in our database, computed anew for each request (so a Consent
        revoked a moment ago is in force). As the local read path does
        (:func:`fhir_consent.fhir.routes.in_db` with ``quick``): a read's filter runs on the
        event loop's own connection where the database allows it (SQLite: an in-process call
        costs less than the hop to a worker thread), otherwise in a worker thread; the
        ``correct`` filter of a write in a write transaction."""
        ctx = self.ctx
        if not write and ctx.db.inline_reads:
            try:
                return ctx.db.run_inline(lambda conn: self._filter_in(conn, gate))
            except DatabaseBusy:
                pass  # SQLite is locked right now: wait for it in a worker thread

        def threaded() -> RequestFilter | None:
            with ctx.db.write() if write else ctx.db.autocommit() as conn:
                return self._filter_in(conn, gate)

        return await anyio.to_thread.run_sync(threaded, limiter=ctx.db.limiter)

    async def decider(self, gate: Gate, primary: str | None, *, write: bool = False) -> Decider:
        """The request's consent filter (:meth:`consent_filter`), then the ``dependents`` of
        its Consents from the upstream (where those resources live)."""
        flt = await self.consent_filter(gate, write=write)
        if flt is not None:
            flt = await self._resolve_dependents(flt)
        return Decider(gate.access, gate.now, flt, self.forwarded, primary)

    async def fetch_and_decide(
        self, gate: Gate, path: str, *, write: bool = False
    ) -> tuple[Decider, Answer]:
        """``GET {upstream}/{path}`` and the request's :class:`Decider`, concurrently: the
        upstream call is sent first and the consent filter computed while it travels. The
        answer is not looked at before the filter exists (a revoked token never sees it)."""
        call = asyncio.ensure_future(self.upstream.get(path))
        call.add_done_callback(_retrieve)
        try:
            await asyncio.sleep(0)  # the call runs up to its first wait: the request is sent
            decider = await self.decider(gate, None, write=write)
        except BaseException:
            call.cancel()
            raise
        return decider, await call

    async def _resolve_dependents(self, flt: RequestFilter) -> RequestFilter:
        wanted = sorted(
            r
            for r in ConsentEnforcement.dependent_refs(flt.consents)
            if r.partition("/")[0] in self.forwarded
        )
        if not wanted:
            return flt

        async def targets(ref: str) -> frozenset[str]:
            answer = await self.upstream.get(ref)
            if answer.status in (404, 410):
                return frozenset()
            item = _resource(answer, ref.partition("/")[0], ref.partition("/")[2])
            return frozenset(
                f"{r.target_type}/{r.target_id}"
                for r in searchparams.extract(item.resource).references
                if r.target_type and r.target_id
            )

        found = await asyncio.gather(*(targets(r) for r in wanted))
        deps = dict(flt.constants.dependents)
        deps.update(zip(wanted, found, strict=True))
        return flt.with_dependents(deps)

    def _audit_read(
        self, gate: Gate, name: str, items: list[Upstreamed], query: str | None = None
    ) -> None:
        sink = self.ctx.audited(gate)
        if sink is not None:
            sink.record_access(name, gate.access, [as_row(i) for i in items], gate.now, query=query)

    def _audit_refused(self, gate: Gate, item: Upstreamed) -> None:
        sink = self.ctx.audited(gate)
        if sink is not None:
            sink.record_access(
                gate.interaction,
                gate.access,
                [as_row(item)],
                gate.now,
                permitted=False,
                reason="not permitted",
            )

    # -- reads ----------------------------------------------------------------------------

    async def read(self, request: Request, rtype: str, rid: str, vid: str | None) -> Response:
        check_accept(request)
        name = "read" if vid is None else "vread"
        gate = await self.gate(request, rtype, Interaction.READ, name)
        if not is_valid_id(rid) or (vid is not None and not is_valid_id(vid)):
            raise NotFound(f"{rtype}/{rid[:64]} is not known")
        path = f"{rtype}/{rid}" + (f"/_history/{vid}" if vid is not None else "")
        decider, answer = await self.fetch_and_decide(gate, path)
        if answer.status == 404:
            raise NotFound(f"{rtype}/{rid} is not known")
        if answer.status == 410:
            raise Gone(f"{rtype}/{rid} was deleted")
        item = _resource(answer, rtype, rid)
        if not decider.permits(item, Interaction.READ):
            self._audit_refused(gate, item)
            raise _Hidden(f"{rtype}/{rid}")
        self._audit_read(gate, name, [item])
        headers = {
            k: v for k, v in (("ETag", answer.etag), ("Last-Modified", answer.last_modified)) if v
        }
        return fhir_response(item.raw, 200, headers)

    # -- searches -------------------------------------------------------------------------

    async def search(self, request: Request, rtype: str, items: list[tuple[str, str]]) -> Response:
        check_accept(request)
        gate = await self.gate(request, rtype, Interaction.SEARCH, "search-type")
        settings = self.ctx.settings
        parsed = parse_search(
            rtype,
            items,
            strict=parse_prefer(request).get("handling") == "strict",
            default_count=settings.default_page_size,
            max_count=settings.max_page_size,
            now=self.ctx.clock(),
        )
        cursor = parsed.spec.cursor
        digest = query_digest(rtype, parsed.applied)
        start: PageState | None = None
        if cursor:
            start = self.sealer.open(cursor)
            if (
                start is None
                or start.query != digest
                or start.who != requester_digest(gate.access)
                or not self.upstream.owns(start.url)
            ):
                raise BadRequest("The paging cursor is not valid for this search")
        decider = await self.decider(gate, rtype)
        base = self.ctx.base(request)
        counting = parsed.summary == "count" or parsed.spec.count == 0
        params = upstream_params(parsed, self.settings.upstream_page_size, includes=not counting)
        plan = SearchPlan(
            rtype=rtype,
            first_url=f"{self.upstream.base}/{rtype}?{urlencode(params)}",
            count=parsed.spec.count,
            scan_limit=self.settings.scan_limit,
        )
        names = "&".join(sorted({k for k, _ in parsed.applied}))
        query = f"{rtype}?{names}"
        if counting:
            total = await count_visible(plan, decider, self.upstream.get_url)
            self._audit_read(gate, "search-type", [], query)
            return fhir_response(render_count(base, parsed, total))
        page = await collect_page(plan, decider, self.upstream.get_url, start)
        next_cursor = None
        if page.next_state is not None:
            url, skip = page.next_state
            next_cursor = self.sealer.seal(
                PageState(url, skip, digest, requester_digest(gate.access))
            )
        self._audit_read(gate, "search-type", page.matches + page.included, query)
        return fhir_response(
            render_page(base, parsed, page, cursor=cursor, next_cursor=next_cursor)
        )

    # -- writes (write_types only) --------------------------------------------------------

    def _check_writable(self, rtype: str) -> None:
        if rtype not in self.writable:
            raise MethodNotAllowed(
                f"Writes of {rtype} go to the upstream FHIR server, not through this gateway",
                headers={"Allow": "GET"},
            )

    def _in_compartment(self, gate: Gate, rtype: str, resource: dict[str, Any], rid: str) -> bool:
        vis = visibility_for(gate.access, gate.decision, rtype, gate.now)
        if vis.filters is not None:
            return False
        if vis.patient is None or rtype not in PATIENT_COMPARTMENT:
            return True
        return vis.can_write(rtype, searchparams.extract(resource), rid)

    async def _current(self, gate: Gate, rtype: str, rid: str) -> tuple[Upstreamed | None, Answer]:
        """The upstream's current version, which the requester must be permitted to correct
        (consent.md §3.3: writes to existing records are the ``correct`` action)."""
        decider, answer = await self.fetch_and_decide(gate, f"{rtype}/{rid}", write=True)
        if answer.status in (404, 410):
            return None, answer
        item = _resource(answer, rtype, rid)
        if not decider.permits(item, Interaction.READ) or not self._in_compartment(
            gate, rtype, item.resource, rid
        ):
            self._audit_refused(gate, item)
            raise _Hidden(f"{rtype}/{rid}")
        return item, answer

    async def _forward_write(
        self,
        request: Request,
        gate: Gate,
        method: str,
        path: str,
        body: bytes | None,
        interaction: str,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        answer = await self.upstream.request(
            method, f"{self.upstream.base}/{path}", body=body, headers=headers
        )
        rtype = gate.rtype
        if answer.status == 412:
            raise PreconditionFailed("If-Match does not match the upstream's current version")
        if answer.status == 409:
            raise Conflict("The upstream FHIR server reports a conflicting change")
        if answer.status in (400, 422):
            raise Unprocessable("The upstream FHIR server refused this change")
        if answer.status == 404:
            raise NotFound(f"{path[:80]} is not known")
        if answer.status not in (200, 201, 204):
            raise UpstreamError(f"The upstream FHIR server answered HTTP {answer.status}")
        base = self.ctx.base(request)
        out: dict[str, str] = {}
        if answer.etag:
            out["ETag"] = answer.etag
        if answer.last_modified:
            out["Last-Modified"] = answer.last_modified
        item: Upstreamed | None = None
        if answer.body:
            try:
                item = Upstreamed.parse(orjson.loads(answer.body), answer.body)
            except orjson.JSONDecodeError:
                item = None
            if item is not None and item.rtype != rtype:
                item = None
        if answer.location:
            rel = self.upstream.relative(answer.location)
            if rel is not None:
                out["Location"] = f"{base}/{rel}"
        elif item is not None and method in ("POST", "PUT"):
            out["Location"] = f"{base}/{item.ref}/_history/{item.version}"
        sink = self.ctx.audited(gate)
        rid = item.rid if item is not None else path.partition("/")[2].partition("/")[0]
        if sink is not None and rid:
            row = (
                as_row(item)
                if item is not None
                else as_row(
                    Upstreamed({"resourceType": rtype, "id": rid}, b"{}", rtype, rid),
                    deleted=method == "DELETE",
                )
            )

            def audit() -> None:
                with self.ctx.db.write() as conn:
                    sink.record_change(conn, interaction, gate.access, row, gate.now)

            await run_in_threadpool(audit)
        if method == "DELETE" or answer.status == 204 or item is None:
            return Response(status_code=answer.status if answer.status != 200 else 200, headers=out)
        if parse_prefer(request).get("return") == "minimal":
            return Response(status_code=answer.status, headers=out)
        return fhir_response(item.raw, answer.status, out)

    async def create(self, request: Request, rtype: str) -> Response:
        check_accept(request)
        self._check_writable(rtype)
        gate = await self.gate(request, rtype, Interaction.CREATE, "create")
        resource = await _body(request)
        validate_resource(resource, rtype)
        if not self._in_compartment(gate, rtype, resource, str(resource.get("id", ""))):
            raise _forbidden_outside(rtype)
        await self.decider(gate, None, write=True)  # token check (revocation) before writing
        return await self._forward_write(
            request, gate, "POST", rtype, orjson.dumps(resource), "create"
        )

    async def update(self, request: Request, rtype: str, rid: str) -> Response:
        check_accept(request)
        self._check_writable(rtype)
        gate = await self.gate(request, rtype, Interaction.UPDATE, "update")
        resource = await _body(request)
        if resource.get("id") != rid:
            raise BadRequest("The resource id must match the URL")
        validate_resource(resource, rtype)
        current, _answer = await self._current(gate, rtype, rid)
        if not self._in_compartment(gate, rtype, resource, rid):
            raise _forbidden_outside(rtype)
        headers = {}
        if_match = request.headers.get("if-match")
        if if_match:
            headers["if-match"] = if_match
        return await self._forward_write(
            request,
            gate,
            "PUT",
            f"{rtype}/{rid}",
            orjson.dumps(resource),
            "update" if current is not None else "create",
            headers,
        )

    async def patch(self, request: Request, rtype: str, rid: str) -> Response:
        check_accept(request)
        self._check_writable(rtype)
        gate = await self.gate(request, rtype, Interaction.UPDATE, "patch")
        check_content_type(request, _PATCH_TYPES)
        try:
            ops = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise BadRequest("The request body is not valid JSON") from None
        if not isinstance(ops, list) or not all(isinstance(o, dict) for o in ops):
            raise BadRequest("A JSON Patch document must be an array of operations")
        current, answer = await self._current(gate, rtype, rid)
        if current is None:
            raise NotFound(f"{rtype}/{rid} is not known")
        wanted = _etag_version(request.headers.get("if-match"))
        if wanted is not None and str(current.version) != wanted:
            raise PreconditionFailed("If-Match does not match the current version")
        try:
            patched = jsonpatch.JsonPatch(ops).apply(copy.deepcopy(current.resource))
        except jsonpatch.JsonPatchTestFailed:
            raise Unprocessable("A JSON Patch 'test' operation failed") from None
        except (
            jsonpatch.JsonPatchException,
            jsonpatch.JsonPointerException,
            TypeError,
            ValueError,
        ):
            raise BadRequest("The JSON Patch document is invalid or does not apply") from None
        if (
            not isinstance(patched, dict)
            or patched.get("resourceType") != rtype
            or patched.get("id") != rid
        ):
            raise BadRequest("A patch may not change resourceType or id")
        validate_resource(patched, rtype)
        if not self._in_compartment(gate, rtype, patched, rid):
            raise _forbidden_outside(rtype)
        version = _etag_version(answer.etag) or str(current.version)
        return await self._forward_write(
            request,
            gate,
            "PUT",
            f"{rtype}/{rid}",
            orjson.dumps(patched),
            "patch",
            {"if-match": f'W/"{version}"'},
        )

    async def delete(self, request: Request, rtype: str, rid: str) -> Response:
        self._check_writable(rtype)
        gate = await self.gate(request, rtype, Interaction.DELETE, "delete")
        current, _answer = await self._current(gate, rtype, rid)
        if current is None:
            return Response(status_code=204)
        return await self._forward_write(request, gate, "DELETE", f"{rtype}/{rid}", None, "delete")


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a call's failure as seen when nobody awaits it (the request failed first)."""
    if not task.cancelled():
        task.exception()


def _forbidden_outside(rtype: str) -> FHIRError:
    from fhir_consent.errors import Forbidden

    return Forbidden(f"This {rtype} is outside what the access token may write")


def _resource(answer: Answer, rtype: str, rid: str) -> Upstreamed:
    """The upstream's read answer as a resource of the type and id asked for, or 502."""
    if answer.status != 200:
        raise UpstreamError(f"The upstream FHIR server answered HTTP {answer.status}")
    try:
        data = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        raise UpstreamError("The upstream FHIR server did not answer with FHIR JSON") from None
    item = Upstreamed.parse(data, answer.body)
    if item is None or item.rtype != rtype or item.rid != rid:
        raise UpstreamError("The upstream FHIR server answered with another resource")
    return item


async def _body(request: Request) -> dict[str, Any]:
    check_content_type(request)
    return parse_json_body(await request.body())


async def _search_items(request: Request) -> list[tuple[str, str]]:
    items = request.query_params.multi_items()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == _FORM:
        body = await request.body()
        items += parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    elif ctype:
        raise BadRequest("POST _search takes application/x-www-form-urlencoded parameters")
    return items


def _type_router(gw: Gateway, rtype: str) -> APIRouter:
    router = APIRouter()

    async def not_here(request: Request, rest: str = "") -> Response:
        raise GatewayNotSupported(f"This interaction on {rtype} is not available in gateway mode")

    @router.get(f"/{rtype}")
    async def search(request: Request) -> Response:
        return await gw.search(request, rtype, request.query_params.multi_items())

    @router.post(f"/{rtype}/_search")
    async def search_post(request: Request) -> Response:
        return await gw.search(request, rtype, await _search_items(request))

    @router.post(f"/{rtype}")
    async def create(request: Request) -> Response:
        return await gw.create(request, rtype)

    router.add_api_route(f"/{rtype}/_history", not_here, methods=["GET"])

    # ForwardedReads serves reads of valid ids; these take the others (404, as for any id)
    @router.get(f"/{rtype}/{{rid}}")
    async def read(rid: str, request: Request) -> Response:
        return await gw.read(request, rtype, rid, None)

    @router.put(f"/{rtype}/{{rid}}")
    async def update(rid: str, request: Request) -> Response:
        return await gw.update(request, rtype, rid)

    @router.patch(f"/{rtype}/{{rid}}")
    async def patch(rid: str, request: Request) -> Response:
        return await gw.patch(request, rtype, rid)

    @router.delete(f"/{rtype}/{{rid}}")
    async def delete(rid: str, request: Request) -> Response:
        return await gw.delete(request, rtype, rid)

    @router.get(f"/{rtype}/{{rid}}/_history/{{vid}}")
    async def vread(rid: str, vid: str, request: Request) -> Response:
        return await gw.read(request, rtype, rid, vid)

    router.add_api_route(
        f"/{rtype}/{{rest:path}}",
        not_here,
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
    return router


def _names_forwarded(body: bytes, forwarded: frozenset[str]) -> bool:
    """Whether a batch/transaction Bundle has an entry for a forwarded type."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return False  # the local handler answers 400
    entries = data.get("entry") if isinstance(data, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        req = entry.get("request")
        url = req.get("url") if isinstance(req, dict) else None
        res = entry.get("resource")
        named = {
            url.lstrip("/").split("/", 1)[0].split("?", 1)[0] if isinstance(url, str) else None,
            res.get("resourceType") if isinstance(res, dict) else None,
        }
        if named & forwarded:
            return True
    return False


class BundleGuard:
    """ASGI middleware: a Bundle POSTed to the FHIR base that touches a forwarded type is
    refused (501); any other request goes on untouched (the body replayed)."""

    def __init__(
        self, app: ASGIApp, *, fhir_path: str, forwarded: frozenset[str], limit: int
    ) -> None:
        self.app = app
        base = fhir_path.rstrip("/")
        self.paths = {base or "/", base + "/"}
        self.forwarded = forwarded
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or route_path(scope) not in self.paths
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # disconnected: let the app see it
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await fhir_response(
                    operation_outcome([Issue("The request body is too large", "too-costly")]),
                    413,
                )(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if _names_forwarded(body, self.forwarded):
            error = GatewayNotSupported(
                "Batch and transaction Bundles cannot include forwarded types in gateway "
                "mode; send those requests one by one"
            )
            await fhir_response(error.outcome(), error.status)(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ForwardedReads(BaseRoute):
    """The read and vread routes of every forwarded type (``GET [base]/T/id``,
    ``GET [base]/T/id/_history/vid`` with valid ids), first among the app's routes: a match
    is a split of the path, and the handler calls :meth:`Gateway.read` on a plain
    ``Request``, without FastAPI's parameter parsing and dependency resolution (more than the
    rest of the router's work for the hottest interaction). It runs inside the app's
    exception handlers, as any route does."""

    def __init__(self, gw: Gateway, prefix: str) -> None:
        self.gw = gw
        self.prefix = prefix.rstrip("/") + "/"
        self.path_format = f"{self.prefix}{{type}}/{{id}}"  # the route's name in metrics

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] != "GET":
            return Match.NONE, {}
        path = route_path(scope)
        if not path.startswith(self.prefix):
            return Match.NONE, {}
        parts = path[len(self.prefix) :].split("/")
        if parts[0] not in self.gw.forwarded or len(parts) < 2 or not is_valid_id(parts[1]):
            return Match.NONE, {}  # the router's routes answer the rest (404, 501, ...)
        if len(parts) == 2:
            return Match.FULL, {"path_params": {"rtype": parts[0], "rid": parts[1]}}
        if len(parts) == 4 and parts[2] == "_history" and is_valid_id(parts[3]):
            params = {"rtype": parts[0], "rid": parts[1], "vid": parts[3]}
            return Match.FULL, {"path_params": params}
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        request = Request(scope, receive)
        response = await self.gw.read(request, params["rtype"], params["rid"], params.get("vid"))
        await response(scope, receive, send)


def install_routes(app: FastAPI, gw: Gateway) -> None:
    """Put the forwarded types' routes ahead of the local routes, and the Bundle guard in
    front of the app."""
    prefix = gw.ctx.settings.fhir_path.rstrip("/")
    routes = app.router.routes
    before = len(routes)
    for rtype in sorted(gw.forwarded):
        app.include_router(_type_router(gw, rtype), prefix=prefix)
    ours = routes[before:]
    del routes[before:]
    routes[0:0] = [ForwardedReads(gw, prefix), *ours]
    app.add_middleware(
        BundleGuard,
        fhir_path=gw.ctx.settings.fhir_path,
        forwarded=gw.forwarded,
        limit=gw.ctx.settings.max_body_bytes,
    )
