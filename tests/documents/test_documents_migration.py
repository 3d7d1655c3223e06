"""Migration 0006 on SQLite and PostgreSQL: Binary versions stored before it named their blob
in a ``meta.extension``; upgrading moves every pointer (current and historical versions) to
``document_versions`` and rewrites the stored resources without it, and the content still
downloads byte for byte. Downgrading puts the pointers back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import command
from documents_kit import doc_settings, make_env, pdf_bytes

from fhir_consent.config import Settings
from fhir_consent.documents import BLOB_EXTENSION
from fhir_consent.documents.tables import document_versions
from fhir_consent.store.migrate import alembic_config, upgrade


def _stored(url: str, bid: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT content FROM resource_versions WHERE res_type = 'Binary' "
                    "AND res_id = :b ORDER BY version_id"
                ),
                {"b": bid},
            ).all()
            current = conn.execute(
                sa.text("SELECT content FROM resources WHERE res_type = 'Binary' AND res_id = :b"),
                {"b": bid},
            ).scalar_one()
    finally:
        engine.dispose()
    docs = [r[0] for r in rows] + [current]
    return [orjson.loads(d) if isinstance(d, str | bytes) else d for d in docs]


def _pointer(doc: dict[str, Any]) -> str | None:
    for ext in doc.get("meta", {}).get("extension", []):
        if ext.get("url") == BLOB_EXTENSION:
            return str(ext["valueId"])
    return None


def test_upgrade_moves_blob_pointers_out_of_stored_binaries(fresh_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=fresh_url, auto_migrate=False, open_access=True)
    v1, v2 = pdf_bytes("first", 9000), pdf_bytes("second", 5000)
    with make_env(settings, doc_settings(tmp_path, "db"), tmp_path) as env:
        r = env.client.post("/fhir/Binary", content=v1, headers={"content-type": "application/pdf"})
        bid = r.json()["id"]
        env.client.put(f"/fhir/Binary/{bid}", content=v2, headers={"content-type": "text/plain"})
        with env.docs.fhir.db.read() as conn:
            blobs = dict(
                conn.execute(
                    sa.select(document_versions.c.version_id, document_versions.c.blob_id).where(
                        document_versions.c.binary_id == bid
                    )
                ).all()
            )
        env.docs.fhir.db.dispose()
    assert blobs.keys() == {1, 2}
    assert all(_pointer(d) is None for d in _stored(fresh_url, bid))

    # back to 0005: the stored resources carry their pointers again, as that code wrote them
    command.downgrade(alembic_config(fresh_url), "0005")
    v_1, v_2, current = _stored(fresh_url, bid)
    assert (_pointer(v_1), _pointer(v_2), _pointer(current)) == (blobs[1], blobs[2], blobs[2])

    upgrade(fresh_url)
    assert all(_pointer(d) is None for d in _stored(fresh_url, bid))
    assert all("extension" not in d["meta"] for d in _stored(fresh_url, bid))
    with make_env(settings, doc_settings(tmp_path, "db"), tmp_path) as env:
        got = env.client.get(f"/fhir/Binary/{bid}", headers={"accept": "*/*"})
        assert got.content == v2 and got.headers["content-type"] == "text/plain"
        old = env.client.get(f"/fhir/Binary/{bid}/_history/1", headers={"accept": "*/*"})
        assert old.content == v1 and old.headers["content-type"] == "application/pdf"
        found = env.client.get(
            f"/fhir/Binary?_id={bid}", headers={"accept": "application/fhir+json"}
        )
        assert BLOB_EXTENSION not in found.text and blobs[2] not in found.text
        env.docs.fhir.db.dispose()
