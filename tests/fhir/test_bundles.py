"""Batch and transaction Bundles (R4 http.html §3.1.0.11), on SQLite and PostgreSQL.

Every response Bundle is also parsed with ``fhirclient``'s strict FHIR 4.0.1 models, so output
that a standard client cannot read (an empty array, a wrong datatype) fails here.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from conftest import FHIR_JSON, load_example
from fastapi.testclient import TestClient
from fhirclient.models.bundle import Bundle as StrictBundle
from fhirclient.models.operationoutcome import OperationOutcome as StrictOutcome

BASE = "https://testserver/fhir"
PATCH_TYPE = "application/json-patch+json"

# -- helpers ---------------------------------------------------------------------------------


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def entry(
    method: str,
    url: str,
    resource: dict[str, Any] | None = None,
    *,
    full_url: str | None = None,
    **request: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {"request": {"method": method, "url": url, **request}}
    if resource is not None:
        out["resource"] = resource
    if full_url is not None:
        out["fullUrl"] = full_url
    return out


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Bundle", "type": kind}
    if entries:
        out["entry"] = list(entries)
    return out


def post_bundle(client: TestClient, body: Any, **headers: str) -> Any:
    return client.post("/fhir", json=body, headers={**FHIR_JSON, **headers})


def strict_response(r: Any, kind: str) -> dict[str, Any]:
    """A 200 response Bundle of ``kind``, checked against the 4.0.1 models."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = r.json()
    assert body["resourceType"] == "Bundle"
    assert body["type"] == kind
    StrictBundle(body, strict=True)
    return body


