"""Real HTTP (uvicorn on a loopback port, httpx clients) for the two end-to-end promises:

* :func:`test_full_story`: clinic system asks (proposed) → the patient sees the inquiry → the
  patient grants → the clinic reads the documents → the patient revokes → the clinic's next
  read and search are denied → the patient sees every step as AuditEvents (consent.md §2, §6).
* :func:`test_revocation_is_in_force_for_the_next_request_under_load`: readers hammer a
  document while the patient revokes; once the revocation's response is back (it has
  committed), no read or search that starts afterwards succeeds (consent.md §2.3).

Tokens: the bearer strings map to callers through the injected authenticator (``Caller.named``),
so these tests pin the consent layer over real HTTP independently of token issuance. With the
SMART server's fixtures, replace ``_bearer(name)`` by real access tokens for the same callers
(system client bound to Organization/clinic with ``system/*.cruds``; patient user ``story``
with ``patient/*.cruds``; hospital system bound to Organization/hospital).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from consent_kit import Caller, Env, LiveServer, document, inquiry, make_env

from fhir_consent.config import Settings

P = "Patient/story"
JSON = {"accept": "application/fhir+json", "content-type": "application/fhir+json"}


@pytest.fixture
def live(settings: Settings) -> Iterator[tuple[Env, LiveServer]]:
    with make_env(settings) as env:
        env.as_open()
        env.put({"resourceType": "Patient", "id": "story"})
        for org in ("clinic", "hospital"):
            env.put({"resourceType": "Organization", "id": org})
        env.caller.named.update(
            {
                "clinic": Caller.system("Organization/clinic"),
                "hospital": Caller.system("Organization/hospital"),
                "patient": Caller.patient("story"),
            }
        )
        with LiveServer(env.app) as server:
            yield env, server


def _bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {name}", **JSON}


def _log(http: httpx.Client, env: Env, want: int) -> list[dict[str, Any]]:
    """The patient's AuditEvents, oldest first, once at least ``want`` are stored."""
    deadline = time.monotonic() + 10
    while True:
        env.audit.flush()
        bundle = http.get(
            f"AuditEvent?patient={P}&_sort=date&_count=200", headers=_bearer("patient")
        ).json()
        events = [e["resource"] for e in bundle.get("entry", [])]
        if len(events) >= want or time.monotonic() > deadline:
            return events


