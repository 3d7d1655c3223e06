"""The audit trail: one FHIR AuditEvent per access decision (R4 auditevent.html, the DICOM /
IHE BALP "RESTful operation" pattern), searchable by the patient it concerns.

Who did what to which resource, when, for which purpose, with which outcome, and which
Consent decided it. Writes are audited inside their own transaction (an audited change and its
AuditEvent commit together); reads and searches are queued and written in small batches by a
background thread (at most ``flush_interval`` seconds behind, flushed on shutdown), so a read
never turns into a synchronous write; the repeats of one access within a batch are one
AuditEvent with their number and period (:func:`coalesce`). AuditEvents are built by the
server itself and stored without the request-body validation path (they are constructed, not
parsed), with their search index extracted like any other resource.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from sqlalchemy.engine import Connection

from fhir_consent.auth import AccessContext
from fhir_consent.fhir import searchparams
from fhir_consent.fhir.searchparams import IndexRows
from fhir_consent.fhir.services import finalize, format_instant
from fhir_consent.store.db import Database
from fhir_consent.store.repository import CurrentRow, Repository, VersionRow

__all__ = [
    "SQLITE_WRITER_GAP",
    "AuditRecord",
    "AuditSink",
    "MAX_ENTITIES",
    "Prepared",
    "access_count",
    "audit_event",
    "coalesce",
    "patient_of",
    "prepare_audit",
    "store_prepared",
    "write_audit",
]

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


@dataclass(slots=True)
class AuditRecord:
    """One access decision; treat it as immutable (:func:`dataclasses.replace` makes a changed
    copy). Not ``frozen``: every audited request builds one, and a frozen dataclass sets each
    of its fields through ``object.__setattr__`` (4.0 µs a record against 0.9 µs, measured
    with ``timeit``)."""

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
    #: who a decision was asked *for* (``Consent/$decide``: the actors a gateway named); the
    #: caller (``access``) is then the one who asked
    on_behalf_of: Sequence[str] = ()
    #: how many accesses this record stands for (:func:`coalesce`); ``recorded`` is then the
    #: last of them and ``first`` the first
    occurrences: int = 1
    first: int | None = None


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


_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


def _agents(access: AccessContext, on_behalf_of: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The caller first (the requestor), then whoever it asked for (information recipients)."""
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
    agents += [
        {
            "type": {"coding": [{"system": _PARTICIPATION, "code": "IRCP"}]},
            "who": {"reference": ref},
            "requestor": False,
        }
        for ref in on_behalf_of
    ]
    return agents


#: ``AuditEvent.entity.detail.type`` of a coalesced record's access count (:func:`coalesce`)
ACCESS_COUNT = "accesses"


def _counted(entity: dict[str, Any], record: AuditRecord) -> dict[str, Any]:
    """``entity``, with the access count when ``record`` stands for several accesses."""
    if record.occurrences > 1:
        entity["detail"] = [{"type": ACCESS_COUNT, "valueString": str(record.occurrences)}]
    return entity


