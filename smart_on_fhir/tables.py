"""The authorization server's tables, in their own :class:`sqlalchemy.MetaData`.

Migrations live with the host application (``fhir_consent``'s Alembic environment lists this
``metadata`` next to its own); nothing here creates tables at import or at run time.

Secrets are never stored: passwords are argon2 hashes, client secrets, authorization codes
and refresh tokens are SHA-256 digests (they are high-entropy random strings, so a fast hash
is enough and keeps the token endpoint cheap). Times are integer seconds since the epoch.

``smart_tokens`` has one row per issued access token (its ``jti``), with the refresh token
issued alongside it. Rows of one authorization share a ``family_id``: reusing a rotated
refresh token or an authorization code, or revoking any token, revokes the whole family
(RFC 6749 §10.4 and §4.1.2, OAuth 2.0 Security BCP §4.14.2). The resource server checks a
token with one primary-key look-up joined to its user and client
(:func:`smart_on_fhir.protect.token_state`).
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "assertion_jtis",
    "auth_codes",
    "auth_requests",
    "clients",
    "launch_contexts",
    "login_failures",
    "metadata",
    "tokens",
    "users",
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

_ID = sa.String(64)
_TIME = sa.BigInteger
_REF = sa.String(256)  # a FHIR reference or URL such as "Patient/123"

#: People who log in: patients, practitioners, related persons (SMART ``fhirUser``).
users = sa.Table(
    "smart_users",
    metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("username", sa.String(128), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(256), nullable=False),
    sa.Column("fhir_user", _REF, nullable=True),
    sa.Column("display_name", sa.String(256), nullable=True),
    sa.Column("active", sa.Boolean, nullable=False, default=True),
    sa.Column("created_at", _TIME, nullable=False),
)

#: Registered apps and systems (RFC 7591 client metadata, SMART client types).
clients = sa.Table(
    "smart_clients",
    metadata,
    sa.Column("client_id", _ID, primary_key=True),
    sa.Column("client_name", sa.String(256), nullable=False),
    sa.Column("client_type", sa.String(40), nullable=False),
    sa.Column("token_endpoint_auth_method", sa.String(40), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=True),
    sa.Column("redirect_uris", sa.Text, nullable=False),  # JSON list
    sa.Column("grant_types", sa.Text, nullable=False),  # JSON list
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("jwks", sa.Text, nullable=True),  # JSON JWK Set (public keys)
    sa.Column("jwks_uri", sa.String(1024), nullable=True),
    sa.Column("organization", _REF, nullable=True),  # "Organization/o" for clinic systems
    sa.Column("launch_uri", sa.String(1024), nullable=True),
    sa.Column("active", sa.Boolean, nullable=False, default=True),
    sa.Column("dynamic", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", _TIME, nullable=False),
)

#: EHR launch contexts, created by an administrator (SMART app-launch §"EHR launch").
launch_contexts = sa.Table(
    "smart_launch_contexts",
    metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("patient", _ID, nullable=True),
    sa.Column("encounter", _ID, nullable=True),
    sa.Column("client_id", _ID, nullable=True),
    sa.Column("user_id", _ID, nullable=True),
    sa.Column("need_patient_banner", sa.Boolean, nullable=False, default=True),
    sa.Column("intent", sa.String(128), nullable=True),
    sa.Column("created_at", _TIME, nullable=False),
    sa.Column("expires_at", _TIME, nullable=False),
)

#: An authorization request between ``/authorize`` and the redirect back to the app: login,
#: patient picker and consent screen. Bound to the browser by a cookie digest.
auth_requests = sa.Table(
    "smart_auth_requests",
    metadata,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("browser_hash", sa.String(64), nullable=False),
    sa.Column("client_id", _ID, nullable=False),
    sa.Column("params", sa.Text, nullable=False),  # JSON: the validated request parameters
    sa.Column("user_id", _ID, nullable=True),
    sa.Column("auth_time", _TIME, nullable=True),
    sa.Column("patient", _ID, nullable=True),
    sa.Column("created_at", _TIME, nullable=False),
    sa.Column("expires_at", _TIME, nullable=False, index=True),
)

#: Authorization codes (RFC 6749 §4.1.2), single use, bound to client and redirect URI.
auth_codes = sa.Table(
    "smart_auth_codes",
    metadata,
    sa.Column("code_hash", sa.String(64), primary_key=True),
    sa.Column("client_id", _ID, nullable=False),
    sa.Column("user_id", _ID, nullable=False),
    sa.Column("redirect_uri", sa.String(1024), nullable=False),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("code_challenge", sa.String(128), nullable=True),
    sa.Column("code_challenge_method", sa.String(16), nullable=True),
    sa.Column("nonce", sa.String(256), nullable=True),
    sa.Column("context", sa.Text, nullable=False),  # JSON launch context
    sa.Column("auth_time", _TIME, nullable=False),
    sa.Column("expires_at", _TIME, nullable=False, index=True),
    sa.Column("used_at", _TIME, nullable=True),
    sa.Column("family_id", _ID, nullable=True),  # tokens issued for it, revoked on reuse
)

#: One row per access token (by ``jti``) with its optional refresh token.
tokens = sa.Table(
    "smart_tokens",
    metadata,
    sa.Column("jti", _ID, primary_key=True),
    sa.Column("family_id", _ID, nullable=False, index=True),
    sa.Column("client_id", _ID, nullable=False, index=True),
    sa.Column("user_id", _ID, nullable=True, index=True),
    sa.Column("grant_type", sa.String(40), nullable=False),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("context", sa.Text, nullable=False),  # JSON launch context and identity
    sa.Column("issued_at", _TIME, nullable=False),
    sa.Column("expires_at", _TIME, nullable=False, index=True),
    sa.Column("refresh_hash", sa.String(64), nullable=True, unique=True),
    sa.Column("refresh_expires_at", _TIME, nullable=True),
    sa.Column("refresh_used_at", _TIME, nullable=True),
    sa.Column("revoked_at", _TIME, nullable=True),
)

#: ``jti`` values of client assertions already used (RFC 7523 §3 item 7), until they expire.
assertion_jtis = sa.Table(
    "smart_assertion_jtis",
    metadata,
    sa.Column("issuer", _ID, primary_key=True),
    sa.Column("jti", sa.String(256), primary_key=True),
    sa.Column("expires_at", _TIME, nullable=False, index=True),
)

#: Failed logins per (username, client IP) digest, for rate limiting across workers.
login_failures = sa.Table(
    "smart_login_failures",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("at", _TIME, nullable=False),
    sa.Index("ix_smart_login_failures_key_hash_at", "key_hash", "at"),
)
