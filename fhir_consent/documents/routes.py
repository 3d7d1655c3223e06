"""The Binary endpoints (R4 binary.html, http.html): raw upload and download of document
content, with content negotiation, ranges, access checks and auditing.

* ``POST Binary`` (``If-None-Exist`` honoured) / ``PUT Binary/{id}`` take the raw bytes with
  their own Content-Type (streamed, encrypted chunk by chunk, never held whole in memory) or a
  FHIR Binary JSON whose ``data`` is base64. ``X-Security-Context`` sets
  ``Binary.securityContext`` (R4 binary.html "Security Context"). The response is the Binary
  with ``data`` up to ``inline_data_max_bytes``, else tagged SUBSETTED (:mod:`.inline`).
* ``PATCH Binary/{id}`` applies a JSON Patch to the Binary as a client reads it (with
  ``data``) and stores the result as an update; see
  :meth:`~fhir_consent.documents.service.DocumentHooks.patch_source`.
* Every write is audited like the generic FHIR routes' writes.
* ``GET Binary/{id}`` (and ``/_history/{vid}``) answers with the raw bytes and the stored
  Content-Type when ``Accept`` names that type, ``*/*``, or is absent; with the Binary resource
  (base64 ``data``, streamed) for ``application/fhir+json`` or ``_format=json``. Raw answers
  carry Content-Length, a strong ETag (``"{versionId}"``), Accept-Ranges and honour one
  ``Range: bytes=…`` (206, or 416 when unsatisfiable; If-Range supported; several ranges are
  answered with the whole content, as RFC 9110 §14.2 permits).
* **Integrity.** With ``verify_before_send`` (the default) every chunk the response needs is
  authenticated *before the first byte is sent*: a corrupt, reordered or truncated blob is
  answered with a 500 OperationOutcome and logged as an integrity error (ids only, no content).
  Responses up to ``verify_buffer_bytes`` (16 MiB) are then sent from that verified plaintext;
  larger ones are decrypted — and so authenticated — again, batch by batch, while streaming,
  and a batch that fails that second check (storage changed between the passes, or
  ``verify_before_send`` is off) aborts the connection before any of its bytes go out: the
  client sees a short, failed response, never unauthenticated bytes.
* **Access** follows the DocumentReference(s) pointing to a Binary through a
  :class:`BinaryAccess` callback (:class:`DocumentLinkAccess` by default); refusals are 404,
  exactly as if the Binary did not exist. Every download attempt reaches a
  :class:`DownloadAudit` hook.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qsl

import anyio
import orjson
from fastapi import APIRouter, Depends, Request
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.responses import Response, StreamingResponse

from fhir_consent.auth import AccessContext, require
from fhir_consent.documents.access import (
    BinaryAccess,
    DownloadAudit,
    DownloadEvent,
    OpenedBinary,
    Outcome,
    Refused,
    open_binary,
)
from fhir_consent.documents.config import DocumentSettings
from fhir_consent.documents.errors import ContentDestroyed, IntegrityFailure
from fhir_consent.documents.inline import BinaryInliner
from fhir_consent.documents.service import (
    DocumentHooks,
    log_integrity,
    owner_hint,
    stored_content,
    strip_blob_extension,
)
from fhir_consent.documents.storage import BlobReader, BlobStore, Spool
from fhir_consent.errors import (
    BadRequest,
    Forbidden,
    Gone,
    Issue,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    UnsupportedMediaType,
    operation_outcome,
)
from fhir_consent.fhir.http import (
    FHIR_JSON,
    check_accept,
    check_content_type,
    etag,
    fhir_response,
    http_date,
    parse_if_match,
    parse_prefer,
)
from fhir_consent.fhir.routes import FHIRContext
from fhir_consent.fhir.services import WriteResult
from fhir_consent.fhir.validation import check_json_structure, is_valid_id, parse_json_body
from fhir_consent.requestctx import current_access
from fhir_consent.store.repository import CurrentRow, Repository
from smart_on_fhir.scopes import Interaction

__all__ = ["FHIR_TYPES", "JSON_TYPES", "Documents", "build_router", "parse_range"]

log = logging.getLogger("fhir_consent.documents")

T = TypeVar("T")
FHIR_TYPES = frozenset({"application/fhir+json", "application/json+fhir"})
JSON_TYPES = FHIR_TYPES | {"application/json"}
_FORMAT_ALIASES = frozenset({"json", *JSON_TYPES})
_PLACEHOLDER = "\x00fhir-consent-binary-data\x00"
_PATCH_TYPES = frozenset({"application/json-patch+json"})


@dataclass(slots=True)
class Documents:
    """The document store as installed on an app (``app.state.documents``). ``access`` and
    ``audit`` may be replaced at any time (e.g. to apply consent rules)."""

    settings: DocumentSettings
    fhir: FHIRContext
    store: BlobStore
    hooks: DocumentHooks
    access: BinaryAccess
    audit: DownloadAudit
    installed: tuple[tuple[Any, ...], tuple[Any, ...]] = ((), ())  # routes, limit rules
    inliner: BinaryInliner = field(init=False)

    def __post_init__(self) -> None:
        self.inliner = BinaryInliner(self)


def _get_docs(request: Request) -> Documents:
    docs: Documents = request.app.state.documents
    return docs


Docs = Annotated[Documents, Depends(_get_docs)]


# -- HTTP helpers ----------------------------------------------------------------------------


def _media_types(header: str) -> list[str]:
    out = []
    for part in header.split(","):
        fields = [f.strip() for f in part.split(";")]
        if not fields[0]:
            continue
        if any(f.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for f in fields[1:]):
            continue
        out.append(fields[0].lower())
    return out


def _wants_resource(request: Request, content_type: str) -> bool:
    """Content negotiation for ``GET Binary`` (R4 binary.html "Serving Binary Resources")."""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        if fmt.split(";")[0].strip().lower() not in _FORMAT_ALIASES:
            raise NotAcceptable("_format must be json (or omitted for the raw content)")
        return True
    accept = request.headers.get("accept")
    if not accept:
        return False
    types = _media_types(accept)
    mine = content_type.split(";")[0].strip().lower()
    if mine in types:
        return False
    if any(t in JSON_TYPES for t in types):
        return True
    major = mine.split("/")[0]
    if "*/*" in types or f"{major}/*" in types:
        return False
    raise NotAcceptable("The content is not available in the requested media type")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | Literal[False]:
    """One ``bytes`` range (RFC 9110 §14.1.2) → inclusive ``(start, end)``; ``None`` to serve
    the whole content (no, invalid or multiple ranges); ``False`` when unsatisfiable."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    if first == "":
        if not last.isdigit():
            return None
        n = int(last)
        if n == 0 or size == 0:
            return False
        return max(0, size - n), size - 1
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    end = int(last) if last else max(start, size - 1)
    if end < start:
        return None
    if start >= size:
        return False
    return start, min(end, size - 1)


