"""Every download in the audit trail (issue 6: "every download is audited"; consent.md §6).

:class:`SinkDownloadAudit` is the document store's :class:`~fhir_consent.documents.access.
DownloadAudit` for the server: it turns each :class:`~fhir_consent.documents.access.
DownloadEvent` into an :class:`~fhir_consent.audit.AuditRecord` for the patient whose documents
point at the Binary, queued on the server's :class:`~fhir_consent.audit.AuditSink` like every
other read. A refused download (``denied``, or ``not-found`` for a Binary that exists but is
hidden by consent) is recorded as a denied attempt, so the patient sees it; a download of a
Binary nobody's document points at concerns no patient and is recorded without one.
Open-access (development) requests are not audited, as elsewhere
(:meth:`fhir_consent.fhir.routes.FHIRContext.audited`).
"""

from __future__ import annotations

from collections.abc import Callable

from fhir_consent.audit import AuditRecord, AuditSink, patient_of
from fhir_consent.documents.access import DownloadEvent, documents_pointing_to
from fhir_consent.store.db import Database
from fhir_consent.store.repository import Repository

__all__ = ["SinkDownloadAudit"]

_PERMITTED = frozenset({"success", "unsatisfiable"})


class SinkDownloadAudit:
    """A :class:`~fhir_consent.documents.access.DownloadAudit` writing AuditEvents through
    ``sink`` (called in a worker thread, before any byte is sent)."""

    def __init__(self, sink: AuditSink, db: Database, clock: Callable[[], int]) -> None:
        self.sink = sink
        self.db = db
        self.clock = clock

    def _subjects(self, binary_id: str, documents: tuple[str, ...]) -> tuple[list[str], str | None]:
        """The DocumentReferences pointing at the Binary, and the patient of the first one."""
        with self.db.read() as conn:
            ids = list(documents) or documents_pointing_to(conn, binary_id)
            repo = Repository(conn)
            for doc_id in ids:
                row = repo.current("DocumentReference", doc_id)
                if row is not None and not row.deleted:
                    return ids, patient_of("DocumentReference", doc_id, row.content)
        return ids, None

    def __call__(self, event: DownloadEvent) -> None:
        if event.access.is_open:
            return
        documents, patient = self._subjects(event.binary_id, event.documents)
        binary = f"Binary/{event.binary_id}"
        if event.version_id is not None:
            binary += f"/_history/{event.version_id}"
        self.sink.record(
            AuditRecord(
                interaction="read",
                recorded=self.clock(),
                permitted=event.outcome in _PERMITTED,
                access=event.access,
                entities=(binary, *(f"DocumentReference/{d}" for d in documents)),
                patient=patient,
                reason=None if event.outcome in _PERMITTED else f"download-{event.outcome}",
            )
        )
