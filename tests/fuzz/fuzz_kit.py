"""Shared helpers for the bad-input tests: the whole server in process, the invariants every
answer to bad input must keep, and row counts to prove a refused write wrote nothing.

A plain module rather than a ``conftest.py`` (other test folders import ``conftest`` by name).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import orjson
import sqlalchemy as sa
from fastapi import FastAPI

from fhir_consent.app import create_app
from fhir_consent.config import Settings
from fhir_consent.documents.config import DocumentSettings
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.store.tables import metadata

__all__ = [
    "BASE",
    "EXAMPLES",
    "FHIR_JSON",
    "NASTY_STRINGS",
    "assert_fhir_error",
    "assert_no_leak",
    "assert_oauth_error",
    "full_app",
    "row_counts",
]

BASE = "https://testserver"
#: Examples per hypothesis test: a fixed CI budget; FHIR_CONSENT_FUZZ_EXAMPLES=1000 for a deep run.
EXAMPLES = int(os.environ.get("FHIR_CONSENT_FUZZ_EXAMPLES", "40"))
FHIR_JSON = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}

#: Strings that break naive code: SQL and LIKE metacharacters, path traversal, format strings,
#: unicode edge cases (RTL override, zero-width, BOM, combining marks, the last code points),
#: over-long and NUL-laden values. Lone surrogates cannot be Python ``str`` values sent as UTF-8;
#: the tests send them as JSON escapes and percent-encoded bytes instead.
NASTY_STRINGS: tuple[str, ...] = (
    "' OR '1'='1",
    "'; DROP TABLE resources; --",
    '" OR ""="',
    "%",
    "_",
    "\\",
    "%25%00",
    "../../etc/passwd",
    "..%2F..%2Fetc",
    "{0}{1}%s%n%x",
    "${jndi:ldap://x}",
    "<script>alert(1)</script>",
    "\u202eevil\u202c",
    "\u200b\u200d\ufeff",
    "e\u0301\u0301\u0301",
    "\uffff\U0010ffff",
    "\U0001f600" * 20,
    "a\x00b",
    "\x00",
    "\x1b[31m",
    "\r\nSet-Cookie: x=y",
    "null",
    "[]",
    "x" * 600,
)


def full_app(db_url: str, tmp: Path, **overrides: Any) -> FastAPI:
    """:func:`fhir_consent.app.create_app` — every layer — with open access (unless overridden),
    the ledger's and the document store's keys under ``tmp``, content in the database."""
    values: dict[str, Any] = {
        "database_url": db_url,
        "auto_migrate": False,
        "db_pool_size": 4,
        "open_access": True,
        "smart_keys_dir": str(tmp / "keys" / "smart"),
    }
    values.update(overrides)
    return create_app(
        Settings(**values),
        ledger=LedgerSettings(keys_dir=str(tmp / "keys" / "ledger")),
        documents=DocumentSettings(
            master_key_file=tmp / "keys" / "documents.json", spool_dir=tmp / "spool"
        ),
    )


def row_counts(engine: sa.Engine) -> dict[str, int]:
    """Rows in every table of the schema (resources, versions, indexes, ledger, documents…)."""
    with engine.connect() as conn:
        return {
            t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
            for t in metadata.sorted_tables
        }


def _leaks(text: str) -> list[str]:
    markers = ("Traceback (most recent call last)", 'File "/', "sqlalchemy.", "psycopg.")
    return [m for m in markers if m in text]


def assert_no_leak(response: httpx.Response, secrets: Iterable[str] = ()) -> None:
    """No stack trace or library internals, and none of ``secrets`` (patient data the request
    carried) in the answer."""
    text = response.text
    assert not _leaks(text), (response.status_code, text[:500])
    for secret in secrets:
        if len(secret) >= 6:
            assert secret not in text, (response.status_code, "input echoed")


def assert_fhir_error(response: httpx.Response, secrets: Iterable[str] = ()) -> dict[str, Any]:
    """Never a 5xx; a 4xx is an OperationOutcome with at least one issue, as FHIR JSON."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code < 400:
        assert_no_leak(response)
        return {}
    assert_no_leak(response, secrets)
    ctype = response.headers.get("content-type", "")
    assert ctype.startswith("application/fhir+json"), (response.status_code, ctype)
    body: dict[str, Any] = orjson.loads(response.content)
    assert body.get("resourceType") == "OperationOutcome", body
    issues = body.get("issue")
    assert isinstance(issues, list) and issues, body
    for issue in issues:
        assert issue.get("severity") in ("fatal", "error", "warning", "information"), issue
        assert isinstance(issue.get("code"), str) and issue["code"], issue
    return body


def assert_oauth_error(response: httpx.Response) -> None:
    """Never a 5xx; a 4xx from the authorization server is RFC 6749 §5.2 JSON (``error`` plus
    an optional ``error_description``), or RFC 6750 §3 for a bearer-protected endpoint."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    assert_no_leak(response)
    if response.status_code < 400:
        return
    body = orjson.loads(response.content)
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    assert body["error"].isascii() and '"' not in body["error"], body
    description = body.get("error_description")
    assert description is None or isinstance(description, str), body
