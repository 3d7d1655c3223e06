"""SQLite group commit waits ``commit_delay`` for more writes, but only while writes are
arriving concurrently (the group before held more than one, as PostgreSQL's
``commit_delay``/``commit_siblings``): a write arriving within the delay joins the group, a
lone write after a quiet spell is committed at once, and ``commit_delay=0`` never waits."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Connection

from fhir_consent.store import db as db_module
from fhir_consent.store.db import Database


@pytest.fixture
def groups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every group the writer commits."""
    sizes: list[int] = []
    real = db_module._GroupWriter._commit

    def counting(self: Any, batch: list[Any]) -> None:
        sizes.append(len(batch))
        real(self, batch)

    monkeypatch.setattr(db_module._GroupWriter, "_commit", counting)
    return sizes


def _write(conn: Connection) -> int:
    return int(conn.exec_driver_sql("SELECT 1").scalar_one())


async def _two_then_staggered(db: Database, gap: float) -> None:
    """Two writes at once (a group of two), then one write and, ``gap`` later, another."""
    assert await asyncio.gather(db.write_grouped(_write), db.write_grouped(_write)) == [1, 1]
    first = asyncio.ensure_future(db.write_grouped(_write))
    await asyncio.sleep(gap)
    assert await db.write_grouped(_write) == 1
    assert await first == 1


def _staggered(path: Path, delay: float) -> None:
    db = Database(f"sqlite:///{path}", commit_delay=delay)
    try:
        asyncio.run(_two_then_staggered(db, gap=0.05))
    finally:
        db.dispose()


def test_a_write_within_the_delay_joins_the_group(tmp_path: Path, groups: list[int]) -> None:
    _staggered(tmp_path / "a.db", delay=0.5)
    assert groups == [2, 2]


def test_no_delay_commits_each_write_as_it_comes(tmp_path: Path, groups: list[int]) -> None:
    _staggered(tmp_path / "b.db", delay=0)
    assert groups == [2, 1, 1]


def test_a_lone_write_does_not_wait(tmp_path: Path, groups: list[int]) -> None:
    db = Database(f"sqlite:///{tmp_path / 'c.db'}", commit_delay=2.0)

    async def lone() -> float:
        started = time.monotonic()
        assert await db.write_grouped(_write) == 1
        assert await db.write_grouped(_write) == 1  # sequential: still a group of one
        return time.monotonic() - started

    try:
        elapsed = asyncio.run(lone())
    finally:
        db.dispose()
    assert groups == [1, 1]
    assert elapsed < 1.0  # a wait would have cost 2 s
