"""Document hooks on the FHIR write path: Binary content, DocumentReference attachments,
superseding — all inside the write's own database transaction.

* **Binary** (R4 binary.html): a Binary written through any path (REST, transaction Bundle)
  has its ``data`` moved into encrypted blob storage; the stored resource keeps only the
  metadata a client may see, and ``document_versions`` records which blob holds each
  version's content. Nothing internal is in the stored resource, so the generic FHIR paths
  that serve stored bytes (search, history, bundles, ``_include``) cannot expose it; their
  Binaries get ``data`` from :mod:`.inline` (the FHIR context's bundle filter), behind the
  same access checks and download audit as ``GET Binary/{id}`` (raw or FHIR JSON).
* **PATCH** of a Binary (R4 http.html §3.1.0.6) applies to the form a client reads — the
  resource *with* its ``data`` — and is then an update (:meth:`DocumentHooks.patch_source`).
  A patch that does not touch ``/data`` keeps the stored content without reading it; one
  that does needs the content decoded in memory, so it is refused (422 ``too-costly``) above
  ``max_json_upload_bytes``, the size of a JSON upload.
* **DocumentReference** (R4 documentreference.html): inline ``content.attachment.data`` becomes
  a new Binary and the attachment gets ``url = Binary/{id}``; for data or a local ``Binary/{id}``
  url the server sets ``size`` and ``hash`` (base64 SHA-1, R4 datatypes.html#Attachment) and
  rejects a client value that does not match (400).
* **Links**: which DocumentReference points at which Binary, for access checks; content stored
  before its patient was known is moved to that patient's data key when a document links it.
* **Superseding**: ``relatesTo.code = replaces`` marks the target DocumentReference
  ``status = superseded`` as a new version, in the same transaction (R4 documentreference.html
  §2.42.3 "Document Relationships"). The target must have the same subject (422 otherwise);
  an unknown target is left alone.

Databases written before migration 0006 named the blob in a ``meta.extension``
(:data:`BLOB_EXTENSION`); the migration moved every such pointer out, and a client-supplied
one is dropped.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fhir_consent.auth import require
from fhir_consent.documents.errors import ContentDestroyed, IntegrityFailure
from fhir_consent.documents.keys import SYSTEM_DOMAIN
from fhir_consent.documents.storage import BlobInfo, BlobStore
from fhir_consent.documents.tables import document_links
from fhir_consent.errors import (
    BadRequest,
    FHIRError,
    Gone,
    Issue,
    PayloadTooLarge,
    Unprocessable,
)
from fhir_consent.fhir.services import ResourceService, WriteEvent
from fhir_consent.fhir.validation import is_valid_id
from fhir_consent.requestctx import current_access
from fhir_consent.store.repository import CurrentRow, Repository
from smart_on_fhir.scopes import Interaction

__all__ = [
    "BLOB_EXTENSION",
    "DocumentHooks",
    "StoredContentCorrupt",
    "local_reference",
    "log_integrity",
    "owner_hint",
    "stored_content",
    "strip_blob_extension",
]

log = logging.getLogger("fhir_consent.documents")

#: The ``meta.extension`` that named a Binary's blob before migration 0006. Never stored any
#: more, never honoured from a client, never served.
BLOB_EXTENSION: Final = "urn:fhir-consent:documents:blob"

_CONTENT: ContextVar[str | None] = ContextVar("documents_stored_content", default=None)
_OWNER: ContextVar[str | None] = ContextVar("documents_owner_hint", default=None)
_SUPERSEDING: ContextVar[bool] = ContextVar("documents_superseding", default=False)

ServiceFactory = Callable[[Connection], ResourceService]
VersionKey = tuple[str, int] | None  # (Binary id, version id) of the version being replaced


@dataclass(frozen=True, slots=True)
class _Pending:
    """What the PreWrite hook decided for the Binary version being written: its blob (None:
    no content), picked up by the WriteListener once the version has its number."""

    previous: VersionKey
    blob_id: str | None


@dataclass(frozen=True, slots=True)
class _PatchBase:
    """The ``data`` a PATCH was applied to (the real content, or a stand-in for content the
    patch does not touch) and the blob that holds it."""

    version: VersionKey
    data: str
    blob_id: str


_PENDING: ContextVar[_Pending | None] = ContextVar("documents_pending", default=None)
_PATCH_BASE: ContextVar[_PatchBase | None] = ContextVar("documents_patch_base", default=None)


class StoredContentCorrupt(FHIRError):
    """Stored content failed authentication while the server needed it (500)."""

    status = 500
    code = "exception"

    def __init__(self) -> None:
        super().__init__("The stored content failed its integrity check")


def log_integrity(binary_id: str, exc: IntegrityFailure) -> None:
    """Log an integrity failure with identifiers only (never content or keys)."""
    log.error(
        "document integrity error: Binary/%s blob %s chunk %d failed authentication",
        binary_id,
        exc.blob_id,
        exc.chunk,
    )


@contextmanager
def stored_content(blob_id: str) -> Iterator[None]:
    """Within this block, the Binary being written gets the content of ``blob_id`` (which the
    server stored itself for this write, in the same transaction)."""
    token = _CONTENT.set(blob_id)
    try:
        yield
    finally:
        _CONTENT.reset(token)


def _key(row: CurrentRow | None) -> VersionKey:
    return (row.res_id, row.version_id) if row is not None else None


def _touches_data(operations: list[Any]) -> bool:
    """Whether a JSON Patch reads or writes ``/data`` (or the whole document)."""
    for op in operations:
        for name in ("path", "from"):
            pointer = op.get(name) if isinstance(op, dict) else None
            if isinstance(pointer, str) and (
                pointer in ("", "/data") or pointer.startswith("/data/")
            ):
                return True
    return False


@contextmanager
def owner_hint(patient_id: str | None) -> Iterator[None]:
    """Within this block, content of unknown ownership is keyed to ``patient_id`` (the patient
    of a patient-level token, or of an X-Security-Context header)."""
    token = _OWNER.set(patient_id)
    try:
        yield
    finally:
        _OWNER.reset(token)


def strip_blob_extension(resource: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``resource`` without the (pre-0006, or client-forged) blob extension."""
    out = dict(resource)
    meta = out.get("meta")
    if not isinstance(meta, dict) or "extension" not in meta:
        return out
    meta = dict(meta)
    exts = [
        e
        for e in meta.get("extension") or ()
        if not (isinstance(e, dict) and e.get("url") == BLOB_EXTENSION)
    ]
    if exts:
        meta["extension"] = exts
    else:
        meta.pop("extension", None)
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    return out


