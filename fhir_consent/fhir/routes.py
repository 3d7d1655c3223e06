"""The FHIR R4 REST surface (R4 http.html). Handlers parse, call a service, map the result.

Database work runs in the thread pool (SQLAlchemy is synchronous) — writes in the group
commit's writer threads (:meth:`~fhir_consent.store.db.Database.write_grouped`); the event
loop parses, validates write bodies and serializes. Reads return the stored bytes as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode

import anyio.to_thread
import orjson
from fastapi import APIRouter, Depends, Request
from sqlalchemy.engine import Connection
from starlette.responses import Response

from fhir_consent.audit import AuditSink
from fhir_consent.auth import (
    AccessContext,
    AsyncTokenCheck,
    Authenticator,
    TokenCheck,
    open_authenticator,
    require,
)
from fhir_consent.config import Settings
from fhir_consent.errors import BadRequest, FHIRError, Forbidden, Issue, operation_outcome
from fhir_consent.fhir import searchparams as sp
from fhir_consent.fhir.bundle import BundleContext, process_bundle
from fhir_consent.fhir.capability import CapabilityExtender, capability_statement
from fhir_consent.fhir.http import (
    check_accept,
    check_content_type,
    etag,
    fhir_response,
    http_date,
    parse_if_match,
    parse_prefer,
)
from fhir_consent.fhir.query import parse_search
from fhir_consent.fhir.searching import everything, execute_search, raw_bundle
from fhir_consent.fhir.services import (
    Clock,
    PatchSource,
    PreWrite,
    ResourceService,
    WriteListener,
    WriteResult,
    check_read_target,
    format_instant,
    readable_current,
    readable_version,
    visible_current,
)
from fhir_consent.fhir.validation import (
    SUPPORTED_TYPES,
    is_valid_id,
    parse_json,
    parse_json_body,
    validate_resource,
)
from fhir_consent.fhir.visibility import (
    ConsentEnforcer,
    Visibility,
    search_restrictions,
    visibility_for,
)
from fhir_consent.forwarded import public_root
from fhir_consent.requestctx import current_access
from fhir_consent.store.db import Database, DatabaseBusy
from fhir_consent.store.repository import (
    PG_CURRENT_SQL,
    PG_VERSION_SQL,
    CurrentRow,
    Repository,
    VersionRow,
    current_row,
    version_row,
)
from smart_on_fhir.scopes import Interaction, ScopeDecision

__all__ = [
    "BundleFilter",
    "FHIRContext",
    "Gate",
    "build_router",
    "entry_gate",
    "gate_for",
    "in_db",
    "serve_create",
    "serve_read",
]

T = TypeVar("T")
_PATCH_TYPES = frozenset({"application/json-patch+json"})
_FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True, slots=True)
class Gate:
    """What a request was allowed to do, decided before it touches the database."""

    access: AccessContext
    decision: ScopeDecision
    rtype: str
    now: int
    interaction: str = "read"  # the R4 restful-interaction code, for the audit trail


_AUDIT_NAMES = {
    Interaction.READ: "read",
    Interaction.SEARCH: "search-type",
    Interaction.CREATE: "create",
    Interaction.UPDATE: "update",
    Interaction.DELETE: "delete",
}


class BundleFilter(Protocol):
    """Rewrites a Bundle's bytes before they are sent (the document store puts ``Binary.data``
    into Binary entries), in the request's transaction. ``applies`` is a cheap test on the
    bytes; the filter runs only when it holds."""

    def applies(self, body: bytes) -> bool: ...

    def __call__(self, conn: Connection, access: AccessContext, body: bytes) -> bytes: ...


@dataclass(slots=True)
class FHIRContext:
    """Everything a request handler needs; lives on ``app.state.fhir``."""

    settings: Settings
    db: Database
    clock: Clock
    version: str
    started: str
    listeners: list[WriteListener] = field(default_factory=list)
    capability_extenders: list[CapabilityExtender] = field(default_factory=list)
    prewrites: list[PreWrite] = field(default_factory=list)
    patch_sources: list[PatchSource] = field(default_factory=list)
    authenticate: Authenticator = field(default_factory=open_authenticator)
    token_check: TokenCheck | None = None
    #: :attr:`token_check` on the event loop's own PostgreSQL connections
    token_check_async: AsyncTokenCheck | None = None
    consent: ConsentEnforcer | None = None
    audit: AuditSink | None = None
    bundle_filters: list[BundleFilter] = field(default_factory=list)

    def filter_bundle(self, conn: Connection, access: AccessContext, body: bytes) -> bytes:
        """``body`` through every :class:`BundleFilter` that applies to it."""
        for flt in self.bundle_filters:
            if flt.applies(body):
                body = flt(conn, access, body)
        return body

    def audited(self, gate: Gate) -> AuditSink | None:
        """The audit sink when this request is audited (every authenticated request)."""
        return None if gate.access.is_open else self.audit

    def refused(self, gate: Gate, hidden: Any) -> None:
        """Audit a refused attempt on an existing record: the patient sees it in their log."""
        sink = self.audited(gate)
        if sink is not None and hidden is not None:
            sink.record_access(
                gate.interaction,
                gate.access,
                [hidden],
                gate.now,
                permitted=False,
                reason="not permitted",
            )

    def base(self, request: Request) -> str:
        """The FHIR base as this request's client sees it: ``public_base_url`` when set, else
        the request's public root (mount point, trusted proxy headers) plus ``fhir_path``."""
        if self.settings.public_base_url:
            return self.settings.public_base_url.rstrip("/")
        return public_root(request) + self.settings.fhir_path.rstrip("/")

    def visibility(self, conn: Connection, gate: Gate) -> Visibility:
        """The request's visibility, computed inside its transaction (so a consent revoked a
        moment ago is already in force)."""
        if gate.access.is_open:
            return visibility_for(gate.access)
        consent = (
            self.consent.filter_for(conn, gate.access, gate.now, lazy=True)
            if self.consent
            else None
        )
        return visibility_for(gate.access, gate.decision, gate.rtype, gate.now, consent)

    def token_visibility(self, gate: Gate) -> Visibility | None:
        """The request's visibility when it can be made without a connection (the consent
        filter from the token alone, :meth:`ConsentEnforcer.filter_from_token`), else None."""
        consent = None
        if self.consent is not None:
            consent = self.consent.filter_from_token(gate.access, gate.now)
            if consent is None:
                return None
        return visibility_for(gate.access, gate.decision, gate.rtype, gate.now, consent)

    def service(self, conn: Any, guard: Visibility | None = None) -> ResourceService:
        return ResourceService(
            conn,
            clock=self.clock,
            listeners=self.listeners,
            guard=guard,
            prewrites=self.prewrites,
            patch_sources=self.patch_sources,
        )


