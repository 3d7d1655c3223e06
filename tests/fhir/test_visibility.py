"""Patient-level tokens see only their patient's compartment, on every path; user-level
tokens are bounded by their scopes (SMART App Launch 2.2 scopes; R4 patient compartment).

The authenticator is injected here so these tests pin the FHIR layer's rules independently of
how tokens are issued (the SMART tests cover that end to end)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import FHIR_JSON
from fastapi.testclient import TestClient
from livekit import Caller

from fhir_consent.app import create_core_app
from fhir_consent.config import Settings


@pytest.fixture
def caller_client(settings: Settings) -> Iterator[tuple[TestClient, Caller]]:
    app = create_core_app(settings)
    caller = Caller()
    app.state.fhir.authenticate = caller
    with TestClient(app, base_url="https://testserver") as c:
        yield c, caller


def post(c: TestClient, resource: dict[str, Any]) -> str:
    r = c.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    rid: str = r.json()["id"]
    return rid


def doc(pid: str, code: str = "34133-9") -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "category": [{"coding": [{"system": "http://example.org/cat", "code": code}]}],
        "subject": {"reference": f"Patient/{pid}"},
        "date": "2020-01-01T00:00:00Z",
        "content": [{"attachment": {"contentType": "application/pdf"}}],
    }


@pytest.fixture
def world(caller_client: tuple[TestClient, Caller]) -> dict[str, Any]:
    c, caller = caller_client
    caller.open()
    p1 = post(c, {"resourceType": "Patient", "name": [{"family": "One"}]})
    p2 = post(c, {"resourceType": "Patient", "name": [{"family": "Two"}]})
    org = post(c, {"resourceType": "Organization", "name": "Clinic"})
    d1 = post(c, doc(p1))
    d1b = post(c, doc(p1, "11488-4"))
    d2 = post(c, doc(p2))
    return {
        "c": c,
        "caller": caller,
        "p1": p1,
        "p2": p2,
        "org": org,
        "d1": d1,
        "d1b": d1b,
        "d2": d2,
    }


def match_ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", [])}


def test_patient_token_search_read_history_are_confined(world: dict[str, Any]) -> None:
    c, caller = world["c"], world["caller"]
    caller.patient(world["p1"])
    b = c.get("/fhir/DocumentReference").json()
    assert match_ids(b) == {world["d1"], world["d1b"]} and b["total"] == 2
    assert c.get("/fhir/DocumentReference?_summary=count").json()["total"] == 2
    assert c.get(f"/fhir/DocumentReference/{world['d1']}").status_code == 200
    # outside the compartment: 404, exactly as if it did not exist
    for path in (
        f"DocumentReference/{world['d2']}",
        f"DocumentReference/{world['d2']}/_history",
        f"DocumentReference/{world['d2']}/_history/1",
        f"Patient/{world['p2']}",
    ):
        r = c.get(f"/fhir/{path}")
        assert r.status_code == 404, path
    assert match_ids(c.get("/fhir/Patient").json()) == {world["p1"]}
    hist = c.get("/fhir/DocumentReference/_history").json()
    assert hist["total"] == 2
    # directory data is not patient data
    assert c.get(f"/fhir/Organization/{world['org']}").status_code == 200


def test_patient_token_includes_are_confined(world: dict[str, Any]) -> None:
    c, caller = world["c"], world["caller"]
    caller.open()
    rp = post(
        c, {"resourceType": "RelatedPerson", "patient": {"reference": f"Patient/{world['p2']}"}}
    )
    caller.patient(world["p1"])
    b = c.get(
        "/fhir/Patient?_revinclude=DocumentReference:subject&_revinclude=RelatedPerson:patient"
    ).json()
    assert match_ids(b) == {world["p1"], world["d1"], world["d1b"]}
    assert rp not in match_ids(b)


def test_patient_token_paging_never_reveals_hidden_rows(world: dict[str, Any]) -> None:
    c, caller = world["c"], world["caller"]
    caller.open()
    for _ in range(5):
        post(c, doc(world["p2"]))
    caller.patient(world["p1"])
    page = c.get("/fhir/DocumentReference?_count=1").json()
    seen = set()
    while True:
        seen |= match_ids(page)
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nxt:
            break
        page = c.get(nxt[0].replace("https://testserver", "")).json()
    assert seen == {world["d1"], world["d1b"]}


def test_patient_token_writes_stay_in_compartment(world: dict[str, Any]) -> None:
    c, caller = world["c"], world["caller"]
    caller.patient(world["p1"])
    assert (
        c.post("/fhir/DocumentReference", json=doc(world["p1"]), headers=FHIR_JSON).status_code
        == 201
    )
    r = c.post("/fhir/DocumentReference", json=doc(world["p2"]), headers=FHIR_JSON)
    assert r.status_code == 403
    assert r.json()["resourceType"] == "OperationOutcome"
    other = c.put(
        f"/fhir/DocumentReference/{world['d2']}",
        json=doc(world["p1"]) | {"id": world["d2"]},
        headers=FHIR_JSON,
    )
    assert other.status_code == 404
    assert c.delete(f"/fhir/DocumentReference/{world['d2']}").status_code == 404
    caller.open()
    assert c.get(f"/fhir/DocumentReference/{world['d2']}").status_code == 200


def test_scopes_bound_interactions(world: dict[str, Any]) -> None:
    c, caller = world["c"], world["caller"]
    caller.user("user/DocumentReference.rs")
    assert c.get(f"/fhir/DocumentReference/{world['d2']}").status_code == 200
    r = c.get(f"/fhir/Patient/{world['p1']}")
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert (
        c.post("/fhir/DocumentReference", json=doc(world["p1"]), headers=FHIR_JSON).status_code
        == 403
    )
    assert c.delete(f"/fhir/DocumentReference/{world['d2']}").status_code == 403
    # v1 syntax
    caller.user("user/Patient.read")
    assert c.get(f"/fhir/Patient/{world['p1']}").status_code == 200
    assert (
        c.put(
            f"/fhir/Patient/{world['p1']}",
            json={"resourceType": "Patient", "id": world["p1"]},
            headers=FHIR_JSON,
        ).status_code
        == 403
    )
    # _include of a type the token may not read is silently dropped
    caller.user("user/DocumentReference.rs")
    b = c.get("/fhir/DocumentReference?_include=DocumentReference:subject").json()
    assert {e["search"]["mode"] for e in b["entry"]} == {"match"}


def test_granular_scope_filters_search(world: dict[str, Any]) -> None:
    c, caller = world["c"], world["caller"]
    caller.user("user/DocumentReference.rs?category=http://example.org/cat|11488-4")
    b = c.get("/fhir/DocumentReference").json()
    assert match_ids(b) == {world["d1b"]} and b["total"] == 1
    assert c.get(f"/fhir/DocumentReference/{world['d1b']}").status_code == 200
    assert c.get(f"/fhir/DocumentReference/{world['d1']}").status_code == 404
    caller.patient(
        world["p1"], "patient/DocumentReference.rs?category=http://example.org/cat|34133-9"
    )
    assert match_ids(c.get("/fhir/DocumentReference").json()) == {world["d1"]}


def test_patient_everything(world: dict[str, Any]) -> None:
    c, caller = world["c"], world["caller"]
    caller.open()
    cid = post(
        c,
        {
            "resourceType": "Consent",
            "status": "active",
            "scope": {"coding": [{"code": "patient-privacy"}]},
            "category": [{"coding": [{"code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{world['p1']}"},
        },
    )
    b = c.get(f"/fhir/Patient/{world['p1']}/$everything").json()
    assert b["type"] == "searchset"
    assert match_ids(b) == {world["p1"], world["d1"], world["d1b"], cid}
    assert b["total"] == 4
    caller.patient(world["p1"], "patient/Patient.r patient/DocumentReference.rs")
    b = c.get(f"/fhir/Patient/{world['p1']}/$everything").json()
    assert match_ids(b) == {world["p1"], world["d1"], world["d1b"]}  # no Consent scope
    assert c.get(f"/fhir/Patient/{world['p2']}/$everything").status_code == 404
    assert c.get("/fhir/Patient/nobody/$everything").status_code == 404


@pytest.fixture
def audited(caller_client: tuple[TestClient, Caller]) -> Iterator[tuple[TestClient, Caller, Any]]:
    from fhir_consent.audit import AuditSink

    c, caller = caller_client
    ctx = c.app.state.fhir  # type: ignore[attr-defined]
    sink = AuditSink(ctx.db, flush_interval=0.02)
    ctx.audit = sink
    sink.start()
    yield c, caller, sink
    sink.stop()


def audit_events(c: TestClient, caller: Caller, query: str) -> list[dict[str, Any]]:
    caller.open()
    return [
        e["resource"] for e in c.get(f"/fhir/AuditEvent?{query}&_count=200").json().get("entry", [])
    ]


def test_every_access_decision_is_audited(audited: tuple[TestClient, Caller, Any]) -> None:
    c, caller, sink = audited
    caller.open()  # open (development) access is not audited
    p1 = post(c, {"resourceType": "Patient"})
    p2 = post(c, {"resourceType": "Patient"})
    d1 = post(c, doc(p1))
    d2 = post(c, doc(p2))
    assert sink.flush()
    assert audit_events(c, caller, "_count=1") == []

    caller.user("user/DocumentReference.crs")
    assert c.get(f"/fhir/DocumentReference/{d1}").status_code == 200
    assert c.get("/fhir/DocumentReference?status=current").status_code == 200
    created = post(c, doc(p1))
    assert c.get(f"/fhir/Patient/{p1}").status_code == 403  # no Patient scope
    caller.patient(p1)
    assert c.get(f"/fhir/DocumentReference/{d2}").status_code == 404  # hidden: refused
    assert sink.flush()

    # AuditEvent?patient= matches entity.what and agent.who (R4): p1's log holds the accesses
    # to p1's records and p1's own refused attempt on someone else's record
    mine = audit_events(c, caller, f"patient=Patient/{p1}")
    subtypes = sorted(e["subtype"][0]["code"] for e in mine)
    assert subtypes == ["create", "read", "read", "search-type"]
    read = next(e for e in mine if e["subtype"][0]["code"] == "read" and e["outcome"] == "0")
    assert read["outcome"] == "0" and read["action"] == "R"
    assert read["agent"][0]["who"]["reference"] == "Practitioner/x"
    assert {x["what"]["reference"] for x in read["entity"]} == {
        f"Patient/{p1}",
        f"DocumentReference/{d1}",
    }
    write = next(e for e in mine if e["subtype"][0]["code"] == "create")
    assert any(
        x["what"]["reference"].startswith(f"DocumentReference/{created}/_history/1")
        for x in write["entity"]
    )
    search = next(e for e in mine if e["subtype"][0]["code"] == "search-type")
    assert any(x.get("description") == "DocumentReference?status" for x in search["entity"])
    theirs = audit_events(c, caller, f"patient=Patient/{p2}")
    refused = [e for e in theirs if e["outcome"] == "4"]
    assert len(refused) == 1 and refused[0]["agent"][0]["who"]["reference"] == f"Patient/{p1}"
    scope_denials = audit_events(c, caller, "outcome=4")
    assert any("scope" in e.get("outcomeDesc", "") for e in scope_denials)