def strict_outcome(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["resourceType"] == "OperationOutcome"
    StrictOutcome(body, strict=True)
    assert body["issue"][0]["severity"] in ("error", "fatal")
    return body


def diagnostics(outcome: dict[str, Any]) -> str:
    return " ".join(i.get("diagnostics", "") for i in outcome["issue"])


def patient(family: str, **extra: Any) -> dict[str, Any]:
    p = load_example("Patient-example")
    p.pop("id")
    p["name"] = [{"use": "official", "family": family, "given": ["Peter"]}]
    p.update(extra)
    return p


def create(client: TestClient, resource: dict[str, Any]) -> dict[str, Any]:
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def total(client: TestClient, query: str) -> int:
    r = client.get(f"/fhir/{query}")
    assert r.status_code == 200, r.text
    count: int = r.json()["total"]
    return count


def type_history_total(client: TestClient, rtype: str) -> int:
    count: int = client.get(f"/fhir/{rtype}/_history").json()["total"]
    return count


def patch_binary(ops: Any, content_type: str = PATCH_TYPE) -> dict[str, Any]:
    data = base64.b64encode(json.dumps(ops).encode()).decode()
    return {"resourceType": "Binary", "contentType": content_type, "data": data}


def consent_for(patient_ref: str, document_ref: str | None = None) -> dict[str, Any]:
    c = load_example("Consent-consent-example-basic")
    c.pop("id")
    c["patient"] = {"reference": patient_ref}
    c.pop("organization", None)
    if document_ref is not None:
        c["sourceReference"] = {"reference": document_ref}
        c.pop("sourceAttachment", None)
        c["provision"]["data"] = [{"meaning": "instance", "reference": {"reference": document_ref}}]
    return c


def document_for(patient_ref: str) -> dict[str, Any]:
    d = load_example("DocumentReference-example")
    d.pop("id")
    d.pop("contained", None)
    d.pop("relatesTo", None)
    d["subject"] = {"reference": patient_ref}
    d.pop("author", None)
    d.pop("authenticator", None)
    d.pop("custodian", None)
    d.pop("context", None)
    return d


def split_location(location: str) -> tuple[str, str, str]:
    rtype, rid, history, vid = location.split("/")
    assert history == "_history"
    return rtype, rid, vid


# -- transaction: references, response shape ----------------------------------------------


def test_transaction_resolves_urn_uuid_references(client: TestClient) -> None:
    p_url, d_url, c_url = urn(), urn(), urn()
    # referrers come before the resources they point at: resolution must not depend on order
    body = bundle(
        "transaction",
        entry("POST", "Consent", consent_for(p_url, d_url), full_url=c_url),
        entry("POST", "DocumentReference", document_for(p_url), full_url=d_url),
        entry("POST", "Patient", patient("Urnuuid"), full_url=p_url),
    )
    result = strict_response(post_bundle(client, body), "transaction-response")
    entries = result["entry"]
    assert len(entries) == 3
    kinds = []
    for e in entries:
        resp = e["response"]
        assert resp["status"].startswith("201")
        rtype, rid, vid = split_location(resp["location"])
        assert vid == "1"
        assert resp["etag"] == 'W/"1"'
        assert resp["lastModified"].endswith("Z")
        assert e["fullUrl"] == f"{BASE}/{rtype}/{rid}"
        assert e["resource"]["id"] == rid
        assert e["resource"]["meta"]["versionId"] == "1"
        kinds.append(rtype)
    assert kinds == ["Consent", "DocumentReference", "Patient"]  # request order
    consent, doc, pat = (e["resource"] for e in entries)
    pid, did = pat["id"], doc["id"]
    assert consent["patient"]["reference"] == f"Patient/{pid}"
    assert consent["sourceReference"]["reference"] == f"DocumentReference/{did}"
    assert consent["provision"]["data"][0]["reference"]["reference"] == f"DocumentReference/{did}"
    assert doc["subject"]["reference"] == f"Patient/{pid}"
    assert "urn:uuid" not in json.dumps(result)
    # stored (read back) and indexed (searchable) with the rewritten references
    stored = client.get(f"/fhir/Consent/{consent['id']}").json()
    assert stored["patient"]["reference"] == f"Patient/{pid}"
    assert total(client, f"Consent?patient=Patient/{pid}") == 1
    assert total(client, f"Consent?source-reference=DocumentReference/{did}") == 1
    assert total(client, f"Consent?data=DocumentReference/{did}") == 1
    assert total(client, f"DocumentReference?subject=Patient/{pid}") == 1
    assert total(client, f"DocumentReference?patient={pid}") == 1


def test_transaction_rewrites_uri_elements_and_narrative_links(client: TestClient) -> None:
    """R4 http.html §3.1.0.11.2: "Servers SHALL replace all matching links in the bundle,
    whether they are found in the resource ids, resource references, elements of type uri,
    url, oid, uuid, and <a href="" …> in the narrative"."""
    p_url, d_url = urn(), urn()
    consent = consent_for(p_url)
    consent["policy"] = [{"uri": d_url}]
    consent["text"] = {
        "status": "generated",
        "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><a href="{p_url}">patient</a></div>',
    }
    body = bundle(
        "transaction",
        entry("POST", "Patient", patient("Links"), full_url=p_url),
        entry("POST", "DocumentReference", document_for(p_url), full_url=d_url),
        entry("POST", "Consent", consent),
    )
    result = strict_response(post_bundle(client, body), "transaction-response")
    pid = result["entry"][0]["resource"]["id"]
    did = result["entry"][1]["resource"]["id"]
    stored = client.get(f"/fhir/Consent/{result['entry'][2]['resource']['id']}").json()
    assert stored["policy"][0]["uri"] == f"DocumentReference/{did}"
    assert f'href="Patient/{pid}"' in stored["text"]["div"]
    assert "urn:uuid" not in json.dumps(stored)


def test_transaction_unresolved_placeholder_is_rejected(client: TestClient) -> None:
    body = bundle(
        "transaction",
        entry("POST", "Patient", patient("Dangling")),
        entry("POST", "Consent", consent_for(urn())),  # no entry has this fullUrl
    )
    outcome = strict_outcome(post_bundle(client, body), 400)
    assert "Bundle.entry[1]" in diagnostics(outcome)
    assert total(client, "Patient?family=Dangling") == 0
    assert type_history_total(client, "Consent") == 0


def test_transaction_duplicate_full_url_is_rejected(client: TestClient) -> None:
    dup = urn()
    body = bundle(
        "transaction",
        entry("POST", "Patient", patient("Dup"), full_url=dup),
        entry("POST", "Patient", patient("Dup"), full_url=dup),
    )
    strict_outcome(post_bundle(client, body), 400)
    assert total(client, "Patient?family=Dup") == 0


def test_transaction_put_with_urn_full_url_keeps_client_id(client: TestClient) -> None:
    p_url = urn()
    pat = patient("Putter") | {"id": "put-by-client"}
    body = bundle(
        "transaction",
        entry("POST", "Consent", consent_for(p_url)),
        entry("PUT", "Patient/put-by-client", pat, full_url=p_url),
    )
    result = strict_response(post_bundle(client, body), "transaction-response")
    assert result["entry"][0]["resource"]["patient"]["reference"] == "Patient/put-by-client"
    assert result["entry"][1]["response"]["status"].startswith("201")
    assert result["entry"][1]["response"]["location"] == "Patient/put-by-client/_history/1"


def test_transaction_absolute_request_urls_on_this_base(client: TestClient) -> None:
    existing = create(client, patient("Absolute"))
    body = bundle(
        "transaction",
        entry("GET", f"{BASE}/Patient/{existing['id']}"),
        entry("POST", f"{BASE}/Patient", patient("Absolute")),
    )
    result = strict_response(post_bundle(client, body), "transaction-response")
    assert result["entry"][0]["resource"]["id"] == existing["id"]
    assert result["entry"][1]["response"]["status"].startswith("201")


def test_transaction_absolute_full_url_on_this_server_is_resolved(client: TestClient) -> None:
    """A POST's fullUrl may be an absolute URL on this server; the server assigns a new id and
    rewrites links to it, in absolute and in relative form."""
    full = f"{BASE}/Patient/client-chosen"
    body = bundle(
        "transaction",
        entry("POST", "Consent", consent_for(full)),
        entry("POST", "Consent", consent_for("Patient/client-chosen")),
        entry("POST", "Patient", patient("Absolute"), full_url=full),
    )
    result = strict_response(post_bundle(client, body), "transaction-response")
    pid = result["entry"][2]["resource"]["id"]
    assert pid != "client-chosen"
    assert result["entry"][0]["resource"]["patient"]["reference"] == f"Patient/{pid}"
    assert result["entry"][1]["resource"]["patient"]["reference"] == f"Patient/{pid}"


def test_head_entries_answer_without_a_body(client: TestClient) -> None:
    pid = create(client, patient("Header"))["id"]
    body = bundle("batch", entry("HEAD", f"Patient/{pid}"), entry("HEAD", "Patient?family=x"))
    read, search = strict_response(post_bundle(client, body), "batch-response")["entry"]
    assert read["response"]["status"].startswith("200")
    assert read["response"]["etag"] == 'W/"1"'
    assert "resource" not in read and "resource" not in search


def test_empty_transaction_and_batch(client: TestClient) -> None:
    for kind in ("transaction", "batch"):
        result = strict_response(post_bundle(client, bundle(kind)), f"{kind}-response")
        assert "entry" not in result  # FHIR JSON forbids empty arrays: no "entry": []


def test_trailing_slash_base_and_plain_json(client: TestClient) -> None:
    body = bundle("batch", entry("POST", "Patient", patient("Slash")))
    r = client.post("/fhir/", json=body, headers={"content-type": "application/json"})
    assert strict_response(r, "batch-response")["entry"][0]["response"]["status"].startswith("201")


# -- transaction: processing order ---------------------------------------------------------


def test_transaction_processing_order_delete_post_put_get(client: TestClient) -> None:
    keep = create(client, patient("Order"))
    gone = create(client, patient("Order"))
    keep["active"] = False
    body = bundle(
        "transaction",
        entry("GET", "Patient?family=Order&_sort=_id"),
        entry("PUT", f"Patient/{keep['id']}", keep),
        entry("POST", "Patient", patient("Order")),
        entry("DELETE", f"Patient/{gone['id']}"),
    )
    result = strict_response(post_bundle(client, body), "transaction-response")
    search, put, post, delete = result["entry"]
    assert put["response"]["status"].startswith("200")
    assert put["response"]["etag"] == 'W/"2"'
    assert post["response"]["status"].startswith("201")
    assert delete["response"]["status"].startswith("204")
    assert "resource" not in delete
    new_id = post["resource"]["id"]
    # GET ran last: it sees the POST and the PUT, not the deleted resource
    found = search["resource"]
    assert search["response"]["status"].startswith("200")
    assert found["type"] == "searchset"
    by_id = {e["resource"]["id"]: e["resource"] for e in found["entry"]}
    assert set(by_id) == {keep["id"], new_id}
    assert by_id[keep["id"]]["active"] is False
    # write order is visible in the history: DELETE, then POST, then PUT (newest first)
    hist = client.get("/fhir/Patient/_history?_count=3").json()["entry"]
    assert [(e["request"]["method"], e["fullUrl"].rsplit("/", 1)[1]) for e in hist] == [
        ("PUT", keep["id"]),
        ("POST", new_id),
        ("DELETE", gone["id"]),
    ]


def test_transaction_get_entries_read_and_search(client: TestClient) -> None:
    pid = create(client, patient("Getter"))["id"]
    body = bundle(
        "transaction",
        entry("GET", f"Patient/{pid}"),
        entry("GET", f"Patient/{pid}/_history/1"),
        entry("GET", "Patient?family=Getter"),
    )
    read, vread, search = strict_response(post_bundle(client, body), "transaction-response")[
        "entry"
    ]
    assert read["resource"]["id"] == pid
    assert read["response"]["etag"] == 'W/"1"'
    assert read["fullUrl"] == f"{BASE}/Patient/{pid}"
    assert vread["resource"]["meta"]["versionId"] == "1"
    assert search["resource"]["total"] == 1


def test_transaction_overlapping_identities_fail(client: TestClient) -> None:
    """R4 http.html §3.1.0.11.2: "If any resource identities (including resolved identities
    from conditional update/delete) overlap in steps 1-3, then the transaction SHALL fail"."""
    existing = create(client, patient("Overlap"))
    body = bundle(
        "transaction",
        entry("DELETE", f"Patient/{existing['id']}"),
        entry("PUT", f"Patient/{existing['id']}", existing),
    )
    outcome = strict_outcome(post_bundle(client, body), 400)
    assert "Bundle.entry[1]" in diagnostics(outcome)
    assert client.get(f"/fhir/Patient/{existing['id']}").json()["meta"]["versionId"] == "1"
    twice = bundle(
        "transaction",
        entry("PUT", f"Patient/{existing['id']}", existing),
        entry("PUT", f"Patient/{existing['id']}", existing),
    )
    strict_outcome(post_bundle(client, twice), 400)
    assert client.get(f"/fhir/Patient/{existing['id']}").json()["meta"]["versionId"] == "1"


# -- transaction: atomicity -----------------------------------------------------------------


def _invalid_resource(_client: TestClient, _pid: str) -> tuple[dict[str, Any], int]:
    return entry("POST", "Patient", patient("Atomic", gender="robot")), 400


def _stale_if_match(client: TestClient, pid: str) -> tuple[dict[str, Any], int]:
    current = client.get(f"/fhir/Patient/{pid}").json()
    return entry("PUT", f"Patient/{pid}", current, ifMatch='W/"7"'), 412


def _read_unknown(_client: TestClient, _pid: str) -> tuple[dict[str, Any], int]:
    return entry("GET", "Patient/no-such-patient"), 404


def _failing_patch_test(_client: TestClient, pid: str) -> tuple[dict[str, Any], int]:
    ops = [{"op": "test", "path": "/gender", "value": "female"}]
    return entry("PATCH", f"Patient/{pid}", patch_binary(ops)), 422


def _wrong_type_for_url(_client: TestClient, _pid: str) -> tuple[dict[str, Any], int]:
    org = {k: v for k, v in load_example("Organization-1").items() if k != "id"}
    return entry("POST", "Patient", org), 400


def _search_bad_param(_client: TestClient, _pid: str) -> tuple[dict[str, Any], int]:
    return entry("GET", "Patient?birthdate=notadate"), 400


@pytest.mark.parametrize(
    "failing",
    [
        _invalid_resource,
        _stale_if_match,
        _read_unknown,
        _failing_patch_test,
        _wrong_type_for_url,
        _search_bad_param,
    ],
)
def test_transaction_is_atomic(
    client: TestClient, failing: Callable[[TestClient, str], tuple[dict[str, Any], int]]
) -> None:
    existing = create(client, patient("Before"))
    pid = existing["id"]
    doomed = create(client, patient("Doomed"))
    target = create(client, patient("Target"))  # what the failing entry works on
    changed = dict(existing, active=False)
    bad, status = failing(client, target["id"])
    p_url = urn()
    body = bundle(
        "transaction",
        entry("POST", "Patient", patient("Atomic"), full_url=p_url),
        entry("POST", "Consent", consent_for(p_url)),
        bad,  # the 3rd entry fails
        entry("PUT", f"Patient/{pid}", changed),
        entry("DELETE", f"Patient/{doomed['id']}"),
    )
    outcome = strict_outcome(post_bundle(client, body), status)
    assert "Bundle.entry[2]" in diagnostics(outcome)
    # nothing was written: no creates, no update, no delete
    assert total(client, "Patient?family=Atomic") == 0
    assert type_history_total(client, "Consent") == 0
    assert total(client, "Consent") == 0
    assert client.get(f"/fhir/Patient/{pid}").json()["meta"]["versionId"] == "1"
    assert client.get(f"/fhir/Patient/{doomed['id']}").status_code == 200
    assert client.get(f"/fhir/Patient/{target['id']}").json()["meta"]["versionId"] == "1"
    assert type_history_total(client, "Patient") == 3
    # and the server is still healthy: the same transaction without the bad entry commits
    body["entry"].pop(2)
    strict_response(post_bundle(client, body), "transaction-response")
    assert total(client, "Patient?family=Atomic") == 1


def test_transaction_failure_names_entry_in_original_order(client: TestClient) -> None:
    """Processing order differs from request order; the error must name the request index."""
    body = bundle(
        "transaction",
        entry("GET", "Patient?family=x"),
        entry("POST", "Patient", patient("Named")),
        entry("POST", "Patient", patient("Named", gender="robot")),
    )
    outcome = strict_outcome(post_bundle(client, body), 400)
    assert "Bundle.entry[2]" in diagnostics(outcome)
    assert "Bundle.entry[1]" not in diagnostics(outcome)


# -- transaction: conditional create, If-Match -------------------------------------------------

IDENT_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"


def _with_identifier(value: str, family: str) -> dict[str, Any]:
    return patient(family, identifier=[{"system": IDENT_SYSTEM, "value": value}])


def test_conditional_create_in_transaction_maps_to_existing(client: TestClient) -> None:
    existing = create(client, _with_identifier("cond-1", "Conditional"))
    p_url = urn()
    body = bundle(
        "transaction",
        entry("POST", "Consent", consent_for(p_url)),
        entry(
            "POST",
            "Patient",
            _with_identifier("cond-1", "Conditional"),
            full_url=p_url,
            ifNoneExist=f"identifier={IDENT_SYSTEM}|cond-1",
        ),
    )
    consent_entry, patient_entry = strict_response(
        post_bundle(client, body), "transaction-response"
    )["entry"]
    assert patient_entry["response"]["status"].startswith("200")
    assert split_location(patient_entry["response"]["location"])[1] == existing["id"]
    assert consent_entry["resource"]["patient"]["reference"] == f"Patient/{existing['id']}"
    assert total(client, f"Patient?identifier={IDENT_SYSTEM}|cond-1") == 1
    # no match → created, and the reference points at the new resource
    q_url = urn()
    body = bundle(
        "transaction",
        entry("POST", "Consent", consent_for(q_url)),
        entry(
            "POST",
            "Patient",
            _with_identifier("cond-2", "Conditional"),
            full_url=q_url,
            ifNoneExist=f"identifier={IDENT_SYSTEM}|cond-2",
        ),
    )
    consent_entry, patient_entry = strict_response(
        post_bundle(client, body), "transaction-response"
    )["entry"]
    assert patient_entry["response"]["status"].startswith("201")
    new_id = patient_entry["resource"]["id"]
    assert new_id != existing["id"]
    assert consent_entry["resource"]["patient"]["reference"] == f"Patient/{new_id}"


def test_conditional_create_sees_deletes_in_same_transaction(client: TestClient) -> None:
    """DELETEs run before POSTs, so a conditional create whose only match is deleted by the
    same transaction creates a new resource, and references follow the new one."""
    old = create(client, _with_identifier("cond-del", "Deleted"))
    p_url = urn()
    body = bundle(
        "transaction",
        entry("POST", "Consent", consent_for(p_url)),
        entry(
            "POST",
            "Patient",
            _with_identifier("cond-del", "Deleted"),
            full_url=p_url,
            ifNoneExist=f"identifier={IDENT_SYSTEM}|cond-del",
        ),
        entry("DELETE", f"Patient/{old['id']}"),
    )
    consent_entry, patient_entry, _ = strict_response(
        post_bundle(client, body), "transaction-response"
    )["entry"]
    assert patient_entry["response"]["status"].startswith("201")
    new_id = split_location(patient_entry["response"]["location"])[1]
    assert new_id != old["id"]
    assert consent_entry["resource"]["patient"]["reference"] == f"Patient/{new_id}"
    assert client.get(f"/fhir/Patient/{new_id}").status_code == 200


def test_conditional_create_is_decided_before_any_post(client: TestClient) -> None:
    """A plain create earlier in the same transaction must not turn a conditional create into
    a "match" after links were already rewritten to the id it was going to get: every
    reference in the committed transaction must resolve."""
    p_url = urn()
    body = bundle(
        "transaction",
        entry("POST", "Patient", _with_identifier("same", "Plain")),
        entry(
            "POST",
            "Patient",
            _with_identifier("same", "Conditional"),
            full_url=p_url,
            ifNoneExist=f"identifier={IDENT_SYSTEM}|same",
        ),
        entry("POST", "Consent", consent_for(p_url)),
    )
    result = strict_response(post_bundle(client, body), "transaction-response")
    ref = result["entry"][2]["resource"]["patient"]["reference"]
    assert client.get(f"/fhir/{ref}").status_code == 200, ref
    assert ref == f"Patient/{result['entry'][1]['resource']['id']}"


def test_duplicate_conditional_creates_are_rejected(client: TestClient) -> None:
    """Two identical conditional creates in one transaction cannot both be honoured (the
    second would match the first only after links to it were rewritten)."""
    a, b = urn(), urn()
    ine = f"identifier={IDENT_SYSTEM}|dup-cond"
    body = bundle(
        "transaction",
        entry("POST", "Patient", _with_identifier("dup-cond", "A"), full_url=a, ifNoneExist=ine),
        entry("POST", "Patient", _with_identifier("dup-cond", "B"), full_url=b, ifNoneExist=ine),
        entry("POST", "Consent", consent_for(a)),
        entry("POST", "Consent", consent_for(b)),
    )
    outcome = strict_outcome(post_bundle(client, body), 400)
    assert "Bundle.entry[1]" in diagnostics(outcome)
    assert type_history_total(client, "Patient") == 0


def test_conditional_create_matching_a_resource_another_entry_changes_fails(
    client: TestClient,
) -> None:
    existing = create(client, _with_identifier("busy", "Busy"))
    body = bundle(
        "transaction",
        entry("PUT", f"Patient/{existing['id']}", dict(existing, active=False)),
        entry(
            "POST",
            "Patient",
            _with_identifier("busy", "Busy"),
            ifNoneExist=f"identifier={IDENT_SYSTEM}|busy",
        ),
    )
    outcome = strict_outcome(post_bundle(client, body), 400)
    assert "Bundle.entry[1]" in diagnostics(outcome)
    assert client.get(f"/fhir/Patient/{existing['id']}").json()["meta"]["versionId"] == "1"


def test_conditional_create_multiple_matches_fails_transaction(client: TestClient) -> None:
    create(client, _with_identifier("twice", "Many"))
    create(client, _with_identifier("twice", "Many"))
    body = bundle(
        "transaction",
        entry("POST", "Patient", patient("Collateral")),
        entry("POST", "Patient", _with_identifier("twice", "Many"), ifNoneExist="identifier=twice"),
    )
    outcome = strict_outcome(post_bundle(client, body), 412)
    assert "Bundle.entry[1]" in diagnostics(outcome)
    assert total(client, "Patient?family=Collateral") == 0


def test_conditional_create_bad_criteria_names_entry(client: TestClient) -> None:
    body = bundle(
        "transaction",
        entry("POST", "Patient", patient("Crit"), full_url=urn(), ifNoneExist="nonsense=1"),
    )
    outcome = strict_outcome(post_bundle(client, body), 400)
    assert "Bundle.entry[0]" in diagnostics(outcome)


def test_put_if_match(client: TestClient) -> None:
    existing = create(client, patient("Matcher"))
    pid = existing["id"]
    stale = bundle(
        "transaction",
        entry("POST", "Patient", patient("Bystander")),
        entry("PUT", f"Patient/{pid}", dict(existing, active=False), ifMatch='W/"2"'),
    )
    outcome = strict_outcome(post_bundle(client, stale), 412)
    assert "Bundle.entry[1]" in diagnostics(outcome)
    assert total(client, "Patient?family=Bystander") == 0
    ok = bundle(
        "transaction",
        entry("PUT", f"Patient/{pid}", dict(existing, active=False), ifMatch='W/"1"'),
    )
    put = strict_response(post_bundle(client, ok), "transaction-response")["entry"][0]
    assert put["response"]["status"].startswith("200")
    assert put["response"]["etag"] == 'W/"2"'
    assert put["response"]["location"] == f"Patient/{pid}/_history/2"
    garbage = bundle("transaction", entry("PUT", f"Patient/{pid}", existing, ifMatch="not-an-etag"))
    strict_outcome(post_bundle(client, garbage), 400)


# -- PATCH entries -------------------------------------------------------------------------


def test_patch_entries(client: TestClient) -> None:
    pid = create(client, patient("Patchy"))["id"]
    ops = [
        {"op": "replace", "path": "/gender", "value": "female"},
        {"op": "add", "path": "/active", "value": False},
    ]
    body = bundle("transaction", entry("PATCH", f"Patient/{pid}", patch_binary(ops)))
    patched = strict_response(post_bundle(client, body), "transaction-response")["entry"][0]
    assert patched["response"]["status"].startswith("200")
    assert patched["response"]["etag"] == 'W/"2"'
    assert patched["resource"]["gender"] == "female"
    assert patched["resource"]["active"] is False
    stored = client.get(f"/fhir/Patient/{pid}").json()
    assert stored["gender"] == "female"
    assert stored["meta"]["versionId"] == "2"
    # If-Match on a PATCH entry
    stale = bundle(
        "transaction", entry("PATCH", f"Patient/{pid}", patch_binary(ops), ifMatch='W/"1"')
    )
    strict_outcome(post_bundle(client, stale), 412)
    # a batch reports each bad patch on its own entry
    not_base64 = {"resourceType": "Binary", "contentType": PATCH_TYPE, "data": "%%%"}
    batch = bundle(
        "batch",
        entry("PATCH", f"Patient/{pid}", not_base64),
        entry("PATCH", f"Patient/{pid}", patch_binary(ops, "application/json")),
        entry("PATCH", f"Patient/{pid}", patient("NotBinary")),
        entry(
            "PATCH",
            f"Patient/{pid}",
            patch_binary([{"op": "test", "path": "/gender", "value": "male"}]),
        ),
        entry(
            "PATCH",
            f"Patient/{pid}",
            patch_binary([{"op": "replace", "path": "/id", "value": "x"}]),
        ),
        entry("PATCH", "Patient/missing", patch_binary(ops)),
        entry(
            "PATCH",
            f"Patient/{pid}",
            {"resourceType": "Binary", "contentType": PATCH_TYPE, "data": 5},
        ),
        entry("PATCH", f"Patient/{pid}", patch_binary({"op": "add"})),
    )
    results = strict_response(post_bundle(client, batch), "batch-response")["entry"]
    statuses = [e["response"]["status"].split()[0] for e in results]
    assert statuses == ["400", "400", "400", "422", "400", "404", "400", "400"]
    for e in results:
        StrictOutcome(e["response"]["outcome"], strict=True)
    assert client.get(f"/fhir/Patient/{pid}").json()["meta"]["versionId"] == "2"


# -- batch ---------------------------------------------------------------------------------


def test_batch_entries_succeed_and_fail_independently(client: TestClient) -> None:
    existing = create(client, patient("Batchy"))
    pid = existing["id"]
    gone = create(client, patient("Batchy"))
    client.delete(f"/fhir/Patient/{gone['id']}")
    body = bundle(
        "batch",
        entry("POST", "Patient", patient("BatchNew")),
        entry("POST", "Patient", patient("BatchBad", gender="robot")),
        entry("PUT", f"Patient/{pid}", dict(existing, active=False), ifMatch='W/"9"'),
        entry("PUT", f"Patient/{pid}", dict(existing, active=False)),
        entry("GET", "Patient/unknown-id"),
        entry("GET", f"Patient/{gone['id']}"),
        entry("GET", f"Patient/{pid}"),
        entry("GET", "Patient?family=BatchNew"),
        entry("DELETE", "Patient/never-existed"),
        entry("POST", "Patient/has-an-id", patient("BatchBad")),
        entry("GET", "Patient?_sort=nonsense"),
    )
    results = strict_response(post_bundle(client, body), "batch-response")["entry"]
    assert len(results) == 11
    statuses = [e["response"]["status"].split()[0] for e in results]
    assert statuses == ["201", "400", "412", "200", "404", "410", "200", "200", "204", "405", "400"]
    for e, status in zip(results, statuses, strict=True):
        if status.startswith(("4", "5")):
            outcome = e["response"]["outcome"]
            assert outcome["resourceType"] == "OperationOutcome"
            StrictOutcome(outcome, strict=True)
            assert "resource" not in e
    created = results[0]["resource"]
    assert results[0]["response"]["location"] == f"Patient/{created['id']}/_history/1"
    assert results[3]["response"]["etag"] == 'W/"2"'
    # successful entries were committed even though others failed; failed ones wrote nothing
    assert total(client, "Patient?family=BatchNew") == 1
    assert total(client, "Patient?family=BatchBad") == 0
    assert client.get(f"/fhir/Patient/{pid}").json()["meta"]["versionId"] == "2"
    assert results[6]["resource"]["id"] == pid
    assert results[7]["resource"]["type"] == "searchset"


def test_batch_does_not_resolve_placeholders_across_entries(client: TestClient) -> None:
    """Batch entries are independent (R4 http.html §3.1.0.11.1): a urn:uuid in one entry is
    not rewritten to another entry's id; an unresolvable placeholder fails that entry only."""
    p_url = urn()
    body = bundle(
        "batch",
        entry("POST", "Patient", patient("Solo"), full_url=p_url),
        entry("POST", "Consent", consent_for(p_url)),
    )
    first, second = strict_response(post_bundle(client, body), "batch-response")["entry"]
    assert first["response"]["status"].startswith("201")
    if second["response"]["status"].startswith("201"):
        assert second["resource"]["patient"]["reference"] == p_url
    else:
        assert second["response"]["status"].startswith("400")


# -- malformed bundles ----------------------------------------------------------------------

_POST_PATIENT = {"method": "POST", "url": "Patient"}

MALFORMED: list[tuple[str, Any]] = [
    ("not-a-bundle", {"resourceType": "Patient"}),
    ("no-resource-type", {"type": "batch"}),
    ("searchset", {"resourceType": "Bundle", "type": "searchset"}),
    ("collection", {"resourceType": "Bundle", "type": "collection"}),
    ("transaction-response", {"resourceType": "Bundle", "type": "transaction-response"}),
    ("no-type", {"resourceType": "Bundle"}),
    ("entry-not-array", {"resourceType": "Bundle", "type": "batch", "entry": {}}),
    ("entry-not-object", {"resourceType": "Bundle", "type": "batch", "entry": [1]}),
    (
        "entry-without-request",
        {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": patient("X")}]},
    ),
    (
        "request-not-object",
        bundle("batch", {"request": "POST Patient", "resource": patient("X")}),
    ),
    ("unsupported-method", bundle("batch", entry("FETCH", "Patient"))),
    ("method-not-string", bundle("batch", {"request": {"method": 1, "url": "Patient"}})),
    ("method-not-scalar", bundle("batch", {"request": {"method": ["GET"], "url": "Patient"}})),
    ("missing-method", bundle("batch", {"request": {"url": "Patient"}})),
    ("missing-url", bundle("batch", {"request": {"method": "GET"}})),
    ("url-not-string", bundle("batch", {"request": {"method": "GET", "url": 7}})),
    ("empty-url", bundle("transaction", entry("GET", ""))),
    ("unsupported-type", bundle("transaction", entry("GET", "Observation/1"))),
    ("unknown-type", bundle("transaction", entry("GET", "NotAType?x=1"))),
    ("other-server", bundle("batch", entry("GET", "https://elsewhere.example/fhir/Patient/1"))),
    ("instance-history", bundle("batch", entry("GET", "Patient/1/_history"))),
    ("too-deep", bundle("batch", entry("GET", "Patient/1/_history/1/x"))),
    ("post-missing-resource", bundle("transaction", entry("POST", "Patient"))),
    ("put-missing-resource", bundle("transaction", entry("PUT", "Patient/1"))),
    ("patch-missing-resource", bundle("transaction", entry("PATCH", "Patient/1"))),
    ("put-without-id", bundle("transaction", entry("PUT", "Patient", patient("X")))),
    ("delete-without-id", bundle("transaction", entry("DELETE", "Patient"))),
    ("conditional-delete", bundle("transaction", entry("DELETE", "Patient?name=x"))),
    ("resource-not-object", bundle("batch", {"request": _POST_PATIENT, "resource": [1]})),
    (
        "if-match-not-string",
        bundle("transaction", entry("PUT", "Patient/1", patient("X") | {"id": "1"}, ifMatch=1)),
    ),
    (
        "if-none-exist-not-string",
        bundle(
            "transaction",
            {"request": {**_POST_PATIENT, "ifNoneExist": ["x"]}, "resource": patient("X")},
        ),
    ),
]


@pytest.mark.parametrize(("name", "body"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_bundles_are_400(client: TestClient, name: str, body: Any) -> None:
    strict_outcome(post_bundle(client, body), 400)
    assert type_history_total(client, "Patient") == 0


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"{not json", FHIR_JSON, 400),
        (b"[]", FHIR_JSON, 400),
        (b"", FHIR_JSON, 400),
        (b'{"resourceType":"Bundle","type":"batch"}', {"content-type": "application/xml"}, 415),
        (
            b'{"resourceType":"Bundle","type":"batch"}',
            {"accept": "application/xml", "content-type": "application/fhir+json"},
            406,
        ),
    ],
)
def test_unparseable_bundle_requests(
    client: TestClient, content: bytes, headers: dict[str, str], status: int
) -> None:
    strict_outcome(client.post("/fhir", content=content, headers=headers), status)


# -- Prefer: return=minimal ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_prefer_return_minimal_omits_resources(client: TestClient, kind: str) -> None:
    existing = create(client, patient("Minimal"))
    body = bundle(
        kind,
        entry("POST", "Patient", patient("Minimal")),
        entry("PUT", f"Patient/{existing['id']}", dict(existing, active=False)),
        entry("GET", f"Patient/{existing['id']}"),
    )
    results = strict_response(
        post_bundle(client, body, Prefer="return=minimal"), f"{kind}-response"
    )["entry"]
    post, put, get = results
    for e in (post, put):
        assert "resource" not in e
        assert e["response"]["location"]
        assert e["response"]["etag"]
    assert post["response"]["status"].startswith("201")
    assert put["response"]["status"].startswith("200")
    assert get["resource"]["id"] == existing["id"]  # reads still return what they read
    full = strict_response(post_bundle(client, body), f"{kind}-response")["entry"]
    assert full[0]["resource"]["resourceType"] == "Patient"


# -- concurrency ----------------------------------------------------------------------------


def test_concurrent_transactions_from_two_threads(client: TestClient) -> None:
    shared = load_example("Organization-1")
    shared["id"] = "shared-org"
    assert (
        client.put("/fhir/Organization/shared-org", json=shared, headers=FHIR_JSON).status_code
        == 201
    )
    per_thread = 8
    responses: dict[str, list[Any]] = {"a": [], "b": []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(tag: str) -> None:
        try:
            start.wait(timeout=30)
            for i in range(per_thread):
                p_url = urn()
                org = dict(shared, name=f"{tag}-{i}")
                body = bundle(
                    "transaction",
                    entry("POST", "Patient", patient(f"Thread{tag}"), full_url=p_url),
                    entry("POST", "Consent", consent_for(p_url)),
                    entry("PUT", "Organization/shared-org", org),
                )
                responses[tag].append(post_bundle(client, body))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in responses]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    etags = []
    pairs = set()
    for tag, rs in responses.items():
        assert len(rs) == per_thread
        for r in rs:
            p, c, o = strict_response(r, "transaction-response")["entry"]
            assert c["resource"]["patient"]["reference"] == f"Patient/{p['resource']['id']}"
            assert p["resource"]["name"][0]["family"] == f"Thread{tag}"
            pairs.add((p["resource"]["id"], c["resource"]["id"]))
            etags.append(o["response"]["etag"])
    n = 2 * per_thread
    assert len(pairs) == n
    # every PUT got its own version: 2 … n+1, no duplicates, no gaps
    assert sorted(etags, key=lambda e: int(e[3:-1])) == [f'W/"{v}"' for v in range(2, n + 2)]
    assert total(client, "Patient?family=Threada") == per_thread
    assert total(client, "Patient?family=Threadb") == per_thread
    assert total(client, "Consent") == n
    org = client.get("/fhir/Organization/shared-org").json()
    assert org["meta"]["versionId"] == str(n + 1)
    hist = client.get(f"/fhir/Organization/shared-org/_history?_count={n + 5}").json()
    assert hist["total"] == n + 1
    assert [e["response"]["etag"] for e in hist["entry"]] == [
        f'W/"{v}"' for v in range(n + 1, 0, -1)
    ]
    # the last committed PUT is the current version
    assert org["name"] == hist["entry"][0]["resource"]["name"]


def test_concurrent_transactions_updating_the_same_resources_in_opposite_orders(
    client: TestClient,
) -> None:
    """Two clients each update A and B in one transaction, in opposite request orders. Row
    locks taken in request order would deadlock on PostgreSQL (one transaction aborted with a
    500); every transaction must commit and every version must be accounted for."""
    ids = ["lock-a", "lock-b"]
    for rid in ids:
        org = load_example("Organization-1") | {"id": rid}
        assert (
            client.put(f"/fhir/Organization/{rid}", json=org, headers=FHIR_JSON).status_code == 201
        )
    rounds = 15
    statuses: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(order: list[str]) -> None:
        try:
            start.wait(timeout=30)
            for i in range(rounds):
                body = bundle(
                    "transaction",
                    *(
                        entry(
                            "PUT",
                            f"Organization/{rid}",
                            load_example("Organization-1") | {"id": rid, "name": f"{order}{i}"},
                        )
                        for rid in order
                    ),
                )
                statuses.append(post_bundle(client, body).status_code)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(o,)) for o in (ids, ids[::-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert statuses == [200] * (2 * rounds)
    for rid in ids:
        current = client.get(f"/fhir/Organization/{rid}").json()
        assert current["meta"]["versionId"] == str(2 * rounds + 1)


def _concurrent_patches(client: TestClient, send: Callable[[str, list[Any]], int]) -> list[int]:
    """Four threads × 8 JSON Patches without If-Match on one Patient; the HTTP statuses."""
    rid = create(client, patient("Racer"))["id"]
    statuses: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(k: int) -> None:
        try:
            start.wait(timeout=30)
            for i in range(8):
                ops = [{"op": "add", "path": "/active", "value": (k + i) % 2 == 0}]
                statuses.append(send(rid, ops))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert client.get(f"/fhir/Patient/{rid}").json()["meta"]["versionId"] == str(
        1 + statuses.count(200)
    )
    return statuses


def test_concurrent_patch_entries_without_if_match_all_apply(client: TestClient) -> None:
    def send(rid: str, ops: list[Any]) -> int:
        body = bundle("batch", entry("PATCH", f"Patient/{rid}", patch_binary(ops)))
        result = strict_response(post_bundle(client, body), "batch-response")
        return int(result["entry"][0]["response"]["status"].split()[0])

    assert _concurrent_patches(client, send) == [200] * 32


def test_concurrent_rest_patches_without_if_match_all_apply(
    client: TestClient, db_url: str, request: pytest.FixtureRequest
) -> None:
    """PATCH is read-modify-write under the row lock: concurrent PATCHes sent without
    If-Match all apply (on PostgreSQL a lock-free read once turned some into spurious 412s)."""
    headers = {"content-type": PATCH_TYPE, "accept": "application/fhir+json"}

    def send(rid: str, ops: list[Any]) -> int:
        r = client.patch(f"/fhir/Patient/{rid}", content=json.dumps(ops), headers=headers)
        return int(r.status_code)

    assert _concurrent_patches(client, send) == [200] * 32
