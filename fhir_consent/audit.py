"""The audit trail: one FHIR AuditEvent per access decision (R4 auditevent.html, the DICOM /
IHE BALP "RESTful operation" pattern), searchable by the patient it concerns.

Who did what to which resource, when, for which purpose, with which outcome, and which
Consent decided it. Writes are audited inside their own transaction (an audited change and its
AuditEvent commit together); reads and searches are queued and written in small batches by a
background thread (at most ``flush_interval`` seconds behind, flushed on shutdown), so a read
never turns into a synchronous write. AuditEvents are built by the server itself and stored
without the request-body validation path (they are constructed, not parsed), with their
search index extracted like any other resource.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy.engine import Connection

from fhir_consent.auth import AccessContext
from fhir_consent.fhir import searchparams
from fhir_consent.fhir.services import finalize, format_instant
from fhir_consent.store.db import Database
from fhir_consent.store.repository import CurrentRow, Repository, VersionRow

__all__ = ["AuditRecord", "AuditSink", "audit_event", "patient_of", "write_audit"]

log = logging.getLogger("fhir_consent.audit")

_ACTIONS = {
    "create": "C",
    "read": "R",
    "vread": "R",
    "history-instance": "R",
    "history-type": "R",
    "search-type": "E",
    "operation": "E",
    "update": "U",
    "patch": "U",
    "delete": "D",
}
_REST = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
    "code": "rest",
    "display": "RESTful Operation",
}
_INTERACTION_SYSTEM = "http://hl7.org/fhir/restful-interaction"
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_SECURITY_SOURCE = "http://terminology.hl7.org/CodeSystem/security-source-type"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One access decision."""

    interaction: str  # read, vread, search-type, create, update, patch, delete, operation…
    recorded: int  # µs since the epoch
    permitted: bool
    access: AccessContext
    entities: Sequence[str] = ()  # "DocumentReference/1", …
    patient: str | None = None  # "Patient/p" whose data it concerns
    decided_by: Sequence[str] = ()  # "Consent/c", …
    reason: str | None = None  # machine reason: consent-explicit, default-deny, patient-self…
    query: str | None = None  # the search's resource type and parameter *names* (no values)
    extra: dict[str, Any] = field(default_factory=dict)


#: Where each type names the patient whose data it is (the patient-compartment link that is
#: a single reference). Binary is reached through documents; AuditEvent reads are not audited.
_PATIENT_ELEMENT = {
    "Consent": "patient",
    "DocumentReference": "subject",
    "Encounter": "subject",
    "RelatedPerson": "patient",
    "Task": "for",
}


def patient_of(res_type: str, res_id: str, content: bytes | None) -> str | None:
    """The ``Patient/<id>`` a stored resource belongs to, if any."""
    if res_type == "Patient":
        return f"Patient/{res_id}"
    element = _PATIENT_ELEMENT.get(res_type)
    if element is None or content is None:
        return None
    try:
        ref = orjson.loads(content).get(element, {}).get("reference")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if isinstance(ref, str) and ref.startswith("Patient/"):
        return ref.split("/_history")[0]
    return None


def _agents(access: AccessContext) -> list[dict[str, Any]]:
    agents: list[dict[str, Any]] = []
    if access.fhir_user:
        agents.append({"who": {"reference": access.fhir_user}, "requestor": True})
    if access.client_id:
        client: dict[str, Any] = {
            "who": {"identifier": {"system": "urn:fhir-consent:client", "value": access.client_id}},
            "requestor": not access.fhir_user,
        }
        if access.client_organization:
            client["who"]["reference"] = access.client_organization
        agents.append(client)
    if not agents:
        agents.append({"who": {"display": "anonymous (open access)"}, "requestor": True})
    return agents


