"""Tests of the pure consent decision engine against consent.md §1, §3 and the §5 table."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fhir_consent.consent import (
    CONFIDENTIALITY_SYSTEM,
    AccessDecision,
    AccessRequest,
    CompiledConsent,
    ConsentResult,
    ConsentSet,
    Decision,
    Reason,
    ResourceFacts,
    compile_consent,
    decide,
    evaluate_consent,
    facts_from_resource,
    is_legal_representative,
    normalize_reference,
)

EXAMPLES = Path(__file__).parent / ".." / "fixtures" / "hl7-r4-examples"
PERMIT, DENY = Decision.PERMIT, Decision.DENY
ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ROLECODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
LOINC = "http://loinc.org"

# consent.md §5 defaults: request time, requester set and custodian.
T0 = datetime(2015, 6, 1, tzinfo=UTC)
DEFAULT_REQUESTERS = frozenset({"Practitioner/x", "Organization/o2"})


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8"))
    return data


def example(name: str) -> dict[str, Any]:
    return load(f"Consent-consent-example-{name}")


def example_patient(name: str) -> str:
    ref: str = example(name)["patient"]["reference"]
    return ref


def at(text: str) -> datetime:
    """A UTC instant from ISO text ending in Z."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def req(
    requesters: frozenset[str] = DEFAULT_REQUESTERS,
    *,
    when: datetime = T0,
    action: str = "access",
    purposes: frozenset[str] = frozenset({"TREAT"}),
) -> AccessRequest:
    return AccessRequest(requesters, action, purposes, at=when)


def doc(
    patient: str | None = "Patient/f001",
    *,
    ref: str = "DocumentReference/1",
    resource_type: str = "DocumentReference",
    custodian: str | None = "Organization/o2",
    authors: frozenset[str] = frozenset(),
    codes: frozenset[tuple[str | None, str]] = frozenset(),
    content_types: frozenset[str] = frozenset({"application/pdf"}),
    security: frozenset[tuple[str | None, str]] = frozenset({(CONFIDENTIALITY_SYSTEM, "N")}),
    clinical: tuple[datetime | None, datetime | None] | None = None,
    references: frozenset[str] = frozenset(),
    referenced_by: frozenset[str] = frozenset(),
) -> ResourceFacts:
    return ResourceFacts(
        ref=ref,
        resource_type=resource_type,
        patient=patient,
        custodian=custodian,
        authors=authors,
        codes=codes,
        content_types=content_types,
        security_labels=security,
        clinical_period=clinical,
        references=references,
        referenced_by=referenced_by,
    )


def decide_both(
    consents: Sequence[CompiledConsent],
    request: AccessRequest,
    resource: ResourceFacts,
    **options: Any,
) -> AccessDecision:
    """decide() over a plain list and over a ConsentSet; both must give the same answer."""
    plain = decide(list(consents), request, resource, **options)
    indexed = decide(ConsentSet(consents), request, resource, **options)
    assert plain == indexed
    return plain


# ---------------------------------------------------------------------------------------------
# consent.md §5: the official R4 examples, one Consent at a time
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row of the consent.md §5 table; unset fields take the §5 defaults."""

    example: str
    request: str  # the table's "request" column, for the test id
    decision: Decision
    explicit: bool
    path: tuple[int, ...] = ()  # the deciding provision
    requesters: frozenset[str] = DEFAULT_REQUESTERS
    when: str = "2015-06-01T00:00:00Z"
    purposes: frozenset[str] = frozenset({"TREAT"})
    custodian: str = "Organization/o2"
    resource: Callable[[str], ResourceFacts] | None = None  # patient → facts; default: a document

    def build(self) -> tuple[AccessRequest, ResourceFacts]:
        patient = example_patient(self.example)
        request = req(self.requesters, when=at(self.when), purposes=self.purposes)
        if self.resource is not None:
            return request, self.resource(patient)
        return request, doc(patient, custodian=self.custodian)


def _task_example3(patient: str) -> ResourceFacts:
    facts = facts_from_resource(load("Task-example3"))
    assert facts.ref == "Task/example3" and facts.patient == patient
    return facts


def _observation_referencing_task(patient: str) -> ResourceFacts:
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "basedOn": [{"reference": "Task/example3"}],
        "subject": {"reference": patient},
        "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
    }
    facts = facts_from_resource(observation)
    assert facts.ref == "Observation/o1" and "Task/example3" in facts.references
    return facts


def _unrelated_document(patient: str) -> ResourceFacts:
    return doc(patient, references=frozenset({patient, "Encounter/e1"}))


def _cda_by_xcda_author(patient: str) -> ResourceFacts:
    return doc(
        patient,
        authors=frozenset({"Practitioner/xcda-author"}),
        content_types=frozenset({"application/hl7-cda+xml"}),
        codes=frozenset({(LOINC, "34133-9")}),
    )


def _medication_request(patient: str) -> ResourceFacts:
    return doc(
        patient,
        ref="MedicationRequest/m1",
        resource_type="MedicationRequest",
        content_types=frozenset(),
    )


F001 = "Organization/f001"
P13 = frozenset({"Practitioner/13"})
SMART_TIME = "2016-06-23T07:10:00Z"
ROWS: list[Row] = [
    Row("basic", "as above", DENY, True),
    Row("basic", "at 2017-01-01", PERMIT, False, when="2017-01-01T00:00:00Z"),
    Row("Out", "as above", DENY, False),
    Row("Out", "custodian f001", PERMIT, True, custodian=F001),
    Row(
        "Emergency",
        "custodian f001, purpose ETREAT",
        DENY,
        True,
        (0,),
        custodian=F001,
        purposes=frozenset({"ETREAT"}),
    ),
    Row("notThis", "the resource Task/example3", DENY, True, resource=_task_example3),
    Row(
        "notThis",
        "Observation/o1 that references Task/example3",
        DENY,
        True,
        resource=_observation_referencing_task,
    ),
    Row("notThis", "an unrelated DocumentReference", PERMIT, False, resource=_unrelated_document),
    Row("notTime", "at 2015-01-15", DENY, True, when="2015-01-15T00:00:00Z"),
    Row("notTime", "at 2015-03-01", PERMIT, False, when="2015-03-01T00:00:00Z"),
    Row("notOrg", "requester {Organization/f001}", DENY, True, requesters=frozenset({F001})),
    Row("notOrg", "as above", PERMIT, False),
    Row("notAuthor", "custodian Organization/f001", DENY, True, custodian=F001),
    Row(
        "notThem",
        "requester {Practitioner/f204, Organization/f001}",
        DENY,
        True,
        requesters=frozenset({"Practitioner/f204", F001}),
    ),
    Row("notThem", "as above", PERMIT, False),
    Row(
        "grantor",
        "requester {Patient/example}, custodian f001",
        PERMIT,
        True,
        requesters=frozenset({"Patient/example"}),
        custodian=F001,
    ),
    Row(
        "grantor",
        "requester {Patient/example}, custodian o2",
        DENY,
        False,
        requesters=frozenset({"Patient/example"}),
    ),
    Row(
        "signature",
        "Practitioner/13, CDA by xcda-author, LOINC 34133-9",
        PERMIT,
        True,
        (0,),
        requesters=P13,
        when="2016-01-01T00:00:00Z",
        resource=_cda_by_xcda_author,
    ),
    Row(
        "signature",
        "Practitioner/13, any other document",
        DENY,
        True,
        requesters=P13,
        when="2016-01-01T00:00:00Z",
    ),
    Row("signature", "at 2016-01-01, as above", PERMIT, False, when="2016-01-01T00:00:00Z"),
    Row(
        "smartonfhir",
        "at 2016-06-23T07:10Z, a MedicationRequest",
        PERMIT,
        True,
        (0,),
        when=SMART_TIME,
        resource=_medication_request,
    ),
    Row("smartonfhir", "at 2016-06-23T07:10Z, a DocumentReference", DENY, True, when=SMART_TIME),
    Row("smartonfhir", "at 2016-06-24", PERMIT, False, when="2016-06-24T00:00:00Z"),
]


@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r.example}: {r.request}") for r in ROWS])
def test_official_examples_table(row: Row) -> None:
    """consent.md §5, row by row: one Consent's decision and whether a provision matched."""
    consent = compile_consent(example(row.example))
    assert consent.error is None and consent.applicable
    request, resource = row.build()
    result = evaluate_consent(consent, request, resource)
    expected = ConsentResult(row.decision, row.explicit, f"consent-example-{row.example}", row.path)
    assert result == expected


