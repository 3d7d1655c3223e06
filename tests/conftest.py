"""Shared fixtures: every database-backed test runs against SQLite **and** PostgreSQL.

PostgreSQL is the machine's server on 127.0.0.1:5432 (trust auth, database ``test``). Each
test run works in its own schema, so parallel runs never collide; tables are emptied between
tests. Set ``FHIR_CONSENT_TEST_POSTGRES=required`` (CI does) to fail rather than skip when
PostgreSQL is unreachable, or ``=off`` to run SQLite only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from fhir_consent.app import create_core_app
from fhir_consent.config import Settings
from fhir_consent.store.migrate import upgrade
from fhir_consent.store.tables import metadata

FIXTURES = Path(__file__).parent / "fixtures" / "hl7-r4-examples"
PG_MODE = os.environ.get("FHIR_CONSENT_TEST_POSTGRES", "auto")
FHIR_JSON = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}


def load_example(name: str) -> dict[str, Any]:
    """An official HL7 R4 example from tests/fixtures (e.g. ``Patient-example``)."""
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def all_examples() -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob("*.json"))


def run_probe(script: str, payload: Any, timeout: float = 300) -> Any:
    """Run ``script`` in a fresh interpreter with ``payload`` as JSON on its stdin and return
    the JSON it prints (tests that compare against classes built before this process's
    changes to them)."""
    probe = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return json.loads(probe.stdout)


def _pg_base_url() -> str | None:
    if PG_MODE == "off":
        return None
    for user in ("postgres", "root"):
        url = f"postgresql+psycopg://{user}@127.0.0.1:5432/test"
        try:
            engine = sa.create_engine(url, poolclass=sa.NullPool)
            with engine.connect() as conn:
                conn.execute(sa.text("select 1"))
            engine.dispose()
            return url
        except Exception:  # noqa: BLE001 - any failure means "not usable"
            continue
    if PG_MODE == "required":
        pytest.exit("PostgreSQL on 127.0.0.1:5432 is required but unreachable", returncode=3)
    return None


@contextmanager
def _migrated_schema(base: str, prefix: str) -> Iterator[str]:
    """The URL of a new PostgreSQL schema on ``base``, migrated to head; dropped afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base, poolclass=sa.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = f"{base}?options=-csearch_path%3D{schema}"
        upgrade(url)
        yield url
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str | None]:
    base = _pg_base_url()
    if base is None:
        yield None
        return
    with _migrated_schema(base, "t") as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.sqlite3"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    sqlite_template: Path,
    pg_url: str | None,
) -> Iterator[str]:
    """A migrated, empty database of each backend."""
    if request.param == "sqlite":
        path = tmp_path / "db.sqlite3"
        shutil.copy(sqlite_template, path)
        yield f"sqlite:///{path}"
        return
    if pg_url is None:
        pytest.skip("PostgreSQL not reachable")
    engine = sa.create_engine(pg_url, poolclass=sa.NullPool)
    names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()
    yield pg_url


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str | None) -> Iterator[str]:
    """A database of its own, migrated to head: for tests that run migrations on it (the
    PostgreSQL one is a schema of its own, dropped afterwards)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'migrate.sqlite3'}"
        upgrade(url)
        yield url
        return
    if pg_url is None:
        pytest.skip("PostgreSQL not reachable")
    with _migrated_schema(pg_url.split("?")[0], "m") as url:
        yield url


@pytest.fixture
def settings(db_url: str) -> Settings:
    # The existing FHIR tests run without tokens (open_access is for development only and off
    # by default); tests of the SMART authorization use the fixtures in tests/smart.
    return Settings(database_url=db_url, auto_migrate=False, db_pool_size=4, open_access=True)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """An in-process client; the app sees ``https://testserver`` as its origin."""
    app = create_core_app(settings)
    with TestClient(
        app, base_url="https://testserver", headers={"accept": "application/fhir+json"}
    ) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def live_server(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A real uvicorn server on a loopback port; yields its FHIR base URL."""
    port = free_port()
    env = {
        **os.environ,
        "FHIR_CONSENT_DATABASE_URL": db_url,
        "FHIR_CONSENT_AUTO_MIGRATE": "false",
        "FHIR_CONSENT_OPEN_ACCESS": "true",  # as the settings fixture: FHIR tests without tokens
    }
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "fhir_consent.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=tmp_path,  # the server's default key files land there, not in the repo
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "server.log").read_text()) from None
            time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}/fhir"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
