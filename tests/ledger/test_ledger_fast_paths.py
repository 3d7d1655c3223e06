"""The ledger's faster paths give exactly the bytes of the reference ones (issue 5 append
throughput): :func:`fhir_consent.crypto.canonical_json_text` vs :func:`canonical_json`, and the
embedded log's bulk append (COPY on PostgreSQL, executemany on SQLite) vs single appends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_testkit import TS, consent_json

from fhir_consent.crypto import KeyRing, canonical_json, canonical_json_text
from fhir_consent.ledger.embedded import EmbeddedLog, NewEntry
from fhir_consent.ledger.entry import (
    _canonical_resource,
    build_entry,
    build_entry_bytes,
    check_subject,
    entry_bytes,
    format_ts,
    format_ts_us,
    open_sealed,
    prepare_entry,
    verify_entry,
)
from fhir_consent.ledger.tables import ledger_entry, ledger_node, ledger_outbox
from fhir_consent.ledger.verify import verify_ledger
from fhir_consent.store.db import Database
from fhir_consent.store.migrate import upgrade

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.sampled_from(['a"b', "1.5", "x\\y", "1e5", "é", "\u2028", "1234567890123456"])
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text() | st.sampled_from(["1.5", "é", "k"]), inner, max_size=5)
    ),
    max_leaves=30,
)


def _reference(text: bytes) -> bytes | None:
    try:
        return canonical_json(orjson.loads(text))
    except ValueError:
        return None


@settings(max_examples=500, deadline=None)
@given(_json)
def test_canonical_json_text_equals_canonical_json(value: Any) -> None:
    try:
        text = json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates cannot be JSON text
    expected = _reference(text)
    if expected is None:
        with pytest.raises(ValueError):
            canonical_json_text(text)
        return
    parsed, out = canonical_json_text(text)
    assert out == expected
    assert parsed == orjson.loads(text)


@settings(max_examples=500, deadline=None)
@given(_json)
def test_ledger_resource_canonicalisation_equals_canonical_json(value: Any) -> None:
    """The entry builder's own cheaper test (ledger/entry.py ``_canonical_resource``)."""
    try:
        text = json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return
    expected = _reference(text)
    if expected is None:
        with pytest.raises(ValueError):
            _canonical_resource(text)
        return
    parsed, out = _canonical_resource(text)
    assert out == expected
    assert parsed == orjson.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":1.0}',
        b'{"t":"12:00:00.5","a":[1,2.5]}',
        b'{"a":[0.5]}',
        b'{"a":-1e-7}',
        b'{"a":[1,12345678901234567]}',
        b"1.5",
        b'"x"',
        b'{"b":[1e2,2]}',
        b'{"\xc3\xa9":1,"z":1}',
        b'{"n":9007199254740993}',
        b"[[[" * 40 + b"]]]" * 40,
    ],
)
def test_canonical_json_text_slow_cases(text: bytes) -> None:
    expected = _reference(text)
    if expected is None:
        with pytest.raises(ValueError):
            canonical_json_text(text)
        with pytest.raises(ValueError):
            _canonical_resource(text)
    else:
        assert canonical_json_text(text)[1] == expected
        assert _canonical_resource(text)[1] == expected


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 253_402_300_799_999_999))
def test_format_ts_us_equals_format_ts(us: int) -> None:
    import datetime as dt

    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    assert format_ts_us(us) == format_ts(epoch + dt.timedelta(microseconds=us))


@pytest.mark.parametrize("bad", [-1, 253_402_300_800_000_000, True, 1.5])
def test_format_ts_us_rejects_out_of_range(bad: Any) -> None:
    with pytest.raises(ValueError):
        format_ts_us(bad)


