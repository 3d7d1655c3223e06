"""``Repository.insert_many`` (the audit trail's batched writer) writes exactly the rows that one
``Repository.insert`` per resource writes, on SQLite and on PostgreSQL (where the batch is one
pipelined ``executemany``), and a batch with a failing item writes nothing."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from conftest import load_example

from fhir_consent.fhir.searchparams import extract
from fhir_consent.store.repository import Repository
from fhir_consent.store.tables import idx_date, idx_reference, idx_string, idx_token

EXAMPLES = ("AuditEvent-example-disclosure", "AuditEvent-example-error", "AuditEvent-example-login")
_INDEX_TABLES = (idx_token, idx_string, idx_reference, idx_date)


def _items(prefix: str) -> list[tuple[str, str, bytes, int, Any, str]]:
    out = []
    for n, name in enumerate(EXAMPLES):
        resource = load_example(name)
        resource["id"] = f"{prefix}{n}"
        content = orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)
        out.append(
            (
                "AuditEvent",
                f"{prefix}{n}",
                content,
                1_700_000_000_000_000 + n,
                extract(resource),
                "POST",
            )
        )
    return out


def _rows_of(conn: sa.Connection, pks: dict[int, str]) -> list[tuple[Any, ...]]:
    """Every index row of these resources, with the pk replaced by the id's position."""
    found = []
    for table in _INDEX_TABLES:
        cols = [c for c in table.c if c.name not in ("id",)]
        for row in conn.execute(sa.select(*cols).where(table.c.resource_pk.in_(list(pks)))):
            values = dict(row._mapping)
            values["resource_pk"] = pks[values["resource_pk"]][-1]  # position in the batch
            found.append((table.name, tuple(sorted(values.items(), key=lambda kv: kv[0]))))
    return sorted(found, key=repr)


def test_batched_rows_equal_one_insert_each(db_url: str) -> None:
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            single = [Repository(conn).insert(*item) for item in _items("s")]
            batched = Repository(conn).insert_many(_items("b"))
        assert [r.res_id for r in batched] == ["b0", "b1", "b2"]
        assert len({r.pk for r in batched} | {r.pk for r in single}) == 6
        with engine.connect() as conn:
            for row in batched:
                current = Repository(conn).current("AuditEvent", row.res_id)
                assert current is not None and current.pk == row.pk
                version = Repository(conn).version("AuditEvent", row.res_id, 1)
                assert version is not None and version.method == "POST"
            a = _rows_of(conn, {r.pk: r.res_id for r in single})
            b = _rows_of(conn, {r.pk: r.res_id for r in batched})
        assert a and a == b
    finally:
        engine.dispose()


def test_a_failing_item_fails_the_batch_and_writes_nothing(db_url: str) -> None:
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            Repository(conn).insert(*_items("d")[0])
        batch = _items("e")[:2] + [_items("d")[0]]  # the third id exists already
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            Repository(conn).insert_many(batch)
        with engine.connect() as conn:
            assert Repository(conn).current("AuditEvent", "e0") is None
            assert Repository(conn).current("AuditEvent", "e1") is None
            assert Repository(conn).insert_many([]) == []
    finally:
        engine.dispose()


def _sorted(rows: Any) -> list[tuple[Any, ...]]:
    return sorted((tuple(r) for r in rows), key=repr)


def _cut(value: str | None) -> str | None:
    return None if value is None else value[:512]


def _stored_rows(conn: sa.Connection, table: sa.Table, pk: int) -> list[tuple[Any, ...]]:
    cols = [c for c in table.c if c.name not in ("id", "resource_pk", "res_type")]
    return _sorted(conn.execute(sa.select(*cols).where(table.c.resource_pk == pk)))


TRICKY = [
    "",
    "a'b\"c",
    "back\\slash",
    "tab\tnew\nline",
    "ünïcødé",
    "😀 emoji",
    "[1, 2]",
    "null",
    "x" * 600,
]


def test_index_rows_are_stored_exactly_as_extracted(db_url: str) -> None:
    """Whatever the driver path (SQLite: one statement per table from a JSON array of rows;
    PostgreSQL: JSON arrays expanded in the create statement), the stored index rows are the
    extracted values, cut at 512 characters: quotes, escapes, non-ASCII, JSON-looking text,
    empty strings and nulls alike; the content and version too."""
    from fhir_consent.fhir.searchparams import DateRow, IndexRows, ReferenceRow, StringRow, TokenRow

    index = IndexRows(
        tokens=[
            TokenRow("code", None if i % 2 else "sys", v, v or None) for i, v in enumerate(TRICKY)
        ],
        strings=[StringRow("name", v, v.upper()) for v in TRICKY],
        references=[
            ReferenceRow("subject", "Patient", f"p{i}", f"Patient/{v}")
            for i, v in enumerate(TRICKY)
        ],
        dates=[DateRow("date", -(2**62), 2**62), DateRow("date", 0, 1)],
    )
    content = orjson.dumps({"resourceType": "Basic", "id": "tricky", "note": TRICKY})
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            single = Repository(conn).insert("Basic", "tricky", content, 7, index, "PUT")
            (batched,) = Repository(conn).insert_many(
                [("Basic", "tricky-b", content, 7, index, "PUT")]
            )
        with engine.connect() as conn:
            for row in (single, batched):
                got = {t.name: _stored_rows(conn, t, row.pk) for t in _INDEX_TABLES}
                assert got["idx_token"] == _sorted(
                    ("code", r.system, _cut(r.code), _cut(r.text)) for r in index.tokens
                )
                assert got["idx_string"] == _sorted(
                    ("name", _cut(r.value), _cut(r.exact)) for r in index.strings
                )
                assert got["idx_reference"] == _sorted(
                    ("subject", "Patient", r.target_id, r.url) for r in index.references
                )
                assert got["idx_date"] == _sorted(("date", r.low, r.high) for r in index.dates)
                in_id_order = conn.execute(
                    sa.select(idx_reference.c.target_id)
                    .where(idx_reference.c.resource_pk == row.pk)
                    .order_by(idx_reference.c.id)
                ).scalars()
                # extraction order: a type's first patient is its lowest reference id
                assert list(in_id_order) == [r.target_id for r in index.references]
                version = Repository(conn).version("Basic", row.res_id, 1)
                assert version is not None and version.method == "PUT"
                assert version.content is not None
                assert orjson.loads(version.content) == orjson.loads(content)
                if conn.dialect.name == "sqlite":  # PostgreSQL's jsonb keeps no key order
                    assert version.content == content
    finally:
        engine.dispose()
