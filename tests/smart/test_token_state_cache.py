"""The resource server's revocation check on SQLite remembers a token's state on the
connection (``records.cached_token_state``) only while the database has not changed: a
revocation or a deactivation committed through any other connection, or through this one,
is seen by the very next check; inside a transaction every check looks the token up. On
PostgreSQL every check looks it up."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fhir_consent.store.db import Database
from smart_on_fhir import records
from smart_on_fhir.clients import create_client
from smart_on_fhir.tables import tokens
from smart_on_fhir.users import create_user, set_user_active


@pytest.fixture
def db(smart_db: str) -> Iterator[Database]:
    database = Database(smart_db, pool_size=2)
    yield database
    database.dispose()


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The jtis :func:`records.token_state` was asked for (the uncached look-up)."""
    seen: list[str] = []
    real = records.token_state

    def counting(conn: Connection, jti: str) -> Any:
        seen.append(jti)
        return real(conn, jti)

    monkeypatch.setattr(records, "token_state", counting)
    return seen


def _token(db: Database, jti: str) -> str:
    with db.write() as conn:
        user = create_user(conn, f"u-{jti}", "long enough password", fhir_user="Patient/1", now=0)
        client = create_client(
            conn,
            client_name="C",
            client_type="public",
            redirect_uris=["https://app.example/cb"],
            scope="patient/*.rs",
            now=0,
        ).client
        conn.execute(
            tokens.insert().values(
                jti=jti,
                family_id=f"f-{jti}",
                client_id=client.client_id,
                user_id=user.id,
                grant_type="authorization_code",
                scope="patient/*.rs",
                context="{}",
                issued_at=0,
                expires_at=4_000_000_000,
            )
        )
    return f"u-{jti}"


def _revoke(conn: Connection, jti: str) -> None:
    conn.execute(tokens.update().where(tokens.c.jti == jti).values(revoked_at=1))


def test_a_change_committed_elsewhere_is_seen_by_the_next_check(
    db: Database, lookups: list[str]
) -> None:
    _token(db, "t1")
    with db.autocommit() as reader:
        for _ in range(3):
            state = records.cached_token_state(reader, "t1")
            assert state is not None and state.usable
        if db.is_sqlite:
            assert lookups == ["t1"]  # remembered while nothing changed
        else:
            assert lookups == ["t1"] * 3
        with db.write() as other:  # another connection
            _revoke(other, "t1")
        state = records.cached_token_state(reader, "t1")
        assert state is not None and state.revoked


def test_a_deactivation_is_seen_by_the_next_check(db: Database, lookups: list[str]) -> None:
    username = _token(db, "t2")
    with db.autocommit() as reader:
        assert records.cached_token_state(reader, "t2").usable  # type: ignore[union-attr]
        with db.write() as other:
            assert set_user_active(other, username, False)
        state = records.cached_token_state(reader, "t2")
        assert state is not None and not state.usable and not state.user_active


def test_a_change_made_on_the_same_connection_is_seen(db: Database, lookups: list[str]) -> None:
    _token(db, "t3")
    with db.autocommit() as conn:
        assert records.cached_token_state(conn, "t3").usable  # type: ignore[union-attr]
        _revoke(conn, "t3")  # this connection's own write (data_version does not move)
        state = records.cached_token_state(conn, "t3")
        assert state is not None and state.revoked
        assert records.cached_token_state(conn, "unknown") is None


def test_inside_a_transaction_every_check_looks_up(db: Database, lookups: list[str]) -> None:
    _token(db, "t4")
    with db.write() as conn:
        conn.execute(sa.select(tokens.c.jti).limit(1)).all()
        for _ in range(2):
            assert records.cached_token_state(conn, "t4").usable  # type: ignore[union-attr]
        _revoke(conn, "t4")
        assert records.cached_token_state(conn, "t4").revoked  # type: ignore[union-attr]
        conn.rollback()
    assert lookups == ["t4"] * 3
