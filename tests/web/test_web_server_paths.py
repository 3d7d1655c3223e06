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


def test_ledger_proofs_follow_consent(live: Live) -> None:
    """``$ledger-proof`` needs what a vread of that version needs: a clinic without a grant
    learns nothing about Peter's Consents or Northgate's document through it."""
    clinic = clinic_headers(live)  # Lakeside: holds two of Peter's documents, no grant
    hidden_doc = live.demo.documents["summary"]
    held_doc = live.demo.documents["discharge"]
    for ref in (f"DocumentReference/{hidden_doc}", f"Consent/{live.demo.grant}"):
        r = httpx.get(f"{live.fhir}/{ref}/_history/1/$ledger-proof", headers=clinic)
        assert r.status_code == 404, ref
        assert "pseudonym" not in r.text and "resource_sha256" not in r.text
    proof = "_history/1/$ledger-proof"
    held = httpx.get(f"{live.fhir}/DocumentReference/{held_doc}/{proof}", headers=clinic)
    assert held.status_code == 200 and held.json()["entry"]

    peter = {"Authorization": f"Bearer {patient_token(live)}", "Accept": "application/json"}
    own = httpx.get(f"{live.fhir}/Consent/{live.demo.grant}/{proof}", headers=peter)
    assert own.status_code == 200
    assert live.ctx.audit.flush()
    log = httpx.get(
        f"{live.fhir}/AuditEvent",
        params={"patient": "Patient/peter", "subtype": "operation", "_count": "200"},
        headers={**peter, "Accept": "application/fhir+json"},
    ).json()
    outcomes = {
        (e["resource"]["outcome"], a["who"].get("reference"))
        for e in log.get("entry", [])
        for a in e["resource"]["agent"]
    }
    assert ("4", "Organization/lakeside") in outcomes  # the refused attempts are in Peter's log
    assert ("0", "Patient/peter") in outcomes
