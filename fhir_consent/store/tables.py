"""Tables: versioned resources and their search-index rows.

``resources`` holds the current version of every resource (O(1) by ``(res_type, res_id)``);
``resource_versions`` holds every version ever written (create, update, patch, delete), so
history and vread never depend on the current row. Search parameters are extracted at write
time into four narrow index tables keyed by the resource's surrogate ``pk``; searches are SQL
over these tables (never a scan in Python). Content is canonical JSON, stored as JSONB on
PostgreSQL and as text on SQLite, and handed back as the stored bytes.

Times are integers: microseconds since the Unix epoch, UTC. That keeps comparisons, keyset
cursors and implicit date ranges identical on both databases.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

__all__ = [
    "JSONContent",
    "idx_date",
    "idx_reference",
    "idx_string",
    "idx_token",
    "metadata",
    "resource_versions",
    "resources",
]

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)

#: JSON column; the engine's (de)serializers pass canonical bytes through untouched.
JSONContent = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

_TYPE = sa.String(64)
_ID = sa.String(64)

resources = sa.Table(
    "resources",
    metadata,
    sa.Column(
        "pk",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("res_type", _TYPE, nullable=False),
    sa.Column("res_id", _ID, nullable=False),
    sa.Column("version_id", sa.Integer, nullable=False),
    sa.Column("last_updated", sa.BigInteger, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),
    sa.Column("content", JSONContent, nullable=True),
    sa.UniqueConstraint("res_type", "res_id"),
    sa.Index(None, "res_type", "last_updated"),
)

resource_versions = sa.Table(
    "resource_versions",
    metadata,
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("res_type", _TYPE, nullable=False),
    sa.Column("res_id", _ID, nullable=False),
    sa.Column("version_id", sa.Integer, nullable=False),
    sa.Column("last_updated", sa.BigInteger, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("content", JSONContent, nullable=True),
    sa.UniqueConstraint("res_type", "res_id", "version_id"),
    sa.Index(None, "res_type", "last_updated"),
    sa.Index(None, "last_updated"),
)


def _index_table(
    name: str, *columns: sa.Column[object], extra: tuple[sa.Index, ...] = ()
) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        # No foreign key to resources.pk: index rows are written in the statement that
        # writes the row they index, and resources rows are never deleted; the key's
        # per-row trigger cost a sixth of a create's PostgreSQL CPU (migration 0007).
        sa.Column(
            "resource_pk",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        ),
        sa.Column("res_type", _TYPE, nullable=False),
        sa.Column("param", sa.String(64), nullable=False),
        *columns,
        sa.Index(None, "resource_pk", "param"),
        *extra,
    )


idx_token = _index_table(
    "idx_token",
    sa.Column("system", sa.String(512), nullable=True),
    sa.Column("code", sa.String(512), nullable=True),
    sa.Column("text", sa.String(512), nullable=True),
    extra=(sa.Index("ix_idx_token_lookup", "res_type", "param", "code", "system"),),
)

idx_string = _index_table(
    "idx_string",
    sa.Column("value", sa.String(512), nullable=False),
    sa.Column("exact", sa.String(512), nullable=False),
    extra=(sa.Index("ix_idx_string_lookup", "res_type", "param", "value"),),
)

idx_reference = _index_table(
    "idx_reference",
    sa.Column("target_type", _TYPE, nullable=True),
    sa.Column("target_id", _ID, nullable=True),
    sa.Column("url", sa.String(1024), nullable=False),
    extra=(
        sa.Index("ix_idx_reference_lookup", "res_type", "param", "target_id", "target_type"),
        sa.Index("ix_idx_reference_target", "target_type", "target_id"),
    ),
)

idx_date = _index_table(
    "idx_date",
    sa.Column("low", sa.BigInteger, nullable=False),
    sa.Column("high", sa.BigInteger, nullable=False),
    extra=(sa.Index("ix_idx_date_lookup", "res_type", "param", "low", "high"),),
)
