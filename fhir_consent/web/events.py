"""Live updates for patient apps: ``GET [base]/$events``, a Server-Sent Events stream.

R4 has no browser-usable Subscription channel (rest-hook needs a server to call back; the
websocket channel is R5), so this is the documented endpoint the patient app listens on
(WHATWG HTML "Server-sent events"). It emits, for the patient of the access token:

``event: Consent``
    every new version of one of the patient's Consents (a clinic's new inquiry, a grant,
    refusal or revocation made from another device); ``data`` is the resource version.
``event: AuditEvent``
    every new AuditEvent concerning the patient (an access to their records, permitted or
    denied); ``data`` is the AuditEvent.
``event: ready``
    first, once per connection: ``{"cursor": N, "patient": "Patient/p", "types": [...]}``.
``event: error``
    last, when the token expired or was revoked: ``{"status": 401}``; the stream then ends.

Every resource event carries ``id: <cursor>``; a client that reconnects sends it back as
``Last-Event-ID`` (header, or the ``since`` query parameter) and receives what it missed.

**Authentication.** A SMART bearer token with a patient context, in the ``Authorization``
header. ``EventSource`` cannot send headers, so the patient app reads the stream with
``fetch()`` (``fhir_consent/web/static/js/events.js``); tokens in query strings would end up in
access logs, so none is accepted. The stream shows exactly what searches with the same token
would: the token's scopes (read access to each type), the patient compartment, and the
consent engine's filter. Revocation of the token is checked on every poll, its expiry every
``events_recheck`` seconds.

**Across workers.** New rows are found by polling ``resource_versions`` for sequence numbers
above a cursor (every ``events_poll_interval`` seconds, one indexed query), never by in-process
notification, so any worker serves any client. Concurrent PostgreSQL transactions may commit
out of sequence order, so rows up to ``events_settle`` seconds behind the cursor are looked at
again (and never sent twice).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
import sqlalchemy as sa
from fastapi import APIRouter, Request
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from fhir_consent.auth import AccessContext
from fhir_consent.errors import BadRequest, FHIRError, Forbidden
from fhir_consent.fhir.routes import FHIRContext
from fhir_consent.fhir.visibility import Visibility, visibility_for
from fhir_consent.store.tables import resource_versions, resources
from fhir_consent.web.config import WebSettings
from smart_on_fhir.scopes import Interaction

__all__ = ["EVENT_TYPES", "EVENTS_PATH", "Cursor", "build_events_router", "format_event"]

#: The path of the stream, relative to the FHIR base.
EVENTS_PATH = "/$events"
#: The resource types the stream carries.
EVENT_TYPES: tuple[str, ...] = ("Consent", "AuditEvent")
_BATCH = 200


def format_event(event: str, data: bytes | str, event_id: int | None = None) -> bytes:
    """One SSE message. ``data`` must not contain raw newlines (compact JSON has none)."""
    body = data.encode("utf-8") if isinstance(data, str) else data
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\n".encode() + b"data: " + body + b"\n\n"


@dataclass(slots=True)
class Cursor:
    """Where a stream stands: ``top`` is the highest sequence number sent (the event id);
    rows above ``floor`` are looked at again until ``settle`` seconds have passed, and
    ``sent`` remembers which of them went out already."""

    top: int
    settle: float
    floor: int = 0
    sent: set[int] = field(default_factory=set)
    _marks: deque[tuple[float, int]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.floor = self.top

    def advance(self, now: float) -> None:
        """Record the current ``top`` at time ``now`` and raise ``floor`` to the ``top`` of
        ``settle`` seconds ago (rows at or below it can no longer appear)."""
        self._marks.append((now, self.top))
        while self._marks and self._marks[0][0] <= now - self.settle:
            self.floor = max(self.floor, self._marks.popleft()[1])
        self.sent = {s for s in self.sent if s > self.floor}

    def fresh(self, seq: int) -> bool:
        """Whether row ``seq`` still has to be sent (and mark it sent)."""
        if seq <= self.floor or seq in self.sent:
            return False
        self.sent.add(seq)
        self.top = max(self.top, seq)
        return True


def _patient_of(request: Request, access: AccessContext) -> str:
    if access.patient:
        return access.patient
    if access.is_open:  # development mode: say whose events
        pid = request.query_params.get("patient", "").removeprefix("Patient/")
        if pid:
            return pid
        raise BadRequest("Open access: name the patient with ?patient=<id>")
    raise Forbidden("$events needs a token with a patient context (launch/patient)")


def _since(request: Request) -> int | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("since")
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise BadRequest("Last-Event-ID / since must be a non-negative integer")
    return int(raw)


def _filters(
    conn: Connection, ctx: FHIRContext, access: AccessContext, patient: str, now: int
) -> ColumnElement[bool] | None:
    """Which ``resource_versions`` rows this token may see, as one SQL condition (None: none)."""
    consent = None
    if ctx.consent is not None and not access.is_open:
        consent = ctx.consent.filter_for(conn, access, now)
    own = Visibility(patient=patient)  # always this patient's compartment, whatever the token
    parts: list[ColumnElement[bool]] = []
    for rtype in EVENT_TYPES:
        decision = None if access.scopes is None else access.scopes.decide(rtype, Interaction.READ)
        if decision is not None and not decision.allowed:
            continue
        vis = visibility_for(access, decision, rtype, now, consent)
        cond: ColumnElement[bool] = resource_versions.c.res_type == rtype
        for predicate in (own.restrict_for(rtype), vis.restrict_for(rtype)):
            if predicate is not None:
                cond = sa.and_(cond, predicate(resources))
        parts.append(cond)
    return sa.or_(*parts) if parts else None


def _poll(
    conn: Connection, condition: ColumnElement[bool], cursor: Cursor
) -> list[tuple[int, str, bytes]]:
    v = resource_versions.c
    after = v.seq > cursor.floor
    if cursor.sent:
        after = sa.and_(after, v.seq.not_in(sorted(cursor.sent)))
    stmt = (
        sa.select(v.seq, v.res_type, v.content)
        .select_from(
            resource_versions.join(
                resources,
                sa.and_(resources.c.res_type == v.res_type, resources.c.res_id == v.res_id),
            )
        )
        .where(after, v.deleted.is_(False), condition)
        .order_by(v.seq)
        .limit(_BATCH)
    )
    out: list[tuple[int, str, bytes]] = []
    for seq, rtype, content in conn.execute(stmt):
        if content is not None:
            out.append((int(seq), str(rtype), content))
    return out


def _head(conn: Connection) -> int:
    top = sa.select(sa.func.coalesce(sa.func.max(resource_versions.c.seq), 0))
    return int(conn.execute(top).scalar_one())


def build_events_router(settings: WebSettings) -> APIRouter:
    """The ``$events`` route, relative to the FHIR base."""
    router = APIRouter()

    @router.get(EVENTS_PATH)
    async def events(request: Request) -> Response:
        ctx: FHIRContext = request.app.state.fhir
        access = await ctx.authenticate(request)
        patient = _patient_of(request, access)
        since = _since(request)

        def start() -> int:
            with ctx.db.read() as conn:
                if ctx.token_check is not None and not access.is_open:
                    ctx.token_check(conn, access)
                return since if since is not None else _head(conn)

        cursor = Cursor(top=await run_in_threadpool(start), settle=settings.events_settle)
        if ctx.audit is not None and not access.is_open:
            ctx.audit.record_access(
                "operation", access, [], ctx.clock(), query=EVENTS_PATH.lstrip("/")
            )
        types = [
            t
            for t in EVENT_TYPES
            if access.scopes is None or access.scopes.decide(t, Interaction.READ).allowed
        ]
        ready = {"cursor": cursor.top, "patient": f"Patient/{patient}", "types": types}
        return StreamingResponse(
            _stream(request, ctx, settings, access, patient, cursor, ready),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return router


async def _stream(
    request: Request,
    ctx: FHIRContext,
    settings: WebSettings,
    access: AccessContext,
    patient: str,
    cursor: Cursor,
    ready: dict[str, Any],
) -> AsyncIterator[bytes]:
    def poll() -> list[tuple[int, str, bytes]]:
        with ctx.db.read() as conn:
            if ctx.token_check is not None and not access.is_open:
                ctx.token_check(conn, access)  # a revoked token ends the stream at once
            condition = _filters(conn, ctx, access, patient, ctx.clock())
            return [] if condition is None else _poll(conn, condition, cursor)

    yield b"retry: 2000\n" + format_event("ready", orjson.dumps(ready))
    checked = beat = time.monotonic()
    while True:
        now = time.monotonic()
        try:
            if now - checked >= settings.events_recheck:
                await ctx.authenticate(request)  # expiry
                checked = now
            rows = await run_in_threadpool(poll)
        except FHIRError as exc:
            yield format_event("error", orjson.dumps({"status": exc.status}))
            return
        sent = False
        for seq, rtype, content in rows:
            if cursor.fresh(seq):
                yield format_event(rtype, content, cursor.top)
                sent = True
        cursor.advance(time.monotonic())
        if sent:
            beat = now
        elif now - beat >= settings.events_heartbeat:
            yield b": keep-alive\n\n"
            beat = now
        await anyio.sleep(settings.events_poll_interval)
