"""documents: data keys, encrypted blobs and chunks, DocumentReference→Binary links

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 20:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "document_data_keys",
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("master_kid", sa.String(length=32), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_document_data_keys")),
        sa.UniqueConstraint("patient_id", name=op.f("uq_document_data_keys_patient_id")),
    )
    op.create_table(
        "document_blobs",
        sa.Column("blob_id", sa.String(length=32), nullable=False),
        sa.Column("binary_id", sa.String(length=64), nullable=True),
        sa.Column("version_id", sa.Integer(), nullable=True),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("data_key_id", sa.String(length=32), nullable=True),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=True),
        sa.Column("nonce_prefix", sa.LargeBinary(), nullable=False),
        sa.Column("content_type", sa.String(length=255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha1", sa.String(length=28), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("backend", sa.String(length=8), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("shredded", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("blob_id", name=op.f("pk_document_blobs")),
    )
    with op.batch_alter_table("document_blobs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_document_blobs_binary_id"), ["binary_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_document_blobs_data_key_id"), ["data_key_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_document_blobs_patient_id"), ["patient_id"], unique=False
        )
    op.create_table(
        "document_chunks",
        sa.Column("blob_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["blob_id"],
            ["document_blobs.blob_id"],
            name=op.f("fk_document_chunks_blob_id_document_blobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("blob_id", "seq", name=op.f("pk_document_chunks")),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Ciphertext does not compress: store it out of line without trying (TOAST).
        op.execute("ALTER TABLE document_chunks ALTER COLUMN data SET STORAGE EXTERNAL")
    op.create_table(
        "document_links",
        sa.Column("doc_id", sa.String(length=64), nullable=False),
        sa.Column("binary_id", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("doc_id", "binary_id", name=op.f("pk_document_links")),
    )
    with op.batch_alter_table("document_links", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_document_links_binary_id"), ["binary_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("document_links", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_document_links_binary_id"))
    op.drop_table("document_links")
    op.drop_table("document_chunks")
    with op.batch_alter_table("document_blobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_document_blobs_patient_id"))
        batch_op.drop_index(batch_op.f("ix_document_blobs_data_key_id"))
        batch_op.drop_index(batch_op.f("ix_document_blobs_binary_id"))
    op.drop_table("document_blobs")
    op.drop_table("document_data_keys")
