"""search index rows: no foreign key to ``resources``

Each row of ``idx_token``, ``idx_string``, ``idx_reference`` and ``idx_date`` is derived from
a stored resource and written in the same statement as that resource's row, with the ``pk``
the insert returned (``store/repository.py``); ``resources`` rows are never deleted (a FHIR
delete is a new version). The foreign key therefore never caught anything, but it cost a
referential-integrity trigger per index row: a ``SELECT … FOR KEY SHARE`` on ``resources`` for
each of the ~35 index rows of a Patient create, about a sixth of PostgreSQL's CPU per create
(866 and 906 µs with the keys, 722 and 782 µs without, interleaved; docs/benchmarks.md).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 13:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("idx_token", "idx_string", "idx_reference", "idx_date")


def _name(table: str) -> str:
    return f"fk_{table}_resource_pk_resources"


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(_name(table), type_="foreignkey")


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_foreign_key(
                _name(table), "resources", ["resource_pk"], ["pk"], ondelete="CASCADE"
            )
