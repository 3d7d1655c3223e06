"""Tables of the permissions ledger, on the store's one :data:`~fhir_consent.store.tables.metadata`.

=================== ============================================================================
``ledger_head``     one row (``id = 1``): the log's size and the compact range of the RFC 9162
                    tree (one 32-byte hash per set bit of ``size``). Writers lock it
                    ``FOR UPDATE`` on PostgreSQL (SQLite serialises writers with ``BEGIN
                    IMMEDIATE``): that lock is what makes ``seq`` gap-free and strictly
                    increasing in commit order (ledger.md §2 "Atomic with the change").
``ledger_entry``    one row per entry: ``seq``, the version it records (``ref`` unique) and the
                    entry's canonical bytes (ledger.md §1) exactly as signed and hashed.
``ledger_node``     the RFC 9162 perfect-subtree hashes, ``(level, idx)`` → hash; level 0 holds
                    the leaf hashes (:class:`fhir_consent.ledger.merkle.TreeStore`).
``ledger_checkpoint`` signed checkpoints issued so far (C2SP tlog-checkpoint), one per size.
``ledger_outbox``   per entry: its external-anchoring state ``pending`` → ``sent`` (txid) →
                    ``confirmed`` (height), or ``skipped`` when no engine can carry it.
``ledger_batch``    one external transaction: the engine parameters persisted *before* it is
                    broadcast (so a re-send after a crash is the same transaction), its txid,
                    height and retry state.
``ledger_lease``    one row per engine: which relay may publish now (ledger.md §2 "Exactly
                    once on the external ledger").
=================== ============================================================================

Times are microseconds since the Unix epoch (UTC), as in the store's tables.
"""

from __future__ import annotations

import sqlalchemy as sa

from fhir_consent.store.tables import metadata

__all__ = [
    "ledger_batch",
    "ledger_checkpoint",
    "ledger_entry",
    "ledger_head",
    "ledger_lease",
    "ledger_node",
    "ledger_outbox",
    "metadata",
]

_BIG = sa.BigInteger()
_AUTO_BIG = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

ledger_head = sa.Table(
    "ledger_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("size", _BIG, nullable=False),
    sa.Column("compact", sa.LargeBinary, nullable=False),
)

ledger_entry = sa.Table(
    "ledger_entry",
    metadata,
    sa.Column("seq", _BIG, primary_key=True, autoincrement=False),
    sa.Column("ref", sa.String(160), nullable=False, unique=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("ts", _BIG, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

ledger_node = sa.Table(
    "ledger_node",
    metadata,
    sa.Column("level", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("idx", _BIG, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.LargeBinary(32), nullable=False),
)

ledger_checkpoint = sa.Table(
    "ledger_checkpoint",
    metadata,
    sa.Column("size", _BIG, primary_key=True, autoincrement=False),
    sa.Column("root", sa.LargeBinary(32), nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("created_at", _BIG, nullable=False),
)

ledger_batch = sa.Table(
    "ledger_batch",
    metadata,
    sa.Column("id", _AUTO_BIG, primary_key=True, autoincrement=True),
    sa.Column("engine", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # prepared | sent | confirmed
    sa.Column("first_seq", _BIG, nullable=False),
    sa.Column("last_seq", _BIG, nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("params", sa.Text, nullable=False),  # engine parameters, JSON
    sa.Column("txid", sa.String(128), nullable=True),
    sa.Column("height", _BIG, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", _BIG, nullable=False),
    sa.Column("last_error", sa.String(200), nullable=True),
    sa.Column("created_at", _BIG, nullable=False),
    sa.Column("sent_at", _BIG, nullable=True),
    sa.Column("confirmed_at", _BIG, nullable=True),
    sa.Index(None, "engine", "state", "id"),
    sa.Index(None, "txid"),
)

ledger_outbox = sa.Table(
    "ledger_outbox",
    metadata,
    sa.Column(
        "seq",
        _BIG,
        sa.ForeignKey("ledger_entry.seq", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("status", sa.String(16), nullable=False),  # pending|sent|confirmed|skipped
    sa.Column("batch_id", _BIG, sa.ForeignKey("ledger_batch.id"), nullable=True),
    sa.Column("txid", sa.String(128), nullable=True),
    sa.Column("height", _BIG, nullable=True),
    sa.Column("note", sa.String(200), nullable=True),
    sa.Index(None, "status", "seq"),
    sa.Index(None, "batch_id"),
)

ledger_lease = sa.Table(
    "ledger_lease",
    metadata,
    sa.Column("engine", sa.String(32), primary_key=True),
    sa.Column("holder", sa.String(128), nullable=False),
    sa.Column("epoch", _BIG, nullable=False),
    sa.Column("expires_at", _BIG, nullable=False),
)
