"""Consent enforcement on every path, the parties of consent.md §1, break-glass and the audit
trail (consent.md §3, §4, §6).

A denied direct read answers 404 Not Found with the same OperationOutcome as a record that does
not exist (consent.md §4: never confirm existence).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from consent_kit import (
    ACTCODE,
    FHIR_JSON,
    PARTICIPATION,
    ROLECODE,
    Caller,
    Env,
    document,
    ids,
    inquiry,
    make_env,
)

from fhir_consent.config import Settings
from fhir_consent.consent.config import ConsentSettings
from fhir_consent.documents import DocumentLinkAccess, DocumentSettings
from fhir_consent.documents import install as install_documents

P, Q = "Patient/pp", "Patient/qq"
CLINIC = Caller.practitioner("doc")  # role at Organization/clinic
OTHER = Caller.practitioner("stranger")  # no role
HOSPITAL = Caller.system("Organization/hospital")  # the custodian of the documents


@pytest.fixture
def env(settings: Settings, tmp_path: Path) -> Iterator[Env]:
    with make_env(settings, ConsentSettings(break_glass=True)) as e:
        documents = install_documents(
            e.app,
            e.app.state.fhir,
            DocumentSettings(
                blob_backend="db",
                spool_dir=tmp_path / "spool",
                master_key_file=tmp_path / "keys" / "master-keys.json",
            ),
            replace=True,
        )
        documents.access = e.layer.binary_access(DocumentLinkAccess())
        e.as_open()
        for pid in ("pp", "qq"):
            e.put({"resourceType": "Patient", "id": pid})
        for org in ("clinic", "hospital", "old"):
            e.put({"resourceType": "Organization", "id": org})
        for pid in ("doc", "stranger"):
            e.put({"resourceType": "Practitioner", "id": pid})
        e.put(role("doc-clinic", "doc", "clinic"))
        e.put(role("doc-old", "doc", "old", active=False))
        e.put(role("doc-past", "doc", "old", period={"end": "2010-01-01"}))
        yield e


def role(rid: str, who: str, org: str, **more: Any) -> dict[str, Any]:
    return {
        "resourceType": "PractitionerRole",
        "id": rid,
        "practitioner": {"reference": f"Practitioner/{who}"},
        "organization": {"reference": f"Organization/{org}"},
        **more,
    }


def grant(env: Env, patient: str, recipient: str, **kw: Any) -> dict[str, Any]:
    env.caller.be(Caller.patient(patient.split("/")[1]))
    r = env.c.post(
        "/fhir/Consent",
        json=inquiry(patient, [recipient], status="active", **kw),
        headers=FHIR_JSON,
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def held_document(env: Env, patient: str = P, **more: Any) -> str:
    env.as_open()
    return env.post(document(patient, custodian="Organization/hospital", **more))


def test_denied_read_is_indistinguishable_from_a_missing_one(env: Env) -> None:
    doc = held_document(env)
    env.caller.be(CLINIC)
    hidden = env.get(f"DocumentReference/{doc}")
    missing = env.get("DocumentReference/does-not-exist")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["issue"][0]["code"] == missing.json()["issue"][0]["code"]
    assert env.get(f"DocumentReference/{doc}/_history/1").status_code == 404
    assert env.get(f"DocumentReference/{doc}/_history").status_code == 404


def test_every_read_path_is_filtered(env: Env) -> None:
    doc = held_document(env)
    other = held_document(env, Q)
    env.caller.be(CLINIC)
    for path in (
        "DocumentReference",
        "DocumentReference?_summary=count",
        "DocumentReference?_count=0",
        "DocumentReference/_history",
        "Patient?_id=pp&_revinclude=DocumentReference:subject",
    ):
        body = env.get(path).json()
        assert body.get("total", 0) == 0 or not ids(body) & {f"DocumentReference/{doc}"}, path
    grant(env, P, "Organization/clinic", classes=["DocumentReference", "Patient"])
    env.caller.be(CLINIC)
    assert ids(env.get("DocumentReference").json()) == {f"DocumentReference/{doc}"}
    assert env.get("DocumentReference?_summary=count").json()["total"] == 1
    assert env.get(f"DocumentReference/{other}").status_code == 404
    b = env.get("Patient?_revinclude=DocumentReference:subject").json()
    assert ids(b) == {P, f"DocumentReference/{doc}"}
    b = env.get("DocumentReference?_include=DocumentReference:subject").json()
    assert ids(b, "include") == {P}
    everything = env.get("Patient/pp/$everything").json()
    assert ids(everything) == {P, f"DocumentReference/{doc}"}  # not the Consent: class limits
    assert env.get("Patient/qq/$everything").status_code == 404
    history = env.get("DocumentReference/_history").json()
    assert ids(history) == {f"DocumentReference/{doc}"}


def test_binary_content_follows_its_documents(env: Env) -> None:
    env.caller.be(HOSPITAL)
    r = env.c.post(
        "/fhir/Binary",
        content=b"%PDF-1.4 secret",
        headers={"content-type": "application/pdf", "X-Security-Context": P},
    )
    assert r.status_code == 201, r.text
    binary = r.json()["id"]
    env.post(
        document(
            P,
            custodian="Organization/hospital",
            content=[{"attachment": {"contentType": "application/pdf", "url": f"Binary/{binary}"}}],
        )
    )
    env.caller.be(CLINIC)
    assert env.c.get(f"/fhir/Binary/{binary}").status_code == 404
    assert env.get(f"Binary?_id={binary}").json()["total"] == 0
    granted = grant(env, P, "Organization/clinic")
    env.caller.be(CLINIC)
    raw = env.c.get(f"/fhir/Binary/{binary}")
    assert raw.status_code == 200 and raw.content == b"%PDF-1.4 secret"
    assert env.get(f"Binary?_id={binary}").json()["total"] == 1
    env.caller.be(Caller.patient("pp"))
    granted["status"] = "inactive"
    env.put(granted)
    env.caller.be(CLINIC)
    assert env.c.get(f"/fhir/Binary/{binary}").status_code == 404
    env.caller.be(HOSPITAL)  # the custodian keeps its content
    assert env.c.get(f"/fhir/Binary/{binary}").status_code == 200


def test_batch_entries_are_filtered(env: Env) -> None:
    doc = held_document(env)
    env.caller.be(CLINIC)
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"DocumentReference/{doc}"}},
            {"request": {"method": "GET", "url": "DocumentReference?patient=Patient/pp"}},
        ],
    }
    r = env.c.post("/fhir", json=batch, headers=FHIR_JSON)
    assert r.status_code == 200
    read, search = r.json()["entry"]
    assert read["response"]["status"].startswith("404")
    assert search["resource"]["total"] == 0


def test_practitioner_roles_must_be_active(env: Env) -> None:
    doc = held_document(env)
    grant(env, P, "Organization/old")
    env.caller.be(CLINIC)  # roles at "old": one inactive, one ended in 2010
    assert env.get(f"DocumentReference/{doc}").status_code == 404
    env.as_open()
    env.put(role("doc-old", "doc", "old", active=True))
    env.caller.be(CLINIC)
    assert env.get(f"DocumentReference/{doc}").status_code == 200


def test_representatives_and_the_patient_always_see_the_patients_data(env: Env) -> None:
    doc = held_document(env)
    env.as_open()
    for rid, code, active in (("g", "GUARD", True), ("f", "FRND", True), ("old", "POWATT", False)):
        env.put(
            {
                "resourceType": "RelatedPerson",
                "id": rid,
                "active": active,
                "patient": {"reference": P},
                "relationship": [{"coding": [{"system": ROLECODE, "code": code}]}],
            }
        )
    env.caller.be(Caller.patient("pp"))
    deny_all = inquiry(P, ["Organization/clinic"], status="active")
    deny_all["provision"] = {"type": "deny"}
    deny_all["policyRule"]["coding"][0]["code"] = "OPTIN"
    assert env.c.post("/fhir/Consent", json=deny_all, headers=FHIR_JSON).status_code == 201
    for who, sees in (
        (Caller.patient("pp"), True),
        (Caller.user("Patient/pp"), True),
        (Caller.user("RelatedPerson/g"), True),
        (Caller.user("RelatedPerson/f"), False),
        (Caller.user("RelatedPerson/old"), False),
        (Caller.user("Patient/qq"), False),
    ):
        env.caller.be(who)
        assert (env.get(f"DocumentReference/{doc}").status_code == 200) is sees, who.fhir_user


def put_doc(env: Env, doc: str, body: dict[str, Any]) -> int:
    status: int = env.c.put(
        f"/fhir/DocumentReference/{doc}", json=body, headers=FHIR_JSON
    ).status_code
    return status


def test_custodian_keeps_access_and_writes_need_correct(env: Env) -> None:
    doc = held_document(env)
    env.caller.be(HOSPITAL)
    assert env.get(f"DocumentReference/{doc}").status_code == 200
    updated = document(P, custodian="Organization/hospital", description="v2") | {"id": doc}
    assert put_doc(env, doc, updated) == 200
    grant(env, P, "Organization/clinic")  # action: access only
    env.caller.be(CLINIC)
    assert env.get(f"DocumentReference/{doc}").status_code == 200
    assert put_doc(env, doc, updated) == 404  # a write is action 'correct', which was not granted
    assert env.c.delete(f"/fhir/DocumentReference/{doc}").status_code == 404
    env.caller.be(Caller.patient("pp"))
    correct = inquiry(P, ["Organization/clinic"], status="active")
    correct["provision"]["action"][0]["coding"][0]["code"] = "correct"
    assert env.c.post("/fhir/Consent", json=correct, headers=FHIR_JSON).status_code == 201
    env.caller.be(CLINIC)
    assert put_doc(env, doc, updated) == 200


def test_break_glass(env: Env) -> None:
    doc = held_document(env)
    etreat = {"X-Purpose-Of-Use": "ETREAT"}
    env.caller.be(CLINIC)
    assert env.get(f"DocumentReference/{doc}").status_code == 404
    assert env.get(f"DocumentReference/{doc}", **etreat).status_code == 200
    assert env.get("DocumentReference?patient=Patient/pp", **etreat).json()["total"] == 1
    # audited at once, flagged, with the purpose: the patient sees it without any delay
    env.caller.be(Caller.patient("pp"))
    events = [
        e["resource"]
        for e in env.get("AuditEvent?patient=Patient/pp&outcome=0&_count=100").json()["entry"]
        if "break-glass" in e["resource"].get("outcomeDesc", "")
    ]
    assert events, "break-glass access must be in the patient's log at once"
    assert {c["coding"][0]["code"] for e in events for c in e["purposeOfEvent"]} == {"ETREAT"}
    # a system (not a clinician) cannot break the glass; bad purposes are refused
    env.caller.be(Caller.system("Organization/clinic"))
    assert env.get(f"DocumentReference/{doc}", **etreat).status_code == 404
    env.caller.be(CLINIC)
    bad = {"X-Purpose-Of-Use": "etreat;drop"}
    assert env.get(f"DocumentReference/{doc}", **bad).status_code == 400
    # only where the deployment enables it (off by default: ConsentSettings.break_glass)
    assert ConsentSettings().break_glass is False
    env.layer.enforcement.settings.break_glass = False
    assert env.get(f"DocumentReference/{doc}", **etreat).status_code == 404
    env.layer.enforcement.settings.break_glass = True
    # an explicit deny naming the clinician wins over break-glass
    env.caller.be(Caller.patient("pp"))
    deny = inquiry(P, ["Practitioner/doc"], status="active")
    deny["provision"]["type"] = "deny"
    deny["policyRule"]["coding"][0]["code"] = "OPTIN"
    assert env.c.post("/fhir/Consent", json=deny, headers=FHIR_JSON).status_code == 201
    env.caller.be(CLINIC)
    assert env.get(f"DocumentReference/{doc}", **etreat).status_code == 404


def test_break_glass_reaches_a_record_of_no_patient_beside_patients_with_consents(
    env: Env,
) -> None:
    """A Provenance that names no Patient (its patient is the first Patient among its
    targets) is decided like everyone else's record: denied by default, permitted by
    break-glass. The SQL once lost it whenever any patient had a Consent: ``NOT (first
    patient IN (…))`` is NULL, not true, for a row with no patient (found by
    test_sql_agreement's property test)."""
    env.as_open()
    env.put(
        {
            "resourceType": "Provenance",
            "id": "no-patient",
            "target": [{"reference": "Organization/clinic"}],
            "recorded": "2015-01-04T08:00:00Z",
            "agent": [{"who": {"reference": "Organization/hospital"}}],
        }
    )
    env.caller.be(Caller.patient("pp"))
    granted = inquiry(P, [], status="active")  # for documents the hospital holds
    granted["provision"]["actor"] = [
        {
            "role": {"coding": [{"system": PARTICIPATION, "code": "CST"}]},
            "reference": {"reference": "Organization/hospital"},
        }
    ]
    assert env.c.post("/fhir/Consent", json=granted, headers=FHIR_JSON).status_code == 201
    env.caller.be(CLINIC)
    etreat = {"X-Purpose-Of-Use": "ETREAT"}
    assert env.get("Provenance/no-patient").status_code == 404
    for path in ("Provenance/no-patient", "Provenance/no-patient/_history"):
        assert env.get(path, **etreat).status_code == 200, path
    assert ids(env.get("Provenance?_id=no-patient", **etreat).json()) == {"Provenance/no-patient"}


def test_the_access_log_is_the_patients(env: Env) -> None:
    doc = held_document(env)
    env.caller.be(Caller.patient("pp"))
    everyone = inquiry(P, [], status="active")
    everyone["policyRule"]["coding"][0]["code"] = "OPTIN"
    del everyone["provision"]
    assert env.c.post("/fhir/Consent", json=everyone, headers=FHIR_JSON).status_code == 201
    env.caller.be(CLINIC)
    assert env.get(f"DocumentReference/{doc}").status_code == 200  # OPTIN: anyone may read
    assert env.audit.flush()
    assert env.get("AuditEvent?patient=Patient/pp").json()["total"] == 0  # but not the log
    env.caller.be(Caller.patient("pp"))
    assert env.get("AuditEvent?patient=Patient/pp").json()["total"] > 0
    env.caller.be(Caller.patient("qq"))
    assert env.get("AuditEvent?patient=Patient/pp").json()["total"] == 0


def test_audit_names_the_deciding_consent(env: Env) -> None:
    doc = held_document(env)
    consent = grant(env, P, "Organization/clinic")
    env.caller.be(CLINIC)
    assert env.get(f"DocumentReference/{doc}").status_code == 200
    assert env.get("DocumentReference?patient=Patient/pp").json()["total"] == 1
    env.caller.be(OTHER)
    assert env.get(f"DocumentReference/{doc}").status_code == 404
    assert env.get("DocumentReference?patient=Patient/pp").json()["total"] == 0
    assert env.audit.flush()
    env.caller.be(Caller.patient("pp"))
    log = [
        e["resource"] for e in env.get("AuditEvent?patient=Patient/pp&_count=100").json()["entry"]
    ]

    def by(who: str, code: str, outcome: str) -> list[dict[str, Any]]:
        return [
            e
            for e in log
            if e["agent"][0]["who"].get("reference") == who
            and e["subtype"][0]["code"] == code
            and e["outcome"] == outcome
        ]

    read = by("Practitioner/doc", "read", "0")
    assert len(read) == 1 and "consent-explicit" in read[0]["outcomeDesc"]
    deciding = {x["what"]["reference"] for x in read[0]["entity"] if x["role"]["code"] == "13"}
    assert deciding == {f"Consent/{consent['id']}/_history/1"}
    assert len(by("Practitioner/doc", "search-type", "0")) == 1
    refused = by("Practitioner/stranger", "read", "4")
    assert len(refused) == 1 and "default-deny" in refused[0]["outcomeDesc"]
    # a search naming the patient is in their log even when nothing was disclosed
    empty = by("Practitioner/stranger", "search-type", "0")
    assert len(empty) == 1
    assert not [x for x in empty[0]["entity"] if x.get("role", {}).get("code") == "4"]


def test_purposes_of_use(env: Env) -> None:
    doc = held_document(env)
    env.caller.be(Caller.patient("pp"))
    research_only = inquiry(P, ["Organization/clinic"], status="active")
    research_only["provision"]["purpose"] = [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}
    ]
    assert env.c.post("/fhir/Consent", json=research_only, headers=FHIR_JSON).status_code == 201
    env.caller.be(CLINIC)
    assert env.get(f"DocumentReference/{doc}").status_code == 404  # default purpose TREAT
    research = {"X-Purpose-Of-Use": "HRESCH"}
    assert env.get(f"DocumentReference/{doc}", **research).status_code == 200


