"""``/healthz`` and ``/readyz`` of the whole server, against real databases that really fail:
a SQLite file removed, a PostgreSQL database dropped, a schema behind the code's migrations,
a ledger outbox over its bound, a master key that cannot be loaded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from opskit import consent, drop_pg_database, fresh_database, patient, pg_database

from fhir_consent.app import create_app
from fhir_consent.config import Settings
from fhir_consent.documents.config import DocumentSettings
from fhir_consent.ledger import outbox
from fhir_consent.store.migrate import upgrade


@contextmanager
def served(settings: Settings, **layers: object) -> Iterator[TestClient]:
    app = create_app(settings, **layers)  # type: ignore[arg-type]
    with TestClient(app, base_url="https://testserver") as client:
        yield client


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # key files the server creates land here


def _settings(url: str, **extra: object) -> Settings:
    values: dict[str, object] = {"auto_migrate": True, "db_pool_size": 2, **extra}
    return Settings(database_url=url, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_ready_when_everything_is_in_place(backend: str, tmp_path: Path) -> None:
    with fresh_database(backend, tmp_path) as url, served(_settings(url)) as client:
        live = client.get("/healthz")
        assert live.status_code == 200 and live.json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "ready"
        assert body["checks"] == {
            "database": "ok",
            "migrations": "at head",
            "ledger_outbox": "0 waiting (bound 10000)",
            "keys": "loaded",
        }
        assert ready.headers["cache-control"] == "no-store"


def test_not_ready_when_the_sqlite_file_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "gone.sqlite3"
    with served(_settings(f"sqlite:///{path}")) as client:
        assert client.get("/readyz").status_code == 200
        # A pooled connection would go on working on the deleted file (and lose every write
        # at the next start): readiness must see that the database is gone.
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "not ready"
        assert body["reason"] == "database: failed (OperationalError)"
        assert not path.exists(), "the probe must not create an empty database"
        assert client.get("/healthz").status_code == 200  # liveness never needs the database


def test_not_ready_when_the_postgresql_database_is_dropped(tmp_path: Path) -> None:
    with pg_database() as url, served(_settings(url)) as client:
        assert client.get("/readyz").status_code == 200
        drop_pg_database(url)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["reason"] == "database: failed (OperationalError)"
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_not_ready_when_the_schema_is_behind(backend: str, tmp_path: Path) -> None:
    with fresh_database(backend, tmp_path) as url:
        upgrade(url, "0004")
        with served(_settings(url, auto_migrate=False)) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["reason"] == "migrations: at 0004, not head"
            assert ready.json()["checks"]["database"] == "ok"
        upgrade(url)
        with served(_settings(url, auto_migrate=False)) as client:
            assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_not_ready_when_the_ledger_outbox_is_over_its_bound(backend: str, tmp_path: Path) -> None:
    with (
        fresh_database(backend, tmp_path) as url,
        served(_settings(url, open_access=True, ready_max_outbox_backlog=1)) as client,
    ):
        pid = client.post("/fhir/Patient", json=patient("OutboxCase")).json()["id"]
        for _ in range(2):
            made = client.post("/fhir/Consent", json=consent(pid))
            assert made.status_code == 201, made.text
        assert client.get("/readyz").status_code == 200  # embedded engine: no outbox rows
        # What an external engine's outbox holds while its node is unreachable:
        db = client.app.state.fhir.db  # type: ignore[attr-defined]
        with db.write() as conn:
            assert outbox.backfill(conn) == 2
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["reason"] == "ledger_outbox: 2 waiting (bound 1)"
        with db.write() as conn:
            conn.execute(sa.text("UPDATE ledger_outbox SET status = 'confirmed' WHERE seq = 0"))
        assert client.get("/readyz").status_code == 200


def test_not_ready_when_the_document_master_key_cannot_be_loaded(tmp_path: Path) -> None:
    bad = DocumentSettings(master_key_file=tmp_path)  # a directory, not a key file
    url = f"sqlite:///{tmp_path / 'k.sqlite3'}"
    with served(_settings(url), documents=bad) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["reason"].startswith("keys: failed (")
    assert os.path.isdir(tmp_path)