def _content_type(request: Request) -> str:
    value = request.headers.get("content-type")
    if not value or not value.strip():
        raise UnsupportedMediaType("A Content-Type header is required")
    ctype = " ".join(value.split())
    if len(ctype) > 255 or "/" not in ctype:
        raise BadRequest("The Content-Type header is not a valid media type")
    return ctype


def _base_type(ctype: str) -> str:
    return ctype.split(";")[0].strip().lower()


def _raw_etag(version_id: int) -> str:
    return f'"{version_id}"'


def _integrity_response() -> Response:
    outcome = operation_outcome(
        [Issue("The stored content failed its integrity check", "exception", "fatal")]
    )
    return fhir_response(outcome, 500)


_log_integrity = log_integrity


# -- the router ------------------------------------------------------------------------------


class _FhirId(Convertor[str]):
    """A FHIR ``id`` path segment (R4 datatypes.html#id), so that ``Binary/_history`` and
    ``Binary/_search`` fall through to the generic FHIR routes."""

    regex = r"[A-Za-z0-9\-\.]{1,64}"

    def convert(self, value: str) -> str:
        """The id as is."""
        return value

    def to_string(self, value: str) -> str:
        """The id as is."""
        return value


def build_router() -> APIRouter:
    """The Binary routes, relative to the FHIR base; include them before the generic ones."""
    register_url_convertor("fhir_consent_id", _FhirId())
    router = APIRouter()

    async def in_db(
        docs: Documents, access: AccessContext, fn: Callable[[Connection], T], *, write: bool
    ) -> T:
        ctx = docs.fhir

        def run() -> T:
            scope = ctx.db.write() if write else ctx.db.read()
            with scope as conn:
                if ctx.token_check is not None and not access.is_open:
                    ctx.token_check(conn, access)
                return fn(conn)

        return await run_in_threadpool(run)

    def represent(
        conn: Connection,
        docs: Documents,
        access: AccessContext,
        result: WriteResult,
        prefer: str,
        *,
        sent: bool,
    ) -> dict[str, Any] | None:
        """The Binary the write response returns, with ``data`` (:mod:`.inline`), in the
        write's transaction; None unless ``Prefer: return=representation`` (the default).
        ``sent``: the caller sent this content itself (not audited as a download)."""
        if prefer != "representation" or result.row.content is None:
            return None
        resource = strip_blob_extension(orjson.loads(result.row.content))
        return docs.inliner.inline(conn, access, resource, audit=not sent)

    def written(
        request: Request, docs: Documents, result: WriteResult, body: dict[str, Any] | None
    ) -> Response:
        row = result.row
        headers = {
            "ETag": etag(row.version_id),
            "Last-Modified": http_date(row.last_updated),
            "Location": f"{docs.fhir.base(request)}/Binary/{row.res_id}/_history/{row.version_id}",
        }
        status = 201 if result.created else 200
        prefer = parse_prefer(request).get("return", "representation")
        if prefer == "minimal":
            return Response(status_code=status, headers=headers)
        if prefer == "operationoutcome":
            text = "Created" if result.created else "Updated"
            outcome = operation_outcome([Issue(text, "informational", "information")])
            return fhir_response(outcome, status, headers)
        assert body is not None
        return fhir_response(body, status, headers)

    async def upload(
        request: Request, docs: Documents, rid: str | None, interaction: Interaction
    ) -> Response:
        """Create (``rid`` None) or update a Binary from raw bytes or FHIR JSON."""
        check_accept(request)
        access = await docs.fhir.authenticate(request)
        current_access.set(access)  # the write hooks and the ledger see who is calling
        require(access, "Binary", interaction)
        ctype = _content_type(request)
        if_match = parse_if_match(request.headers.get("if-match")) if rid else None
        ine = request.headers.get("if-none-exist") if rid is None else None
        criteria = parse_qsl(ine.lstrip("?"), keep_blank_values=True) if ine is not None else None
        security = request.headers.get("x-security-context")
        resource: dict[str, Any] | None = None
        raw: bytes | None = None
        if _base_type(ctype) in JSON_TYPES:
            body = await request.body()
            if _base_type(ctype) in FHIR_TYPES:
                resource = parse_json_body(body)
            else:  # application/json: a FHIR Binary, or JSON content to store as is
                try:
                    parsed = orjson.loads(body)
                except orjson.JSONDecodeError:
                    parsed = None
                if isinstance(parsed, dict) and parsed.get("resourceType") == "Binary":
                    check_json_structure(parsed, body)
                    resource = parsed
                else:
                    raw = body
        streamed = resource is None and raw is None
        spool = await _receive(request, docs, ctype) if streamed else None
        spool_used = False

        def check_existing(conn: Connection) -> None:
            if rid is None:
                return
            current = Repository(conn).current("Binary", rid, for_update=True)
            if current is not None and not docs.access(conn, access, rid, interaction):
                raise NotFound(f"Binary/{rid} is not known")

        def run(conn: Connection) -> tuple[WriteResult, dict[str, Any] | None]:
            result = store(conn)
            if result.existing:  # a conditional create that matched discloses the match
                _audit_read(docs, access, result.row)
            else:
                action = "create" if result.created else "update"
                _audit_change(docs, conn, access, action, result.row)
            shown = represent(conn, docs, access, result, prefer, sent=not result.existing)
            return result, shown

        def store(conn: Connection) -> WriteResult:
            check_existing(conn)
            service = docs.fhir.service(conn)
            if criteria is not None:  # R4 http.html §3.1.0.8 conditional create
                matches = service.conditional_matches("Binary", criteria)
                if len(matches) == 1:
                    return WriteResult(matches[0], created=False, existing=True)
                if len(matches) > 1:
                    raise PreconditionFailed("If-None-Exist matched more than one resource")
            with owner_hint(access.patient):
                if resource is not None:
                    if rid is None:
                        return service.create("Binary", resource)
                    return service.update("Binary", rid, resource, if_match=if_match)
                meta: dict[str, Any] = {"resourceType": "Binary", "contentType": ctype}
                if rid is not None:
                    meta["id"] = rid
                if security:
                    meta["securityContext"] = {"reference": security.strip()}
                owner = docs.hooks.owner_for(conn, meta.get("securityContext"))
                if spool is not None:
                    nonlocal spool_used
                    info = docs.store.commit_spool(conn, spool, ctype, owner)
                    spool_used = True
                else:
                    assert raw is not None
                    if len(raw) > docs.settings.max_upload_bytes:
                        raise PayloadTooLarge("The content exceeds the upload limit")
                    info = docs.store.store_bytes(conn, raw, ctype, owner)
                with stored_content(info.blob_id):
                    if rid is None:
                        return service.create("Binary", meta)
                    return service.update("Binary", rid, meta, if_match=if_match)

        prefer = parse_prefer(request).get("return", "representation")
        try:
            result, shown = await in_db(docs, access, run, write=True)
        except BaseException:
            if spool is not None:
                await _discard(docs, spool)
            raise
        finally:
            if spool is not None:
                spool.close()
        if spool is not None and not spool_used:  # e.g. a conditional create that matched
            await _discard(docs, spool)
        return written(request, docs, result, shown)

    @router.post("/Binary")
    async def create_binary(request: Request, docs: Docs) -> Response:
        """R4 http.html §3.1.0.7 create, for Binary: raw content or FHIR Binary JSON."""
        return await upload(request, docs, None, Interaction.CREATE)

    @router.put("/Binary/{rid:fhir_consent_id}")
    async def update_binary(rid: str, request: Request, docs: Docs) -> Response:
        """R4 http.html §3.1.0.4 update (If-Match honoured), for Binary."""
        if not is_valid_id(rid):
            raise BadRequest("The resource id is not a valid FHIR id")
        return await upload(request, docs, rid, Interaction.UPDATE)

    @router.patch("/Binary/{rid:fhir_consent_id}")
    async def patch_binary(rid: str, request: Request, docs: Docs) -> Response:
        """R4 http.html §3.1.0.6 patch, for Binary: a JSON Patch (RFC 6902) applied to the
        resource as a client reads it (``application/fhir+json``, with ``data``), stored as
        an update (:meth:`DocumentHooks.patch_source`). If-Match honoured."""
        if not is_valid_id(rid):
            raise BadRequest("The resource id is not a valid FHIR id")
        check_accept(request)
        access = await docs.fhir.authenticate(request)
        current_access.set(access)  # the write hooks and the ledger see who is calling
        require(access, "Binary", Interaction.UPDATE)
        check_content_type(request, _PATCH_TYPES)
        try:
            ops = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise BadRequest("The request body is not valid JSON") from None
        if_match = parse_if_match(request.headers.get("if-match"))

        def run(conn: Connection) -> tuple[WriteResult, dict[str, Any] | None]:
            current = Repository(conn).current("Binary", rid, for_update=True)
            if current is not None and not docs.access(conn, access, rid, Interaction.UPDATE):
                raise NotFound(f"Binary/{rid} is not known")
            with owner_hint(access.patient):
                result = docs.fhir.service(conn).patch("Binary", rid, ops, if_match=if_match)
            _audit_change(docs, conn, access, "patch", result.row)
            # the content a patch kept was not sent by the caller: audited as a download
            return result, represent(conn, docs, access, result, prefer, sent=False)

        prefer = parse_prefer(request).get("return", "representation")
        return written(request, docs, *(await in_db(docs, access, run, write=True)))

    @router.delete("/Binary/{rid:fhir_consent_id}")
    async def delete_binary(rid: str, request: Request, docs: Docs) -> Response:
        """R4 http.html §3.1.0.7 delete; earlier versions stay readable (vread)."""
        if not is_valid_id(rid):
            raise BadRequest("The resource id is not a valid FHIR id")
        access = await docs.fhir.authenticate(request)
        current_access.set(access)  # the write hooks and the ledger see who is calling
        require(access, "Binary", Interaction.DELETE)

        def run(conn: Connection) -> CurrentRow | None:
            current = Repository(conn).current("Binary", rid, for_update=True)
            if current is not None and not docs.access(conn, access, rid, Interaction.DELETE):
                raise NotFound(f"Binary/{rid} is not known")
            deleted = docs.fhir.service(conn).delete("Binary", rid)
            if deleted is not None and current is not None and not current.deleted:
                _audit_change(docs, conn, access, "delete", deleted)
            return deleted

        row = await in_db(docs, access, run, write=True)
        headers = {"ETag": etag(row.version_id)} if row is not None else {}
        return Response(status_code=204, headers=headers)

    @router.get("/Binary/{rid:fhir_consent_id}")
    async def read_binary(rid: str, request: Request, docs: Docs) -> Response:
        """R4 http.html §3.1.0.2 read; R4 binary.html "Serving Binary Resources"."""
        return await download(request, docs, rid, None)

    @router.get("/Binary/{rid:fhir_consent_id}/_history/{vid}")
    async def vread_binary(rid: str, vid: str, request: Request, docs: Docs) -> Response:
        """R4 http.html §3.1.0.3 vread of a Binary version's content."""
        return await download(request, docs, rid, vid)

    async def download(request: Request, docs: Docs, rid: str, vid: str | None) -> Response:
        """Access check, audit, then the raw bytes or the Binary resource."""
        if not is_valid_id(rid):
            raise BadRequest("The resource id is not a valid FHIR id")
        access = await docs.fhir.authenticate(request)
        current_access.set(access)  # the write hooks and the ledger see who is calling

        def audit(outcome: Outcome, prepared: OpenedBinary | None = None, **kw: Any) -> None:
            info = prepared.info if prepared else None
            docs.audit(
                DownloadEvent(
                    access=access,
                    binary_id=rid,
                    version_id=prepared.row.version_id if prepared else None,
                    outcome=outcome,
                    representation=kw.pop("representation", "raw"),
                    content_type=info.content_type if info else None,
                    size=info.size if info else None,
                    documents=prepared.documents if prepared else (),
                    **kw,
                )
            )

        try:
            require(access, "Binary", Interaction.READ)
        except Forbidden:
            await run_in_threadpool(audit, "denied")
            raise

        def prepare(conn: Connection) -> OpenedBinary:
            return open_binary(conn, docs.store, docs.access, access, rid, vid)

        def prepare_audited() -> OpenedBinary:
            try:
                return _in_read(docs, access, prepare)
            except Refused as refused:
                audit(refused.outcome)
                if refused.outcome == "gone":
                    raise Gone(f"Binary/{rid} has been deleted") from None
                raise NotFound(f"Binary/{rid} is not known") from None
            except ContentDestroyed:
                audit("gone")
                raise Gone(f"The content of Binary/{rid} has been destroyed") from None
            except IntegrityFailure as exc:
                _log_integrity(rid, exc)
                audit("integrity-error")
                raise _IntegrityAbort() from None

        try:
            prepared = await run_in_threadpool(prepare_audited)
        except _IntegrityAbort:
            return _integrity_response()
        # The version's own contentType (a PATCH may change it and keep the content).
        ctype = prepared.resource.get("contentType") or (
            prepared.info.content_type if prepared.info else "application/octet-stream"
        )
        as_resource = _wants_resource(request, str(ctype))
        if as_resource:
            return await _resource_response(docs, rid, prepared, audit)
        return await _raw_response(request, docs, rid, prepared, str(ctype), audit)

    return router


