"""Versioned resource storage on one connection (the caller owns the transaction).

Every create, update, patch and delete appends a row to ``resource_versions`` and rewrites the
current row in ``resources``; index rows are replaced in the same transaction. The store knows
nothing of HTTP, consent or ledgers: the services layer composes those around it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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

__all__ = ["ConcurrentUpdate", "CurrentRow", "Repository", "VersionRow"]

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

_SELECT_CURRENT = sa.select(*_CURRENT_COLS).where(
    resources.c.res_type == sa.bindparam("t"), resources.c.res_id == sa.bindparam("i")
)


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
        stmt = _SELECT_CURRENT
        if for_update and self.is_postgres:
            stmt = stmt.with_for_update()
        row = self.conn.execute(stmt, {"t": res_type, "i": res_id}).first()
        return CurrentRow(*row) if row is not None else None

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
        row = self.conn.execute(
            sa.select(*_VERSION_COLS).where(
                resource_versions.c.res_type == res_type,
                resource_versions.c.res_id == res_id,
                resource_versions.c.version_id == version_id,
            )
        ).first()
        return VersionRow(*row) if row is not None else None

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
        """Create version 1 of a new resource. Raises IntegrityError if the id exists."""
        pk = self.conn.execute(
            resources.insert().returning(resources.c.pk),
            {
                "res_type": res_type,
                "res_id": res_id,
                "version_id": 1,
                "last_updated": now,
                "deleted": False,
                "content": content,
            },
        ).scalar_one()
        self._append_version(res_type, res_id, 1, now, False, method, content)
        self._write_index(pk, res_type, index)
        return CurrentRow(pk, res_type, res_id, 1, now, False, content)

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
        result = self.conn.execute(
            resources.update()
            .where(resources.c.pk == current.pk, resources.c.version_id == current.version_id)
            .values(version_id=vid, last_updated=now, deleted=deleted, content=content)
        )
        if result.rowcount != 1:
            raise ConcurrentUpdate()
        self._append_version(current.res_type, current.res_id, vid, now, deleted, method, content)
        self._clear_index(current.pk)
        if index is not None:
            self._write_index(current.pk, current.res_type, index)
        return CurrentRow(current.pk, current.res_type, current.res_id, vid, now, deleted, content)

    def _append_version(
        self,
        res_type: str,
        res_id: str,
        vid: int,
        now: int,
        deleted: bool,
        method: str,
        content: bytes | None,
    ) -> None:
        self.conn.execute(
            resource_versions.insert(),
            {
                "res_type": res_type,
                "res_id": res_id,
                "version_id": vid,
                "last_updated": now,
                "deleted": deleted,
                "method": method,
                "content": content,
            },
        )

    def _clear_index(self, pk: int) -> None:
        for table in _INDEX_TABLES:
            self.conn.execute(table.delete().where(table.c.resource_pk == pk))

    def insert_many(
        self, res_type: str, items: Sequence[tuple[str, bytes, int, IndexRows]], method: str
    ) -> int:
        """Create version 1 of many new resources of one type — ``(res_id, content, now,
        index)`` each — with one multi-row statement per table instead of several statements
        per resource (the audit trail's batches: its write transaction, and so SQLite's write
        lock, stays short). Same rows as :meth:`insert` for each item."""
        if not items:
            return 0
        pks = self.conn.execute(
            resources.insert().returning(resources.c.pk, sort_by_parameter_order=True),
            [
                {
                    "res_type": res_type,
                    "res_id": rid,
                    "version_id": 1,
                    "last_updated": now,
                    "deleted": False,
                    "content": content,
                }
                for rid, content, now, _ in items
            ],
        ).scalars().all()
        self.conn.execute(
            resource_versions.insert(),
            [
                {
                    "res_type": res_type,
                    "res_id": rid,
                    "version_id": 1,
                    "last_updated": now,
                    "deleted": False,
                    "method": method,
                    "content": content,
                }
                for rid, content, now, _ in items
            ],
        )
        rows: dict[sa.Table, list[dict[str, Any]]] = {}
        for pk, (_, _, _, index) in zip(pks, items, strict=True):
            _index_values(pk, res_type, index, rows)
        for table, values in rows.items():
            self.conn.execute(table.insert(), values)
        return len(items)

    def _write_index(self, pk: int, res_type: str, index: IndexRows) -> None:
        rows: dict[sa.Table, list[dict[str, Any]]] = {}
        _index_values(pk, res_type, index, rows)
        for table, values in rows.items():
            self.conn.execute(table.insert(), values)
