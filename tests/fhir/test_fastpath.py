"""The short read path (:class:`fhir_consent.fhir.fastpath.FastRead`) answers exactly as the
router does: the whole server is built twice on one database, once without the layer, and
every response to a set of reads (and of requests the layer must leave to the router) is
compared byte for byte, with the headers that matter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
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