async def _get_ctx(request: Request) -> FHIRContext:
    # async: a plain ``def`` dependency would cost a thread-pool hop on every request
    ctx: FHIRContext = request.app.state.fhir
    return ctx


Ctx = Annotated[FHIRContext, Depends(_get_ctx)]


def _write_headers(base: str, row: CurrentRow) -> dict[str, str]:
    return {
        "ETag": etag(row.version_id),
        "Last-Modified": http_date(row.last_updated),
        "Location": f"{base}/{row.res_type}/{row.res_id}/_history/{row.version_id}",
    }


def _read_headers(row: CurrentRow | VersionRow) -> dict[str, str]:
    return {"ETag": etag(row.version_id), "Last-Modified": http_date(row.last_updated)}


def _written(request: Request, ctx: FHIRContext, result: WriteResult) -> Response:
    row = result.row
    headers = _write_headers(ctx.base(request), row)
    status = 201 if result.created else 200
    prefer = parse_prefer(request).get("return", "representation")
    if prefer == "minimal":
        return Response(status_code=status, headers=headers)
    if prefer == "operationoutcome":
        outcome = operation_outcome(
            [Issue("Created" if result.created else "Updated", "informational", "information")]
        )
        return fhir_response(outcome, status, headers)
    return fhir_response(row.content, status, headers)


