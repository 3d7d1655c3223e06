"""Issue 6's acceptance on the server itself (``fhir_consent.app:create_app``: SMART on, no
open access, consent enforcement, audit trail, ledger), with tokens issued by its own
authorization server and every document call made over real HTTP to uvicorn on loopback — on
SQLite and PostgreSQL, with blobs in the database and in a directory.

A hospital's system uploads PDF and CDA content through each path (raw ``POST Binary``, FHIR
``Binary`` JSON, a DocumentReference with inline data, a transaction Bundle); the bytes at rest
— every table, blob files, and for SQLite the database and WAL files themselves — hold no
plaintext; the patient and the custodian download byte-identical content; another patient, a
clinic without consent, a token without Binary scope and no token are refused; the clinic's
access follows the patient's grant and revocation; every download attempt is an AuditEvent the
patient can read; every DocumentReference version (superseded ones included) has its ledger
entry.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from documents_kit import (
    LEDGER_ORIGIN,
    at_rest,
    b64,
    cda_bytes,
    doc_settings,
    inquiry,
    marker,
    pdf_bytes,
    sha1_b64,
)
from livekit import LiveServer, backend_token, smart_world
from smart.kit import World

from fhir_consent.ledger import verify_proof
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.ledger.verify import verify_ledger
from smart_on_fhir.keys import generate_signing_key

JSON = {"accept": "application/fhir+json", "content-type": "application/fhir+json"}
PATIENT_SCOPES = "openid fhirUser launch/patient patient/*.cruds"
CDA = "application/hl7-cda+xml"


@pytest.fixture(params=["db", "dir"])
def server(
    request: pytest.FixtureRequest, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[World, LiveServer, Any]]:
    layers: dict[str, Any] = {
        "ledger": LedgerSettings(
            _env_file=None,  # type: ignore[call-arg]
            keys_dir=str(tmp_path / "ledger"),
            origin=LEDGER_ORIGIN,
        ),
        "documents": doc_settings(tmp_path, str(request.param)),
    }
    with smart_world(db_url, tmp_path, monkeypatch, **layers) as found:
        yield found


def patient_token(world: World, pid: str) -> str:
    username = f"patient-{pid[:8]}"
    world.add_user(username, f"Patient/{pid}")
    app = world.add_client("public", scope=PATIENT_SCOPES)
    body = world.token(app.client.client_id, username=username, scope=PATIENT_SCOPES)
    assert body["patient"] == pid
    token: str = body["access_token"]
    return token


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", **headers}


def reference(
    pid: str, *, url: str | None = None, data: bytes | None = None, ctype: str
) -> dict[str, Any]:
    att: dict[str, Any] = {"contentType": ctype}
    if url is not None:
        att["url"] = url
    if data is not None:
        att["data"] = b64(data)
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": f"Patient/{pid}"},
        "custodian": {"reference": "Organization/hospital"},
        "content": [{"attachment": att}],
    }


def test_documents_on_the_whole_server_with_real_tokens(
    server: tuple[World, LiveServer, Any],
) -> None:
    world, live, app = server
    pid, other = world.add_patient(), world.add_patient(family="Other")
    for org in ("hospital", "clinic"):
        r = world.seed.put(
            f"/fhir/Organization/{org}",
            json={"resourceType": "Organization", "id": org},
            headers=JSON,
        )
        assert r.status_code in (200, 201), r.text
    key = generate_signing_key("RS384")
    hospital = backend_token(
        world, key, "Organization/hospital", "system/Binary.cru system/DocumentReference.cru"
    )
    clinic = backend_token(
        world,
        key,
        "Organization/clinic",
        "system/Consent.c system/Binary.r system/DocumentReference.rs",
    )
    no_binary_scope = backend_token(
        world, key, "Organization/clinic", "system/DocumentReference.rs"
    )
    me, them = patient_token(world, pid), patient_token(world, other)

    uploads: dict[str, tuple[bytes, str]] = {}  # Binary id -> content, content type
    documents: list[str] = []
    secrets: list[str] = []

    def samples() -> list[tuple[bytes, str]]:
        m1, m2 = marker(), marker()
        secrets.extend((m1, m2))
        return [(pdf_bytes(m1), "application/pdf"), (cda_bytes(m2), CDA)]

    def att(doc: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = doc["content"][0]["attachment"]
        return out

    with httpx.Client(base_url=live.base + "/", timeout=30) as http:

        def post_doc(body: dict[str, Any]) -> dict[str, Any]:
            r = http.post("DocumentReference", json=body, headers=bearer(hospital, **JSON))
            assert r.status_code == 201, r.text
            documents.append(r.json()["id"])
            out: dict[str, Any] = r.json()
            return out

        # 1. raw POST Binary, then the DocumentReference that points at it
        for content, ctype in samples():
            r = http.post(
                "Binary", content=content, headers=bearer(hospital, **{"content-type": ctype})
            )
            assert r.status_code == 201, r.text
            bid = r.json()["id"]
            doc = post_doc(reference(pid, url=f"Binary/{bid}", ctype=ctype))
            assert (att(doc)["size"], att(doc)["hash"]) == (len(content), sha1_b64(content))
            uploads[bid] = (content, ctype)
        # 2. FHIR Binary JSON, then its DocumentReference
        for content, ctype in samples():
            body = {"resourceType": "Binary", "contentType": ctype, "data": b64(content)}
            r = http.post("Binary", json=body, headers=bearer(hospital, **JSON))
            assert r.status_code == 201, r.text
            bid = r.json()["id"]
            post_doc(reference(pid, url=f"Binary/{bid}", ctype=ctype))
            uploads[bid] = (content, ctype)
        # 3. DocumentReference with inline data
        for content, ctype in samples():
            doc = post_doc(reference(pid, data=content, ctype=ctype))
            assert "data" not in att(doc) and att(doc)["hash"] == sha1_b64(content)
            uploads[att(doc)["url"].split("/")[1]] = (content, ctype)
        # 4. a transaction Bundle creating the Binary and the DocumentReference
        for n, (content, ctype) in enumerate(samples()):
            placeholder = f"urn:uuid:3c6e0b8a-0000-4000-8000-00000000000{n}"
            bundle = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "fullUrl": placeholder,
                        "resource": {
                            "resourceType": "Binary",
                            "contentType": ctype,
                            "data": b64(content),
                        },
                        "request": {"method": "POST", "url": "Binary"},
                    },
                    {
                        "resource": reference(pid, url=placeholder, ctype=ctype),
                        "request": {"method": "POST", "url": "DocumentReference"},
                    },
                ],
            }
            r = http.post("", json=bundle, headers=bearer(hospital, **JSON))
            assert r.status_code == 200, r.text
            loc = {
                e["response"]["location"].split("/")[0]: e["response"]["location"]
                for e in r.json()["entry"]
            }
            documents.append(loc["DocumentReference"].split("/")[1])
            uploads[loc["Binary"].split("/")[1]] = (content, ctype)
        assert len(uploads) == 8 and len(documents) == 8

        # nothing readable at rest: every table, the blob files, SQLite's own files
        stored = at_rest(app.state.documents)
        for secret in secrets:
            assert secret.encode() not in stored
        for content, _ in uploads.values():
            assert content[:64] not in stored and b64(content)[:64].encode() not in stored

        def download(bid: str, token: str | None, accept: str = "*/*") -> httpx.Response:
            headers = {"accept": accept, **(bearer(token) if token else {})}
            return http.get(f"Binary/{bid}", headers=headers)

        # byte-identical for the patient and for the custodian, raw and as a FHIR Binary
        for bid, (content, ctype) in uploads.items():
            for token in (me, hospital):
                r = download(bid, token, ctype)
                assert r.status_code == 200, r.text
                assert r.content == content and r.headers["content-type"] == ctype
            r = download(bid, me, "application/fhir+json")
            assert base64.b64decode(r.json()["data"]) == content

        # refused: another patient, a clinic without consent (404: existence not revealed),
        # a token without Binary scope (403), no token or a forged one (401)
        some, (content, _) = next(iter(uploads.items()))
        for token in (them, clinic):
            r = download(some, token)
            assert r.status_code == 404 and content[:32] not in r.content
            assert r.json()["resourceType"] == "OperationOutcome"
        assert download(some, no_binary_scope).status_code == 403
        assert download(some, None).status_code == 401
        assert download(some, "not-a-token").status_code == 401

        # the clinic asks, the patient grants: the clinic downloads; the patient revokes: refused
        asked = http.post(
            "Consent",
            json=inquiry(f"Patient/{pid}", ["Organization/clinic"]),
            headers=bearer(clinic, **JSON),
        )
        assert asked.status_code == 201, asked.text
        assert download(some, clinic).status_code == 404  # proposed is not yet a grant
        consent = asked.json()
        granted = http.put(
            f"Consent/{consent['id']}",
            json=consent | {"status": "active"},
            headers=bearer(me, **JSON),
        )
        assert granted.status_code == 200, granted.text
        for bid, (content, ctype) in uploads.items():
            r = download(bid, clinic, ctype)
            assert r.status_code == 200 and r.content == content
        revoked = http.put(
            f"Consent/{consent['id']}",
            json=granted.json() | {"status": "inactive"},
            headers=bearer(me, **JSON),
        )
        assert revoked.status_code == 200, revoked.text
        assert download(some, clinic).status_code == 404

        # superseding: the replaced document gets a new version (superseded), on the ledger too
        replaced = documents[0]
        newer = reference(pid, data=pdf_bytes(marker(), 2000), ctype="application/pdf")
        newer["relatesTo"] = [
            {"code": "replaces", "target": {"reference": f"DocumentReference/{replaced}"}}
        ]
        post_doc(newer)
        old = http.get(
            f"DocumentReference/{replaced}",
            headers=bearer(hospital, accept="application/fhir+json"),
        )
        assert old.json()["status"] == "superseded" and old.json()["meta"]["versionId"] == "2"

        # every DocumentReference version has its ledger entry, with a proof that checks
        keyring = app.state.ledger.keyring
        versions = [(d, 1) for d in documents] + [(replaced, 2)]
        for doc_id, vid in versions:
            proof = http.get(
                f"DocumentReference/{doc_id}/_history/{vid}/$ledger-proof", headers=bearer(hospital)
            )
            assert proof.status_code == 200, proof.text
            assert proof.json()["entry"]["ref"] == f"DocumentReference/{doc_id}/_history/{vid}"
            verify_proof.verify_document(
                proof.json(), trusted_keys=[keyring.signing.public_bytes], origin=LEDGER_ORIGIN
            )
        report = verify_ledger(world.db, keyring.verify_keys(), LEDGER_ORIGIN)
        assert report.ok, report.problems
        doc_versions = report.versions - 3  # the Consent's three versions are on it too
        assert doc_versions == len(versions)

        # the patient reads every download attempt on their documents in their audit trail
        sink = app.state.fhir.audit
        wanted = {
            ("Organization/clinic", "4"),
            ("Organization/clinic", "0"),
            ("Organization/hospital", "0"),
        }
        deadline = time.monotonic() + 10
        while True:
            sink.flush()
            log = http.get(
                f"AuditEvent?patient={pid}&_count=500",
                headers=bearer(me, accept="application/fhir+json"),
            )
            assert log.status_code == 200, log.text
            seen = {
                (a["who"].get("reference"), e["outcome"])
                for e in (x["resource"] for x in log.json().get("entry", []))
                if any(
                    f"Binary/{some}" in x["what"].get("reference", "") for x in e.get("entity", [])
                )
                for a in e["agent"]
            }
            if wanted <= seen or time.monotonic() > deadline:
                break
        assert wanted <= seen, seen