def audit_event(record: AuditRecord) -> dict[str, Any]:
    """The AuditEvent resource for ``record`` (R4 AuditEvent; IHE BALP RESTful pattern)."""
    entities: list[dict[str, Any]] = []
    if record.patient:
        entities.append(
            {
                "what": {"reference": record.patient},
                "type": {"system": "http://hl7.org/fhir/resource-types", "code": "Patient"},
                "role": {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    for ref in record.entities:
        if ref != record.patient:
            entities.append(
                {
                    "what": {"reference": ref},
                    "role": {"system": _OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
                }
            )
    for ref in record.decided_by:
        entities.append(
            {
                "what": {"reference": ref},
                "role": {"system": _OBJECT_ROLE, "code": "13", "display": "Security Resource"},
            }
        )
    if record.query:
        entities.append(
            {
                "type": {"system": "http://hl7.org/fhir/resource-types", "code": "Bundle"},
                "description": record.query[:512],
            }
        )
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": _REST,
        "subtype": [{"system": _INTERACTION_SYSTEM, "code": record.interaction}],
        "action": _ACTIONS.get(record.interaction, "E"),
        "recorded": format_instant(record.recorded),
        "outcome": "0" if record.permitted else "4",
        "agent": _agents(record.access),
        "source": {
            "observer": {"display": "fhir-consent"},
            "type": [{"system": _SECURITY_SOURCE, "code": "4", "display": "Application Server"}],
        },
    }
    if not record.permitted:
        event["outcomeDesc"] = "Access denied" + (f" ({record.reason})" if record.reason else "")
    elif record.reason:
        event["outcomeDesc"] = f"Access permitted ({record.reason})"
    if record.access.purpose_of_use:
        event["purposeOfEvent"] = [
            {"coding": [{"system": _ACT_REASON, "code": code}]}
            for code in sorted(record.access.purpose_of_use)
        ]
    if entities:
        event["entity"] = entities
    return event


def write_audit(conn: Connection, records: Iterable[AuditRecord]) -> int:
    """Store AuditEvents for ``records`` on ``conn`` (the caller's transaction)."""
    repo = Repository(conn)
    n = 0
    for record in records:
        rid = str(uuid.uuid4())
        content, parsed = finalize(audit_event(record), rid, 1, record.recorded)
        repo.insert(
            "AuditEvent", rid, content, record.recorded, searchparams.extract(parsed), "POST"
        )
        n += 1
    return n


#: Tries of one audit batch against a failing database (0.1 + 0.2 + 0.4 + 0.8 + 1.6 s apart).
_WRITE_ATTEMPTS = 6


class AuditSink:
    """Collects audit records; writes go in the caller's transaction, reads are batched.

    ``observers`` are called with every record as it is recorded (metrics count decisions
    there); they must be quick and must not raise.
    """

    def __init__(self, db: Database, *, flush_interval: float = 0.1, batch_size: int = 500) -> None:
        self.db = db
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self._queue: queue.Queue[AuditRecord | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._flushed = threading.Condition()
        self._pending = 0
        self.observers: list[Callable[[AuditRecord], None]] = []
        self._stopping = threading.Event()  # cuts the pause between batches short at stop()

    @property
    def pending(self) -> int:
        """Queued read/search records not yet written."""
        return self._pending

    def notify(self, record: AuditRecord) -> None:
        """Tell the observers about a record (every way of recording calls this)."""
        for observer in self.observers:
            observer(record)

    # -- transactional (writes) -------------------------------------------------------------

    def record_in(self, conn: Connection, record: AuditRecord) -> None:
        """Audit a change inside the change's own transaction."""
        write_audit(conn, [record])
        self.notify(record)

    def record_change(
        self,
        conn: Connection,
        interaction: str,
        access: AccessContext,
        row: CurrentRow,
        recorded: int,
    ) -> None:
        """Audit a create/update/patch/delete in its own transaction."""
        content = row.content
        self.record_in(
            conn,
            AuditRecord(
                interaction=interaction,
                recorded=recorded,
                permitted=True,
                access=access,
                entities=(f"{row.res_type}/{row.res_id}/_history/{row.version_id}",),
                patient=patient_of(row.res_type, row.res_id, content),
            ),
        )

    # -- batched (reads) --------------------------------------------------------------------

    def record(self, record: AuditRecord) -> None:
        """Queue a read/search audit record (written within ``flush_interval`` seconds)."""
        self.notify(record)
        with self._flushed:
            self._pending += 1
        self._queue.put(record)

    def record_access(
        self,
        interaction: str,
        access: AccessContext,
        rows: Sequence[CurrentRow | VersionRow],
        recorded: int,
        *,
        permitted: bool = True,
        reason: str | None = None,
        query: str | None = None,
    ) -> None:
        """Queue the audit of a read or search: one AuditEvent per patient whose data was
        returned (or refused), so each patient sees exactly the accesses to their records."""
        by_patient: dict[str | None, list[str]] = defaultdict(list)
        for row in rows:
            if row.res_type == "AuditEvent":
                continue
            by_patient[patient_of(row.res_type, row.res_id, row.content)].append(
                f"{row.res_type}/{row.res_id}"
            )
        if not rows and query:
            by_patient[None] = []
        for patient, refs in by_patient.items():
            self.record(
                AuditRecord(
                    interaction=interaction,
                    recorded=recorded,
                    permitted=permitted,
                    access=access,
                    entities=tuple(refs[:200]),
                    patient=patient,
                    reason=reason,
                    query=query,
                )
            )

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Flush everything queued and stop the writer."""
        if self._thread is not None:
            self._queue.put(None)
            self._stopping.set()
            self._thread.join(timeout=30)
            self._thread = None
            self._stopping.clear()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is stored (tests, shutdown)."""
        with self._flushed:
            return self._flushed.wait_for(lambda: self._pending == 0, timeout=timeout)

    def _run(self) -> None:
        """Write queued records in batches: at most one write transaction per
        ``flush_interval``, so a stream of audited reads never hogs the database's write lock
        (SQLite's lock is not fair: back-to-back audit batches could starve a patient's
        revocation)."""
        stop = False
        while not stop:
            batch: list[AuditRecord] = []
            try:
                item = self._queue.get(timeout=self.flush_interval)
            except queue.Empty:
                continue
            if item is None:
                stop = True
            else:
                batch.append(item)
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            if batch:
                self._write(batch)
                if not stop:
                    self._stopping.wait(self.flush_interval)

    def _write(self, batch: list[AuditRecord]) -> None:
        """Store a batch, retrying a failing database a few times (backoff up to ~3 s in all)
        before giving up on it; the failure is logged with the count only, never content."""
        try:
            for attempt in range(_WRITE_ATTEMPTS):
                try:
                    with self.db.write() as conn:
                        write_audit(conn, batch)
                    return
                except Exception as exc:  # noqa: BLE001 - the writer must survive the database
                    if attempt + 1 == _WRITE_ATTEMPTS:
                        log.error(
                            "audit batch of %d not stored: %s", len(batch), type(exc).__name__
                        )
                    else:
                        time.sleep(0.1 * 2**attempt)
        finally:
            with self._flushed:
                self._pending -= len(batch)
                self._flushed.notify_all()