async def _body(request: Request) -> dict[str, Any]:
    check_content_type(request)
    return parse_json_body(await request.body())


def _check_type(rtype: str) -> None:
    if rtype not in SUPPORTED_TYPES:
        raise FHIRNotFound(rtype)


class FHIRNotFound(FHIRError):
    status = 404
    code = "not-supported"

    def __init__(self, rtype: str) -> None:
        super().__init__(f"Resource type '{rtype[:64]}' is not supported by this server")


async def in_db(
    ctx: FHIRContext,
    gate: Gate,
    fn: Callable[[Connection, Visibility], T],
    *,
    write: bool = False,
    quick: bool = False,
    prepare: Callable[[], object] | None = None,
) -> T:
    """Run ``fn`` with the request's connection and visibility, after the per-request token
    check (a revoked token fails on its next call).

    Writes run in a transaction in a worker thread; on SQLite
    (:attr:`Database.group_writes`) in a savepoint of a transaction shared with the writes
    queued meanwhile, committed once (:meth:`Database.write_grouped`). ``quick`` marks a
    short read of a few single-statement queries (read, vread): it runs without a
    transaction (every statement sees the latest committed data, as READ COMMITTED
    statements do) and, where the database allows it (:attr:`Database.inline_reads`), on the
    event loop's own connection: a primary-key look-up costs less than the hop to a worker
    thread. ``prepare`` runs before the transaction opens (in the worker thread; on the event
    loop for group commits), so work that needs no database, such as
    validating the body, then never holds SQLite's write lock)."""

    def run(conn: Connection) -> T:
        if ctx.token_check is not None and not gate.access.is_open:
            ctx.token_check(conn, gate.access)
        return fn(conn, ctx.visibility(conn, gate))

    def threaded() -> T:
        if prepare is not None:
            prepare()
        if write:
            scope = ctx.db.write()
        else:
            scope = ctx.db.autocommit() if quick else ctx.db.reads()
        with scope as conn:
            return run(conn)

    try:
        if write and ctx.db.group_writes:
            # SQLite: the body is checked here (CPU work: a hop to a worker thread would only
            # add to it), then the write joins the group commit (one writer, one COMMIT for
            # every write queued meanwhile, a savepoint each)
            if prepare is not None:
                prepare()
            return await ctx.db.write_grouped(run)
        if quick and ctx.db.inline_reads:
            try:
                return ctx.db.run_inline(run)
            except DatabaseBusy:
                pass  # the database is locked right now: wait for it in a worker thread
        return await anyio.to_thread.run_sync(threaded, limiter=ctx.db.limiter)
    except FHIRError as exc:
        ctx.refused(gate, exc.hidden)
        raise


async def gate_for(
    request: Request, ctx: FHIRContext, rtype: str, interaction: Interaction
) -> Gate:
    """Authenticate the request and decide its scopes for ``interaction`` on ``rtype``."""
    access = await ctx.authenticate(request)
    current_access.set(access)
    return entry_gate(ctx, access, rtype, interaction, _AUDIT_NAMES.get(interaction))


