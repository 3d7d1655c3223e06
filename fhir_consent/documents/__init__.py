"""Medical documents: upload, encrypted storage and download (the records repository).

Clinics upload CDA/PDF/image content as FHIR R4 ``Binary`` resources (binary.html) — raw bytes
or base64 JSON — or inline in a ``DocumentReference`` (documentreference.html), alone or in a
transaction Bundle. Whatever the path, the content is encrypted before it is stored and only
metadata stays in the resource tables.

Layout (imports point downward):

* :mod:`.routes` — ``POST/PUT/GET/DELETE Binary`` with streaming, content negotiation and
  ranges.
* :mod:`.access` — who may read a Binary (:class:`BinaryAccess`, following the documents
  that point to it) and the download audit hook (:class:`DownloadAudit`).
* :mod:`.service` — the PreWrite hook and WriteListener: inline data → Binary, Attachment
  ``size``/``hash``, document links, superseding.
* :mod:`.storage` — chunked encrypted blobs in the database or a directory.
* :mod:`.keys` — envelope encryption: master key ring → per-patient data keys → per-blob
  content keys (XSalsa20-Poly1305); crypto-shredding.
* :mod:`.admin` — ``fhir-consent documents shred|rotate-master-key|rewrap|gc``.
* :mod:`.config`, :mod:`.tables`, :mod:`.errors`.

Enable it with ``install(app, app.state.fhir, DocumentSettings())`` after ``create_app``.

**Crypto-shredding** a patient (GDPR erasure, withdrawal from the repository)::

    fhir-consent documents shred --patient Patient/123          # dry run: what would go
    fhir-consent documents shred --patient Patient/123 --yes    # irreversible

deletes the patient's data key: every content of theirs becomes unrecoverable, even from
database backups that do not also hold the master key ring. Downloads then answer 410 Gone.
"""

from fhir_consent.documents.access import (
    BinaryAccess,
    DocumentLinkAccess,
    DownloadAudit,
    DownloadEvent,
    no_audit,
)
from fhir_consent.documents.admin import add_parser, rotate_master_key, shred
from fhir_consent.documents.config import DocumentSettings
from fhir_consent.documents.errors import (
    ContentDestroyed,
    DocumentError,
    IntegrityFailure,
    MasterKeyError,
)
from fhir_consent.documents.keys import MasterKeyRing
from fhir_consent.documents.routes import Documents
from fhir_consent.documents.service import BLOB_EXTENSION
from fhir_consent.documents.storage import BlobStore, ShredReport
from fhir_consent.documents.wiring import install, load_master_keys, uninstall

__all__ = [
    "BLOB_EXTENSION",
    "BinaryAccess",
    "BlobStore",
    "ContentDestroyed",
    "DocumentError",
    "DocumentLinkAccess",
    "DocumentSettings",
    "Documents",
    "DownloadAudit",
    "DownloadEvent",
    "IntegrityFailure",
    "MasterKeyError",
    "MasterKeyRing",
    "ShredReport",
    "add_parser",
    "install",
    "load_master_keys",
    "no_audit",
    "rotate_master_key",
    "shred",
    "uninstall",
]
