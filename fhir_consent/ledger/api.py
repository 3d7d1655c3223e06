"""The ledger's HTTP surface and its wiring into the app (ledger.md §2 "Verifiable by the patient").

Operations, relative to the FHIR base:

``GET [base]/Consent/{id}/_history/{vid}/$ledger-proof`` (also ``DocumentReference``)
    The proof document of :mod:`fhir_consent.ledger.verify_proof`: the version's ledger entry,
    its RFC 9162 inclusion proof (§2.1.3) and the signed checkpoint it is proven against, plus
    the log's public key. Needs the same access as a vread of that resource (a deleted version
    still has its proof). ``application/json``.
``GET [base]/$ledger-checkpoint``
    The signed checkpoint at the current size (C2SP tlog-checkpoint), cached in
    ``ledger_checkpoint``: ``text/plain`` when asked for, else JSON with the note, size, root,
    origin, public key and signed-note verifier key.
``GET [base]/$ledger-consistency?from=M[&to=N]``
    ``PROOF(M, D[N])`` (RFC 9162 §2.1.4), the root at M and the signed checkpoint at N (default:
    the current size), so a holder of an older checkpoint can check the log only grew.

Checkpoints and consistency proofs carry no personal data and are public by default
(``public_checkpoints``), as transparency logs' are, so anyone can witness the log.

Wiring (:func:`fhir_consent.app.create_app` calls it once)::

    from fhir_consent.ledger.api import install
    from fhir_consent.ledger.config import LedgerSettings
    install(app, app.state.fhir, LedgerSettings())

adds the write listener, these routes (ahead of the generic FHIR routes, which would otherwise
take ``$ledger-checkpoint`` for a resource type), a CapabilityStatement extender declaring the
operations, and — when an external engine is configured and ``relay_in_process`` — the relay
as a background thread started and stopped with the app's lifespan.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from fhir_consent.crypto import KeyRing
from fhir_consent.errors import BadRequest, FHIRError, NotFound
from fhir_consent.fhir.routes import FHIRContext, entry_gate
from fhir_consent.ledger.checkpoint import verifier_key
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.ledger.embedded import LedgerNotFound, TreeHead
from fhir_consent.ledger.engines.base import EMBEDDED, create_engine
from fhir_consent.ledger.entry import KINDS
from fhir_consent.ledger.relay import Relay, RelayThread
from fhir_consent.ledger.service import Ledger, build_ledger
from fhir_consent.requestctx import current_access
from fhir_consent.store.repository import CurrentRow, Repository
from smart_on_fhir.scopes import Interaction

__all__ = [
    "OPERATION_BASE",
    "build_ledger_router",
    "capability_extender",
    "install",
]

T = TypeVar("T")
_JSON = "application/json"
#: Canonical URLs of the operations' definitions (declared in the CapabilityStatement).
OPERATION_BASE = "urn:fhir-consent:OperationDefinition:"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=_JSON)


def _get_ctx(request: Request) -> FHIRContext:
    ctx: FHIRContext = request.app.state.fhir
    return ctx


def _get_ledger(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


Ctx = Annotated[FHIRContext, Depends(_get_ctx)]
LedgerDep = Annotated[Ledger, Depends(_get_ledger)]


def _int_param(request: Request, name: str, default: int | None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        if default is None:
            raise BadRequest(f"The parameter '{name}' is required")
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise BadRequest(f"The parameter '{name}' must be a non-negative integer")
    return int(raw)


async def _checkpoint_at_head(ctx: FHIRContext, ledger: Ledger) -> tuple[TreeHead, str]:
    """The checkpoint at the current size: cached, or signed now and cached (one write)."""

    def read() -> tuple[TreeHead, str | None]:
        with ctx.db.read() as conn:
            head = ledger.log.head(conn)
            cached = ledger.log.cached_checkpoint(conn, head.size)
            return head, cached[1] if cached and cached[0] == head.size else None

    head, note = await run_in_threadpool(read)
    if note is None:
        note = ledger.log.sign(head)

        def store() -> None:
            with ctx.db.write() as conn:
                ledger.log.store_checkpoint(conn, head, note)

        await run_in_threadpool(store)
    return head, note


def build_ledger_router() -> APIRouter:
    """The ledger operations, relative to the FHIR base."""
    router = APIRouter()

    async def public_access(request: Request, ctx: FHIRContext, ledger: Ledger) -> None:
        if not ledger.settings.public_checkpoints:
            await ctx.authenticate(request)

    @router.get("/{rtype}/{rid}/_history/{vid}/$ledger-proof")
    async def ledger_proof(
        rtype: str, rid: str, vid: str, request: Request, ctx: Ctx, ledger: LedgerDep
    ) -> Response:
        if rtype not in KINDS:
            raise NotFound(f"$ledger-proof is not defined for '{rtype[:64]}'")
        access = await ctx.authenticate(request)
        current_access.set(access)
        # what a vread of that version needs: the scope, then the record's visibility under
        # the request's consents (computed in the transaction), refusals audited
        gate = entry_gate(ctx, access, rtype, Interaction.READ, "operation")
        if not vid.isascii() or not vid.isdigit() or len(vid) > 9:
            raise NotFound(f"Version '{vid[:16]}' of {rtype}/{rid[:64]} is not known")
        ref = f"{rtype}/{rid}/_history/{int(vid)}"

        def run() -> tuple[dict[str, Any], TreeHead | None, str, CurrentRow]:
            with ctx.db.read() as conn:
                if ctx.token_check is not None and not access.is_open:
                    ctx.token_check(conn, access)
                current = Repository(conn).current(rtype, rid)
                if current is None:
                    raise NotFound(f"{rtype}/{rid[:64]} is not known")
                if not ctx.visibility(conn, gate).can_see(conn, current):
                    raise NotFound(f"{rtype}/{rid[:64]} is not known", hidden=current)
                try:
                    stored = ledger.log.entry_by_ref(conn, ref)
                except LedgerNotFound:
                    raise NotFound(f"{ref} has no ledger entry") from None
                cached = ledger.log.cached_checkpoint(conn, stored.seq + 1)
                fresh: TreeHead | None = None
                if cached is not None:
                    size, note = cached
                else:
                    fresh = ledger.log.head(conn)
                    size, note = fresh.size, ledger.log.sign(fresh)
                doc = ledger.log.proof_document(conn, stored, note, size)
                return doc, fresh, note, current

        try:
            doc, fresh, note, row = await run_in_threadpool(run)
        except FHIRError as exc:
            ctx.refused(gate, exc.hidden)
            raise
        sink = ctx.audited(gate)
        if sink is not None:
            sink.record_access(gate.interaction, access, [row], gate.now)
        if fresh is not None:

            def store() -> None:
                assert fresh is not None
                with ctx.db.write() as conn:
                    ledger.log.store_checkpoint(conn, fresh, note)

            await run_in_threadpool(store)
        return _json(doc)

    @router.get("/$ledger-checkpoint")
    async def ledger_checkpoint(request: Request, ctx: Ctx, ledger: LedgerDep) -> Response:
        await public_access(request, ctx, ledger)
        head, note = await _checkpoint_at_head(ctx, ledger)
        accept = request.headers.get("accept", "")
        if "text/plain" in accept and "json" not in accept:
            return Response(note, media_type="text/plain; charset=utf-8")
        key = ledger.keyring.signing.public_key
        return _json(
            {
                "origin": ledger.origin,
                "size": head.size,
                "root": _b64(head.root),
                "checkpoint": note,
                "public_key": key.to_base64(),
                "key_id": key.key_id,
                "verifier_key": verifier_key(ledger.origin, key),
            }
        )

    @router.get("/$ledger-consistency")
    async def ledger_consistency(request: Request, ctx: Ctx, ledger: LedgerDep) -> Response:
        await public_access(request, ctx, ledger)
        first = _int_param(request, "from", None)
        head, note = await _checkpoint_at_head(ctx, ledger)
        second = _int_param(request, "to", head.size)
        if not first <= second <= head.size:
            raise BadRequest(f"Need 0 <= from <= to <= {head.size} (the log's size)")

        def run() -> tuple[list[bytes], bytes, bytes]:
            with ctx.db.read() as conn:
                proof = ledger.log.consistency(conn, first, second)
                return proof, ledger.log.root_at(conn, first), ledger.log.root_at(conn, second)

        proof, root_first, root_second = await run_in_threadpool(run)
        if second != head.size:
            note = ledger.log.sign(TreeHead(second, root_second))
        return _json(
            {
                "from": first,
                "to": second,
                "from_root": _b64(root_first),
                "to_root": _b64(root_second),
                "proof": [_b64(p) for p in proof],
                "checkpoint": note,
            }
        )

    return router


def capability_extender(statement: dict[str, Any]) -> None:
    """Declare the ledger operations in the CapabilityStatement (R4 ``rest.operation`` and
    ``rest.resource.operation``)."""
    rest = statement["rest"][0]
    docs = {
        "ledger-checkpoint": "Signed checkpoint of the permissions ledger (C2SP tlog-checkpoint)",
        "ledger-consistency": "RFC 9162 consistency proof between two sizes of the ledger "
        "(?from=&to=)",
    }
    ops = rest.setdefault("operation", [])
    for name, text in docs.items():
        ops.append({"name": name, "definition": OPERATION_BASE + name, "documentation": text})
    for resource in rest.get("resource", []):
        if resource.get("type") in KINDS:
            resource.setdefault("operation", []).append(
                {
                    "name": "ledger-proof",
                    "definition": OPERATION_BASE + "ledger-proof",
                    "documentation": "On a version (_history/{vid}/$ledger-proof): its ledger "
                    "entry, inclusion proof and checkpoint; check with "
                    "python -m fhir_consent.ledger.verify_proof",
                }
            )


def _wrap_lifespan(app: FastAPI, start: Callable[[], RelayThread]) -> None:
    original = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(the_app: Any) -> AsyncIterator[Any]:
        async with original(the_app) as state:
            thread = start()
            thread.start()
            try:
                yield state
            finally:
                await run_in_threadpool(thread.stop)

    app.router.lifespan_context = lifespan


def _uninstall(app: FastAPI, ctx: FHIRContext) -> None:
    previous = getattr(app.state, "ledger_installed", None)
    if previous is None:
        return
    listener, routes, lifespan = previous
    if listener in ctx.listeners:
        ctx.listeners.remove(listener)
    if capability_extender in ctx.capability_extenders:
        ctx.capability_extenders.remove(capability_extender)
    app.router.routes[:] = [r for r in app.router.routes if all(r is not o for o in routes)]
    app.router.lifespan_context = lifespan


def install(
    app: FastAPI,
    ctx: FHIRContext,
    settings: LedgerSettings,
    *,
    keyring: KeyRing | None = None,
) -> Ledger:
    """Wire the ledger into an app built by :func:`fhir_consent.app.create_app`.

    Calling it again replaces the previous installation (listener, routes, extender, relay).
    """
    ledger = build_ledger(
        settings, clock=ctx.clock, public_base_url=ctx.settings.public_base_url, keyring=keyring
    )
    _uninstall(app, ctx)  # installing again (e.g. with test settings) replaces the first one
    app.state.ledger = ledger
    if settings.enabled:
        ctx.listeners.append(ledger.listener)
    ctx.capability_extenders.append(capability_extender)
    before = len(app.router.routes)
    app.include_router(build_ledger_router(), prefix=ctx.settings.fhir_path)
    ours = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[0:0] = ours
    app.state.ledger_installed = (ledger.listener, ours, app.router.lifespan_context)
    if settings.engine != EMBEDDED and settings.relay_in_process:
        probe = create_engine(settings, ledger.origin)  # fail at start-up on a bad config
        if probe is not None:
            probe.close()

        def start() -> RelayThread:
            engine = create_engine(settings, ledger.origin)
            assert engine is not None
            return RelayThread(Relay(ctx.db, engine, settings, clock=ctx.clock))

        _wrap_lifespan(app, start)
    return ledger
