"""Fixtures for the SMART authorization server: an app with auth ON, provisioned users and
clients (see :mod:`.kit`), and a real server. Everything runs on both databases (the
``db_url`` fixture); signing keys are generated once per session.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher
from fastapi.testclient import TestClient

from fhir_consent.app import create_core_app
from fhir_consent.config import Settings
from fhir_consent.consent.workflow import install as install_consent
from fhir_consent.store.db import Database
from smart_on_fhir import users as users_module
from smart_on_fhir.keys import KeySet
from smart_on_fhir.tables import metadata as smart_metadata
from smart_on_fhir.users import User

from .kit import BASE, World, start_server


@pytest.fixture(autouse=True, scope="session")
def cheap_argon2() -> Iterator[None]:
    """argon2id with test-sized costs in this process (the defaults take ~0.5 s per hash on a
    busy machine); live servers in subprocesses keep the production parameters."""
    cheap = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(users_module, "_hasher", lambda: cheap)
        yield


@pytest.fixture(scope="session")
def smart_keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One signing key set for the whole session (RSA generation is slow)."""
    path = tmp_path_factory.mktemp("smart") / "keys"
    KeySet.generate().save(path)
    return path


@pytest.fixture
def smart_db(db_url: str) -> str:
    """The test database with the SMART tables emptied (PostgreSQL is shared per session)."""
    if db_url.startswith("postgresql"):
        engine = sa.create_engine(db_url, poolclass=sa.NullPool)
        with engine.begin() as conn:  # DELETE beats TRUNCATE on tables this small
            for table in reversed(smart_metadata.sorted_tables):
                conn.execute(table.delete())
        engine.dispose()
    return db_url


@pytest.fixture
def smart_settings(smart_db: str, smart_keys_dir: Path) -> Settings:
    """Auth ON (the default), test keys, small pool."""
    return Settings(
        database_url=smart_db,
        auto_migrate=False,
        db_pool_size=4,
        smart_keys_dir=str(smart_keys_dir),
    )


@pytest.fixture
def world(smart_settings: Settings) -> Iterator[World]:
    app = create_core_app(smart_settings)
    seed_app = create_core_app(smart_settings.model_copy(update={"open_access": True}))
    install_consent(seed_app.state.fhir)  # seeded Consents reach the consent index
    db = Database(smart_settings.database_url, pool_size=2)
    with (
        TestClient(app, base_url=BASE) as http,
        TestClient(seed_app, base_url=BASE) as seed,
    ):
        yield World(http=http, seed=seed, db=db)
    db.dispose()


@pytest.fixture
def peter(world: World) -> tuple[str, User]:
    """A patient with a login: ``(patient id, user)``."""
    pid = world.add_patient()
    return pid, world.add_user("peter", f"Patient/{pid}")


@pytest.fixture
def smart_server(smart_settings: Settings, tmp_path: Path) -> Iterator[str]:
    """A real uvicorn server with SMART on (plain http on 127.0.0.1, which OAuth allows for
    loopback); yields its origin, e.g. ``http://127.0.0.1:54321``."""
    env = {
        "FHIR_CONSENT_DATABASE_URL": smart_settings.database_url,
        "FHIR_CONSENT_AUTO_MIGRATE": "false",
        "FHIR_CONSENT_OPEN_ACCESS": "false",
        "FHIR_CONSENT_SMART_KEYS_DIR": smart_settings.smart_keys_dir,
    }
    proc, origin = start_server(env, tmp_path / "smart-server.log")
    try:
        yield origin
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
