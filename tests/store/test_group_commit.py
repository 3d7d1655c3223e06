"""The group commit (:meth:`Database.write_grouped`), on SQLite and PostgreSQL: writes queued
while the writer is busy share one transaction and one COMMIT, and a write that fails writes
nothing while the others of its group are committed."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fhir_consent.store.db import Database


@pytest.fixture
def db(db_url: str) -> Any:
    database = Database(db_url, pool_size=2)  # one writer thread on PostgreSQL as well
    yield database
    database.dispose()


def _insert(res_id: str, *, fail: bool = False) -> Any:
    def write(conn: Connection) -> str:
        conn.execute(
            sa.text(
                "INSERT INTO resources (res_type, res_id, version_id, last_updated, deleted,"
                " content) VALUES ('Patient', :i, 1, 1, false, '{}')"
            ),
            {"i": res_id},
        )
        if fail:
            raise ValueError("refused after writing")
        return res_id

    return write


def _both(first: Any, second: Any) -> Any:
    def write(conn: Connection) -> str:
        first(conn)
        return str(second(conn))

    return write


def _ids(db: Database) -> set[str]:
    with db.read() as conn:
        return {r[0] for r in conn.execute(sa.text("SELECT res_id FROM resources"))}


@pytest.mark.parametrize("how", ["error after writing", "failed statement"])
def test_a_failed_write_of_a_group_writes_nothing(db: Database, how: str) -> None:
    assert db.group_writes == db.is_sqlite  # requests group only on SQLite (see Database)
    commits: list[int] = []
    sa.event.listen(db.engine, "commit", lambda _conn: commits.append(1))
    release = threading.Event()

    def blocker(conn: Connection) -> str:
        release.wait(10)  # holds the writer while the next writes queue up
        return _insert("first")(conn)

    async def main() -> list[Any]:
        first = asyncio.ensure_future(db.write_grouped(blocker))
        await asyncio.sleep(0.05)
        writes = [_insert(f"p{i}", fail=i == 2 and how == "error after writing") for i in range(5)]
        if how == "failed statement":  # a duplicate key: PostgreSQL aborts the transaction
            writes[2] = _both(_insert("p2"), _insert("p0"))
        rest = [asyncio.ensure_future(db.write_grouped(w)) for w in writes]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(main())
    assert len(commits) == 2  # the blocker alone, then the five queued behind it together
    assert results[0] == "first"
    failed = ValueError if how == "error after writing" else sa.exc.IntegrityError
    assert [r if not isinstance(r, Exception) else type(r) for r in results[1:]] == [
        "p0",
        "p1",
        failed,
        "p3",
        "p4",
    ]
    assert _ids(db) == {"first", "p0", "p1", "p3", "p4"}


def test_a_write_sees_the_writes_before_it_in_its_group(db: Database) -> None:
    async def main() -> list[Any]:
        def count(conn: Connection) -> int:
            _insert(f"c{id(conn)}-{len(seen)}")(conn)
            seen.append(1)
            return int(conn.execute(sa.text("SELECT count(*) FROM resources")).scalar_one())

        seen: list[int] = []
        return await asyncio.gather(*[db.write_grouped(count) for _ in range(6)])

    assert sorted(asyncio.run(main())) == [1, 2, 3, 4, 5, 6]


def test_a_lone_failed_write_is_rolled_back(db: Database) -> None:
    with pytest.raises(ValueError):
        asyncio.run(db.write_grouped(_insert("alone", fail=True)))
    assert _ids(db) == set()
    assert asyncio.run(db.write_grouped(_insert("next"))) == "next"
    assert _ids(db) == {"next"}
