"""ledger: entries, Merkle nodes, checkpoints, outbox, batches, relay lease

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 19:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_AUTO_BIG = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    head = op.create_table(
        "ledger_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("compact", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_head")),
    )
    op.bulk_insert(head, [{"id": 1, "size": 0, "compact": b""}])
    op.create_table(
        "ledger_entry",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("ref", sa.String(length=160), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_ledger_entry")),
        sa.UniqueConstraint("ref", name=op.f("uq_ledger_entry_ref")),
    )
    op.create_table(
        "ledger_node",
        sa.Column("level", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(length=32), nullable=False),
        sa.PrimaryKeyConstraint("level", "idx", name=op.f("pk_ledger_node")),
    )
    op.create_table(
        "ledger_checkpoint",
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root", sa.LargeBinary(length=32), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("size", name=op.f("pk_ledger_checkpoint")),
    )
    op.create_table(
        "ledger_batch",
        sa.Column("id", _AUTO_BIG, autoincrement=True, nullable=False),
        sa.Column("engine", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("txid", sa.String(length=128), nullable=True),
        sa.Column("height", sa.BigInteger(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.BigInteger(), nullable=False),
        sa.Column("last_error", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("sent_at", sa.BigInteger(), nullable=True),
        sa.Column("confirmed_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_batch")),
    )
    with op.batch_alter_table("ledger_batch", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ledger_batch_engine_state_id"), ["engine", "state", "id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_ledger_batch_txid"), ["txid"], unique=False)
    op.create_table(
        "ledger_outbox",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("batch_id", sa.BigInteger(), nullable=True),
        sa.Column("txid", sa.String(length=128), nullable=True),
        sa.Column("height", sa.BigInteger(), nullable=True),
        sa.Column("note", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["ledger_batch.id"],
            name=op.f("fk_ledger_outbox_batch_id_ledger_batch"),
        ),
        sa.ForeignKeyConstraint(
            ["seq"],
            ["ledger_entry.seq"],
            name=op.f("fk_ledger_outbox_seq_ledger_entry"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_ledger_outbox")),
    )
    with op.batch_alter_table("ledger_outbox", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ledger_outbox_batch_id"), ["batch_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_ledger_outbox_status_seq"), ["status", "seq"], unique=False
        )
    op.create_table(
        "ledger_lease",
        sa.Column("engine", sa.String(length=32), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("engine", name=op.f("pk_ledger_lease")),
    )


def downgrade() -> None:
    op.drop_table("ledger_lease")
    with op.batch_alter_table("ledger_outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_outbox_status_seq"))
        batch_op.drop_index(batch_op.f("ix_ledger_outbox_batch_id"))
    op.drop_table("ledger_outbox")
    with op.batch_alter_table("ledger_batch", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_batch_txid"))
        batch_op.drop_index(batch_op.f("ix_ledger_batch_engine_state_id"))
    op.drop_table("ledger_batch")
    op.drop_table("ledger_checkpoint")
    op.drop_table("ledger_node")
    op.drop_table("ledger_entry")
    op.drop_table("ledger_head")
