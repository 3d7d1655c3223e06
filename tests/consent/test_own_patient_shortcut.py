"""The patient (and their legal representative) reading the patient's own data is decided
without loading or compiling any Consent (consent.md §3: "the patient and their
representatives always see the patient's own data"), and the audit trail still records the
access with its reason. Everyone else's reads still go through the Consents.

``ConsentEnforcement.builds`` counts how often a request loaded and compiled the Consents.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from consent_kit import FHIR_JSON, ROLECODE, Caller, Env, document, inquiry, make_env

from fhir_consent.config import Settings
from fhir_consent.consent.config import ConsentSettings

P, Q = "Patient/pp", "Patient/qq"


@pytest.fixture
def env(settings: Settings) -> Iterator[Env]:
    with make_env(settings, ConsentSettings()) as e:
        e.as_open()
        for pid in ("pp", "qq"):
            e.put({"resourceType": "Patient", "id": pid})
        e.put({"resourceType": "Organization", "id": "clinic"})
        e.put({"resourceType": "Practitioner", "id": "doc"})
        e.put(
            {
                "resourceType": "PractitionerRole",
                "id": "doc-clinic",
                "practitioner": {"reference": "Practitioner/doc"},
                "organization": {"reference": "Organization/clinic"},
            }
        )
        e.put(
            {
                "resourceType": "RelatedPerson",
                "id": "g",
                "patient": {"reference": P},
                "relationship": [{"coding": [{"system": ROLECODE, "code": "GUARD"}]}],
            }
        )
        yield e


def _deny_everyone(env: Env, patient: str) -> None:
    """An OPTIN Consent whose root provision denies everything: only the patient's own
    exception can still show their data."""
    env.caller.be(Caller.patient(patient.split("/")[1]))
    body: dict[str, Any] = inquiry(patient, ["Organization/clinic"], status="active")
    body["provision"] = {"type": "deny"}
    body["policyRule"]["coding"][0]["code"] = "OPTIN"
    r = env.c.post("/fhir/Consent", json=body, headers=FHIR_JSON)
    assert r.status_code == 201, r.text


def _audits(env: Env, patient: str) -> list[dict[str, Any]]:
    assert env.audit.flush()
    env.as_open()
    bundle = env.get(f"AuditEvent?patient={patient}&action=R&_count=100").json()
    return [e["resource"] for e in bundle.get("entry", [])]


def test_own_reads_build_no_consent_filter_and_are_audited(env: Env) -> None:
    env.as_open()
    doc = env.post(document(P))
    env.put({"resourceType": "Patient", "id": "pp", "active": True})  # version 2
    _deny_everyone(env, P)
    enforcement = env.layer.enforcement
    for who, reason in (
        (Caller.patient("pp"), "patient-self"),
        (Caller.user("RelatedPerson/g"), "representative"),
    ):
        env.caller.be(who)
        before = enforcement.builds
        assert env.get("Patient/pp").status_code == 200
        assert env.get(f"DocumentReference/{doc}").status_code == 200
        assert env.get("Patient/pp/_history/1").status_code == 200  # an older version
        assert enforcement.builds == before, who.fhir_user
        events = [
            e
            for e in _audits(env, P)
            if any(a.get("who", {}).get("reference") == who.fhir_user for a in e["agent"])
        ]
        read = {
            ent["what"]["reference"] for e in events for ent in e.get("entity", []) if "what" in ent
        }
        assert {P, f"DocumentReference/{doc}"} <= read
        assert {e.get("outcomeDesc") for e in events} == {f"Access permitted ({reason})"}
        assert all(e["outcome"] == "0" for e in events)


def test_other_patients_data_still_goes_through_the_consents(env: Env) -> None:
    env.as_open()
    theirs = env.post(document(Q))
    _deny_everyone(env, Q)
    enforcement = env.layer.enforcement
    env.caller.be(Caller.user("Patient/pp"))  # a user-level token: no compartment of its own
    before = enforcement.builds
    assert env.get(f"DocumentReference/{theirs}").status_code == 404
    assert enforcement.builds == before + 1


def test_clinic_reads_are_decided_by_the_consents_and_see_a_revocation_at_once(
    env: Env,
) -> None:
    env.as_open()
    doc = env.post(document(P))
    env.caller.be(Caller.patient("pp"))
    r = env.c.post(
        "/fhir/Consent",
        json=inquiry(P, ["Organization/clinic"], status="active"),
        headers=FHIR_JSON,
    )
    assert r.status_code == 201, r.text
    consent = r.json()
    enforcement = env.layer.enforcement
    env.caller.be(Caller.practitioner("doc"))
    before = enforcement.builds
    assert env.get(f"DocumentReference/{doc}").status_code == 200
    assert enforcement.builds == before + 1
    env.caller.be(Caller.patient("pp"))
    consent["status"] = "inactive"
    r = env.c.put(f"/fhir/Consent/{consent['id']}", json=consent, headers=FHIR_JSON)
    assert r.status_code == 200, r.text
    env.caller.be(Caller.practitioner("doc"))
    assert env.get(f"DocumentReference/{doc}").status_code == 404