async def serve_read(
    ctx: FHIRContext, request: Request, rtype: str, rid: str, vid: str | None = None
) -> Response:
    """R4 read (``vid`` None) or vread of one resource: the stored bytes with ETag and
    Last-Modified. Shared by the router and :class:`~fhir_consent.fhir.fastpath.FastRead`."""
    check_accept(request)
    _check_type(rtype)
    gate = await gate_for(request, ctx, rtype, Interaction.READ)
    if gate.access.is_open and ctx.db.async_reads:
        # No token, no consent, no audit: the read is its one query (two for vread).
        found = await _open_read(ctx.db, rtype, rid, vid)
        if found is not None:
            return fhir_response(found.content, 200, _read_headers(found))
    elif not gate.access.is_open and ctx.db.async_reads and ctx.token_check_async is not None:
        # PostgreSQL with a token: when the visibility decision needs no consent build (the
        # requester's own patient's record), the token check and the read run on the event
        # loop too; anything else (and a failed connection) takes the threaded path below.
        found = await _authorized_read(ctx, gate, ctx.token_check_async, rtype, rid, vid)
        if isinstance(found, CurrentRow):
            _audit_read(ctx, gate, "read", [found])
            return fhir_response(found.content, 200, _read_headers(found))
        if found is not None:
            _audit_read(ctx, gate, "vread", [found])
            return fhir_response(found.content, 200, _read_headers(found))
    row: CurrentRow | VersionRow
    if vid is None:
        row = await in_db(
            ctx, gate, lambda conn, vis: ctx.service(conn, vis).read(rtype, rid), quick=True
        )
        _audit_read(ctx, gate, "read", [row])
    else:
        version = vid
        row = await in_db(
            ctx,
            gate,
            lambda conn, vis: ctx.service(conn, vis).vread(rtype, rid, version),
            quick=True,
        )
        _audit_read(ctx, gate, "vread", [row])
    return fhir_response(row.content, 200, _read_headers(row))


async def serve_create(ctx: FHIRContext, request: Request, rtype: str) -> Response:
    """R4 create (and conditional create with ``If-None-Exist``). Shared by the router and
    :class:`~fhir_consent.fhir.fastpath.FastRead`."""
    check_accept(request)
    _check_type(rtype)
    gate = await gate_for(request, ctx, rtype, Interaction.CREATE)
    resource = await _body(request)
    ine = request.headers.get("if-none-exist")
    criteria = parse_qsl(ine.lstrip("?"), keep_blank_values=True) if ine is not None else None

    def run(conn: Connection, vis: Visibility) -> WriteResult:
        service = ctx.service(conn, vis)
        result = service.create(rtype, resource, if_none_exist=criteria, validated=True)
        _audit_write(ctx, conn, gate, "create" if result.created else "read", result.row)
        return result

    def validate() -> None:
        validate_resource(resource, rtype)

    result = await in_db(ctx, gate, run, write=True, prepare=validate)
    return _written(request, ctx, result)


async def _open_read(
    db: Database, rtype: str, rid: str, vid: str | None
) -> CurrentRow | VersionRow | None:
    """Read or vread for open access (development mode) on the event loop's own async
    connections: the same checks and errors as ``ResourceService.read``/``vread``. None when
    the connection failed (the caller reads in a worker thread instead)."""
    number = check_read_target(rtype, rid, vid)
    try:
        current = current_row(await db.fetch_async(PG_CURRENT_SQL, (rtype, rid)))
        if vid is None or number is None:
            return readable_current(rtype, rid, current)
        visible_current(rtype, rid, current)
        version = version_row(await db.fetch_async(PG_VERSION_SQL, (rtype, rid, number)))
        return readable_version(rtype, rid, vid, version)
    except DatabaseBusy:
        return None


class _Undecided(Exception):
    """The event-loop read cannot decide visibility: take the synchronous path."""


