"""consent.md §5 through the HTTP API: each official R4 example Consent is stored, then the named
requester reads and searches the resource of every row (read → 200/404, search by ``_id`` →
total 1/0), with the app's clock at the row's time.

Two deliberate stand-ins, because this server stores only the resource types it needs:

* notThis, "Observation/o1 that references Task/example3": a DocumentReference that references
  Task/example3 (``context.related``) — the same ``data`` meaning ``related`` decides it;
* smartonfhir, "a MedicationRequest": not a stored type, so that row is checked through the
  server's own decision path (:meth:`RequestFilter.explain`) on a MedicationRequest JSON.

§5 gives per-Consent results for requester {Practitioner/x, Organization/o2} and custodian o2.
Over HTTP the whole rule of §3 applies, and its custodian exception would permit every row where
the requester's Organization is the custodian; those rows therefore store their document with a
custodian outside the requester set (the examples' criteria never look at it), and
:func:`test_custodian_keeps_access_unless_named` checks the exception itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from conftest import load_example
from consent_kit import LOINC, Caller, Env, document, make_env, us

from fhir_consent.auth import AccessContext
from fhir_consent.config import Settings
from fhir_consent.consent import AccessRequest, Decision, Reason, decide, facts_from_resource

O2, O9, F001 = "Organization/o2", "Organization/o9", "Organization/f001"


@pytest.fixture
def env(settings: Settings) -> Iterator[Env]:
    with make_env(settings) as e:
        e.as_open()
        for name in ("Patient-f001", "Patient-xcda", "Organization-f001", "Practitioner-f204"):
            e.put(load_example(name))
        e.put(load_example("Practitioner-xcda-author"))
        e.put({"resourceType": "Patient", "id": "72"})
        e.put({"resourceType": "Patient", "id": "example"})
        for org in ("o2", "o9"):
            e.put({"resourceType": "Organization", "id": org, "name": org})
        for pid in ("x", "13"):
            e.put({"resourceType": "Practitioner", "id": pid})
        e.put(role("x-o2", "x", "o2"))
        e.put(role("f204-f001", "f204", "f001"))
        task = load_example("Task-example3")
        task.pop("text", None)
        e.put(task)
        yield e


def role(rid: str, practitioner: str, org: str) -> dict[str, Any]:
    return {
        "resourceType": "PractitionerRole",
        "id": rid,
        "active": True,
        "practitioner": {"reference": f"Practitioner/{practitioner}"},
        "organization": {"reference": f"Organization/{org}"},
    }


REQUESTERS: dict[str, AccessContext] = {
    "x+o2": Caller.practitioner("x"),  # PractitionerRole x → o2 (consent.md §1)
    "f001": Caller.system(F001),  # a clinic system bound to Organization/f001
    "f204+f001": Caller.practitioner("f204"),  # PractitionerRole f204 → f001
    "Patient/example": Caller.user("Patient/example", "user/*.rs"),
    "Practitioner/13": Caller.practitioner("13"),
}


def plain_doc(custodian: str) -> Callable[[str], dict[str, Any]]:
    return lambda patient: document(patient, custodian=custodian)


def cda_by_xcda_author(patient: str) -> dict[str, Any]:
    return document(
        patient,
        custodian=O9,
        content_type="application/hl7-cda+xml",
        author=[{"reference": "Practitioner/xcda-author"}],
        type={"coding": [{"system": LOINC, "code": "34133-9"}]},
    )


def doc_related_to_task(patient: str) -> dict[str, Any]:
    return document(patient, custodian=O9, context={"related": [{"reference": "Task/example3"}]})


def unrelated_doc(patient: str) -> dict[str, Any]:
    return document(patient, custodian=O9, context={"encounter": [{"reference": "Encounter/e1"}]})


@dataclass(frozen=True)
class Row:
    example: str
    request: str
    permit: bool
    who: str = "x+o2"
    when: str = "2015-06-01T00:00:00Z"
    purpose: str | None = None
    resource: Callable[[str], dict[str, Any]] | str = plain_doc(O9)  # or "Task/example3"


SMART = "2016-06-23T07:10:00Z"
ROWS = [
    Row("basic", "as above", False),
    Row("basic", "at 2017-01-01", True, when="2017-01-01T00:00:00Z"),
    Row("Out", "as above", False),
    Row("Out", "custodian Organization/f001", True, resource=plain_doc(F001)),
    Row(
        "Emergency",
        "custodian f001, purpose ETREAT",
        False,
        purpose="ETREAT",
        resource=plain_doc(F001),
    ),  # fmt: skip
    Row("notThis", "the resource Task/example3", False, resource="Task/example3"),
    Row(
        "notThis", "a document that references Task/example3", False, resource=doc_related_to_task
    ),  # fmt: skip
    Row("notThis", "an unrelated DocumentReference", True, resource=unrelated_doc),
    Row("notTime", "at 2015-01-15", False, when="2015-01-15T00:00:00Z"),
    Row("notTime", "at 2015-03-01", True, when="2015-03-01T00:00:00Z"),
    Row("notOrg", "requester {Organization/f001}", False, who="f001"),
    Row("notOrg", "as above", True),
    Row("notAuthor", "custodian Organization/f001", False, resource=plain_doc(F001)),
    Row("notThem", "requester {Practitioner/f204, Organization/f001}", False, who="f204+f001"),
    Row("notThem", "as above", True),
    Row(
        "grantor",
        "requester {Patient/example}, custodian f001",
        True,
        who="Patient/example",
        resource=plain_doc(F001),
    ),  # fmt: skip
    Row(
        "grantor",
        "requester {Patient/example}, custodian o2",
        False,
        who="Patient/example",
        resource=plain_doc(O2),
    ),  # fmt: skip
    Row(
        "signature",
        "Practitioner/13, CDA by xcda-author, LOINC 34133-9",
        True,
        who="Practitioner/13",
        when="2016-01-01T00:00:00Z",
        resource=cda_by_xcda_author,
    ),  # fmt: skip
    Row(
        "signature",
        "Practitioner/13, any other document",
        False,
        who="Practitioner/13",
        when="2016-01-01T00:00:00Z",
    ),  # fmt: skip
    Row("signature", "at 2016-01-01, as above", True, when="2016-01-01T00:00:00Z"),
    Row("smartonfhir", "at 2016-06-23T07:10Z, a DocumentReference", False, when=SMART),
    Row("smartonfhir", "at 2016-06-24", True, when="2016-06-24T00:00:00Z"),
]


def store_example(env: Env, name: str, status: str = "active") -> dict[str, Any]:
    env.as_open()
    consent = load_example(f"Consent-consent-example-{name}")
    consent["status"] = status
    return env.put(consent)


def visible(env: Env, ref: str, access: AccessContext, purpose: str | None) -> tuple[bool, bool]:
    """(read answered 200, search by _id found it) as ``access``; 404 is the only refusal."""
    env.caller.be(access)
    headers = {"X-Purpose-Of-Use": purpose} if purpose else {}
    rtype, _, rid = ref.partition("/")
    read = env.get(ref, **headers)
    assert read.status_code in (200, 404), read.text
    search = env.get(f"{rtype}?_id={rid}", **headers)
    assert search.status_code == 200, search.text
    count = env.get(f"{rtype}?_id={rid}&_summary=count", **headers).json()["total"]
    assert count == search.json()["total"]
    return read.status_code == 200, search.json()["total"] == 1


@pytest.mark.parametrize("example", sorted({r.example for r in ROWS}))
def test_section_5_rows_over_http(env: Env, example: str) -> None:
    """Every row of consent.md §5 whose resource this server stores, through the API."""
    rows = [r for r in ROWS if r.example == example]
    store_example(env, example)
    patient = load_example(f"Consent-consent-example-{example}")["patient"]["reference"]
    for row in rows:
        env.clock.set(row.when)
        if isinstance(row.resource, str):
            ref = row.resource
        else:
            env.as_open()
            ref = f"DocumentReference/{env.post(row.resource(patient))}"
        read, found = visible(env, ref, REQUESTERS[row.who], row.purpose)
        assert (read, found) == (row.permit, row.permit), f"{row.example}: {row.request}"
    store_example(env, example, "inactive")  # the next example stands alone


def test_table_covers_section_5() -> None:
    assert len(ROWS) + 1 == 23  # + the MedicationRequest row, below
    assert {r.example for r in ROWS} == {
        "basic", "Out", "Emergency", "notThis", "notTime", "notOrg",
        "notAuthor", "notThem", "grantor", "signature", "smartonfhir",
    }  # fmt: skip


def test_smartonfhir_medication_request_through_the_server_decision(env: Env) -> None:
    """§5 smartonfhir, "a MedicationRequest": permit (explicit, nested provision 0), decided
    over the Consents the server's enforcer loads for the requester in a transaction."""
    store_example(env, "smartonfhir")
    ctx = env.app.state.fhir
    with ctx.db.read() as conn:
        flt = ctx.consent.filter_for(conn, REQUESTERS["x+o2"], us(SMART))
    assert flt is not None and flt.requesters == {"Practitioner/x", O2}
    med = {
        "resourceType": "MedicationRequest",
        "id": "m1",
        "subject": {"reference": "Patient/xcda"},
    }
    request = AccessRequest(flt.requesters, at=datetime.fromisoformat(SMART.replace("Z", "+00:00")))
    decision = decide(flt.sql.consents["Patient/xcda"], request, facts_from_resource(med))
    assert decision.decision is Decision.PERMIT and decision.reason is Reason.CONSENT_EXPLICIT
    assert [r.provision_path for r in decision.deciding] == [(0,)]


