"""Tables of the document store, on the FHIR store's shared ``metadata``.

* ``document_data_keys`` — one live data key per patient (``patient_id = ''`` is the system
  domain for content not yet tied to a patient), stored only wrapped by a master key.
  Crypto-shredding deletes the patient's rows.
* ``document_blobs`` — one row per stored content (a Binary version): its content type, size,
  SHA-1 (R4 Attachment.hash), chunking, and its own content key wrapped by the data key.
* ``document_chunks`` — the encrypted chunks of blobs kept in the database ('db' backend).
* ``document_versions`` — which blob holds the content of which Binary version. The stored
  Binary resource is exactly what clients may see (metadata, no ``data``, no pointer), so no
  generic FHIR path (search, history, bundles, includes) can expose storage internals; a
  version without a row here has no content.
* ``document_links`` — which DocumentReference points at which Binary (and for which patient):
  access to a Binary follows the documents that point to it.

Times are microseconds since the Unix epoch, like the FHIR store's.
"""

from __future__ import annotations

import sqlalchemy as sa

from fhir_consent.store.tables import metadata

__all__ = [
    "document_blobs",
    "document_chunks",
    "document_data_keys",
    "document_links",
    "document_versions",
]

_KEY_ID = sa.String(32)
_RES_ID = sa.String(64)

document_data_keys = sa.Table(
    "document_data_keys",
    metadata,
    sa.Column("key_id", _KEY_ID, primary_key=True),
    sa.Column("patient_id", _RES_ID, nullable=False),
    sa.Column("master_kid", _KEY_ID, nullable=False),
    sa.Column("wrapped", sa.LargeBinary, nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("patient_id"),
)

document_blobs = sa.Table(
    "document_blobs",
    metadata,
    sa.Column("blob_id", _KEY_ID, primary_key=True),
    sa.Column("binary_id", _RES_ID, nullable=True),
    sa.Column("version_id", sa.Integer, nullable=True),
    sa.Column("patient_id", _RES_ID, nullable=True),
    sa.Column("data_key_id", _KEY_ID, nullable=True),
    sa.Column("wrapped_key", sa.LargeBinary, nullable=True),
    sa.Column("nonce_prefix", sa.LargeBinary, nullable=False),
    sa.Column("content_type", sa.String(255), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha1", sa.String(28), nullable=False),
    sa.Column("chunk_size", sa.Integer, nullable=False),
    sa.Column("chunk_count", sa.Integer, nullable=False),
    sa.Column("backend", sa.String(8), nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("shredded", sa.BigInteger, nullable=True),
    sa.Index(None, "binary_id"),
    sa.Index(None, "data_key_id"),
    sa.Index(None, "patient_id"),
)

document_chunks = sa.Table(
    "document_chunks",
    metadata,
    sa.Column(
        "blob_id",
        _KEY_ID,
        sa.ForeignKey("document_blobs.blob_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

document_links = sa.Table(
    "document_links",
    metadata,
    sa.Column("doc_id", _RES_ID, primary_key=True),
    sa.Column("binary_id", _RES_ID, primary_key=True),
    sa.Column("patient_id", _RES_ID, nullable=True),
    sa.Index(None, "binary_id"),
)

document_versions = sa.Table(
    "document_versions",
    metadata,
    sa.Column("binary_id", _RES_ID, primary_key=True),
    sa.Column("version_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column(
        "blob_id",
        _KEY_ID,
        sa.ForeignKey("document_blobs.blob_id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Index(None, "blob_id"),
)
