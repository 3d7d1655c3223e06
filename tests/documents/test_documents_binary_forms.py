"""A Binary as clients see it (issue 6, the PATCH bug): the stored resource is the client
form — metadata without ``data`` and without any pointer to encrypted storage — and PATCH
applies to what a client reads (with ``data``), exactly like an update of that form. On the
whole server, SQLite and PostgreSQL, both blob backends.

Every path that hands out a stored Binary is checked for storage internals (the pre-0006
blob extension, any blob id): PATCH (REST and Bundle entries) under every ``Prefer: return``,
read/vread, ``_history``, search (GET and POST, ``_include``/``_revinclude``), batch and
transaction entries (reads, writes, conditional creates), and the conditional-create return.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from documents_kit import (
    FHIR_JSON,
    DocEnv,
    at_rest,
    b64,
    cda_bytes,
    doc_settings,
    document,
    make_env,
    marker,
    pdf_bytes,
)

from fhir_consent.config import Settings
from fhir_consent.documents import BLOB_EXTENSION
from fhir_consent.documents.tables import document_blobs, document_chunks, document_versions
from fhir_consent.store.tables import resource_versions, resources

PATCH = {"content-type": "application/json-patch+json", "accept": "application/fhir+json"}


@pytest.fixture(params=["db", "dir"])
def env(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Iterator[DocEnv]:
    with make_env(settings, doc_settings(tmp_path, request.param), tmp_path) as e:
        yield e


def blob_ids(env: DocEnv) -> list[str]:
    with env.docs.fhir.db.read() as conn:
        return [r[0] for r in conn.execute(sa.select(document_blobs.c.blob_id))]


def assert_clean(env: DocEnv, body: bytes | str) -> None:
    """No storage internals in a response body: not the blob extension, not any blob id."""
    text = body if isinstance(body, str) else body.decode("utf-8", "replace")
    assert BLOB_EXTENSION not in text
    assert "urn:fhir-consent" not in text
    for blob_id in blob_ids(env):
        assert blob_id not in text


def upload(env: DocEnv, content: bytes, ctype: str = "application/pdf") -> str:
    r = env.client.post("/fhir/Binary", content=content, headers={"content-type": ctype})
    assert r.status_code == 201, r.text
    assert_clean(env, r.content)
    return str(r.json()["id"])


def raw(env: DocEnv, path: str) -> Any:
    return env.client.get(f"/fhir/{path}", headers={"accept": "*/*"})


def as_resource(env: DocEnv, path: str) -> dict[str, Any]:
    r = env.client.get(f"/fhir/{path}", headers={"accept": "application/fhir+json"})
    assert r.status_code == 200, r.text
    assert_clean(env, r.content)
    out: dict[str, Any] = r.json()
    return out


def patch(env: DocEnv, bid: str, ops: list[dict[str, Any]], **headers: str) -> Any:
    r = env.client.patch(
        f"/fhir/Binary/{bid}", content=orjson.dumps(ops), headers={**PATCH, **headers}
    )
    assert_clean(env, r.content)
    return r


def versions(env: DocEnv, bid: str) -> dict[int, str]:
    v = document_versions.c
    with env.docs.fhir.db.read() as conn:
        rows = conn.execute(sa.select(v.version_id, v.blob_id).where(v.binary_id == bid))
        return {int(a): str(b) for a, b in rows}


# -- PATCH -------------------------------------------------------------------------------------


def test_patch_applies_to_the_read_form_like_an_update(env: DocEnv) -> None:
    v1 = pdf_bytes(marker(), 9000)
    bid = upload(env, v1)

    # Metadata only: the content stays (the same blob, neither decrypted nor copied).
    r = patch(env, bid, [{"op": "replace", "path": "/contentType", "value": "application/x-pdf"}])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["contentType"] == "application/x-pdf" and body["meta"]["versionId"] == "2"
    assert body["data"] == b64(v1) and "extension" not in body["meta"]
    got = raw(env, f"Binary/{bid}")
    assert got.content == v1 and got.headers["content-type"] == "application/x-pdf"
    assert got.headers["etag"] == '"2"'
    shared = versions(env, bid)
    assert shared.keys() == {1, 2} and shared[1] == shared[2] and len(blob_ids(env)) == 1

    # The read form has data: 'test' sees the content, 'replace' changes it.
    v3 = cda_bytes(marker())
    r = patch(
        env,
        bid,
        [
            {"op": "test", "path": "/data", "value": b64(v1)},
            {"op": "replace", "path": "/data", "value": b64(v3)},
            {"op": "replace", "path": "/contentType", "value": "application/hl7-cda+xml"},
        ],
        **{"if-match": 'W/"2"'},
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"] == b64(v3)
    got = raw(env, f"Binary/{bid}")
    assert got.content == v3 and got.headers["content-type"] == "application/hl7-cda+xml"
    assert base64.b64decode(as_resource(env, f"Binary/{bid}")["data"]) == v3
    # earlier versions keep their own content and type
    old = raw(env, f"Binary/{bid}/_history/2")
    assert old.content == v1 and old.headers["content-type"] == "application/x-pdf"
    assert raw(env, f"Binary/{bid}/_history/1").headers["content-type"] == "application/pdf"
    assert len(set(versions(env, bid).values())) == 2
    # the new content is encrypted at rest like any upload
    assert v3[:64] not in at_rest(env.docs) and b64(v3)[:64].encode() not in at_rest(env.docs)

    # A failing 'test' writes nothing; a stale If-Match is 412.
    r = patch(env, bid, [{"op": "test", "path": "/data", "value": b64(v1)}])
    assert r.status_code == 422
    r = patch(
        env,
        bid,
        [{"op": "replace", "path": "/contentType", "value": "x/y"}],
        **{"if-match": 'W/"1"'},
    )
    assert r.status_code == 412
    assert as_resource(env, f"Binary/{bid}")["meta"]["versionId"] == "3"

    # A client cannot graft a storage pointer on through a patch: it is dropped.
    other = upload(env, pdf_bytes(marker(), 3000))
    foreign = versions(env, other)[1]
    r = patch(
        env,
        bid,
        [
            {
                "op": "add",
                "path": "/meta/extension",
                "value": [{"url": BLOB_EXTENSION, "valueId": foreign}],
            }
        ],
    )
    assert r.status_code == 200 and raw(env, f"Binary/{bid}").content == v3
    assert versions(env, bid)[4] == versions(env, bid)[3]

    # Removing /data leaves a Binary without content, as an update without data does.
    r = patch(env, bid, [{"op": "remove", "path": "/data"}])
    assert r.status_code == 200
    assert raw(env, f"Binary/{bid}").content == b""
    assert "data" not in as_resource(env, f"Binary/{bid}")
    assert 5 not in versions(env, bid)
    # … and adding it back stores new content.
    r = patch(env, bid, [{"op": "add", "path": "/data", "value": b64(b"back again")}])
    assert r.status_code == 200 and raw(env, f"Binary/{bid}").content == b"back again"
    # resourceType and id cannot change
    r = patch(env, bid, [{"op": "replace", "path": "/id", "value": "other"}])
    assert r.status_code == 400


@pytest.mark.parametrize("prefer", ["representation", "minimal", "OperationOutcome"])
def test_patch_honours_prefer_return(env: DocEnv, prefer: str) -> None:
    bid = upload(env, pdf_bytes(marker(), 5000))
    ops = [{"op": "replace", "path": "/contentType", "value": "text/plain"}]
    r = patch(env, bid, ops, prefer=f"return={prefer}")
    assert r.status_code == 200
    assert r.headers["etag"] == 'W/"2"' and r.headers["location"].endswith("/_history/2")
    if prefer == "minimal":
        assert r.content == b""
    elif prefer == "OperationOutcome":
        assert r.json()["resourceType"] == "OperationOutcome"
    else:
        assert r.json()["resourceType"] == "Binary" and r.json()["contentType"] == "text/plain"


def test_patch_that_needs_large_content_is_refused(settings: Settings, tmp_path: Path) -> None:
    documents = doc_settings(tmp_path, "db", max_json_upload_bytes=4096)
    with make_env(settings, documents, tmp_path) as env:
        content = pdf_bytes(marker(), 10_000)
        bid = upload(env, content)
        r = patch(env, bid, [{"op": "test", "path": "/data", "value": b64(content)}])
        assert r.status_code == 422 and r.json()["issue"][0]["code"] == "too-costly"
        r = patch(env, bid, [{"op": "replace", "path": "", "value": {"resourceType": "Binary"}}])
        assert r.status_code == 422  # the whole document includes the content
        # metadata patches never need the content, whatever its size
        ok = patch(env, bid, [{"op": "replace", "path": "/contentType", "value": "text/plain"}])
        assert ok.status_code == 200 and raw(env, f"Binary/{bid}").content == content


def test_patch_on_data_needs_read_access(env: DocEnv) -> None:
    pid, other = env.patient(), env.patient()
    content = pdf_bytes(marker(), 4000)
    doc = env.post_json("DocumentReference", document(pid, content))
    bid = doc["content"][0]["attachment"]["url"].split("/")[1]
    env.caller.patient(pid, "patient/Binary.u patient/DocumentReference.r")
    r = patch(env, bid, [{"op": "test", "path": "/data", "value": b64(content)}])
    assert r.status_code == 403  # a 'test' on /data would tell a writer the content
    r = patch(env, bid, [{"op": "replace", "path": "/contentType", "value": "application/x-pdf"}])
    assert r.status_code == 200, r.text
    env.caller.patient(pid, "patient/Binary.ru patient/DocumentReference.r")
    r = patch(env, bid, [{"op": "test", "path": "/data", "value": b64(content)}])
    assert r.status_code == 200
    env.caller.patient(other, "patient/Binary.ru patient/DocumentReference.r")
    r = patch(env, bid, [{"op": "replace", "path": "/contentType", "value": "text/plain"}])
    assert r.status_code == 404  # not one of this patient's documents


def test_patch_of_damaged_content_is_an_operation_outcome(
    env: DocEnv, caplog: pytest.LogCaptureFixture
) -> None:
    secret = marker()
    content = pdf_bytes(secret, 3 * 4096)
    bid = upload(env, content)
    blob = versions(env, bid)[1]
    path = None
    with env.docs.fhir.db.write() as conn:
        info = env.docs.store.info(conn, blob)
        assert info is not None
        path = env.docs.store.file_of(info)
        if path is None:
            c = document_chunks.c
            data = bytearray(
                conn.execute(sa.select(c.data).where(c.blob_id == blob, c.seq == 1)).scalar_one()
            )
            data[10] ^= 1
            conn.execute(
                document_chunks.update()
                .where(c.blob_id == blob, c.seq == 1)
                .values(data=bytes(data))
            )
    if path is not None:
        damaged = bytearray(path.read_bytes())
        damaged[4096 + 16 + 10] ^= 1
        path.write_bytes(bytes(damaged))
    caplog.set_level(logging.INFO)
    r = patch(env, bid, [{"op": "test", "path": "/data", "value": b64(content)}])
    assert r.status_code == 500 and r.json()["resourceType"] == "OperationOutcome"
    assert "integrity" in r.json()["issue"][0]["diagnostics"]
    assert any("integrity error" in rec.getMessage() for rec in caplog.records)
    assert all(secret not in rec.getMessage() for rec in caplog.records)
    assert versions(env, bid).keys() == {1}  # nothing written


# -- no path shows the stored internals ----------------------------------------------------------


def _bundle(kind: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def _patch_entry(bid: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resource": {
            "resourceType": "Binary",
            "contentType": "application/json-patch+json",
            "data": b64(orjson.dumps(ops)),
        },
        "request": {"method": "PATCH", "url": f"Binary/{bid}"},
    }


def test_no_path_exposes_storage_internals(env: DocEnv) -> None:
    pid = env.patient()
    content = pdf_bytes(marker(), 6000)
    raw_id = upload(env, content)
    json_id = env.post_json(
        "Binary",
        {
            "resourceType": "Binary",
            "contentType": "text/plain",
            "data": b64(b"hello"),
            "securityContext": {"reference": f"Patient/{pid}"},
        },
    )["id"]
    doc = document(pid, cda_bytes(marker()), contentType="application/hl7-cda+xml")
    doc["context"] = {"related": [{"reference": f"Binary/{raw_id}"}]}
    doc = env.post_json("DocumentReference", doc)
    inline_id = doc["content"][0]["attachment"]["url"].split("/")[1]
    ids = [raw_id, json_id, inline_id]
    assert len(blob_ids(env)) == 3

    def get(path: str) -> Any:
        r = env.client.get(f"/fhir/{path}", headers=FHIR_JSON)
        assert r.status_code == 200, (path, r.text)
        assert_clean(env, r.content)
        return r.json()

    def entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
        return [e["resource"] for e in bundle.get("entry", []) if "resource" in e]

    # search (GET, POST, includes) and history: metadata only
    found = get(f"Binary?_id={','.join(ids)}")
    assert found["total"] == 3 and all("data" in b for b in entries(found))
    r = env.client.post(
        "/fhir/Binary/_search",
        content=f"_id={raw_id}",
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "accept": "application/fhir+json",
        },
    )
    assert r.status_code == 200 and r.json()["total"] == 1
    assert_clean(env, r.content)
    included = get(f"DocumentReference?_id={doc['id']}&_include=DocumentReference:related")
    assert {e["id"] for e in entries(included)} == {doc["id"], raw_id}
    rev = get(f"Binary?_id={raw_id}&_revinclude=DocumentReference:related")
    assert {e["id"] for e in entries(rev)} == {raw_id, doc["id"]}
    for path in ("Binary/_history", f"Binary/{raw_id}/_history"):
        assert all("data" in b for b in entries(get(path)) if b["resourceType"] == "Binary")
    assert all("data" not in b for b in entries(get(f"Binary?_id={raw_id}&_elements=contentType")))
    # the Binary's own read and vread: its content, nothing internal
    for path in (f"Binary/{raw_id}", f"Binary/{raw_id}/_history/1"):
        assert base64.b64decode(as_resource(env, path)["data"]) == content

    # batch: reads, a search, writes, a conditional create that matches
    batch = _bundle(
        "batch",
        [
            {"request": {"method": "GET", "url": f"Binary/{raw_id}"}},
            {"request": {"method": "GET", "url": f"Binary/{json_id}/_history/1"}},
            {"request": {"method": "GET", "url": f"Binary?_id={inline_id}"}},
            {
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "text/plain",
                    "data": b64(b"new"),
                },
                "request": {"method": "POST", "url": "Binary"},
            },
            {
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "text/plain",
                    "data": b64(b"dup"),
                },
                "request": {"method": "POST", "url": "Binary", "ifNoneExist": f"_id={json_id}"},
            },
            {
                "resource": {
                    "resourceType": "Binary",
                    "id": json_id,
                    "contentType": "text/plain",
                    "data": b64(b"hello, again"),
                },
                "request": {"method": "PUT", "url": f"Binary/{json_id}"},
            },
            _patch_entry(
                inline_id, [{"op": "replace", "path": "/contentType", "value": "text/xml"}]
            ),
        ],
    )
    r = env.client.post("/fhir", json=batch, headers=FHIR_JSON)
    assert r.status_code == 200, r.text
    assert_clean(env, r.content)
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses == ["200 OK", "200 OK", "200 OK", "201 Created", "200 OK", "200 OK", "200 OK"]
    assert all("data" in b for b in entries(r.json()) if b["resourceType"] == "Binary")
    assert raw(env, f"Binary/{json_id}").content == b"hello, again"
    patched = raw(env, f"Binary/{inline_id}")
    assert patched.headers["content-type"] == "text/xml" and patched.content.startswith(b"<?xml")

    # transaction: the same writes, atomically; a PATCH entry on /data works like the REST one
    transaction = _bundle(
        "transaction",
        [
            {
                "fullUrl": "urn:uuid:5a0b1a53-0000-4000-8000-000000000001",
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "text/plain",
                    "data": b64(b"tx"),
                },
                "request": {"method": "POST", "url": "Binary"},
            },
            {
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "text/plain",
                    "data": b64(b"x"),
                },
                "request": {"method": "POST", "url": "Binary", "ifNoneExist": f"_id={raw_id}"},
            },
            _patch_entry(
                json_id,
                [
                    {"op": "test", "path": "/data", "value": b64(b"hello, again")},
                    {"op": "replace", "path": "/data", "value": b64(b"patched in a transaction")},
                ],
            ),
        ],
    )
    r = env.client.post("/fhir", json=transaction, headers=FHIR_JSON)
    assert r.status_code == 200, r.text
    assert_clean(env, r.content)
    assert all("data" in b for b in entries(r.json()) if b["resourceType"] == "Binary")
    assert raw(env, f"Binary/{json_id}").content == b"patched in a transaction"
    r = env.client.post(
        "/fhir",
        json=_bundle(
            "transaction",
            [_patch_entry(json_id, [{"op": "test", "path": "/data", "value": b64(b"nope")}])],
        ),
        headers=FHIR_JSON,
    )
    assert r.status_code == 422
    assert_clean(env, r.content)

    # the REST conditional create returns the match, as it is stored for clients
    for body, ctype in (
        (b"again", "text/plain"),
        (
            orjson.dumps(
                {"resourceType": "Binary", "contentType": "text/plain", "data": b64(b"j")}
            ),
            "application/fhir+json",
        ),
    ):
        r = env.client.post(
            "/fhir/Binary",
            content=body,
            headers={
                "content-type": ctype,
                "if-none-exist": f"_id={raw_id}",
                "accept": "application/fhir+json",
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["id"] == raw_id and "data" in r.json()
        assert_clean(env, r.content)
    assert raw(env, f"Binary/{raw_id}").content == content  # untouched

    # nothing internal is stored in the resources either (current and every version)
    with env.docs.fhir.db.read() as conn:
        for table in (resources, resource_versions):
            for (content,) in conn.execute(
                sa.select(table.c.content).where(
                    table.c.res_type == "Binary", table.c.content.is_not(None)
                )
            ):
                assert_clean(env, content if isinstance(content, bytes) else orjson.dumps(content))


@pytest.mark.parametrize("prefer", ["representation", "minimal", "OperationOutcome"])
def test_writes_honour_prefer_return_without_internals(env: DocEnv, prefer: str) -> None:
    headers = {"prefer": f"return={prefer}", "accept": "application/fhir+json"}
    r = env.client.post(
        "/fhir/Binary",
        content=b"%PDF-1.4 x",
        headers={"content-type": "application/pdf", **headers},
    )
    assert r.status_code == 201
    bid = r.headers["location"].split("/")[-3]
    body = {"resourceType": "Binary", "id": bid, "contentType": "text/plain", "data": b64(b"y")}
    r2 = env.client.put(
        f"/fhir/Binary/{bid}",
        json=body,
        headers={"content-type": "application/fhir+json", **headers},
    )
    assert r2.status_code == 200
    bundle = _bundle(
        "batch",
        [
            {
                "resource": {**body, "data": b64(b"z")},
                "request": {"method": "PUT", "url": f"Binary/{bid}"},
            }
        ],
    )
    r3 = env.client.post("/fhir", json=bundle, headers={**FHIR_JSON, "prefer": f"return={prefer}"})
    assert r3.status_code == 200
    for resp in (r, r2, r3):
        assert_clean(env, resp.content)
    if prefer == "minimal":
        assert r.content == b"" and r2.content == b""
        assert "resource" not in r3.json()["entry"][0]
    elif prefer == "representation":
        assert r.json()["contentType"] == "application/pdf" and "data" in r.json()
        assert r2.json()["meta"]["versionId"] == "2"
    assert raw(env, f"Binary/{bid}").content == b"z"