async def _authorized_read(
    ctx: FHIRContext,
    gate: Gate,
    token_check: AsyncTokenCheck,
    rtype: str,
    rid: str,
    vid: str | None,
) -> CurrentRow | VersionRow | None:
    """Read or vread with a token on the event loop's own connections, as :func:`in_db`
    with ``ResourceService.read``/``vread`` would do it: the token check first (401 when
    revoked), then the row, visible by :meth:`Visibility.can_see_async` (404, audited as a
    refusal, when it is hidden). None when that needs the synchronous path (a consent build,
    a granular scope filter) or the connection failed; nothing was served then."""
    vis = ctx.token_visibility(gate)
    if vis is None:
        return None
    fetch = ctx.db.fetch_async
    try:
        try:
            number = check_read_target(rtype, rid, vid)
        except FHIRError:
            await token_check(fetch, gate.access, None)  # a revoked token's 401 comes first
            raise
        # the token check and the current row: one statement, one round trip
        current = current_row(await token_check(fetch, gate.access, (PG_CURRENT_SQL, (rtype, rid))))
        visible = True
        if current is not None:
            decided = await vis.can_see_async(fetch, current)
            if decided is None:
                raise _Undecided()
            visible = decided

        def seen(_row: CurrentRow) -> bool:
            return visible

        if vid is None or number is None:
            return readable_current(rtype, rid, current, seen)
        visible_current(rtype, rid, current, seen)
        version = version_row(await fetch(PG_VERSION_SQL, (rtype, rid, number)))
        return readable_version(rtype, rid, vid, version)
    except (DatabaseBusy, _Undecided):
        return None
    except FHIRError as exc:
        ctx.refused(gate, exc.hidden)
        raise