def test_data_period_and_security_labels_are_filtered_in_sql(env: Env) -> None:
    env.as_open()
    early = env.post(document(P, date="2015-01-10T00:00:00Z"))
    late = env.post(document(P, date="2015-03-10T00:00:00Z"))
    secret = env.post(
        document(
            P,
            date="2015-01-11T00:00:00Z",
            securityLabel=[{"coding": [{"system": ACTCODE, "code": "PSY"}]}],
        )
    )
    env.caller.be(Caller.patient("pp"))
    hide = inquiry(P, ["Organization/clinic"], status="active")
    hide["provision"]["provision"] = [
        {"type": "deny", "dataPeriod": {"start": "2015-03-01", "end": "2015-03-31"}},
        {"type": "deny", "securityLabel": [{"system": ACTCODE, "code": "PSY"}]},
    ]
    assert env.c.post("/fhir/Consent", json=hide, headers=FHIR_JSON).status_code == 201
    env.caller.be(CLINIC)
    found = env.get("DocumentReference?_count=1").json()
    assert found["total"] == 1 and ids(found) == {f"DocumentReference/{early}"}
    assert not [x for x in found["link"] if x["relation"] == "next"]  # paging knows the total
    for hidden in (late, secret):
        assert env.get(f"DocumentReference/{hidden}").status_code == 404


def test_audit_events_are_not_editable_through_the_api(env: Env) -> None:
    env.caller.be(Caller.patient("pp"))
    forged = {
        "resourceType": "AuditEvent",
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
        },
        "recorded": "2015-06-01T00:00:00Z",
        "agent": [{"who": {"reference": "Practitioner/doc"}, "requestor": True}],
        "source": {"observer": {"display": "forged"}},
        "entity": [{"what": {"reference": P}}],
    }
    r = env.c.post("/fhir/AuditEvent", json=forged, headers=FHIR_JSON)
    assert r.status_code in (403, 405), r.text
