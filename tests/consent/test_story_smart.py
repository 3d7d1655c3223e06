"""The full story of issue 4 with real tokens over real HTTP, on the server's own application
(:func:`fhir_consent.app.create_app`: every layer installed, SMART on, no open access), access
tokens issued by the server's own authorization server — a
backend-services token for the clinic's system (client bound to Organization/clinic), one for
the hospital that holds the documents, and an authorization-code token for the patient's app
after a real login — and every FHIR call made with httpx to uvicorn on a loopback port.

clinic system asks (proposed) → the patient's token sees the inquiry → the patient grants →
the clinic reads the documents → the patient revokes → the clinic's next read and search are
denied → the patient sees every step as AuditEvents (consent.md §2, §6).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from consent_kit import document, inquiry
from livekit import LiveServer, backend_token, every_layer, smart_world
from smart.kit import World

from fhir_consent.audit import AuditSink, access_count
from fhir_consent.ledger.entry import entry_from_bytes, open_sealed
from fhir_consent.ledger.tables import ledger_entry
from smart_on_fhir.keys import generate_signing_key

PATIENT_SCOPES = "openid fhirUser launch/patient patient/*.cruds"
JSON = {"accept": "application/fhir+json", "content-type": "application/fhir+json"}


@pytest.fixture
def story(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[World, LiveServer, AuditSink]]:
    with smart_world(db_url, tmp_path, monkeypatch, **every_layer(tmp_path)) as (
        world,
        server,
        app,
    ):
        sink = app.state.fhir.audit
        assert sink is not None  # the server audits every authenticated request
        yield world, server, sink


def test_full_story_with_real_tokens(story: tuple[World, LiveServer, AuditSink]) -> None:
    world, server, sink = story
    pid = world.add_patient()
    patient = f"Patient/{pid}"
    for org in ("clinic", "hospital"):
        world.seed.put(
            f"/fhir/Organization/{org}",
            json={"resourceType": "Organization", "id": org},
            headers=JSON,
        )
    key = generate_signing_key("RS384")
    clinic = backend_token(
        world, key, "Organization/clinic", "system/Consent.c system/DocumentReference.rs"
    )
    hospital = backend_token(world, key, "Organization/hospital", "system/DocumentReference.cr")
    username = f"patient-{uuid.uuid4().hex[:8]}"
    world.add_user(username, patient)
    app = world.add_client("public", scope=PATIENT_SCOPES)
    mine = world.token(app.client.client_id, username=username, scope=PATIENT_SCOPES)
    assert mine["patient"] == pid
    me = mine["access_token"]

    def as_(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}", **JSON}

    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        docs = []
        for title in ("discharge", "lab"):
            r = http.post(
                "DocumentReference",
                json=document(patient, custodian="Organization/hospital", description=title),
                headers=as_(hospital),
            )
            assert r.status_code == 201, r.text
            docs.append(r.json()["id"])

        # the clinic's system asks; until the patient answers it sees nothing
        asked = http.post(
            "Consent", json=inquiry(patient, ["Organization/clinic"]), headers=as_(clinic)
        )
        assert asked.status_code == 201, asked.text
        cid = asked.json()["id"]
        assert http.get(f"DocumentReference/{docs[0]}", headers=as_(clinic)).status_code == 404

        # the patient's token sees the inquiry and who asked
        pending = http.get(f"Consent?patient={patient}&status=proposed", headers=as_(me)).json()
        assert [e["resource"]["id"] for e in pending["entry"]] == [cid]
        consent: dict[str, Any] = pending["entry"][0]["resource"]
        assert consent["extension"][0]["valueReference"] == {"reference": "Organization/clinic"}

        # the patient grants; the clinic reads the documents
        r = http.put(f"Consent/{cid}", json=consent | {"status": "active"}, headers=as_(me))
        assert r.status_code == 200, r.text
        found = http.get(f"DocumentReference?patient={patient}", headers=as_(clinic)).json()
        assert {e["resource"]["id"] for e in found["entry"]} == set(docs)
        for doc in docs:
            assert http.get(f"DocumentReference/{doc}", headers=as_(clinic)).status_code == 200

        # the patient revokes; the clinic's next read and search are denied
        r = http.put(f"Consent/{cid}", json=r.json() | {"status": "inactive"}, headers=as_(me))
        assert r.status_code == 200, r.text
        assert http.get(f"DocumentReference/{docs[0]}", headers=as_(clinic)).status_code == 404
        after = http.get(f"DocumentReference?patient={patient}", headers=as_(clinic)).json()
        assert after["total"] == 0

        # the patient sees every step
        deadline = time.monotonic() + 10
        while True:
            sink.flush()
            log = http.get(f"AuditEvent?patient={patient}&_count=200", headers=as_(me)).json()
            events = [e["resource"] for e in log.get("entry", [])]
            by_clinic = [  # a coalesced AuditEvent (repeats of one access) counts each
                (e["subtype"][0]["code"], e["outcome"])
                for e in events
                if any(a["who"].get("reference") == "Organization/clinic" for a in e["agent"])
                for _ in range(access_count(e))
            ]
            if len(by_clinic) >= 6 or time.monotonic() > deadline:
                break
    assert sorted(by_clinic) == sorted(
        [
            ("read", "4"),  # before the grant
            ("create", "0"),  # the inquiry
            ("search-type", "0"),  # with both documents
            ("read", "0"),
            ("read", "0"),
            ("read", "4"),  # after the revocation
            ("search-type", "0"),  # after the revocation: nothing disclosed
        ]
    )
    answers = [e for e in events if e["subtype"][0]["code"] == "update"]
    assert len(answers) == 2  # the grant and the revocation, by the patient's app
    assert all(e["agent"][0]["who"]["reference"] == patient for e in answers)
    disclosed = [
        {x["what"]["reference"] for x in e["entity"] if x.get("role", {}).get("code") == "4"}
        for e in events
        if e["subtype"][0]["code"] == "search-type"
        and any(a["who"].get("reference") == "Organization/clinic" for a in e["agent"])
    ]
    assert sorted(map(len, disclosed)) == [0, 2]

    # every step is on the ledger, and the sealed box (for the RMS) says who took it
    ring = server.server.config.app.state.ledger.keyring
    assert ring.rms_keypair is not None
    with world.db.read() as conn:
        rows = conn.execute(
            sa.select(ledger_entry.c.data).where(ledger_entry.c.ref.like(f"Consent/{cid}/%"))
        ).all()
    steps = {}
    for (raw,) in rows:
        opened = open_sealed(entry_from_bytes(bytes(raw)), ring.rms_keypair)
        steps[opened["resource"]["status"]] = opened["actor"]
    assert steps["proposed"].startswith("client:") and "(Organization/clinic)" in steps["proposed"]
    assert steps["active"] == patient and steps["inactive"] == patient