def build_router() -> APIRouter:
    """All FHIR routes, relative to the FHIR base."""
    router = APIRouter()

    @router.get("/metadata")
    async def metadata(request: Request, ctx: Ctx) -> Response:
        check_accept(request)
        statement = capability_statement(
            ctx.base(request),
            software_version=ctx.version,
            date=ctx.started,
            extenders=ctx.capability_extenders,
            # entry_gate refuses every AuditEvent write unless access is open: do not claim it
            read_only_types=frozenset() if ctx.settings.open_access else frozenset({"AuditEvent"}),
        )
        return fhir_response(statement)

    @router.post("")
    @router.post("/")
    async def bundle(request: Request, ctx: Ctx) -> Response:
        check_accept(request)
        access = await ctx.authenticate(request)
        current_access.set(access)
        body = await _body(request)
        bctx = BundleContext(
            base=ctx.base(request),
            service=ctx.service,
            write=ctx.db.write,
            read=ctx.db.read,
            guard=_BundleGuard(ctx, access),
            default_count=ctx.settings.default_page_size,
            max_count=ctx.settings.max_page_size,
            return_minimal=parse_prefer(request).get("return") == "minimal",
        )

        def run() -> bytes:
            out = orjson.dumps(process_bundle(body, bctx))
            if any(f.applies(out) for f in ctx.bundle_filters):
                with ctx.db.read() as conn:
                    out = ctx.filter_bundle(conn, access, out)
            return out

        return fhir_response(await anyio.to_thread.run_sync(run, limiter=ctx.db.limiter))

    async def _search(
        request: Request, ctx: Ctx, rtype: str, items: list[tuple[str, str]]
    ) -> Response:
        check_accept(request)
        _check_type(rtype)
        gate = await gate_for(request, ctx, rtype, Interaction.SEARCH)
        strict = parse_prefer(request).get("handling") == "strict"
        parsed = parse_search(
            rtype,
            items,
            strict=strict,
            default_count=ctx.settings.default_page_size,
            max_count=ctx.settings.max_page_size,
            now=ctx.clock(),
        )
        base = ctx.base(request)

        sink = ctx.audited(gate)
        seen: list[CurrentRow] | None = [] if sink is not None else None

        def run(conn: Connection, vis: Visibility) -> bytes:
            restrict = search_restrictions(gate.access, rtype, gate.now, vis.consent)
            found = execute_search(conn, parsed, base, restrict, seen)
            return ctx.filter_bundle(conn, gate.access, found)

        body = await in_db(ctx, gate, run)
        if sink is not None and seen is not None:
            names = "&".join(sorted({k for k, _ in parsed.applied}))
            sink.record_access("search-type", gate.access, seen, gate.now, query=f"{rtype}?{names}")
        return fhir_response(body)

    @router.get("/{rtype}")
    async def search(rtype: str, request: Request, ctx: Ctx) -> Response:
        return await _search(request, ctx, rtype, request.query_params.multi_items())

    @router.post("/{rtype}/_search")
    async def search_post(rtype: str, request: Request, ctx: Ctx) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        items = request.query_params.multi_items()
        if ctype == _FORM:
            body = await request.body()
            items += parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        elif ctype:
            raise BadRequest("POST _search takes application/x-www-form-urlencoded parameters")
        return await _search(request, ctx, rtype, items)

    @router.post("/{rtype}")
    async def create(rtype: str, request: Request, ctx: Ctx) -> Response:
        return await serve_create(ctx, request, rtype)

    create.fhir_fast_path = "create"  # type: ignore[attr-defined]  # see fastpath.FastRead

    @router.get("/{rtype}/_history")
    async def type_history(rtype: str, request: Request, ctx: Ctx) -> Response:
        check_accept(request)
        _check_type(rtype)
        gate = await gate_for(request, ctx, rtype, Interaction.SEARCH)
        return await _history(request, ctx, gate, None)

    @router.get("/Patient/{rid}/$everything")
    async def patient_everything(rid: str, request: Request, ctx: Ctx) -> Response:
        """R4 Patient/$everything: every path through it is filtered like a search."""
        check_accept(request)
        gate = await gate_for(request, ctx, "Patient", Interaction.READ)
        base = ctx.base(request)

        seen: list[CurrentRow] = []

        def run(conn: Connection, vis: Visibility) -> bytes:
            patient = ctx.service(conn, vis).read("Patient", rid)
            restrict = search_restrictions(gate.access, "Patient", gate.now, vis.consent)
            return everything(conn, patient, base, restrict, seen)

        body = await in_db(ctx, gate, run)
        _audit_read(ctx, gate, "operation", seen)
        return fhir_response(body)

    @router.get("/{rtype}/{rid}")
    async def read(rtype: str, rid: str, request: Request, ctx: Ctx) -> Response:
        return await serve_read(ctx, request, rtype, rid)

    read.fhir_fast_path = "read"  # type: ignore[attr-defined]  # see fastpath.FastRead

    @router.put("/{rtype}/{rid}")
    async def update(rtype: str, rid: str, request: Request, ctx: Ctx) -> Response:
        check_accept(request)
        _check_type(rtype)
        gate = await gate_for(request, ctx, rtype, Interaction.UPDATE)
        resource = await _body(request)
        if_match = parse_if_match(request.headers.get("if-match"))

        def run(conn: Connection, vis: Visibility) -> WriteResult:
            result = ctx.service(conn, vis).update(rtype, rid, resource, if_match=if_match)
            _audit_write(ctx, conn, gate, "create" if result.created else "update", result.row)
            return result

        return _written(request, ctx, await in_db(ctx, gate, run, write=True))

    @router.patch("/{rtype}/{rid}")
    async def patch(rtype: str, rid: str, request: Request, ctx: Ctx) -> Response:
        check_accept(request)
        _check_type(rtype)
        gate = await gate_for(request, ctx, rtype, Interaction.UPDATE)
        check_content_type(request, _PATCH_TYPES)
        ops = parse_json(await request.body())
        if_match = parse_if_match(request.headers.get("if-match"))

        def run(conn: Connection, vis: Visibility) -> WriteResult:
            result = ctx.service(conn, vis).patch(rtype, rid, ops, if_match=if_match)
            _audit_write(ctx, conn, gate, "patch", result.row)
            return result

        return _written(request, ctx, await in_db(ctx, gate, run, write=True))

    @router.delete("/{rtype}/{rid}")
    async def delete(rtype: str, rid: str, request: Request, ctx: Ctx) -> Response:
        _check_type(rtype)
        gate = await gate_for(request, ctx, rtype, Interaction.DELETE)

        def run_delete(conn: Connection, vis: Visibility) -> CurrentRow | None:
            row = ctx.service(conn, vis).delete(rtype, rid)
            if row is not None:
                _audit_write(ctx, conn, gate, "delete", row)
            return row

        row = await in_db(ctx, gate, run_delete, write=True)
        headers = {"ETag": etag(row.version_id)} if row is not None else {}
        return Response(status_code=204, headers=headers)

    @router.get("/{rtype}/{rid}/_history")
    async def instance_history(rtype: str, rid: str, request: Request, ctx: Ctx) -> Response:
        check_accept(request)
        _check_type(rtype)
        if not is_valid_id(rid):
            raise BadRequest("The resource id is not a valid FHIR id")
        gate = await gate_for(request, ctx, rtype, Interaction.READ)
        return await _history(request, ctx, gate, rid)

    @router.get("/{rtype}/{rid}/_history/{vid}")
    async def vread(rtype: str, rid: str, vid: str, request: Request, ctx: Ctx) -> Response:
        return await serve_read(ctx, request, rtype, rid, vid)

    vread.fhir_fast_path = "vread"  # type: ignore[attr-defined]

    async def _history(request: Request, ctx: Ctx, gate: Gate, rid: str | None) -> Response:
        rtype = gate.rtype
        q = request.query_params
        since = None
        if "_since" in q:
            try:
                since = sp.date_range(q["_since"])[0]
            except sp.SearchValueError:
                raise BadRequest("_since must be a FHIR instant") from None
        count = ctx.settings.default_page_size
        if "_count" in q:
            if not q["_count"].isdigit():
                raise BadRequest("_count must be a non-negative integer")
            count = min(int(q["_count"]), ctx.settings.max_page_size)
        before = None
        if "_cursor" in q:
            if not q["_cursor"].isdigit():
                raise BadRequest("The paging cursor is not valid")
            before = int(q["_cursor"])
        base = ctx.base(request)

        def run(conn: Connection, vis: Visibility) -> bytes:
            repo = Repository(conn)
            if rid is not None:
                current = repo.current(rtype, rid)
                if current is None or not vis.can_see(conn, current):
                    raise FHIRNotFoundId(rtype, rid)
            restrict = vis.restrict_for(rtype)
            rows = repo.history(
                rtype, rid, since=since, before_seq=before, limit=count + 1, restrict=restrict
            )
            total = repo.count_history(rtype, rid, since, restrict)
            history_rows.extend(rows[:count])
            found = _history_bundle(
                base, rtype, rid, rows, count, total, since_raw=q.get("_since"), cursor=before
            )
            return ctx.filter_bundle(conn, gate.access, found)

        history_rows: list[VersionRow] = []
        body = await in_db(ctx, gate, run)
        _audit_read(ctx, gate, "history-instance" if rid else "history-type", history_rows)
        return fhir_response(body)

    return router


