"""The kit's pure parts: the FHIRPath subset, sample building, and the §5 rows moved in time
and onto the run's parties. No server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from conformance.consent import ROWS, Row, _remap, consent_for, load_example
from conformance.samples import (
    KIT_SYSTEM,
    SampleFactory,
    Unsupported,
    bundled_parameters,
    expression_for,
    parse_expression,
)

TYPES = frozenset({"Patient", "Organization", "Practitioner", "Encounter", "Task"})


def factory() -> SampleFactory:
    counter = iter(range(10_000))
    return SampleFactory("t1", TYPES, lambda rtype, _purpose: f"{rtype}/x{next(counter)}")


def test_fhirpath_subset() -> None:
    (steps,) = parse_expression("(Patient.deceased as dateTime)", "Patient")
    assert [(s.name, s.cast) for s in steps] == [("deceased", "dateTime")]
    (steps,) = parse_expression("Patient.telecom.where(system='email')", "Patient")
    assert steps[-1].fixed == (("system", "email"),)
    (steps,) = parse_expression("Task.for.where(resolve() is Patient)", "Task")
    assert steps[-1].target == "Patient"
    alternatives = parse_expression(
        "AuditEvent.agent.who.where(resolve() is Patient) | AuditEvent.entity.what", "AuditEvent"
    )
    assert [[s.name for s in a] for a in alternatives] == [["agent", "who"], ["entity", "what"]]
    with pytest.raises(Unsupported):
        parse_expression("Patient.name.exists() and Patient.active", "Patient")
    with pytest.raises(Unsupported):
        parse_expression("Observation.code", "Patient")  # no path for this type


def test_expression_from_documentation_else_bundled() -> None:
    assert expression_for("Patient", "family", "Patient.name.family") == "Patient.name.family"
    prose = "A portion of the family name of the patient"  # what HAPI writes
    assert expression_for("Patient", "family", prose) == "Patient.name.family"
    assert expression_for("Patient", "_tag", "") == "Resource.meta.tag"
    assert expression_for("Basic", "code", prose) is None


def test_plans_match_a_and_not_b() -> None:
    f = factory()
    plan = f.plan("Patient", "gender", "token", "Patient.gender")
    assert (plan.value_a, plan.value_b, plan.query) == ("male", "female", "male")
    plan = f.plan("Patient", "death-date", "date", "(Patient.deceased as dateTime)")
    assert plan.hops[-1].element.name == "deceasedDateTime"
    assert plan.value_a.startswith(plan.query) and not plan.value_b.startswith(plan.query)
    plan = f.plan("Task", "patient", "reference", "Task.for.where(resolve() is Patient)")
    assert plan.value_a["reference"].startswith("Patient/") and plan.query == plan.value_a[
        "reference"
    ]
    with pytest.raises(Unsupported):
        f.plan("Patient", "x", "quantity", "Patient.x")


def test_samples_are_valid_r4_and_collisions_are_refused() -> None:
    from fhir.resources.R4B import get_fhir_model_class

    f = factory()
    a = f.base("Encounter")
    assert {"status", "class"} <= set(a) and a["meta"]["tag"][0]["system"] == KIT_SYSTEM
    owned: set[str] = set()
    subject = f.plan("Encounter", "subject", "reference", "Encounter.subject")
    patient = f.plan("Encounter", "patient", "reference", "Encounter.subject")
    assert f.place(a, subject, subject.value_a, owned)
    assert not f.place(a, patient, patient.value_a, owned)  # one subject: a pair of its own
    get_fhir_model_class("Encounter").model_validate(a)


def test_every_bundled_parameter_can_be_planned() -> None:
    """The kit exercises every parameter of the bundled R4 table (what a server like HAPI,
    whose documentation is prose, gets), except _id and _lastUpdated, searched specially."""
    f = factory()
    count = 0
    for rtype, params in bundled_parameters().items():
        for name, param in params.items():
            if name in ("_id", "_lastUpdated"):
                continue
            for owner in [rtype] if rtype != "Resource" else sorted(TYPES):
                plan = f.plan(owner, name, param["type"], expression_for(owner, name, ""))
                assert plan.query, (owner, name)
                count += 1
    assert count > 200


def test_consent_rows_move_in_time_and_onto_the_parties() -> None:
    parties = {
        "patient": "Patient/p",
        "f001": "Organization/f",
        "other": "Organization/o",
        "f204": "Practitioner/a",
        "p13": "Practitioner/b",
        "author": "Practitioner/c",
        "task": "Task/t",
    }
    now = datetime(2030, 5, 5, 12, 0, tzinfo=UTC)
    row = next(r for r in ROWS if r.example == "smartonfhir" and not r.permit)
    consent = consent_for(row, parties, "Organization/clinic", now)
    period = consent["provision"]["period"]
    start = datetime.fromisoformat(period["start"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(period["end"].replace("Z", "+00:00"))
    assert start < now < end  # 07:10Z was inside 07:02:33Z-07:32:33Z
    assert (now - start).total_seconds() == 7 * 60 + 27
    assert consent["patient"] == {"reference": "Patient/p"} and consent["status"] == "active"
    them = next(r for r in ROWS if r.example == "notThem" and not r.permit)
    actors = consent_for(them, parties, "Organization/clinic", now)["provision"]["actor"]
    assert [a["reference"]["reference"] for a in actors] == ["Organization/clinic"]
    # a date-only period end is the end of that day
    timed = consent_for(Row("notTime", "x", False, at="2015-02-01T23:00:00Z"), parties, "C", now)
    assert timed["provision"]["period"]["end"] == "2030-05-05T12:59:59Z"  # 23:59:59 + shift
    with pytest.raises(ValueError, match="no stand-in"):
        _remap({"actor": [{"reference": "Device/1"}]}, {"Patient/p": "Patient/q"})


def test_the_rows_are_section_5() -> None:
    assert len(ROWS) == 23
    assert {r.example for r in ROWS} == {
        "basic", "Out", "Emergency", "notThis", "notTime", "notOrg",
        "notAuthor", "notThem", "grantor", "signature", "smartonfhir",
    }  # fmt: skip
    for example in {r.example for r in ROWS}:
        assert load_example(f"Consent-consent-example-{example}")["resourceType"] == "Consent"