async def _receive(request: Request, docs: Documents, content_type: str) -> Spool:
    """Stream the request body into a spool, as a pipeline: the event loop receives and cuts
    the body into chunks, one worker thread hashes and seals them, others store the sealed
    batches ('db' backend: while the body is still arriving). Two-slot queues between the
    stages keep memory at a few chunks and push back on the client; anything that goes wrong
    removes the spool (and, for 'db', what it stored)."""
    limit = docs.settings.max_upload_bytes
    step = docs.store.chunk_size
    spool = await run_in_threadpool(docs.store.spool, content_type)
    to_seal, sealing = anyio.create_memory_object_stream[bytes](max_buffer_size=2)
    to_store, storing = anyio.create_memory_object_stream[list[dict[str, Any]]](max_buffer_size=2)
    failure: BaseException | None = None
    sync = docs.store.backend == "dir"

    async def seal(cancel: anyio.CancelScope) -> None:
        nonlocal failure
        try:
            async with sealing, to_store:
                async for data in sealing:
                    rows = await run_in_threadpool(spool.write, data)
                    if rows:
                        await to_store.send(rows)
                rows = await run_in_threadpool(lambda: spool.finish(sync=sync))
                if rows:
                    await to_store.send(rows)
        except Exception as exc:  # e.g. the disk is full
            failure = failure or exc
            cancel.cancel()

    async def store(cancel: anyio.CancelScope, batches: Any) -> None:
        nonlocal failure
        try:
            async with batches:
                async for rows in batches:
                    await run_in_threadpool(spool.store, rows)
        except Exception as exc:  # e.g. the database is unreachable
            failure = failure or exc
            cancel.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(seal, tg.cancel_scope)
            # PostgreSQL inserts in two sessions at once (two server processes do the TOAST
            # work); SQLite has one writer at a time anyway.
            for _ in range(docs.store.write_sessions - 1):
                tg.start_soon(store, tg.cancel_scope, storing.clone())
            tg.start_soon(store, tg.cancel_scope, storing)
            async with to_seal:
                pieces: list[bytes] = []
                pending = total = 0
                try:
                    async for piece in request.stream():
                        total += len(piece)
                        if total > limit:
                            raise PayloadTooLarge(f"The content exceeds the limit of {limit} bytes")
                        pieces.append(piece)
                        pending += len(piece)
                        while pending >= step:  # exactly one chunk: sealed without a copy
                            over = pending - step
                            last = pieces[-1]
                            pieces[-1] = last[: len(last) - over]
                            await to_seal.send(b"".join(pieces))
                            pieces = [last[len(last) - over :]] if over else []
                            pending = over
                    if pieces:
                        await to_seal.send(b"".join(pieces))
                except Exception as exc:  # too large, client gone: stop sealing too
                    failure = failure or exc  # the sealer's own failure (disk full) comes first
                    tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
    except BaseException:
        spool.close()
        await _discard(docs, spool)
        raise
    return spool


