"""``ledger verify`` catches tampering and names it (ledger.md §2 "Auditable"): an edited entry,
an edited resource version, an edited checkpoint, a deleted row, a forged tree node — through
:func:`verify_ledger` and through the ``fhir-consent ledger verify`` command (exit 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from ledger_testkit import (
    FHIR_JSON,
    consent_resource,
    document_resource,
    ledger_app,
    ledger_settings,
)

from fhir_consent.config import Settings
from fhir_consent.crypto import KeyRing
from fhir_consent.ledger.tables import ledger_checkpoint, ledger_entry, ledger_head, ledger_node
from fhir_consent.ledger.verify import verify_ledger
from fhir_consent.store.db import Database
from fhir_consent.store.tables import resource_versions

ORIGIN = "test.example/ledger"


def _populate(settings: Settings, lsettings: Any) -> list[str]:
    app = ledger_app(settings, lsettings)
    with TestClient(app, base_url="https://testserver", headers=FHIR_JSON) as c:
        ids = []
        for _ in range(6):
            r = c.post("/fhir/Consent", json=consent_resource())
            ids.append(r.json()["id"])
        consent = c.get(f"/fhir/Consent/{ids[0]}").json()
        consent["status"] = "active"
        c.put(f"/fhir/Consent/{ids[0]}", json=consent)
        c.post("/fhir/DocumentReference", json=document_resource())
        assert c.get("/fhir/$ledger-checkpoint").status_code == 200  # checkpoint at 8
        c.delete(f"/fhir/Consent/{ids[1]}")
        assert c.get("/fhir/$ledger-checkpoint").status_code == 200  # checkpoint at 9
    return ids


def _verify(db_url: str, lsettings: Any) -> list[str]:
    ring = KeyRing.load(lsettings.keys_dir)
    db = Database(db_url)
    try:
        report = verify_ledger(db, ring.verify_keys(), ORIGIN)
    finally:
        db.dispose()
    return report.problems


def _edit_entry(conn: sa.Connection, ids: list[str]) -> None:
    row = conn.execute(sa.select(ledger_entry.c.data).where(ledger_entry.c.seq == 3)).one()
    entry = orjson.loads(row.data)
    entry["event"] = "granted"
    conn.execute(
        ledger_entry.update()
        .where(ledger_entry.c.seq == 3)
        .values(data=orjson.dumps(entry, option=orjson.OPT_SORT_KEYS))
    )


def _edit_version(conn: sa.Connection, ids: list[str]) -> None:
    v = resource_versions.c
    row = conn.execute(
        sa.select(v.seq, v.content).where(v.res_id == ids[2], v.version_id == 1)
    ).one()
    doc = orjson.loads(row.content)
    doc["status"] = "active"
    conn.execute(
        resource_versions.update()
        .where(v.seq == row.seq)
        .values(content=orjson.dumps(doc, option=orjson.OPT_SORT_KEYS))
    )


def _edit_checkpoint(conn: sa.Connection, ids: list[str]) -> None:
    c = ledger_checkpoint.c
    note = conn.execute(sa.select(c.note).where(c.size == 8)).scalar_one()
    lines = note.split("\n")
    lines[1] = "7"
    conn.execute(ledger_checkpoint.update().where(c.size == 8).values(note="\n".join(lines)))


def _delete_entry(conn: sa.Connection, ids: list[str]) -> None:
    conn.execute(ledger_entry.delete().where(ledger_entry.c.seq == 4))


def _delete_version(conn: sa.Connection, ids: list[str]) -> None:
    v = resource_versions.c
    conn.execute(resource_versions.delete().where(v.res_id == ids[5], v.version_id == 1))


def _forge_node(conn: sa.Connection, ids: list[str]) -> None:
    n = ledger_node.c
    conn.execute(ledger_node.update().where(n.level == 1, n.idx == 1).values(hash=b"\x07" * 32))


def _delete_node(conn: sa.Connection, ids: list[str]) -> None:
    n = ledger_node.c
    conn.execute(ledger_node.delete().where(n.level == 0, n.idx == 6))


def _rewrite_history(conn: sa.Connection, ids: list[str]) -> None:
    """Delete the last entry and roll the head back: a forked, shorter log."""
    conn.execute(ledger_entry.delete().where(ledger_entry.c.seq == 8))
    conn.execute(ledger_head.update().values(size=8))


CASES: list[tuple[str, Callable[[sa.Connection, list[str]], None], str]] = [
    ("edited entry", _edit_entry, "entry 3: signature does not verify"),
    ("edited version", _edit_version, "does not match entry 2 (resource_sha256)"),
    ("edited checkpoint", _edit_checkpoint, "checkpoint at size 8"),
    ("deleted entry", _delete_entry, "entry 4: missing"),
    ("deleted version", _delete_version, "is not in the database"),
    ("forged node", _forge_node, "tree node (1, 1): hash does not match"),
    ("deleted node", _delete_node, "tree node (0, 6): missing"),
    ("rewritten history", _rewrite_history, "checkpoint at size 9"),
]


@pytest.mark.parametrize(("name", "tamper", "expected"), CASES, ids=[c[0] for c in CASES])
def test_verify_names_the_tampering(
    settings: Settings,
    db_url: str,
    tmp_path: Path,
    name: str,
    tamper: Callable[[sa.Connection, list[str]], None],
    expected: str,
) -> None:
    lsettings = ledger_settings(tmp_path, origin=ORIGIN)
    ids = _populate(settings, lsettings)
    assert _verify(db_url, lsettings) == []
    db = Database(db_url)
    with db.engine.begin() as conn:
        conn.execute(sa.text("SELECT 1"))
        if db.is_sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        tamper(conn, ids)
    db.dispose()
    problems = _verify(db_url, lsettings)
    assert any(expected in p for p in problems), problems


def test_verify_command_exit_codes(settings: Settings, db_url: str, tmp_path: Path) -> None:
    lsettings = ledger_settings(tmp_path, origin=ORIGIN)
    ids = _populate(settings, lsettings)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")},
        "FHIR_CONSENT_DATABASE_URL": db_url,
        "FHIR_CONSENT_LEDGER_KEYS_DIR": lsettings.keys_dir,
        "FHIR_CONSENT_LEDGER_ORIGIN": ORIGIN,
    }
    cmd = [sys.executable, "-m", "fhir_consent.ledger.cli", "ledger", "verify"]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK: log size 9")
    db = Database(db_url)
    with db.engine.begin() as conn:
        _edit_version(conn, ids)
    db.dispose()
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 1
    assert f"PROBLEM: Consent/{ids[2]}/_history/1: the stored version does not match" in bad.stdout
    assert "FAILED:" in bad.stdout