def test_prepared_entries_verify_open_and_name_the_patient(tmp_path: Path) -> None:
    """Sealed before the seq is known, signed after: the same checks as any entry."""
    ring = KeyRing.generate(tmp_path / "keys")
    prep = prepare_entry(
        format_ts_us(1_714_564_800_000_001),
        "Consent",
        "Consent/c1/_history/1",
        "proposed",
        "Patient/p1",
        consent_json(),
        "Organization/o2",
        ring,
    )
    first, data = prep.sign(7)
    second, _ = prep.sign(8)  # the same sealed box, another position: both signed
    for entry in (first, second):
        verify_entry(entry, ring.verify_keys())
        check_subject(entry, "Patient/p1", ring.pseudonym_keys())
        assert open_sealed(entry, ring.rms_keypairs())["actor"] == "Organization/o2"
    assert data == entry_bytes(first) and (first.seq, second.seq) == (7, 8)
    assert first.subject == ring.pseudonym("Patient/p1")
    with pytest.raises(ValueError):
        prep.sign(-1)
    with pytest.raises(ValueError):
        prep.sign(True)
    # a rotated key ring signs with its new key at once (no stale cached key material)
    rotated = KeyRing.rotate_signing_key(tmp_path / "keys")
    entry, _ = build_entry_bytes(
        0,
        TS,
        "Consent",
        "Consent/c1/_history/1",
        "proposed",
        "Patient/p1",
        consent_json(),
        "x",
        rotated,
    )
    assert entry.kid == rotated.signing.key_id != ring.signing.key_id
    verify_entry(entry, rotated.verify_keys())


def test_build_entry_bytes_are_the_canonical_bytes(tmp_path: Path) -> None:
    import datetime as dt

    ring = KeyRing.generate(tmp_path / "keys")
    ts = dt.datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=dt.UTC)
    args = (3, ts, "Consent", "Consent/c1/_history/1", "proposed", "Patient/p1")
    entry, data = build_entry_bytes(*args, consent_json(), "Organization/o2", ring)
    assert data == entry_bytes(entry)
    verify_entry(entry, ring.verify_keys())
    deleted = build_entry(*args[:4], "deleted", "Patient/p1", None, "x", ring)
    assert (
        deleted.resource_sha256
        == "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b"
    )


def _items(n: int, start: int) -> list[NewEntry]:
    out = []
    for i in range(start, start + n):
        body = orjson.loads(consent_json(f"c{i}"))
        out.append(
            NewEntry(
                kind="Consent",
                ref=f"Consent/c{i}/_history/1",
                event="proposed",
                patient_ref=f"Patient/p{i % 7}",
                resource=orjson.dumps(body),
                actor="Organization/o2",
                ts_us=1_714_564_800_000_000 + i,
            )
        )
    return out


def test_bulk_and_single_appends_build_the_same_log(db_url: str, tmp_path: Path) -> None:
    ring = KeyRing.generate(tmp_path / "keys")
    log = EmbeddedLog(ring, "fast.example/ledger", clock=lambda: 0, outbox=True)
    other = f"sqlite:///{tmp_path / 'single.sqlite3'}"
    upgrade(other)
    bulk, single = Database(db_url), Database(other)
    try:
        items = _items(45, 0)
        with bulk.write() as conn:  # COPY on PostgreSQL (>= 16 entries), executemany on SQLite
            log.append(conn, items[:40])
        with bulk.write() as conn:
            log.append(conn, items[40:])  # the INSERT path
        for item in items:
            with single.write() as conn:
                log.append(conn, [item])

        def dump(db: Database) -> tuple[Any, ...]:
            with db.read() as conn:
                e = conn.execute(
                    sa.select(ledger_entry.c.seq, ledger_entry.c.ref, ledger_entry.c.ts).order_by(
                        ledger_entry.c.seq
                    )
                ).all()
                n = conn.execute(
                    sa.select(ledger_node.c.level, ledger_node.c.idx).order_by(
                        ledger_node.c.level, ledger_node.c.idx
                    )
                ).all()
                o = conn.execute(sa.select(ledger_outbox.c.seq, ledger_outbox.c.status)).all()
                return [tuple(r) for r in e], [tuple(r) for r in n], sorted(tuple(r) for r in o)

        assert dump(bulk) == dump(single)  # the same rows, up to the sealed boxes
        assert len(dump(bulk)[0]) == 45 and dump(bulk)[2] == [(s, "pending") for s in range(45)]
        for db in (bulk, single):
            report = verify_ledger(db, ring.verify_keys(), "fast.example/ledger")
            # no FHIR versions behind these entries: only that may be reported
            assert all("is not in the database" in p for p in report.problems), report.problems
            assert report.entries == 45 and report.nodes == len(dump(db)[1])
    finally:
        bulk.dispose()
        single.dispose()
