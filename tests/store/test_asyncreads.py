"""Event-loop PostgreSQL reads (:mod:`fhir_consent.store.asyncreads`): asyncpg where the URL's
settings allow it, psycopg async otherwise; both give the same rows as the SQLAlchemy path and
report a failed connection as :class:`DatabaseBusy`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import free_port

from fhir_consent.store.asyncreads import (
    AsyncpgPool,
    DatabaseBusy,
    PsycopgPool,
    async_pool_for,
    asyncpg_settings,
    dollar_params,
    server_settings,
)
from fhir_consent.store.db import Database
from fhir_consent.store.repository import PG_CURRENT_SQL, PG_VERSION_SQL, current_row


def test_placeholders_become_numbered() -> None:
    assert dollar_params("SELECT a FROM t WHERE b = %s AND c = %s") == (
        "SELECT a FROM t WHERE b = $1 AND c = $2"
    )
    with pytest.raises(ValueError):
        dollar_params("SELECT '100%%' WHERE a = %s")


def test_libpq_options_map_to_server_settings() -> None:
    assert server_settings("-csearch_path=t_1 -c statement_timeout=5s") == {
        "search_path": "t_1",
        "statement_timeout": "5s",
    }
    assert server_settings("--search-path=x") is None
    assert server_settings("-c novalue") is None


def test_settings_asyncpg_cannot_take_fall_back_to_psycopg() -> None:
    plain = {"host": "127.0.0.1", "port": "5432", "user": "u", "dbname": "d", "password": "p"}
    mapped = asyncpg_settings(plain)
    assert mapped == {
        "host": "127.0.0.1",
        "port": 5432,
        "user": "u",
        "database": "d",
        "password": "p",
        "timeout": 10.0,
    }
    assert isinstance(async_pool_for(plain, 2), AsyncpgPool)
    for extra in ({"sslmode": "verify-full"}, {"options": "-x"}, {"service": "main"}):
        assert asyncpg_settings({**plain, **extra}) is None
        assert isinstance(async_pool_for({**plain, **extra}, 2), PsycopgPool)


def _connect_kwargs(url: str) -> dict[str, Any]:
    engine = sa.create_engine(url)
    kwargs = dict(engine.dialect.create_connect_args(engine.url)[1])
    engine.dispose()
    return kwargs


def _store_one(url: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO resources (res_type, res_id, version_id, last_updated, deleted,"
                " content) VALUES ('Patient', 'p1', 3, 1700000000000000, false,"
                ' \'{"resourceType": "Patient", "id": "p1"}\')'
            )
        )
    engine.dispose()


def test_both_drivers_read_the_same_row(pg_url: str | None, db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    _store_one(db_url)
    kwargs = _connect_kwargs(db_url)

    async def read(pool: Any) -> tuple[Any, Any, Any]:
        try:
            found = await pool.fetchone(PG_CURRENT_SQL, ("Patient", "p1"))
            again = await pool.fetchone(PG_CURRENT_SQL, ("Patient", "p1"))  # prepared now
            missing = await pool.fetchone(PG_VERSION_SQL, ("Patient", "p1", 9))
            return found, again, missing
        finally:
            pool.close()

    fast = async_pool_for(kwargs, 2)
    assert isinstance(fast, AsyncpgPool)  # the test URL's search_path option maps
    a = asyncio.run(read(fast))
    b = asyncio.run(read(PsycopgPool(kwargs, 2)))
    assert a == b
    assert a[0] == a[1]
    assert a[2] is None
    row = current_row(a[0])
    assert row is not None
    assert (row.res_type, row.res_id, row.version_id, row.deleted) == ("Patient", "p1", 3, False)
    assert row.content == b'{"id": "p1", "resourceType": "Patient"}'


def test_database_uses_asyncpg_for_the_test_url(pg_url: str | None, db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    _store_one(db_url)
    db = Database(db_url, pool_size=2)

    async def read() -> Any:
        return await db.fetch_async(PG_CURRENT_SQL, ("Patient", "p1"))

    try:
        row = asyncio.run(read())
        assert row is not None and row[2] == "p1"
        assert all(isinstance(p, AsyncpgPool) for p in db._async_pools.values())
    finally:
        db.dispose()


@pytest.mark.parametrize("kind", ["asyncpg", "psycopg"])
def test_a_failed_connection_is_database_busy(kind: str) -> None:
    kwargs = {"host": "127.0.0.1", "port": free_port(), "user": "postgres", "dbname": "test"}
    pool: Any = (
        AsyncpgPool(asyncpg_settings(kwargs) or {}, 1)
        if kind == "asyncpg"
        else (PsycopgPool(kwargs, 1))
    )

    async def read() -> None:
        for _ in range(2):  # the slot is usable again after a failure
            with pytest.raises(DatabaseBusy):
                await pool.fetchone(PG_CURRENT_SQL, ("Patient", "p1"))

    asyncio.run(read())
    pool.close()
