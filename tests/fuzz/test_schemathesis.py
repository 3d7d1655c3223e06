"""Schemathesis against the server's OpenAPI documents (issue 8 §2), with a fixed budget.

Two documents: the server's own ``/openapi.json`` (FastAPI's: every route, including the
authorization server, the ledger operations and Binary, with generated path parameters) and
:mod:`fhir_openapi`, which describes the bodies, search parameters and headers the generic
FHIR routes read. Each generated request goes to the whole in-process server (open access,
on SQLite and PostgreSQL); the answer must never be a 5xx, and an error under ``/fhir`` must
be an OperationOutcome, one under ``/auth`` an RFC 6749 error. ``max_examples`` is small and
fixed so that both documents together stay well under a minute per database.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fhir_openapi import fhir_openapi
from fuzz_kit import (
    BASE,
    FHIR_JSON,
    assert_fhir_error,
    assert_no_leak,
    assert_oauth_error,
    full_app,
)
from hypothesis import HealthCheck, settings

BUDGET = settings(
    max_examples=int(os.environ.get("FHIR_CONSENT_SCHEMATHESIS_EXAMPLES", "8")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,  # a fixed budget: no replay of earlier runs' examples
)
#: Never generated against: an event stream that stays open by design.
STREAMS = ("/fhir/$events",)


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[tuple[FastAPI, TestClient]]:
    server = full_app(db_url, tmp_path)
    with TestClient(server, base_url=BASE) as client:
        seed = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Seed"}]}
        assert client.put("/fhir/Patient/p1", json=seed, headers=FHIR_JSON).status_code == 201
        yield server, client


@pytest.fixture
def server_schema(app: tuple[FastAPI, TestClient]) -> Any:
    """The server's own OpenAPI document, as FastAPI serves it."""
    _server, client = app
    r = client.get("/openapi.json")
    assert r.status_code == 200
    schema = schemathesis.openapi.from_dict(r.json())
    return schema.exclude(path=list(STREAMS))


@pytest.fixture
def fhir_schema(app: tuple[FastAPI, TestClient]) -> Any:
    """:mod:`fhir_openapi` (depends on ``app`` so that it runs once per database)."""
    return schemathesis.openapi.from_dict(fhir_openapi())


def _check(client: TestClient, case: Any) -> None:
    kwargs = case.as_transport_kwargs(base_url=BASE)
    kwargs.pop("url", None)
    kwargs.pop("timeout", None)
    path = case.formatted_path
    for name, value in (kwargs.pop("cookies", None) or {}).items():
        client.cookies.set(name, value)
    try:
        response = client.request(
            kwargs.pop("method"),
            path,
            params=kwargs.pop("params", None),
            headers=kwargs.pop("headers", None),
            content=kwargs.pop("content", None),
            data=kwargs.pop("data", None),
            json=kwargs.pop("json", None),
        )
    except (UnicodeEncodeError, ValueError):  # a header or URL the client cannot send
        return
    finally:
        client.cookies.clear()
    if path.startswith("/auth/") and path != "/auth/jwks":
        assert_oauth_error(response) if response.headers.get("content-type", "").startswith(
            "application/json"
        ) else assert_no_leak(response)
        assert response.status_code < 500, (case.method, path, response.text[:300])
    elif path.startswith("/fhir"):
        assert_fhir_error(response)
    else:
        assert response.status_code < 500, (case.method, path, response.text[:300])


server_api = schemathesis.pytest.from_fixture("server_schema")
fhir_api = schemathesis.pytest.from_fixture("fhir_schema")


@server_api.parametrize()
@BUDGET
def test_server_openapi_document(case: Any, app: tuple[FastAPI, TestClient]) -> None:
    _check(app[1], case)


@fhir_api.parametrize()
@BUDGET
def test_fhir_interactions_document(case: Any, app: tuple[FastAPI, TestClient]) -> None:
    _check(app[1], case)