def test_table_covers_every_row_of_section_5() -> None:
    assert len(ROWS) == 23
    assert {row.example for row in ROWS} == {
        "basic",
        "Out",
        "Emergency",
        "notThis",
        "notTime",
        "notOrg",
        "notAuthor",
        "notThem",
        "grantor",
        "signature",
        "smartonfhir",
    }


def test_pkb_compiles_and_applies_to_its_patient() -> None:
    """pkb is not in the §5 table; it must still compile (OPTOUT + PRCP f001 + labels)."""
    consent = compile_consent(example("pkb"))
    assert consent.error is None and consent.base is DENY
    # Root: PRCP f001, access, label N → matches (permit); the third child (label N, no type →
    # deny under the permit root) matches too, so the nested deny wins (consent.md §3.4).
    result = evaluate_consent(
        consent, req(frozenset({"Organization/f001"})), doc("Patient/example")
    )
    assert result == ConsentResult(DENY, True, "consent-example-pkb", (2,))
    other = evaluate_consent(consent, req(), doc("Patient/example"))
    assert other == ConsentResult(DENY, False, "consent-example-pkb", ())


def test_consent_about_another_patient_is_not_applicable() -> None:
    consent = compile_consent(example("basic"))
    result = evaluate_consent(consent, req(), doc("Patient/other"))
    assert result.decision is None and not result.explicit


@pytest.mark.parametrize(
    "status", ["draft", "proposed", "rejected", "inactive", "entered-in-error"]
)
def test_only_active_consents_apply(status: str) -> None:
    """consent.md §3.1."""
    raw = example("Out")
    raw["status"] = status
    consent = compile_consent(raw)
    assert consent.error is None and not consent.applicable
    request, resource = req(), doc("Patient/f001", custodian="Organization/f001")
    assert evaluate_consent(consent, request, resource).decision is None
    assert decide_both([consent], request, resource).reason is Reason.DEFAULT_DENY


# ---------------------------------------------------------------------------------------------
# Base policy and provision criteria (consent.md §3.2-3.3)
# ---------------------------------------------------------------------------------------------


def consent(
    provision: dict[str, Any] | None = None,
    *,
    policy: str = "OPTOUT",
    cid: str = "c1",
    patient: str = "Patient/f001",
    status: str = "active",
    **extra: Any,
) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "resourceType": "Consent",
        "id": cid,
        "status": status,
        "scope": {"coding": [{"code": "patient-privacy"}]},
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": patient},
        "policyRule": {"coding": [{"system": ACTCODE, "code": policy}]},
        **extra,
    }
    if provision is not None:
        raw["provision"] = provision
    return raw


def actor(ref: str, role: str | None = "PRCP") -> dict[str, Any]:
    out: dict[str, Any] = {"reference": {"reference": ref}}
    if role is not None:
        out["role"] = {"coding": [{"system": PARTICIPATION, "code": role}]}
    return out


