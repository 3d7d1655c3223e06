"""The inquiry workflow of consent.md §2: every allowed and every refused transition.

Who: the patient; their legal representative (RelatedPerson, GUARD); a RelatedPerson who is
not one (FRND); clinic A (practitioner ``xa`` with a role at ``orgA``, and the clinic's system
bound to ``orgA``); clinic B (practitioner ``yb`` at ``orgB``). Refusals are 403 with an
OperationOutcome and write nothing (the Consent's history does not grow).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from consent_kit import FHIR_JSON, ROLECODE, Caller, Env, document, inquiry, make_env

from fhir_consent.auth import AccessContext
from fhir_consent.config import Settings
from fhir_consent.consent.index import INQUIRER_EXTENSION

P = "Patient/pw"


@pytest.fixture
def env(settings: Settings) -> Iterator[Env]:
    with make_env(settings) as e:
        e.as_open()
        e.put({"resourceType": "Patient", "id": "pw"})
        e.put({"resourceType": "Patient", "id": "other"})
        for org in ("orgA", "orgB"):
            e.put({"resourceType": "Organization", "id": org})
        for pid, org in (("xa", "orgA"), ("yb", "orgB")):
            e.put({"resourceType": "Practitioner", "id": pid})
            e.put(
                {
                    "resourceType": "PractitionerRole",
                    "id": f"{pid}-role",
                    "practitioner": {"reference": f"Practitioner/{pid}"},
                    "organization": {"reference": f"Organization/{org}"},
                }
            )
        for rid, code in (("guardian", "GUARD"), ("friend", "FRND")):
            e.put(
                {
                    "resourceType": "RelatedPerson",
                    "id": rid,
                    "patient": {"reference": P},
                    "relationship": [{"coding": [{"system": ROLECODE, "code": code}]}],
                }
            )
        e.clock.set("2015-06-01T00:00:00Z")
        yield e


PATIENT = Caller.patient("pw")
GUARDIAN = Caller.user("RelatedPerson/guardian")
FRIEND = Caller.user("RelatedPerson/friend")
CLINIC_A = Caller.practitioner("xa")
CLINIC_A_SYSTEM = Caller.system("Organization/orgA")
CLINIC_B = Caller.practitioner("yb")


def as_(env: Env, who: AccessContext) -> None:
    env.caller.be(who)


def versions(env: Env, cid: str) -> int:
    env.as_open()
    total: int = env.get(f"Consent/{cid}/_history").json()["total"]
    return total


def consent_count(env: Env) -> int:
    env.as_open()
    total: int = env.get(f"Consent?patient={P}&_summary=count").json()["total"]
    return total


def refused(response: Any) -> None:
    assert response.status_code == 403, response.text
    assert response.json()["resourceType"] == "OperationOutcome"


def ask(env: Env, who: AccessContext = CLINIC_A, **kw: Any) -> dict[str, Any]:
    as_(env, who)
    r = env.c.post("/fhir/Consent", json=inquiry(P, ["Organization/orgA"], **kw), headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def put(env: Env, who: AccessContext, consent: dict[str, Any]) -> Any:
    as_(env, who)
    return env.c.put(f"/fhir/Consent/{consent['id']}", json=consent, headers=FHIR_JSON)


def with_status(consent: dict[str, Any], status: str) -> dict[str, Any]:
    out = copy.deepcopy(consent)
    out["status"] = status
    return out


def recorded(consent: dict[str, Any]) -> set[str]:
    return {
        e["valueReference"]["reference"]
        for e in consent.get("extension", [])
        if e["url"] == INQUIRER_EXTENSION
    }


# -- a clinic asks (§2.1) ------------------------------------------------------------------------


def test_a_clinic_asks_and_the_server_records_who_asked(env: Env) -> None:
    proposal = ask(env)
    assert proposal["status"] == "proposed"
    assert recorded(proposal) == {"Practitioner/xa"}
    forged = inquiry(P, ["Organization/orgA"])
    forged["extension"] = [{"url": INQUIRER_EXTENSION, "valueReference": {"reference": "X/y"}}]
    as_(env, CLINIC_A_SYSTEM)
    r = env.c.post("/fhir/Consent", json=forged, headers=FHIR_JSON)
    assert r.status_code == 201
    assert recorded(r.json()) == {"Organization/orgA"}  # from the token, never from the body
    # the clinic follows its own inquiries (and only its own)
    as_(env, CLINIC_A)
    assert env.get(f"Consent/{proposal['id']}").status_code == 200
    assert env.get(f"Consent/{r.json()['id']}").status_code == 200  # same Organization
    as_(env, CLINIC_B)
    assert env.get(f"Consent/{proposal['id']}").status_code == 404


@pytest.mark.parametrize("status", ["active", "rejected", "inactive", "draft", "entered-in-error"])
def test_a_clinic_may_only_create_proposals(env: Env, status: str) -> None:
    before = consent_count(env)
    as_(env, CLINIC_A)
    body = inquiry(P, ["Organization/orgA"], status=status)
    r = env.c.post("/fhir/Consent", json=body, headers=FHIR_JSON)
    refused(r)
    assert consent_count(env) == before


@pytest.mark.parametrize("status", ["active", "rejected", "inactive", "proposed", "draft"])
def test_a_clinic_cannot_move_its_proposal_except_to_withdraw_it(env: Env, status: str) -> None:
    proposal = ask(env)
    changed = with_status(proposal, status)
    if status == "proposed":
        changed["provision"]["period"]["end"] = "2040-01-01"  # widening its own ask
    refused(put(env, CLINIC_A, changed))
    assert versions(env, proposal["id"]) == 1


def test_a_clinic_withdraws_its_own_proposal_unchanged_only(env: Env) -> None:
    proposal = ask(env)
    sneaky = with_status(proposal, "entered-in-error")
    sneaky["provision"]["period"]["end"] = "2040-01-01"
    refused(put(env, CLINIC_A, sneaky))
    withdrawn = put(env, CLINIC_A, with_status(proposal, "entered-in-error"))
    assert withdrawn.status_code == 200, withdrawn.text
    assert withdrawn.json()["status"] == "entered-in-error"
    assert recorded(withdrawn.json()) == {"Practitioner/xa"}
    assert versions(env, proposal["id"]) == 2
    # once withdrawn, it is not a proposal any more
    refused(put(env, CLINIC_A, with_status(withdrawn.json(), "proposed")))


def test_another_clinic_cannot_withdraw_or_answer(env: Env) -> None:
    proposal = ask(env)
    # clinic B does not even see A's inquiry: 404, as for any record it may not see (§4)
    assert put(env, CLINIC_B, with_status(proposal, "entered-in-error")).status_code == 404
    # … and where B can see it (the patient lets everyone read), it is refused with 403
    as_(env, PATIENT)
    everyone = inquiry(P, [], status="active")
    everyone["policyRule"]["coding"][0]["code"] = "OPTIN"
    del everyone["provision"]
    assert env.c.post("/fhir/Consent", json=everyone, headers=FHIR_JSON).status_code == 201
    as_(env, CLINIC_B)
    assert env.get(f"Consent/{proposal['id']}").status_code == 200
    refused(put(env, CLINIC_B, with_status(proposal, "entered-in-error")))
    refused(put(env, CLINIC_B, with_status(proposal, "active")))
    assert versions(env, proposal["id"]) == 1


def test_a_clinic_cannot_delete_or_patch_a_consent(env: Env) -> None:
    proposal = ask(env)
    as_(env, CLINIC_A)
    refused(env.c.delete(f"/fhir/Consent/{proposal['id']}"))
    patch = [{"op": "replace", "path": "/status", "value": "active"}]
    r = env.c.patch(
        f"/fhir/Consent/{proposal['id']}",
        json=patch,
        headers={"content-type": "application/json-patch+json", "accept": "application/fhir+json"},
    )
    refused(r)
    assert versions(env, proposal["id"]) == 1


# -- the patient answers (§2.2), revokes (§2.3), acts alone (§2.4) ----------------------------


@pytest.mark.parametrize("who", [PATIENT, GUARDIAN], ids=["patient", "representative"])
def test_the_patient_or_representative_answers(env: Env, who: AccessContext) -> None:
    proposal = ask(env)
    narrowed = with_status(proposal, "active")
    narrowed["provision"]["period"]["end"] = "2015-12-31"  # narrow first
    narrowed["provision"]["class"] = [
        {"system": "http://hl7.org/fhir/resource-types", "code": "DocumentReference"}
    ]
    narrowed.pop("extension")  # the record of who asked stays whatever the patient sends
    r = put(env, who, narrowed)
    assert r.status_code == 200, r.text
    assert r.json()["provision"]["period"]["end"] == "2015-12-31"
    assert recorded(r.json()) == {"Practitioner/xa"}
    revoked = put(env, who, with_status(r.json(), "inactive"))
    assert revoked.status_code == 200
    again = put(env, who, with_status(revoked.json(), "active"))  # grant again
    assert again.status_code == 200
    refusal = ask(env)
    assert put(env, who, with_status(refusal, "rejected")).status_code == 200
    # the clinic sees how its inquiries ended
    as_(env, CLINIC_A)
    assert env.get(f"Consent/{refusal['id']}").json()["status"] == "rejected"


@pytest.mark.parametrize("status", ["active", "rejected", "inactive"])
def test_someone_who_is_not_a_legal_representative_cannot_answer(env: Env, status: str) -> None:
    proposal = ask(env)
    as_(env, FRIEND)
    assert env.get(f"Consent/{proposal['id']}").status_code == 404  # not theirs to see
    as_(env, PATIENT)
    everyone = inquiry(P, [], status="active")
    everyone["policyRule"]["coding"][0]["code"] = "OPTIN"
    del everyone["provision"]
    env.c.post("/fhir/Consent", json=everyone, headers=FHIR_JSON)
    refused(put(env, FRIEND, with_status(proposal, status)))
    assert versions(env, proposal["id"]) == 1


def test_the_patient_acts_alone_but_only_for_themselves(env: Env) -> None:
    as_(env, PATIENT)
    direct = inquiry(P, ["Organization/orgB"], status="active")
    r = env.c.post("/fhir/Consent", json=direct, headers=FHIR_JSON)
    assert r.status_code == 201 and recorded(r.json()) == set()
    deny_one = inquiry(P, ["Practitioner/yb"], status="active")
    deny_one["provision"]["type"] = "deny"
    deny_one["policyRule"]["coding"][0]["code"] = "OPTIN"
    assert env.c.post("/fhir/Consent", json=deny_one, headers=FHIR_JSON).status_code == 201
    # moving a Consent to another patient, or writing one for them, is refused
    moved = with_status(r.json(), "active")
    moved["patient"] = {"reference": "Patient/other"}
    refused(put(env, PATIENT, moved))
    as_(env, Caller.user("Patient/pw"))
    refused(
        env.c.post(
            "/fhir/Consent",
            json=inquiry("Patient/other", ["Patient/pw"], status="active"),
            headers=FHIR_JSON,
        )
    )
    # the patient deletes their own Consent
    as_(env, PATIENT)
    assert env.c.delete(f"/fhir/Consent/{r.json()['id']}").status_code == 204


def test_a_malformed_consent_is_refused_with_422(env: Env) -> None:
    backwards = inquiry(P, ["Organization/orgA"], start="2016-01-01", end="2015-01-01")
    for who in (CLINIC_A, PATIENT):
        as_(env, who)
        r = env.c.post("/fhir/Consent", json=backwards, headers=FHIR_JSON)
        assert r.status_code == 422, r.text
        outcome = r.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert "provision.period" in outcome["issue"][0]["diagnostics"]
        assert "2016" not in outcome["issue"][0]["diagnostics"]  # no content echoed
    assert consent_count(env) == 0


def test_the_patient_lists_inquiries_and_their_history(env: Env) -> None:
    first = ask(env)
    ask(env, CLINIC_B)
    withdrawn = ask(env)
    put(env, CLINIC_A, with_status(withdrawn, "entered-in-error"))
    answered = put(env, PATIENT, with_status(first, "active")).json()
    put(env, PATIENT, with_status(answered, "inactive"))
    as_(env, PATIENT)
    pending = env.get("Consent?patient=Patient/pw&status=proposed").json()
    assert pending["total"] == 1
    everything = env.get("Consent?patient=Patient/pw").json()
    assert {e["resource"]["status"] for e in everything["entry"]} == {
        "proposed",
        "entered-in-error",
        "inactive",
    }
    history = env.get(f"Consent/{first['id']}/_history").json()
    assert [e["resource"]["status"] for e in history["entry"]] == [
        "inactive",
        "active",
        "proposed",
    ]
    assert env.get("Consent/_history").json()["total"] == 6
    # another patient sees none of it
    as_(env, Caller.patient("other"))
    assert env.get("Consent?patient=Patient/pw").json()["total"] == 0


def test_grant_and_revocation_drive_access(env: Env) -> None:
    env.as_open()
    doc = env.post(document(P))
    proposal = ask(env)
    as_(env, CLINIC_A)
    assert env.get(f"DocumentReference/{doc}").status_code == 404  # asking is not a grant
    granted = put(env, PATIENT, with_status(proposal, "active")).json()
    as_(env, CLINIC_A)
    assert env.get(f"DocumentReference/{doc}").status_code == 200
    as_(env, CLINIC_A_SYSTEM)  # the clinic's system: Organization/orgA is the recipient
    assert env.get(f"DocumentReference/{doc}").status_code == 200
    as_(env, CLINIC_B)
    assert env.get(f"DocumentReference/{doc}").status_code == 404
    put(env, PATIENT, with_status(granted, "inactive"))
    for who in (CLINIC_A, CLINIC_A_SYSTEM):
        as_(env, who)
        assert env.get(f"DocumentReference/{doc}").status_code == 404
        assert env.get("DocumentReference?patient=Patient/pw").json()["total"] == 0
