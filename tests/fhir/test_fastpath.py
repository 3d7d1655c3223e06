"""The short read path (:class:`fhir_consent.fhir.fastpath.FastRead`) answers exactly as the
router does: the whole server is built twice on one database, once without the layer, and
every response to a set of reads (and of requests the layer must leave to the router) is
compared byte for byte, with the headers that matter."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from conftest import load_example
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_consent.app import create_app
from fhir_consent.config import Settings
from fhir_consent.documents import DocumentSettings
from fhir_consent.fhir import fastpath
from fhir_consent.fhir.fastpath import FastRead
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.store.db import Database, DatabaseBusy
from fhir_consent.store.repository import Repository

BASE = "https://testserver"
ORIGIN = "https://app.example.org"
JSON = {"accept": "application/fhir+json", "content-type": "application/fhir+json"}
_COMPARED = (
    "content-type",
    "etag",
    "last-modified",
    "location",
    "www-authenticate",
    "access-control-allow-origin",
    "access-control-expose-headers",
    "vary",
)


def _app(db_url: str, tmp_path: Path, *, fast: bool) -> FastAPI:
    settings = Settings(
        database_url=db_url,
        auto_migrate=False,
        db_pool_size=4,
        open_access=True,
        smart_keys_dir=str(tmp_path / "smart"),
        cors_origins=[ORIGIN],
    )
    app = create_app(
        settings,
        ledger=LedgerSettings(_env_file=None, keys_dir=str(tmp_path / "ledger")),  # type: ignore[call-arg]
        documents=DocumentSettings(
            _env_file=None,  # type: ignore[call-arg]
            master_key_file=tmp_path / "master-keys.json",
            blob_backend="db",
        ),
    )
    if not fast:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not FastRead]
    return app


@pytest.fixture
def clients(db_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    fast, plain = _app(db_url, tmp_path, fast=True), _app(db_url, tmp_path, fast=False)
    with TestClient(fast, base_url=BASE) as a, TestClient(plain, base_url=BASE) as b:
        yield a, b


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths the short path served (the router calls routes.serve_read, not this name)."""
    seen: list[str] = []
    original = fastpath.serve_read

    async def counting(ctx: Any, request: Any, *args: Any) -> Any:
        seen.append(request.url.path)
        return await original(ctx, request, *args)

    monkeypatch.setattr(fastpath, "serve_read", counting)
    return seen


def _data(http: TestClient) -> dict[str, str]:
    """A patient with two versions, a deleted patient, a document and a Binary."""
    r = http.post("/fhir/Patient", json=load_example("Patient-example"), headers=JSON)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    body = {**r.json(), "active": False}
    assert http.put(f"/fhir/Patient/{pid}", json=body, headers=JSON).status_code == 200
    r = http.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=JSON)
    gone = r.json()["id"]
    assert http.delete(f"/fhir/Patient/{gone}").status_code == 204
    r = http.post(
        "/fhir/Binary", content=b"%PDF-1.4 test", headers={"content-type": "application/pdf"}
    )
    assert r.status_code == 201, r.text
    binary = r.headers["location"].split("/Binary/")[1].split("/")[0]
    doc = {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": f"Patient/{pid}"},
        "content": [{"attachment": {"contentType": "application/pdf", "url": f"Binary/{binary}"}}],
    }
    r = http.post("/fhir/DocumentReference", json=doc, headers=JSON)
    assert r.status_code == 201, r.text
    return {"pid": pid, "gone": gone, "binary": binary, "doc": r.json()["id"]}


