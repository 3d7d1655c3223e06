"""``Binary.data`` wherever a Binary is returned as FHIR JSON outside ``GET Binary/{id}``.

R4 binary.html: a Binary in FHIR JSON carries its content as base64 ``data``. The stored
resource holds only metadata (the content is encrypted in the document store), so the write
responses (``Prefer: return=representation``), search and history bundles and batch/transaction
responses get ``data`` here, decrypted from the document store:

* **Access**: the caller needs Binary read scope and the document store's
  :class:`~fhir_consent.documents.access.BinaryAccess` (the consent rules, when the consent
  layer is installed) for that Binary — exactly what ``GET Binary/{id}`` checks. Each inlined
  content that the caller did not send in the same request is reported to the
  :class:`~fhir_consent.documents.access.DownloadAudit` hook (``representation="resource"``).
* **Size cap**: these responses are built in memory, so content above
  ``inline_data_max_bytes`` (per Binary), or beyond ``inline_data_budget_bytes`` (per response),
  is omitted and the resource is marked ``SUBSETTED`` in ``meta.tag`` (R4 search.html
  §3.1.1.5.7, the tag the server uses for ``_summary``). The same happens when access to the
  content is refused, the content has been crypto-shredded, or it fails its integrity check
  (logged, ids only). Clients fetch such content with ``GET Binary/{id}``, which streams it
  (raw or as FHIR JSON) whatever its size. Search entries that ``_summary`` or ``_elements``
  already subsetted are left as they are.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any, Final

import orjson
from sqlalchemy.engine import Connection

from fhir_consent.auth import AccessContext
from fhir_consent.documents.access import DownloadEvent, documents_pointing_to
from fhir_consent.documents.errors import ContentDestroyed, IntegrityFailure
from fhir_consent.documents.service import log_integrity
from smart_on_fhir.scopes import Interaction

if TYPE_CHECKING:
    from fhir_consent.documents.routes import Documents

__all__ = ["SUBSETTED", "BinaryInliner", "Budget"]

#: R4 v3-ObservationValue SUBSETTED: the resource is not complete (here: ``data`` left out).
SUBSETTED: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "Binary.data omitted: fetch it with GET Binary/[id]",
}
_MARKER: Final = b'"Binary"'


class Budget:
    """Bytes of content one response may still inline."""

    def __init__(self, total: int) -> None:
        self.left = total


def _subsetted(resource: dict[str, Any]) -> dict[str, Any]:
    out = dict(resource)
    out.pop("data", None)
    meta = dict(out.get("meta") or {})
    tags = [
        t
        for t in meta.get("tag") or ()
        if not (isinstance(t, dict) and t.get("code") == "SUBSETTED")
    ]
    meta["tag"] = [*tags, SUBSETTED]
    out["meta"] = meta
    return out


def _is_subsetted(resource: dict[str, Any]) -> bool:
    """Already a subset (``_summary``/``_elements``): left as the search shaped it."""
    tags = (resource.get("meta") or {}).get("tag") or ()
    return any(isinstance(t, dict) and t.get("code") == "SUBSETTED" for t in tags)


class BinaryInliner:
    """Puts ``data`` into Binary resources served as FHIR JSON (see the module docstring).
    Installed as the FHIR context's bundle filter, and used by the Binary write routes."""

    def __init__(self, docs: Documents) -> None:
        self.docs = docs

    def budget(self) -> Budget:
        """A fresh per-response budget."""
        return Budget(self.docs.settings.inline_data_budget_bytes)

    def may_read(self, conn: Connection, access: AccessContext, binary_id: str) -> bool:
        """Read scope on Binary and the document store's access rule for this Binary."""
        if not access.is_open and access.scopes is not None:
            if not access.scopes.decide("Binary", Interaction.READ).allowed:
                return False
        return self.docs.access(conn, access, binary_id, Interaction.READ)

    def inline(
        self,
        conn: Connection,
        access: AccessContext,
        resource: dict[str, Any],
        budget: Budget | None = None,
        *,
        audit: bool = True,
    ) -> dict[str, Any]:
        """``resource`` (a stored Binary as clients see it) with ``data``, or marked SUBSETTED.
        ``audit``: report the content as downloaded (False when the caller just sent it)."""
        rid, vid = resource.get("id"), str((resource.get("meta") or {}).get("versionId"))
        if not isinstance(rid, str) or not vid.isdigit():
            return resource
        version = int(vid)
        store = self.docs.store
        info = store.version_blob(conn, rid, version)
        if info is None:  # a Binary without content
            out = dict(resource)
            out.pop("data", None)
            return out
        budget = budget if budget is not None else self.budget()
        if info.size > min(self.docs.settings.inline_data_max_bytes, budget.left):
            return _subsetted(resource)
        if not self.may_read(conn, access, rid):
            return _subsetted(resource)
        try:
            reader = store.reader(info, store.content_key(conn, info), conn=conn)
            plain = b"".join(reader.chunks(0, info.chunk_count - 1)) if info.size else b""
        except ContentDestroyed:
            return _subsetted(resource)
        except IntegrityFailure as exc:
            log_integrity(rid, exc)
            return _subsetted(resource)
        budget.left -= info.size
        if audit:
            self.docs.audit(
                DownloadEvent(
                    access=access,
                    binary_id=rid,
                    version_id=version,
                    outcome="success",
                    representation="resource",
                    content_type=info.content_type,
                    size=info.size,
                    documents=tuple(documents_pointing_to(conn, rid)),
                )
            )
        return {**resource, "data": base64.b64encode(plain).decode("ascii")}

    # -- the FHIR context's bundle filter ------------------------------------------------

    def applies(self, body: bytes) -> bool:
        """Whether ``body`` may hold a Binary (a cheap byte search for the JSON string
        ``"Binary"``, whatever the whitespace around it: PostgreSQL's jsonb adds some)."""
        return _MARKER in body

    def __call__(self, conn: Connection, access: AccessContext, body: bytes) -> bytes:
        """A Bundle (search, history, batch/transaction response) with ``data`` in each Binary
        entry, nested Bundles included."""
        if not self.applies(body):
            return body
        bundle = orjson.loads(body)
        if not isinstance(bundle, dict):
            return body
        self._walk(conn, access, bundle, self.budget())
        return orjson.dumps(bundle)

    def _walk(
        self, conn: Connection, access: AccessContext, bundle: dict[str, Any], budget: Budget
    ) -> None:
        for entry in bundle.get("entry") or ():
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                continue
            rtype = resource.get("resourceType")
            if rtype == "Binary" and not _is_subsetted(resource):
                entry["resource"] = self.inline(conn, access, resource, budget)
            elif rtype == "Bundle":
                self._walk(conn, access, resource, budget)
