"""Real FHIR client libraries against a real uvicorn server on loopback (both DB backends).

* ``fhirpy`` (async, aiohttp): create, read, search following every ``next`` page, update,
  delete, read-after-delete.
* ``fhirclient`` (SMART on FHIR python client 4.x): discovers the server through
  ``GET /metadata``, then create / read / search with paging / update / delete / history /
  transaction. Its models are strict FHIR 4.0.1: any element, datatype or empty array the
  server returns that is not 4.0.1 makes it raise, which is what these tests want to catch.

fhirpy is driven with ``asyncio.run`` inside synchronous tests (no pytest-asyncio config).
"""

from __future__ import annotations

import asyncio
import importlib
import uuid
from typing import Any

import aiohttp
import pytest
import requests
from conftest import all_examples, load_example
from fhirclient import client as smart_client
from fhirclient.models.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhirclient.models.consent import Consent
from fhirclient.models.fhirabstractresource import FHIRAbstractResource
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRNotFoundException, FHIRServer
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound

pytestmark = pytest.mark.slow

# Official Patient examples used as templates (each one exercises different elements).
PATIENT_EXAMPLES = [n for n in all_examples() if n.startswith("Patient-")]


def patient_from_example(index: int, family: str) -> dict[str, Any]:
    """The index-th official Patient example, renamed so that searches are meaningful."""
    data = load_example(PATIENT_EXAMPLES[index % len(PATIENT_EXAMPLES)])
    data.pop("id", None)
    data.pop("meta", None)
    data["name"] = [{"use": "official", "family": family, "given": [f"G{index:02d}"]}]
    if index % 4 == 0:
        data.pop("birthDate", None)  # some without a sort value
        data.pop("_birthDate", None)
    else:
        data["birthDate"] = f"19{50 + index % 3}-0{1 + index % 2}-15"  # many ties
    return data


async def status_of(url: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"accept": "application/fhir+json"}) as r,
    ):
        body: dict[str, Any] = await r.json(content_type=None)
        return r.status, body


# -- fhirpy (async) -----------------------------------------------------------------------


async def _fhirpy_flow(base: str) -> None:
    fhir = AsyncFHIRClient(base)
    family = f"Paging{uuid.uuid4().hex[:6]}"
    n = 23
    created: dict[str, dict[str, Any]] = {}
    for i in range(n):
        res = fhir.resource("Patient", **patient_from_example(i, family))
        await res.create()
        assert res.id and res.id not in created
        assert res["meta"]["versionId"] == "1"
        created[res.id] = res.serialize()
    for i in range(3):  # noise that must not match
        await fhir.resource("Patient", **patient_from_example(i, "Unrelated")).create()

    # read
    some_id = next(iter(created))
    read = await fhir.reference("Patient", some_id).to_resource()
    assert read.id == some_id
    assert read["name"][0]["family"] == family
    by_id = await fhir.resources("Patient").search(_id=some_id).get()
    assert by_id.id == some_id

    # search: first page, total, count
    search = fhir.resources("Patient").search(family=family).limit(5)
    first = await search.fetch_raw()
    assert first["type"] == "searchset"
    assert first["total"] == n
    assert len(first["entry"]) == 5
    assert any(link["relation"] == "next" for link in first["link"])
    assert await search.count() == n
    assert len(await search.fetch()) == 5

    # every page, default order: nothing repeated, nothing skipped
    all_ids = [r.id for r in await search.fetch_all()]
    assert len(all_ids) == n
    assert set(all_ids) == set(created)

    # every page of a sorted search with ties and missing values (birthdate is absent on
    # some; given breaks ties): the exact expected order
    def sort_key(p: dict[str, Any]) -> tuple[int, str, str]:
        return (0 if "birthDate" in p else 1, p.get("birthDate", ""), p["name"][0]["given"][0])

    expected: list[str] = []
    for bd_group in sorted({sort_key(p)[:2] for p in created.values()}):
        group = [pid for pid, p in created.items() if sort_key(p)[:2] == bd_group]
        group.sort(key=lambda pid: created[pid]["name"][0]["given"][0], reverse=True)
        expected += group
    sorted_ids = [r.id for r in await search.sort("birthdate", "-given").limit(4).fetch_all()]
    assert sorted_ids == expected

    # updating resources already seen while paging neither repeats nor loses entries
    seen: list[str] = []
    async for res in search.limit(6):
        seen.append(res.id)
        if len(seen) == 6:
            for pid in seen[:2]:
                current = await fhir.reference("Patient", pid).to_resource()
                current["active"] = False
                await current.save()
    assert len(seen) == n
    assert set(seen) == set(created)

    # update
    target = await fhir.reference("Patient", some_id).to_resource()
    version = int(target["meta"]["versionId"])
    target["gender"] = "other"
    await target.save()
    assert target["meta"]["versionId"] == str(version + 1)
    again = await fhir.reference("Patient", some_id).to_resource()
    assert again["gender"] == "other"
    assert again["meta"]["versionId"] == str(version + 1)

    # delete, then read → 410 Gone (fhirpy raises ResourceNotFound for 404 and 410 alike)
    await again.delete()
    with pytest.raises(ResourceNotFound) as excinfo:
        await fhir.reference("Patient", some_id).to_resource()
    assert '"deleted"' in str(excinfo.value)  # OperationOutcome issue code of a 410
    status, outcome = await status_of(f"{base}/Patient/{some_id}")
    assert status == 410
    assert outcome["resourceType"] == "OperationOutcome"
    status, _ = await status_of(f"{base}/Patient/never-existed")
    assert status == 404
    with pytest.raises(ResourceNotFound):
        await fhir.reference("Patient", "never-existed").to_resource()

    # the deleted resource leaves the search, and paging still covers the rest
    assert await search.count() == n - 1
    remaining = [r.id for r in await search.limit(7).fetch_all()]
    assert sorted(remaining) == sorted(set(created) - {some_id})


