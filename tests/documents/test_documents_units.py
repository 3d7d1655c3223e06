"""Unit tests of the document store's parts: key ring files, key wrapping and its context
binding, chunk nonces, range parsing, body-limit rules, settings, and the migration chain."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from fhir_consent.crypto import b64encode
from fhir_consent.documents import DocumentSettings, IntegrityFailure, MasterKeyError
from fhir_consent.documents.keys import ContentKey, DataKeyStore, MasterKeyRing
from fhir_consent.documents.routes import parse_range
from fhir_consent.documents.service import local_reference
from fhir_consent.documents.tables import document_data_keys
from fhir_consent.limits import BodyLimit, LimitRule
from fhir_consent.store.migrate import alembic_config


def test_key_ring_file_is_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "k" / "ring.json"
    ring = MasterKeyRing.load(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = MasterKeyRing.load(path)
    assert again.active_kid == ring.active_kid
    kid, sealed = ring.wrap(b"ctx", b"s" * 32)
    assert again.unwrap(kid, b"ctx", sealed) == b"s" * 32
    secret = json.loads(path.read_text())["keys"][0]["key"]
    assert secret not in repr(ring) and ring.active_kid in repr(ring)
    rotated = again.rotate()
    assert ring.unwrap(kid, b"ctx", sealed) == b"s" * 32
    kid2, sealed2 = rotated.wrap(b"ctx", b"t" * 32)
    assert kid2 != kid
    assert ring.unwrap(kid2, b"ctx", sealed2) == b"t" * 32  # reloads the rotated file
    with pytest.raises(MasterKeyError):
        MasterKeyRing.load(tmp_path / "missing.json", create=False)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(MasterKeyError):
        MasterKeyRing.load(tmp_path / "bad.json")


def test_master_keys_from_the_environment_value() -> None:
    key = b64encode(os.urandom(32))
    ring = MasterKeyRing.from_value(f"new:{key}, old:{b64encode(os.urandom(32))}")
    assert ring.active_kid == "new" and ring.key_ids == ("new", "old")
    secret = "c2VjcmV0"
    with pytest.raises(MasterKeyError) as exc:
        MasterKeyRing.from_value(f"a:{secret}")
    assert secret not in str(exc.value)
    with pytest.raises(MasterKeyError):
        MasterKeyRing.from_value(" , ")
    s = DocumentSettings(master_keys=f"k1:{key}")  # type: ignore[arg-type]
    assert key not in repr(s) and key not in str(s.model_dump())


def test_wrapped_keys_are_bound_to_their_row() -> None:
    engine = sa.create_engine("sqlite://")
    document_data_keys.create(engine)
    store = DataKeyStore(MasterKeyRing.generate(), lambda: 1)
    with engine.begin() as conn:
        a = store.for_patient(conn, "a")
        b = store.for_patient(conn, "b")
        assert store.for_patient(conn, "a").key_id == a.key_id
        ck = ContentKey.generate("blob1")
        wrapped = a.wrap_content_key(ck)
        assert a.open_content_key("blob1", wrapped, ck.nonce_prefix).secret_bytes() == bytes(
            ck.secret_bytes()
        )
        with pytest.raises(IntegrityFailure):
            b.open_content_key("blob1", wrapped, ck.nonce_prefix)  # another patient's key
        with pytest.raises(IntegrityFailure):
            a.open_content_key("blob2", wrapped, ck.nonce_prefix)  # another blob's slot
        # swap the wrapped data keys of two patients: neither opens
        t = document_data_keys.c
        wa, wb = (
            conn.execute(sa.select(t.wrapped).where(t.patient_id == p)).scalar_one() for p in "ab"
        )
        conn.execute(document_data_keys.update().where(t.patient_id == "a").values(wrapped=wb))
        with pytest.raises(IntegrityFailure):
            store.get(conn, a.key_id)
        assert store.shred(conn, "b") == [b.key_id]
        assert store.get(conn, b.key_id) is None
        assert "secret" not in repr(a) and a.key_id in repr(a)
        del wa


def test_chunk_nonces_bind_position_and_finality() -> None:
    key = ContentKey.generate("blob")
    c0 = key.seal(0, False, b"first")
    c1 = key.seal(1, True, b"last")
    assert key.open(0, False, c0) == b"first" and key.open(1, True, c1) == b"last"
    with pytest.raises(IntegrityFailure) as exc:
        key.open(1, True, c0)  # moved
    assert exc.value.chunk == 1 and "first" not in str(exc.value)
    with pytest.raises(IntegrityFailure):
        key.open(0, True, c0)  # presented as the last chunk: truncation
    with pytest.raises(IntegrityFailure):
        ContentKey.generate("blob").open(0, False, c0)  # another blob's key
    assert len(c0) == len(b"first") + 16


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-4", 10, (0, 4)),
        ("bytes=5-", 10, (5, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-30", 10, (0, 9)),
        ("bytes=8-20", 10, (8, 9)),
        ("bytes=10-", 10, False),
        ("bytes=10-12", 10, False),
        ("bytes=-0", 10, False),
        ("bytes=0-0", 0, False),
        ("bytes=4-2", 10, None),
        ("bytes=0-1,3-4", 10, None),
        ("bytes=a-b", 10, None),
        ("lines=0-1", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: object) -> None:
    assert parse_range(header, size) == expected


def test_local_references() -> None:
    assert local_reference("Binary/abc", None) == ("Binary", "abc")
    assert local_reference("Binary/abc/_history/2", None) == ("Binary", "abc")
    assert local_reference("https://x/fhir/Binary/abc", "https://x/fhir") == ("Binary", "abc")
    assert local_reference("https://elsewhere/fhir/Binary/abc", "https://x/fhir") is None
    assert local_reference("urn:uuid:1", None) is None
    assert local_reference(None, None) is None


def test_body_limit_rules() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError

    binary = re.compile(r"/fhir/Binary(/[^/]+)?")
    json_rule = LimitRule(100, binary, media_types=frozenset({"application/fhir+json"}))
    limit = BodyLimit(app, 10, rules=[json_rule, LimitRule(1000, binary)])

    def scope(method: str, path: str, ctype: str = "application/pdf", root: str = "") -> dict:  # type: ignore[type-arg]
        headers = [(b"content-type", ctype.encode())]
        return {
            "type": "http",
            "method": method,
            "path": path,
            "root_path": root,
            "headers": headers,
        }

    assert limit.limit_for(scope("POST", "/fhir/Binary")) == 1000
    assert limit.limit_for(scope("PUT", "/fhir/Binary/x")) == 1000
    assert limit.limit_for(scope("POST", "/fhir/Binary", "application/fhir+json; x=y")) == 100
    assert limit.limit_for(scope("GET", "/fhir/Binary")) == 10
    assert limit.limit_for(scope("POST", "/fhir/Binary/x/y")) == 10
    assert limit.limit_for(scope("POST", "/fhir/Patient")) == 10
    assert limit.limit_for(scope("POST", "/api/fhir/Binary", root="/api")) == 1000


def test_blob_dir_alias_and_backend_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FHIR_CONSENT_DOCUMENTS_BLOB_DIR", raising=False)
    monkeypatch.delenv("FHIR_CONSENT_DOCUMENTS_BLOB_BACKEND", raising=False)
    monkeypatch.delenv("FHIR_CONSENT_BLOB_DIR", raising=False)
    assert DocumentSettings().backend == "db"
    monkeypatch.setenv("FHIR_CONSENT_BLOB_DIR", str(tmp_path))
    s = DocumentSettings()
    assert s.backend == "dir" and s.blob_dir == tmp_path
    monkeypatch.setenv("FHIR_CONSENT_DOCUMENTS_BLOB_BACKEND", "db")
    assert DocumentSettings().backend == "db"


def test_migration_chain_is_linear() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    revisions = {r.revision: r for r in script.walk_revisions()}
    assert revisions["0004"].down_revision in revisions


def test_install_is_lazy_and_replaceable(tmp_path: Path) -> None:
    from fhir_consent.app import create_core_app
    from fhir_consent.config import Settings
    from fhir_consent.documents import install, uninstall

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        open_access=True,
        smart_keys_dir=str(tmp_path / "smart"),
    )
    app = create_core_app(settings)
    ctx = app.state.fhir
    routes = len(app.router.routes)
    documents = DocumentSettings(
        blob_backend="dir",
        blob_dir=tmp_path / "blobs",
        master_key_file=tmp_path / "keys" / "ring.json",
    )
    first = install(app, ctx, documents)
    assert not (tmp_path / "keys").exists() and not (tmp_path / "blobs").exists()
    ours = first.installed[0]
    assert tuple(app.router.routes[: len(ours)]) == ours  # ahead of the generic routes
    with pytest.raises(RuntimeError):
        install(app, ctx, documents)
    second = install(app, ctx, documents, replace=True)
    assert second is not first and app.state.documents is second
    assert first.hooks.prewrite not in ctx.prewrites and second.hooks.prewrite in ctx.prewrites
    assert len(ctx.listeners) == 1 and len(app.router.routes) == routes + len(ours)
    assert ctx.patch_sources == [second.hooks.patch_source]
    uninstall(app)
    assert app.state.documents is None and len(app.router.routes) == routes
    assert ctx.prewrites == [] and ctx.listeners == [] and app.state.body_limit_rules == []
    assert ctx.patch_sources == []


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 17])
def test_sealer_is_independent_of_how_the_stream_is_cut(size: int) -> None:
    import random

    from fhir_consent.documents.storage import _Sealer

    class Sink:
        def __init__(self) -> None:
            self.chunks: list[tuple[int, bytes]] = []

        def put(self, index: int, ciphertext: bytes) -> None:
            self.chunks.append((index, ciphertext))

    data = os.urandom(size)
    key = ContentKey.generate("b")
    results = []
    rng = random.Random(size)
    for cuts in ([size], [4096] * (size // 4096 + 1), [rng.randint(1, 9000) for _ in range(20)]):
        sink = Sink()
        sealer = _Sealer(key, 4096, sink)
        pos = 0
        for cut in cuts:
            sealer.write(data[pos : pos + cut])
            pos += cut
        sealer.write(data[pos:])
        total, sha1, count = sealer.finish()
        assert total == size and count == max(1, -(-size // 4096))
        results.append(sink.chunks)
    assert results[0] == results[1] == results[2]
    chunks = results[0]
    assert [i for i, _ in chunks] == list(range(len(chunks)))
    plain = b"".join(key.open(i, i == len(chunks) - 1, c) for i, c in chunks)
    assert plain == data
    # the chunks are exactly what the high-level SecretBox produces
    import nacl.secret

    box = nacl.secret.SecretBox(key.secret_bytes())
    i, c = chunks[-1]
    assert box.decrypt(c, key.nonce(i, True)) == data[i * 4096 :]