async def _discard(docs: Documents, spool: Spool) -> None:
    """Remove what a spool stored (best effort, even while the request is being cancelled)."""
    with anyio.CancelScope(shield=True):
        try:
            await run_in_threadpool(docs.store.discard, spool.blob_id)
        except Exception:  # noqa: BLE001 - gc removes it later; the original error matters
            log.warning("could not remove the spool of a failed upload (gc will)")


def _audit_change(
    docs: Documents, conn: Connection, access: AccessContext, interaction: str, row: CurrentRow
) -> None:
    """A Binary write in the audit trail, in its own transaction — as the generic FHIR routes
    audit theirs (open access, for development, is not audited)."""
    sink = docs.fhir.audit
    if sink is not None and not access.is_open:
        sink.record_change(conn, interaction, access, row, docs.fhir.clock())


def _audit_read(docs: Documents, access: AccessContext, row: CurrentRow) -> None:
    sink = docs.fhir.audit
    if sink is not None and not access.is_open:
        sink.record_access("read", access, [row], docs.fhir.clock())


class _IntegrityAbort(Exception):
    pass


class _StreamAborted(Exception):
    """Raised inside a streaming body to abort the connection (content failed verification
    after the headers were sent)."""


def _in_read(docs: Documents, access: AccessContext, fn: Callable[[Connection], T]) -> T:
    ctx = docs.fhir
    with ctx.db.read() as conn:
        if ctx.token_check is not None and not access.is_open:
            ctx.token_check(conn, access)
        return fn(conn)