def audit_event(record: AuditRecord) -> dict[str, Any]:
    """The AuditEvent resource for ``record`` (R4 AuditEvent; IHE BALP RESTful pattern).

    A coalesced record (:func:`coalesce`) gets the ``period`` from its first to its last
    access (``recorded`` is the last) and, on the patient, each resource and the search, an
    ``entity.detail`` ``accesses`` with the number of accesses."""
    entities: list[dict[str, Any]] = []
    if record.patient:
        patient = {
            "what": {"reference": record.patient},
            "type": {"system": "http://hl7.org/fhir/resource-types", "code": "Patient"},
            "role": {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"},
        }
        entities.append(_counted(patient, record))
    for ref in record.entities:
        if ref != record.patient:
            entities.append(
                _counted(
                    {
                        "what": {"reference": ref},
                        "role": {"system": _OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
                    },
                    record,
                )
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
            _counted(
                {
                    "type": {"system": "http://hl7.org/fhir/resource-types", "code": "Bundle"},
                    "description": record.query[:512],
                },
                record,
            )
        )
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": _REST,
        "subtype": [{"system": _INTERACTION_SYSTEM, "code": record.interaction}],
        "action": _ACTIONS.get(record.interaction, "E"),
        "recorded": format_instant(record.recorded),
        "outcome": "0" if record.permitted else "4",
        "agent": _agents(record.access, record.on_behalf_of),
        "source": {
            "observer": {"display": "fhir-consent"},
            "type": [{"system": _SECURITY_SOURCE, "code": "4", "display": "Application Server"}],
        },
    }
    if record.first is not None:
        end = event["recorded"]
        event["period"] = {"start": format_instant(record.first), "end": end}
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


def access_count(event: dict[str, Any]) -> int:
    """How many accesses a stored AuditEvent records: its ``accesses`` count when it is a
    coalesced one (:func:`coalesce`), else 1."""
    for entity in event.get("entity", ()):
        for detail in entity.get("detail", ()):
            if detail.get("type") == ACCESS_COUNT and str(detail.get("valueString", "")).isdigit():
                return int(detail["valueString"])
    return 1


#: The most resources one AuditEvent names (a search's disclosures beyond it are not listed).
MAX_ENTITIES = 200


def _decision(record: AuditRecord) -> tuple[Any, ...] | None:
    """What two records must share to be one AuditEvent: everything but the time (the same
    caller with the same token and purpose, the same interaction on the same resources, the
    same outcome, reason, deciding Consents and search). None: keep the record on its own
    (also one whose AuditEvent would have no patient, resource or search to carry the
    count)."""
    if record.extra or record.occurrences != 1:
        return None
    if not (record.patient or record.entities or record.query):
        return None
    a = record.access
    return (
        record.interaction,
        record.permitted,
        record.patient,
        tuple(record.entities),
        tuple(record.decided_by),
        record.reason,
        record.query,
        tuple(record.on_behalf_of),
        a.scopes is None,
        a.subject,
        a.client_id,
        a.patient,
        a.fhir_user,
        a.client_organization,
        a.jti,
        a.purpose_of_use,
    )


def coalesce(records: Iterable[AuditRecord]) -> list[AuditRecord]:
    """Merge the records of one write batch that record the same access (see
    :func:`_decision`) into one record each, in the order of their first access: a client
    polling a record is one AuditEvent per batch, with the number of accesses and the period
    from the first to the last, instead of one AuditEvent per request. Who saw what, when,
    why and under which Consent is kept; the instant of each repeat within the batch (at most
    a fraction of a second apart) is not. (:class:`AuditSink` groups its queue the same way as
    records arrive, :meth:`AuditSink.record`.)"""
    groups: dict[Hashable, tuple[AuditRecord, list[int]]] = {}
    for i, record in enumerate(records):
        key = _decision(record)  # None: its own group, by its position
        _group(groups, i if key is None else key, record)
    return [_merged(first, times) for first, times in groups.values()]


def _group(
    groups: dict[Hashable, tuple[AuditRecord, list[int]]], key: Hashable, record: AuditRecord
) -> None:
    """Add ``record`` to its group: the group's first record and every access's instant."""
    found = groups.get(key)
    if found is None:
        groups[key] = (record, [record.recorded])
    else:
        found[1].append(record.recorded)


def _merged(first: AuditRecord, times: list[int]) -> AuditRecord:
    """The one record that stands for a group (:func:`_group`): ``first`` itself when it is
    alone, else it with the number of accesses and their first and last instant."""
    if len(times) == 1:
        return first
    return replace(first, recorded=max(times), first=min(times), occurrences=len(times))


#: One AuditEvent ready to insert: (id, canonical JSON, recorded µs, search index rows).
Prepared = tuple[str, bytes, int, IndexRows]


def _literal(refs: list[Any]) -> list[str]:
    """The references the index keeps (not empty, not contained ``#…``), as extraction."""
    return [r for r in refs if isinstance(r, str) and r and r[0] != "#"]


def audit_index(event: dict[str, Any]) -> IndexRows:
    """The search index rows of an AuditEvent built by :func:`audit_event`: the rows
    :func:`searchparams.extract` finds in it, in the same order, read straight off the
    elements that function writes (agent/entity references, codes and codings, the recorded
    instant) instead of walking every AuditEvent search path over the whole resource: an
    audited read costs one of these, ~30 µs by the generic walk. ``tests/test_audit_index.py``
    holds the two equal over every shape :func:`audit_event` produces."""
    entities = event.get("entity", ())
    agents = _literal([a["who"].get("reference") for a in event["agent"]])
    whats = _literal([e["what"].get("reference") for e in entities if "what" in e])
    split = searchparams.split_reference
    coding = searchparams.coding_row
    tokens: list[tuple[str, str | None, str | None, str | None] | None] = [
        ("action", None, event["action"], None)
    ]
    tokens += [coding("entity-role", e["role"]) for e in entities if "role" in e]
    tokens += [coding("entity-type", e["type"]) for e in entities if "type" in e]
    tokens.append(("outcome", None, event["outcome"], None))
    tokens += [coding("subtype", c) for c in event["subtype"]]
    tokens.append(coding("type", event["type"]))
    refs = [("agent", *split(ref), ref) for ref in agents]
    refs += [("entity", *split(ref), ref) for ref in whats]
    refs += [
        ("patient", *typed, ref) for ref in agents + whats if (typed := split(ref))[0] == "Patient"
    ]
    low, high = searchparams.date_range(event["recorded"])
    return IndexRows(
        tokens=[searchparams.TokenRow(*t) for t in dict.fromkeys(tokens) if t is not None],
        strings=[],
        references=[searchparams.ReferenceRow(*r) for r in dict.fromkeys(refs)],
        dates=[searchparams.DateRow("date", low, high)],
    )


def prepare_audit(record: AuditRecord) -> Prepared:
    """Build one record's AuditEvent and its search index rows (no database work)."""
    rid = str(uuid.uuid4())
    content, parsed = finalize(audit_event(record), rid, 1, record.recorded)
    return rid, content, record.recorded, audit_index(parsed)


def store_prepared(conn: Connection, items: Sequence[Prepared]) -> int:
    """Insert prepared AuditEvents on ``conn`` (a few multi-row statements in all)."""
    rows = [("AuditEvent", rid, content, now, index, "POST") for rid, content, now, index in items]
    return len(Repository(conn).insert_many(rows))


def write_audit(conn: Connection, records: Iterable[AuditRecord]) -> int:
    """Store AuditEvents for ``records`` on ``conn`` (the caller's transaction)."""
    return store_prepared(conn, [prepare_audit(r) for r in records])


#: Tries of one audit batch against a failing database (0.1 + 0.2 + 0.4 + 0.8 + 1.6 s apart).
_WRITE_ATTEMPTS = 6
#: The least pause between two audit write transactions on SQLite. SQLite's lock is not
#: queued: a writer that finds it taken sleeps in its busy handler (up to 100 ms between
#: tries) and takes it only if it is free when it wakes. A pause longer than the longest of
#: those sleeps means every waiting writer (a patient's revocation) gets the lock before the
#: audit writer takes it again, whatever the read load.
SQLITE_WRITER_GAP = 0.15


class AuditSink:
    """Collects audit records; writes go in the caller's transaction, reads are batched.

    ``observers`` are called with every record as it is recorded (metrics count decisions
    there); they must be quick and must not raise.

    Nothing is dropped silently: a batch the database refuses after all retries, a record
    that cannot be built, and records still queued when :meth:`stop` gives up are logged
    (counts and exception types only, never content) and counted in :attr:`dropped`.
    """

    def __init__(
        self,
        db: Database,
        *,
        flush_interval: float = 0.5,
        batch_size: int = 500,
        sleep: Callable[[float], object] | None = None,
        coalescing: bool = True,
    ) -> None:
        self.db = db
        #: merge the queued records that record the same access (:func:`coalesce`), as they
        #: are queued; off: one AuditEvent per queued record
        self.coalescing = coalescing
        self.flush_interval = flush_interval
        #: the most AuditEvents one write transaction stores
        self.batch_size = batch_size
        #: pause after each write transaction (at least :data:`SQLITE_WRITER_GAP` on SQLite)
        self.gap = max(flush_interval, SQLITE_WRITER_GAP if getattr(db, "is_sqlite", False) else 0)
        self.dropped = 0
        self._stopping = threading.Event()  # cuts the pause between batches short at stop()
        self._sleep = sleep or time.sleep  # retry backoff
        #: the pause between batches: interruptible by stop() unless a test injects a sleep
        self._pause: Callable[[float], object] = sleep or self._stopping.wait
        self._thread: threading.Thread | None = None
        # The queue is a dict of groups, each one access with the instants of its repeats
        # (:func:`_group`): a repeated read costs an append, and the writer takes a round's
        # groups, however many reads they stand for, in one swap. One plain lock guards it
        # and the counts; ``_ready`` wakes the writer, ``_flushed`` those who wait for it.
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._flushed = threading.Condition(self._lock)
        self._groups: dict[Hashable, tuple[AuditRecord, list[int]]] = {}
        self._serial = itertools.count()  # the key of a record that is its own group
        self._stop_requested = False
        self._pending = 0
        self.observers: list[Callable[[AuditRecord], None]] = []

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

    def record_now(self, record: AuditRecord) -> None:
        """Store one record in its own transaction before returning (break-glass: the
        patient sees it at once, consent.md §3); a failure propagates, so nothing that must
        be audited first is served unaudited."""
        prepared = prepare_audit(record)
        with self.db.write() as conn:
            store_prepared(conn, [prepared])
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
        key = None
        if self.coalescing:
            try:
                key = _decision(record)
            except Exception as exc:  # noqa: BLE001 - a malformed record: its own AuditEvent
                log.error("audit record not coalesced (%s)", type(exc).__name__)
        with self._lock:
            self._pending += 1
            groups = self._groups
            if not groups:
                self._ready.notify()
            try:
                _group(groups, next(self._serial) if key is None else key, record)
            except TypeError:  # a key that cannot be hashed: its own AuditEvent
                _group(groups, next(self._serial), record)

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
                    entities=tuple(refs[:MAX_ENTITIES]),
                    patient=patient,
                    reason=reason,
                    query=query,
                )
            )

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Flush everything queued and stop the writer; what it could not store in
        ``timeout`` seconds (or with no writer running) is logged as not stored."""
        if self._thread is not None:
            with self._lock:
                self._stop_requested = True
                self._ready.notify()
            self._stopping.set()
            self._thread.join(timeout=timeout)
            self._stopping.clear()
            alive = self._thread.is_alive()
            self._thread = None
            with self._lock:
                self._stop_requested = False
            if alive:
                log.error(
                    "audit writer did not finish within %.0f s: %d audit records still queued "
                    "are lost if the process exits now",
                    timeout,
                    self._pending,
                )
                return
        with self._lock:
            left, self._groups = self._groups, {}
            lost = sum(len(times) for _first, times in left.values())
            if lost:
                self.dropped += lost
                self._pending -= lost
                self._flushed.notify_all()
        if lost:
            log.error("audit writer not running: %d audit records not stored", lost)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is stored (tests, shutdown)."""
        with self._flushed:
            return self._flushed.wait_for(lambda: self._pending == 0, timeout=timeout)

    def _run(self) -> None:
        """Take every group queued and write them as AuditEvents in transactions of at most
        ``batch_size`` (a few multi-row statements each: the transaction is short), pausing
        :attr:`gap` seconds after each so that other writers get the database's write lock
        in between (SQLite's lock is not fair: back-to-back audit batches could starve a
        patient's revocation). At :meth:`stop`, what is queued then is written, and it ends."""
        while True:
            with self._lock:
                if not self._groups and not self._stop_requested:
                    self._ready.wait(timeout=self.flush_interval)
                batch, self._groups = self._groups, {}
                stop = self._stop_requested
            if batch:
                self._write(batch)
            if stop:
                return
            if batch:
                self._pause(self.gap)

    def _write(self, batch: dict[Hashable, tuple[AuditRecord, list[int]]]) -> None:
        """Store a round's groups as AuditEvents (each group's repeats as one), in
        transactions of at most ``batch_size`` with a :attr:`gap` between two, retrying a
        failing database a few times (backoff up to ~3 s in all) before giving up on a
        transaction; failures are logged with counts and types only, never content. Each
        transaction's AuditEvents are built before it starts."""
        taken = sum(len(times) for _first, times in batch.values())
        try:
            records: list[AuditRecord] = []
            for first, times in batch.values():
                try:
                    records.append(_merged(first, times))
                except Exception as exc:  # noqa: BLE001 - a malformed record: store them one by one
                    log.error("audit batch not coalesced (%s)", type(exc).__name__)
                    records += [replace(first, recorded=t) for t in times]
            for start in range(0, len(records), self.batch_size):
                items: list[tuple[Prepared, int]] = []  # with the accesses each stands for
                for record in records[start : start + self.batch_size]:
                    try:
                        items.append((prepare_audit(record), record.occurrences))
                    except Exception as exc:  # noqa: BLE001 - one bad record must not sink the batch
                        log.error(
                            "audit record not stored: cannot build it (%s)", type(exc).__name__
                        )
                        self._lost(record.occurrences)
                if start:
                    self._pause(self.gap)
                if items:
                    self._store(items)
        finally:
            with self._lock:
                self._pending -= taken
                self._flushed.notify_all()

    def _store(self, items: list[tuple[Prepared, int]]) -> None:
        """One write transaction of prepared AuditEvents, tried up to :data:`_WRITE_ATTEMPTS`
        times; what it could not store is counted as lost."""
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                with self.db.write() as conn:
                    store_prepared(conn, [prepared for prepared, _ in items])
                return
            except Exception as exc:  # noqa: BLE001 - the writer must survive the database
                if attempt + 1 == _WRITE_ATTEMPTS:
                    stored = sum(n for _, n in items)
                    log.error(
                        "audit batch of %d not stored after %d attempts: %s",
                        stored,
                        _WRITE_ATTEMPTS,
                        type(exc).__name__,
                    )
                    self._lost(stored)
                else:
                    self._sleep(0.1 * 2**attempt)

    def _lost(self, n: int) -> None:
        with self._lock:
            self.dropped += n
