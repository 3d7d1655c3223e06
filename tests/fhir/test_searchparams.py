"""Tests for fhir_consent.fhir.searchparams (definitions, extraction, query parsing)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fhir_consent.fhir.searchparams import (
    COMMON_PARAMS,
    DATE_MAX,
    DATE_MIN,
    PREFIXES,
    R4_RESOURCE_TYPES,
    SEARCH_PARAMS,
    DateQuery,
    DateRow,
    IndexRows,
    ParamType,
    ReferenceQuery,
    ReferenceRow,
    SearchParam,
    SearchValueError,
    StringRow,
    TokenQuery,
    TokenRow,
    date_range,
    extract,
    normalize_string,
    params_for,
    parse_date,
    parse_reference,
    parse_token,
    split_or,
    unescape,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "fixtures" / "hl7-r4-examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.json"))
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US = 1_000_000


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
    return data


def us(dt: datetime) -> int:
    """Microseconds since the epoch, computed with datetime (independent of the module)."""
    delta = dt - EPOCH
    return (delta.days * 86_400 + delta.seconds) * US + delta.microseconds


def utc(y: int, m: int, d: int, hh: int = 0, mi: int = 0, ss: int = 0, usec: int = 0) -> int:
    return us(datetime(y, m, d, hh, mi, ss, usec, tzinfo=UTC))


def refs(rows: IndexRows, param: str) -> set[tuple[str | None, str | None, str]]:
    return {(r.target_type, r.target_id, r.url) for r in rows.references if r.param == param}


def tokens(rows: IndexRows, param: str) -> set[tuple[str | None, str | None]]:
    return {(t.system, t.code) for t in rows.tokens if t.param == param}


def strings(rows: IndexRows, param: str) -> set[str]:
    return {s.value for s in rows.strings if s.param == param}


def dates(rows: IndexRows, param: str) -> set[tuple[int, int]]:
    return {(d.low, d.high) for d in rows.dates if d.param == param}


# ---------------------------------------------------------------------------------------------
# Definitions
# ---------------------------------------------------------------------------------------------

REQUIRED: dict[str, set[str]] = {
    "DocumentReference": set(
        "patient subject status type category date period author custodian identifier "
        "contenttype relatesto security-label facility authenticator description encounter "
        "event format language location related relation setting".split()
    ),
    "Consent": set(
        "action actor category consentor data date identifier organization patient period "
        "purpose scope security-label source-reference status".split()
    ),
    "Patient": set(
        "identifier name family given birthdate gender active address address-city "
        "address-postalcode telecom phone email general-practitioner organization link "
        "death-date language".split()
    ),
    "Practitioner": set("identifier name family given active telecom gender address".split()),
    "Organization": set("identifier name active type partof address".split()),
    "PractitionerRole": set(
        "identifier practitioner organization role specialty active date".split()
    ),
    "RelatedPerson": set("patient identifier name relationship active gender birthdate".split()),
    "AuditEvent": set(
        "patient agent entity date action outcome type subtype source site policy entity-type "
        "entity-role agent-role altid address".split()
    ),
    "Provenance": set(
        "target patient agent agent-role agent-type entity location recorded signature-type "
        "when".split()
    ),
    "Binary": set(),
    "Encounter": set("patient subject status identifier date class type".split()),
    "Task": set("patient subject status identifier owner focus".split()),
}


@pytest.mark.parametrize("rtype", sorted(REQUIRED))
def test_required_params_defined(rtype: str) -> None:
    assert REQUIRED[rtype] <= set(SEARCH_PARAMS[rtype])


def test_definitions_are_consistent() -> None:
    for rtype, params in SEARCH_PARAMS.items():
        assert rtype in R4_RESOURCE_TYPES
        for name, sp in params.items():
            assert sp.name == name
            assert sp.resource_type == rtype
            assert sp.expression.startswith((rtype, f"({rtype}"))
            assert sp.paths, name
            assert not sp.column
            assert set(sp.targets) <= R4_RESOURCE_TYPES
            if sp.type is not ParamType.REFERENCE:
                assert sp.targets == () and sp.ref_type is None
            if sp.ref_type is not None:
                assert sp.targets == (sp.ref_type,)
                assert f"resolve() is {sp.ref_type}" in sp.expression


def test_specific_definitions() -> None:
    dr = SEARCH_PARAMS["DocumentReference"]
    assert dr["patient"].expression == "DocumentReference.subject.where(resolve() is Patient)"
    assert dr["patient"].targets == ("Patient",)
    assert dr["identifier"].type is ParamType.TOKEN
    assert dr["location"].type is ParamType.URI
    assert dr["date"].type is ParamType.DATE
    assert dr["description"].type is ParamType.STRING
    assert SEARCH_PARAMS["Consent"]["actor"].expression == "Consent.provision.actor.reference"
    assert SEARCH_PARAMS["AuditEvent"]["date"].expression == "AuditEvent.recorded"
    assert SEARCH_PARAMS["Binary"] == {}


def test_common_params() -> None:
    assert set(COMMON_PARAMS) == {"_id", "_lastUpdated", "_profile", "_security", "_tag"}
    assert COMMON_PARAMS["_id"].column and COMMON_PARAMS["_lastUpdated"].column
    assert not any(COMMON_PARAMS[n].column for n in ("_profile", "_security", "_tag"))
    assert COMMON_PARAMS["_profile"].type is ParamType.URI
    assert COMMON_PARAMS["_lastUpdated"].type is ParamType.DATE
    assert all(p.resource_type == "Resource" for p in COMMON_PARAMS.values())


def test_params_for() -> None:
    patient = params_for("Patient")
    assert "family" in patient and "_security" in patient and "_id" in patient
    assert patient["family"] is SEARCH_PARAMS["Patient"]["family"]
    assert set(params_for("Binary")) == set(COMMON_PARAMS)
    assert set(params_for("NoSuchType")) == set(COMMON_PARAMS)
    assert "family" not in params_for("Consent")


def test_definitions_are_immutable() -> None:
    with pytest.raises(TypeError):
        SEARCH_PARAMS["Patient"]["x"] = SEARCH_PARAMS["Patient"]["name"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        SEARCH_PARAMS["Patient"]["name"].name = "x"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Extraction: every example
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_every_example_extracts(path: Path) -> None:
    resource = json.loads(path.read_text(encoding="utf-8"))
    rows = extract(resource)
    known = params_for(resource["resourceType"])
    groups: list[list[Any]] = [rows.tokens, rows.strings, rows.references, rows.dates]
    for group in groups:
        assert len(group) == len(set(group)), "rows must be de-duplicated"
        for row in group:
            assert row.param in known
            assert not known[row.param].column
    assert all(isinstance(t, TokenRow) and (t.system or t.code or t.text) for t in rows.tokens)
    assert all(
        isinstance(s, StringRow) and s.value == normalize_string(s.exact) for s in rows.strings
    )
    assert all(isinstance(r, ReferenceRow) and not r.url.startswith("#") for r in rows.references)
    assert all(isinstance(d, DateRow) and d.low <= d.high for d in rows.dates)
    for r in rows.references:
        sp = known[r.param]
        if sp.ref_type is not None:
            assert r.target_type == sp.ref_type
    if resource["resourceType"] != "Binary":
        assert rows.tokens or rows.strings or rows.references or rows.dates


def test_extract_is_deterministic_and_does_not_mutate() -> None:
    resource = load("Patient-example.json")
    before = json.dumps(resource, sort_keys=True)
    assert extract(resource) == extract(resource)
    assert json.dumps(resource, sort_keys=True) == before


# ---------------------------------------------------------------------------------------------
# Extraction: concrete rows
# ---------------------------------------------------------------------------------------------


def test_patient_example() -> None:
    rows = extract(load("Patient-example.json"))
    assert strings(rows, "family") == {"chalmers", "windsor"}
    assert StringRow("family", "chalmers", "Chalmers") in rows.strings
    assert strings(rows, "given") == {"peter", "james", "jim"}
    assert {"chalmers", "windsor", "peter", "james", "jim"} == strings(rows, "name")
    assert tokens(rows, "identifier") == {("urn:oid:1.2.36.146.595.217.0.1", "12345")}
    assert tokens(rows, "gender") == {(None, "male")}
    assert tokens(rows, "active") == {(None, "true")}
    assert dates(rows, "birthdate") == {(utc(1974, 12, 25), utc(1974, 12, 26) - 1)}
    assert refs(rows, "organization") == {("Organization", "1", "Organization/1")}
    assert tokens(rows, "phone") == {
        (None, "(03) 5555 6473"),
        (None, "(03) 3410 5613"),
        (None, "(03) 5555 8834"),
    }
    assert tokens(rows, "email") == set()
    # The contact's phone/name/address are not Patient.telecom/name/address.
    assert (None, "+33 (237) 998327") not in tokens(rows, "telecom")
    assert "benedicte" not in strings(rows, "name")
    assert strings(rows, "address-city") == {"pleasantville"}
    assert strings(rows, "address-postalcode") == {"3999"}
    assert {"534 erewhon st", "pleasantville", "vic", "3999", "rainbow"} <= strings(rows, "address")
    assert (
        StringRow(
            "address",
            "534 erewhon st peasantville, rainbow, vic 3999",
            "534 Erewhon St PeasantVille, Rainbow, Vic  3999",
        )
        in rows.strings
    )
    # deceasedBoolean=false is not a death date; the name's period is not indexed.
    assert dates(rows, "death-date") == set()
    assert {d.param for d in rows.dates} == {"birthdate"}


def test_document_reference_example() -> None:
    rows = extract(load("DocumentReference-example.json"))
    assert refs(rows, "patient") == {("Patient", "xcda", "Patient/xcda")}
    assert refs(rows, "subject") == {("Patient", "xcda", "Patient/xcda")}
    assert refs(rows, "custodian") == {("Organization", "f001", "Organization/f001")}
    assert refs(rows, "authenticator") == {("Organization", "f001", "Organization/f001")}
    # "#a2" is a contained reference: not indexed.
    assert refs(rows, "author") == {("Practitioner", "xcda1", "Practitioner/xcda1")}
    assert refs(rows, "encounter") == {("Encounter", "xcda", "Encounter/xcda")}
    assert refs(rows, "relatesto") == {
        ("DocumentReference", "example", "DocumentReference/example")
    }
    assert refs(rows, "related") == {("Patient", "xcda", "Patient/xcda")}
    assert TokenRow("type", "http://loinc.org", "34108-1", "outpatient note") in rows.tokens
    assert tokens(rows, "identifier") == {
        ("urn:ietf:rfc:3986", "urn:oid:1.3.6.1.4.1.21367.2005.3.7"),
        ("urn:ietf:rfc:3986", "urn:oid:1.3.6.1.4.1.21367.2005.3.7.1234"),
    }
    assert tokens(rows, "status") == {(None, "current")}
    assert tokens(rows, "contenttype") == {(None, "application/hl7-v3+xml")}
    assert tokens(rows, "language") == {(None, "en-US")}
    assert tokens(rows, "relation") == {(None, "appends")}
    assert tokens(rows, "format") == {("urn:oid:1.3.6.1.4.1.19376.1.2.3", "urn:ihe:pcc:handp:2008")}
    assert tokens(rows, "security-label") == {
        ("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "V")
    }
    assert tokens(rows, "category") == {
        ("http://ihe.net/xds/connectathon/classCodes", "History and Physical")
    }
    assert tokens(rows, "facility") == {
        ("http://www.ihe.net/xds/connectathon/healthcareFacilityTypeCodes", "Outpatient")
    }
    assert tokens(rows, "setting") == {
        ("http://www.ihe.net/xds/connectathon/practiceSettingCodes", "General Medicine")
    }
    assert tokens(rows, "event") == {("http://ihe.net/xds/connectathon/eventCodes", "T-D8200")}
    assert tokens(rows, "location") == {
        (None, "http://example.org/xds/mhd/Binary/07a6483f-732b-461e-86b6-edb665c45510")
    }
    assert strings(rows, "description") == {"physical"}
    # 2005-12-24T09:43:41+11:00 == 2005-12-23T22:43:41Z, second precision.
    low = utc(2005, 12, 23, 22, 43, 41)
    assert dates(rows, "date") == {(low, low + US - 1)}
    # context.period 2004-12-23T08:00:00+11:00 .. 08:01:00+11:00
    start = utc(2004, 12, 22, 21, 0, 0)
    assert dates(rows, "period") == {(start, start + 61 * US - 1)}


def test_consent_nested_provisions() -> None:
    pkb = extract(load("Consent-consent-example-pkb.json"))
    labels = {code for _, code in tokens(pkb, "security-label")}
    assert {"N", "PSY", "SPI", "SEX"} <= labels  # PSY/SPI/SEX occur only in nested provisions
    assert tokens(pkb, "action") == {
        ("http://terminology.hl7.org/CodeSystem/consentaction", "access")
    }
    assert refs(pkb, "actor") == {("Organization", "f001", "Organization/f001")}
    assert refs(pkb, "patient") == {("Patient", "example", "Patient/example")}

    sig = extract(load("Consent-consent-example-signature.json"))
    assert refs(sig, "actor") == {
        ("Practitioner", "13", "Practitioner/13"),
        ("Practitioner", "xcda-author", "Practitioner/xcda-author"),  # nested provision
    }
    assert refs(sig, "consentor") == {("Patient", "72", "Patient/72")}
    assert tokens(sig, "identifier") == {
        ("urn:oid:2.16.840.1.113883.3.72.5.9.1", "494e0c7a-a69e-4fb4-9d02-6aae747790d7")
    }
    assert dates(sig, "period") == {(utc(2015, 10, 10), utc(2016, 10, 11) - 1)}
    sig_date = utc(2016, 5, 26, 4, 41, 10)  # 2016-05-26T00:41:10-04:00
    assert dates(sig, "date") == {(sig_date, sig_date + US - 1)}

    emergency = extract(load("Consent-consent-example-Emergency.json"))
    assert tokens(emergency, "purpose") == {
        ("http://terminology.hl7.org/CodeSystem/v3-ActReason", "ETREAT")
    }
    assert tokens(emergency, "category") == {
        ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "EMRGONLY")
    }
    assert tokens(emergency, "scope") == {
        ("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy")
    }

    smart = extract(load("Consent-consent-example-smartonfhir.json"))
    assert tokens(smart, "action") == {
        ("http://terminology.hl7.org/CodeSystem/consentaction", "access")
    }
    assert refs(smart, "consentor") == {("RelatedPerson", "peter", "RelatedPerson/peter")}
    start = utc(2016, 6, 23, 7, 2, 33)
    assert dates(smart, "period") == {(start, start + 30 * 60 * US + US - 1)}

    not_this = extract(load("Consent-consent-example-notThis.json"))
    assert refs(not_this, "data") == {("Task", "example3", "Task/example3")}
    assert refs(not_this, "organization") == {("Organization", "f001", "Organization/f001")}


def test_consent_deeply_nested_provision() -> None:
    consent = {
        "resourceType": "Consent",
        "provision": {
            "provision": [
                {"provision": [{"data": [{"reference": {"reference": "Observation/deep"}}]}]}
            ]
        },
    }
    assert refs(extract(consent), "data") == {("Observation", "deep", "Observation/deep")}


def test_audit_event_examples() -> None:
    rows = extract(load("AuditEvent-example-disclosure.json"))
    # patient = agent.who | entity.what where Patient; history is stripped from type/id.
    assert refs(rows, "patient") == {
        ("Patient", "example", "Patient/example"),
        ("Patient", "example", "Patient/example/_history/1"),
    }
    assert refs(rows, "agent") == {("Practitioner", "example", "Practitioner/example")}
    assert tokens(rows, "policy") == {(None, "http://consent.com/yes")}
    assert tokens(rows, "altid") == {(None, "notMe")}
    assert tokens(rows, "action") == {(None, "R")}
    assert tokens(rows, "site") == {(None, "Watcher")}
    assert strings(rows, "address") == {"custodian.net", "marketing.land"}
    assert dates(rows, "date") == {(utc(2013, 9, 22, 0, 8), utc(2013, 9, 22, 0, 8) + US - 1)}

    basic = extract(load("AuditEvent-example.json"))
    assert basic.references == []  # who/what carry only identifiers; observer only display
    assert (
        TokenRow(
            "type", "http://dicom.nema.org/resources/ontology/DCM", "110100", "application activity"
        )
        in basic.tokens
    )
    assert tokens(basic, "subtype") == {("http://dicom.nema.org/resources/ontology/DCM", "110120")}
    assert tokens(basic, "outcome") == {(None, "0")}
    assert TokenRow("agent-role", None, None, "service user (logon)") in basic.tokens
    assert tokens(basic, "entity-type") == {
        ("http://terminology.hl7.org/CodeSystem/audit-entity-type", "4")
    }
    assert tokens(basic, "entity-role") == {
        ("http://terminology.hl7.org/CodeSystem/object-role", "4")
    }


def test_provenance_example() -> None:
    rows = extract(load("Provenance-example.json"))
    assert refs(rows, "target") == {("Procedure", "example", "Procedure/example/_history/1")}
    assert refs(rows, "patient") == set()
    assert refs(rows, "agent") == {
        ("Practitioner", "xcda-author", "Practitioner/xcda-author"),
        ("Device", "software", "Device/software"),
    }
    assert refs(rows, "entity") == {("DocumentReference", "example", "DocumentReference/example")}
    assert refs(rows, "location") == {("Location", "1", "Location/1")}
    recorded = utc(2015, 6, 26, 22, 39, 24)
    assert dates(rows, "recorded") == {(recorded, recorded + US - 1)}
    assert dates(rows, "when") == set()  # occurredPeriod is not "occurred as dateTime"
    assert tokens(rows, "agent-type") == {
        ("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "AUT"),
        ("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "DEV"),
    }


def test_task_encounter_practitioner_role_related_person() -> None:
    task = extract(load("Task-example3.json"))
    assert refs(task, "patient") == {("Patient", "f001", "Patient/f001")}
    assert refs(task, "subject") == {("Patient", "f001", "Patient/f001")}
    assert refs(task, "owner") == {("Practitioner", "example", "Practitioner/example")}
    assert refs(task, "focus") == {("MedicationRequest", "medrx002", "MedicationRequest/medrx002")}
    assert tokens(task, "status") == {(None, "draft")}
    assert TokenRow("code", None, None, "refill request") in task.tokens

    enc = extract(load("Encounter-xcda.json"))
    assert refs(enc, "patient") == {("Patient", "xcda", "Patient/xcda")}
    assert refs(enc, "practitioner") == {("Practitioner", "xcda1", "Practitioner/xcda1")}
    assert tokens(enc, "class") == {("http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB")}
    assert tokens(enc, "status") == {(None, "finished")}

    role = extract(load("PractitionerRole-example.json"))
    assert refs(role, "practitioner") == {("Practitioner", "example", "Practitioner/example")}
    assert dates(role, "date") == {(utc(2012, 1, 1), utc(2012, 4, 1) - 1)}
    assert tokens(role, "email") == {(None, "adam.southern@example.org")}
    assert tokens(role, "role") == {("http://terminology.hl7.org/CodeSystem/v2-0286", "RP")}

    person = extract(load("RelatedPerson-peter.json"))
    assert refs(person, "patient") == {("Patient", "animal", "Patient/animal")}
    assert tokens(person, "relationship") == {
        ("http://terminology.hl7.org/CodeSystem/v2-0131", "C")
    }
    assert strings(person, "name") == {"chalmers", "peter", "james"}


def test_organization_name_includes_alias() -> None:
    org = {"resourceType": "Organization", "name": "Good Health", "alias": ["GHC", "Bon Santé"]}
    assert strings(extract(org), "name") == {"good health", "ghc", "bon sante"}


def test_common_params_from_meta_and_unknown_type() -> None:
    resource = {
        "resourceType": "Basic",  # not in SEARCH_PARAMS: only common params
        "id": "x",
        "code": {"text": "ignored"},
        "meta": {
            "lastUpdated": "2020-01-01T00:00:00Z",
            "profile": ["http://example.org/StructureDefinition/p"],
            "security": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                    "code": "R",
                    "display": "Restricted",
                }
            ],
            "tag": [{"system": "http://example.org/tags", "code": "t1"}],
        },
    }
    rows = extract(resource)
    assert rows.tokens == [
        TokenRow("_profile", None, "http://example.org/StructureDefinition/p", None),
        TokenRow(
            "_security",
            "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
            "R",
            "restricted",
        ),
        TokenRow("_tag", "http://example.org/tags", "t1", None),
    ]
    assert rows.strings == [] and rows.references == []
    assert rows.dates == []  # no _id/_lastUpdated rows


def test_binary_has_only_common_params() -> None:
    rows = extract(load("Binary-example.json"))
    assert rows == IndexRows([], [], [], [])
    tagged = {**load("Binary-example.json"), "meta": {"tag": [{"code": "x"}]}}
    assert extract(tagged).tokens == [TokenRow("_tag", None, "x", None)]


def test_reference_forms() -> None:
    doc = {
        "resourceType": "DocumentReference",
        "subject": {"reference": "http://other.example/fhir/Patient/p1/_history/3"},
        "author": [
            {"reference": "urn:uuid:2f1f6a52-9e0e-4a47-8b1c-5d1c3a4f1f00"},
            {"reference": "Foo/1"},
            {"reference": "Patient/p1/extra"},
            {"reference": "#contained"},
            {"identifier": {"value": "only-identifier"}},
            {"display": "only display"},
            {"reference": "Practitioner/pr1"},
            {"reference": "Practitioner/pr1"},
        ],
        "context": {"related": [{"reference": "Group/g1"}]},
    }
    rows = extract(doc)
    assert refs(rows, "subject") == {
        ("Patient", "p1", "http://other.example/fhir/Patient/p1/_history/3")
    }
    assert refs(rows, "patient") == refs(rows, "subject")
    assert refs(rows, "author") == {
        (None, None, "urn:uuid:2f1f6a52-9e0e-4a47-8b1c-5d1c3a4f1f00"),
        (None, None, "Foo/1"),
        (None, None, "Patient/p1/extra"),
        ("Practitioner", "pr1", "Practitioner/pr1"),
    }
    assert [r.url for r in rows.references if r.param == "author"].count("Practitioner/pr1") == 1
    assert refs(rows, "related") == {("Group", "g1", "Group/g1")}

    group_subject = {"resourceType": "DocumentReference", "subject": {"reference": "Group/g1"}}
    rows = extract(group_subject)
    assert refs(rows, "subject") == {("Group", "g1", "Group/g1")}
    assert refs(rows, "patient") == set()  # where(resolve() is Patient)


def test_codeable_concept_text_and_display() -> None:
    doc = {
        "resourceType": "DocumentReference",
        "type": {
            "coding": [
                {"system": "http://loinc.org", "code": "11488-4", "display": "Consult note"}
            ],
            "text": "Consult  NOTE",
        },
        "category": [{"text": "Clinical Note"}],
        "securityLabel": [{"coding": [{"code": "R"}], "text": "Restricted"}],
    }
    rows = extract(doc)
    assert [t for t in rows.tokens if t.param == "type"] == [
        TokenRow("type", "http://loinc.org", "11488-4", "consult note")
    ]  # CC.text equal (after normalisation) to the display adds no extra row
    assert [t for t in rows.tokens if t.param == "category"] == [
        TokenRow("category", None, None, "clinical note")
    ]
    assert [t for t in rows.tokens if t.param == "security-label"] == [
        TokenRow("security-label", None, "R", None),
        TokenRow("security-label", None, None, "restricted"),
    ]


def test_identifier_type_text_and_booleans() -> None:
    patient = {
        "resourceType": "Patient",
        "active": False,
        "identifier": [
            {"system": "urn:s", "value": "1", "type": {"text": "Medical Record"}},
            {"type": {"text": "no value"}},
        ],
        "deceasedDateTime": "2020-02",
        "telecom": [{"system": "email", "value": "a@b.example"}, {"system": "phone"}],
        "link": [{"other": {"reference": "RelatedPerson/rp"}, "type": "seealso"}],
    }
    rows = extract(patient)
    assert tokens(rows, "active") == {(None, "false")}
    assert [t for t in rows.tokens if t.param == "identifier"] == [
        TokenRow("identifier", "urn:s", "1", "medical record")
    ]
    assert dates(rows, "death-date") == {(utc(2020, 2, 1), utc(2020, 3, 1) - 1)}
    assert tokens(rows, "email") == {(None, "a@b.example")}
    assert tokens(rows, "phone") == set()
    assert refs(rows, "link") == {("RelatedPerson", "rp", "RelatedPerson/rp")}


def test_period_open_ends_and_bad_values_are_skipped() -> None:
    def period_rows(period: Any) -> set[tuple[int, int]]:
        return dates(extract({"resourceType": "Encounter", "period": period}), "date")

    assert period_rows({"start": "2020"}) == {(utc(2020, 1, 1), DATE_MAX)}
    assert period_rows({"end": "2020-06"}) == {(DATE_MIN, utc(2020, 7, 1) - 1)}
    assert period_rows({}) == set()
    assert period_rows({"start": "garbage"}) == set()
    # start after end: the row still satisfies low <= high
    assert period_rows({"start": "2021", "end": "2020"}) == {(utc(2020, 1, 1), utc(2022, 1, 1) - 1)}
    bad_date = extract({"resourceType": "Patient", "birthDate": "1974-13-01", "gender": "male"})
    assert bad_date.dates == [] and tokens(bad_date, "gender") == {(None, "male")}


def test_malformed_shapes_do_not_raise() -> None:
    weird = {
        "resourceType": "Consent",
        "provision": [None, 3, "x", {"actor": "nope", "provision": {"action": [None]}}],
        "patient": "Patient/1",
        "category": [{"coding": "nope"}, None],
        "identifier": [{"value": 5}],
        "dateTime": 20200101,
    }
    assert extract(weird) == IndexRows([], [], [], [])
    assert extract({"resourceType": 7}) == IndexRows([], [], [], [])
    assert extract({}) == IndexRows([], [], [], [])


# ---------------------------------------------------------------------------------------------
# normalize_string
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Müller", "muller"),
        ("MÜLLER", "muller"),
        ("Ǆ", "dz"),
        ("ǅemal", "dzemal"),
        ("Bénédicte", "benedicte"),
        ("du Marché", "du marche"),
        ("Straße", "strasse"),
        ("  Peter\t\nJames  ", "peter james"),
        ("ﬁle", "file"),  # NFKD compatibility ligature
        ("Ｆｕｌｌ", "full"),  # full-width letters
        ("Ångström", "angstrom"),
        ("İstanbul", "istanbul"),
        ("CHALMERS", "chalmers"),
        ("", ""),
    ],
)
def test_normalize_string(raw: str, expected: str) -> None:
    assert normalize_string(raw) == expected


def test_normalize_string_is_idempotent_on_samples() -> None:
    for s in ["Müller", "Ǆ", "ΐ", "Straße", "İ", "ﬃ"]:
        once = normalize_string(s)
        assert normalize_string(once) == once


# ---------------------------------------------------------------------------------------------
# date_range
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("2013", utc(2013, 1, 1), utc(2014, 1, 1) - 1),
        ("2013-05", utc(2013, 5, 1), utc(2013, 6, 1) - 1),
        ("2013-12", utc(2013, 12, 1), utc(2014, 1, 1) - 1),
        ("2013-05-02", utc(2013, 5, 2), utc(2013, 5, 3) - 1),
        ("2012-02", utc(2012, 2, 1), utc(2012, 3, 1) - 1),  # leap year February
        ("2012-02-29", utc(2012, 2, 29), utc(2012, 3, 1) - 1),
        ("2000-02-29", utc(2000, 2, 29), utc(2000, 3, 1) - 1),
        ("2013-05-02T10:00", utc(2013, 5, 2, 10), utc(2013, 5, 2, 10, 1) - 1),
        ("2013-05-02T10:00Z", utc(2013, 5, 2, 10), utc(2013, 5, 2, 10, 1) - 1),
        ("2013-05-02T10:00:30", utc(2013, 5, 2, 10, 0, 30), utc(2013, 5, 2, 10, 0, 31) - 1),
        ("2013-05-02T10:00:30Z", utc(2013, 5, 2, 10, 0, 30), utc(2013, 5, 2, 10, 0, 31) - 1),
        (
            "2013-05-02T10:00:30.5Z",
            utc(2013, 5, 2, 10, 0, 30, 500_000),
            utc(2013, 5, 2, 10, 0, 30, 599_999),
        ),
        (
            "2013-05-02T10:00:30.123Z",
            utc(2013, 5, 2, 10, 0, 30, 123_000),
            utc(2013, 5, 2, 10, 0, 30, 123_999),
        ),
        (
            "2013-05-02T10:00:30.123456Z",
            utc(2013, 5, 2, 10, 0, 30, 123_456),
            utc(2013, 5, 2, 10, 0, 30, 123_456),
        ),
        (
            "2013-05-02T10:00:30.1234567Z",
            utc(2013, 5, 2, 10, 0, 30, 123_456),
            utc(2013, 5, 2, 10, 0, 30, 123_456),
        ),
        # Time zones are converted to UTC.
        ("2013-05-02T10:00:00+10:00", utc(2013, 5, 2, 0), utc(2013, 5, 2, 0, 0, 1) - 1),
        ("2013-05-02T02:00:00-05:30", utc(2013, 5, 2, 7, 30), utc(2013, 5, 2, 7, 30, 1) - 1),
        ("2013-01-01T05:00:00+14:00", utc(2012, 12, 31, 15), utc(2012, 12, 31, 15, 0, 1) - 1),
        ("2013-05-02T10:00-00:00", utc(2013, 5, 2, 10), utc(2013, 5, 2, 10, 1) - 1),
        ("1969-12-31T23:59:59Z", -US, -1),  # before the epoch: negative
        ("0001", utc(1, 1, 1), utc(2, 1, 1) - 1),
        ("9999-12-31", utc(9999, 12, 31), utc(9999, 12, 31, 23, 59, 59, 999_999)),
        ("9999", utc(9999, 1, 1), utc(9999, 12, 31, 23, 59, 59, 999_999)),
        # leap second rolls into the next minute
        ("2016-12-31T23:59:60Z", utc(2017, 1, 1), utc(2017, 1, 1) + US - 1),
    ],
)
def test_date_range(value: str, low: int, high: int) -> None:
    assert date_range(value) == (low, high)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "13",
        "201",
        "20130",
        "0000",
        "2013-00",
        "2013-13",
        "2013-5",
        "2013-05-00",
        "2013-02-29",  # not a leap year
        "1900-02-29",  # century, not a leap year
        "2013-04-31",
        "2013-05-32",
        "2013-05-02T",
        "2013-05-02T10",
        "2013-05-02T24:00",
        "2013-05-02T10:60",
        "2013-05-02T10:00:61",
        "2013-05-02T10:00:00.",
        "2013-05-02T10:00:00+15:00",
        "2013-05-02T10:00:00+14:30",
        "2013-05-02T10:00:00+10:60",
        "2013-05-02T10:00:00+1000",
        "2013-05-02T10:00:00 10:00",
        "2013-05-02 10:00:00",
        "2013-05-02t10:00:00z",
        "2013-05Z",
        "2013-05-02Z",
        "2013-05-02+10:00",
        " 2013",
        "2013 ",
        "٢٠١٣",  # non-ASCII digits
        "ge2013",
        "x" * 500,
    ],
)
def test_date_range_invalid(value: str) -> None:
    with pytest.raises(SearchValueError) as exc:
        date_range(value)
    assert len(str(exc.value)) < 200  # never echoes long input


# ---------------------------------------------------------------------------------------------
# parse_date
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
def test_parse_date_every_prefix(prefix: str) -> None:
    assert parse_date(f"{prefix}2013-01") == DateQuery(prefix, utc(2013, 1, 1), utc(2013, 2, 1) - 1)


def test_parse_date_default_prefix_and_errors() -> None:
    assert parse_date("2013-01-14") == DateQuery("eq", utc(2013, 1, 14), utc(2013, 1, 15) - 1)
    assert parse_date("2013-01-14T10:00:00 10:00") == parse_date("2013-01-14T10:00:00+10:00")
    assert parse_date("ge2013-01-14T10:00:00 10:00").prefix == "ge"
    for bad in ["", "ge", "xx2013", "GE2013", "ge 2013", "eq2013-01-14T10:00:00  10:00", "gt-2013"]:
        with pytest.raises(SearchValueError):
            parse_date(bad)


def test_search_value_error_is_value_error_and_clipped() -> None:
    long_value = "2013-" + "9" * 10_000
    with pytest.raises(ValueError) as exc:
        parse_date(long_value)
    assert isinstance(exc.value, SearchValueError)
    assert "9" * 61 not in str(exc.value)


# ---------------------------------------------------------------------------------------------
# Hypothesis: any valid date string
# ---------------------------------------------------------------------------------------------


@st.composite
def fhir_dates(draw: st.DrawFn) -> tuple[str, datetime, str]:
    """A valid FHIR date/dateTime string, its start as an aware datetime, and its precision."""
    dt = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9998, 12, 30)))
    precision = draw(st.sampled_from(["year", "month", "day", "minute", "second", "fraction"]))
    if precision == "year":
        return f"{dt.year:04d}", datetime(dt.year, 1, 1, tzinfo=UTC), precision
    if precision == "month":
        return (
            f"{dt.year:04d}-{dt.month:02d}",
            datetime(dt.year, dt.month, 1, tzinfo=UTC),
            precision,
        )
    if precision == "day":
        start = datetime(dt.year, dt.month, dt.day, tzinfo=UTC)
        return dt.strftime("%Y-%m-%d").zfill(10), start, precision
    offset_minutes = draw(st.one_of(st.none(), st.integers(-14 * 60, 14 * 60)))
    if offset_minutes is None:
        tz_text, tzinfo = draw(st.sampled_from(["", "Z"])), UTC
    else:
        sign = "+" if offset_minutes >= 0 else "-"
        hh, mm = divmod(abs(offset_minutes), 60)
        tz_text = f"{sign}{hh:02d}:{mm:02d}"
        tzinfo = timezone(timedelta(minutes=offset_minutes))
    date_part = f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}"
    if precision == "minute":
        start = dt.replace(second=0, microsecond=0, tzinfo=tzinfo)
        return date_part + tz_text, start, precision
    if precision == "second":
        start = dt.replace(microsecond=0, tzinfo=tzinfo)
        return f"{date_part}:{dt.second:02d}{tz_text}", start, precision
    digits = draw(st.integers(1, 6))
    frac = f"{dt.microsecond:06d}"[:digits]
    start = dt.replace(microsecond=int(frac.ljust(6, "0")), tzinfo=tzinfo)
    return f"{date_part}:{dt.second:02d}.{frac}{tz_text}", start, precision


def _precision_end(start: datetime, precision: str, value: str) -> datetime:
    if precision == "year":
        return start.replace(year=start.year + 1)
    if precision == "month":
        return (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
    if precision == "day":
        return start + timedelta(days=1)
    if precision == "minute":
        return start + timedelta(minutes=1)
    if precision == "second":
        return start + timedelta(seconds=1)
    digits = len(value.split(".")[1].rstrip("Z").split("+")[0].split("-")[0])
    return start + timedelta(microseconds=10 ** (6 - digits))


@given(fhir_dates(), st.sampled_from(("",) + PREFIXES))
def test_date_range_property(sample: tuple[str, datetime, str], prefix: str) -> None:
    value, start, precision = sample
    low, high = date_range(value)
    assert low <= high
    assert low == us(start)
    assert high == us(_precision_end(start, precision, value)) - 1
    parsed = parse_date(prefix + value)
    assert parsed == DateQuery(prefix or "eq", low, high)


# ---------------------------------------------------------------------------------------------
# Token / OR / escapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("male", TokenQuery(None, "male", False)),
        ("http://loinc.org|34108-1", TokenQuery("http://loinc.org", "34108-1", False)),
        ("|34108-1", TokenQuery(None, "34108-1", True)),
        ("http://loinc.org|", TokenQuery("http://loinc.org", None, False)),
        ("urn:oid:1.2.3|a:b", TokenQuery("urn:oid:1.2.3", "a:b", False)),
        (r"a\|b", TokenQuery(None, "a|b", False)),
        (r"sys|a\|b", TokenQuery("sys", "a|b", False)),
        (r"s\|y|c", TokenQuery("s|y", "c", False)),
        (r"a\,b", TokenQuery(None, "a,b", False)),
        (r"a\$b", TokenQuery(None, "a$b", False)),
        (r"a\\b", TokenQuery(None, "a\\b", False)),
        (r"a\\|b", TokenQuery("a\\", "b", False)),  # escaped backslash, then a real bar
        (r"a\xb", TokenQuery(None, r"a\xb", False)),  # unknown escape kept literally
    ],
)
def test_parse_token(value: str, expected: TokenQuery) -> None:
    assert parse_token(value) == expected


@pytest.mark.parametrize("value", ["", "|", "a|b|c", "a\\", "sys|code\\"])
def test_parse_token_invalid(value: str) -> None:
    with pytest.raises(SearchValueError):
        parse_token(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a", ["a"]),
        ("a,b", ["a", "b"]),
        ("a,,b", ["a", "", "b"]),
        (r"a\,b,c", [r"a\,b", "c"]),
        (r"a\\,b", [r"a\\", "b"]),
        (r"s|a\,b,s|c", [r"s|a\,b", "s|c"]),
        ("a,", ["a", ""]),
        ("a\\", ["a\\"]),
    ],
)
def test_split_or(value: str, expected: list[str]) -> None:
    assert split_or(value) == expected


def test_split_or_then_parse_token() -> None:
    parts = [parse_token(p) for p in split_or(r"http://x|a\,1,|b,c\|d")]
    assert parts == [
        TokenQuery("http://x", "a,1", False),
        TokenQuery(None, "b", True),
        TokenQuery(None, "c|d", False),
    ]


def test_unescape() -> None:
    assert unescape(r"a\,b\|c\$d\\e") == "a,b|c$d\\e"
    assert unescape("plain") == "plain"
    with pytest.raises(SearchValueError):
        unescape("trailing\\")


# ---------------------------------------------------------------------------------------------
# parse_reference
# ---------------------------------------------------------------------------------------------

DR_PATIENT = SEARCH_PARAMS["DocumentReference"]["patient"]
DR_SUBJECT = SEARCH_PARAMS["DocumentReference"]["subject"]
CONSENT_DATA = SEARCH_PARAMS["Consent"]["data"]


@pytest.mark.parametrize(
    ("value", "param", "modifier", "expected"),
    [
        ("123", DR_PATIENT, None, ReferenceQuery("Patient", "123", None)),  # single target
        ("123", DR_SUBJECT, None, ReferenceQuery(None, "123", None)),  # several targets
        ("Patient/123", DR_SUBJECT, None, ReferenceQuery("Patient", "123", None)),
        ("Patient/123/_history/4", DR_PATIENT, None, ReferenceQuery("Patient", "123", None)),
        ("123", DR_SUBJECT, "Group", ReferenceQuery("Group", "123", None)),
        ("123", DR_SUBJECT, ":Device", ReferenceQuery("Device", "123", None)),
        ("Group/7", DR_SUBJECT, ":Group", ReferenceQuery("Group", "7", None)),
        (
            "http://x.example/fhir/Patient/123",
            DR_PATIENT,
            None,
            ReferenceQuery("Patient", "123", "http://x.example/fhir/Patient/123"),
        ),
        (
            "http://x.example/fhir/Patient/123/_history/2",
            DR_SUBJECT,
            None,
            ReferenceQuery("Patient", "123", "http://x.example/fhir/Patient/123"),
        ),
        (
            "urn:uuid:2f1f6a52-9e0e-4a47-8b1c-5d1c3a4f1f00",
            CONSENT_DATA,
            None,
            ReferenceQuery(None, None, "urn:uuid:2f1f6a52-9e0e-4a47-8b1c-5d1c3a4f1f00"),
        ),
        (
            "http://x.example/some/thing",
            CONSENT_DATA,
            None,
            ReferenceQuery(None, None, "http://x.example/some/thing"),
        ),
        ("Observation/o-1.2", CONSENT_DATA, None, ReferenceQuery("Observation", "o-1.2", None)),
        ("o1", CONSENT_DATA, None, ReferenceQuery(None, "o1", None)),
        (r"Observation/o1\,", CONSENT_DATA, None, None),  # "," is not a valid id char
    ],
)
def test_parse_reference(
    value: str, param: SearchParam, modifier: str | None, expected: ReferenceQuery | None
) -> None:
    if expected is None:
        with pytest.raises(SearchValueError):
            parse_reference(value, param, modifier)
    else:
        assert parse_reference(value, param, modifier) == expected


@pytest.mark.parametrize(
    ("value", "param", "modifier"),
    [
        ("", DR_PATIENT, None),
        ("Group/1", DR_PATIENT, None),  # not an allowed target
        ("Organization/1", DR_SUBJECT, None),
        ("1", DR_PATIENT, "Group"),
        ("1", DR_SUBJECT, "NotAType"),
        ("Patient/1", DR_SUBJECT, "Group"),  # conflicts with the modifier
        ("Foo/1", CONSENT_DATA, None),  # unknown type
        ("Patient/1/2", DR_SUBJECT, None),
        ("bad id!", DR_SUBJECT, None),
        ("x" * 65, DR_SUBJECT, None),  # ids are at most 64 characters
        ("http://x.example/fhir/Group/1", DR_PATIENT, None),
    ],
)
def test_parse_reference_invalid(value: str, param: SearchParam, modifier: str | None) -> None:
    with pytest.raises(SearchValueError):
        parse_reference(value, param, modifier)


def test_parse_reference_rejects_non_reference_param() -> None:
    with pytest.raises(SearchValueError):
        parse_reference("1", SEARCH_PARAMS["Patient"]["gender"])


def test_parse_reference_matches_extracted_rows() -> None:
    """A query built from a stored reference finds that row by (type, id)."""
    rows = extract(load("DocumentReference-example.json"))
    for row in rows.references:
        sp = params_for("DocumentReference")[row.param]
        q = parse_reference(row.url, sp)
        assert (q.target_type, q.target_id) == (row.target_type, row.target_id)
