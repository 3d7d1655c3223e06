"""Engine construction and transaction scopes for SQLite and PostgreSQL.

SQLite runs in WAL mode with ``synchronous=NORMAL`` (durable at every checkpoint, never
corrupt) and foreign keys on; write transactions start with ``BEGIN IMMEDIATE`` so that
concurrent writers serialize on the database lock instead of failing with "database is
locked" half-way through (SQLAlchemy's documented pysqlite recipe). PostgreSQL uses READ
COMMITTED plus ``SELECT … FOR UPDATE`` on the current row for updates. No state lives in the
process: several workers can share one PostgreSQL database.

Connections are pooled without overflow: the pool holds ``pool_size`` connections for request
work plus :data:`RESERVE` for background writers (audit trail, ledger relay) and nested use,
and :attr:`Database.limiter` bounds concurrent request work to ``pool_size``, so a burst of
requests waits for a connection instead of opening and closing extra ones (PostgreSQL forks a
backend per connection). Checkouts are not pinged; a connection idle for longer than
``ping_after`` seconds is checked once before use, and a failed query on a dropped connection
invalidates the pool (SQLAlchemy's disconnect handling).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from fhir_consent.store.asyncreads import AsyncReadPool, DatabaseBusy, async_pool_for

__all__ = [
    "RESERVE",
    "Database",
    "DatabaseBusy",
    "json_deserializer",
    "json_serializer",
    "normalize_url",
]

T = TypeVar("T")

#: Seconds a SQLite writer waits for this process's other writers (= the busy timeout).
_WRITE_WAIT = 30.0
#: SQLite result codes meaning "another connection holds the lock".
_SQLITE_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED

#: Connections kept beyond ``pool_size`` for background threads and nested checkouts.
RESERVE = 4


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
    """Owns the engine; hands out read and write connections.

    :param pool_size: connections for concurrent request work (see :attr:`limiter`)
    :param ping_after: seconds of idleness after which a connection is checked before use
    :param inline_reads: let :meth:`run_inline` run short reads on the calling thread's own
        connection (default: on SQLite, where a read is an in-process call that never waits
        on the network; PostgreSQL reads go to worker threads)
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        echo: bool = False,
        ping_after: float = 30.0,
        inline_reads: bool | None = None,
        commit_delay: float = 0.001,
    ) -> None:
        self.url = normalize_url(url)
        #: SQLite group commit: seconds a group waits for more writes (see _GroupWriter)
        self.commit_delay = commit_delay
        self.pool_size = pool_size
        kwargs: dict[str, Any] = {
            "json_serializer": json_serializer,
            "json_deserializer": json_deserializer,
            "echo": echo,
            "pool_size": pool_size + RESERVE,
            "max_overflow": 0,
            "poolclass": sa.QueuePool,
        }
        if self.url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_recycle"] = 3600
        self.engine: Engine = sa.create_engine(self.url, **kwargs)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        else:
            _ping_when_idle(self.engine, ping_after)
        self.inline_reads = self.is_sqlite if inline_reads is None else inline_reads
        #: PostgreSQL: single-query reads without a thread hop (:meth:`fetch_async`)
        self.async_reads = not self.is_sqlite
        self._async_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncReadPool] = (
            weakref.WeakKeyDictionary()
        )
        self._async_size = max(2, min(pool_size, 8))
        self._write_lock = threading.RLock() if self.is_sqlite else None
        #: SQLite: request writes share transactions (:meth:`write_grouped`). Not on
        #: PostgreSQL: there several processes (uvicorn workers, servers) write at once, and
        #: two processes' groups lock rows (a resource, the ledger head) in opposite orders
        #: where one-request transactions never would — a deadlock that aborted writes of
        #: the multi-process ledger test. SQLite's BEGIN IMMEDIATE admits one writer at a
        #: time, so its groups cannot deadlock.
        self.group_writes = self.is_sqlite
        # One writer thread: SQLite admits one writer at a time anyway.
        self._group_threads = 1
        self._group_writer: _GroupWriter | None = None
        # Connections of run_inline, one per thread, outside the pool (a thread that ends
        # must not keep a pooled connection checked out): thread id -> (thread, connection).
        self._inline_engine: Engine | None = None
        self._inline: dict[int, tuple[weakref.ref[threading.Thread], Connection]] = {}
        self._inline_lock = threading.Lock()
        self._inline_kwargs = {
            k: v for k, v in kwargs.items() if not k.startswith(("pool", "max_"))
        }

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """Bounds request work running in worker threads to ``pool_size``; one limiter per
        event loop (created on first use inside it)."""
        loop = asyncio.get_running_loop()
        limiter = self._limiters.get(loop)
        if limiter is None:
            limiter = self._limiters[loop] = anyio.CapacityLimiter(self.pool_size)
        return limiter

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: committed on success, rolled back on any exception.

        On SQLite, writers of this process queue on a lock before ``BEGIN IMMEDIATE``: the
        database admits one writer at a time anyway, and SQLite's own busy handler makes the
        others poll with sleeps of up to 100 ms, which collapses throughput under concurrent
        writes (writers in other processes still meet the busy timeout)."""
        with self._writer(), self.engine.connect() as conn:
            conn = conn.execution_options(fhir_write=True)
            with conn.begin():
                yield conn

    async def write_grouped(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a write transaction shared with other requests' writes (SQLite's
        group commit): one writer thread takes every write queued meanwhile, runs each in its
        own savepoint of one transaction (a write that fails is rolled back to its savepoint:
        it writes nothing, the others go on) and commits them together, once; each caller's
        result is handed back after that commit. ``fn`` runs in the caller's context
        (:mod:`contextvars`), on the writer thread. Only for SQLite (see :attr:`group_writes`).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        item = _GroupItem(fn, contextvars.copy_context(), loop, future)
        writer = self._group_writer
        if writer is None:
            with self._inline_lock:
                writer = self._group_writer
                if writer is None:
                    writer = self._group_writer = _GroupWriter(self, self._group_threads)
        writer.submit(item)
        return await future

    @contextmanager
    def _writer(self) -> Iterator[None]:
        if self._write_lock is None:
            yield
            return
        if not self._write_lock.acquire(timeout=_WRITE_WAIT):
            raise DatabaseBusy()  # as SQLite's busy timeout would have failed
        try:
            yield
        finally:
            self._write_lock.release()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (a consistent snapshot for multi-statement reads on
        SQLite; READ COMMITTED on PostgreSQL)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def reads(self) -> Iterator[Connection]:
        """A connection for a read-only request of several statements: on SQLite a read
        transaction (one snapshot for all of them); on PostgreSQL no transaction at all — at
        READ COMMITTED every statement takes its own snapshot inside a transaction too, so
        ``BEGIN``/``COMMIT`` would only add two round trips."""
        scope = self.read() if self.is_sqlite else self.autocommit()
        with scope as conn:
            yield conn

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A connection without a transaction, for reads that are one statement each (no
        ``BEGIN``/``COMMIT`` round trips; every statement sees the latest committed data)."""
        with self.engine.connect() as conn:
            if self.is_sqlite:  # pysqlite's own AUTOCOMMIT switch would reset to implicit BEGINs
                yield conn.execution_options(fhir_autocommit=True)
            else:
                yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def run_inline(self, fn: Callable[[Connection], T]) -> T:
        """Run a short read ``fn`` on this thread's own connection, without a transaction
        (each statement commits on its own) and without a pool checkout.

        :raises DatabaseBusy: SQLite is locked by another connection (nothing was served;
            retry with :meth:`autocommit` in a worker thread)
        """
        conn = self._inline_connection()
        try:
            return fn(conn)
        except sa.exc.OperationalError as exc:
            if getattr(exc.orig, "sqlite_errorcode", None) in _SQLITE_BUSY_CODES:
                raise DatabaseBusy() from None
            raise
        finally:
            self._release_inline(conn)

    def _inline_connection(self) -> Connection:
        entry = self._inline.get(threading.get_ident())
        if entry is not None and entry[0]() is threading.current_thread():
            conn = entry[1]
            if not conn.closed and not conn.invalidated:
                return conn
        with self._inline_lock:
            if self._inline_engine is None:
                self._inline_engine = sa.create_engine(
                    self.url, poolclass=sa.NullPool, **self._inline_kwargs
                )
                if self.is_sqlite:
                    _configure_sqlite(self._inline_engine, busy_timeout=0)
            for ident, (thread, old) in list(self._inline.items()):
                alive = thread()
                if alive is None or not alive.is_alive() or ident == threading.get_ident():
                    del self._inline[ident]
                    old.close()
            conn = self._inline_engine.connect()
            if self.is_sqlite:
                conn = conn.execution_options(fhir_autocommit=True)
            else:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            self._inline[threading.get_ident()] = (weakref.ref(threading.current_thread()), conn)
        return conn

    def _release_inline(self, conn: Connection) -> None:
        """End SQLAlchemy's (empty) transaction; forget a connection that broke."""
        try:
            conn.rollback()
        except sa.exc.SQLAlchemyError:
            pass
        if conn.invalidated or conn.closed:
            with self._inline_lock:
                entry = self._inline.get(threading.get_ident())
                if entry is not None and entry[1] is conn:
                    del self._inline[threading.get_ident()]
            conn.close()

    async def fetch_async(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """One row of a fixed query, on this event loop's own PostgreSQL connections (asyncpg,
        or psycopg async where asyncpg cannot take the URL's settings; autocommit:
        :mod:`fhir_consent.store.asyncreads`): a read that is one statement waits on the
        socket instead of hopping to a worker thread.

        :raises DatabaseBusy: the connection failed (nothing was served: retry the read in a
            worker thread, where SQLAlchemy reports or reconnects)
        """
        loop = asyncio.get_running_loop()
        pool = self._async_pools.get(loop)
        if pool is None:
            _args, kwargs = self.engine.dialect.create_connect_args(self.engine.url)
            pool = self._async_pools[loop] = async_pool_for(dict(kwargs), self._async_size)
        return await pool.fetchone(sql, params)

    def dispose(self) -> None:
        writer, self._group_writer = self._group_writer, None
        if writer is not None:
            writer.stop()
        for pool in list(self._async_pools.values()):
            pool.close()
        self._async_pools.clear()
        with self._inline_lock:
            for _thread, conn in self._inline.values():
                conn.close()
            self._inline.clear()
            if self._inline_engine is not None:
                self._inline_engine.dispose()
        self.engine.dispose()


@dataclass(slots=True)
class _GroupItem:
    fn: Callable[[Connection], Any]
    context: contextvars.Context
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = None


def _settle(items: list[_GroupItem]) -> None:
    """On the event loop: hand each caller its result or error (unless it gave up)."""
    for item in items:
        if item.future.done():
            continue
        if item.error is not None:
            item.future.set_exception(item.error)
        else:
            item.future.set_result(item.result)


class _GroupWriter:
    """The writer threads of :meth:`Database.write_grouped`: each takes every queued write, runs
    each in a savepoint of one transaction, commits once, then settles the callers' futures
    (on their event loops)."""

    #: most writes in one transaction (bounds the latency a batch adds to its first writer)
    MAX_BATCH = 32

    def __init__(self, db: Database, threads: int = 1) -> None:
        self.db = db
        self.queue: deque[_GroupItem] = deque()
        self.wake = threading.Condition(threading.Lock())
        self.stopping = False
        self.threads = [
            threading.Thread(target=self._run, name=f"fhir-group-writer-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self.threads:
            thread.start()

    def submit(self, item: _GroupItem) -> None:
        with self.wake:
            if self.stopping:
                raise RuntimeError("the database is closed")
            self.queue.append(item)
            self.wake.notify()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(timeout=_WRITE_WAIT)

    def _run(self) -> None:
        last = 1
        while True:
            with self.wake:
                while not self.queue and not self.stopping:
                    self.wake.wait()
                if not self.queue:
                    return
                # Wait up to db.commit_delay for more writes when the group before held more
                # than one (writes are arriving concurrently): PostgreSQL's commit_delay with
                # commit_siblings. A commit's own cost (every page it dirtied written to the
                # WAL, a system call each) is shared by its group: 32 creates at once cost
                # ~1.0 ms of CPU each, 4 at once ~1.4 ms (bench/create_cpu.py --concurrency);
                # over HTTP, 1 ms took creates from ~600 to ~700-750/s. A lone write never
                # waits.
                delay = self.db.commit_delay
                if last > 1 and delay > 0 and not self.stopping:
                    until = time.monotonic() + delay
                    while len(self.queue) < self.MAX_BATCH and not self.stopping:
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        self.wake.wait(left)
                n = min(len(self.queue), self.MAX_BATCH)
                batch = [self.queue.popleft() for _ in range(n)]
                last = n
            try:
                self._commit(batch)
            finally:
                by_loop: dict[asyncio.AbstractEventLoop, list[_GroupItem]] = {}
                for item in batch:
                    by_loop.setdefault(item.loop, []).append(item)
                for loop, items in by_loop.items():
                    try:
                        loop.call_soon_threadsafe(_settle, items)
                    except RuntimeError:  # that event loop is closed: nobody waits any more
                        pass

    def _commit(self, batch: list[_GroupItem]) -> None:
        try:
            with self.db.write() as conn:
                if len(batch) == 1:  # alone: the transaction is its savepoint
                    item = batch[0]
                    item.result = item.context.run(item.fn, conn)
                    return
                cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                failure = conn.dialect.loaded_dbapi.Error
                for i, item in enumerate(batch):
                    # A savepoint per write, never released (RELEASE would be one more round
                    # trip each; COMMIT ends them all): a write that fails is rolled back to
                    # it, which undoes exactly that write.
                    name = f"fhir_group_{i}"
                    try:
                        cursor.execute(f"SAVEPOINT {name}")
                    except failure:
                        conn.exec_driver_sql(f"SAVEPOINT {name}")  # raises SQLAlchemy's error
                    try:
                        item.result = item.context.run(item.fn, conn)
                    except Exception as exc:  # noqa: BLE001 - handed to its caller
                        item.error = exc
                        item.result = None
                        conn.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {name}")
        except BaseException as exc:  # noqa: BLE001 - the commit (or the batch) failed
            for item in batch:
                if item.error is None:
                    item.error = exc
                    item.result = None
            if not isinstance(exc, Exception):
                raise


def _ping_when_idle(engine: Engine, ping_after: float) -> None:
    """Check a connection before use only when it sat idle in the pool for a while (instead
    of ``pool_pre_ping``, which costs a round trip on every checkout)."""

    @sa.event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < ping_after:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception:  # noqa: BLE001 - any failure means "reconnect"
            alive = False
        if not alive:
            raise sa.exc.DisconnectionError()  # the pool retries with a fresh connection


def _configure_sqlite(engine: Engine, busy_timeout: int = 30000) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout)}")
        # Fewer, larger checkpoints (each one fsyncs) and a page cache that holds the hot
        # index pages of a write; reads of the first 16 MiB of the file (the schema and the
        # hot upper B-tree pages) go through the OS page cache by mmap. Not more: every page
        # a read touches through the map counts in the process's RSS, and a 200 MB document
        # stored in the database would then cost 200 MB of it on download.
        cur.execute("PRAGMA wal_autocheckpoint=4000")
        cur.execute("PRAGMA cache_size=-16384")
        cur.execute("PRAGMA mmap_size=16777216")
        cur.execute("PRAGMA temp_store=MEMORY")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get("fhir_autocommit", False):
            return  # no transaction: each statement commits on its own
        write = options.get("fhir_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
