"""Document upload, encrypted storage and download over the FHIR API (issue 6), on SQLite and
PostgreSQL and on both blob backends: every upload path, at-rest encryption, byte-identical
downloads, access refusal, ranges, negotiation, size limits, hash/size checks, superseding."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from documents_kit import (
    FHIR_JSON,
    LEDGER_ORIGIN,
    DocEnv,
    at_rest,
    b64,
    cda_bytes,
    doc_settings,
    document,
    make_env,
    marker,
    pdf_bytes,
    sha1_b64,
)

from fhir_consent.config import Settings
from fhir_consent.documents import BLOB_EXTENSION
from fhir_consent.documents.tables import document_blobs, document_chunks
from fhir_consent.ledger import verify_proof
from fhir_consent.ledger.verify import verify_ledger


@pytest.fixture(params=["db", "dir"])
def env(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Iterator[DocEnv]:
    with make_env(settings, doc_settings(tmp_path, request.param), tmp_path) as e:
        yield e


def raw_get(env: DocEnv, ref: str, accept: str = "*/*", **headers: str) -> Any:
    return env.client.get(f"/fhir/{ref}", headers={"accept": accept, **headers})


def binary_ref(doc: dict[str, Any]) -> str:
    url: str = doc["content"][0]["attachment"]["url"]
    assert url.startswith("Binary/")
    return url


# -- every upload path --------------------------------------------------------------------


CDA = "application/hl7-cda+xml"


def test_every_upload_path_is_encrypted_at_rest_and_downloads_identically(env: DocEnv) -> None:
    pid = env.patient()
    uploads: dict[str, tuple[bytes, str]] = {}  # Binary ref -> (content, content type)
    documents: list[str] = []  # every DocumentReference the uploads created
    secrets: list[str] = []

    def samples() -> list[tuple[bytes, str]]:
        """A fresh PDF and a fresh CDA document, each with a unique plaintext marker."""
        m1, m2 = marker(), marker()
        secrets.extend((m1, m2))
        return [(pdf_bytes(m1), "application/pdf"), (cda_bytes(m2), CDA)]

    # 1. raw POST Binary, tied to the patient by a DocumentReference afterwards
    for content, ctype in samples():
        r = env.client.post(
            "/fhir/Binary", content=content, headers={"content-type": ctype, **_accept()}
        )
        assert r.status_code == 201, r.text
        assert r.json()["data"] == b64(content) and r.headers["location"].endswith("/_history/1")
        ref = f"Binary/{r.json()['id']}"
        linked = env.post_json("DocumentReference", document(pid, url=ref, contentType=ctype))
        documents.append(linked["id"])
        uploads[ref] = (content, ctype)

    # 2. FHIR Binary JSON with base64 data
    for content, ctype in samples():
        body = {"resourceType": "Binary", "contentType": ctype, "data": b64(content)}
        body["securityContext"] = {"reference": f"Patient/{pid}"}
        created = env.post_json("Binary", body)
        assert created["data"] == b64(content) and "meta" in created
        assert BLOB_EXTENSION not in orjson.dumps(created).decode()
        uploads[f"Binary/{created['id']}"] = (content, ctype)

    # 3. DocumentReference with inline data
    for content, ctype in samples():
        doc = env.post_json("DocumentReference", document(pid, content, contentType=ctype))
        att = doc["content"][0]["attachment"]
        assert "data" not in att
        assert att["size"] == len(content) and att["hash"] == sha1_b64(content)
        uploads[binary_ref(doc)] = (content, ctype)
        documents.append(doc["id"])

    # 4. a transaction Bundle creating each Binary and the DocumentReference pointing to it
    for n, (content, ctype) in enumerate(samples()):
        placeholder = f"urn:uuid:6f1c0d7e-0000-4000-8000-00000000000{n}"
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
                    "resource": document(pid, contentType=ctype, url=placeholder),
                    "request": {"method": "POST", "url": "DocumentReference"},
                },
            ],
        }
        r = env.client.post("/fhir", json=bundle, headers=FHIR_JSON)
        assert r.status_code == 200, r.text
        locations = [e["response"]["location"] for e in r.json()["entry"]]
        doc_id = next(loc for loc in locations if "DocumentReference/" in loc).split("/")[-3]
        doc = env.client.get(f"/fhir/DocumentReference/{doc_id}", headers=FHIR_JSON).json()
        att = doc["content"][0]["attachment"]
        assert att["size"] == len(content) and att["hash"] == sha1_b64(content)
        uploads[binary_ref(doc)] = (content, ctype)
        documents.append(doc_id)
    assert len(uploads) == 8 and len(documents) == 6

    # every DocumentReference version has its ledger entry, with a proof anyone can check
    keyring = env.client.app.state.ledger.keyring  # type: ignore[attr-defined]
    for doc_id in documents:
        proof = env.client.get(f"/fhir/DocumentReference/{doc_id}/_history/1/$ledger-proof")
        assert proof.status_code == 200, proof.text
        assert proof.json()["entry"]["ref"] == f"DocumentReference/{doc_id}/_history/1"
        verify_proof.verify_document(
            proof.json(), trusted_keys=[keyring.signing.public_bytes], origin=LEDGER_ORIGIN
        )
    report = verify_ledger(env.docs.fhir.db, keyring.verify_keys(), LEDGER_ORIGIN)
    assert report.ok, report.problems
    assert report.versions == len(documents)  # and no entry without its version

    # nothing readable at rest: not the markers, not the content, not its base64
    stored = at_rest(env.docs)
    for secret in secrets:
        assert secret.encode() not in stored
    for content, _ in uploads.values():
        assert content[:64] not in stored and b64(content)[:64].encode() not in stored

    # byte-identical downloads, raw and as a FHIR Binary
    for ref, (content, ctype) in uploads.items():
        r = raw_get(env, ref, ctype)
        assert r.status_code == 200, r.text
        assert r.content == content
        assert r.headers["content-type"] == ctype
        assert r.headers["content-length"] == str(len(content))
        assert r.headers["etag"] == '"1"' and r.headers["accept-ranges"] == "bytes"
        r = raw_get(env, ref, "application/fhir+json")
        assert r.status_code == 200
        resource = r.json()
        assert resource["resourceType"] == "Binary" and resource["contentType"] == ctype
        assert base64.b64decode(resource["data"]) == content
        assert "meta" not in resource or "extension" not in resource["meta"]
        assert r.headers["etag"] == 'W/"1"'


def _accept() -> dict[str, str]:
    return {"accept": "application/fhir+json"}


def test_generic_reads_carry_content_but_never_storage_or_forged_blobs(env: DocEnv) -> None:
    pid = env.patient()
    content = pdf_bytes(marker())
    doc = env.post_json("DocumentReference", document(pid, content))
    bid = binary_ref(doc).split("/")[1]
    # The search result (generic route) holds the content as data, no storage pointer.
    found = env.client.get(f"/fhir/Binary?_id={bid}", headers=FHIR_JSON).json()
    stored = found["entry"][0]["resource"]
    assert stored["data"] == b64(content) and "extension" not in stored.get("meta", {})
    # The blob id never reaches a client; take it from the database (a leaked id, say).
    with env.docs.fhir.db.read() as conn:
        blob_id = conn.execute(
            sa.select(document_blobs.c.blob_id).where(document_blobs.c.binary_id == bid)
        ).scalar_one()
    assert blob_id not in orjson.dumps(found).decode()
    # Type and instance history stay with the generic routes (with data, as a read).
    for path in ("Binary/_history", f"Binary/{bid}/_history"):
        r = env.client.get(f"/fhir/{path}", headers=FHIR_JSON)
        assert r.status_code == 200 and r.json()["type"] == "history"
        mine = [e["resource"] for e in r.json()["entry"] if e["resource"]["id"] == bid]
        assert mine and all(b["data"] == b64(content) for b in mine)
        assert blob_id not in r.text
    # A client cannot point a new Binary at someone else's blob.
    forged = {
        "resourceType": "Binary",
        "contentType": "application/pdf",
        "meta": {"extension": [{"url": BLOB_EXTENSION, "valueId": blob_id}]},
    }
    fid = env.post_json("Binary", forged)["id"]
    r = raw_get(env, f"Binary/{fid}")
    assert r.status_code == 200 and r.content == b""


# -- DocumentReference attachment checks --------------------------------------------------


def test_attachment_size_and_hash_are_checked(env: DocEnv) -> None:
    pid = env.patient()
    content = cda_bytes(marker())
    bad_size = document(pid, content, size=len(content) + 1)
    r = env.client.post("/fhir/DocumentReference", json=bad_size, headers=FHIR_JSON)
    assert r.status_code == 400
    assert r.json()["issue"][0]["expression"] == ["DocumentReference.content[0].attachment.size"]
    bad_hash = document(pid, content, hash=sha1_b64(b"other"))
    r = env.client.post("/fhir/DocumentReference", json=bad_hash, headers=FHIR_JSON)
    assert r.status_code == 400
    assert r.json()["issue"][0]["expression"] == ["DocumentReference.content[0].attachment.hash"]
    with env.docs.fhir.db.read() as conn:  # nothing stored by the refused writes
        assert conn.execute(sa.select(sa.func.count()).select_from(document_blobs)).scalar() == 0
    good = document(pid, content, size=len(content), hash=sha1_b64(content))
    doc = env.post_json("DocumentReference", good)
    # A document pointing at an existing Binary gets (and must agree with) its size and hash.
    ref = binary_ref(doc)
    again = env.post_json("DocumentReference", document(pid, url=ref))
    att = again["content"][0]["attachment"]
    assert (att["size"], att["hash"]) == (len(content), sha1_b64(content))
    r = env.client.post(
        "/fhir/DocumentReference", json=document(pid, url=ref, size=1), headers=FHIR_JSON
    )
    assert r.status_code == 400


# -- access ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["db", "dir"])
def test_access_follows_the_documents_pointing_to_the_binary(
    settings: Settings, tmp_path: Path, backend: str
) -> None:
    """The document layer's default access rule (scopes and the patient compartment, no
    consents): the core app with only the ledger and the document store installed. The whole
    server adds consent on top: tests/documents/test_documents_server.py."""
    with make_env(settings, doc_settings(tmp_path, backend), tmp_path, whole=False) as env:
        _access_follows_the_documents(env)


def _access_follows_the_documents(env: DocEnv) -> None:
    caller = env.caller
    p1, p2 = env.patient(), env.patient()
    content = pdf_bytes(marker())
    doc = env.post_json("DocumentReference", document(p1, content))
    ref = binary_ref(doc)
    lonely = env.client.post(
        "/fhir/Binary", content=b"x" * 100, headers={"content-type": "application/pdf"}
    ).json()["id"]

    caller.patient(p1)
    r = raw_get(env, ref)
    assert r.status_code == 200 and r.content == content
    assert raw_get(env, f"Binary/{lonely}").status_code == 404  # no document of p1 points to it

    caller.patient(p2)
    r = raw_get(env, ref)
    assert r.status_code == 404 and content[:32] not in r.content
    assert r.headers["content-type"].startswith("application/fhir+json")

    caller.user("user/Patient.rs")
    assert raw_get(env, ref).status_code == 403
    caller.user("user/Binary.r")
    assert raw_get(env, ref).content == content
    # a patient token may not overwrite or delete what it cannot see
    caller.patient(p2)
    r = env.client.put(f"/fhir/{ref}", content=b"evil", headers={"content-type": "application/pdf"})
    assert r.status_code == 404
    assert env.client.delete(f"/fhir/{ref}").status_code == 404

    outcomes = [(e.binary_id, e.outcome) for e in env.audit]
    bid = ref.split("/")[1]
    assert outcomes == [
        (bid, "success"),
        (lonely, "denied"),
        (bid, "denied"),
        (bid, "denied"),  # no Binary scope (403)
        (bid, "success"),
    ]
    first = env.audit[0]
    assert first.documents == (doc["id"],) and first.size == len(content)
    assert first.access.patient == p1


def test_patient_upload_is_keyed_to_the_patient(env: DocEnv) -> None:
    p1 = env.patient()
    env.caller.patient(p1)
    r = env.client.post(
        "/fhir/Binary", content=b"%PDF-1.4 mine", headers={"content-type": "application/pdf"}
    )
    assert r.status_code == 201
    with env.docs.fhir.db.read() as conn:
        owner = conn.execute(sa.select(document_blobs.c.patient_id)).scalar_one()
    assert owner == p1


# -- ranges and negotiation -------------------------------------------------------------------


def test_range_requests(env: DocEnv) -> None:
    content = bytes(range(256)) * 100  # 25 600 bytes, 7 chunks of 4 KiB
    bid = env.client.post(
        "/fhir/Binary", content=content, headers={"content-type": "application/octet-stream"}
    ).json()["id"]
    ref = f"Binary/{bid}"
    size = len(content)
    for spec, (start, end) in {
        "bytes=0-0": (0, 0),
        "bytes=4090-8200": (4090, 8200),
        "bytes=4096-8191": (4096, 8191),
        "bytes=25000-": (25000, size - 1),
        "bytes=-100": (size - 100, size - 1),
        "bytes=20000-99999": (20000, size - 1),
    }.items():
        r = raw_get(env, ref, range=spec)
        assert r.status_code == 206, spec
        assert r.content == content[start : end + 1], spec
        assert r.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert r.headers["content-length"] == str(end - start + 1)
    r = raw_get(env, ref, range=f"bytes={size}-")
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
    assert r.json()["resourceType"] == "OperationOutcome"
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=9-3"):
        r = raw_get(env, ref, range=ignored)
        assert r.status_code == 200 and r.content == content
    r = raw_get(env, ref, range="bytes=0-9", **{"if-range": '"1"'})
    assert r.status_code == 206 and r.content == content[:10]
    r = raw_get(env, ref, range="bytes=0-9", **{"if-range": '"2"'})
    assert r.status_code == 200 and r.content == content
    assert env.audit[-3].outcome == "unsatisfiable" or any(
        e.outcome == "unsatisfiable" for e in env.audit
    )
    assert any(e.byte_range == (4090, 8200) for e in env.audit)


def test_content_negotiation(env: DocEnv) -> None:
    content = pdf_bytes(marker(), 5000)
    bid = env.client.post(
        "/fhir/Binary", content=content, headers={"content-type": "application/pdf"}
    ).json()["id"]
    ref = f"/fhir/Binary/{bid}"
    assert env.client.get(ref, headers={"accept": ""}).content == content
    assert env.client.get(ref, headers={"accept": "application/*"}).content == content
    assert env.client.get(ref, headers={"accept": "image/png"}).status_code == 406
    r = env.client.get(ref + "?_format=json", headers={"accept": "application/pdf"})
    assert base64.b64decode(r.json()["data"]) == content
    r = env.client.get(ref, headers={"accept": "application/json"})
    assert r.json()["resourceType"] == "Binary"
    empty = env.post_json("Binary", {"resourceType": "Binary", "contentType": "text/plain"})
    r = env.client.get(f"/fhir/Binary/{empty['id']}", headers={"accept": "text/plain"})
    assert r.status_code == 200 and r.content == b"" and r.headers["content-type"] == "text/plain"


# -- versions ----------------------------------------------------------------------------------


def test_update_vread_and_delete(env: DocEnv) -> None:
    v1, v2 = pdf_bytes(marker(), 9000), cda_bytes(marker())
    bid = env.client.post(
        "/fhir/Binary", content=v1, headers={"content-type": "application/pdf"}
    ).json()["id"]
    r = env.client.put(
        f"/fhir/Binary/{bid}",
        content=v2,
        headers={"content-type": "text/xml", "if-match": 'W/"1"', **_accept()},
    )
    assert r.status_code == 200, r.text
    assert r.json()["meta"]["versionId"] == "2"
    r = env.client.put(
        f"/fhir/Binary/{bid}", content=b"x", headers={"content-type": "text/xml", "if-match": '"1"'}
    )
    assert r.status_code == 412
    r = raw_get(env, f"Binary/{bid}")
    assert (
        r.content == v2 and r.headers["etag"] == '"2"' and r.headers["content-type"] == "text/xml"
    )
    r = raw_get(env, f"Binary/{bid}/_history/1")
    assert r.content == v1 and r.headers["content-type"] == "application/pdf"
    assert raw_get(env, f"Binary/{bid}/_history/9").status_code == 404
    assert env.client.delete(f"/fhir/Binary/{bid}").status_code == 204
    assert raw_get(env, f"Binary/{bid}").status_code == 410
    # update-as-create with a client id, as FHIR JSON
    body = {
        "resourceType": "Binary",
        "id": "doc-1",
        "contentType": "text/plain",
        "data": b64(b"hi"),
    }
    r = env.client.put("/fhir/Binary/doc-1", json=body, headers=FHIR_JSON)
    assert r.status_code == 201
    assert raw_get(env, "Binary/doc-1").content == b"hi"


# -- size limits -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["db", "dir"])
def test_size_limit_is_413(settings: Settings, tmp_path: Path, backend: str) -> None:
    documents = doc_settings(tmp_path, backend, max_upload_bytes=64 * 1024)
    with make_env(settings, documents, tmp_path) as env:
        big = b"\x01" * (64 * 1024 + 1)
        r = env.client.post("/fhir/Binary", content=big, headers={"content-type": "image/png"})
        assert r.status_code == 413
        assert r.json()["issue"][0]["code"] == "too-costly"

        def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(20):
                yield b"\x02" * 8192

        r = env.client.post(
            "/fhir/Binary", content=chunked(), headers={"content-type": "image/png"}
        )
        assert r.status_code == 413
        # base64 JSON (Binary or inline DocumentReference data): the decoded content counts
        data = b64(b"\x03" * 70_000)
        body = {"resourceType": "Binary", "contentType": "image/png", "data": data}
        r = env.client.post("/fhir/Binary", json=body, headers=FHIR_JSON)
        assert r.status_code == 413
        doc = document(env.patient(), b"\x03" * 70_000)
        r = env.client.post("/fhir/DocumentReference", json=doc, headers=FHIR_JSON)
        assert r.status_code == 413
        ok = env.client.post(
            "/fhir/Binary", content=b"\x04" * 64 * 1024, headers={"content-type": "image/png"}
        )
        assert ok.status_code == 201
        with env.docs.fhir.db.read() as conn:
            assert (
                conn.execute(sa.select(sa.func.count()).select_from(document_blobs)).scalar() == 1
            )
        spool = tmp_path / "spool"
        assert not spool.exists() or not any(spool.iterdir())
        if backend == "dir":
            assert not any((tmp_path / "blobs" / ".spool").iterdir())
            assert len(list((tmp_path / "blobs").glob("*/*.blob"))) == 1


# -- superseding -------------------------------------------------------------------------------


def test_replaces_supersedes_the_target_in_the_same_transaction(env: DocEnv) -> None:
    pid, other = env.patient(), env.patient()
    old = env.post_json("DocumentReference", document(pid, pdf_bytes(marker(), 3000)))
    new = document(pid, pdf_bytes(marker(), 3000))
    new["relatesTo"] = [
        {"code": "replaces", "target": {"reference": f"DocumentReference/{old['id']}"}}
    ]
    env.post_json("DocumentReference", new)
    got = env.client.get(f"/fhir/DocumentReference/{old['id']}", headers=FHIR_JSON).json()
    assert got["status"] == "superseded" and got["meta"]["versionId"] == "2"
    assert got["content"] == old["content"]
    # still downloadable (superseded documents stay readable)
    assert raw_get(env, binary_ref(old)).status_code == 200

    # a failing transaction supersedes nothing
    third = env.post_json("DocumentReference", document(pid, url=binary_ref(old)))
    replacing = document(pid, b"abc", size=99)  # wrong size: the entry fails
    replacing["relatesTo"] = [
        {"code": "replaces", "target": {"reference": f"DocumentReference/{third['id']}"}}
    ]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": replacing, "request": {"method": "POST", "url": "DocumentReference"}}
        ],
    }
    assert env.client.post("/fhir", json=bundle, headers=FHIR_JSON).status_code == 400
    got = env.client.get(f"/fhir/DocumentReference/{third['id']}", headers=FHIR_JSON).json()
    assert got["status"] == "current" and got["meta"]["versionId"] == "1"

    # another subject's document cannot be superseded
    foreign = document(other, b"abc")
    foreign["relatesTo"] = replacing["relatesTo"]
    r = env.client.post("/fhir/DocumentReference", json=foreign, headers=FHIR_JSON)
    assert r.status_code == 422
    got = env.client.get(f"/fhir/DocumentReference/{third['id']}", headers=FHIR_JSON).json()
    assert got["status"] == "current"


# -- at rest, the database view ------------------------------------------------------------


def test_chunks_are_separately_sealed(env: DocEnv) -> None:
    content = bytes(10_000)  # zeros: any plaintext leak would be obvious
    bid = env.client.post(
        "/fhir/Binary", content=content, headers={"content-type": "application/octet-stream"}
    ).json()["id"]
    with env.docs.fhir.db.read() as conn:
        info = conn.execute(sa.select(document_blobs)).one()
        chunks = [r[0] for r in conn.execute(sa.select(document_chunks.c.data))]
    assert info.binary_id == bid and info.size == 10_000 and info.chunk_count == 3
    assert info.sha1 == sha1_b64(content)
    if info.backend == "db":
        assert [len(c) for c in chunks] == [4096 + 16, 4096 + 16, 10_000 - 8192 + 16]
        assert all(bytes(16) not in c for c in chunks)
    else:
        assert chunks == []
        path = env.docs.settings.blob_dir
        assert path is not None
        (blob,) = path.glob("*/*.blob")
        assert blob.stat().st_size == 10_000 + 3 * 16
        assert bytes(64) not in blob.read_bytes()