def _read_headers(prepared: OpenedBinary) -> dict[str, str]:
    return {
        "Last-Modified": http_date(prepared.row.last_updated),
        "Vary": "Accept",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "private, no-store",
    }


async def _verify(
    docs: Documents, rid: str, reader: BlobReader, first: int, last: int, audit: Any
) -> Response | list[bytes] | None:
    """Authenticate chunks ``first..last`` before anything is sent (``verify_before_send``).
    Spans up to ``verify_buffer_bytes`` come back decrypted (they are then sent from memory);
    larger ones are decrypted again, chunk batch by chunk batch, while streaming. A failure is
    logged, audited and answered with a 500 OperationOutcome."""
    if not docs.settings.verify_before_send:
        return None
    small = (last - first + 1) * reader.info.chunk_size <= docs.settings.verify_buffer_bytes
    try:
        if small:
            return await run_in_threadpool(reader.chunks, first, last)
        await run_in_threadpool(reader.verify, first, last)
    except IntegrityFailure as exc:
        _log_integrity(rid, exc)
        await run_in_threadpool(audit, "integrity-error")
        return _integrity_response()
    return None


async def _plain_pieces(
    rid: str, reader: BlobReader, start: int, end: int, ready: list[bytes] | None = None
) -> AsyncIterator[bytes]:
    """Verified plaintext of bytes ``start..end`` (inclusive): from ``ready`` (the already
    verified chunks of the span) or read and authenticated a batch at a time."""
    info = reader.info
    first, last = info.chunks_for(start, end)
    spans = [(first, last)] if ready is not None else list(reader.spans(first, last))
    for a, b in spans:
        if ready is not None:
            plains = ready
        else:
            try:
                plains = await run_in_threadpool(reader.chunks, a, b)
            except IntegrityFailure as exc:
                _log_integrity(rid, exc)
                raise _StreamAborted() from None
        for index, plain in enumerate(plains, start=a):
            base = index * info.chunk_size
            lo = max(start - base, 0)
            hi = min(end - base + 1, len(plain))
            if lo == 0 and hi == len(plain):
                yield plain
            elif hi > lo:
                yield plain[lo:hi]


