"""Shared helpers of the document tests: the whole server (``fhir_consent.app:create_app``:
consent, audit, ledger, documents, web) — or, for the document layer's own defaults, the core
app with just the ledger and the document store — with a switchable caller (injected
authenticator, as tests/fhir/test_visibility.py does), sample PDF and CDA content, and a dump
of every byte the store keeps at rest."""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from conftest import FHIR_JSON
from fastapi.testclient import TestClient
from livekit import Caller, LiveServer

from fhir_consent.app import create_app, create_core_app
from fhir_consent.config import Settings
from fhir_consent.consent.enforcement import PurposeOfUse
from fhir_consent.documents import Documents, DocumentSettings, DownloadEvent, install
from fhir_consent.ledger.api import install as install_ledger
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.store.tables import metadata

__all__ = [
    "FHIR_JSON",
    "Caller",
    "DocEnv",
    "LiveServer",
    "at_rest",
    "b64",
    "cda_bytes",
    "doc_settings",
    "document",
    "inquiry",
    "make_env",
    "marker",
    "pdf_bytes",
    "sha1_b64",
]


LEDGER_ORIGIN = "documents.example/ledger"


@dataclass
class DocEnv:
    client: TestClient
    caller: Caller
    docs: Documents
    audit: list[DownloadEvent] = field(default_factory=list)

    def post_json(self, path: str, resource: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post(f"/fhir/{path}", json=resource, headers=FHIR_JSON)
        assert r.status_code == 201, r.text
        out: dict[str, Any] = r.json()
        return out

    def patient(self) -> str:
        return str(self.post_json("Patient", {"resourceType": "Patient"})["id"])


def doc_settings(tmp_path: Path, backend: str, **overrides: Any) -> DocumentSettings:
    values: dict[str, Any] = {
        "blob_backend": backend,
        "blob_dir": tmp_path / "blobs" if backend == "dir" else None,
        "spool_dir": tmp_path / "spool",
        "master_key_file": tmp_path / "keys" / "master-keys.json",
        "chunk_size": 4096,  # small chunks: every test crosses chunk boundaries
    }
    values.update(overrides)
    return DocumentSettings(**values)


@contextmanager
def make_env(
    settings: Settings,
    documents: DocumentSettings,
    tmp_path: Path,
    *,
    whole: bool = True,
    **client_kw: Any,
) -> Iterator[DocEnv]:
    """``whole``: the server's own app (every layer, as ``fhir-consent serve`` runs it; the
    download audit goes to the server's audit trail *and* to ``DocEnv.audit``). Otherwise the
    core app with the ledger and the document store's default access and audit hooks."""
    settings = settings.model_copy(update={"smart_keys_dir": str(tmp_path / "smart")})
    ledger = LedgerSettings(  # every DocumentReference version gets its entry (issue 6)
        _env_file=None,  # type: ignore[call-arg]
        keys_dir=str(tmp_path / "ledger-keys"),
        origin=LEDGER_ORIGIN,
    )
    caller = Caller()
    events: list[DownloadEvent] = []
    if whole:
        app = create_app(settings, ledger=ledger, documents=documents)
        app.state.fhir.authenticate = PurposeOfUse(caller)  # as install_layers wraps it
        docs: Documents = app.state.documents
        server_audit = docs.audit

        def tee(event: DownloadEvent) -> None:
            events.append(event)
            server_audit(event)

        docs.audit = tee
    else:
        app = create_core_app(settings)
        app.state.fhir.authenticate = caller
        install_ledger(app, app.state.fhir, ledger)

        def record(event: DownloadEvent) -> None:
            events.append(event)

        docs = install(app, app.state.fhir, documents, audit=record, replace=True)
    with TestClient(app, base_url="https://testserver", **client_kw) as client:
        yield DocEnv(client, caller, docs, events)


def pdf_bytes(marker: str, size: int = 20_000) -> bytes:
    head = f"%PDF-1.4\n%{marker}\n1 0 obj << /Title ({marker}) >> endobj\n".encode()
    body = os.urandom(max(0, size - len(head) - 6))
    return head + body + b"\n%%EOF"


def cda_bytes(marker: str, repeat: int = 300) -> bytes:
    section = f"<section><title>Discharge summary</title><text>{marker}</text></section>"
    return (
        '<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3">'
        f"<title>{marker}</title><component>{section * repeat}</component></ClinicalDocument>"
    ).encode()


def marker() -> str:
    return f"PLAINTEXT-{uuid.uuid4().hex}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sha1_b64(data: bytes) -> str:
    return b64(hashlib.sha1(data).digest())


def document(pid: str, data: bytes | None = None, **attachment: Any) -> dict[str, Any]:
    att: dict[str, Any] = {"contentType": "application/pdf", **attachment}
    if data is not None:
        att["data"] = b64(data)
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "date": "2024-01-01T00:00:00Z",
        "content": [{"attachment": att}],
    }


def at_rest(docs: Documents) -> bytes:
    """Every byte the server keeps: every column of every table (resources and their versions,
    audit events, ledger entries, keys, blobs, chunks), blob and spool files, and — for
    SQLite — the database and WAL files themselves (concatenated; tests search it for
    plaintext)."""
    parts: list[bytes] = []
    db = docs.fhir.db
    with db.read() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(sa.select(table)):
                for value in row:
                    if isinstance(value, bytes | bytearray | memoryview):
                        parts.append(bytes(value))
                    elif value is not None and not isinstance(value, int | float | bool):
                        parts.append(str(value).encode())
    if db.is_sqlite:
        path = Path(sa.engine.make_url(db.url).database or "")
        for f in (path, path.with_name(path.name + "-wal")):
            if f.is_file():
                parts.append(f.read_bytes())
    for root in (docs.settings.blob_dir, docs.settings.spool_dir):
        if root is not None and root.exists():
            for file in root.rglob("*"):
                if file.is_file():
                    parts.append(file.read_bytes())
    return b"\x00".join(parts)


def inquiry(patient: str, recipients: list[str]) -> dict[str, Any]:
    """A clinic's inquiry (consent.md §2.1): a proposed OPTOUT Consent whose one provision
    names the clinic as recipient of access."""
    return {
        "resourceType": "Consent",
        "status": "proposed",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient},
        "dateTime": "2015-06-01",
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}
            ]
        },
        "provision": {
            "period": {"start": "2015-01-01", "end": "2030-12-31"},
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "PRCP",
                            }
                        ]
                    },
                    "reference": {"reference": ref},
                }
                for ref in recipients
            ],
            "action": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                            "code": "access",
                        }
                    ]
                }
            ],
        },
    }
