"""Versioned resource storage on one connection (the caller owns the transaction).

Every create, update, patch and delete appends a row to ``resource_versions`` and rewrites the
current row in ``resources``; index rows are replaced in the same transaction. The store knows
nothing of HTTP, consent or ledgers: the services layer composes those around it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fhir_consent.fhir.searchparams import IndexRows
from fhir_consent.store.tables import (
    idx_date,
    idx_reference,
    idx_string,
    idx_token,
    resource_versions,
    resources,
)

__all__ = [
    "PG_CURRENT_SQL",
    "PG_VERSION_SQL",
    "ConcurrentUpdate",
    "CurrentRow",
    "Repository",
    "VersionRow",
    "current_row",
    "driver_cursor",
    "index_rows",
    "version_row",
]

_MAX_TEXT = 512
_INDEX_TABLES = (idx_token, idx_string, idx_reference, idx_date)


class ConcurrentUpdate(Exception):
    """The current row changed between read and write (another worker won the race)."""


@dataclass(frozen=True, slots=True)
class CurrentRow:
    """The current version of a resource (possibly a deletion marker)."""

    pk: int
    res_type: str
    res_id: str
    version_id: int
    last_updated: int
    deleted: bool
    content: bytes | None


@dataclass(frozen=True, slots=True)
class VersionRow:
    """One stored version, as kept in ``resource_versions``."""

    seq: int
    res_type: str
    res_id: str
    version_id: int
    last_updated: int
    deleted: bool
    method: str
    content: bytes | None


_CURRENT_COLS = (
    resources.c.pk,
    resources.c.res_type,
    resources.c.res_id,
    resources.c.version_id,
    resources.c.last_updated,
    resources.c.deleted,
    resources.c.content,
)
_VERSION_COLS = (
    resource_versions.c.seq,
    resource_versions.c.res_type,
    resource_versions.c.res_id,
    resource_versions.c.version_id,
    resource_versions.c.last_updated,
    resource_versions.c.deleted,
    resource_versions.c.method,
    resource_versions.c.content,
)

_CURRENT_SQL = (
    "SELECT pk, res_type, res_id, version_id, last_updated, deleted, content{cast} "
    "FROM resources WHERE res_type = {p} AND res_id = {p}"
)
_SQLITE_CURRENT = _CURRENT_SQL.format(cast="", p="?")
_PG_CURRENT = _CURRENT_SQL.format(cast="::text", p="%s")
_PG_CURRENT_FOR_UPDATE = _PG_CURRENT + " FOR UPDATE"
_VERSION_SQL = (
    "SELECT seq, res_type, res_id, version_id, last_updated, deleted, method, content{cast} "
    "FROM resource_versions WHERE res_type = {p} AND res_id = {p} AND version_id = {p}"
)
_SQLITE_VERSION_ROW = _VERSION_SQL.format(cast="", p="?")
_PG_VERSION = _VERSION_SQL.format(cast="::text", p="%s")


#: The driver-level queries of :meth:`Repository.current` / :meth:`Repository.version` on
#: PostgreSQL, parameters ``(res_type, res_id[, version_id])`` (for async connections).
PG_CURRENT_SQL = _PG_CURRENT
PG_VERSION_SQL = _PG_VERSION


def current_row(row: tuple[Any, ...] | None) -> CurrentRow | None:
    """A :class:`CurrentRow` from a driver row of the current-row query."""
    if row is None:
        return None
    pk, rtype, rid, vid, updated, deleted, content = row
    stored = _stored(content) if content is not None else None
    return CurrentRow(pk, rtype, rid, vid, updated, bool(deleted), stored)


def version_row(row: tuple[Any, ...] | None) -> VersionRow | None:
    """A :class:`VersionRow` from a driver row of the version query."""
    if row is None:
        return None
    seq, rtype, rid, vid, updated, deleted, method, content = row
    stored = _stored(content) if content is not None else None
    return VersionRow(seq, rtype, rid, vid, updated, bool(deleted), method, stored)


def driver_cursor(conn: Connection) -> Any:
    """A driver cursor kept with the pooled connection for fixed hot-path queries (creating a
    cursor per query costs as much as a primary-key look-up on psycopg)."""
    fairy = conn.connection
    dbapi_conn = fairy.dbapi_connection
    cached = fairy.info.get("fhir_cursor")
    if cached is not None and cached[0] is dbapi_conn:
        return cached[1]
    cursor = dbapi_conn.cursor()  # type: ignore[union-attr]
    fairy.info["fhir_cursor"] = (dbapi_conn, cursor)
    return cursor


def _driver(
    conn: Connection, sql: str, params: Any, *, many: bool = False, returning: bool = False
) -> Any:
    """Run a fixed write statement on the driver's kept cursor (SQLAlchemy's execution layer
    costs more than the statement on a create's hot path). A driver error is raised as
    SQLAlchemy raises it (``IntegrityError`` …; a lost connection is invalidated), not
    replayed: a failed statement changed nothing, and the caller's transaction is rolled
    back anyway."""
    cursor = driver_cursor(conn)
    try:
        if many and returning:  # psycopg only: one result set per parameter set
            cursor.executemany(sql, params, returning=True)
        elif many:
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
    except conn.dialect.loaded_dbapi.Error as exc:
        gone = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor)
        if gone:
            conn.invalidate()
        raise sa.exc.DBAPIError.instance(
            sql,
            params,
            exc,
            conn.dialect.loaded_dbapi.Error,
            hide_parameters=True,
            connection_invalidated=gone,
            dialect=conn.dialect,
            ismulti=many,
        ) from exc
    return cursor


def _stored(content: str | bytes) -> bytes:
    """Stored JSON as bytes (as the engine's ``json_deserializer`` hands it back)."""
    return content.encode("utf-8") if isinstance(content, str) else bytes(content)


def _visible_versions(restrict: Any) -> Any:
    visible = sa.select(resources.c.res_type, resources.c.res_id).where(restrict(resources))
    return sa.tuple_(resource_versions.c.res_type, resource_versions.c.res_id).in_(visible)


def _cut(value: str | None) -> str | None:
    return value if value is None or len(value) <= _MAX_TEXT else value[:_MAX_TEXT]


def _index_values(
    pk: int, res_type: str, index: IndexRows, out: dict[sa.Table, list[dict[str, Any]]]
) -> None:
    """Append one resource's search index rows to ``out``, by table."""
    base: dict[str, Any] = {"resource_pk": pk, "res_type": res_type}
    if index.tokens:
        out.setdefault(idx_token, []).extend(
            {
                **base,
                "param": r.param,
                "system": _cut(r.system),
                "code": _cut(r.code),
                "text": _cut(r.text),
            }
            for r in index.tokens
        )
    if index.strings:
        out.setdefault(idx_string, []).extend(
            {**base, "param": r.param, "value": _cut(r.value), "exact": _cut(r.exact)}
            for r in index.strings
        )
    if index.references:
        out.setdefault(idx_reference, []).extend(
            {
                **base,
                "param": r.param,
                "target_type": r.target_type,
                "target_id": _cut(r.target_id),
                "url": r.url[:1024],
            }
            for r in index.references
        )
    if index.dates:
        out.setdefault(idx_date, []).extend(
            {**base, "param": r.param, "low": r.low, "high": r.high} for r in index.dates
        )


class Repository:
    """Data access for versioned resources over one open transaction."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.is_postgres = conn.dialect.name == "postgresql"

    # -- reads -----------------------------------------------------------------------------

    def current(self, res_type: str, res_id: str, *, for_update: bool = False) -> CurrentRow | None:
        """The current row, locked for update on PostgreSQL when ``for_update``."""
        if self.is_postgres:
            sql = _PG_CURRENT_FOR_UPDATE if for_update else _PG_CURRENT
        else:
            sql = _SQLITE_CURRENT
        return current_row(self._fetchone(sql, (res_type, res_id)))

    def _fetchone(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """One row of a fixed single-table query, straight from the driver: SQLAlchemy's
        execution layer costs several times the look-up itself on these hot paths (read,
        the current row of every write). Driver errors are replayed through SQLAlchemy, so
        disconnects invalidate the connection and errors are wrapped as everywhere else."""
        try:
            cursor = driver_cursor(self.conn)
            cursor.execute(sql, params)
            found: tuple[Any, ...] | None = cursor.fetchone()
        except self.conn.dialect.loaded_dbapi.Error:
            result = self.conn.exec_driver_sql(sql, params).first()
            return tuple(result) if result is not None else None
        return found

    def current_many(self, res_type: str, ids: Iterable[str]) -> list[CurrentRow]:
        """Current, non-deleted rows for the given ids (unknown ids are skipped)."""
        id_list = sorted(set(ids))
        if not id_list:
            return []
        rows = self.conn.execute(
            sa.select(*_CURRENT_COLS).where(
                resources.c.res_type == res_type,
                resources.c.res_id.in_(id_list),
                resources.c.deleted.is_(False),
            )
        )
        return [CurrentRow(*r) for r in rows]

    def by_pks(self, pks: Sequence[int]) -> list[CurrentRow]:
        if not pks:
            return []
        rows = self.conn.execute(sa.select(*_CURRENT_COLS).where(resources.c.pk.in_(list(pks))))
        by_pk = {r.pk: CurrentRow(*r) for r in rows}
        return [by_pk[pk] for pk in pks if pk in by_pk]

    def version(self, res_type: str, res_id: str, version_id: int) -> VersionRow | None:
        return version_row(
            self._fetchone(
                _PG_VERSION if self.is_postgres else _SQLITE_VERSION_ROW,
                (res_type, res_id, version_id),
            )
        )

    def history(
        self,
        res_type: str | None,
        res_id: str | None,
        *,
        since: int | None,
        before_seq: int | None,
        limit: int,
        restrict: Any = None,
    ) -> list[VersionRow]:
        """Versions newest first; ``before_seq`` continues a previous page (keyset).
        ``restrict`` (a predicate over ``resources``) limits it to visible resources."""
        v = resource_versions.c
        stmt = sa.select(*_VERSION_COLS)
        if restrict is not None:
            stmt = stmt.where(_visible_versions(restrict))
        if res_type is not None:
            stmt = stmt.where(v.res_type == res_type)
        if res_id is not None:
            stmt = stmt.where(v.res_id == res_id)
        if since is not None:
            stmt = stmt.where(v.last_updated >= since)
        if before_seq is not None:
            stmt = stmt.where(v.seq < before_seq)
        stmt = stmt.order_by(v.seq.desc()).limit(limit)
        return [VersionRow(*r) for r in self.conn.execute(stmt)]

    def count_history(
        self, res_type: str | None, res_id: str | None, since: int | None, restrict: Any = None
    ) -> int:
        v = resource_versions.c
        stmt = sa.select(sa.func.count()).select_from(resource_versions)
        if restrict is not None:
            stmt = stmt.where(_visible_versions(restrict))
        if res_type is not None:
            stmt = stmt.where(v.res_type == res_type)
        if res_id is not None:
            stmt = stmt.where(v.res_id == res_id)
        if since is not None:
            stmt = stmt.where(v.last_updated >= since)
        return int(self.conn.execute(stmt).scalar_one())

    # -- writes ----------------------------------------------------------------------------

    def insert(
        self, res_type: str, res_id: str, content: bytes, now: int, index: IndexRows, method: str
    ) -> CurrentRow:
        """Create version 1 of a new resource. Raises IntegrityError if the id exists.

        PostgreSQL: one statement (data-modifying CTEs, index rows as ``unnest`` arrays), so a
        create is one round trip. SQLite: one statement per index table (``json_each``)."""
        text = content.decode("utf-8")
        conn = self.conn
        if self.is_postgres:
            params = {"t": res_type, "i": res_id, "now": now, "m": method, "c": text}
            params.update(_index_arrays(index))
            row = _driver(conn, _PG_INSERT, params).fetchone()
            return CurrentRow(int(row[0]), res_type, res_id, 1, now, False, content)
        pk = _driver(conn, _SQLITE_INSERT, (res_type, res_id, 1, now, 0, text)).lastrowid
        assert pk is not None
        _driver(conn, _SQLITE_VERSION, (res_type, res_id, 1, now, 0, method, text))
        self._write_index_sqlite(pk, res_type, index)
        return CurrentRow(pk, res_type, res_id, 1, now, False, content)

    def insert_many(
        self, items: Sequence[tuple[str, str, bytes, int, IndexRows, str]]
    ) -> list[CurrentRow]:
        """Create version 1 of several new resources, each ``(res_type, res_id, content, now,
        index, method)`` as for :meth:`insert` (same rows; for batched writers such as the
        audit trail). SQLite: one ``executemany`` per table for the whole batch. PostgreSQL:
        :meth:`insert`'s one statement per resource, sent by one ``executemany`` (psycopg
        pipelines it: one round trip for the batch instead of one per resource, and the
        writer thread gives up the GIL once per batch rather than once per statement)."""
        if self.is_postgres:
            if not items:
                return []
            batch = []
            for res_type, res_id, content, now, index, method in items:
                params = {
                    "t": res_type,
                    "i": res_id,
                    "now": now,
                    "m": method,
                    "c": content.decode("utf-8"),
                }
                params.update(_index_arrays(index))
                batch.append(params)
            cursor = _driver(self.conn, _PG_INSERT, batch, many=True, returning=True)
            pks: list[int] = []
            while True:
                pks.append(int(cursor.fetchone()[0]))
                if not cursor.nextset():
                    break
            if len(pks) != len(items):  # pragma: no cover - the driver's contract
                raise RuntimeError("executemany returned a different number of rows")
            return [
                CurrentRow(pk, rtype, rid, 1, now, False, content)
                for pk, (rtype, rid, content, now, _index, _method) in zip(pks, items, strict=True)
            ]
        out: list[CurrentRow] = []
        versions: list[tuple[Any, ...]] = []
        per_table: dict[str, list[tuple[Any, ...]]] = {}
        # the driver's cursor, as insert does: SQLAlchemy's execution layer cost more than
        # the statement (one per item here, for its pk)
        for res_type, res_id, content, now, index, method in items:
            text = content.decode("utf-8")
            pk = _driver(self.conn, _SQLITE_INSERT, (res_type, res_id, 1, now, 0, text)).lastrowid
            assert pk is not None
            versions.append((res_type, res_id, 1, now, 0, method, text))
            for table, rows in _index_tuples(pk, res_type, index):
                per_table.setdefault(table, []).extend(rows)
            out.append(CurrentRow(pk, res_type, res_id, 1, now, False, content))
        if versions:
            _driver(self.conn, _SQLITE_VERSIONS_JSON, (_json_rows(versions),))
        for table, rows in per_table.items():
            _insert_sqlite_rows(self.conn, table, rows)
        return out

    def write_version(
        self,
        current: CurrentRow,
        content: bytes | None,
        now: int,
        index: IndexRows | None,
        method: str,
    ) -> CurrentRow:
        """Write version ``current.version_id + 1``; ``content=None`` records a deletion."""
        vid = current.version_id + 1
        deleted = content is None
        now = max(now, current.last_updated + 1)  # lastUpdated strictly increases per resource
        text = content.decode("utf-8") if content is not None else None
        rtype, rid = current.res_type, current.res_id
        if self.is_postgres:
            params: dict[str, Any] = {
                "pk": current.pk,
                "old": current.version_id,
                "v": vid,
                "now": now,
                "del": deleted,
                "c": text,
                "t": rtype,
                "i": rid,
                "m": method,
            }
            params.update(_index_arrays(index or _NO_INDEX))
            if int(self.conn.exec_driver_sql(_PG_UPDATE, params).scalar_one()) != 1:
                raise ConcurrentUpdate()
        else:
            result = self.conn.exec_driver_sql(
                _SQLITE_UPDATE, (vid, now, int(deleted), text, current.pk, current.version_id)
            )
            if result.rowcount != 1:
                raise ConcurrentUpdate()
            self.conn.exec_driver_sql(
                _SQLITE_VERSION, (rtype, rid, vid, now, int(deleted), method, text)
            )
            for table in _INDEX_TABLES:
                self.conn.exec_driver_sql(
                    f"DELETE FROM {table.name} WHERE resource_pk = ?", (current.pk,)
                )
            if index is not None:
                self._write_index_sqlite(current.pk, rtype, index)
        return CurrentRow(current.pk, rtype, rid, vid, now, deleted, content)

    def _write_index_sqlite(self, pk: int, res_type: str, index: IndexRows) -> None:
        for table, rows in _index_tuples(pk, res_type, index):
            _insert_sqlite_rows(self.conn, table, rows)


_NO_INDEX = IndexRows()

_SQLITE_INSERT = (
    "INSERT INTO resources (res_type, res_id, version_id, last_updated, deleted, content) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_SQLITE_VERSION = (
    "INSERT INTO resource_versions "
    "(res_type, res_id, version_id, last_updated, deleted, method, content) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SQLITE_UPDATE = (
    "UPDATE resources SET version_id = ?, last_updated = ?, deleted = ?, content = ? "
    "WHERE pk = ? AND version_id = ?"
)
#: The columns of each index table, in the order of :func:`_index_tuples`' rows.
_INDEX_COLUMNS: dict[str, tuple[str, ...]] = {
    "idx_token": ("resource_pk", "res_type", "param", "system", "code", "text"),
    "idx_string": ("resource_pk", "res_type", "param", "value", "exact"),
    "idx_reference": ("resource_pk", "res_type", "param", "target_type", "target_id", "url"),
    "idx_date": ("resource_pk", "res_type", "param", "low", "high"),
}


def _json_insert(table: str, columns: tuple[str, ...]) -> str:
    """``INSERT INTO table (columns)`` from one JSON array of row arrays, in array order (the
    ids then keep extraction order: a type's first patient is its lowest ``idx_reference``
    id)."""
    picks = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(columns)))
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT {picks} FROM json_each(?) ORDER BY key"
    )


#: SQLite: all of a write's rows for one table in one statement, from one JSON array of row
#: arrays (``json_each``), instead of an ``executemany`` that steps once per row. Each step
#: releases and retakes the GIL, and with the event loop busy on another thread every retake
#: is a hand-off between the threads (two context switches): a Patient create wrote ~35
#: index rows, an audit batch hundreds, and those hand-offs cost both threads more than the
#: inserts themselves (docs/benchmarks.md, 2026-12-03, third round).
_SQLITE_INDEX_JSON = {table: _json_insert(table, cols) for table, cols in _INDEX_COLUMNS.items()}
_SQLITE_VERSIONS_JSON = _json_insert(
    "resource_versions",
    ("res_type", "res_id", "version_id", "last_updated", "deleted", "method", "content"),
)


def _json_rows(rows: list[tuple[Any, ...]]) -> str:
    """``rows`` as one JSON array of row arrays, for SQLite's ``json_each`` statements and
    PostgreSQL's ``json_array_elements`` (strings, integers within 64 bits and nulls, which
    both give back exactly as the driver would bind them)."""
    return orjson.dumps(rows).decode("utf-8")


def _insert_sqlite_rows(conn: Connection, table: str, rows: list[tuple[Any, ...]]) -> None:
    """Insert ``rows`` (positional, in the column order of ``_INDEX_COLUMNS[table]``) into
    an index table of SQLite: one statement for all of them."""
    if rows:
        _driver(conn, _SQLITE_INDEX_JSON[table], (_json_rows(rows),))


def _index_tuples(
    pk: int, res_type: str, index: IndexRows
) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """The index rows of ``index`` as positional tuples, per table name (in the column
    order of ``_INDEX_COLUMNS``)."""
    return [
        (
            "idx_token",
            [
                (pk, res_type, r.param, _cut(r.system), _cut(r.code), _cut(r.text))
                for r in index.tokens
            ],
        ),
        (
            "idx_string",
            [(pk, res_type, r.param, _cut(r.value), _cut(r.exact)) for r in index.strings],
        ),
        (
            "idx_reference",
            [
                (pk, res_type, r.param, r.target_type, _cut(r.target_id), r.url[:1024])
                for r in index.references
            ],
        ),
        (
            "idx_date",
            [(pk, res_type, r.param, r.low, r.high) for r in index.dates],
        ),
    ]


def index_rows(pk: int, res_type: str, index: IndexRows) -> dict[str, list[dict[str, Any]]]:
    """The rows a resource's ``index`` adds to each index table (by table name), exactly as
    :meth:`Repository.insert` writes them (for bulk loaders)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, rows in _index_tuples(pk, res_type, index):
        cols = _INDEX_COLUMNS[name]
        out[name] = [dict(zip(cols, row, strict=True)) for row in rows]
    return out