def _requests(ids: dict[str, str]) -> list[tuple[str, dict[str, str], bool]]:
    """(path, headers, whether the short path may serve it)."""
    p, g = ids["pid"], ids["gone"]
    accept = {"accept": "application/fhir+json"}
    return [
        (f"/fhir/Patient/{p}", accept, True),
        (f"/fhir/Patient/{p}", {}, True),
        (f"/fhir/Patient/{p}", {"accept": "application/json", "origin": ORIGIN}, True),
        (f"/fhir/Patient/{p}", {"accept": "application/fhir+xml"}, True),  # 406
        (f"/fhir/Patient/{p}/_history/1", accept, True),
        (f"/fhir/Patient/{p}/_history/2", accept, True),
        (f"/fhir/Patient/{p}/_history/3", accept, True),  # 404
        (f"/fhir/Patient/{p}/_history/x", accept, True),  # 404
        (f"/fhir/Patient/{g}", accept, True),  # 410 with ETag
        (f"/fhir/Patient/{g}/_history/2", accept, True),  # 410
        (f"/fhir/Patient/{g}/_history/1", accept, True),
        ("/fhir/Patient/unknown-id", accept, True),  # 404
        (f"/fhir/DocumentReference/{ids['doc']}", accept, True),
        (f"/fhir/Binary/{ids['binary']}", {"accept": "application/pdf"}, False),  # documents
        (f"/fhir/Binary/{ids['binary']}", accept, False),
        ("/fhir/Patient/bad$id", accept, False),  # 400 from the router
        ("/fhir/Unknown/1", accept, False),  # 404, unsupported type
        (f"/fhir/Patient/{p}?_format=json", {}, False),
        (f"/fhir/Patient/{p}?_summary=true", accept, False),
        (f"/fhir/Patient/{p}?_elements=name", accept, False),
        (f"/fhir/Patient/{p}/", accept, False),
        ("/fhir/Patient/_history", accept, False),
        ("/fhir/metadata", accept, False),
    ]


def test_short_path_answers_as_the_router(
    clients: tuple[TestClient, TestClient], served: list[str]
) -> None:
    fast, plain = clients
    ids = _data(plain)
    cases = _requests(ids)
    for path, headers, eligible in cases:
        before = len(served)
        a = fast.get(path, headers=headers, follow_redirects=False)
        b = plain.get(path, headers=headers, follow_redirects=False)
        if path == "/fhir/metadata":  # each app states its own start time (to the second)
            assert a.status_code == b.status_code == 200
            assert {**a.json(), "date": None} == {**b.json(), "date": None}
        else:
            assert (a.status_code, a.content) == (b.status_code, b.content), path
        for name in _COMPARED:
            assert a.headers.get(name) == b.headers.get(name), (path, name)
        assert len(served) - before == (1 if eligible else 0), path
    # the plain app never took the short path
    assert len(served) == sum(1 for _p, _h, eligible in cases if eligible)
    statuses = {p: fast.get(p, headers=h).status_code for p, h, _e in cases}
    assert statuses[f"/fhir/Patient/{ids['gone']}"] == 410
    assert statuses[f"/fhir/Patient/{ids['pid']}/_history/3"] == 404
    assert statuses["/fhir/Patient/bad$id"] == 400


def test_short_path_falls_back_when_the_database_is_busy(
    clients: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch, served: list[str]
) -> None:
    fast, plain = clients
    ids = _data(plain)
    expected = plain.get(f"/fhir/Patient/{ids['pid']}")

    def busy(*_args: Any, **_kwargs: Any) -> Any:
        raise DatabaseBusy()

    async def busy_async(*_args: Any, **_kwargs: Any) -> Any:
        raise DatabaseBusy()

    monkeypatch.setattr(Database, "run_inline", busy)
    monkeypatch.setattr(Database, "fetch_async", busy_async)
    for path in (f"/fhir/Patient/{ids['pid']}", f"/fhir/Patient/{ids['pid']}/_history/2"):
        r = fast.get(path)
        assert r.status_code == 200
        assert r.content == plain.get(path).content
    assert fast.get(f"/fhir/Patient/{ids['pid']}").content == expected.content
    assert len(served) == 3  # the short path took them, then read in a worker thread


