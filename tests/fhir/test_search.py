"""R4 search.html semantics over the SQL index: parameter types, modifiers, prefixes, result
parameters, paging and handling of unknown parameters."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import FHIR_JSON, load_example
from fastapi.testclient import TestClient


def post(client: TestClient, resource: dict[str, Any]) -> str:
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    rid: str = r.json()["id"]
    return rid


def search(client: TestClient, query: str, **headers: str) -> dict[str, Any]:
    r = client.get(f"/fhir/{query}", headers=headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


def patient(family: str, given: str = "Ann", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family, "given": [given]}], **extra}


def docref(pid: str, date: str, code: str = "34133-9", **extra: Any) -> dict[str, Any]:
    if "T" not in date:  # DocumentReference.date is an instant
        date += "T00:00:00Z"
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "date": date,
        "content": [{"attachment": {"contentType": "application/pdf", "url": "Binary/1"}}],
        **extra,
    }


# -- string -------------------------------------------------------------------------------


def test_string_prefix_case_and_accent_insensitive(client: TestClient) -> None:
    a = post(client, patient("Müller"))
    b = post(client, patient("Muller-Smith"))
    post(client, patient("Smith"))
    assert set(ids(search(client, "Patient?family=muller"))) == {a, b}
    assert set(ids(search(client, "Patient?family=MÜL"))) == {a, b}
    assert ids(search(client, "Patient?family:exact=Müller")) == [a]
    assert ids(search(client, "Patient?family:exact=muller")) == []
    assert set(ids(search(client, "Patient?name:contains=smi"))) >= {b}
    assert search(client, "Patient?given=ann")["total"] == 3


def test_official_patient_example_searches(client: TestClient) -> None:
    pid = post(client, load_example("Patient-example"))
    post(client, load_example("Patient-f001"))
    assert ids(search(client, "Patient?family=chalmers")) == [pid]
    assert ids(search(client, "Patient?given=jim")) == [pid]
    assert ids(search(client, "Patient?birthdate=1974-12-25")) == [pid]
    assert ids(search(client, "Patient?gender=male&birthdate=1974")) == [pid]
    assert ids(search(client, "Patient?identifier=urn:oid:1.2.36.146.595.217.0.1|12345")) == [pid]
    assert ids(search(client, "Patient?identifier=12345")) == [pid]


# -- token --------------------------------------------------------------------------------


def test_token_forms_and_modifiers(client: TestClient) -> None:
    p = post(client, patient("Tok"))
    d1 = post(client, docref(p, "2020-01-01", "34133-9"))
    d2 = post(client, docref(p, "2020-01-01", "11488-4"))
    d3 = post(
        client, docref(p, "2020-01-01", "11488-4") | {"type": {"coding": [{"code": "11488-4"}]}}
    )
    loinc = "http://loinc.org"
    assert set(ids(search(client, "DocumentReference?type=11488-4"))) == {d2, d3}
    assert ids(search(client, f"DocumentReference?type={loinc}|34133-9")) == [d1]
    assert ids(search(client, "DocumentReference?type=|11488-4")) == [d3]
    assert set(ids(search(client, f"DocumentReference?type={loinc}|"))) == {d1, d2}
    assert set(ids(search(client, "DocumentReference?type:not=34133-9"))) == {d2, d3}
    assert set(ids(search(client, "DocumentReference?type=34133-9,11488-4"))) == {d1, d2, d3}
    assert ids(search(client, "DocumentReference?status=superseded")) == []
    assert search(client, "DocumentReference?category:missing=true")["total"] == 3
    assert search(client, "DocumentReference?category:missing=false")["total"] == 0


def test_token_text_modifier(client: TestClient) -> None:
    p = post(client, patient("Text"))
    d = post(
        client,
        docref(p, "2020-01-01")
        | {
            "type": {
                "coding": [
                    {
                        "system": "http://loinc.org",
                        "code": "34133-9",
                        "display": "Summary of episode note",
                    }
                ]
            }
        },
    )
    assert ids(search(client, "DocumentReference?type:text=summary")) == [d]
    assert ids(search(client, "DocumentReference?type:text=nothing")) == []


# -- reference ----------------------------------------------------------------------------


def test_reference_forms(client: TestClient) -> None:
    p1 = post(client, patient("Ref"))
    p2 = post(client, patient("Other"))
    d1 = post(client, docref(p1, "2020-01-01"))
    post(client, docref(p2, "2020-01-01"))
    assert ids(search(client, f"DocumentReference?patient={p1}")) == [d1]
    assert ids(search(client, f"DocumentReference?patient=Patient/{p1}")) == [d1]
    assert ids(search(client, f"DocumentReference?subject=Patient/{p1}")) == [d1]
    assert ids(search(client, f"DocumentReference?subject:Patient={p1}")) == [d1]
    url = f"https://testserver/fhir/Patient/{p1}"
    assert ids(search(client, f"DocumentReference?patient={url}")) == [d1]
    assert search(client, "DocumentReference?custodian:missing=true")["total"] == 2
    assert search(client, "DocumentReference?patient=nobody")["total"] == 0


# -- date ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("2020", {"y2020a", "y2020b"}),
        ("eq2020-06", {"y2020b"}),
        ("2020-06-15", {"y2020b"}),
        ("ne2020", {"y2019", "y2021"}),
        ("gt2020", {"y2021"}),
        ("ge2020", {"y2020a", "y2020b", "y2021"}),
        ("lt2020", {"y2019"}),
        ("le2020-01-01", {"y2019", "y2020a"}),
        ("sa2020-12-31", {"y2021"}),
        ("eb2020-01-01", {"y2019"}),
        ("ge2020-06-15T00:00:00Z", {"y2020b", "y2021"}),
        ("lt2020-06-15T12:30:00+02:00", {"y2019", "y2020a"}),  # 10:30:00Z exactly: not before
        ("lt2020-06-15T12:30:01%2B02:00", {"y2019", "y2020a", "y2020b"}),
    ],
)
def test_date_prefixes_and_precision(client: TestClient, query: str, expected: set[str]) -> None:
    p = post(client, patient("Dates"))
    dates = {
        "y2019": "2019-05-01T10:00:00Z",
        "y2020a": "2020-01-01T00:00:00Z",
        "y2020b": "2020-06-15T10:30:00Z",
        "y2021": "2021-02-01T08:00:00Z",
    }
    names = {post(client, docref(p, d)): name for name, d in dates.items()}
    found = {names[i] for i in ids(search(client, f"DocumentReference?date={query}&_count=50"))}
    assert found == expected


def test_date_period_and_birthdate(client: TestClient) -> None:
    p = post(client, patient("Period", birthDate="1980-02-29"))
    d = post(
        client,
        docref(p, "2020-01-01T00:00:00Z")
        | {"context": {"period": {"start": "2019-01-01", "end": "2019-12-31"}}},
    )
    assert ids(search(client, "DocumentReference?period=2019-07")) == []  # eq: period not inside
    assert ids(search(client, "DocumentReference?period=ge2019-07")) == [d]
    assert ids(search(client, "DocumentReference?period=2019")) == [d]
    assert ids(search(client, "Patient?birthdate=1980-02")) == [p]
    assert ids(search(client, "Patient?birthdate=gt1980-02-29")) == []


def test_last_updated_and_id(client: TestClient) -> None:
    a = post(client, patient("A"))
    b = post(client, patient("B"))
    lu = client.get(f"/fhir/Patient/{b}").json()["meta"]["lastUpdated"]
    assert ids(search(client, f"Patient?_lastUpdated=ge{lu}")) == [b]
    assert ids(search(client, f"Patient?_lastUpdated=lt{lu}")) == [a]
    assert set(ids(search(client, f"Patient?_id={a},{b}"))) == {a, b}


# -- invalid values and unknown parameters --------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "Patient?birthdate=notadate",
        "Patient?birthdate=xx2020",
        "Patient?_count=-1",
        "Patient?_count=abc",
        "Patient?_sort=nonsense",
        "Patient?gender:bogus=male",
        "Patient?_summary=maybe",
        "Patient?_total=lots",
        "Patient?family:missing=perhaps",
        "Patient?_include=Patient:name",
        "Patient?_include=Nope:x",
        "Patient?_cursor=garbage",
    ],
)
def test_invalid_search_values_are_400(client: TestClient, query: str) -> None:
    r = client.get(f"/fhir/{query}")
    assert r.status_code == 400, r.text
    assert r.json()["resourceType"] == "OperationOutcome"


def test_unknown_parameter_lenient_and_strict(client: TestClient) -> None:
    post(client, patient("Lenient"))
    lenient = search(client, "Patient?family=len&foo=bar")
    assert lenient["total"] == 1
    self_url = next(link["url"] for link in lenient["link"] if link["relation"] == "self")
    assert "foo" not in self_url and "family=len" in self_url
    strict = client.get("/fhir/Patient?family=len&foo=bar", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400
    assert strict.json()["resourceType"] == "OperationOutcome"


def test_post_search(client: TestClient) -> None:
    a = post(client, patient("Posted"))
    r = client.post(
        "/fhir/Patient/_search",
        content="family=posted",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200
    assert ids(r.json()) == [a]
    r = client.post(
        "/fhir/Patient/_search?_count=1",
        content="family=posted",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert ids(r.json()) == [a]


# -- result parameters --------------------------------------------------------------------


def test_count_default_and_maximum(client: TestClient) -> None:
    for i in range(25):
        post(client, patient(f"Count{i:02d}"))
    b = search(client, "Patient")
    assert b["total"] == 25 and len(b["entry"]) == 20
    assert len(search(client, "Patient?_count=5")["entry"]) == 5
    big = search(client, "Patient?_count=5000")
    assert len(big["entry"]) == 25
    self_url = next(link["url"] for link in big["link"] if link["relation"] == "self")
    assert "_count=1000" in self_url


def test_sort(client: TestClient) -> None:
    b = post(client, patient("Bravo", birthDate="1990-01-01"))
    a = post(client, patient("Alpha", birthDate="2000-01-01"))
    c = post(client, patient("Charlie", birthDate="1980-01-01"))
    assert ids(search(client, "Patient?_sort=family")) == [a, b, c]
    assert ids(search(client, "Patient?_sort=-family")) == [c, b, a]
    assert ids(search(client, "Patient?_sort=birthdate")) == [c, b, a]
    assert ids(search(client, "Patient?_sort=-birthdate")) == [a, b, c]
    assert ids(search(client, "Patient?_sort=-_lastUpdated")) == [c, a, b]
    assert ids(search(client, "Patient?_sort=_id")) == sorted([a, b, c])


def test_paging_is_complete_and_stable_under_inserts(client: TestClient) -> None:
    created = {post(client, patient(f"Page{i}")) for i in range(23)}
    seen: list[str] = []
    page = search(client, "Patient?_count=5&_sort=family")
    assert page["total"] == 23
    inserted = 0
    while True:
        seen += ids(page)
        # concurrent writers insert while we page: no skipped or repeated entries
        post(client, patient(f"Zzz-late{inserted}"))
        inserted += 1
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nxt:
            break
        page = search(client, nxt[0].replace("https://testserver/fhir/", ""))
    assert len(seen) == len(set(seen))
    assert created <= set(seen)


def test_previous_link_walks_back(client: TestClient) -> None:
    for i in range(7):
        post(client, patient(f"Prev{i}"))
    p1 = search(client, "Patient?_count=3")
    assert not any(link["relation"] == "previous" for link in p1["link"])
    nxt = next(link["url"] for link in p1["link"] if link["relation"] == "next")
    p2 = search(client, nxt.replace("https://testserver/fhir/", ""))
    prev = next(link["url"] for link in p2["link"] if link["relation"] == "previous")
    back = search(client, prev.replace("https://testserver/fhir/", ""))
    assert ids(back) == ids(p1)


def test_summary_count_total_none_and_elements(client: TestClient) -> None:
    pid = post(client, load_example("Patient-example"))
    counted = search(client, "Patient?_summary=count")
    assert counted["total"] == 1 and "entry" not in counted
    no_total = search(client, "Patient?_total=none")
    assert "total" not in no_total and len(no_total["entry"]) == 1
    summary = search(client, "Patient?_summary=true")["entry"][0]["resource"]
    assert "name" in summary and "contact" not in summary and "text" not in summary
    assert any(t["code"] == "SUBSETTED" for t in summary["meta"]["tag"])
    elems = search(client, "Patient?_elements=gender")["entry"][0]["resource"]
    assert set(elems) == {"resourceType", "id", "meta", "gender"}
    assert elems["id"] == pid


def test_include_and_revinclude(client: TestClient) -> None:
    org = post(client, load_example("Organization-1"))
    p = post(client, patient("Inc", managingOrganization={"reference": f"Organization/{org}"}))
    d = post(client, docref(p, "2020-01-01"))
    prov = post(
        client,
        {
            "resourceType": "Provenance",
            "target": [{"reference": f"DocumentReference/{d}"}],
            "recorded": "2020-01-01T00:00:00Z",
            "agent": [{"who": {"reference": f"Organization/{org}"}}],
        },
    )
    b = search(client, "DocumentReference?_include=DocumentReference:subject")
    assert ids(b) == [d] and ids(b, "include") == [p]
    assert b["total"] == 1
    b = search(
        client,
        "DocumentReference?_include=DocumentReference:subject"
        "&_include:iterate=Patient:organization",
    )
    assert set(ids(b, "include")) == {p, org}
    b = search(client, "DocumentReference?_revinclude=Provenance:target")
    assert ids(b, "include") == [prov]
    b = search(client, f"Patient?_id={p}&_revinclude=DocumentReference:subject")
    assert ids(b, "include") == [d]
    b = search(client, "DocumentReference?_include=*")
    assert p in ids(b, "include")


def test_searchset_shape(client: TestClient) -> None:
    pid = post(client, patient("Shape"))
    b = search(client, "Patient?family=shape")
    assert b["resourceType"] == "Bundle" and b["type"] == "searchset"
    entry = b["entry"][0]
    assert entry["fullUrl"] == f"https://testserver/fhir/Patient/{pid}"
    assert entry["search"]["mode"] == "match"
    assert b["link"][0] == {
        "relation": "self",
        "url": "https://testserver/fhir/Patient?family=shape",
    }


@pytest.mark.parametrize(
    "name",
    [
        "consent-example-basic",
        "consent-example-notThis",
        "consent-example-signature",
        "consent-example-smartonfhir",
    ],
)
def test_consent_search_parameters(client: TestClient, name: str) -> None:
    example = load_example(f"Consent-{name}")
    cid = post(client, example)
    patient_ref = example["patient"]["reference"]
    assert cid in ids(search(client, f"Consent?patient={patient_ref}"))
    assert cid in ids(search(client, f"Consent?status={example['status']}"))
    assert cid in ids(search(client, "Consent?scope=patient-privacy,treatment,research,adr"))
    assert cid in ids(search(client, "Consent?category=59284-0,64292-6,57016-8,npp"))


def test_consent_nested_provision_params(client: TestClient) -> None:
    cid = post(client, load_example("Consent-consent-example-notThis"))
    assert ids(search(client, "Consent?data=Task/example3")) == [cid]
    cid2 = post(client, load_example("Consent-consent-example-notOrg"))
    assert cid2 in ids(search(client, "Consent?actor=Organization/f001"))
    assert cid2 in ids(search(client, "Consent?action=access,correct"))


def test_total_counts_the_whole_match_on_every_page(client: TestClient) -> None:
    """The first page carries its total in the page query, later pages count separately:
    every page reports all matches, whatever condition drives the query."""
    pid = post(client, patient("Totals"))
    other = post(client, patient("Elsewhere"))
    for i in range(12):
        post(client, docref(pid, f"2021-01-{i + 1:02d}"))
    for i in range(3):
        post(client, docref(pid, f"2015-01-{i + 1:02d}"))
        post(client, docref(other, f"2021-02-{i + 1:02d}"))
    query = f"DocumentReference?date=ge2020-01-01&patient={pid}&_count=5"
    page = search(client, query)
    totals, seen = [], []
    while True:
        totals.append(page["total"])
        seen += ids(page)
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nxt:
            break
        page = search(client, nxt[0].replace("https://testserver/fhir/", ""))
    assert totals == [12, 12, 12] and len(seen) == len(set(seen)) == 12
    assert search(client, f"DocumentReference?patient={pid}&date=ge2030-01-01")["total"] == 0
    assert search(client, f"DocumentReference?patient={other}&date=lt2021-02-02")["total"] == 1