def _index_arrays(index: IndexRows) -> dict[str, str]:
    """The index rows for the PostgreSQL inserts: one JSON array of positional rows per index
    table (the columns after ``resource_pk, res_type`` of :func:`_index_tuples`, cut the same
    way), each sent as one text parameter and expanded by ``json_array_elements``. psycopg
    adapts a Python list parameter element by element in Python (the 14 ``text[]`` arrays
    this replaced cost ~280 µs of client CPU per Patient, the largest part of a create's),
    where a ``str`` is adapted in C and orjson writes the arrays in ~10 µs."""
    tables = _index_tuples(0, "", index)  # pk and type come from the statement itself
    return {
        key: _json_rows([row[2:] for row in rows])
        for key, (_name, rows) in zip(("xt", "xs", "xr", "xd"), tables, strict=True)
    }


def _pg_index_ctes(source: str) -> str:
    """CTEs inserting the index rows of :func:`_index_arrays` for the row(s) of CTE
    ``source`` (``->>`` of a JSON null is SQL NULL)."""
    return f"""
xt AS (INSERT INTO idx_token (resource_pk, res_type, param, system, code, text)
  SELECT {source}.pk, %(t)s, x->>0, x->>1, x->>2, x->>3 FROM {source},
    json_array_elements(%(xt)s::json) AS x),
xs AS (INSERT INTO idx_string (resource_pk, res_type, param, value, exact)
  SELECT {source}.pk, %(t)s, x->>0, x->>1, x->>2 FROM {source},
    json_array_elements(%(xs)s::json) AS x),
xr AS (INSERT INTO idx_reference (resource_pk, res_type, param, target_type, target_id, url)
  SELECT {source}.pk, %(t)s, x->>0, x->>1, x->>2, x->>3 FROM {source},
    json_array_elements(%(xr)s::json) AS x),
xd AS (INSERT INTO idx_date (resource_pk, res_type, param, low, high)
  SELECT {source}.pk, %(t)s, x->>0, (x->>1)::bigint, (x->>2)::bigint FROM {source},
    json_array_elements(%(xd)s::json) AS x)"""