def access(*codes: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": ACTION, "code": c}]} for c in codes]


def grant(
    who: str = "Organization/o2", start: str = "2015-01-01", end: str = "2015-12-31", **more: Any
) -> dict[str, Any]:
    """The inquiry workflow's provision (consent.md §2): PRCP actor, access, period."""
    return {
        "actor": [actor(who)],
        "action": access("access"),
        "period": {"start": start, "end": end},
        **more,
    }


def one(raw: dict[str, Any], request: AccessRequest, resource: ResourceFacts) -> ConsentResult:
    compiled = compile_consent(raw)
    assert compiled.error is None, compiled.error
    return evaluate_consent(compiled, request, resource)


@pytest.mark.parametrize(
    ("policy_rule", "policy", "base"),
    [
        ({"coding": [{"system": ACTCODE, "code": "OPTIN"}]}, None, PERMIT),
        ({"coding": [{"system": ACTCODE, "code": "OPTOUT"}]}, None, DENY),
        (None, [{"uri": "https://example.org/policies/opt-in"}], PERMIT),
        (None, [{"uri": "https://example.org/policies/opt-out"}], DENY),
        ({"coding": [{"system": "http://other", "code": "OPTIN"}]}, None, DENY),
        (None, None, DENY),
    ],
)
def test_base_policy(policy_rule: Any, policy: Any, base: Decision) -> None:
    """consent.md §3.2: permit iff OPTIN (v3-ActCode) or a policy.uri ending in /opt-in."""
    raw = consent()
    del raw["policyRule"]
    if policy_rule is not None:
        raw["policyRule"] = policy_rule
    if policy is not None:
        raw["policy"] = policy
    compiled = compile_consent(raw)
    assert compiled.base is base
    assert evaluate_consent(compiled, req(), doc()) == ConsentResult(base, False, "c1", ())


def test_consent_without_provision_is_its_base_policy() -> None:
    """R4 allows provision 0..1; without one the result is the implicit base (§3.5)."""
    assert one(consent(policy="OPTIN"), req(), doc()) == ConsentResult(PERMIT, False, "c1", ())
    assert one(consent(policy="OPTOUT"), req(), doc()) == ConsentResult(DENY, False, "c1", ())


def test_grant_period_is_inclusive_of_the_end_date() -> None:
    raw = consent(grant(end="2015-06-01"))
    assert one(raw, req(when=at("2015-06-01T23:59:59.999999Z")), doc()).decision is PERMIT
    assert one(raw, req(when=at("2015-06-02T00:00:00Z")), doc()).explicit is False
    assert one(raw, req(when=at("2014-12-31T23:59:59Z")), doc()).explicit is False


def test_period_respects_timezones() -> None:
    raw = consent(grant(start="2015-06-01T10:00:00+02:00", end="2015-06-01T11:00:00+02:00"))
    assert one(raw, req(when=at("2015-06-01T08:30:00Z")), doc()).decision is PERMIT
    assert one(raw, req(when=at("2015-06-01T09:00:00.999Z")), doc()).decision is PERMIT
    assert one(raw, req(when=at("2015-06-01T09:00:01Z")), doc()).decision is DENY
    assert one(raw, req(when=at("2015-06-01T10:30:00Z")), doc()).decision is DENY


@pytest.mark.parametrize(
    ("actors", "resource", "matches"),
    [
        ([actor("Organization/o2", None)], doc(), True),  # no role = recipient
        ([actor("Organization/o2", "IRCP")], doc(), True),
        ([actor("Organization/o2", "DELEGATEE")], doc(), True),
        ([actor("Organization/o2", "AUTHZR")], doc(), True),
        ([actor("Organization/o9", "PRCP")], doc(), False),
        ([actor("Organization/o9", "WIT")], doc(), False),  # unknown role → recipient
        ([actor("Organization/o2", "PRCP"), actor("Organization/o9", "PRCP")], doc(), True),
        ([actor("Organization/c", "CST")], doc(custodian="Organization/c"), True),
        ([actor("Organization/c", "CST")], doc(custodian="Organization/o2"), False),
        ([actor("Organization/c", "CST")], doc(custodian=None), False),
        ([actor("Practitioner/a", "AUT")], doc(authors=frozenset({"Practitioner/a"})), True),
        ([actor("Practitioner/a", "INF")], doc(authors=frozenset({"Practitioner/a"})), True),
        ([actor("Practitioner/a", "ENT")], doc(authors=frozenset({"Practitioner/b"})), False),
        # groups combine with AND; entries in one group with OR
        (
            [actor("Organization/o2"), actor("Organization/c", "CST")],
            doc(custodian="Organization/c"),
            True,
        ),
        ([actor("Organization/o2"), actor("Organization/c", "CST")], doc(), False),
        ([actor("Organization/o9"), actor("Organization/o2", "CST")], doc(), False),
        # absolute actor references are normalized
        ([actor("https://ehr.example/fhir/Organization/o2", "PRCP")], doc(), True),
        ([actor("https://ehr.example/fhir/Organization/o2/_history/3", "PRCP")], doc(), True),
    ],
)
def test_actor_roles(actors: list[dict[str, Any]], resource: ResourceFacts, matches: bool) -> None:
    """consent.md §3.3 actor: recipients ∩ requesters, CST ∋ custodian, AUT/INF/ENT ∩ authors."""
    result = one(consent({"actor": actors}), req(), resource)
    assert result == ConsentResult(PERMIT if matches else DENY, matches, "c1", ())


@pytest.mark.parametrize(
    ("criterion", "request_", "resource", "matches"),
    [
        ({"action": access("access")}, req(), doc(), True),
        ({"action": access("access")}, req(action="correct"), doc(), False),
        ({"action": access("access", "correct")}, req(action="correct"), doc(), True),
        ({"action": [{"text": "read"}]}, req(), doc(), False),
        ({"purpose": [{"system": ACT_REASON, "code": "TREAT"}]}, req(), doc(), True),
        (
            {"purpose": [{"system": ACT_REASON, "code": "HRESCH"}]},
            req(purposes=frozenset({"TREAT", "HRESCH"})),
            doc(),
            True,
        ),
        ({"purpose": [{"system": ACT_REASON, "code": "ETREAT"}]}, req(), doc(), False),
        (
            {"class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]},
            req(),
            doc(resource_type="Observation", ref="Observation/1"),
            True,
        ),
        (
            {"class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]},
            req(),
            doc(),
            False,
        ),
        ({"class": [{"system": "urn:ietf:bcp:13", "code": "application/pdf"}]}, req(), doc(), True),
        ({"class": [{"system": "urn:ietf:bcp:13", "code": "text/plain"}]}, req(), doc(), False),
        (
            {"class": [{"system": "urn:ietf:bcp:13", "code": "Text/Plain"}]},
            req(),
            doc(content_types=frozenset({"text/plain"})),
            True,
        ),
        (
            {"code": [{"coding": [{"system": LOINC, "code": "34133-9"}]}]},
            req(),
            doc(codes=frozenset({(LOINC, "34133-9")})),
            True,
        ),
        (
            {"code": [{"coding": [{"system": LOINC, "code": "34133-9"}]}]},
            req(),
            doc(codes=frozenset({("http://snomed.info/sct", "34133-9")})),
            False,
        ),
        ({"securityLabel": [{"system": CONFIDENTIALITY_SYSTEM, "code": "N"}]}, req(), doc(), True),
        (  # a resource without labels counts as Confidentiality N
            {"securityLabel": [{"system": CONFIDENTIALITY_SYSTEM, "code": "N"}]},
            req(),
            doc(security=frozenset()),
            True,
        ),
        (
            {"securityLabel": [{"system": CONFIDENTIALITY_SYSTEM, "code": "R"}]},
            req(),
            doc(),
            False,
        ),
        (
            {"dataPeriod": {"start": "2015-01-01", "end": "2015-01-31"}},
            req(),
            doc(clinical=(at("2015-01-10T08:00:00Z"), at("2015-01-10T09:00:00Z"))),
            True,
        ),
        (  # contained only: a clinical period that runs past the dataPeriod does not match
            {"dataPeriod": {"start": "2015-01-01", "end": "2015-01-31"}},
            req(),
            doc(clinical=(at("2015-01-30T08:00:00Z"), at("2015-02-02T09:00:00Z"))),
            False,
        ),
        (  # a single clinical date (end missing) is a point
            {"dataPeriod": {"start": "2015-01-01", "end": "2015-01-31"}},
            req(),
            doc(clinical=(at("2015-01-31T23:00:00Z"), None)),
            True,
        ),
        (  # no clinical date: a populated dataPeriod does not match
            {"dataPeriod": {"start": "2015-01-01"}},
            req(),
            doc(clinical=None),
            False,
        ),
        (
            {"data": [{"meaning": "instance", "reference": {"reference": "DocumentReference/1"}}]},
            req(),
            doc(),
            True,
        ),
        (
            {"data": [{"meaning": "instance", "reference": {"reference": "Encounter/e1"}}]},
            req(),
            doc(references=frozenset({"Encounter/e1"})),
            False,
        ),
        (
            {"data": [{"meaning": "related", "reference": {"reference": "Encounter/e1"}}]},
            req(),
            doc(references=frozenset({"Encounter/e1"})),
            True,
        ),
        (
            {"data": [{"meaning": "related", "reference": {"reference": "Encounter/e1"}}]},
            req(),
            doc(referenced_by=frozenset({"Encounter/e1"})),
            False,
        ),
        (
            {"data": [{"meaning": "dependents", "reference": {"reference": "Provenance/p"}}]},
            req(),
            doc(referenced_by=frozenset({"Provenance/p"})),
            True,
        ),
        (
            {
                "data": [
                    {"meaning": "dependents", "reference": {"reference": "DocumentReference/1"}}
                ]
            },
            req(),
            doc(),
            True,
        ),
        (
            {"data": [{"meaning": "authoredby", "reference": {"reference": "Practitioner/a"}}]},
            req(),
            doc(authors=frozenset({"Practitioner/a"})),
            True,
        ),
        (
            {"data": [{"meaning": "authoredby", "reference": {"reference": "Practitioner/a"}}]},
            req(),
            doc(),
            False,
        ),
    ],
)
def test_provision_criteria(
    criterion: dict[str, Any], request_: AccessRequest, resource: ResourceFacts, matches: bool
) -> None:
    """consent.md §3.3, one criterion at a time (OPTOUT base: a match is an explicit permit)."""
    result = one(consent(criterion), request_, resource)
    assert result == ConsentResult(PERMIT if matches else DENY, matches, "c1", ())
    decide_both(compiled(consent(criterion)), request_, resource)  # the index agrees


def test_every_populated_criterion_must_match() -> None:
    provision = {
        **grant(),
        "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "DocumentReference"}],
        "purpose": [{"system": ACT_REASON, "code": "TREAT"}],
    }
    raw = consent(provision)
    assert one(raw, req(), doc()).decision is PERMIT
    assert one(raw, req(action="correct"), doc()).decision is DENY
    assert one(raw, req(purposes=frozenset({"HPAYMT"})), doc()).decision is DENY
    assert one(raw, req(frozenset({"Organization/o9"})), doc()).decision is DENY
    assert one(raw, req(when=at("2016-01-01T00:00:00Z")), doc()).decision is DENY
    observation = doc(resource_type="Observation", ref="Observation/1")
    assert one(raw, req(), observation).decision is DENY


def test_nested_provisions_and_paths() -> None:
    """consent.md §3.4: children without type invert the parent; a matching child deny wins."""
    raw = consent(
        {
            "actor": [actor("Organization/o2")],
            "provision": [
                {"type": "permit", "code": [{"coding": [{"system": LOINC, "code": "A"}]}]},
                {"code": [{"coding": [{"system": LOINC, "code": "B"}]}]},  # no type → deny
                {
                    "code": [{"coding": [{"system": LOINC, "code": "C"}]}],
                    "provision": [  # under a deny: no type → permit
                        {"securityLabel": [{"system": CONFIDENTIALITY_SYSTEM, "code": "N"}]}
                    ],
                },
            ],
        }
    )
    both = doc(codes=frozenset({(LOINC, "A"), (LOINC, "B")}))
    assert one(raw, req(), doc()) == ConsentResult(PERMIT, True, "c1", ())
    assert one(raw, req(), doc(codes=frozenset({(LOINC, "A")}))) == ConsentResult(
        PERMIT, True, "c1", (0,)
    )
    assert one(raw, req(), both) == ConsentResult(DENY, True, "c1", (1,))
    label_c = doc(codes=frozenset({(LOINC, "C")}))
    assert one(raw, req(), label_c) == ConsentResult(PERMIT, True, "c1", (2, 0))
    restricted = doc(
        codes=frozenset({(LOINC, "C")}), security=frozenset({(CONFIDENTIALITY_SYSTEM, "R")})
    )
    assert one(raw, req(), restricted) == ConsentResult(DENY, True, "c1", (2,))
    # a child never matches when its parent does not
    assert one(raw, req(frozenset({"Organization/o9"})), both) == ConsentResult(
        DENY, False, "c1", ()
    )


# ---------------------------------------------------------------------------------------------
# decide_both(): the layer across Consents (consent.md §3, last paragraphs)
# ---------------------------------------------------------------------------------------------


def compiled(*raws: dict[str, Any]) -> list[CompiledConsent]:
    out = [compile_consent(r) for r in raws]
    assert all(c.error is None for c in out)
    return out


CLINIC = frozenset({"Practitioner/x", "Organization/o3"})  # not the custodian (o2)


def test_patient_always_sees_own_data() -> None:
    consents = compiled(consent({"type": "deny"}, cid="deny-all"))
    decision = decide_both(consents, req(frozenset({"Patient/f001"})), doc())
    assert decision == AccessDecision(PERMIT, Reason.PATIENT_SELF, ())


def test_representative_sees_patient_data() -> None:
    consents = compiled(consent({"type": "deny"}, cid="deny-all"))
    request = req(frozenset({"RelatedPerson/guardian"}))
    assert decide_both(consents, request, doc()).decision is DENY
    decision = decide_both(
        consents, request, doc(), representatives=frozenset({"RelatedPerson/guardian"})
    )
    assert decision == AccessDecision(PERMIT, Reason.REPRESENTATIVE, ())


def test_self_exception_needs_a_patient_on_the_resource() -> None:
    binary = doc(patient=None, resource_type="Binary", ref="Binary/b", custodian=None)
    request = req(frozenset({"Patient/f001"}))
    assert decide_both([], request, binary) == AccessDecision(DENY, Reason.DEFAULT_DENY, ())


def test_default_deny() -> None:
    assert decide_both([], req(CLINIC), doc()) == AccessDecision(DENY, Reason.DEFAULT_DENY, ())
    other_patient = compiled(consent(grant("Organization/o3"), patient="Patient/other"))
    assert decide_both(other_patient, req(CLINIC), doc()).reason is Reason.DEFAULT_DENY


def test_explicit_grant_permits() -> None:
    consents = compiled(consent(grant("Organization/o3"), cid="grant"))
    decision = decide_both(consents, req(CLINIC), doc())
    assert decision == AccessDecision(
        PERMIT, Reason.CONSENT_EXPLICIT, (ConsentResult(PERMIT, True, "grant", ()),)
    )
    expired = decide_both(consents, req(CLINIC, when=at("2016-02-01T00:00:00Z")), doc())
    assert expired == AccessDecision(
        DENY, Reason.CONSENT_IMPLICIT, (ConsentResult(DENY, False, "grant", ()),)
    )


def test_revocation_takes_effect_with_the_new_version() -> None:
    active = consent(grant("Organization/o3"), cid="g", meta={"versionId": "2"})
    revoked = {**active, "status": "inactive", "meta": {"versionId": "3"}}
    assert decide_both(compiled(active), req(CLINIC), doc()).decision is PERMIT
    assert decide_both(compiled(revoked), req(CLINIC), doc()) == AccessDecision(
        DENY, Reason.DEFAULT_DENY
    )
    assert decide_both(compiled(active), req(CLINIC), doc()).deciding[0].consent_version == "2"


def test_explicit_outranks_implicit() -> None:
    opt_in = consent(
        {"type": "deny", "actor": [actor("Organization/o9")]}, policy="OPTIN", cid="in"
    )
    deny_clinic = consent({"actor": [actor("Organization/o3")]}, policy="OPTIN", cid="no-o3")
    grant_clinic = consent(grant("Organization/o3"), cid="grant")
    opt_out = consent(policy="OPTOUT", cid="out")
    # implicit permit (opt_in) vs explicit deny → deny
    d = decide_both(compiled(opt_in, deny_clinic), req(CLINIC), doc())
    assert d == AccessDecision(
        DENY, Reason.CONSENT_EXPLICIT, (ConsentResult(DENY, True, "no-o3", ()),)
    )
    # implicit deny (opt_out) vs explicit permit → permit
    d = decide_both(compiled(opt_out, grant_clinic), req(CLINIC), doc())
    assert d == AccessDecision(
        PERMIT, Reason.CONSENT_EXPLICIT, (ConsentResult(PERMIT, True, "grant", ()),)
    )


def test_deny_wins_within_a_tier() -> None:
    grant_clinic = consent(grant("Organization/o3"), cid="grant")
    deny_x = consent({"type": "deny", "actor": [actor("Practitioner/x")]}, cid="no-x")
    d = decide_both(compiled(grant_clinic, deny_x), req(CLINIC), doc())
    assert d == AccessDecision(
        DENY, Reason.CONSENT_EXPLICIT, (ConsentResult(DENY, True, "no-x", ()),)
    )
    # implicit tier: OPTIN (permit) + OPTOUT (deny), nothing matched → deny
    d = decide_both(
        compiled(consent(policy="OPTIN", cid="a"), consent(cid="b")), req(CLINIC), doc()
    )
    assert d == AccessDecision(
        DENY, Reason.CONSENT_IMPLICIT, (ConsentResult(DENY, False, "b", ()),)
    )
    # implicit permits only → permit, every implicit permit listed
    d = decide_both(
        compiled(consent(policy="OPTIN", cid="a"), consent(policy="OPTIN", cid="b")),
        req(CLINIC),
        doc(),
    )
    assert d.decision is PERMIT and [r.consent_id for r in d.deciding] == ["a", "b"]


def test_custodian_keeps_access() -> None:
    """consent.md §3: the custodian keeps access unless an explicit deny names it."""
    custodian_request = req()  # {Practitioner/x, Organization/o2}, custodian o2
    assert decide_both([], custodian_request, doc()) == AccessDecision(PERMIT, Reason.CUSTODIAN)
    opt_out = compiled(consent(cid="out"))
    assert decide_both(opt_out, custodian_request, doc()).reason is Reason.CUSTODIAN
    # basic denies explicitly but names nobody → the custodian keeps access
    basic = compiled(example("basic"))
    assert evaluate_consent(basic[0], custodian_request, doc()).decision is DENY
    assert decide_both(basic, custodian_request, doc()).reason is Reason.CUSTODIAN


@pytest.mark.parametrize(
    "deny",
    [
        {"type": "deny", "actor": [actor("Organization/o2")]},
        {"type": "deny", "actor": [actor("Organization/o2", "CST")]},
        {"type": "deny", "actor": [actor("Practitioner/x")]},  # names a member of the set
        # the deny is nested in a provision naming the custodian
        {
            "type": "permit",
            "actor": [actor("Organization/o2")],
            "provision": [{"type": "deny", "code": [{"coding": [{"system": LOINC, "code": "X"}]}]}],
        },
    ],
)
def test_custodian_loses_access_to_an_explicit_deny_naming_it(deny: dict[str, Any]) -> None:
    resource = doc(codes=frozenset({(LOINC, "X")}))
    d = decide_both(compiled(consent(deny, policy="OPTIN", cid="no")), req(), resource)
    assert d.decision is DENY and d.reason is Reason.CONSENT_EXPLICIT


def test_notauthor_example_removes_custodian_access() -> None:
    notauthor = compiled(example("notAuthor"))
    request = req(frozenset({"Organization/f001", "Practitioner/f002"}))
    d = decide_both(notauthor, request, doc(custodian="Organization/f001"))
    assert d.decision is DENY and d.deciding[0].consent_id == "consent-example-notAuthor"


def test_deny_naming_someone_else_does_not_remove_custodian_access() -> None:
    deny_o9 = consent({"type": "deny", "actor": [actor("Organization/o9")]}, policy="OPTIN")
    deny_all = consent({"type": "deny"}, policy="OPTIN", cid="c2")
    d = decide_both(compiled(deny_o9, deny_all), req(), doc())
    assert d == AccessDecision(PERMIT, Reason.CUSTODIAN)


def test_break_glass() -> None:
    """consent.md §3 break-glass: ETREAT, enabled, and no explicit deny naming the requester."""
    emergency = req(CLINIC, purposes=frozenset({"ETREAT"}))
    assert decide_both([], emergency, doc()).reason is Reason.DEFAULT_DENY
    d = decide_both([], emergency, doc(), break_glass_enabled=True)
    assert d == AccessDecision(PERMIT, Reason.BREAK_GLASS)
    # without ETREAT, enabling break-glass changes nothing
    assert decide_both([], req(CLINIC), doc(), break_glass_enabled=True).decision is DENY
    # overrides an implicit deny and an explicit deny that names someone else
    others = compiled(
        consent(cid="out"), consent({"type": "deny", "actor": [actor("Organization/o9")]})
    )
    assert (
        decide_both(others, emergency, doc(), break_glass_enabled=True).reason is Reason.BREAK_GLASS
    )
    # but not an explicit deny naming the clinician or their organization
    for who in ("Practitioner/x", "Organization/o3"):
        named = compiled(consent({"type": "deny", "actor": [actor(who)]}, policy="OPTIN"))
        d = decide_both(named, emergency, doc(), break_glass_enabled=True)
        assert d.decision is DENY and d.reason is Reason.CONSENT_EXPLICIT


def test_emergency_example_with_break_glass() -> None:
    """Emergency's nested deny names f001 (CST): f001 gets no break-glass for its documents."""
    emergency = compiled(example("Emergency"))
    request = req(
        frozenset({"Practitioner/f002", "Organization/f001"}), purposes=frozenset({"ETREAT"})
    )
    d = decide_both(
        emergency, request, doc(custodian="Organization/f001"), break_glass_enabled=True
    )
    assert d.decision is DENY and d.deciding == (
        ConsentResult(DENY, True, "consent-example-Emergency", (0,)),
    )


def test_consent_results_are_reported_per_consent() -> None:
    raws = [example(n) for n in ("basic", "notTime", "notOrg", "notThem", "notThis")]
    d = decide_both(compiled(*raws), req(frozenset({"Practitioner/x", "Organization/o3"})), doc())
    assert d.decision is DENY and d.reason is Reason.CONSENT_EXPLICIT
    assert [r.consent_id for r in d.deciding] == ["consent-example-basic"]


# ---------------------------------------------------------------------------------------------
# Malformed input never crashes and never grants (consent.md §3.1)
# ---------------------------------------------------------------------------------------------


def _mutations() -> list[tuple[str, dict[str, Any]]]:
    good = consent(grant("Organization/o3"), cid="m")
    cases: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("bad date", lambda c: c["provision"]["period"].update(start="2015-13-01")),
        ("not a date", lambda c: c["provision"]["period"].update(end="soon")),
        ("time without zone", lambda c: c["provision"]["period"].update(end="2015-12-31T10:00:00")),
        ("start after end", lambda c: c["provision"]["period"].update(start="2016-01-01")),
        ("period not an object", lambda c: c["provision"].update(period="2015")),
        ("bad dataPeriod", lambda c: c["provision"].update(dataPeriod={"start": "2015-02-30"})),
        ("provision not an object", lambda c: c.update(provision="all")),
        ("provision is an array", lambda c: c.update(provision=[grant("Organization/o3")])),
        ("unknown type", lambda c: c["provision"].update(type="maybe")),
        ("actor not a list", lambda c: c["provision"].update(actor=actor("Organization/o3"))),
        ("actor without reference", lambda c: c["provision"]["actor"][0].pop("reference")),
        (
            "contained actor",
            lambda c: c["provision"]["actor"][0].update(reference={"reference": "#a"}),
        ),
        (
            "identifier-only actor",
            lambda c: c["provision"]["actor"][0].update(reference={"identifier": {"value": "1"}}),
        ),
        ("role not a concept", lambda c: c["provision"]["actor"][0].update(role="PRCP")),
        ("code not a string", lambda c: c["provision"]["action"][0]["coding"][0].update(code=7)),
        (
            "unknown data meaning",
            lambda c: c["provision"].update(
                data=[{"meaning": "all", "reference": {"reference": "Task/1"}}]
            ),
        ),
        ("nested not a list", lambda c: c["provision"].update(provision={"type": "permit"})),
        ("policyRule not a concept", lambda c: c.update(policyRule="OPTIN")),
        (
            "OPTIN and OPTOUT",
            lambda c: c["policyRule"]["coding"].append({"system": ACTCODE, "code": "OPTIN"}),
        ),
        ("modifierExtension", lambda c: c["provision"].update(modifierExtension=[{"url": "x"}])),
        ("no patient", lambda c: c.pop("patient")),
        ("patient not a Patient", lambda c: c.update(patient={"reference": "Group/g"})),
        ("not a Consent", lambda c: c.update(resourceType="Contract")),
    ]
    out = []
    for name, mutate in cases:
        raw = copy.deepcopy(good)
        mutate(raw)
        out.append((name, raw))
    deep: dict[str, Any] = {"type": "permit"}
    for _ in range(100):
        deep = {"provision": [deep]}
    out.append(("nested too deep", consent(deep, cid="m")))
    return out


@pytest.mark.parametrize(("name", "raw"), _mutations(), ids=[n for n, _ in _mutations()])
def test_malformed_consent_is_ignored(name: str, raw: dict[str, Any]) -> None:
    compiled_ = compile_consent(raw)
    assert compiled_.error is not None, name
    assert not compiled_.applicable
    request = req(CLINIC)
    assert evaluate_consent(compiled_, request, doc()).decision is None
    d = decide_both([compiled_], request, doc(custodian=None))
    assert d == AccessDecision(DENY, Reason.DEFAULT_DENY, ())


@pytest.mark.parametrize("junk", [None, [], "Consent", 3, {"resourceType": "Consent"}])
def test_junk_never_raises(junk: Any) -> None:
    compiled_ = compile_consent(junk)
    assert compiled_.error is not None and not compiled_.applicable


def test_request_time_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError):
        AccessRequest(frozenset({"Practitioner/x"}), at=datetime(2015, 6, 1))


# ---------------------------------------------------------------------------------------------
# Parties and facts (consent.md §1, §3.3)
# ---------------------------------------------------------------------------------------------


def _concept(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def _guardian(**changes: Any) -> dict[str, Any]:
    person = load("RelatedPerson-benedicte")
    person["relationship"] = [{"coding": [{"system": ROLECODE, "code": "GUARD"}]}]
    person.update(changes)
    return person


@pytest.mark.parametrize(
    ("person", "patient", "expected"),
    [
        (load("RelatedPerson-benedicte"), "Patient/example", False),  # WIFE is not a representative
        (_guardian(), "Patient/example", True),
        (_guardian(), "https://x.example/fhir/Patient/example", True),
        (_guardian(), "Patient/other", False),
        (_guardian(active=False), "Patient/example", False),
        (_guardian(active=None), "Patient/example", False),
        (_guardian(relationship=[_concept(ROLECODE, "HPOWATT")]), "Patient/example", True),
        (_guardian(relationship=[_concept("http://other", "GUARD")]), "Patient/example", False),
        ({**_guardian(), "resourceType": "Patient"}, "Patient/example", False),
        ({k: v for k, v in _guardian().items() if k != "active"}, "Patient/example", True),
    ],
)
def test_is_legal_representative(person: dict[str, Any], patient: str, expected: bool) -> None:
    assert is_legal_representative(person, patient) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Organization/f001", "Organization/f001"),
        ("  Organization/f001 ", "Organization/f001"),
        ("http://hl7.org/fhir/Organization/f001", "Organization/f001"),
        ("https://x.example/base/fhir/Patient/p-1.2/_history/7", "Patient/p-1.2"),
        ("Patient/p/_history/2", "Patient/p"),
        ("#contained", None),
        ("urn:uuid:3f0c7a4c-9a2b-4f5b-9d3c-1b5c6d7e8f90", None),
        ("Patient?identifier=x", None),
        ("patient/p", None),
        ("", None),
        (None, None),
    ],
)
def test_normalize_reference(value: Any, expected: str | None) -> None:
    assert normalize_reference(value) == expected


