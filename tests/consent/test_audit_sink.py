"""The batched audit writer (fhir_consent/audit.py ``AuditSink``), on SQLite and PostgreSQL.

* its write transactions are short (one multi-row statement per table, the AuditEvents built
  before the transaction) and, on SQLite, at least ``SQLITE_WRITER_GAP`` apart, longer than
  SQLite's longest busy-handler sleep, so that a patient's revocation waiting for the write
  lock always gets it between two audit batches (the load test in test_live.py shows it
  end to end);
* the batch insert stores exactly the rows a one-by-one insert stores;
* nothing is dropped silently: a batch the database refuses after every retry, a record that
  cannot be built, and records queued with no writer running are logged — counts and
  exception types only, never patient data — and counted in ``dropped``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy.engine import Connection

from fhir_consent.audit import (
    SQLITE_WRITER_GAP,
    AuditRecord,
    AuditSink,
    access_count,
    prepare_audit,
    store_prepared,
)
from fhir_consent.auth import AccessContext
from fhir_consent.fhir.services import format_instant
from fhir_consent.store.db import Database
from fhir_consent.store.repository import Repository
from fhir_consent.store.tables import idx_date, idx_reference, idx_string, idx_token, resources
from smart_on_fhir.scopes import parse_scopes

ACCESS = AccessContext(
    scopes=parse_scopes("system/*.rs"), client_id="system", client_organization="Organization/o"
)
SECRET = "Patient/secret-4711"


def record(i: int, patient: str = SECRET, **more: Any) -> AuditRecord:
    return AuditRecord(
        interaction="read",
        recorded=1_700_000_000_000_000 + i,
        permitted=True,
        access=ACCESS,
        entities=(f"DocumentReference/d{i}",),
        patient=patient,
        decided_by=("Consent/c/_history/1",),
        reason="consent-explicit",
        **more,
    )


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url, pool_size=2)
    yield database
    database.dispose()


def stored_events(db: Database) -> int:
    with db.read() as conn:
        count = conn.execute(
            sa.select(sa.func.count()).where(resources.c.res_type == "AuditEvent")
        ).scalar_one()
    return int(count)


def stored_bodies(db: Database) -> list[dict[str, Any]]:
    with db.read() as conn:
        contents = conn.execute(
            sa.select(resources.c.content).where(resources.c.res_type == "AuditEvent")
        ).scalars()
        return [orjson.loads(c) for c in contents]


class Counting:
    """A Database whose write transactions are counted (and can be made to fail)."""

    def __init__(self, db: Database, fail: bool = False) -> None:
        self.inner = db
        self.is_sqlite = db.is_sqlite
        self.fail = fail
        self.writes = 0

    @contextmanager
    def write(self) -> Iterator[Connection]:
        self.writes += 1
        if self.fail:
            raise sa.exc.OperationalError("INSERT", {}, Exception("disk I/O error"))
        with self.inner.write() as conn:
            yield conn


def test_batches_are_short_transactions_with_a_gap(db: Database) -> None:
    counting = Counting(db)
    slept: list[float] = []
    sink = AuditSink(counting, flush_interval=0.01, sleep=slept.append)  # type: ignore[arg-type]
    for i in range(1100):  # queued before the writer starts: every batch is full
        sink.record(record(i))
    sink.start()
    assert sink.flush(timeout=60)
    sink.stop()
    assert stored_events(db) == 1100 and sink.dropped == 0
    assert counting.writes == 3  # 500 + 500 + 100, one transaction each
    assert len(slept) >= 2
    want = SQLITE_WRITER_GAP if db.is_sqlite else 0.01
    assert all(s == pytest.approx(want) for s in slept), slept
    if db.is_sqlite:
        assert SQLITE_WRITER_GAP > 0.1  # SQLite's longest busy-handler sleep is 100 ms


def test_the_batch_insert_stores_what_one_by_one_inserts_store(db: Database) -> None:
    one, many = prepare_audit(record(1)), [prepare_audit(record(1)) for _ in range(3)]
    with db.write() as conn:
        Repository(conn).insert("AuditEvent", *one[:2], one[2], one[3], "POST")
        assert store_prepared(conn, many) == 3

    def rows(conn: Connection, res_id: str) -> dict[str, list[tuple[Any, ...]]]:
        pk = conn.execute(sa.select(resources.c.pk).where(resources.c.res_id == res_id)).scalar()
        out = {}
        for table in (idx_token, idx_string, idx_reference, idx_date):
            cols = [c for c in table.c if c.name not in ("id", "resource_pk")]
            found = conn.execute(sa.select(*cols).where(table.c.resource_pk == pk)).all()
            out[table.name] = sorted(tuple(r) for r in found)
        return out

    with db.read() as conn:
        single = rows(conn, one[0])
        assert single["idx_token"] and single["idx_reference"] and single["idx_date"]
        for rid, *_ in many:
            assert rows(conn, rid) == single  # the same index rows (only the ids differ)
        pks = conn.execute(
            sa.select(resources.c.res_id, resources.c.version_id).where(
                resources.c.res_type == "AuditEvent"
            )
        ).all()
    assert sorted(pks) == sorted((rid, 1) for rid in [one[0], *(m[0] for m in many)])


def test_a_refused_batch_is_logged_and_counted(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    failing = Counting(db, fail=True)
    sink = AuditSink(failing, flush_interval=0.01, sleep=lambda _s: None)  # type: ignore[arg-type]
    caplog.set_level(logging.ERROR, logger="fhir_consent.audit")
    for i in range(3):
        sink.record(record(i))
    sink.start()
    assert sink.flush(timeout=30)
    sink.stop()
    assert failing.writes == 6  # every retry was tried
    assert sink.dropped == 3
    assert "audit batch of 3 not stored after 6 attempts: OperationalError" in caplog.text
    assert "secret" not in caplog.text and "4711" not in caplog.text
    assert stored_events(db) == 0


def test_a_record_that_cannot_be_built_is_logged_the_others_stored(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    sink = AuditSink(db, flush_interval=0.01, sleep=lambda _s: None)
    caplog.set_level(logging.ERROR, logger="fhir_consent.audit")
    sink.record(record(1))
    sink.record(replace(record(2), recorded=None))  # type: ignore[arg-type] # cannot be built
    sink.record(record(3))
    sink.start()
    assert sink.flush(timeout=30)
    sink.stop()
    assert stored_events(db) == 2 and sink.dropped == 1
    assert "audit record not stored: cannot build it (TypeError)" in caplog.text
    assert "secret" not in caplog.text


def test_records_queued_without_a_writer_are_logged(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    sink = AuditSink(db)  # never started
    caplog.set_level(logging.ERROR, logger="fhir_consent.audit")
    sink.record(record(1))
    sink.record(record(2))
    sink.stop()
    assert sink.dropped == 2
    assert "audit writer not running: 2 audit records not stored" in caplog.text
    assert "secret" not in caplog.text
    assert sink.flush(timeout=0.1)  # nothing pending any more


def test_repeats_of_one_access_in_a_batch_are_one_audit_event(db: Database) -> None:
    """A client polling a record: one AuditEvent per batch for its repeats, with the number
    of accesses and the period; any other access (another resource, token, outcome) keeps
    its own AuditEvent. Off (``coalescing=False``): one AuditEvent per access."""
    other_token = replace(ACCESS, jti="another-token")
    t0 = record(1).recorded
    queued = [replace(record(1), recorded=t0 + 50 * (39 - i)) for i in range(40)]  # any order
    queued += [
        record(2),
        replace(record(1), access=other_token),
        replace(record(1), permitted=False),
    ]
    for coalescing, want in ((True, 4), (False, len(queued))):
        with db.write() as conn:
            conn.execute(resources.delete().where(resources.c.res_type == "AuditEvent"))
        sink = AuditSink(db, flush_interval=0.01, sleep=lambda _s: None, coalescing=coalescing)
        for r in queued:  # queued before the writer starts: one batch
            sink.record(r)
        sink.start()
        assert sink.flush(timeout=30)
        sink.stop()
        events = stored_bodies(db)
        assert len(events) == want and sink.dropped == 0
        assert sum(access_count(e) for e in events) == len(queued)
        polled = [e for e in events if access_count(e) > 1]
        if not coalescing:
            assert polled == []
            continue
        (event,) = polled
        assert access_count(event) == 40
        assert event["period"] == {"start": format_instant(t0), "end": format_instant(t0 + 1950)}
        assert event["recorded"] == event["period"]["end"]
        AuditEvent.model_validate(event)  # R4B
        whats = {e["what"]["reference"] for e in event["entity"] if "what" in e}
        assert whats == {SECRET, "DocumentReference/d1", "Consent/c/_history/1"}


def test_one_round_takes_everything_queued_so_the_writer_keeps_up(db: Database) -> None:
    """A round takes up to ``drain_size`` queued records, not ``batch_size``: repeats of a few
    accesses, however many, are written in one short transaction per round. (A round of
    ``batch_size`` records per gap drained at most ~3,300 reads/s on SQLite; a busier server
    fell ever further behind.) Distinct accesses beyond ``batch_size`` still go in
    transactions of at most ``batch_size`` AuditEvents, a gap apart."""
    counting = Counting(db)
    slept: list[float] = []
    sink = AuditSink(counting, flush_interval=0.01, batch_size=10, sleep=slept.append)  # type: ignore[arg-type]
    polls = [replace(record(i % 3), recorded=record(0).recorded + i) for i in range(2_000)]
    for r in polls:  # 2,000 reads of 3 records, queued before the writer starts: one round
        sink.record(r)
    sink.start()
    assert sink.flush(timeout=60)
    assert counting.writes == 1 and sink.dropped == 0
    events = stored_bodies(db)
    assert sorted(access_count(e) for e in events) == [666, 667, 667]

    for i in range(25):  # 25 distinct accesses: transactions of at most 10, a gap apart
        sink.record(record(100 + i))
    assert sink.flush(timeout=60)
    sink.stop()
    assert counting.writes == 1 + 3 and stored_events(db) == 3 + 25
    want = SQLITE_WRITER_GAP if db.is_sqlite else 0.01
    assert len(slept) >= 1 + 2 and all(s == pytest.approx(want) for s in slept)


def test_records_are_grouped_as_they_are_queued(db: Database) -> None:
    """The queue holds one group per access, however many repeats it stands for (the writer
    takes a round in one swap); a record whose access cannot be keyed (here an unhashable
    ``decided_by``) is queued on its own instead of failing the request that made it."""
    sink = AuditSink(db, flush_interval=0.01, sleep=lambda _s: None)
    t0 = record(0).recorded
    for i in range(300):
        sink.record(replace(record(i % 2), recorded=t0 + i))
    odd = replace(record(5), decided_by=[["Consent/c"]])  # type: ignore[list-item]
    sink.record(odd)
    sink.record(odd)
    assert sink.pending == 302
    assert len(sink._groups) == 2 + 2  # two polled accesses, and each odd record alone
    sink.start()
    assert sink.flush(timeout=30)
    sink.stop()
    events = stored_bodies(db)
    assert sorted(access_count(e) for e in events if access_count(e) > 1) == [150, 150]
    assert len(events) + sink.dropped == 4 and sink.pending == 0
