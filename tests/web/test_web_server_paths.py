"""Paths beside the REST interactions, on the whole server: document downloads and ledger
proofs.

Document downloads (issue 6: "every download is audited"; consent.md §4,
§6): the patient's own download and a clinic's refused one both reach the patient's access log
as AuditEvents naming the Binary, with real tokens over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from webkit import Live, clinic_headers, live_app, patient_token

from smart_on_fhir.keys import KeySet


@pytest.fixture
def live(tmp_path: Path, sqlite_template: Path) -> Iterator[Live]:
    keys = tmp_path / "smart"
    KeySet.generate().save(keys)
    with live_app(tmp_path, sqlite_template, keys) as app:
        yield app


def _binary_of(live: Live, headers: dict[str, str], document: str) -> str:
    r = httpx.get(f"{live.fhir}/DocumentReference/{document}", headers=headers)
    assert r.status_code == 200, r.text
    url: str = r.json()["content"][0]["attachment"]["url"]
    assert url.startswith("Binary/")
    return url.removeprefix("Binary/")


def _events_about(live: Live, headers: dict[str, str], binary: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{live.fhir}/AuditEvent",
        params={"patient": "Patient/peter", "_count": "200"},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    return [
        e["resource"]
        for e in r.json().get("entry", [])
        if any(
            ent.get("what", {}).get("reference", "").startswith(f"Binary/{binary}")
            for ent in e["resource"].get("entity", [])
        )
    ]


def test_downloads_permitted_and_refused_are_in_the_patients_log(live: Live) -> None:
    peter = {"Authorization": f"Bearer {patient_token(live)}", "Accept": "application/fhir+json"}
    own = _binary_of(live, peter, live.demo.documents["discharge"])
    northgate = _binary_of(live, peter, live.demo.documents["summary"])

    got = httpx.get(f"{live.fhir}/Binary/{own}", headers={**peter, "Accept": "application/pdf"})
    assert got.status_code == 200 and got.content.startswith(b"%PDF")

    clinic = clinic_headers(live)  # Lakeside: no grant for Northgate's document
    refused = httpx.get(f"{live.fhir}/Binary/{northgate}", headers=clinic)
    assert refused.status_code == 404
    assert b"%PDF" not in refused.content and b"ClinicalDocument" not in refused.content

    assert live.ctx.audit.flush()
    [download] = _events_about(live, peter, own)
    assert download["outcome"] == "0"
    assert {"reference": "Patient/peter"} in [a["who"] for a in download["agent"]]
    assert any(
        e["what"]["reference"] == "Patient/peter" for e in download["entity"]
    )  # searchable by the patient it concerns

    [attempt] = _events_about(live, peter, northgate)
    assert attempt["outcome"] == "4" and "download-denied" in attempt["outcomeDesc"]
    agents = [a["who"].get("reference") for a in attempt["agent"]]
    assert "Organization/lakeside" in agents
    assert any(
        e["what"]["reference"] == f"DocumentReference/{live.demo.documents['summary']}"
        for e in attempt["entity"]
    )