def test_fhirpy_async_create_read_search_paging_update_delete(live_server: str) -> None:
    asyncio.run(_fhirpy_flow(live_server))


async def _fhirpy_transaction(base: str) -> None:
    fhir = AsyncFHIRClient(base)
    p_url = f"urn:uuid:{uuid.uuid4()}"
    consent = load_example("Consent-consent-example-basic")
    consent.pop("id")
    consent["patient"] = {"reference": p_url}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "POST", "url": "Consent"}, "resource": consent},
            {
                "fullUrl": p_url,
                "request": {"method": "POST", "url": "Patient"},
                "resource": patient_from_example(1, "Txn"),
            },
        ],
    }
    result = await fhir.execute("", method="post", data=bundle)
    assert result["type"] == "transaction-response"
    consent_entry, patient_entry = result["entry"]
    pid = patient_entry["resource"]["id"]
    assert consent_entry["resource"]["patient"]["reference"] == f"Patient/{pid}"
    found = await fhir.resources("Consent").search(patient=f"Patient/{pid}").fetch_all()
    assert [c.id for c in found] == [consent_entry["resource"]["id"]]


def test_fhirpy_transaction(live_server: str) -> None:
    asyncio.run(_fhirpy_transaction(live_server))


# -- fhirclient (SMART python client, strict 4.0.1 models) ----------------------------------


def smart_server(base: str) -> FHIRServer:
    """Discovery as fhirclient does it: GET /metadata, parsed as a strict 4.0.1
    CapabilityStatement. ``prepare()`` is True for an open server and False when the statement
    advertises SMART OAuth URIs (the app would then have to authorize); the live server runs
    with open access, so requests without a token are served either way."""
    smart = smart_client.FHIRClient(settings={"app_id": "fhir-consent-tests", "api_base": base})
    smart.prepare()
    server: FHIRServer = smart.server
    capability = server.capabilityStatement
    assert capability.fhirVersion == "4.0.1"
    assert capability.rest[0].mode == "server"
    if server.auth is not None and server.auth.auth_type == "oauth2":
        host = base.rsplit("/fhir", 1)[0]
        assert server.auth._authorize_uri.startswith(host)
        assert server.auth._token_uri.startswith(host)
    return server