async def _raw_response(
    request: Request, docs: Documents, rid: str, prepared: OpenedBinary, ctype: str, audit: Any
) -> Response:
    headers = _read_headers(prepared)
    headers["ETag"] = _raw_etag(prepared.row.version_id)
    headers["Accept-Ranges"] = "bytes"
    # The stored type as is: Starlette's media_type would append a charset to text/* types.
    headers["Content-Type"] = ctype
    info, reader = prepared.info, prepared.reader
    if info is None or reader is None:  # a Binary without content
        await run_in_threadpool(audit, "success", prepared)
        return Response(b"", 200, headers)
    size = info.size
    wanted = parse_range(request.headers.get("range"), size)
    if_range = request.headers.get("if-range")
    validators = (headers["ETag"], headers["Last-Modified"])
    if wanted is not None and if_range is not None and if_range.strip() not in validators:
        wanted = None  # the client's copy is stale: send the whole content (RFC 9110 §13.1.5)
    if wanted is False:
        await run_in_threadpool(audit, "unsatisfiable", prepared)
        body = orjson.dumps(
            operation_outcome([Issue("The requested range is not satisfiable", "value")])
        )
        headers["Content-Range"] = f"bytes */{size}"
        headers["Content-Type"] = FHIR_JSON
        return Response(body, 416, headers)
    start, end = wanted if wanted else (0, size - 1)
    status = 206 if wanted else 200
    if size == 0:
        start, end = 0, -1
    first, last = info.chunks_for(start, max(end, 0))
    verified = await _verify(docs, rid, reader, first, last, lambda o: audit(o, prepared))
    if isinstance(verified, Response):
        return verified
    await run_in_threadpool(
        lambda: audit("success", prepared, byte_range=(start, end) if wanted else None)
    )
    headers["Content-Length"] = str(end - start + 1)
    if wanted:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    if size == 0:
        return Response(b"", 200, headers)
    pieces = _plain_pieces(rid, reader, start, end, verified)
    return StreamingResponse(pieces, status, headers)