#: AuditEvents are the server's own record (issue 4 §5): never written through the API by an
#: authenticated caller. Open access (development) may create them, e.g. to load examples.
_AUDIT_WRITES = frozenset({Interaction.CREATE, Interaction.UPDATE, Interaction.DELETE})


def entry_gate(
    ctx: FHIRContext,
    access: AccessContext,
    rtype: str,
    interaction: Interaction,
    audit_name: str | None = None,
) -> Gate:
    """What ``access`` may do with ``interaction`` on ``rtype`` (403, audited, when nothing),
    for a request or one entry of a batch/transaction Bundle."""
    now = ctx.clock()
    try:
        if rtype == "AuditEvent" and interaction in _AUDIT_WRITES and not access.is_open:
            raise Forbidden("AuditEvents are recorded by the server and cannot be written")
        decision = require(access, rtype, interaction)
    except FHIRError:
        sink = None if access.is_open else ctx.audit
        if sink is not None:
            sink.record_access(
                interaction.value, access, [], now, permitted=False, reason="scope", query=rtype
            )
        raise
    return Gate(access, decision, rtype, now, audit_name or interaction.value)


class _BundleGuard:
    """:class:`~fhir_consent.fhir.bundle.EntryGuard` of one Bundle request's token."""

    def __init__(self, ctx: FHIRContext, access: AccessContext) -> None:
        self.ctx = ctx
        self.access = access

    def gate(self, rtype: str, interaction: Interaction, audit_name: str) -> Gate:
        return entry_gate(self.ctx, self.access, rtype, interaction, audit_name)

    def open(self, conn: Connection, gate: Gate) -> Visibility:
        if self.ctx.token_check is not None and not gate.access.is_open:
            self.ctx.token_check(conn, gate.access)
        return self.ctx.visibility(conn, gate)

    def restrict(self, gate: Gate, visibility: Visibility) -> Callable[[str], Any]:
        return search_restrictions(gate.access, gate.rtype, gate.now, visibility.consent)

    def written(self, conn: Connection, gate: Gate, interaction: str, row: CurrentRow) -> None:
        _audit_write(self.ctx, conn, gate, interaction, row)

    def disclosed(self, gate: Gate, rows: list[CurrentRow] | list[VersionRow]) -> None:
        _audit_read(self.ctx, gate, gate.interaction, rows)

    def refused(self, gate: Gate, hidden: Any) -> None:
        self.ctx.refused(gate, hidden)