def local_reference(ref: Any, base: str | None) -> tuple[str, str] | None:
    """``(type, id)`` of a reference to this server (``Type/id``, ``Type/id/_history/n`` or the
    same under the configured public base URL), else None."""
    if not isinstance(ref, str) or not ref:
        return None
    if base:
        prefix = base.rstrip("/") + "/"
        if ref.startswith(prefix):
            ref = ref[len(prefix) :]
    parts = ref.split("/")
    if len(parts) == 4 and parts[2] == "_history":
        parts = parts[:2]
    if len(parts) != 2 or not parts[0].isalpha() or not is_valid_id(parts[1]):
        return None
    return parts[0], parts[1]


def _decode_base64(value: Any, expression: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest("Attachment data must be base64", issues=[_issue(expression)])
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # base64Binary may carry whitespace (R4 datatypes.html#base64Binary)
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("Invalid base64 content", issues=[_issue(expression)]) from None


def _issue(expression: str, text: str = "Invalid base64 content") -> Issue:
    return Issue(text, "value", expression=[expression])


def _sha1_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha1(data, usedforsecurity=False).digest()).decode("ascii")


class DocumentHooks:
    """The PreWrite hook and WriteListener of the document store."""

    def __init__(
        self,
        store: BlobStore,
        services: ServiceFactory,
        *,
        base_url: str | None = None,
        max_content_bytes: int,
        max_patch_bytes: int | None = None,
    ) -> None:
        self.store = store
        self.services = services  # guard-free services for writes the server makes itself
        self.base_url = base_url
        self.max_content_bytes = max_content_bytes
        self.max_patch_bytes = max_patch_bytes if max_patch_bytes is not None else max_content_bytes

    # -- PreWrite --------------------------------------------------------------------------

    def prewrite(
        self,
        service: ResourceService,
        res_type: str,
        resource: dict[str, Any],
        previous: CurrentRow | None,
    ) -> dict[str, Any]:
        """Runs after validation, before storage, in the write transaction (PreWrite)."""
        if res_type == "Binary":
            return self._binary(service.conn, resource, previous)
        if res_type == "DocumentReference":
            return self._document(service.conn, resource)
        return resource

    def _binary(
        self, conn: Connection, resource: dict[str, Any], previous: CurrentRow | None
    ) -> dict[str, Any]:
        out = strip_blob_extension(resource)  # a client never names a blob
        data = out.pop("data", None)
        blob_id = _CONTENT.get()
        base = _PATCH_BASE.get()
        _CONTENT.set(None)  # both are for this one write only
        _PATCH_BASE.set(None)
        if blob_id is None and data is not None:
            if base is not None and base.version == _key(previous) and data == base.data:
                blob_id = base.blob_id  # a PATCH that left the content as it was
            else:
                raw = _decode_base64(data, "Binary.data")
                self._check_size(len(raw))
                owner = self.owner_for(conn, out.get("securityContext"))
                blob_id = self.store.store_bytes(
                    conn, raw, str(out.get("contentType")), owner
                ).blob_id
        _PENDING.set(_Pending(_key(previous), blob_id))
        return out

    def _check_size(self, size: int) -> None:
        if size > self.max_content_bytes:
            raise PayloadTooLarge(f"Content exceeds the limit of {self.max_content_bytes} bytes")

    def _document(self, conn: Connection, resource: dict[str, Any]) -> dict[str, Any]:
        contents = resource.get("content")
        if not isinstance(contents, list):
            return resource
        patient = self.patient_of(resource.get("subject"))
        new_contents = []
        for i, content in enumerate(contents):
            att = content.get("attachment") if isinstance(content, dict) else None
            if not isinstance(att, dict):
                new_contents.append(content)
                continue
            where = f"DocumentReference.content[{i}].attachment"
            if "data" in att:
                att = self._inline(conn, att, patient, where)
            else:
                att = self._referenced(conn, att, where)
            new_contents.append({**content, "attachment": att})
        return {**resource, "content": new_contents}

    def _inline(
        self, conn: Connection, att: dict[str, Any], patient: str | None, where: str
    ) -> dict[str, Any]:
        raw = _decode_base64(att["data"], f"{where}.data")
        self._check_size(len(raw))
        size, sha1 = len(raw), _sha1_b64(raw)
        _check_claims(att, size, sha1, where)
        ctype = att.get("contentType") or "application/octet-stream"
        owner = patient or _OWNER.get() or SYSTEM_DOMAIN
        info = self.store.store_bytes(conn, raw, str(ctype), owner)
        binary: dict[str, Any] = {"resourceType": "Binary", "contentType": ctype}
        if patient is not None:
            binary["securityContext"] = {"reference": f"Patient/{patient}"}
        with stored_content(info.blob_id):
            created = self.services(conn).create("Binary", binary)
        out = {k: v for k, v in att.items() if k != "data"}
        out.update(url=f"Binary/{created.row.res_id}", size=size, hash=sha1)
        return out

    def _referenced(self, conn: Connection, att: dict[str, Any], where: str) -> dict[str, Any]:
        ref = local_reference(att.get("url"), self.base_url)
        if ref is None or ref[0] != "Binary":
            return att
        info = self.current_blob(conn, ref[1])
        if info is None:  # unknown yet (e.g. created later in the same Bundle): leave it
            return att
        _check_claims(att, info.size, info.sha1, where)
        return {**att, "size": info.size, "hash": info.sha1}

    # -- helpers shared with the routes --------------------------------------------------

    def patient_of(self, subject: Any) -> str | None:
        """The id of a local ``Patient`` reference (DocumentReference.subject), else None."""
        ref = (
            local_reference(subject.get("reference"), self.base_url)
            if isinstance(subject, dict)
            else None
        )
        return ref[1] if ref is not None and ref[0] == "Patient" else None

    def owner_for(self, conn: Connection, security_context: Any) -> str:
        """The data-key domain of new Binary content: the request's patient (token or header),
        else the patient its ``securityContext`` names (directly or through a
        DocumentReference's subject), else the system domain."""
        hint = _OWNER.get()
        if hint:
            return hint
        ref = (
            local_reference(security_context.get("reference"), self.base_url)
            if isinstance(security_context, dict)
            else None
        )
        if ref is not None and ref[0] == "Patient":
            return ref[1]
        if ref is not None and ref[0] == "DocumentReference":
            row = Repository(conn).current("DocumentReference", ref[1])
            if row is not None and row.content is not None:
                found = self.patient_of(orjson.loads(row.content).get("subject"))
                if found:
                    return found
        return SYSTEM_DOMAIN

    def current_blob(self, conn: Connection, binary_id: str) -> BlobInfo | None:
        """The blob of the current version of ``Binary/binary_id`` (None: no such Binary, or
        deleted, or without content)."""
        row = Repository(conn).current("Binary", binary_id)
        if row is None or row.deleted or row.content is None:
            return None
        return self.store.version_blob(conn, binary_id, row.version_id)

    # -- PatchSource -----------------------------------------------------------------------

    def patch_source(
        self, service: ResourceService, row: CurrentRow, operations: list[Any]
    ) -> dict[str, Any] | None:
        """The form of a Binary a JSON Patch applies to: what a client reads as
        ``application/fhir+json`` — the metadata and, when there is content, ``data``.

        Unless the patch reads or writes ``/data`` (or the whole document), ``data`` is a
        random stand-in: the content is neither decrypted nor copied, and the update keeps
        its blob when the stand-in comes back unchanged. Otherwise the content is decrypted
        (authenticated) in memory, up to ``max_patch_bytes`` (422 ``too-costly`` above)."""
        if row.res_type != "Binary" or row.content is None:
            return None
        conn = service.conn
        doc = strip_blob_extension(orjson.loads(row.content))
        doc.pop("data", None)
        info = self.store.version_blob(conn, row.res_id, row.version_id)
        if info is None:
            return doc
        if not _touches_data(operations):
            data = base64.b64encode(secrets.token_bytes(24)).decode("ascii")
        else:
            # A patch on /data reads the content (a 'test' op compares it): read scope too.
            require(current_access.get(), "Binary", Interaction.READ)
            if info.size > self.max_patch_bytes:
                raise Unprocessable(
                    "The content is too large to patch as JSON; replace it with PUT",
                    issues=[
                        Issue(
                            "The content is too large to patch as JSON; replace it with PUT",
                            "too-costly",
                        )
                    ],
                )
            try:
                reader = self.store.reader(info, self.store.content_key(conn, info), conn=conn)
                plain = b"".join(reader.chunks(0, info.chunk_count - 1))
            except ContentDestroyed:
                raise Gone(f"The content of Binary/{row.res_id} has been destroyed") from None
            except IntegrityFailure as exc:
                log_integrity(row.res_id, exc)
                raise StoredContentCorrupt() from None
            data = base64.b64encode(plain).decode("ascii")
        _PATCH_BASE.set(_PatchBase(_key(row), data, info.blob_id))
        return {**doc, "data": data}

    # -- WriteListener ---------------------------------------------------------------------

    def listener(self, conn: Connection, event: WriteEvent) -> None:
        """Runs after each write, in its transaction (WriteListener)."""
        rtype = event.current.res_type
        if rtype == "Binary":
            self._binary_written(conn, event)
        elif rtype == "DocumentReference":
            self._relink(conn, event)
            if event.resource is not None and not _SUPERSEDING.get():
                self._supersede(conn, event)

    def _binary_written(self, conn: Connection, event: WriteEvent) -> None:
        if event.resource is None:  # a deletion: the version has no content
            return
        pending = _PENDING.get()
        _PENDING.set(None)
        if pending is None or pending.previous != _key(event.previous):
            # Never store a Binary the PreWrite hook did not see (its data would be kept as
            # plaintext, or the version would point at another write's content).
            raise RuntimeError("a Binary was written without the document store's PreWrite")
        blob_id = pending.blob_id
        if blob_id is None:
            return
        rid = event.current.res_id
        self.store.record_version(conn, rid, event.current.version_id, blob_id)
        self.store.attach(conn, blob_id, rid, event.current.version_id)
        link = document_links.c
        patients = {
            r[0]
            for r in conn.execute(
                sa.select(link.patient_id).where(
                    link.binary_id == rid, link.patient_id.is_not(None)
                )
            )
        }
        if len(patients) == 1:
            self.store.rekey_binary(conn, rid, patients.pop())

    def _relink(self, conn: Connection, event: WriteEvent) -> None:
        doc_id = event.current.res_id
        link = document_links.c
        conn.execute(document_links.delete().where(link.doc_id == doc_id))
        if event.resource is None:  # deleted: its links no longer grant access
            return
        patient = self.patient_of(event.resource.get("subject"))
        binaries: list[str] = []
        for content in event.resource.get("content") or ():
            att = content.get("attachment") if isinstance(content, dict) else None
            ref = local_reference(att.get("url"), self.base_url) if isinstance(att, dict) else None
            if ref is not None and ref[0] == "Binary" and ref[1] not in binaries:
                binaries.append(ref[1])
        if not binaries:
            return
        conn.execute(
            document_links.insert(),
            [{"doc_id": doc_id, "binary_id": b, "patient_id": patient} for b in binaries],
        )
        if patient is not None:
            for binary_id in binaries:
                self.store.rekey_binary(conn, binary_id, patient)

    def _supersede(self, conn: Connection, event: WriteEvent) -> None:
        assert event.resource is not None
        subject = self._subject_key(event.resource.get("subject"))
        for i, rel in enumerate(event.resource.get("relatesTo") or ()):
            if not isinstance(rel, dict) or rel.get("code") != "replaces":
                continue
            target = rel.get("target")
            ref = (
                local_reference(target.get("reference"), self.base_url)
                if isinstance(target, dict)
                else None
            )
            if ref is None or ref[0] != "DocumentReference" or ref[1] == event.current.res_id:
                continue
            service = self.services(conn)
            row = service.repo.current("DocumentReference", ref[1], for_update=True)
            if row is None or row.deleted or row.content is None:
                continue
            doc = orjson.loads(row.content)
            if doc.get("status") == "superseded":
                continue
            if self._subject_key(doc.get("subject")) != subject:
                raise Unprocessable(
                    "relatesTo 'replaces' must target a document of the same subject",
                    issues=[
                        Issue(
                            "relatesTo 'replaces' must target a document of the same subject",
                            "business-rule",
                            expression=[f"DocumentReference.relatesTo[{i}].target"],
                        )
                    ],
                )
            doc["status"] = "superseded"
            token = _SUPERSEDING.set(True)
            try:
                service.update("DocumentReference", ref[1], doc, if_match=row.version_id)
            finally:
                _SUPERSEDING.reset(token)

    def _subject_key(self, subject: Any) -> tuple[str, str] | None:
        if not isinstance(subject, dict):
            return None
        return local_reference(subject.get("reference"), self.base_url)


def _check_claims(att: Mapping[str, Any], size: int, sha1: str, where: str) -> None:
    """A client-supplied Attachment.size / Attachment.hash must match the content (400)."""
    issues = []
    claimed_size = att.get("size")
    if claimed_size is not None and claimed_size != size:
        issues.append(
            Issue(
                "Attachment.size does not match the content", "value", expression=[f"{where}.size"]
            )
        )
    claimed_hash = att.get("hash")
    if claimed_hash is not None:
        try:
            ok = isinstance(claimed_hash, str) and base64.b64decode(
                "".join(claimed_hash.split()), validate=True
            ) == base64.b64decode(sha1)
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            issues.append(
                Issue(
                    "Attachment.hash is not the SHA-1 of the content",
                    "value",
                    expression=[f"{where}.hash"],
                )
            )
    if issues:
        raise BadRequest("The attachment's size or hash does not match its content", issues=issues)
