"""The database-outage rule in isolation: which errors are a 503, and what the 503 looks like
on each surface (FHIR, OAuth), against a server whose PostgreSQL does not answer at all.

The PostgreSQL restart test (test_postgres_restart.py) shows the same rule under load; this
file pins the classification down quickly, error by error.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest
import sqlalchemy.exc as sa_exc
from fastapi.testclient import TestClient
from faults_kit import free_port

from fhir_consent.app import create_app, database_unavailable
from fhir_consent.config import Settings
from fhir_consent.documents.config import DocumentSettings
from fhir_consent.ledger.config import LedgerSettings


def _wrapped(cls: type[sa_exc.DBAPIError], orig: BaseException) -> sa_exc.DBAPIError:
    return cls("SELECT 1", {}, orig)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_wrapped(sa_exc.OperationalError, psycopg.OperationalError("connection refused")), True),
        (_wrapped(sa_exc.OperationalError, psycopg.errors.AdminShutdown("terminating")), True),
        (_wrapped(sa_exc.OperationalError, psycopg.errors.CannotConnectNow("starting")), True),
        (_wrapped(sa_exc.OperationalError, psycopg.errors.TooManyConnections("full")), True),
        (_wrapped(sa_exc.OperationalError, psycopg.errors.SerializationFailure("retry")), True),
        (_wrapped(sa_exc.InterfaceError, psycopg.InterfaceError("connection is closed")), True),
        (_wrapped(sa_exc.OperationalError, sqlite3.OperationalError("database is locked")), True),
        (sa_exc.TimeoutError("QueuePool limit reached"), True),
        (_wrapped(sa_exc.ProgrammingError, psycopg.errors.UndefinedTable("no table")), False),
        (_wrapped(sa_exc.DataError, psycopg.errors.StringDataRightTruncation("long")), False),
        (_wrapped(sa_exc.IntegrityError, psycopg.errors.UniqueViolation("dup")), False),
        (_wrapped(sa_exc.OperationalError, sqlite3.OperationalError("no such table: x")), False),
        (ValueError("not a database error"), False),
    ],
    ids=lambda v: type(getattr(v, "orig", v)).__name__ if not isinstance(v, bool) else str(v),
)
def test_which_errors_mean_unavailable(error: BaseException, transient: bool) -> None:
    assert database_unavailable(error) is transient


def test_unreachable_database_is_503_everywhere(tmp_path: Path) -> None:
    """Nothing listens on the database port: FHIR interactions answer a 503 OperationOutcome
    with Retry-After, the token endpoint RFC 6749 ``temporarily_unavailable``."""
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none?connect_timeout=2"
    app = create_app(
        Settings(
            database_url=url,
            auto_migrate=False,
            open_access=True,
            smart_keys_dir=str(tmp_path / "smart"),
        ),
        ledger=LedgerSettings(keys_dir=str(tmp_path / "ledger")),
        documents=DocumentSettings(master_key_file=tmp_path / "documents.json"),
    )
    fhir = {"accept": "application/fhir+json", "content-type": "application/fhir+json"}
    with TestClient(app, base_url="https://testserver") as client:
        assert client.get("/fhir/metadata").status_code == 200  # no database needed
        answers = [
            client.get("/fhir/Patient/p1", headers=fhir),
            client.get("/fhir/Patient?name=x", headers=fhir),
            client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=fhir),
            client.get("/fhir/Binary/b1", headers={"accept": "*/*"}),
        ]
        for r in answers:
            assert r.status_code == 503, (r.request.url, r.text)
            assert r.headers["retry-after"] == "2"
            body = r.json()
            assert body["resourceType"] == "OperationOutcome"
            assert body["issue"][0]["code"] == "transient"
        token = client.post(
            "/auth/token",
            data={"grant_type": "client_credentials", "client_id": "x"},
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert token.status_code == 503
        assert token.json()["error"] == "temporarily_unavailable"
