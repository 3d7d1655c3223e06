"""Migration 0007 on SQLite and PostgreSQL: the search index tables lose their foreign key to
``resources`` (each cost a referential-integrity check per index row written) and keep their
indexes and rows; downgrading puts the keys back. Searches still find what they found."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from conftest import FHIR_JSON, load_example
from fastapi.testclient import TestClient

from fhir_consent.app import create_core_app
from fhir_consent.config import Settings
from fhir_consent.store.migrate import alembic_config, upgrade

INDEX_TABLES = ("idx_token", "idx_string", "idx_reference", "idx_date")


def _keys_and_indexes(url: str) -> dict[str, tuple[list[str], list[str], int]]:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            return {
                t: (
                    [fk["referred_table"] for fk in inspector.get_foreign_keys(t)],
                    sorted(str(ix["name"]) for ix in inspector.get_indexes(t)),
                    int(conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()),
                )
                for t in INDEX_TABLES
            }
    finally:
        engine.dispose()


def test_index_tables_lose_their_foreign_key_and_keep_rows_and_indexes(fresh_url: str) -> None:
    settings = Settings(database_url=fresh_url, auto_migrate=False, open_access=True)
    with TestClient(create_core_app(settings)) as client:
        created = client.post(
            "/fhir/Patient", json=load_example("Patient-example"), headers=FHIR_JSON
        )
        assert created.status_code == 201
    head = _keys_and_indexes(fresh_url)
    assert all(fks == [] and rows > 0 for fks, _ix, rows in head.values()), head

    command.downgrade(alembic_config(fresh_url), "0006")
    before = _keys_and_indexes(fresh_url)
    assert all(fks == ["resources"] for fks, _ix, _rows in before.values()), before
    assert {t: v[1:] for t, v in before.items()} == {t: v[1:] for t, v in head.items()}

    upgrade(fresh_url)
    assert _keys_and_indexes(fresh_url) == head
    with TestClient(create_core_app(settings)) as client:
        found = client.get("/fhir/Patient?family=Chalmers", headers=FHIR_JSON).json()
        assert found["total"] == 1
        assert found["entry"][0]["resource"]["id"] == created.json()["id"]
