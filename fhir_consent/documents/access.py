"""Who may touch a Binary, and what a download tells the audit trail.

Access to document content follows the DocumentReference(s) that point to it (R4
documentreference.html: the Binary is reached through ``content.attachment.url``). The
decision is a :class:`BinaryAccess` callback, so the consent engine can replace the default
(:class:`DocumentLinkAccess`: scopes, plus the patient compartment for ``patient/`` tokens).
Every download attempt is reported to a :class:`DownloadAudit` hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fhir_consent.auth import AccessContext
from fhir_consent.documents.service import strip_blob_extension
from fhir_consent.documents.storage import BlobInfo, BlobReader, BlobStore
from fhir_consent.documents.tables import document_links
from fhir_consent.fhir.visibility import Visibility
from fhir_consent.store.repository import CurrentRow, Repository, VersionRow
from fhir_consent.store.tables import resources
from smart_on_fhir.scopes import Context, Interaction

__all__ = [
    "BinaryAccess",
    "DocumentLinkAccess",
    "DownloadAudit",
    "DownloadEvent",
    "OpenedBinary",
    "Outcome",
    "Refused",
    "documents_pointing_to",
    "no_audit",
    "open_binary",
]

Outcome = Literal["success", "denied", "not-found", "gone", "integrity-error", "unsatisfiable"]


# -- extension points ------------------------------------------------------------------------


class BinaryAccess(Protocol):
    """May ``access`` perform ``interaction`` on ``Binary/binary_id``? Called inside the
    request's transaction for reads, updates and deletes of an existing Binary. ``False`` is
    answered with 404 (the Binary's existence is not revealed)."""

    def __call__(
        self, conn: Connection, access: AccessContext, binary_id: str, interaction: Interaction
    ) -> bool: ...


@dataclass(frozen=True, slots=True)
class DownloadEvent:
    """One download attempt, for the audit trail (identifiers only, never content)."""

    access: AccessContext
    binary_id: str
    version_id: int | None
    outcome: Outcome
    representation: Literal["raw", "resource"]
    content_type: str | None = None
    size: int | None = None  # size of the whole content
    byte_range: tuple[int, int] | None = None  # inclusive, for 206 answers
    documents: tuple[str, ...] = ()  # ids of DocumentReferences pointing at the Binary


class DownloadAudit(Protocol):
    """Receives every download attempt (called in a worker thread, before any byte is sent)."""

    def __call__(self, event: DownloadEvent) -> None: ...


def no_audit(event: DownloadEvent) -> None:
    """The default :class:`DownloadAudit`: records nothing."""


def documents_pointing_to(conn: Connection, binary_id: str) -> list[str]:
    """Ids of the live DocumentReferences whose attachments point at ``Binary/binary_id``."""
    link = document_links.c
    return [
        r[0]
        for r in conn.execute(
            sa.select(link.doc_id).where(link.binary_id == binary_id).order_by(link.doc_id)
        )
    ]


class DocumentLinkAccess:
    """Default :class:`BinaryAccess`: open access, or scopes allowing the interaction on
    Binary; a ``patient/`` token additionally needs a DocumentReference in its patient's
    compartment (R4 compartmentdefinition-patient) that points at the Binary."""

    def __call__(
        self, conn: Connection, access: AccessContext, binary_id: str, interaction: Interaction
    ) -> bool:
        if access.is_open or access.scopes is None:
            return True
        decision = access.scopes.decide("Binary", interaction)
        if not decision.allowed:
            return False
        if decision.context is not Context.PATIENT:
            return True
        if not access.patient:
            return False
        predicate = Visibility(patient=access.patient).restrict_for("DocumentReference")
        assert predicate is not None
        link = document_links.c
        stmt = (
            sa.select(resources.c.pk)
            .select_from(
                document_links.join(
                    resources,
                    sa.and_(
                        resources.c.res_type == "DocumentReference",
                        resources.c.res_id == link.doc_id,
                    ),
                )
            )
            .where(link.binary_id == binary_id, resources.c.deleted.is_(False))
            .where(predicate(resources))
            .limit(1)
        )
        return conn.execute(stmt).first() is not None


@dataclass(slots=True)
class OpenedBinary:
    """A Binary version a caller may download, with its blob's reader (content key unwrapped)."""

    row: CurrentRow | VersionRow
    resource: dict[str, Any]  # as clients see it (no blob extension, no data)
    info: BlobInfo | None  # None: a Binary without content
    reader: BlobReader | None
    documents: tuple[str, ...]


class Refused(Exception):
    """The download is refused (``outcome`` says why: not-found, denied or gone)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome)
        self.outcome: Outcome = outcome


def open_binary(
    conn: Connection,
    store: BlobStore,
    allowed: BinaryAccess,
    access: AccessContext,
    binary_id: str,
    version: str | None,
) -> OpenedBinary:
    """Look up ``Binary/binary_id`` (or one of its versions, R4 http.html vread), check access
    and open its content key. Raises :class:`Refused`, ``ContentDestroyed`` (shredded) or
    ``IntegrityFailure`` (its content key does not authenticate)."""
    repo = Repository(conn)
    current = repo.current("Binary", binary_id)
    if current is None:
        raise Refused("not-found")
    if not allowed(conn, access, binary_id, Interaction.READ):
        raise Refused("denied")
    row: CurrentRow | VersionRow = current
    if version is not None:
        old = repo.version("Binary", binary_id, int(version)) if version.isdigit() else None
        if old is None:
            raise Refused("not-found")
        row = old
    if row.deleted or row.content is None:
        raise Refused("gone")
    resource = strip_blob_extension(orjson.loads(row.content))
    resource.pop("data", None)
    documents = tuple(documents_pointing_to(conn, binary_id))
    info = store.version_blob(conn, binary_id, row.version_id)
    reader = store.reader(info, store.content_key(conn, info)) if info is not None else None
    return OpenedBinary(row, resource, info, reader, documents)