def test_full_story(live: tuple[Env, LiveServer]) -> None:
    env, server = live
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        docs = []
        for title in ("discharge", "lab"):
            r = http.post(
                "DocumentReference",
                json=document(P, custodian="Organization/hospital", description=title),
                headers=_bearer("hospital"),
            )
            assert r.status_code == 201, r.text
            docs.append(r.json()["id"])

        # 1. the clinic's system asks
        ask = http.post(
            "Consent", json=inquiry(P, ["Organization/clinic"]), headers=_bearer("clinic")
        )
        assert ask.status_code == 201, ask.text
        cid = ask.json()["id"]
        assert (
            http.get(f"DocumentReference/{docs[0]}", headers=_bearer("clinic")).status_code == 404
        )

        # 2. the patient sees the inquiry, and who asked
        pending = http.get(
            f"Consent?patient={P}&status=proposed", headers=_bearer("patient")
        ).json()
        assert [e["resource"]["id"] for e in pending["entry"]] == [cid]
        asked_by = pending["entry"][0]["resource"]["extension"][0]["valueReference"]
        assert asked_by == {"reference": "Organization/clinic"}

        # 3. the patient grants
        consent = pending["entry"][0]["resource"] | {"status": "active"}
        r = http.put(f"Consent/{cid}", json=consent, headers=_bearer("patient"))
        assert r.status_code == 200, r.text

        # 4. the clinic reads the documents
        found = http.get(f"DocumentReference?patient={P}", headers=_bearer("clinic")).json()
        assert {e["resource"]["id"] for e in found["entry"]} == set(docs)
        for doc in docs:
            assert (
                http.get(f"DocumentReference/{doc}", headers=_bearer("clinic")).status_code == 200
            )

        # 5. the patient revokes
        consent = r.json() | {"status": "inactive"}
        assert (
            http.put(f"Consent/{cid}", json=consent, headers=_bearer("patient")).status_code == 200
        )

        # 6. the clinic's next read and search are denied
        assert (
            http.get(f"DocumentReference/{docs[0]}", headers=_bearer("clinic")).status_code == 404
        )
        after = http.get(f"DocumentReference?patient={P}", headers=_bearer("clinic")).json()
        assert after["total"] == 0 and "entry" not in after

        # 7. the patient sees every step
        events = _log(http, env, 8)
        steps = [
            (
                e["subtype"][0]["code"],
                e["outcome"],
                next(
                    (a["who"].get("reference") for a in e["agent"] if a.get("who")),
                    None,
                ),
            )
            for e in events
        ]
        clinic = "Organization/clinic"
        assert ("create", "0", clinic) in steps  # the inquiry
        updates = [s for s in steps if s[0] == "update"]
        assert len(updates) == 2  # grant, revocation
        reads = [s for s in steps if s[0] == "read" and s[2] == clinic]
        assert ("read", "0", clinic) in reads and ("read", "4", clinic) in reads
        searches = [s for s in steps if s[0] == "search-type" and s[2] == clinic]
        assert len(searches) == 2  # one disclosed both documents, the last disclosed nothing
        granted_reads = [
            e for e in events if e["subtype"][0]["code"] == "read" and e["outcome"] == "0"
        ]
        deciding = {
            x["what"]["reference"]
            for e in granted_reads
            for x in e.get("entity", [])
            if x.get("role", {}).get("code") == "13"
        }
        assert deciding == {f"Consent/{cid}/_history/2"}  # the granted version decided
        refused = next(e for e in events if e["outcome"] == "4")
        assert refused["outcomeDesc"].startswith("Access denied")


def test_revocation_is_in_force_for_the_next_request_under_load(
    live: tuple[Env, LiveServer],
) -> None:
    env, server = live  # every read audited, as on the server: the writer must not starve it
    assert env.app.state.fhir.audit is env.audit
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        r = http.post(
            "DocumentReference",
            json=document(P, custodian="Organization/hospital"),
            headers=_bearer("hospital"),
        )
        doc = r.json()["id"]
        granted = inquiry(P, ["Organization/clinic"], status="active")
        r = http.post("Consent", json=granted, headers=_bearer("patient"))
        assert r.status_code == 201, r.text
        consent = r.json()

    results: list[tuple[float, str, int]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def reader(kind: str) -> None:
        with httpx.Client(base_url=server.base + "/", timeout=10) as client:
            while not stop.is_set():
                started = time.monotonic()
                if kind == "read":
                    status = client.get(f"DocumentReference/{doc}", headers=_bearer("clinic"))
                    outcome = status.status_code
                else:
                    body = client.get(
                        f"DocumentReference?patient={P}", headers=_bearer("clinic")
                    ).json()
                    outcome = 200 if body.get("total") else 404
                with lock:
                    results.append((started, kind, outcome))

    threads = [
        threading.Thread(target=reader, args=("read" if i % 2 else "search",)) for i in range(8)
    ]
    for t in threads:
        t.start()
    time.sleep(0.4)
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        revoke = http.put(
            f"Consent/{consent['id']}",
            json=consent | {"status": "inactive"},
            headers=_bearer("patient"),
        )
        assert revoke.status_code == 200, revoke.text
    committed = time.monotonic()
    time.sleep(0.4)
    stop.set()
    for t in threads:
        t.join()

    before = [r for r in results if r[0] < committed]
    after = [r for r in results if r[0] > committed]
    assert any(r[2] == 200 for r in before), "readers were served before the revocation"
    assert len(after) >= 8, "readers kept reading after the revocation"
    assert all(r[2] == 404 for r in after), [r for r in after if r[2] != 404][:5]