@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths whose create the short path served."""
    seen: list[str] = []
    original = fastpath.serve_create

    async def counting(ctx: Any, request: Any, *args: Any) -> Any:
        seen.append(request.url.path)
        return await original(ctx, request, *args)

    monkeypatch.setattr(fastpath, "serve_create", counting)
    return seen


def _without_server_parts(body: dict[str, Any]) -> dict[str, Any]:
    """A created resource without what the server assigns (id, meta)."""
    return {k: v for k, v in body.items() if k not in ("id", "meta")}


def _creates() -> list[tuple[str, bytes, dict[str, str], bool]]:
    """(path, body, headers, whether the short path may serve it)."""
    patient = orjson.dumps(load_example("Patient-example"))
    bad = orjson.dumps({"resourceType": "Patient", "gender": "sometimes"})
    return [
        ("/fhir/Patient", patient, JSON, True),
        ("/fhir/Patient", patient, {**JSON, "prefer": "return=minimal"}, True),
        ("/fhir/Patient", patient, {**JSON, "prefer": "return=OperationOutcome"}, True),
        ("/fhir/Patient", patient, {**JSON, "origin": ORIGIN}, True),
        ("/fhir/Patient", bad, JSON, True),  # 400/422 OperationOutcome
        ("/fhir/Patient", b'{"resourceType": "Patient", "birthDate": 1}', JSON, True),
        ("/fhir/Patient", b"not json", JSON, True),  # 400
        ("/fhir/Patient", b"", JSON, True),  # 400
        ("/fhir/Patient", patient, {"content-type": "text/plain"}, True),  # 415
        ("/fhir/Patient", patient, {**JSON, "accept": "application/fhir+xml"}, True),  # 406
        ("/fhir/Organization", patient, JSON, True),  # type mismatch
        ("/fhir/Patient", patient, {**JSON, "if-none-exist": "identifier=urn:x|none"}, True),
        ("/fhir/Patient", patient, {**JSON, "if-none-exist": "identifier=urn:x|none"}, True),
        ("/fhir/Binary", b"%PDF-1.4 x", {"content-type": "application/pdf"}, False),
        ("/fhir/Unknown", patient, JSON, False),  # 404 from the router
        ("/fhir/Patient?_format=json", patient, JSON, False),
        ("/fhir/Patient/", patient, JSON, False),
        ("/fhir", orjson.dumps({"resourceType": "Bundle", "type": "batch"}), JSON, False),
    ]


def test_short_path_creates_as_the_router(
    clients: tuple[TestClient, TestClient], created: list[str]
) -> None:
    fast, plain = clients
    for path, body, headers, eligible in _creates():
        before = len(created)
        a = fast.post(path, content=body, headers=headers, follow_redirects=False)
        b = plain.post(path, content=body, headers=headers, follow_redirects=False)
        assert a.status_code == b.status_code, (path, headers, a.text, b.text)
        assert len(created) - before == (1 if eligible else 0), (path, headers)
        if path.startswith("/fhir/Binary"):
            assert a.status_code == 201  # the document store's own create
        elif a.status_code == 201 and a.content and a.json()["resourceType"] != "OperationOutcome":
            assert _without_server_parts(a.json()) == _without_server_parts(b.json())
            where = f"{BASE}/fhir/{a.json()['resourceType']}/{a.json()['id']}/_history/1"
            assert a.headers["location"] == where
            assert fast.get(a.headers["location"]).json() == a.json()
        else:
            assert a.content == b.content, (path, headers)
        for name in ("content-type", "etag", "access-control-allow-origin", "vary"):
            assert a.headers.get(name) == b.headers.get(name), (path, name)
    assert len(created) == sum(1 for *_x, eligible in _creates() if eligible)


def test_short_path_create_answers_503_when_the_database_is_down(
    clients: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch, created: list[str]
) -> None:
    fast, plain = clients

    def down(*_args: Any, **_kwargs: Any) -> Any:
        locked = sqlite3.OperationalError("database is locked")
        raise sa.exc.OperationalError("INSERT", None, locked)

    monkeypatch.setattr(Repository, "insert", down)
    body = orjson.dumps(load_example("Patient-example"))
    a = fast.post("/fhir/Patient", content=body, headers=JSON)
    b = plain.post("/fhir/Patient", content=body, headers=JSON)
    assert (a.status_code, a.content) == (b.status_code, b.content)
    assert a.status_code == 503 and a.headers["retry-after"] == "2"
    assert len(created) == 1
