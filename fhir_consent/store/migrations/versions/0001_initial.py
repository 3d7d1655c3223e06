"""initial schema: versioned resources and search indexes

Revision ID: 0001
Revises:
Create Date: 2026-11-23 19:06:31.365227
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "resource_versions",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("res_id", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("last_updated", sa.BigInteger(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column(
            "content",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_resource_versions")),
        sa.UniqueConstraint(
            "res_type",
            "res_id",
            "version_id",
            name=op.f("uq_resource_versions_res_type_res_id_version_id"),
        ),
    )
    with op.batch_alter_table("resource_versions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_resource_versions_last_updated"), ["last_updated"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_resource_versions_res_type_last_updated"),
            ["res_type", "last_updated"],
            unique=False,
        )

    op.create_table(
        "resources",
        sa.Column(
            "pk",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("res_id", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("last_updated", sa.BigInteger(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column(
            "content",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("pk", name=op.f("pk_resources")),
        sa.UniqueConstraint("res_type", "res_id", name=op.f("uq_resources_res_type_res_id")),
    )
    with op.batch_alter_table("resources", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_resources_res_type_last_updated"),
            ["res_type", "last_updated"],
            unique=False,
        )

    op.create_table(
        "idx_date",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "resource_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("low", sa.BigInteger(), nullable=False),
        sa.Column("high", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["resource_pk"],
            ["resources.pk"],
            name=op.f("fk_idx_date_resource_pk_resources"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idx_date")),
    )
    with op.batch_alter_table("idx_date", schema=None) as batch_op:
        batch_op.create_index(
            "ix_idx_date_lookup", ["res_type", "param", "low", "high"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_idx_date_resource_pk_param"), ["resource_pk", "param"], unique=False
        )

    op.create_table(
        "idx_reference",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "resource_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=64), nullable=True),
        sa.Column("target_id", sa.String(length=64), nullable=True),
        sa.Column("url", sa.String(length=1024), nullable=False),
        sa.ForeignKeyConstraint(
            ["resource_pk"],
            ["resources.pk"],
            name=op.f("fk_idx_reference_resource_pk_resources"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idx_reference")),
    )
    with op.batch_alter_table("idx_reference", schema=None) as batch_op:
        batch_op.create_index(
            "ix_idx_reference_lookup",
            ["res_type", "param", "target_id", "target_type"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_idx_reference_resource_pk_param"), ["resource_pk", "param"], unique=False
        )
        batch_op.create_index("ix_idx_reference_target", ["target_type", "target_id"], unique=False)

    op.create_table(
        "idx_string",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "resource_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=512), nullable=False),
        sa.Column("exact", sa.String(length=512), nullable=False),
        sa.ForeignKeyConstraint(
            ["resource_pk"],
            ["resources.pk"],
            name=op.f("fk_idx_string_resource_pk_resources"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idx_string")),
    )
    with op.batch_alter_table("idx_string", schema=None) as batch_op:
        batch_op.create_index("ix_idx_string_lookup", ["res_type", "param", "value"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_idx_string_resource_pk_param"), ["resource_pk", "param"], unique=False
        )

    op.create_table(
        "idx_token",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "resource_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("res_type", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("system", sa.String(length=512), nullable=True),
        sa.Column("code", sa.String(length=512), nullable=True),
        sa.Column("text", sa.String(length=512), nullable=True),
        sa.ForeignKeyConstraint(
            ["resource_pk"],
            ["resources.pk"],
            name=op.f("fk_idx_token_resource_pk_resources"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idx_token")),
    )
    with op.batch_alter_table("idx_token", schema=None) as batch_op:
        batch_op.create_index(
            "ix_idx_token_lookup", ["res_type", "param", "code", "system"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_idx_token_resource_pk_param"), ["resource_pk", "param"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("idx_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idx_token_resource_pk_param"))
        batch_op.drop_index("ix_idx_token_lookup")

    op.drop_table("idx_token")
    with op.batch_alter_table("idx_string", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idx_string_resource_pk_param"))
        batch_op.drop_index("ix_idx_string_lookup")

    op.drop_table("idx_string")
    with op.batch_alter_table("idx_reference", schema=None) as batch_op:
        batch_op.drop_index("ix_idx_reference_target")
        batch_op.drop_index(batch_op.f("ix_idx_reference_resource_pk_param"))
        batch_op.drop_index("ix_idx_reference_lookup")

    op.drop_table("idx_reference")
    with op.batch_alter_table("idx_date", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idx_date_resource_pk_param"))
        batch_op.drop_index("ix_idx_date_lookup")

    op.drop_table("idx_date")
    with op.batch_alter_table("resources", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_resources_res_type_last_updated"))

    op.drop_table("resources")
    with op.batch_alter_table("resource_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_resource_versions_res_type_last_updated"))
        batch_op.drop_index(batch_op.f("ix_resource_versions_last_updated"))

    op.drop_table("resource_versions")