def _audit_read(
    ctx: FHIRContext, gate: Gate, interaction: str, rows: list[CurrentRow] | list[VersionRow]
) -> None:
    sink = ctx.audited(gate)
    if sink is not None:
        sink.record_access(interaction, gate.access, rows, gate.now)


def _audit_write(
    ctx: FHIRContext, conn: Connection, gate: Gate, interaction: str, row: CurrentRow
) -> None:
    sink = ctx.audited(gate)
    if sink is not None and row.res_type != "AuditEvent":
        sink.record_change(conn, interaction, gate.access, row, gate.now)


class FHIRNotFoundId(FHIRError):
    status = 404
    code = "not-found"

    def __init__(self, rtype: str, rid: str) -> None:
        super().__init__(f"{rtype}/{rid} is not known")


def _history_bundle(
    base: str,
    rtype: str,
    rid: str | None,
    rows: list[VersionRow],
    count: int,
    total: int,
    *,
    since_raw: str | None,
    cursor: int | None,
) -> bytes:
    """R4 http.html §3.1.0.9 history: newest first, with request/response per entry."""
    path = f"{base}/{rtype}" + (f"/{rid}" if rid else "") + "/_history"
    params: list[tuple[str, str]] = [("_count", str(count))]
    if since_raw:
        params.append(("_since", since_raw))

    def link(cur: int | None) -> str:
        extra = [("_cursor", str(cur))] if cur is not None else []
        return f"{path}?{urlencode(params + extra)}"

    more = len(rows) > count
    rows = rows[:count]
    links = [{"relation": "self", "url": link(cursor)}]
    if more and rows:
        links.append({"relation": "next", "url": link(rows[-1].seq)})
    head = {"resourceType": "Bundle", "type": "history", "total": total, "link": links}
    entries = []
    for row in rows:
        url = f"{row.res_type}/{row.res_id}"
        if row.deleted:
            req = {"method": "DELETE", "url": url}
            resp = {"status": "204 No Content"}
        else:
            req = {"method": row.method, "url": row.res_type if row.method == "POST" else url}
            resp = {"status": "201 Created" if row.version_id == 1 else "200 OK"}
        resp["etag"] = etag(row.version_id)
        resp["lastModified"] = format_instant(row.last_updated)
        entry: dict[str, Any] = {"fullUrl": f"{base}/{url}", "request": req, "response": resp}
        data = orjson.dumps(entry)
        if row.content is not None:
            data = data[:-1] + b',"resource":' + row.content + b"}"
        entries.append(data)
    return raw_bundle(head, entries)
