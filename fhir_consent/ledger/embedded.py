"""The embedded Merkle log (ledger.md §2–§3, "embedded log"): entries, RFC 9162 tree nodes and
signed checkpoints in the server's own database, written in the FHIR change's transaction.

* :class:`DbTreeStore` — the :class:`~fhir_consent.ledger.merkle.TreeStore` over ``ledger_node``.
* :class:`EmbeddedLog` — appends entries (allocating the gap-free ``seq`` under the
  ``ledger_head`` row lock), issues and caches checkpoints, and builds inclusion proofs
  (RFC 9162 §2.1.3) and consistency proofs (§2.1.4) in O(log n) node reads.

Why ``seq`` is gap-free and in commit order: every append first locks the single
``ledger_head`` row (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite write transactions already
hold the database lock from ``BEGIN IMMEDIATE``) and only then reads the size. The lock is held
until the FHIR write commits or rolls back, so concurrent writers — in any number of workers —
take consecutive numbers in the order they commit, and a rolled-back write gives its number
back with everything else it wrote.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from fhir_consent.crypto import KeyRing
from fhir_consent.ledger.checkpoint import Checkpoint, sign_checkpoint
from fhir_consent.ledger.entry import LedgerEntry, entry_from_bytes, format_ts_us, prepare_entry
from fhir_consent.ledger.merkle import (
    HASH_SIZE,
    CompactRange,
    MerkleError,
    Node,
    NodeKey,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    tree_root,
)
from fhir_consent.ledger.tables import (
    ledger_checkpoint,
    ledger_entry,
    ledger_head,
    ledger_node,
    ledger_outbox,
)
from fhir_consent.ledger.verify_proof import make_document

__all__ = [
    "DbTreeStore",
    "EmbeddedLog",
    "LedgerNotFound",
    "NewEntry",
    "StoredEntry",
    "TreeHead",
]

_HEAD_ID = 1
_Clock = Callable[[], int]

# Statements built once (building SQLAlchemy expressions per write costs more than running them)
_SELECT_HEAD = sa.select(ledger_head.c.size, ledger_head.c.compact).where(
    ledger_head.c.id == _HEAD_ID
)
_SELECT_HEAD_LOCKED = _SELECT_HEAD.with_for_update()
_UPDATE_HEAD = (
    ledger_head.update()
    .where(ledger_head.c.id == _HEAD_ID)
    .values(size=sa.bindparam("new_size"), compact=sa.bindparam("new_compact"))
)
_INSERT_ENTRY = ledger_entry.insert()
_INSERT_NODE = ledger_node.insert()
_INSERT_OUTBOX = ledger_outbox.insert()


# Inserts at the driver level (issue 5 throughput: SQLAlchemy's per-row parameter processing
# cost more than the rows). PostgreSQL: COPY for bulk appends, else one statement with the
# columns as arrays expanded by unnest() (_PG_APPEND); SQLite: the driver's executemany.
_SQLITE_INSERT_ENTRY = "INSERT INTO ledger_entry (seq, ref, kind, ts, data) VALUES (?, ?, ?, ?, ?)"
_SQLITE_INSERT_NODE = "INSERT INTO ledger_node (level, idx, hash) VALUES (?, ?, ?)"
_SQLITE_INSERT_OUTBOX = "INSERT INTO ledger_outbox (seq, status) VALUES (?, 'pending')"
_SQLITE_UPDATE_HEAD = "UPDATE ledger_head SET size = ?, compact = ? WHERE id = 1"
_PG_UPDATE_HEAD = "UPDATE ledger_head SET size = %s, compact = %s WHERE id = 1"
_SQLITE_SELECT_HEAD = "SELECT size, compact FROM ledger_head WHERE id = 1"
_PG_SELECT_HEAD_LOCKED = "SELECT size, compact FROM ledger_head WHERE id = 1 FOR UPDATE"
#: Up to this many entries, PostgreSQL gets one statement with scalar parameters.
_SMALL_MAX = 4

#: One ``ledger_entry`` row: ``(seq, ref, kind, ts, data)``.
EntryRow = tuple[int, str, str, int, bytes]


#: From this many entries on, PostgreSQL gets the rows by COPY (binary): far less client work
#: per row than any INSERT, for one more round trip — so not for the single-entry FHIR write.
_COPY_FROM = 16


def _copy_rows(
    conn: Connection, rows: Sequence[EntryRow], nodes: Sequence[Node], outbox: bool
) -> None:
    """COPY … FROM STDIN (FORMAT BINARY) through psycopg, in the caller's transaction."""
    raw: Any = conn.connection.driver_connection
    with raw.cursor() as cur:
        with cur.copy(
            "COPY ledger_entry (seq, ref, kind, ts, data) FROM STDIN (FORMAT BINARY)"
        ) as cp:
            cp.set_types(["int8", "varchar", "varchar", "int8", "bytea"])
            for r in rows:
                cp.write_row(r)
        if nodes:
            with cur.copy("COPY ledger_node (level, idx, hash) FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(["int2", "int8", "bytea"])
                for n in nodes:
                    cp.write_row(n)
        if outbox:
            with cur.copy("COPY ledger_outbox (seq, status) FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(["int8", "varchar"])
                for r in rows:
                    cp.write_row((r[0], "pending"))


_PG_APPEND = (
    "WITH e AS (INSERT INTO ledger_entry (seq, ref, kind, ts, data) SELECT * FROM "
    "unnest(%s::bigint[], %s::varchar[], %s::varchar[], %s::bigint[], %s::bytea[])), "
    "n AS (INSERT INTO ledger_node (level, idx, hash) SELECT * FROM "
    "unnest(%s::smallint[], %s::bigint[], %s::bytea[])){outbox} "
    "UPDATE ledger_head SET size = %s, compact = %s WHERE id = 1"
)
_PG_APPEND_PLAIN = _PG_APPEND.format(outbox="")
_PG_APPEND_OUTBOX = _PG_APPEND.format(
    outbox=", o AS (INSERT INTO ledger_outbox (seq, status) "
    "SELECT s, 'pending' FROM unnest(%s::bigint[]) s)"
)


def _raw_kind(conn: Connection) -> str:
    """``psycopg`` / ``sqlite`` when the driver connection can be used directly (inside the
    SQLAlchemy transaction: the same connection, the same transaction), else ``""``."""
    d = conn.dialect
    if d.name == "postgresql" and d.driver == "psycopg":
        return "psycopg"
    if d.name == "sqlite" and d.driver == "pysqlite":
        return "sqlite"
    return ""


def _select_head_raw(conn: Connection) -> tuple[Any, ...] | None:
    """The head row, locked on PostgreSQL (SQLite writers hold the database lock already).

    At the driver level: SQLAlchemy's per-statement work cost the Consent write more CPU
    than the query (issue 5, write latency)."""
    kind = _raw_kind(conn)
    if kind == "psycopg":
        raw: Any = conn.connection.driver_connection
        with raw.cursor() as cur:
            cur.execute(_PG_SELECT_HEAD_LOCKED)
            row: Any = cur.fetchone()
    elif kind == "sqlite":
        row = conn.connection.driver_connection.execute(_SQLITE_SELECT_HEAD).fetchone()  # type: ignore[union-attr]
    else:
        stmt = _SELECT_HEAD_LOCKED if conn.dialect.name == "postgresql" else _SELECT_HEAD
        row = conn.execute(stmt).first()
    return None if row is None else tuple(row)


_PG_SMALL: dict[tuple[int, int, bool], str] = {}


def _pg_small_append(entries: int, nodes: int, outbox: bool) -> str:
    """One statement for a small append with scalar parameters (cheaper to send than arrays):
    entry rows, node rows, outbox rows and the new head. One text per shape (at most a few
    dozen: a single entry adds 1 + the number of trailing one bits of ``seq`` nodes)."""
    key = (entries, nodes, outbox)
    sql = _PG_SMALL.get(key)
    if sql is None:
        parts = [
            "WITH e AS (INSERT INTO ledger_entry (seq, ref, kind, ts, data) VALUES "
            + ", ".join(["(%s, %s, %s, %s, %s)"] * entries)
            + ")"
        ]
        if nodes:
            parts.append(
                "n AS (INSERT INTO ledger_node (level, idx, hash) VALUES "
                + ", ".join(["(%s, %s, %s)"] * nodes)
                + ")"
            )
        if outbox:
            parts.append(
                "o AS (INSERT INTO ledger_outbox (seq, status) VALUES "
                + ", ".join(["(%s, 'pending')"] * entries)
                + ")"
            )
        sql = ", ".join(parts) + " " + _PG_UPDATE_HEAD
        if len(_PG_SMALL) < 256:
            _PG_SMALL[key] = sql
    return sql


def _write_rows(
    conn: Connection,
    rows: Sequence[EntryRow],
    nodes: Sequence[Node],
    outbox: bool,
    cr: CompactRange,
) -> None:
    """The entry, tree-node and (``outbox``) outbox rows of one append, and the new head.

    PostgreSQL: a bulk append COPYs its rows; a small one (the FHIR write path) sends all of
    it as ONE statement (data-modifying CTEs), so the ledger costs the write two round trips
    in all: the head lock and this. SQLite (in process): the driver's executemany.
    """
    compact = b"".join(cr.hashes)
    dialect = conn.dialect.name
    kind = _raw_kind(conn)
    if kind == "psycopg" and len(rows) >= _COPY_FROM:
        _copy_rows(conn, rows, nodes, outbox)
        conn.exec_driver_sql(_PG_UPDATE_HEAD, (cr.size, compact))
    elif kind == "psycopg" and len(rows) <= _SMALL_MAX:
        params: list[Any] = [v for r in rows for v in r]
        params += [v for n in nodes for v in n]
        if outbox:
            params += [r[0] for r in rows]
        params += [cr.size, compact]
        raw: Any = conn.connection.driver_connection
        with raw.cursor() as cur:
            cur.execute(_pg_small_append(len(rows), len(nodes), outbox), params)
    elif dialect == "postgresql":
        seqs, refs, kinds, tss, datas = (list(c) for c in zip(*rows, strict=True))
        aparams: list[Any] = [seqs, refs, kinds, tss, datas]
        aparams += [list(c) for c in zip(*nodes, strict=True)] if nodes else [[], [], []]
        if outbox:
            aparams.append(seqs)
        aparams += [cr.size, compact]
        conn.exec_driver_sql(_PG_APPEND_OUTBOX if outbox else _PG_APPEND_PLAIN, tuple(aparams))
    elif kind == "sqlite":
        db: Any = conn.connection.driver_connection
        if len(rows) == 1:
            db.execute(_SQLITE_INSERT_ENTRY, rows[0])
        else:
            db.executemany(_SQLITE_INSERT_ENTRY, rows)
        db.executemany(_SQLITE_INSERT_NODE, nodes)
        if outbox:
            db.executemany(_SQLITE_INSERT_OUTBOX, [(r[0],) for r in rows])
        db.execute(_SQLITE_UPDATE_HEAD, (cr.size, compact))
    else:  # any other SQLAlchemy dialect: the portable statements
        conn.execute(
            _INSERT_ENTRY,
            [dict(zip(("seq", "ref", "kind", "ts", "data"), r, strict=True)) for r in rows],
        )
        DbTreeStore(conn).put_nodes(nodes)
        if outbox:
            conn.execute(_INSERT_OUTBOX, [{"seq": r[0], "status": "pending"} for r in rows])
        conn.execute(_UPDATE_HEAD, {"new_size": cr.size, "new_compact": compact})


class LedgerNotFound(LookupError):
    """No ledger entry for the requested version, or a size beyond the log."""


@dataclass(frozen=True, slots=True)
class NewEntry:
    """What the write path knows about one resource version (ledger.md §1)."""

    kind: str  # Consent | DocumentReference
    ref: str  # <kind>/<id>/_history/<vid>
    event: str
    patient_ref: str
    resource: bytes | None  # the stored JSON of the version; None for a deletion
    actor: str
    ts_us: int  # commit time of the version (its meta.lastUpdated), µs since the epoch


@dataclass(frozen=True, slots=True)
class StoredEntry:
    seq: int
    ref: str
    kind: str
    ts_us: int
    data: bytes

    def entry(self) -> LedgerEntry:
        return entry_from_bytes(self.data)


@dataclass(frozen=True, slots=True)
class TreeHead:
    size: int
    root: bytes


class DbTreeStore:
    """``ledger_node`` as a :class:`~fhir_consent.ledger.merkle.TreeStore` on one connection.

    ``readonly`` stores never write: a node missing from the table (only possible after
    tampering) is recomputed for the answer but not stored, so read transactions stay reads.
    """

    __slots__ = ("_conn", "_readonly")

    def __init__(self, conn: Connection, *, readonly: bool = False) -> None:
        self._conn = conn
        self._readonly = readonly

    def get_nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        """One driver-level SELECT per 400 keys: ``(level = ? AND idx = ?) OR …``, which both
        SQLite and PostgreSQL answer from the primary key (a proof needs O(log n) keys, so
        skipping SQLAlchemy's expression building keeps it well under a millisecond)."""
        if not keys:
            return {}
        mark = "?" if self._conn.dialect.paramstyle == "qmark" else "%s"
        term = f"(level = {mark} AND idx = {mark})"
        wanted = list(dict.fromkeys(keys))
        out: dict[NodeKey, bytes] = {}
        for start in range(0, len(wanted), 400):
            chunk = wanted[start : start + 400]
            sql = "SELECT level, idx, hash FROM ledger_node WHERE " + " OR ".join(
                [term] * len(chunk)
            )
            params = tuple(v for key in chunk for v in (int(key[0]), int(key[1])))
            for level, idx, h in self._conn.exec_driver_sql(sql, params):
                out[(int(level), int(idx))] = bytes(h)
        return out

    def put_nodes(self, nodes: Sequence[Node]) -> None:
        if self._readonly or not nodes:
            return
        self._conn.execute(_INSERT_NODE, [{"level": lv, "idx": i, "hash": h} for lv, i, h in nodes])


def _us_to_datetime(us: int) -> _dt.datetime:
    return _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC) + _dt.timedelta(microseconds=us)


def _compact_from_row(size: int, blob: bytes) -> CompactRange:
    blob = bytes(blob)
    if len(blob) != size.bit_count() * HASH_SIZE:
        raise MerkleError("ledger_head.compact does not match ledger_head.size")
    return CompactRange(size, [blob[i : i + HASH_SIZE] for i in range(0, len(blob), HASH_SIZE)])


class EmbeddedLog:
    """The embedded log over the ledger tables; stateless apart from its keys and origin."""

    def __init__(
        self, keyring: KeyRing, origin: str, *, clock: _Clock, outbox: bool = True
    ) -> None:
        self.keyring = keyring
        self.origin = origin
        self.clock = clock
        self.outbox = outbox

    # -- the head ---------------------------------------------------------------------------

    def _lock_head(self, conn: Connection) -> CompactRange:
        row = _select_head_raw(conn)
        if row is None:  # an emptied database (the migration inserts the row)
            insert: Any = (
                postgresql.insert(ledger_head)
                if conn.dialect.name == "postgresql"
                else sqlite.insert(ledger_head)
            )
            conn.execute(insert.values(id=_HEAD_ID, size=0, compact=b"").on_conflict_do_nothing())
            row = _select_head_raw(conn)
            if row is None:
                raise MerkleError("ledger_head has no row")
        return _compact_from_row(int(row[0]), row[1])

    def head(self, conn: Connection) -> TreeHead:
        """The current size and root (no lock: a consistent snapshot of the transaction)."""
        row = conn.execute(
            sa.select(ledger_head.c.size, ledger_head.c.compact).where(ledger_head.c.id == _HEAD_ID)
        ).first()
        if row is None:
            return TreeHead(0, CompactRange().root())
        cr = _compact_from_row(int(row.size), row.compact)
        return TreeHead(cr.size, cr.root())

    # -- appending --------------------------------------------------------------------------

    def append(self, conn: Connection, items: Sequence[NewEntry]) -> list[LedgerEntry]:
        """Sign and append entries in the caller's transaction; return them with their ``seq``.

        One row lock, then one multi-row INSERT per table (batched commits for bulk loads).
        """
        if not items:
            return []
        # everything but the signature is done before the head lock (ledger.md §2: the lock
        # is held until the FHIR write commits, so its critical section is kept short)
        prepared = [
            prepare_entry(
                format_ts_us(item.ts_us),
                item.kind,
                item.ref,
                item.event,
                item.patient_ref,
                item.resource,
                item.actor,
                self.keyring,
            )
            for item in items
        ]
        cr = self._lock_head(conn)
        entries: list[LedgerEntry] = []
        rows: list[EntryRow] = []
        nodes: list[Node] = []
        for item, prep in zip(items, prepared, strict=True):
            seq = cr.size
            entry, data = prep.sign(seq)
            nodes.extend(cr.append(leaf_hash(data)))
            entries.append(entry)
            rows.append((seq, item.ref, item.kind, item.ts_us, data))
        _write_rows(conn, rows, nodes, self.outbox, cr)
        return entries

    # -- reading ----------------------------------------------------------------------------

    def entry_by_ref(self, conn: Connection, ref: str) -> StoredEntry:
        e = ledger_entry.c
        row = conn.execute(
            sa.select(e.seq, e.ref, e.kind, e.ts, e.data).where(e.ref == ref)
        ).first()
        if row is None:
            raise LedgerNotFound(f"no ledger entry for {ref}")
        return StoredEntry(int(row.seq), row.ref, row.kind, int(row.ts), bytes(row.data))

    def entry_by_seq(self, conn: Connection, seq: int) -> StoredEntry:
        e = ledger_entry.c
        row = conn.execute(
            sa.select(e.seq, e.ref, e.kind, e.ts, e.data).where(e.seq == seq)
        ).first()
        if row is None:
            raise LedgerNotFound(f"no ledger entry {seq}")
        return StoredEntry(int(row.seq), row.ref, row.kind, int(row.ts), bytes(row.data))

    # -- checkpoints ------------------------------------------------------------------------

    def sign(self, head: TreeHead) -> str:
        """A signed checkpoint note for ``head`` (C2SP tlog-checkpoint, signed-note)."""
        return sign_checkpoint(Checkpoint(self.origin, head.size, head.root), self.keyring.signing)

    def cached_checkpoint(self, conn: Connection, min_size: int = 0) -> tuple[int, str] | None:
        """The latest issued checkpoint ``(size, note)`` covering at least ``min_size``
        entries, or None."""
        c = ledger_checkpoint.c
        row = conn.execute(
            sa.select(c.size, c.note).where(c.size >= min_size).order_by(c.size.desc()).limit(1)
        ).first()
        return None if row is None else (int(row.size), str(row.note))

    def latest_checkpoint(self, conn: Connection) -> str:
        """The signed checkpoint at the current size: the cached one, or a new one stored now.

        Safe in any transaction; concurrent callers at the same size store one row.
        """
        head = self.head(conn)
        c = ledger_checkpoint.c
        row = conn.execute(sa.select(c.note).where(c.size == head.size)).first()
        if row is not None:
            return str(row.note)
        note = self.sign(head)
        self.store_checkpoint(conn, head, note)
        return note

    def store_checkpoint(self, conn: Connection, head: TreeHead, note: str) -> None:
        insert: Any = (
            postgresql.insert(ledger_checkpoint)
            if conn.dialect.name == "postgresql"
            else sqlite.insert(ledger_checkpoint)
        )
        conn.execute(
            insert.values(
                size=head.size, root=head.root, note=note, created_at=self.clock()
            ).on_conflict_do_nothing()
        )

    # -- proofs -----------------------------------------------------------------------------

    def inclusion(self, conn: Connection, seq: int, size: int) -> list[bytes]:
        """``PATH(seq, D[size])`` (RFC 9162 §2.1.3.1)."""
        return inclusion_proof(seq, size, DbTreeStore(conn, readonly=True))

    def consistency(self, conn: Connection, first: int, second: int) -> list[bytes]:
        """``PROOF(first, D[second])`` (RFC 9162 §2.1.4.1)."""
        return consistency_proof(first, second, DbTreeStore(conn, readonly=True))

    def root_at(self, conn: Connection, size: int) -> bytes:
        """``MTH(D[size])`` for any size up to the current one."""
        return tree_root(size, DbTreeStore(conn, readonly=True))

    def proof_document(
        self, conn: Connection, stored: StoredEntry, checkpoint_note: str, size: int
    ) -> dict[str, Any]:
        """The proof document of ledger.md §2 "Verifiable by the patient" — exactly what
        :func:`fhir_consent.ledger.verify_proof.verify_document` checks."""
        entry: Mapping[str, Any] = orjson.loads(stored.data)
        keys = self.keyring.verify_keys()
        signer = keys.get(str(entry.get("kid")))
        return make_document(
            entry,
            stored.seq,
            self.inclusion(conn, stored.seq, size),
            checkpoint_note,
            self.keyring.signing.public_bytes,
            signer.public_bytes if signer is not None else None,
        )
