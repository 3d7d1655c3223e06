"""documents: Binary version → blob in its own table; stored Binary resources lose the pointer

Until now a stored Binary named its encrypted blob in a ``meta.extension``
(``urn:fhir-consent:documents:blob``), and every generic FHIR path that serves stored bytes
(search, history, bundle entries, ``_include``, PATCH responses) showed it to clients. The
pointer moves to ``document_versions``; every stored Binary version (current and history) is
rewritten without it, so the stored resource is exactly what clients may see.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 08:00:00.000000
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BLOB_EXTENSION = "urn:fhir-consent:documents:blob"


def upgrade() -> None:
    op.create_table(
        "document_versions",
        sa.Column("binary_id", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("blob_id", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["blob_id"],
            ["document_blobs.blob_id"],
            name=op.f("fk_document_versions_blob_id_document_blobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("binary_id", "version_id", name=op.f("pk_document_versions")),
    )
    with op.batch_alter_table("document_versions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_document_versions_blob_id"), ["blob_id"], unique=False
        )
    _move_pointers()


def downgrade() -> None:
    _restore_pointers()
    with op.batch_alter_table("document_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_document_versions_blob_id"))
    op.drop_table("document_versions")


# -- data ----------------------------------------------------------------------------------


def _load(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    doc = json.loads(value) if isinstance(value, str | bytes) else value
    return doc if isinstance(doc, dict) else None


def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _split(doc: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The resource without the blob extension, and the blob id it named."""
    meta = doc.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("extension"), list):
        return doc, None
    blob_id = None
    kept = []
    for ext in meta["extension"]:
        if isinstance(ext, dict) and ext.get("url") == _BLOB_EXTENSION:
            value = ext.get("valueId")
            blob_id = value if isinstance(value, str) else blob_id
        else:
            kept.append(ext)
    if blob_id is None:
        return doc, None
    meta = {k: v for k, v in meta.items() if k != "extension"}
    if kept:
        meta["extension"] = kept
    return {**doc, "meta": meta}, blob_id


def _update_content(table: str, key: str) -> str:
    cast = "CAST(:content AS jsonb)" if op.get_bind().dialect.name == "postgresql" else ":content"
    return f"UPDATE {table} SET content = {cast} WHERE {key} = :key"


def _move_pointers() -> None:
    conn = op.get_bind()
    known = {r[0] for r in conn.execute(sa.text("SELECT blob_id FROM document_blobs"))}
    mapping: list[dict[str, Any]] = []
    for table, key in (("resource_versions", "seq"), ("resources", "pk")):
        rows = conn.execute(
            sa.text(
                f"SELECT {key}, res_id, version_id, content FROM {table} "
                "WHERE res_type = 'Binary' AND content IS NOT NULL"
            )
        ).all()
        for pk, res_id, version_id, content in rows:
            doc = _load(content)
            if doc is None:
                continue
            stripped, blob_id = _split(doc)
            if blob_id is None:
                continue
            update = sa.text(_update_content(table, key))
            conn.execute(update, {"content": _dump(stripped), "key": pk})
            if table == "resource_versions" and blob_id in known:
                mapping.append({"b": res_id, "v": version_id, "blob": blob_id})
    if mapping:
        conn.execute(
            sa.text(
                "INSERT INTO document_versions (binary_id, version_id, blob_id) "
                "VALUES (:b, :v, :blob)"
            ),
            mapping,
        )


def _restore_pointers() -> None:
    conn = op.get_bind()
    pointers = {
        (r[0], int(r[1])): r[2]
        for r in conn.execute(
            sa.text("SELECT binary_id, version_id, blob_id FROM document_versions")
        )
    }
    for table, key in (("resource_versions", "seq"), ("resources", "pk")):
        rows = conn.execute(
            sa.text(
                f"SELECT {key}, res_id, version_id, content FROM {table} "
                "WHERE res_type = 'Binary' AND content IS NOT NULL"
            )
        ).all()
        for pk, res_id, version_id, content in rows:
            blob_id = pointers.get((res_id, int(version_id)))
            doc = _load(content)
            if blob_id is None or doc is None:
                continue
            meta = dict(doc.get("meta") or {})
            ext = {"url": _BLOB_EXTENSION, "valueId": blob_id}
            meta["extension"] = [*meta.get("extension", []), ext]
            doc = {**doc, "meta": meta}
            conn.execute(sa.text(_update_content(table, key)), {"content": _dump(doc), "key": pk})