async def _resource_response(
    docs: Documents, rid: str, prepared: OpenedBinary, audit: Any
) -> Response:
    """The Binary resource with base64 ``data``, streamed (R4 binary.html)."""
    headers = _read_headers(prepared)
    headers["ETag"] = etag(prepared.row.version_id)
    info, reader = prepared.info, prepared.reader
    resource = dict(prepared.resource)
    resource.pop("data", None)
    if info is None or reader is None:
        await run_in_threadpool(lambda: audit("success", prepared, representation="resource"))
        return fhir_response(resource, 200, headers)
    verified: Response | list[bytes] | None = None
    if info.size > 0:
        first, last = info.chunks_for(0, info.size - 1)
        verified = await _verify(
            docs, rid, reader, first, last, lambda o: audit(o, prepared, representation="resource")
        )
        if isinstance(verified, Response):
            return verified
    ready = verified if isinstance(verified, list) else None
    await run_in_threadpool(lambda: audit("success", prepared, representation="resource"))
    resource["data"] = _PLACEHOLDER
    text = orjson.dumps(resource)
    marker = orjson.dumps(_PLACEHOLDER)
    head, _, tail = text.partition(marker)
    head += b'"'
    tail = b'"' + tail
    headers["Content-Length"] = str(len(head) + 4 * ((info.size + 2) // 3) + len(tail))

    async def body() -> AsyncIterator[bytes]:
        yield head
        carry = b""
        if info.size > 0:
            async for piece in _plain_pieces(rid, reader, 0, info.size - 1, ready):
                data = carry + piece
                cut = len(data) - len(data) % 3
                carry = data[cut:]
                if cut:
                    yield base64.b64encode(data[:cut])
        yield base64.b64encode(carry) + tail

    return StreamingResponse(body(), 200, headers, media_type=FHIR_JSON)
