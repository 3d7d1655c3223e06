"""The transactional outbox (ledger.md §2 "Exactly once on the external ledger"): the database
side of anchoring — outbox rows, batches and the relay lease. No network here.

Life of an entry on the external ledger::

    ledger_outbox.status   pending ──(claimed into a batch)──► sent(txid) ──► confirmed(height)
                              └──(too large for any transaction of the engine)──► skipped
    ledger_batch.state     prepared ──(broadcast ok / found on chain)──► sent ──► confirmed

A batch is created (with the engine's repeatable parameters) and its rows are claimed in ONE
transaction, before anything is broadcast; a row joins at most one batch ever (``UPDATE …
WHERE batch_id IS NULL``, and on PostgreSQL ``FOR UPDATE SKIP LOCKED`` when claiming). That is
what makes re-sending after a crash safe: it is always the same batch with the same
parameters. The lease (one row per engine, with a fencing ``epoch``) keeps a single relay
publishing at a time across workers and processes; every state change checks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from fhir_consent.ledger.engines.base import AnchorItem
from fhir_consent.ledger.tables import ledger_batch, ledger_entry, ledger_lease, ledger_outbox

__all__ = [
    "Batch",
    "Lease",
    "acquire_lease",
    "backfill",
    "batch_items",
    "begin_attempt",
    "claim_pending",
    "create_batch",
    "holds_lease",
    "in_flight_params",
    "load_batches",
    "mark_confirmed",
    "mark_failure",
    "mark_height",
    "mark_sent",
    "release_lease",
    "reprepare",
    "skip",
    "status_counts",
]


@dataclass(frozen=True, slots=True)
class Lease:
    engine: str
    holder: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Batch:
    id: int
    engine: str
    state: str
    first_seq: int
    last_seq: int
    count: int
    params: dict[str, Any]
    txid: str | None
    height: int | None
    attempts: int
    next_attempt_at: int
    sent_at: int | None


def _pg(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


# -- the lease ---------------------------------------------------------------------------------


def acquire_lease(
    conn: Connection, engine: str, holder: str, now: int, ttl_us: int
) -> Lease | None:
    """Take or renew the engine's lease for ``holder``; None while another holder's is live.

    A new holder bumps ``epoch``, so a relay that lost its lease (paused past expiry) can no
    longer change batch state (:func:`holds_lease`).
    """
    lc = ledger_lease.c
    stmt = sa.select(lc.holder, lc.epoch, lc.expires_at).where(lc.engine == engine)
    if _pg(conn):
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    if row is None:
        try:
            with conn.begin_nested():
                conn.execute(
                    ledger_lease.insert().values(
                        engine=engine, holder=holder, epoch=1, expires_at=now + ttl_us
                    )
                )
        except IntegrityError:
            return None
        return Lease(engine, holder, 1)
    if row.holder != holder and row.expires_at > now:
        return None
    epoch = int(row.epoch) + (0 if row.holder == holder else 1)
    conn.execute(
        ledger_lease.update()
        .where(lc.engine == engine)
        .values(holder=holder, epoch=epoch, expires_at=now + ttl_us)
    )
    return Lease(engine, holder, epoch)


def holds_lease(conn: Connection, lease: Lease, now: int) -> bool:
    """Whether ``lease`` is still ours (locks the lease row on PostgreSQL until commit)."""
    lc = ledger_lease.c
    stmt = sa.select(lc.holder, lc.epoch, lc.expires_at).where(lc.engine == lease.engine)
    if _pg(conn):
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    return (
        row is not None
        and row.holder == lease.holder
        and int(row.epoch) == lease.epoch
        and int(row.expires_at) > now
    )


def release_lease(conn: Connection, engine: str, holder: str) -> None:
    """Let the lease expire now if ``holder`` has it (a clean shutdown)."""
    lc = ledger_lease.c
    conn.execute(
        ledger_lease.update().where(lc.engine == engine, lc.holder == holder).values(expires_at=0)
    )


# -- outbox rows -------------------------------------------------------------------------------


def backfill(conn: Connection, limit: int = 10_000) -> int:
    """Add ``pending`` outbox rows for entries that have none (written while no external
    engine was configured). Returns how many were added."""
    e, o = ledger_entry.c, ledger_outbox.c
    missing = (
        sa.select(e.seq).where(~sa.exists().where(o.seq == e.seq)).order_by(e.seq).limit(limit)
    )
    seqs = [int(s) for s in conn.execute(missing).scalars()]
    if seqs:
        conn.execute(ledger_outbox.insert(), [{"seq": s, "status": "pending"} for s in seqs])
    return len(seqs)


def claim_pending(conn: Connection, limit: int) -> list[AnchorItem]:
    """The oldest pending rows not yet in a batch, with their entry bytes (locked on
    PostgreSQL, skipping rows another transaction holds)."""
    o, e = ledger_outbox.c, ledger_entry.c
    rows = sa.select(o.seq).where(o.status == "pending", o.batch_id.is_(None))
    rows = rows.order_by(o.seq).limit(limit)
    if _pg(conn):
        rows = rows.with_for_update(skip_locked=True)
    seqs = [int(s) for s in conn.execute(rows).scalars()]
    if not seqs:
        return []
    data = {
        int(row[0]): bytes(row[1])
        for row in conn.execute(sa.select(e.seq, e.data).where(e.seq.in_(seqs)))
    }
    return [AnchorItem(s, data[s]) for s in seqs if s in data]


def skip(conn: Connection, seq: int, note: str) -> None:
    """Mark an entry no transaction of the engine can carry (it stays in the embedded log)."""
    conn.execute(
        ledger_outbox.update()
        .where(ledger_outbox.c.seq == seq, ledger_outbox.c.batch_id.is_(None))
        .values(status="skipped", note=note[:200])
    )


def create_batch(
    conn: Connection, engine: str, items: Sequence[AnchorItem], params: dict[str, Any], now: int
) -> int:
    """Record a batch in state ``prepared`` and attach its rows; raises if any row was
    claimed by another batch meanwhile (the transaction must then roll back)."""
    seqs = [i.seq for i in items]
    batch_id = conn.execute(
        ledger_batch.insert()
        .values(
            engine=engine,
            state="prepared",
            first_seq=min(seqs),
            last_seq=max(seqs),
            count=len(seqs),
            params=orjson.dumps(params).decode(),
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        .returning(ledger_batch.c.id)
    ).scalar_one()
    o = ledger_outbox.c
    result = conn.execute(
        ledger_outbox.update()
        .where(o.seq.in_(seqs), o.batch_id.is_(None), o.status == "pending")
        .values(batch_id=batch_id)
    )
    if result.rowcount != len(seqs):
        raise RuntimeError("outbox rows were claimed concurrently")
    return int(batch_id)


def _batch(row: Any) -> Batch:
    return Batch(
        id=int(row.id),
        engine=row.engine,
        state=row.state,
        first_seq=int(row.first_seq),
        last_seq=int(row.last_seq),
        count=int(row.count),
        params=orjson.loads(row.params),
        txid=row.txid,
        height=None if row.height is None else int(row.height),
        attempts=int(row.attempts),
        next_attempt_at=int(row.next_attempt_at),
        sent_at=None if row.sent_at is None else int(row.sent_at),
    )


def load_batches(
    conn: Connection, engine: str, state: str, *, due_before: int | None = None, limit: int = 50
) -> list[Batch]:
    b = ledger_batch.c
    stmt = sa.select(ledger_batch).where(b.engine == engine, b.state == state)
    if due_before is not None:
        stmt = stmt.where(b.next_attempt_at <= due_before)
    return [_batch(r) for r in conn.execute(stmt.order_by(b.id).limit(limit))]


def in_flight_params(
    conn: Connection, engine: str, *, exclude: int | None = None
) -> list[dict[str, Any]]:
    """The parameters of the engine's unconfirmed batches and of its newest batch, oldest
    first, leaving out batch ``exclude`` (for :class:`~.engines.base.PrepareContext`)."""
    b = ledger_batch.c
    newest = sa.select(sa.func.max(b.id)).where(b.engine == engine).scalar_subquery()
    stmt = (
        sa.select(b.id, b.params)
        .where(b.engine == engine, sa.or_(b.state.in_(("prepared", "sent")), b.id == newest))
        .order_by(b.id)
    )
    if exclude is not None:
        stmt = stmt.where(b.id != exclude)
    return [orjson.loads(row.params) for row in conn.execute(stmt)]


def batch_items(conn: Connection, batch_id: int) -> list[AnchorItem]:
    o, e = ledger_outbox.c, ledger_entry.c
    rows = conn.execute(
        sa.select(e.seq, e.data)
        .select_from(ledger_outbox.join(ledger_entry, o.seq == e.seq))
        .where(o.batch_id == batch_id)
        .order_by(e.seq)
    )
    return [AnchorItem(int(s), bytes(d)) for s, d in rows]


def mark_sent(conn: Connection, batch_id: int, txid: str, now: int) -> None:
    conn.execute(
        ledger_batch.update()
        .where(ledger_batch.c.id == batch_id)
        .values(state="sent", txid=txid, sent_at=now, last_error=None)
    )
    conn.execute(
        ledger_outbox.update()
        .where(ledger_outbox.c.batch_id == batch_id)
        .values(status="sent", txid=txid)
    )


def mark_height(conn: Connection, batch_id: int, height: int | None) -> None:
    conn.execute(ledger_batch.update().where(ledger_batch.c.id == batch_id).values(height=height))
    conn.execute(
        ledger_outbox.update().where(ledger_outbox.c.batch_id == batch_id).values(height=height)
    )


def mark_confirmed(conn: Connection, batch_id: int, height: int, now: int) -> None:
    conn.execute(
        ledger_batch.update()
        .where(ledger_batch.c.id == batch_id)
        .values(state="confirmed", height=height, confirmed_at=now)
    )
    conn.execute(
        ledger_outbox.update()
        .where(ledger_outbox.c.batch_id == batch_id)
        .values(status="confirmed", height=height)
    )


def begin_attempt(conn: Connection, batch_id: int, retry_at: int) -> None:
    """Count a broadcast attempt *before* it is made, so that after a crash the next relay
    knows to look for the batch on chain first; ``retry_at`` applies if it never returns."""
    b = ledger_batch.c
    conn.execute(
        ledger_batch.update()
        .where(b.id == batch_id)
        .values(attempts=b.attempts + 1, next_attempt_at=retry_at)
    )


def mark_failure(conn: Connection, batch_id: int, code: str, next_attempt_at: int) -> None:
    """Record why the last attempt failed (a short code, never node text) and when to retry."""
    conn.execute(
        ledger_batch.update()
        .where(ledger_batch.c.id == batch_id)
        .values(last_error=code[:200], next_attempt_at=next_attempt_at)
    )


def reprepare(conn: Connection, batch_id: int, params: dict[str, Any], now: int) -> None:
    """Back to ``prepared`` with new parameters (only when the old ones provably did not and
    cannot put the batch on chain)."""
    conn.execute(
        ledger_batch.update()
        .where(ledger_batch.c.id == batch_id)
        .values(
            state="prepared",
            params=orjson.dumps(params).decode(),
            txid=None,
            height=None,
            sent_at=None,
            next_attempt_at=now,
        )
    )
    conn.execute(
        ledger_outbox.update()
        .where(ledger_outbox.c.batch_id == batch_id)
        .values(status="pending", txid=None, height=None)
    )


def status_counts(conn: Connection) -> dict[str, int]:
    """Outbox rows by status (for operators and ``ledger verify``)."""
    o = ledger_outbox.c
    rows = conn.execute(sa.select(o.status, sa.func.count()).group_by(o.status))
    return {str(s): int(n) for s, n in rows}
