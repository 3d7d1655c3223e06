"""The gateway world: an independent upstream server (our own, open mode, its own SQLite
database) loaded with the official examples and generated documents of two patients, and the
gateway (``fhir-consent serve --upstream …``) on our store — SQLite and PostgreSQL — with two
clinic systems and the patients' Consents. Built once per module and backend (two servers and
~120 resources take seconds); the tests only read, except where they say otherwise."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher
from fastapi.testclient import TestClient

from fhir_consent.app import create_app
from fhir_consent.config import Settings
from fhir_consent.store.db import Database
from fhir_consent.store.tables import metadata
from smart_on_fhir import users as users_module
from smart_on_fhir.clients import create_client
from smart_on_fhir.keys import KeySet, generate_signing_key
from smart_on_fhir.tables import metadata as smart_metadata
from smart_on_fhir.users import create_user

from .gwkit import (
    CLINIC_A,
    CLINIC_B,
    FHIR_JSON,
    PATIENT_A,
    PATIENT_B,
    UPSTREAM_TYPES,
    Clinic,
    Server,
    examples,
    generated_documents,
    grant,
    load,
    serve,
)

PASSWORD = "correct horse battery"
REDIRECT = "https://app.example.org/callback"
PATIENT_SCOPES = "openid fhirUser launch/patient patient/*.rs patient/Consent.cu"


@dataclass
class World:
    upstream: Server
    gateway: Server
    store_url: str  # the gateway's own database
    root: Path
    keys: Path
    clinic_a: Clinic
    clinic_b: Clinic
    app_client: str
    loaded: int  # resources loaded into the upstream

    @property
    def fhir(self) -> str:
        return self.gateway.fhir

    @property
    def token_url(self) -> str:
        return f"{self.gateway.origin}/auth/token"


def _empty(url: str) -> None:
    if not url.startswith("postgresql"):
        return
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        for table in reversed(smart_metadata.sorted_tables):
            conn.execute(table.delete())
    engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store_url(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    sqlite_template: Path,
    pg_url: str | None,
) -> str:
    """The gateway's store, of each backend (fresh for each module)."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("gwstore") / "store.sqlite3"
        shutil.copy(sqlite_template, path)
        return f"sqlite:///{path}"
    if pg_url is None:
        pytest.skip("PostgreSQL not reachable")
    _empty(pg_url)
    return pg_url


def _seed_store(url: str, keys: Path, cwd: Path) -> tuple[Clinic, Clinic, str]:
    """Users, clients and Consents in our store (Consents through the API of an open-access
    app on the same database, so the consent index and the ledger see them)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)  # the ledger's default key ring is the gateway's (same cwd)
        cheap = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
        mp.setattr(users_module, "_hasher", lambda: cheap)
        settings = Settings(
            database_url=url,
            auto_migrate=False,
            db_pool_size=2,
            smart_keys_dir=str(keys),
            open_access=True,
        )
        app = create_app(settings)
        with TestClient(app, base_url="https://seed.test") as c:
            # A grants clinic A everything; B lets clinic A see only the Patient record.
            for body in (
                grant(PATIENT_A, CLINIC_A),
                grant(PATIENT_B, CLINIC_A, classes=["Patient"]),
            ):
                r = c.post("/fhir/Consent", json=body, headers=FHIR_JSON)
                assert r.status_code == 201, r.text
        db = Database(url, pool_size=1)
        try:
            clinics = []
            with db.write() as conn:
                now = 1_700_000_000
                for org in (CLINIC_A, CLINIC_B):
                    key = generate_signing_key("ES384")
                    created = create_client(
                        conn,
                        client_name=f"{org} EHR",
                        client_type="confidential-asymmetric",
                        scope="system/*.rs system/*.c",
                        jwks={"keys": [dict(key.as_dict(private=False))]},
                        organization=org,
                        now=now,
                    )
                    clinics.append(Clinic(created.client.client_id, key))
                create_user(conn, "peter", PASSWORD, fhir_user=f"Patient/{PATIENT_A}", now=now)
                app_client = create_client(
                    conn,
                    client_name="Patient app",
                    client_type="public",
                    redirect_uris=[REDIRECT],
                    scope=PATIENT_SCOPES,
                    now=now,
                )
        finally:
            db.dispose()
    return clinics[0], clinics[1], app_client.client.client_id


@pytest.fixture(scope="module")
def world(store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("gateway")
    upstream = serve(
        [],
        {
            "FHIR_CONSENT_DATABASE_URL": f"sqlite:///{root / 'upstream.sqlite3'}",
            "FHIR_CONSENT_OPEN_ACCESS": "true",
        },
        root / "upstream",
        name="upstream",
    )
    gateway: Server | None = None
    try:
        with httpx.Client(timeout=30) as http:
            loaded = load(http, upstream.fhir, examples(UPSTREAM_TYPES))
            loaded += load(http, upstream.fhir, generated_documents())
        keys = root / "smart-keys"
        KeySet.generate().save(keys)
        gw_cwd = root / "gateway"
        gw_cwd.mkdir()
        clinic_a, clinic_b, app_client = _seed_store(store_url, keys, gw_cwd)
        gateway = serve(
            ["--upstream", upstream.fhir, "--database-url", store_url],
            {
                "FHIR_CONSENT_SMART_KEYS_DIR": str(keys),
                "FHIR_CONSENT_DB_POOL_SIZE": "4",
                # small upstream pages: every page of ours spans several of the upstream's
                "FHIR_CONSENT_GATEWAY_UPSTREAM_PAGE_SIZE": "7",
            },
            gw_cwd,
            name="gateway",
        )
        yield World(
            upstream, gateway, store_url, root, keys, clinic_a, clinic_b, app_client, loaded
        )
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


__all__ = ["PASSWORD", "PATIENT_A", "PATIENT_B", "REDIRECT", "World"]
