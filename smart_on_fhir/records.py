"""Stored authorization codes and tokens, as authlib model objects, and their state changes.

* :class:`AuthCodeRecord` implements authlib's ``AuthorizationCodeMixin`` (RFC 6749 §4.1).
* :class:`TokenRecord` implements ``TokenMixin`` for refresh, introspection (RFC 7662) and
  revocation (RFC 7009).
* :func:`revoke_family` revokes every token of one authorization: used on revocation, on
  reuse of a rotated refresh token (OAuth 2.0 Security BCP, RFC 9700 §4.14.2) and on reuse
  of an authorization code (RFC 6749 §4.1.2: "SHOULD revoke … all tokens previously issued
  based on that authorization code").
* :func:`token_state` is the resource server's per-request check: one primary-key look-up
  of the token joined to its client and user (:func:`cached_token_state`: remembered on a
  SQLite connection until the database changes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from authlib.oauth2.rfc6749 import AuthorizationCodeMixin, TokenMixin
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.engine import Connection

from .tables import (
    assertion_jtis,
    auth_codes,
    auth_requests,
    clients,
    login_failures,
    tokens,
    users,
)

__all__ = [
    "AuthCodeRecord",
    "TOKEN_STATE_PG_SQL",
    "TokenRecord",
    "TokenState",
    "cached_token_state",
    "find_refresh_token",
    "find_token",
    "purge_expired",
    "revoke_family",
    "token_state",
    "token_state_of",
]


@dataclass(frozen=True, slots=True)
class AuthCodeRecord(AuthorizationCodeMixin):  # type: ignore[misc]
    """A stored authorization code (its digest, never the code)."""

    code_hash: str
    client_id: str
    user_id: str
    redirect_uri: str
    scope: str
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    context: dict[str, Any]
    auth_time: int
    expires_at: int
    used_at: int | None
    family_id: str | None

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time


def load_code(conn: Connection, code_hash: str) -> AuthCodeRecord | None:
    """The code row with this digest, used or not."""
    row = conn.execute(sa.select(auth_codes).where(auth_codes.c.code_hash == code_hash)).first()
    if row is None:
        return None
    m = row._mapping
    return AuthCodeRecord(
        code_hash=m["code_hash"],
        client_id=m["client_id"],
        user_id=m["user_id"],
        redirect_uri=m["redirect_uri"],
        scope=m["scope"],
        code_challenge=m["code_challenge"],
        code_challenge_method=m["code_challenge_method"],
        nonce=m["nonce"],
        context=json.loads(m["context"]),
        auth_time=int(m["auth_time"]),
        expires_at=int(m["expires_at"]),
        used_at=m["used_at"],
        family_id=m["family_id"],
    )


@dataclass(frozen=True, slots=True)
class TokenRecord(TokenMixin):  # type: ignore[misc]
    """One issued access token (and its refresh token), as stored.

    ``now`` is the time of the request that loaded it, for :meth:`is_expired`.
    """

    jti: str
    family_id: str
    client_id: str
    user_id: str | None
    grant_type: str
    scope: str
    context: dict[str, Any]
    issued_at: int
    expires_at: int
    refresh_expires_at: int | None
    refresh_used_at: int | None
    revoked_at: int | None
    user_active: bool
    client_active: bool
    now: int
    kind: str = "access_token"  # or "refresh_token": which of the two was presented

    # -- authlib TokenMixin ---------------------------------------------------------------

    def check_client(self, client: Any) -> bool:
        return bool(self.client_id == client.get_client_id())

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_at - self.issued_at

    def is_expired(self) -> bool:
        if self.kind == "refresh_token":
            return self.refresh_expires_at is None or self.refresh_expires_at <= self.now
        return self.expires_at <= self.now

    def is_revoked(self) -> bool:
        if self.revoked_at is not None or not self.client_active:
            return True
        if self.user_id is not None and not self.user_active:
            return True
        return self.kind == "refresh_token" and self.refresh_used_at is not None


_TOKEN_COLUMNS = (
    tokens.c.jti,
    tokens.c.family_id,
    tokens.c.client_id,
    tokens.c.user_id,
    tokens.c.grant_type,
    tokens.c.scope,
    tokens.c.context,
    tokens.c.issued_at,
    tokens.c.expires_at,
    tokens.c.refresh_expires_at,
    tokens.c.refresh_used_at,
    tokens.c.revoked_at,
    sa.func.coalesce(users.c.active, sa.false()),
    clients.c.active,
)


def _select_tokens() -> sa.Select[Any]:
    return sa.select(*_TOKEN_COLUMNS).select_from(
        tokens.join(clients, clients.c.client_id == tokens.c.client_id).outerjoin(
            users, users.c.id == tokens.c.user_id
        )
    )


def _record(row: Any, now: int, kind: str) -> TokenRecord:
    return TokenRecord(
        jti=row[0],
        family_id=row[1],
        client_id=row[2],
        user_id=row[3],
        grant_type=row[4],
        scope=row[5],
        context=json.loads(row[6]),
        issued_at=int(row[7]),
        expires_at=int(row[8]),
        refresh_expires_at=row[9],
        refresh_used_at=row[10],
        revoked_at=row[11],
        user_active=bool(row[12]),
        client_active=bool(row[13]),
        now=now,
        kind=kind,
    )


def find_token(conn: Connection, jti: str, *, now: int) -> TokenRecord | None:
    """The access token row with this ``jti``."""
    row = conn.execute(_select_tokens().where(tokens.c.jti == jti)).first()
    return _record(row, now, "access_token") if row is not None else None


def find_refresh_token(conn: Connection, refresh_hash: str, *, now: int) -> TokenRecord | None:
    """The token row whose refresh token has this digest."""
    row = conn.execute(_select_tokens().where(tokens.c.refresh_hash == refresh_hash)).first()
    return _record(row, now, "refresh_token") if row is not None else None


def revoke_family(conn: Connection, family_id: str, *, now: int) -> int:
    """Revoke every token of one authorization; returns how many rows changed."""
    result = conn.execute(
        tokens.update()
        .where(tokens.c.family_id == family_id, tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(result.rowcount or 0)


def mark_refresh_used(conn: Connection, jti: str, *, now: int) -> bool:
    """Atomically mark a refresh token used; ``False`` if it already was (a replay)."""
    result = conn.execute(
        tokens.update()
        .where(tokens.c.jti == jti, tokens.c.refresh_used_at.is_(None))
        .values(refresh_used_at=now)
    )
    return bool(result.rowcount)


@dataclass(frozen=True, slots=True)
class TokenState:
    """What the resource server needs to know about a token beyond its signature."""

    revoked: bool
    user_active: bool
    client_active: bool

    @property
    def usable(self) -> bool:
        return not self.revoked and self.user_active and self.client_active


_STATE = (
    sa.select(
        tokens.c.revoked_at,
        tokens.c.user_id,
        sa.func.coalesce(users.c.active, sa.false()),
        clients.c.active,
    )
    .select_from(
        tokens.join(clients, clients.c.client_id == tokens.c.client_id).outerjoin(
            users, users.c.id == tokens.c.user_id
        )
    )
    .where(tokens.c.jti == sa.bindparam("jti"))
)


_STATE_SQL: dict[str, tuple[str, bool]] = {}


def _state_row(conn: Connection, jti: str) -> Any:
    """The row of :data:`_STATE`, run through the driver directly (this query runs on every
    authenticated FHIR request; SQLAlchemy's execution layer costs more than the look-up).
    A driver error replays the query through SQLAlchemy, which handles disconnects."""
    name = conn.dialect.name
    compiled = _STATE_SQL.get(name)
    if compiled is None:
        stmt = _STATE.compile(dialect=conn.dialect)
        compiled = _STATE_SQL[name] = (str(stmt), conn.dialect.positional)
    sql, positional = compiled
    driver: Any = conn.connection.driver_connection
    try:
        return driver.execute(sql, (jti,) if positional else {"jti": jti}).fetchone()
    except conn.dialect.loaded_dbapi.Error:
        return conn.execute(_STATE, {"jti": jti}).first()


def token_state(conn: Connection, jti: str) -> TokenState | None:
    """One indexed query: is the token with this ``jti`` revoked, is its user still active,
    is its client still enabled? ``None`` when no such token was ever issued here."""
    return token_state_of(_state_row(conn, jti))


#: :func:`cached_token_state`'s entries per connection, at most (then it starts afresh).
_CACHE_SIZE = 4096
_CACHE_KEY = "smart_token_states"


def cached_token_state(conn: Connection, jti: str) -> TokenState | None:
    """:func:`token_state`, remembered on a SQLite connection outside a transaction for as
    long as nothing in the database has changed since: the stamp is SQLite's
    ``PRAGMA data_version`` (it changes whenever another connection, of this process or of
    any other, commits) with the connection's own ``total_changes`` (its own writes), read
    before each look-up, so a revocation or deactivation committed anywhere is seen by the
    next request as it is without a cache. Any other database, and a connection inside a
    transaction, look up each time."""
    if conn.dialect.name != "sqlite":
        return token_state(conn, jti)
    proxied = conn.connection
    driver: Any = proxied.driver_connection
    if driver.in_transaction:
        return token_state(conn, jti)
    stamp = (driver.execute("PRAGMA data_version").fetchone()[0], driver.total_changes)
    cache = proxied.info.get(_CACHE_KEY)
    if cache is None or cache[0] != stamp or len(cache[1]) >= _CACHE_SIZE:
        cache = proxied.info[_CACHE_KEY] = (stamp, {})
    states: dict[str, TokenState | None] = cache[1]
    if jti in states:
        return states[jti]
    state = states[jti] = token_state(conn, jti)
    return state


def token_state_of(row: Any) -> TokenState | None:
    """The :class:`TokenState` of a row of :data:`TOKEN_STATE_PG_SQL` (or of the query
    :func:`token_state` runs); ``None`` for no row."""
    if row is None:
        return None
    user_active = True if row[1] is None else bool(row[2])
    return TokenState(row[0] is not None, user_active, bool(row[3]))


#: :func:`token_state`'s query for PostgreSQL as driver SQL with one positional ``%s``
#: parameter (the ``jti``), for connections outside SQLAlchemy (the event loop's own).
TOKEN_STATE_PG_SQL: str = str(
    _STATE.compile(dialect=psycopg_dialect(paramstyle="format"))  # type: ignore[no-untyped-call]
)


def purge_expired(conn: Connection, *, now: int, keep: int = 24 * 3600) -> None:
    """Delete codes, tokens, pending authorizations, assertion ids and login failures that
    expired more than *keep* seconds ago (housekeeping; safe to run at any time)."""
    cutoff = now - keep
    conn.execute(auth_requests.delete().where(auth_requests.c.expires_at < now))
    conn.execute(assertion_jtis.delete().where(assertion_jtis.c.expires_at < now))
    conn.execute(login_failures.delete().where(login_failures.c.at < cutoff))
    conn.execute(auth_codes.delete().where(auth_codes.c.expires_at < cutoff))
    conn.execute(
        tokens.delete().where(
            tokens.c.expires_at < cutoff,
            sa.or_(tokens.c.refresh_expires_at.is_(None), tokens.c.refresh_expires_at < cutoff),
        )
    )
