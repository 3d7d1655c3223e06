"""SMART authorization server tables (smart_on_fhir.tables): users, clients, launch contexts,
pending authorizations, authorization codes, tokens, client-assertion ids, login failures

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 19:27:57.659683
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "smart_assertion_jtis",
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("jti", sa.String(length=256), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("issuer", "jti", name=op.f("pk_smart_assertion_jtis")),
    )
    with op.batch_alter_table("smart_assertion_jtis", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_smart_assertion_jtis_expires_at"), ["expires_at"], unique=False
        )

    op.create_table(
        "smart_auth_codes",
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("redirect_uri", sa.String(length=1024), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("code_challenge", sa.String(length=128), nullable=True),
        sa.Column("code_challenge_method", sa.String(length=16), nullable=True),
        sa.Column("nonce", sa.String(length=256), nullable=True),
        sa.Column("context", sa.Text(), nullable=False),
        sa.Column("auth_time", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("used_at", sa.BigInteger(), nullable=True),
        sa.Column("family_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("code_hash", name=op.f("pk_smart_auth_codes")),
    )
    with op.batch_alter_table("smart_auth_codes", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_smart_auth_codes_expires_at"), ["expires_at"], unique=False
        )

    op.create_table(
        "smart_auth_requests",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("browser_hash", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=True),
        sa.Column("auth_time", sa.BigInteger(), nullable=True),
        sa.Column("patient", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_smart_auth_requests")),
    )
    with op.batch_alter_table("smart_auth_requests", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_smart_auth_requests_expires_at"), ["expires_at"], unique=False
        )

    op.create_table(
        "smart_clients",
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("client_name", sa.String(length=256), nullable=False),
        sa.Column("client_type", sa.String(length=40), nullable=False),
        sa.Column("token_endpoint_auth_method", sa.String(length=40), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=True),
        sa.Column("redirect_uris", sa.Text(), nullable=False),
        sa.Column("grant_types", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("jwks", sa.Text(), nullable=True),
        sa.Column("jwks_uri", sa.String(length=1024), nullable=True),
        sa.Column("organization", sa.String(length=256), nullable=True),
        sa.Column("launch_uri", sa.String(length=1024), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("dynamic", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_smart_clients")),
    )
    op.create_table(
        "smart_launch_contexts",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("patient", sa.String(length=64), nullable=True),
        sa.Column("encounter", sa.String(length=64), nullable=True),
        sa.Column("client_id", sa.String(length=64), nullable=True),
        sa.Column("user_id", sa.String(length=64), nullable=True),
        sa.Column("need_patient_banner", sa.Boolean(), nullable=False),
        sa.Column("intent", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_smart_launch_contexts")),
    )
    op.create_table(
        "smart_login_failures",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_smart_login_failures")),
    )
    with op.batch_alter_table("smart_login_failures", schema=None) as batch_op:
        batch_op.create_index(
            "ix_smart_login_failures_key_hash_at", ["key_hash", "at"], unique=False
        )

    op.create_table(
        "smart_tokens",
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("family_id", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=True),
        sa.Column("grant_type", sa.String(length=40), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("context", sa.Text(), nullable=False),
        sa.Column("issued_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("refresh_hash", sa.String(length=64), nullable=True),
        sa.Column("refresh_expires_at", sa.BigInteger(), nullable=True),
        sa.Column("refresh_used_at", sa.BigInteger(), nullable=True),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("jti", name=op.f("pk_smart_tokens")),
        sa.UniqueConstraint("refresh_hash", name=op.f("uq_smart_tokens_refresh_hash")),
    )
    with op.batch_alter_table("smart_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_smart_tokens_client_id"), ["client_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_smart_tokens_expires_at"), ["expires_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_smart_tokens_family_id"), ["family_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_smart_tokens_user_id"), ["user_id"], unique=False)

    op.create_table(
        "smart_users",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=128), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column("fhir_user", sa.String(length=256), nullable=True),
        sa.Column("display_name", sa.String(length=256), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_smart_users")),
        sa.UniqueConstraint("username", name=op.f("uq_smart_users_username")),
    )


def downgrade() -> None:
    op.drop_table("smart_users")
    with op.batch_alter_table("smart_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_smart_tokens_user_id"))
        batch_op.drop_index(batch_op.f("ix_smart_tokens_family_id"))
        batch_op.drop_index(batch_op.f("ix_smart_tokens_expires_at"))
        batch_op.drop_index(batch_op.f("ix_smart_tokens_client_id"))

    op.drop_table("smart_tokens")
    with op.batch_alter_table("smart_login_failures", schema=None) as batch_op:
        batch_op.drop_index("ix_smart_login_failures_key_hash_at")

    op.drop_table("smart_login_failures")
    op.drop_table("smart_launch_contexts")
    op.drop_table("smart_clients")
    with op.batch_alter_table("smart_auth_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_smart_auth_requests_expires_at"))

    op.drop_table("smart_auth_requests")
    with op.batch_alter_table("smart_auth_codes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_smart_auth_codes_expires_at"))

    op.drop_table("smart_auth_codes")
    with op.batch_alter_table("smart_assertion_jtis", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_smart_assertion_jtis_expires_at"))

    op.drop_table("smart_assertion_jtis")