def test_facts_from_document_reference_example() -> None:
    facts = facts_from_resource(load("DocumentReference-example"))
    assert facts.ref == "DocumentReference/example"
    assert facts.patient == "Patient/xcda" and facts.custodian == "Organization/f001"
    assert facts.authors == frozenset({"Practitioner/xcda1"})  # contained #a2 is not resolvable
    assert (LOINC, "34108-1") in facts.codes
    assert ("http://ihe.net/xds/connectathon/classCodes", "History and Physical") in facts.codes
    assert facts.content_types == frozenset({"application/hl7-v3+xml"})
    # DocumentReference.securityLabel counts (the document is V, not the default N)
    assert facts.security_labels == frozenset({(CONFIDENTIALITY_SYSTEM, "V")})
    # context.period wins over date; the end (minute precision in seconds) is inclusive
    assert facts.clinical_period == (
        at("2004-12-22T21:00:00Z"),
        at("2004-12-22T21:01:00Z") + timedelta(seconds=1) - timedelta(microseconds=1),
    )
    assert {"Encounter/xcda", "Patient/xcda", "Organization/f001"} <= facts.references


def test_facts_from_other_resource_types() -> None:
    binary = facts_from_resource(load("Binary-example"))
    assert binary.patient is None and binary.content_types == frozenset({"application/pdf"})
    assert binary.security_labels == frozenset({(CONFIDENTIALITY_SYSTEM, "N")})
    given = facts_from_resource(
        load("Binary-example"), patient="Patient/xcda", custodian="Organization/f001"
    )
    assert given.patient == "Patient/xcda" and given.custodian == "Organization/f001"

    patient = facts_from_resource(load("Patient-example"))
    assert patient.ref == patient.patient == "Patient/example"

    observation = facts_from_resource(
        {
            "resourceType": "Observation",
            "id": "o1",
            "meta": {"security": [{"system": CONFIDENTIALITY_SYSTEM, "code": "R"}]},
            "subject": {"reference": "https://x.example/fhir/Patient/f001"},
            "performer": [{"reference": "Practitioner/a"}, {"reference": "Organization/o3"}],
            "category": [{"coding": [{"system": "http://obs", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
            "effectiveDateTime": "2015-02-07",
            "valueAttachment": {"contentType": "Text/Plain; charset=utf-8"},
        },
        referenced_by=frozenset({"Provenance/p1"}),
    )
    assert observation.patient == "Patient/f001"
    assert observation.authors == frozenset({"Practitioner/a", "Organization/o3"})
    assert observation.codes == frozenset({("http://obs", "vital-signs"), (LOINC, "8867-4")})
    assert observation.security_labels == frozenset({(CONFIDENTIALITY_SYSTEM, "R")})
    assert observation.content_types == frozenset({"text/plain"})
    assert observation.clinical_period == (
        at("2015-02-07T00:00:00Z"),
        at("2015-02-08T00:00:00Z") - timedelta(microseconds=1),
    )
    assert observation.referenced_by == frozenset({"Provenance/p1"})

    procedure = facts_from_resource(
        {
            "resourceType": "Procedure",
            "id": "p",
            "subject": {"reference": "Group/g"},  # not a patient
            "performer": [{"actor": {"reference": "Practitioner/b"}}],
            "performedPeriod": {"start": "2015-03-01T10:00:00Z"},
        }
    )
    assert procedure.patient is None and procedure.authors == frozenset({"Practitioner/b"})
    assert procedure.clinical_period is not None
    assert procedure.clinical_period[0] == at("2015-03-01T10:00:00Z")

    task = facts_from_resource(load("Task-example3"))
    assert task.patient == "Patient/f001" and "MedicationRequest/medrx002" in task.references

    provenance = facts_from_resource(load("Provenance-example"))
    assert provenance.resource_type == "Provenance" and provenance.authors

    consent_facts = facts_from_resource(example("signature"))
    assert consent_facts.patient == "Patient/72" and "Patient/72" in consent_facts.authors


def test_facts_drive_the_signature_example_end_to_end() -> None:
    """A CDA DocumentReference built as JSON, through facts_from_resource, against signature."""
    document = {
        "resourceType": "DocumentReference",
        "id": "cda",
        "status": "current",
        "subject": {"reference": "Patient/72"},
        "author": [{"reference": "Practitioner/xcda-author"}],
        "type": {"coding": [{"system": LOINC, "code": "34133-9"}]},
        "content": [{"attachment": {"contentType": "application/hl7-cda+xml"}}],
    }
    facts = facts_from_resource(document)
    signature = compiled(example("signature"))
    request = req(frozenset({"Practitioner/13"}), when=at("2016-01-01T12:00:00Z"))
    d = decide_both(signature, request, facts)
    assert d == AccessDecision(
        PERMIT,
        Reason.CONSENT_EXPLICIT,
        (ConsentResult(PERMIT, True, "consent-example-signature", (0,)),),
    )


def test_consent_set_is_an_immutable_sequence_over_many_patients() -> None:
    raws = [
        consent(grant("Organization/o3"), cid="p1-grant"),
        consent(grant("Organization/o3"), cid="p2-grant", patient="Patient/p2"),
        consent(grant("Organization/o3"), cid="p1-draft", status="draft"),
        {"resourceType": "Consent", "id": "broken"},
    ]
    items = [compile_consent(r) for r in raws]
    consent_set = ConsentSet(items)
    assert len(consent_set) == 4 and list(consent_set) == items
    assert consent_set[0] is items[0] and consent_set[1:3] == tuple(items[1:3])
    d1 = decide(consent_set, req(CLINIC), doc("Patient/f001"))
    d2 = decide(consent_set, req(CLINIC), doc("Patient/p2"))
    assert [r.consent_id for r in d1.deciding] == ["p1-grant"]
    assert [r.consent_id for r in d2.deciding] == ["p2-grant"]
    assert decide(consent_set, req(CLINIC), doc("Patient/p3")).reason is Reason.DEFAULT_DENY
    assert decide(ConsentSet(), req(CLINIC), doc()).reason is Reason.DEFAULT_DENY


def test_consent_set_interval_index_edges() -> None:
    """Periods and dataPeriods of many Consents, probed at their exact edges."""
    raws = [
        consent(
            {"period": {"start": f"2015-01-{d:02d}", "end": f"2015-01-{d + 2:02d}"}},
            cid=f"c{d}",
        )
        for d in range(1, 20, 3)
    ]
    raws.append(consent({"dataPeriod": {"end": "2015-01-05"}}, cid="dp"))
    items = [compile_consent(r) for r in raws]
    for day in range(1, 25):
        for hour in (0, 23):
            when = datetime(2015, 1, day, hour, 59, 59, 999999, tzinfo=UTC)
            for clinical in (None, (when, None), (when - timedelta(days=2), when)):
                resource = doc(clinical=clinical)
                decide_both(items, req(CLINIC, when=when), resource)
                for c in items:
                    evaluate_consent(c, req(CLINIC, when=when), resource)
