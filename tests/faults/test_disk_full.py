"""Fault: the blob directory's file system fills up (issue 8 §4).

The blob directory is a real 4 MiB tmpfs mounted for the test (mounting needs root, which
the developers' machines and CI have; the test is skipped where ``mount`` is refused). A
server process stores documents there; the file system is then filled to the last block.
Uploads — raw Binary, Binary JSON, a Binary update, DocumentReference with inline data —
answer 507 OperationOutcome (not 500), leave no row and no file behind (no DocumentReference
or Binary pointing at missing content), reads and searches keep working, the server logs
what happened, and the same uploads succeed once space is freed.
"""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from faults_kit import Server, base_env

FHIR = "application/fhir+json"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "blobs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:100]})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: Path) -> Path:
    """Write a filler file until the file system refuses another byte."""
    filler = path / "filler"
    block = b"\0" * 65536
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError:
            pass
        try:
            while True:
                fh.write(b"\0" * 512)
        except OSError:
            pass
    return filler


def _counts(db_url: str) -> dict[str, int]:
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return {
                t: int(conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one())
                for t in ("resources", "resource_versions", "document_blobs", "document_links")
            }
    finally:
        engine.dispose()


def _document(data: bytes) -> dict[str, object]:
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": "Patient/disk1"},
        "content": [
            {"attachment": {"contentType": "text/plain", "data": base64.b64encode(data).decode()}}
        ],
    }


def test_disk_full_on_the_blob_directory(db_url: str, small_fs: Path, tmp_path: Path) -> None:
    env = base_env(
        FHIR_CONSENT_DATABASE_URL=db_url,
        FHIR_CONSENT_AUTO_MIGRATE="false",
        FHIR_CONSENT_OPEN_ACCESS="true",
        FHIR_CONSENT_BLOB_DIR=str(small_fs),
        FHIR_CONSENT_DOCUMENTS_CHUNK_SIZE="65536",
    )
    server = Server(tmp_path, env)
    server.start()
    payload = os.urandom(300_000)
    try:
        with httpx.Client(base_url=server.base, timeout=30) as c:
            patient = {"resourceType": "Patient", "id": "disk1", "name": [{"family": "Disk"}]}
            assert (
                c.put("/Patient/disk1", json=patient, headers={"content-type": FHIR}).status_code
                == 201
            )
            first = c.post("/Binary", content=payload, headers={"content-type": "application/pdf"})
            assert first.status_code == 201, first.text
            doc = c.post(
                "/DocumentReference", json=_document(b"kept"), headers={"content-type": FHIR}
            )
            assert doc.status_code == 201, doc.text

            filler = _fill(small_fs)
            before = _counts(db_url)
            attempts = [
                c.post("/Binary", content=payload, headers={"content-type": "application/pdf"}),
                c.post(
                    "/Binary",
                    json={
                        "resourceType": "Binary",
                        "contentType": "application/pdf",
                        "data": base64.b64encode(payload).decode(),
                    },
                    headers={"content-type": FHIR},
                ),
                c.post(
                    "/DocumentReference", json=_document(payload), headers={"content-type": FHIR}
                ),
                c.put(
                    f"/Binary/{first.json()['id']}",
                    content=payload,
                    headers={"content-type": "application/pdf"},
                ),
            ]
            for r in attempts:
                assert r.status_code == 507, (r.status_code, r.text[:300])
                assert r.headers["content-type"].startswith(FHIR)
                body = r.json()
                assert body["resourceType"] == "OperationOutcome"
                assert "no space" in body["issue"][0]["diagnostics"]
            assert _counts(db_url) == before  # nothing recorded
            files = [p for p in small_fs.rglob("*") if p.is_file() and p != filler]
            spooled = [p for p in files if ".spool" in p.parts]
            assert spooled == []  # no partial file left behind
            assert len([p for p in files if p.suffix == ".blob"]) == before["document_blobs"]

            # reads keep working while the disk is full
            got = c.get(f"/Binary/{first.json()['id']}", headers={"accept": "*/*"})
            assert got.status_code == 200 and got.content == payload
            found = c.get("/DocumentReference", params={"subject": "Patient/disk1"})
            assert found.status_code == 200 and found.json()["total"] == 1

            filler.unlink()  # an operator frees space: no restart needed
            again = c.post("/Binary", content=payload, headers={"content-type": "application/pdf"})
            assert again.status_code == 201, again.text
            back = c.get(f"/Binary/{again.json()['id']}", headers={"accept": "*/*"})
            assert back.content == payload
            doc2 = c.post(
                "/DocumentReference", json=_document(payload[:1000]), headers={"content-type": FHIR}
            )
            assert doc2.status_code == 201
    finally:
        server.stop()
    log = server.log()
    assert "document store full (ENOSPC)" in log
    assert "internal error" not in log and "Traceback" not in log