@pytest.mark.parametrize(
    ("example", "when"),
    [
        ("basic", "2015-06-01T00:00:00Z"),
        ("Out", "2015-06-01T00:00:00Z"),
        ("notTime", "2015-01-15T00:00:00Z"),
        ("smartonfhir", SMART),
    ],
)
def test_custodian_keeps_access_unless_named(env: Env, example: str, when: str) -> None:
    """consent.md §3: with the §5 defaults literally (custodian o2, requester {x, o2}), the
    Consent's deny does not name the requester, so the custodian keeps its documents."""
    store_example(env, example)
    patient = load_example(f"Consent-consent-example-{example}")["patient"]["reference"]
    env.clock.set(when)
    held = f"DocumentReference/{env.post(document(patient, custodian=O2))}"
    other = f"DocumentReference/{env.post(document(patient, custodian=O9))}"
    assert visible(env, held, REQUESTERS["x+o2"], None) == (True, True)
    assert visible(env, other, REQUESTERS["x+o2"], None) == (False, False)


def test_an_explicit_deny_naming_the_custodian_wins(env: Env) -> None:
    """notOrg denies Organization/f001 by name: even its own documents are hidden from it."""
    store_example(env, "notOrg")
    held = f"DocumentReference/{env.post(document('Patient/f001', custodian=F001))}"
    assert visible(env, held, REQUESTERS["f001"], None) == (False, False)
    store_example(env, "notOrg", "inactive")
    # without the Consent (deny by default), the custodian exception applies again
    assert visible(env, held, REQUESTERS["f001"], None) == (True, True)


def test_pkb_over_http(env: Env) -> None:
    """pkb, the twelfth example (not in the §5 table): its nested label-N deny under the
    permitting root hides every ordinary document from Organization/f001; the patient still
    sees their own."""
    env.as_open()
    env.put({"resourceType": "Organization", "id": "f001"})
    store_example(env, "pkb")
    plain = f"DocumentReference/{env.post(document('Patient/example', custodian=O9))}"
    assert visible(env, plain, REQUESTERS["f001"], None) == (False, False)
    own = Caller.patient("example")
    assert visible(env, plain, own, None) == (True, True)