#: One create on PostgreSQL: the current row, version 1 and every index row in one statement.
_PG_INSERT = (
    """WITH r AS (
  INSERT INTO resources (res_type, res_id, version_id, last_updated, deleted, content)
  VALUES (%(t)s, %(i)s, 1, %(now)s, false, %(c)s::jsonb) RETURNING pk, content),
v AS (INSERT INTO resource_versions
    (res_type, res_id, version_id, last_updated, deleted, method, content)
  SELECT %(t)s, %(i)s, 1, %(now)s, false, %(m)s, r.content FROM r),"""
    + _pg_index_ctes("r")
    + "\nSELECT pk FROM r"
)

#: One new version on PostgreSQL: the guarded update of the current row (0 rows when another
#: writer got there first: then nothing else happens), the version row and the index rows
#: replaced (the DELETEs see the statement's snapshot, so they never touch the new rows).
_PG_UPDATE = (
    """WITH u AS (
  UPDATE resources SET version_id = %(v)s, last_updated = %(now)s, deleted = %(del)s,
    content = %(c)s::jsonb
  WHERE pk = %(pk)s AND version_id = %(old)s RETURNING pk, content),
v AS (INSERT INTO resource_versions
    (res_type, res_id, version_id, last_updated, deleted, method, content)
  SELECT %(t)s, %(i)s, %(v)s, %(now)s, %(del)s, %(m)s, u.content FROM u),
d1 AS (DELETE FROM idx_token WHERE resource_pk IN (SELECT pk FROM u)),
d2 AS (DELETE FROM idx_string WHERE resource_pk IN (SELECT pk FROM u)),
d3 AS (DELETE FROM idx_reference WHERE resource_pk IN (SELECT pk FROM u)),
d4 AS (DELETE FROM idx_date WHERE resource_pk IN (SELECT pk FROM u)),"""
    + _pg_index_ctes("u")
    + "\nSELECT count(*) FROM u"
)
