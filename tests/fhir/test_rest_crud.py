"""R4 http.html interactions: create, read, vread, update, patch, delete, history, headers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import FHIR_JSON, all_examples, load_example
from fastapi.testclient import TestClient

SERVER_META = ("versionId", "lastUpdated")


def create(client: TestClient, resource: dict[str, Any], **headers: str) -> Any:
    return client.post(
        f"/fhir/{resource['resourceType']}", json=resource, headers={**FHIR_JSON, **headers}
    )


def strip_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    out = dict(resource)
    meta = {k: v for k, v in (out.pop("meta", None) or {}).items() if k not in SERVER_META}
    if meta:
        out["meta"] = meta
    out.pop("id", None)
    return out


@pytest.mark.parametrize("name", all_examples())
def test_every_official_example_is_created_and_round_trips(client: TestClient, name: str) -> None:
    example = load_example(name)
    r = create(client, example)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    read = client.get(f"/fhir/{example['resourceType']}/{rid}")
    assert read.status_code == 200
    assert strip_server_meta(read.json()) == strip_server_meta(example)


def test_create_sets_server_elements_and_headers(client: TestClient) -> None:
    patient = load_example("Patient-example")
    r = create(client, patient)
    assert r.status_code == 201
    body = r.json()
    assert body["id"] != "example"  # the client's id is ignored on create
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"].endswith("Z")
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["location"] == f"https://testserver/fhir/Patient/{body['id']}/_history/1"
    assert r.headers["last-modified"].endswith("GMT")
    assert r.headers["content-type"].startswith("application/fhir+json")


def test_read_unknown_is_404_with_operation_outcome(client: TestClient) -> None:
    r = client.get("/fhir/Patient/does-not-exist")
    assert r.status_code == 404
    assert r.json()["resourceType"] == "OperationOutcome"
    assert r.json()["issue"][0]["code"] == "not-found"


def test_unknown_type_is_404(client: TestClient) -> None:
    r = client.get("/fhir/Observation/1")
    assert r.status_code == 404
    assert r.json()["resourceType"] == "OperationOutcome"
    r = client.post("/fhir/Foo", json={"resourceType": "Foo"}, headers=FHIR_JSON)
    assert r.status_code == 404


def test_update_versions_and_if_match(client: TestClient) -> None:
    rid = create(client, load_example("Patient-example")).json()["id"]
    current = client.get(f"/fhir/Patient/{rid}").json()
    current["active"] = False
    r = client.put(f"/fhir/Patient/{rid}", json=current, headers={**FHIR_JSON, "If-Match": 'W/"1"'})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == 'W/"2"'
    assert r.json()["meta"]["versionId"] == "2"
    # stale If-Match → 412 and nothing written
    current["active"] = True
    r = client.put(f"/fhir/Patient/{rid}", json=current, headers={**FHIR_JSON, "If-Match": 'W/"1"'})
    assert r.status_code == 412
    assert r.json()["resourceType"] == "OperationOutcome"
    assert client.get(f"/fhir/Patient/{rid}").json()["active"] is False
    # vread both versions
    v1 = client.get(f"/fhir/Patient/{rid}/_history/1")
    v2 = client.get(f"/fhir/Patient/{rid}/_history/2")
    assert v1.status_code == v2.status_code == 200
    assert v1.json()["active"] is True and v2.json()["active"] is False
    assert v1.headers["etag"] == 'W/"1"'
    assert client.get(f"/fhir/Patient/{rid}/_history/3").status_code == 404
    assert client.get(f"/fhir/Patient/{rid}/_history/x").status_code == 404


def test_update_id_rules(client: TestClient) -> None:
    rid = create(client, load_example("Patient-example")).json()["id"]
    body = load_example("Patient-example")
    body.pop("id")
    assert client.put(f"/fhir/Patient/{rid}", json=body, headers=FHIR_JSON).status_code == 400
    body["id"] = "other"
    assert client.put(f"/fhir/Patient/{rid}", json=body, headers=FHIR_JSON).status_code == 400


def test_update_as_create_returns_201(client: TestClient) -> None:
    body = load_example("Organization-1")
    body["id"] = "org-new"
    r = client.put("/fhir/Organization/org-new", json=body, headers=FHIR_JSON)
    assert r.status_code == 201
    assert r.headers["location"].endswith("/Organization/org-new/_history/1")
    r = client.put("/fhir/Organization/org-new", json=body, headers=FHIR_JSON)
    assert r.status_code == 200
    assert r.headers["etag"] == 'W/"2"'


def test_delete_then_read_is_410_and_history_kept(client: TestClient) -> None:
    rid = create(client, load_example("Patient-example")).json()["id"]
    r = client.delete(f"/fhir/Patient/{rid}")
    assert r.status_code == 204
    assert r.headers["etag"] == 'W/"2"'
    assert client.get(f"/fhir/Patient/{rid}").status_code == 410
    assert client.get(f"/fhir/Patient/{rid}/_history/2").status_code == 410
    assert client.get(f"/fhir/Patient/{rid}/_history/1").status_code == 200
    # deleting again, or deleting a missing resource, still succeeds
    assert client.delete(f"/fhir/Patient/{rid}").status_code == 204
    assert client.delete("/fhir/Patient/never-was").status_code == 204
    # search omits it
    assert client.get(f"/fhir/Patient?_id={rid}").json()["total"] == 0
    hist = client.get(f"/fhir/Patient/{rid}/_history").json()
    assert hist["type"] == "history"
    assert [e["request"]["method"] for e in hist["entry"]] == ["DELETE", "POST"]
    assert "resource" not in hist["entry"][0]


def test_update_after_delete_recreates(client: TestClient) -> None:
    rid = create(client, load_example("Patient-example")).json()["id"]
    client.delete(f"/fhir/Patient/{rid}")
    body = load_example("Patient-example") | {"id": rid}
    r = client.put(f"/fhir/Patient/{rid}", json=body, headers=FHIR_JSON)
    assert r.status_code == 201
    assert r.json()["meta"]["versionId"] == "3"


def test_json_patch(client: TestClient) -> None:
    rid = create(client, load_example("Patient-example")).json()["id"]
    ops = [
        {"op": "replace", "path": "/gender", "value": "female"},
        {"op": "add", "path": "/active", "value": False},
    ]
    headers = {"content-type": "application/json-patch+json", "accept": "application/fhir+json"}
    r = client.patch(f"/fhir/Patient/{rid}", content=json.dumps(ops), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["gender"] == "female"
    assert r.json()["meta"]["versionId"] == "2"
    # a failing test op → 422, nothing written
    bad = [{"op": "test", "path": "/gender", "value": "male"}]
    r = client.patch(f"/fhir/Patient/{rid}", content=json.dumps(bad), headers=headers)
    assert r.status_code == 422
    # a patch producing an invalid resource → 400 with expression
    invalid = [{"op": "replace", "path": "/gender", "value": "robot"}]
    r = client.patch(f"/fhir/Patient/{rid}", content=json.dumps(invalid), headers=headers)
    assert r.status_code == 400
    assert r.json()["issue"][0]["expression"] == ["Patient.gender"]
    # may not change the id
    r = client.patch(
        f"/fhir/Patient/{rid}",
        content=json.dumps([{"op": "replace", "path": "/id", "value": "x"}]),
        headers=headers,
    )
    assert r.status_code == 400
    # If-Match on patch
    r = client.patch(
        f"/fhir/Patient/{rid}", content=json.dumps(ops), headers={**headers, "If-Match": 'W/"1"'}
    )
    assert r.status_code == 412
    # wrong content type → 415
    r = client.patch(f"/fhir/Patient/{rid}", content=json.dumps(ops), headers=FHIR_JSON)
    assert r.status_code == 415
    assert client.get(f"/fhir/Patient/{rid}").json()["meta"]["versionId"] == "2"


def test_conditional_create(client: TestClient) -> None:
    patient = load_example("Patient-example")
    first = create(
        client, patient, **{"If-None-Exist": "identifier=urn:oid:1.2.36.146.595.217.0.1|12345"}
    )
    assert first.status_code == 201
    again = create(
        client, patient, **{"If-None-Exist": "identifier=urn:oid:1.2.36.146.595.217.0.1|12345"}
    )
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    create(client, patient)  # a second, unconditional copy
    many = create(client, patient, **{"If-None-Exist": "identifier=12345"})
    assert many.status_code == 412
    bad = create(client, patient, **{"If-None-Exist": "nonsense=1"})
    assert bad.status_code == 400


@pytest.mark.parametrize(
    ("prefer", "expect_body"),
    [
        ("return=minimal", None),
        ("return=representation", "Patient"),
        ("return=OperationOutcome", "OperationOutcome"),
    ],
)
def test_prefer_return(client: TestClient, prefer: str, expect_body: str | None) -> None:
    r = create(client, load_example("Patient-example"), Prefer=prefer)
    assert r.status_code == 201
    assert "location" in r.headers
    if expect_body is None:
        assert r.content == b""
    else:
        assert r.json()["resourceType"] == expect_body


def test_history_type_and_since_and_paging(client: TestClient) -> None:
    ids = [create(client, load_example("Patient-example")).json()["id"] for _ in range(3)]
    first = client.get(f"/fhir/Patient/{ids[0]}").json()
    client.put(f"/fhir/Patient/{ids[0]}", json=first, headers=FHIR_JSON)
    hist = client.get("/fhir/Patient/_history?_count=2").json()
    assert hist["total"] == 4
    assert len(hist["entry"]) == 2
    nxt = next(link["url"] for link in hist["link"] if link["relation"] == "next")
    page2 = client.get(nxt.replace("https://testserver", "")).json()
    assert len(page2["entry"]) == 2
    seen = [e["fullUrl"] + e["response"]["etag"] for e in hist["entry"] + page2["entry"]]
    assert len(set(seen)) == 4
    since = first["meta"]["lastUpdated"]
    later = client.get("/fhir/Patient/_history", params={"_since": since}).json()
    assert later["total"] >= 1
    assert client.get("/fhir/Patient/_history?_since=notadate").status_code == 400
    assert client.get("/fhir/Patient/nope/_history").status_code == 404


def test_content_negotiation(client: TestClient) -> None:
    rid = create(client, load_example("Patient-example")).json()["id"]
    assert (
        client.get(f"/fhir/Patient/{rid}", headers={"accept": "application/xml"}).status_code == 406
    )
    assert client.get(f"/fhir/Patient/{rid}?_format=xml").status_code == 406
    ok = client.get(f"/fhir/Patient/{rid}?_format=json", headers={"accept": "application/xml"})
    assert ok.status_code == 200  # _format overrides Accept
    assert (
        client.get(f"/fhir/Patient/{rid}", headers={"accept": "application/json"}).status_code
        == 200
    )
    assert client.get(f"/fhir/Patient/{rid}", headers={"accept": "*/*"}).status_code == 200
    r = client.post(
        "/fhir/Patient", content=b"<Patient/>", headers={"content-type": "application/xml"}
    )
    assert r.status_code == 415
    assert r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"[]", 400),
        (b"", 400),
        (b'{"resourceType": "Organization"}', 400),  # wrong resourceType for the URL
        (b'{"resourceType": "Patient", "gender": "robot"}', 400),
        (b'{"resourceType": "Patient", "name": "x"}', 400),
        (b'{"resourceType": "Patient", "unknownElement": 1}', 400),
    ],
)
def test_bad_bodies_get_operation_outcome(client: TestClient, body: bytes, status: int) -> None:
    r = client.post("/fhir/Patient", content=body, headers=FHIR_JSON)
    assert r.status_code == status
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error"
    assert client.get("/fhir/Patient").json()["total"] == 0  # nothing written


def test_validation_errors_carry_expression_and_no_values(client: TestClient) -> None:
    secret = "Zyxwvut-Secret-Family"
    body = {"resourceType": "Patient", "name": [{"family": 12}], "birthDate": secret}
    r = client.post("/fhir/Patient", json=body, headers=FHIR_JSON)
    assert r.status_code == 400
    expressions = {e for i in r.json()["issue"] for e in i.get("expression", [])}
    assert {"Patient.name[0].family", "Patient.birthDate"} <= expressions
    assert secret not in r.text


def test_body_too_large_is_413(settings: Any) -> None:
    from fhir_consent.app import create_core_app

    small = settings.model_copy(update={"max_body_bytes": 2048})
    with TestClient(create_core_app(small), base_url="https://testserver") as c:
        body = {"resourceType": "Patient", "name": [{"text": "x" * 5000}]}
        r = c.post("/fhir/Patient", json=body, headers=FHIR_JSON)
        assert r.status_code == 413
        assert r.json()["resourceType"] == "OperationOutcome"

        def chunks() -> Any:
            yield b'{"resourceType": "Patient", "name": [{"text": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}]}'

        r = c.post("/fhir/Patient", content=chunks(), headers=FHIR_JSON)
        assert r.status_code == 413
        assert c.get("/fhir/Patient").json()["total"] == 0


def test_unsupported_method_is_405(client: TestClient) -> None:
    r = client.request("PUT", "/fhir/Patient", json={}, headers=FHIR_JSON)
    assert r.status_code == 405
    assert r.json()["resourceType"] == "OperationOutcome"


def test_invalid_ids(client: TestClient) -> None:
    assert client.get("/fhir/Patient/bad_id!").status_code == 400
    assert client.get("/fhir/Patient/" + "a" * 65).status_code == 400


def test_capability_statement(client: TestClient) -> None:
    cs = client.get("/fhir/metadata").json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    assert cs["format"] == ["application/fhir+json", "json"]
    types = {r["type"]: r for r in cs["rest"][0]["resource"]}
    for t in (
        "Patient",
        "Practitioner",
        "PractitionerRole",
        "Organization",
        "RelatedPerson",
        "DocumentReference",
        "Binary",
        "Consent",
        "AuditEvent",
        "Provenance",
    ):
        assert t in types
    doc_params = {p["name"] for p in types["DocumentReference"]["searchParam"]}
    assert {
        "patient",
        "subject",
        "status",
        "type",
        "category",
        "date",
        "period",
        "author",
        "custodian",
        "identifier",
        "contenttype",
        "relatesto",
        "security-label",
    } <= doc_params
    consent_params = {p["name"] for p in types["Consent"]["searchParam"]}
    assert {
        "patient",
        "status",
        "action",
        "actor",
        "category",
        "consentor",
        "data",
        "date",
        "identifier",
        "organization",
        "period",
        "purpose",
        "scope",
        "security-label",
        "source-reference",
    } <= consent_params
    assert "source" not in consent_params
    assert {i["code"] for i in cs["rest"][0]["interaction"]} == {"transaction", "batch"}
    assert types["Patient"]["operation"][0]["name"] == "everything"
    # metadata needs no body and answers JSON only
    assert client.get("/fhir/metadata", headers={"accept": "application/xml"}).status_code == 406
