"""Client CPU per single-row PostgreSQL look-up on an event loop: ``psycopg.AsyncConnection``
(what ``Database.fetch_async`` used before) against asyncpg (what it uses now,
``fhir_consent/store/asyncreads.py``), with the server's own current-row query on a stored
resource, 8 connections, uvloop, each query prepared once per connection by its driver.

    python bench/pg_driver.py [--url postgresql://postgres@127.0.0.1:5432/test] [-n 2000]

Each connection gets its own ``resources``-shaped temporary table with one row, so it runs
against any database it may connect to and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import psycopg
import uvloop

from fhir_consent.store.asyncreads import dollar_params
from fhir_consent.store.repository import PG_CURRENT_SQL

_TABLE = (
    "CREATE TEMPORARY TABLE resources (pk bigserial PRIMARY KEY, res_type text, res_id text,"
    " version_id int, last_updated bigint, deleted boolean, content jsonb,"
    " UNIQUE (res_type, res_id))"
)
_ROW = (
    "INSERT INTO resources (res_type, res_id, version_id, last_updated, deleted, content)"
    ' VALUES (\'Patient\', \'p1\', 1, 1, false, \'{"resourceType": "Patient", "id": "p1"}\')'
)


async def _cpu_per_query(
    opened: list[Any], work: Callable[[Any], Awaitable[None]], n: int
) -> float:
    """Fill each connection's table, run ``work`` on all of them at once, close them; client
    CPU µs per query (``n`` queries per connection)."""
    for conn in opened:  # psycopg and asyncpg connections both have ``await execute(sql)``
        await conn.execute(_TABLE)
        await conn.execute(_ROW)
    start = time.process_time()
    await asyncio.gather(*(work(c) for c in opened))
    spent = time.process_time() - start
    for conn in opened:
        await conn.close()
    return spent / (len(opened) * n) * 1e6


async def _psycopg(url: str, conns: int, n: int) -> float:
    opened = [await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(conns)]

    async def work(conn: Any) -> None:
        cur = conn.cursor()
        for _ in range(n):
            await cur.execute(PG_CURRENT_SQL, ("Patient", "p1"))
            assert await cur.fetchone() is not None

    return await _cpu_per_query(opened, work, n)


async def _asyncpg(url: str, conns: int, n: int) -> float:
    opened = [await asyncpg.connect(url) for _ in range(conns)]
    sql = dollar_params(PG_CURRENT_SQL)

    async def work(conn: Any) -> None:
        for _ in range(n):
            assert await conn.fetchrow(sql, "Patient", "p1") is not None

    return await _cpu_per_query(opened, work, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("-n", type=int, default=2000, help="queries per connection and round")
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    for round_ in range(3):
        a = uvloop.run(_psycopg(args.url, args.connections, args.n))
        b = uvloop.run(_asyncpg(args.url, args.connections, args.n))
        print(
            f"round {round_ + 1}: client CPU µs per query: psycopg async {a:.1f}, asyncpg {b:.1f}"
        )


if __name__ == "__main__":
    main()