def test_fhirclient_create_read_search_paging_update_delete(live_server: str) -> None:
    server = smart_server(live_server)
    family = f"Smart{uuid.uuid4().hex[:6]}"
    n = 12
    ids: list[str] = []
    for i in range(n):
        model = Patient(patient_from_example(i, family), strict=True)
        answer = model.create(server)
        assert answer is not None
        created = Patient(answer, strict=True)  # the server's answer parses as 4.0.1
        assert created.id and created.meta.versionId == "1"
        ids.append(created.id)
    assert len(set(ids)) == n

    # read
    read = Patient.read(ids[0], server)
    assert read.id == ids[0]
    assert read.name[0].family == family
    assert read.meta.lastUpdated is not None

    # search with paging: fhirclient follows Bundle.link[next] (absolute URLs on this host)
    search = Patient.where(struct={"family": family, "_count": "5"})
    pages = list(search.perform_iter(server))
    assert [len(p.entry or []) for p in pages] == [5, 5, 2]
    assert all(p.total == n and p.type == "searchset" for p in pages)
    found = [r.id for r in search.perform_resources_iter(server)]
    assert len(found) == n
    assert set(found) == set(ids)
    assert sorted(r.id for r in search.perform_resources(server)) == sorted(ids)
    by_given = Patient.where(struct={"family": family, "given": "G03"})
    assert [r.id for r in by_given.perform_resources_iter(server)] == [ids[3]]

    # update
    read.active = False
    answer = read.update(server)
    assert answer is not None
    updated = Patient(answer, strict=True)
    assert updated.active is False
    assert updated.meta.versionId == "2"
    assert Patient.read(ids[0], server).meta.versionId == "2"

    # delete: 204 without a body, so fhirclient returns None
    assert read.delete(server) is None
    # read after delete: 410 Gone. fhirclient maps only 401/403/404 to its own exceptions;
    # a 410 surfaces as requests' HTTPError carrying the response.
    with pytest.raises(requests.HTTPError) as excinfo:
        Patient.read(ids[0], server)
    assert excinfo.value.response is not None
    assert excinfo.value.response.status_code == 410
    assert excinfo.value.response.json()["issue"][0]["code"] == "deleted"
    with pytest.raises(FHIRNotFoundException):
        Patient.read("never-existed", server)

    # history of the deleted resource, as a strict 4.0.1 history Bundle
    history = Bundle.read_from(f"Patient/{ids[0]}/_history", server)
    assert history.type == "history"
    assert [e.request.method for e in history.entry] == ["DELETE", "PUT", "POST"]

    # the deleted resource leaves the search; paging still covers the rest
    rest = [r.id for r in search.perform_resources_iter(server)]
    assert sorted(rest) == sorted(ids[1:])


def test_fhirclient_transaction_and_include(live_server: str) -> None:
    server = smart_server(live_server)
    p_url = f"urn:uuid:{uuid.uuid4()}"
    consent = load_example("Consent-consent-example-basic")
    consent.pop("id")
    consent["patient"] = {"reference": p_url}
    transaction = Bundle(strict=True)
    transaction.type = "transaction"
    transaction.entry = []
    for full_url, resource in (
        (None, Consent(consent)),
        (p_url, Patient(patient_from_example(2, "Incl"))),
    ):
        entry = BundleEntry()
        entry.fullUrl = full_url
        entry.resource = resource
        entry.request = BundleEntryRequest({"method": "POST", "url": resource.resource_type})
        transaction.entry.append(entry)
    answer = transaction.create(server)  # fhirclient POSTs transaction Bundles to the base
    assert answer is not None
    response = Bundle(answer, strict=True)
    assert response.type == "transaction-response"
    assert [e.response.status for e in response.entry] == ["201 Created", "201 Created"]
    consent_id = response.entry[0].resource.id
    patient_id = response.entry[1].resource.id
    assert response.entry[0].resource.patient.reference == f"Patient/{patient_id}"

    search = Consent.where(struct={"patient": patient_id}).include("patient")
    results = list(search.perform_resources_iter(server))
    assert {(r.resource_type, r.id) for r in results} == {
        ("Consent", consent_id),
        ("Patient", patient_id),
    }


def test_fhirclient_round_trips_every_official_example(live_server: str) -> None:
    """Every official R4 example: parsed by fhirclient, created, read back and found by _id;
    each server answer goes through the strict 4.0.1 models."""
    server = smart_server(live_server)
    for name in all_examples():
        example = load_example(name)
        example.pop("id", None)
        rtype = example["resourceType"]
        module = importlib.import_module(f"fhirclient.models.{rtype.lower()}")
        cls: type[FHIRAbstractResource] = getattr(module, rtype)
        answer = cls(example, strict=True).create(server)
        assert answer is not None, name
        rid = cls(answer, strict=True).id
        assert cls.read(rid, server).id == rid, name
        found = [r.id for r in cls.where(struct={"_id": rid}).perform_resources_iter(server)]
        assert found == [rid], name
