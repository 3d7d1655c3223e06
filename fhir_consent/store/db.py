"""Engine construction and transaction scopes for SQLite and PostgreSQL.

SQLite runs in WAL mode with foreign keys on; write transactions start with ``BEGIN
IMMEDIATE`` so that concurrent writers serialize on the database lock instead of failing
with "database is locked" half-way through (SQLAlchemy's documented pysqlite recipe).
PostgreSQL uses READ COMMITTED plus ``SELECT … FOR UPDATE`` on the current row for updates.
No state lives in the process: several workers can share one PostgreSQL database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

__all__ = ["Database", "json_deserializer", "json_serializer", "normalize_url"]


def json_serializer(value: Any) -> str:
    """Bind canonical JSON bytes as-is; serialize anything else with orjson."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8")
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode("utf-8")


def json_deserializer(value: str | bytes) -> bytes:
    """Hand stored JSON back as bytes, unparsed: reads serve the stored bytes."""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def normalize_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` and pick the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Database:
    """Owns the engine; hands out read and write connections."""

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        self.url = normalize_url(url)
        kwargs: dict[str, Any] = {
            "json_serializer": json_serializer,
            "json_deserializer": json_deserializer,
            "echo": echo,
        }
        if self.url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            kwargs["pool_size"] = pool_size
            kwargs["poolclass"] = sa.QueuePool
        else:
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = sa.create_engine(self.url, **kwargs)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        if self.is_sqlite:
            _configure_sqlite(self.engine)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: committed on success, rolled back on any exception."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(fhir_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (a consistent snapshot for multi-statement reads)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        self.engine.dispose()


def _configure_sqlite(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("fhir_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
