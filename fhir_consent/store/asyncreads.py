"""Single-statement PostgreSQL reads on the event loop, without a worker-thread hop.

The hot reads (``read``/``vread`` of one resource, the per-request token check) are one
fixed, parameterised statement each. They run on a few connections owned by the event loop:

* :class:`AsyncpgPool` (the default) uses `asyncpg <https://magicstack.github.io/asyncpg/>`_,
  whose protocol is implemented in Cython. Measured on this project's 2-core machine (8
  connections, 16,000 primary-key look-ups, ``docs/benchmarks.md``): ~22 µs of client CPU per
  query against ~55 µs for ``psycopg.AsyncConnection`` — on a read whose whole server cost is
  ~300 µs that difference is a tenth of the request. Everything else (SQLAlchemy, writes,
  transactions, migrations) stays on psycopg.
* :class:`PsycopgPool` is the fallback for connection settings asyncpg cannot take
  (libpq-only options such as ``sslmode=verify-full`` with certificate files, services, …).

Both take the same psycopg-style SQL (``%s`` placeholders) and hand back plain tuples, and
both raise :class:`DatabaseBusy` when the connection fails (the caller then reads in a worker
thread, where SQLAlchemy reports or reconnects). Statements are prepared once per connection
by the driver's own statement cache.
"""

from __future__ import annotations

import asyncio
import re
from functools import lru_cache
from typing import Any, Protocol

__all__ = ["AsyncReadPool", "AsyncpgPool", "DatabaseBusy", "PsycopgPool", "async_pool_for"]


class DatabaseBusy(Exception):
    """A short read could not be served on its fast path, and nothing was done: an inline
    SQLite read found the database locked, or an event-loop PostgreSQL connection failed.
    The caller retries in a worker thread, where it may wait for the lock (or SQLAlchemy
    reports or reconnects) without stalling the event loop."""


class AsyncReadPool(Protocol):
    async def fetchone(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None: ...

    def close(self) -> None: ...


#: libpq connection keywords asyncpg understands (psycopg name -> asyncpg name).
_ASYNCPG_KEYS = {
    "host": "host",
    "port": "port",
    "user": "user",
    "password": "password",
    "dbname": "database",
    "connect_timeout": "timeout",
}
_PLACEHOLDER = re.compile(r"%s")
#: Seconds to wait for a new connection unless the URL says otherwise.
_CONNECT_TIMEOUT = 10.0


@lru_cache(maxsize=256)
def dollar_params(sql: str) -> str:
    """``%s`` placeholders as asyncpg's ``$1, $2 …`` (the fixed queries passed here contain no
    other ``%``)."""
    if "%%" in sql or "%(" in sql:
        raise ValueError("only positional %s placeholders are supported")
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _m: f"${next(counter)}", sql)


def server_settings(options: str) -> dict[str, str] | None:
    """libpq's ``options`` (``-c name=value`` / ``-cname=value`` …) as asyncpg's
    ``server_settings``; None when it holds anything else."""
    found: dict[str, str] = {}
    words = options.split()
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            word, i = words[i + 1], i + 2
        elif word.startswith("-c"):
            word, i = word[2:], i + 1
        else:
            return None
        name, sep, value = word.partition("=")
        if not sep or not name:
            return None
        found[name.replace("-", "_")] = value
    return found


def asyncpg_settings(connect_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """psycopg's connection keywords as :func:`asyncpg.connect`'s, or None when one of them
    has no asyncpg equivalent."""
    mapped: dict[str, Any] = {"timeout": _CONNECT_TIMEOUT}
    for key, value in connect_kwargs.items():
        if key == "context":  # psycopg's adapters map
            continue
        if key == "options":
            settings = server_settings(str(value))
            if settings is None:
                return None
            mapped["server_settings"] = settings
        elif key in _ASYNCPG_KEYS:
            mapped[_ASYNCPG_KEYS[key]] = value
        else:
            return None
    if "port" in mapped:
        mapped["port"] = int(mapped["port"])
    mapped["timeout"] = float(mapped["timeout"])
    return mapped


def async_pool_for(connect_kwargs: dict[str, Any], size: int) -> AsyncReadPool:
    """An asyncpg pool when every setting maps onto asyncpg's, else a psycopg one."""
    mapped = asyncpg_settings(connect_kwargs)
    if mapped is not None:
        return AsyncpgPool(mapped, size)
    return PsycopgPool(connect_kwargs, size)


class _Slots:
    """A fixed number of connection slots of one event loop; a slot holds ``None`` until its
    connection is opened on first use, and again after that connection failed."""

    def __init__(self, size: int) -> None:
        self.slots: asyncio.Queue[Any] = asyncio.Queue()
        for _ in range(size):
            self.slots.put_nowait(None)
        self.open: set[Any] = set()


class AsyncpgPool(_Slots):
    """asyncpg connections of one event loop (autocommit: asyncpg runs each statement outside
    a transaction unless asked). Rows come back as tuples, as psycopg's do."""

    def __init__(self, connect_kwargs: dict[str, Any], size: int) -> None:
        super().__init__(size)
        self.kwargs = connect_kwargs
        self.loop: asyncio.AbstractEventLoop | None = None

    async def fetchone(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        import asyncpg

        self.loop = asyncio.get_running_loop()
        conn = await self.slots.get()
        try:
            if conn is None:
                conn = await asyncpg.connect(**self.kwargs)
                self.open.add(conn)
            row = await conn.fetchrow(dollar_params(sql), *params)
            return None if row is None else tuple(row)
        except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            if conn is not None:
                self.open.discard(conn)
                conn.terminate()
                conn = None
            raise DatabaseBusy() from None
        finally:
            self.slots.put_nowait(conn)

    def close(self) -> None:
        """Close every connection; from another thread the close is handed to the loop."""
        conns, self.open = list(self.open), set()
        loop = self.loop
        for conn in conns:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if loop is not None and running is not loop and loop.is_running():
                loop.call_soon_threadsafe(conn.terminate)
            else:
                try:
                    conn.terminate()
                except RuntimeError:  # its loop is closed: the socket goes with the object
                    pass


class PsycopgPool(_Slots):
    """``psycopg.AsyncConnection`` objects (autocommit) of one event loop, each with its
    cursor."""

    def __init__(self, connect_kwargs: dict[str, Any], size: int) -> None:
        super().__init__(size)
        self.kwargs = {**connect_kwargs, "autocommit": True}

    async def fetchone(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        import psycopg

        entry = await self.slots.get()
        try:
            if entry is None:
                conn = await psycopg.AsyncConnection.connect(**self.kwargs)
                entry = (conn, conn.cursor())
                self.open.add(conn)
            cursor = entry[1]
            await cursor.execute(sql, params)
            row: tuple[Any, ...] | None = await cursor.fetchone()
            return row
        except psycopg.Error:
            if entry is not None:
                self.open.discard(entry[0])
                entry[0].pgconn.finish()
                entry = None
            raise DatabaseBusy() from None
        finally:
            self.slots.put_nowait(entry)

    def close(self) -> None:
        """Close every connection (from any thread: the sockets are closed directly)."""
        for conn in list(self.open):
            conn.pgconn.finish()
        self.open.clear()
