"""consent index: every Consent denormalized for the per-request look-up (consent.md §3, §4)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "consent_index",
        sa.Column("resource_pk", _PK, autoincrement=False, nullable=False),
        sa.Column("consent_id", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("applicable", sa.Boolean(), nullable=False),
        sa.Column("reach_all", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["resource_pk"],
            ["resources.pk"],
            name=op.f("fk_consent_index_resource_pk_resources"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("resource_pk", name=op.f("pk_consent_index")),
    )
    with op.batch_alter_table("consent_index", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_consent_index_patient_id_applicable"),
            ["patient_id", "applicable"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_consent_index_applicable_reach_all"),
            ["applicable", "reach_all"],
            unique=False,
        )
    op.create_table(
        "consent_party",
        sa.Column("id", _PK, autoincrement=True, nullable=False),
        sa.Column("resource_pk", _PK, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("ref", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["resource_pk"],
            ["consent_index.resource_pk"],
            name=op.f("fk_consent_party_resource_pk_consent_index"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consent_party")),
    )
    with op.batch_alter_table("consent_party", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_consent_party_kind_ref"), ["kind", "ref"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_consent_party_resource_pk"), ["resource_pk"], unique=False
        )

    # Index the Consents already stored (a no-op on a fresh database).
    from fhir_consent.consent.index import rebuild

    rebuild(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table("consent_party", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_consent_party_resource_pk"))
        batch_op.drop_index(batch_op.f("ix_consent_party_kind_ref"))
    op.drop_table("consent_party")
    with op.batch_alter_table("consent_index", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_consent_index_applicable_reach_all"))
        batch_op.drop_index(batch_op.f("ix_consent_index_patient_id_applicable"))
    op.drop_table("consent_index")
