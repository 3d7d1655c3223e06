"""Authenticated encryption at rest (issue 6): corrupt, reordered or truncated ciphertext is
detected, logged without content and answered with an OperationOutcome — never with garbage
or partial bytes; crypto-shredding makes a patient's content unrecoverable; master keys
rotate."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from documents_kit import FHIR_JSON, DocEnv, doc_settings, document, make_env, marker, pdf_bytes

from fhir_consent.config import Settings
from fhir_consent.documents import (
    ContentDestroyed,
    MasterKeyError,
    MasterKeyRing,
    add_parser,
    rotate_master_key,
    shred,
)
from fhir_consent.documents.keys import DataKeyStore
from fhir_consent.documents.storage import BlobInfo
from fhir_consent.documents.tables import document_blobs, document_chunks, document_data_keys


@pytest.fixture(params=["db", "dir"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def env(settings: Settings, tmp_path: Path, backend: str) -> Iterator[DocEnv]:
    with make_env(settings, doc_settings(tmp_path, backend), tmp_path) as e:
        yield e


def upload(env: DocEnv, content: bytes, pid: str | None = None) -> str:
    if pid is None:
        r = env.client.post(
            "/fhir/Binary", content=content, headers={"content-type": "application/pdf"}
        )
        assert r.status_code == 201
        return str(r.json()["id"])
    doc = env.post_json("DocumentReference", document(pid, content))
    return str(doc["content"][0]["attachment"]["url"].split("/")[1])


def blob_of(env: DocEnv, bid: str) -> BlobInfo:
    with env.docs.fhir.db.read() as conn:
        row = conn.execute(
            sa.select(document_blobs.c.blob_id).where(document_blobs.c.binary_id == bid)
        ).one()
        info = env.docs.store.info(conn, row[0])
    assert info is not None
    return info


def tamper(env: DocEnv, info: BlobInfo, how: str) -> None:
    """Damage stored ciphertext: flip a byte of chunk 1, swap chunks 0 and 1, or drop the last
    chunk."""
    stride = info.chunk_size + 16
    path = env.docs.store.file_of(info)
    if path is not None:
        data = bytearray(path.read_bytes())
        if how == "flip":
            data[stride + 100] ^= 0x01
        elif how == "swap":
            data[:stride], data[stride : 2 * stride] = data[stride : 2 * stride], data[:stride]
        else:
            del data[(info.chunk_count - 1) * stride :]
        path.write_bytes(bytes(data))
        return
    c = document_chunks.c
    with env.docs.fhir.db.write() as conn:
        rows = dict(conn.execute(sa.select(c.seq, c.data).where(c.blob_id == info.blob_id)).all())

        def put(seq: int, value: bytes) -> None:
            conn.execute(
                document_chunks.update()
                .where(c.blob_id == info.blob_id, c.seq == seq)
                .values(data=value)
            )

        if how == "flip":
            damaged = bytearray(rows[1])
            damaged[100] ^= 0x01
            put(1, bytes(damaged))
        elif how == "swap":
            put(0, rows[1])
            put(1, rows[0])
        else:
            last = info.chunk_count - 1
            conn.execute(document_chunks.delete().where(c.blob_id == info.blob_id, c.seq == last))


@pytest.mark.parametrize("how", ["flip", "swap", "truncate"])
def test_damaged_ciphertext_is_an_operation_outcome(
    env: DocEnv, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = marker()
    content = pdf_bytes(secret, 3 * 4096)
    bid = upload(env, content)
    info = blob_of(env, bid)
    assert info.chunk_count == 3
    tamper(env, info, how)
    caplog.set_level(logging.INFO)
    for accept in ("application/pdf", "application/fhir+json"):
        r = env.client.get(f"/fhir/Binary/{bid}", headers={"accept": accept})
        assert r.status_code == 500
        assert r.headers["content-type"].startswith("application/fhir+json")
        outcome = r.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert "integrity" in outcome["issue"][0]["diagnostics"]
        assert content[:16] not in r.content
    records = [rec for rec in caplog.records if "integrity error" in rec.getMessage()]
    assert len(records) == 2 and all(rec.levelno == logging.ERROR for rec in records)
    for rec in caplog.records:
        assert secret not in rec.getMessage() and secret not in str(rec.args)
    assert [e.outcome for e in env.audit] == ["integrity-error", "integrity-error"]
    if how == "flip":  # ranges that avoid the damaged chunk still work
        r = env.client.get(f"/fhir/Binary/{bid}", headers={"accept": "*/*", "range": "bytes=0-99"})
        assert r.status_code == 206 and r.content == content[:100]


def test_truncation_at_a_chunk_boundary_is_detected(env: DocEnv) -> None:
    """Cutting the last chunk *and* fixing up the metadata still fails: the new last chunk was
    not sealed as final."""
    content = pdf_bytes(marker(), 3 * 4096)
    bid = upload(env, content)
    info = blob_of(env, bid)
    tamper(env, info, "truncate")
    with env.docs.fhir.db.write() as conn:
        conn.execute(
            document_blobs.update()
            .where(document_blobs.c.blob_id == info.blob_id)
            .values(chunk_count=2, size=2 * 4096)
        )
    r = env.client.get(f"/fhir/Binary/{bid}", headers={"accept": "*/*"})
    assert r.status_code == 500 and r.json()["resourceType"] == "OperationOutcome"


async def _asgi_get(app: Any, path: str) -> tuple[int, bytes, BaseException | None]:
    """Call the app directly and record exactly what it sent before failing."""
    sent: list[dict[str, Any]] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 443),
    }
    error: BaseException | None = None
    try:
        await app(scope, receive, send)
    except Exception as exc:  # noqa: BLE001 - the abort is what we observe
        error = exc
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, error


def test_without_pre_verification_a_bad_chunk_aborts_the_stream(
    settings: Settings, tmp_path: Path, backend: str
) -> None:
    documents = doc_settings(tmp_path, backend, verify_before_send=False)
    with make_env(settings, documents, tmp_path) as env:
        content = pdf_bytes(marker(), 3 * 4096)
        bid = upload(env, content)
        info = blob_of(env, bid)
        tamper(env, info, "flip")  # chunk 1 of 0..2
        app = env.client.app
        status, body, error = anyio.run(_asgi_get, app, f"/fhir/Binary/{bid}")
    assert status == 200 and error is not None  # headers went out, then the connection aborted
    # at most the verified chunk 0 (batches are verified before any of their bytes go out),
    # never a byte of the damaged chunk 1
    assert len(body) in (0, 4096) and content.startswith(body)


# -- crypto-shredding --------------------------------------------------------------------


def _snapshot(env: DocEnv) -> dict[str, list[dict[str, Any]]]:
    with env.docs.fhir.db.read() as conn:
        return {
            t.name: [dict(r._mapping) for r in conn.execute(sa.select(t))]
            for t in (document_data_keys, document_blobs, document_chunks)
        }


def test_shredding_makes_content_unrecoverable(env: DocEnv, backend: str, tmp_path: Path) -> None:
    p1, p2 = env.patient(), env.patient()
    c1, c2 = pdf_bytes(marker(), 9000), pdf_bytes(marker(), 9000)
    b1, b2 = upload(env, c1, p1), upload(env, c2, p2)
    raw = upload(env, b"%PDF-1.4 standalone", None)  # system domain until a document links it
    env.post_json("DocumentReference", document(p1, url=f"Binary/{raw}"))
    backup = _snapshot(env)
    files = {p: p.read_bytes() for p in (tmp_path / "blobs").rglob("*.blob")}

    report = shred(env.docs.fhir.db, f"Patient/{p1}", env.docs.settings)
    assert report.data_keys == 1 and report.blobs == 2
    assert set(report.binary_ids) == {b1, raw}
    for bid in (b1, raw):
        for accept in ("*/*", "application/fhir+json"):
            r = env.client.get(f"/fhir/Binary/{bid}", headers={"accept": accept})
            assert r.status_code == 410 and r.json()["resourceType"] == "OperationOutcome"
    assert env.client.get(f"/fhir/Binary/{b2}", headers={"accept": "*/*"}).content == c2
    # the documents (metadata) remain
    assert env.client.get(f"/fhir/Binary/{b1}", headers=FHIR_JSON).status_code == 410
    assert "gone" in [e.outcome for e in env.audit]
    if backend == "dir":
        assert len(list((tmp_path / "blobs").rglob("*.blob"))) == 1

    # Restoring the ciphertext and wrapped content keys from a backup does not help:
    store = env.docs.store
    with env.docs.fhir.db.write() as conn:
        for row in backup["document_blobs"]:
            if row["patient_id"] == p1:
                conn.execute(
                    document_blobs.update()
                    .where(document_blobs.c.blob_id == row["blob_id"])
                    .values(**row)
                )
        mine = {r["blob_id"] for r in backup["document_blobs"] if r["patient_id"] == p1}
        rows = [r for r in backup["document_chunks"] if r["blob_id"] in mine]
        if rows:
            conn.execute(document_chunks.insert(), rows)
        for path, data in files.items():
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
        for blob_id in mine:
            info = store.info(conn, blob_id)
            assert info is not None
            with pytest.raises(ContentDestroyed):
                store.content_key(conn, info)
    # … and once the master key is rotated and pruned, not even a backup of the key table.
    rotate_master_key(env.docs.fhir.db, env.docs.settings, prune=True)
    old_keys = [r for r in backup["document_data_keys"] if r["patient_id"] == p1]
    ring = MasterKeyRing.load(env.docs.settings.master_key_file, create=False)
    keys = DataKeyStore(ring, env.docs.fhir.clock)
    with env.docs.fhir.db.write() as conn:
        conn.execute(document_data_keys.insert(), old_keys)
        with pytest.raises(MasterKeyError):
            keys.get(conn, old_keys[0]["key_id"])
    # p2 is untouched by all of this
    assert env.client.get(f"/fhir/Binary/{b2}", headers={"accept": "*/*"}).content == c2


def test_shred_command(
    env: DocEnv, db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pid = env.patient()
    bid = upload(env, pdf_bytes(marker(), 5000), pid)
    s = env.docs.settings
    monkeypatch.setenv("FHIR_CONSENT_DOCUMENTS_BLOB_BACKEND", s.blob_backend)
    monkeypatch.setenv("FHIR_CONSENT_DOCUMENTS_MASTER_KEY_FILE", str(s.master_key_file))
    monkeypatch.setenv("FHIR_CONSENT_DOCUMENTS_SPOOL_DIR", str(s.spool_dir))
    if s.blob_dir is not None:
        monkeypatch.setenv("FHIR_CONSENT_BLOB_DIR", str(s.blob_dir))  # the name
    parser = argparse.ArgumentParser(prog="fhir-consent")
    add_parser(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> tuple[int, str]:
        args = parser.parse_args(["documents", *argv, "--database-url", db_url])
        code = args.func(args)
        return code, capsys.readouterr().out

    code, out = run("shred", "--patient", f"Patient/{pid}")
    assert code == 1 and "would destroy 1" in out
    assert env.client.get(f"/fhir/Binary/{bid}", headers={"accept": "*/*"}).status_code == 200
    code, out = run("shred", "--patient", f"Patient/{pid}", "--yes")
    assert code == 0 and "1 blob(s)" in out
    assert env.client.get(f"/fhir/Binary/{bid}", headers={"accept": "*/*"}).status_code == 410
    code, out = run("shred", "--patient", "Patient/not valid")
    assert code == 2
    code, out = run("rotate-master-key", "--prune")
    assert code == 0 and "re-wrapped" in out
    kept = upload(env, b"%PDF kept", env.patient())
    orphans = []
    if s.blob_dir is not None:  # a file a failed transaction left behind, and a stale spool
        orphans = [s.blob_dir / "ab" / f"ab{'0' * 30}.blob", s.blob_dir / ".spool" / "x"]
    assert s.spool_dir is not None
    orphans.append(s.spool_dir / "fhir-consent-spool-stale")
    for path in orphans:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"junk")
    code, out = run("gc", "--older-than", "0")
    assert code == 0 and f"removed {len(orphans)} orphan" in out
    assert not any(p.exists() for p in orphans)
    assert env.client.get(f"/fhir/Binary/{kept}", headers={"accept": "*/*"}).content == b"%PDF kept"


def test_master_key_rotation_keeps_content_readable(env: DocEnv) -> None:
    pid = env.patient()
    content = pdf_bytes(marker(), 6000)
    bid = upload(env, content, pid)
    before = MasterKeyRing.load(env.docs.settings.master_key_file, create=False)
    first = rotate_master_key(env.docs.fhir.db, env.docs.settings)
    assert first.rewrapped == 1 and first.active_kid != before.active_kid
    # the running app's ring reloads the file for the new key id
    assert env.client.get(f"/fhir/Binary/{bid}", headers={"accept": "*/*"}).content == content
    report = rotate_master_key(env.docs.fhir.db, env.docs.settings, prune=True)
    assert set(report.pruned) == {before.active_kid, first.active_kid}
    ring = MasterKeyRing.load(env.docs.settings.master_key_file, create=False)
    assert ring.key_ids == (report.active_kid,)
    assert env.client.get(f"/fhir/Binary/{bid}", headers={"accept": "*/*"}).content == content
    # new uploads after the rotation use the new key
    other = upload(env, b"%PDF new", env.patient())
    assert env.client.get(f"/fhir/Binary/{other}", headers={"accept": "*/*"}).content == b"%PDF new"


# -- streaming 'db' uploads --------------------------------------------------------------------


def test_a_db_upload_is_unreadable_until_committed_and_gc_removes_abandoned_ones(
    settings: Settings, tmp_path: Path
) -> None:
    """'db' uploads store their chunks while the body arrives, behind a provisional blob row
    with no key: nothing can read it, a commit checks every chunk is there, and one a crash
    abandoned is removed by gc (not while it may still be running)."""
    from fhir_consent.documents.errors import IntegrityFailure

    with make_env(settings, doc_settings(tmp_path, "db"), tmp_path) as env:
        store, db = env.docs.store, env.docs.fhir.db
        content = pdf_bytes(marker(), 3 * 4096 + 10)
        spool = store.spool("application/pdf")
        rows = spool.write(content) + spool.finish(sync=False)
        assert [r["seq"] for r in rows] == [0, 1, 2, 3]
        spool.store(rows[:2])
        with db.read() as conn:
            info = store.info(conn, spool.blob_id)
            assert info is not None and info.wrapped_key is None and info.size == 0
            with pytest.raises(ContentDestroyed):
                store.content_key(conn, info)
        with pytest.raises(IntegrityFailure), db.write() as conn:  # chunks 2 and 3 missing
            store.commit_spool(conn, spool, "application/pdf")
        with db.write() as conn:
            assert store.gc(conn) == 0  # an hour old at least: it may still be arriving
        with db.write() as conn:
            assert store.gc(conn, older_than_s=0) == 1
        with db.read() as conn:
            assert store.info(conn, spool.blob_id) is None
            left = conn.execute(
                sa.select(sa.func.count())
                .select_from(document_chunks)
                .where(document_chunks.c.blob_id == spool.blob_id)
            ).scalar_one()
            assert left == 0
        # a complete one commits, and reads back
        spool = store.spool("application/pdf")
        spool.store(spool.write(content))
        spool.store(spool.finish(sync=False))
        with db.write() as conn:
            info = store.commit_spool(conn, spool, "application/pdf")
        with db.read() as conn:
            key = store.content_key(conn, info)
        assert b"".join(store.reader(info, key).chunks(0, info.chunk_count - 1)) == content
