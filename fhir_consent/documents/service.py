"""Document hooks on the FHIR write path: Binary content, DocumentReference attachments,
superseding — all inside the write's own database transaction.

* **Binary** (R4 binary.html): a Binary written through any path (REST, transaction Bundle)
  has its ``data`` moved into encrypted blob storage; the stored resource keeps only metadata
  plus a ``meta`` extension naming its blob (:data:`BLOB_EXTENSION`), which clients cannot set (a
  client-supplied one is dropped unless it repeats the previous version's own blob).
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
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fhir_consent.documents.keys import SYSTEM_DOMAIN
from fhir_consent.documents.storage import BlobInfo, BlobStore
from fhir_consent.documents.tables import document_links
from fhir_consent.errors import BadRequest, Issue, PayloadTooLarge, Unprocessable
from fhir_consent.fhir.services import ResourceService, WriteEvent
from fhir_consent.fhir.validation import is_valid_id
from fhir_consent.store.repository import CurrentRow, Repository

__all__ = [
    "BLOB_EXTENSION",
    "DocumentHooks",
    "blob_id_of",
    "local_reference",
    "owner_hint",
    "strip_blob_extension",
    "trusted_blob",
    "with_blob",
]

#: ``meta.extension`` of stored Binary resources naming their encrypted blob (never settable by
#: clients, removed from every Binary this package serves).
BLOB_EXTENSION: Final = "urn:fhir-consent:documents:blob"

_TRUSTED: ContextVar[str | None] = ContextVar("documents_trusted_blob", default=None)
_OWNER: ContextVar[str | None] = ContextVar("documents_owner_hint", default=None)
_SUPERSEDING: ContextVar[bool] = ContextVar("documents_superseding", default=False)

ServiceFactory = Callable[[Connection], ResourceService]


@contextmanager
def trusted_blob(blob_id: str) -> Iterator[None]:
    """Within this block, a Binary written with ``blob_id``'s extension keeps it (the server
    stored that blob itself for this write)."""
    token = _TRUSTED.set(blob_id)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


@contextmanager
def owner_hint(patient_id: str | None) -> Iterator[None]:
    """Within this block, content of unknown ownership is keyed to ``patient_id`` (the patient
    of a patient-level token, or of an X-Security-Context header)."""
    token = _OWNER.set(patient_id)
    try:
        yield
    finally:
        _OWNER.reset(token)


def blob_id_of(resource: Mapping[str, Any]) -> str | None:
    """The blob a stored Binary points at (its ``meta.extension``), if any."""
    meta = resource.get("meta")
    for ext in (meta.get("extension") or ()) if isinstance(meta, dict) else ():
        if isinstance(ext, dict) and ext.get("url") == BLOB_EXTENSION:
            value = ext.get("valueId")
            return value if isinstance(value, str) else None
    return None


def strip_blob_extension(resource: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``resource`` without the blob extension (what clients are shown)."""
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


def with_blob(resource: Mapping[str, Any], blob_id: str) -> dict[str, Any]:
    """A copy of ``resource`` whose ``meta.extension`` names ``blob_id`` (Binary is a plain
    Resource: ``meta`` is where an extension may go, R4 resource.html#Meta)."""
    out = strip_blob_extension(resource)
    meta = dict(out.get("meta") or {})
    meta["extension"] = [*meta.get("extension", []), {"url": BLOB_EXTENSION, "valueId": blob_id}]
    out["meta"] = meta
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
    ) -> None:
        self.store = store
        self.services = services  # guard-free services for writes the server makes itself
        self.base_url = base_url
        self.max_content_bytes = max_content_bytes

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
        claimed = blob_id_of(resource)
        trusted = _TRUSTED.get()
        if trusted is not None and claimed == trusted:
            return resource
        out = strip_blob_extension(resource)
        data = out.pop("data", None)
        if data is None:
            # A client echoing the previous version's own blob keeps its content.
            if claimed is not None and previous is not None and previous.content is not None:
                if blob_id_of(orjson.loads(previous.content)) == claimed:
                    return with_blob(out, claimed)
            return out
        raw = _decode_base64(data, "Binary.data")
        self._check_size(len(raw))
        owner = self.owner_for(conn, out.get("securityContext"))
        info = self.store.store_bytes(conn, raw, str(out.get("contentType")), owner)
        return with_blob(out, info.blob_id)

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
        with trusted_blob(info.blob_id):
            created = self.services(conn).create("Binary", with_blob(binary, info.blob_id))
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
        blob_id = blob_id_of(orjson.loads(row.content))
        return self.store.info(conn, blob_id) if blob_id else None

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
        if event.resource is None:
            return
        blob_id = blob_id_of(event.resource)
        if blob_id is None:
            return
        rid = event.current.res_id
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
