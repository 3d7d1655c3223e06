"""Gateway mode end to end (issue 9, scope 3): real servers on loopback, real tokens from our
SMART server, the upstream an independent instance of our own server in open mode.

Data: the official examples plus 25 generated DocumentReferences for each of two patients
(``example`` = A, ``f001`` = B), interleaved. Consents in our store: A grants clinic A
everything; B grants clinic A its Patient record only; clinic B has no grant at all."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import orjson
import pytest
import sqlalchemy as sa
from smart.kit import drive_pages, pkce_pair

from .conftest import PASSWORD, REDIRECT, World
from .gwkit import (
    DOCS_PER_PATIENT,
    FHIR_JSON,
    PATIENT_A,
    PATIENT_B,
    UPSTREAM_TYPES,
    agent_client,
    audit_events,
    bearer,
    entity_refs,
    free_port,
    grant,
    history_totals,
    ids,
    jwt_claims,
    serve,
    wait_for,
)

A_DOCS = {f"DocumentReference/gen-{PATIENT_A}-{i:02d}" for i in range(DOCS_PER_PATIENT)}
B_DOCS = {f"DocumentReference/gen-{PATIENT_B}-{i:02d}" for i in range(DOCS_PER_PATIENT)}


def _get(http: httpx.Client, url: str, token: str, **params: str) -> httpx.Response:
    return http.get(url, params=params or None, headers=bearer(token))


def _pages(http: httpx.Client, first: httpx.Response, token: str) -> list[dict[str, Any]]:
    """Follow ``next`` links from ``first``; every page."""
    assert first.status_code == 200, first.text
    pages = [first.json()]
    while True:
        nxt = [x["url"] for x in pages[-1].get("link", []) if x["relation"] == "next"]
        if not nxt:
            return pages
        r = http.get(nxt[0], headers=bearer(token))
        assert r.status_code == 200, r.text
        pages.append(r.json())
        assert len(pages) < 20


def _no_upstream_urls(world: World, body: Any) -> None:
    text = orjson.dumps(body).decode()
    assert world.upstream.origin not in text
    assert f":{world.upstream.port}" not in text


# -- a clinic with a grant --------------------------------------------------------------------


def test_clinic_with_grant_reads_through_the_gateway(world: World, http: httpx.Client) -> None:
    token = world.clinic_a.token(http, world.token_url)
    doc = f"gen-{PATIENT_A}-03"
    r = _get(http, f"{world.fhir}/DocumentReference/{doc}", token)
    assert r.status_code == 200, r.text
    direct = http.get(f"{world.upstream.fhir}/DocumentReference/{doc}", headers=FHIR_JSON)
    assert r.json() == direct.json()  # the upstream's record, unchanged
    assert r.headers["etag"] == direct.headers["etag"]
    assert r.headers["content-type"].startswith("application/fhir+json")
    r = _get(http, f"{world.fhir}/DocumentReference/{doc}/_history/1", token)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == doc
    assert _get(http, f"{world.fhir}/Patient/{PATIENT_A}", token).status_code == 200
    # B granted clinic A its Patient record only
    assert _get(http, f"{world.fhir}/Patient/{PATIENT_B}", token).status_code == 200
    r = _get(http, f"{world.fhir}/DocumentReference/gen-{PATIENT_B}-03", token)
    assert r.status_code == 404
    assert r.json()["resourceType"] == "OperationOutcome"


def test_clinic_with_grant_searches_and_pages(world: World, http: httpx.Client) -> None:
    token = world.clinic_a.token(http, world.token_url)
    pages = _pages(http, _get(http, f"{world.fhir}/DocumentReference", token, _count="10"), token)
    # re-paged: full pages until the end, whatever the upstream held in between
    assert [len(p.get("entry", [])) for p in pages] == [10, 10, 5]
    found = [ref for p in pages for ref in ids(p)]
    assert len(found) == len(set(found)) == DOCS_PER_PATIENT
    assert set(found) == A_DOCS
    assert "total" not in pages[0]  # not known without scanning everything
    for page in pages:
        _no_upstream_urls(world, page)
        for link in page["link"]:
            assert link["url"].startswith(f"{world.fhir}/DocumentReference?")
        for entry in page["entry"]:
            assert (
                entry["fullUrl"]
                == f"{world.fhir}/{entry['resource']['resourceType']}/" + (entry["resource"]["id"])
            )
    # a search that ends on its first page has an exact total
    r = _get(http, f"{world.fhir}/DocumentReference", token, patient=PATIENT_A, _count="100")
    assert r.json()["total"] == DOCS_PER_PATIENT
    assert set(ids(r.json())) == A_DOCS
    # _summary=count counts what the clinic may see
    r = _get(http, f"{world.fhir}/DocumentReference", token, _summary="count")
    assert r.status_code == 200, r.text
    assert r.json()["total"] == DOCS_PER_PATIENT
    assert "entry" not in r.json()
    # parameters reach the upstream: sorting and filtering
    r = _get(http, f"{world.fhir}/DocumentReference", token, _sort="-date", _count="5")
    dates = [e["resource"]["date"] for e in r.json()["entry"]]
    assert dates == sorted(dates, reverse=True) and len(dates) == 5
    r = _get(http, f"{world.fhir}/DocumentReference", token, date="ge2024-02-20")
    assert {e["resource"]["date"] >= "2024-02-20" for e in r.json()["entry"]} == {True}
    assert len(r.json()["entry"]) == 6
    # _elements is applied after the decision
    r = _get(http, f"{world.fhir}/DocumentReference", token, _elements="subject", _count="3")
    entry = r.json()["entry"][0]["resource"]
    assert "subject" in entry and "content" not in entry


def test_include_only_what_served_matches_pull_in(world: World, http: httpx.Client) -> None:
    token = world.clinic_a.token(http, world.token_url)
    r = _get(
        http,
        f"{world.fhir}/DocumentReference",
        token,
        _include="DocumentReference:subject",
        _count="50",
    )
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert set(ids(bundle, "match")) == A_DOCS
    # Patient B is visible to clinic A on its own, but only B's (hidden) documents name it:
    # including it would tell that hidden documents of B exist.
    assert ids(bundle, "include") == [f"Patient/{PATIENT_A}"]
    r = _get(
        http,
        f"{world.fhir}/DocumentReference",
        token,
        patient=PATIENT_B,
        _include="DocumentReference:subject",
    )
    assert r.json().get("entry", []) == []
    assert r.json()["total"] == 0


def test_only_known_search_parameters_reach_the_upstream(world: World, http: httpx.Client) -> None:
    """Chained and reverse-chained (``_has``) parameters could probe hidden records through
    the upstream: they are refused (strict) or dropped (lenient), as by a local search."""
    token = world.clinic_a.token(http, world.token_url)
    probe = {"_has:Provenance:target:agent": "Practitioner/x", "subject.name": "peter"}
    r = http.get(
        f"{world.fhir}/DocumentReference",
        params={**probe, "_count": "50"},
        headers={**bearer(token), "prefer": "handling=strict"},
    )
    assert r.status_code == 400, r.text
    r = http.get(
        f"{world.fhir}/DocumentReference", params={**probe, "_count": "50"}, headers=bearer(token)
    )
    assert r.status_code == 200, r.text
    assert set(ids(r.json())) == A_DOCS  # as if they had not been sent
    self_link = next(x["url"] for x in r.json()["link"] if x["relation"] == "self")
    assert "_has" not in self_link and "subject.name" not in self_link


# -- a clinic without a grant -----------------------------------------------------------------


def test_clinic_without_grant_gets_nothing(world: World, http: httpx.Client) -> None:
    token = world.clinic_b.token(http, world.token_url)
    hidden = _get(http, f"{world.fhir}/DocumentReference/gen-{PATIENT_A}-03", token)
    missing = _get(http, f"{world.fhir}/DocumentReference/no-such-doc", token)
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["issue"][0]["code"] == missing.json()["issue"][0]["code"]
    assert _get(http, f"{world.fhir}/Patient/{PATIENT_A}", token).status_code == 404
    assert (
        _get(
            http, f"{world.fhir}/DocumentReference/gen-{PATIENT_A}-03/_history/1", token
        ).status_code
        == 404
    )
    for params in (
        {},
        {"patient": PATIENT_A},
        {"_include": "DocumentReference:subject"},
        {"_count": "3"},
        {"_revinclude": "Provenance:target"},
    ):
        r = _get(http, f"{world.fhir}/DocumentReference", token, **params)
        assert r.status_code == 200, r.text
        bundle = r.json()
        assert bundle.get("entry", []) == [], params
        assert bundle["total"] == 0
        assert [x["relation"] for x in bundle["link"]] == ["self"]
        _no_upstream_urls(world, bundle)
    r = _get(http, f"{world.fhir}/DocumentReference", token, _summary="count")
    assert r.json()["total"] == 0
    r = _get(http, f"{world.fhir}/Patient", token)
    assert r.json().get("entry", []) == [] and r.json()["total"] == 0
    r = http.post(
        f"{world.fhir}/DocumentReference/_search",
        data={"patient": PATIENT_A},
        headers=bearer(token),
    )
    assert r.status_code == 200 and r.json().get("entry", []) == []
    assert r.json()["total"] == 0 and [x["relation"] for x in r.json()["link"]] == ["self"]
    _no_upstream_urls(world, r.json())


def test_paging_links_cannot_be_reused_or_forged(world: World, http: httpx.Client) -> None:
    a = world.clinic_a.token(http, world.token_url)
    b = world.clinic_b.token(http, world.token_url)
    first = _get(http, f"{world.fhir}/DocumentReference", a, _count="10").json()
    nxt = next(x["url"] for x in first["link"] if x["relation"] == "next")
    cursor = parse_qs(urlsplit(nxt).query)["_cursor"][0]
    # the link is opaque: no upstream address in it
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    assert b"127.0.0.1" not in raw and str(world.upstream.port).encode() not in raw
    # another requester cannot continue clinic A's search
    r = http.get(nxt, headers=bearer(b))
    assert r.status_code == 400
    assert r.json()["resourceType"] == "OperationOutcome"
    # nor can the cursor move to another search
    r = _get(
        http, f"{world.fhir}/DocumentReference", a, _count="10", patient=PATIENT_B, _cursor=cursor
    )
    assert r.status_code == 400
    # a forged or altered cursor is refused
    forged = cursor[:-4] + ("AAAA" if not cursor.endswith("AAAA") else "BBBB")
    assert (
        _get(http, f"{world.fhir}/DocumentReference", a, _count="10", _cursor=forged).status_code
        == 400
    )
    crafted = base64.urlsafe_b64encode(
        orjson.dumps({"u": f"{world.upstream.fhir}/Consent", "k": 0})
    ).decode()
    assert (
        _get(http, f"{world.fhir}/DocumentReference", a, _count="10", _cursor=crafted).status_code
        == 400
    )
    # the genuine link still works for clinic A
    assert http.get(nxt, headers=bearer(a)).status_code == 200


# -- audit ------------------------------------------------------------------------------------


def test_every_access_is_audited_in_our_store(world: World, http: httpx.Client) -> None:
    a = world.clinic_a.token(http, world.token_url)
    b = world.clinic_b.token(http, world.token_url)
    doc = f"DocumentReference/gen-{PATIENT_A}-07"
    assert _get(http, f"{world.fhir}/{doc}", a).status_code == 200
    assert _get(http, f"{world.fhir}/{doc}", b).status_code == 404
    r = _get(http, f"{world.fhir}/DocumentReference", a, patient=PATIENT_A, _count="4")
    served = set(ids(r.json()))
    assert len(served) == 4

    def find() -> tuple[Any, Any, Any] | None:
        events = audit_events(world.store_url)
        read_ok = [
            e
            for e in events
            if agent_client(e) == world.clinic_a.client_id
            and doc in entity_refs(e)
            and e["subtype"][0]["code"] == "read"
            and e["outcome"] == "0"
        ]
        refused = [
            e
            for e in events
            if agent_client(e) == world.clinic_b.client_id
            and doc in entity_refs(e)
            and e["outcome"] == "4"
        ]
        searched = [
            e
            for e in events
            if agent_client(e) == world.clinic_a.client_id
            and e["subtype"][0]["code"] == "search-type"
            and served <= entity_refs(e)
        ]
        if read_ok and refused and searched:
            return read_ok[0], refused[0], searched[0]
        return None

    read_ok, refused, searched = wait_for(find)
    # the patient the data belongs to is named, and the Consent that decided it
    assert f"Patient/{PATIENT_A}" in entity_refs(read_ok)
    assert any(ref.startswith("Consent/") for ref in entity_refs(read_ok))
    assert f"Patient/{PATIENT_A}" in entity_refs(refused)
    descriptions = [e.get("description", "") for e in searched["entity"]]
    assert any(d.startswith("DocumentReference?") for d in descriptions)
    # what was audited is about the upstream's data, stored in our store only
    r = http.get(
        f"{world.upstream.fhir}/AuditEvent", params={"_summary": "count"}, headers=FHIR_JSON
    )
    assert r.json()["total"] == 0


# -- the patient, and Consents in our store ---------------------------------------------------


def _patient_token(world: World, http: httpx.Client) -> str:
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": world.app_client,
        "redirect_uri": REDIRECT,
        "scope": "openid fhirUser launch/patient patient/*.rs patient/Consent.cu",
        "state": "s",
        "aud": world.fhir,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    first = http.get(f"{world.gateway.origin}/auth/authorize?{urlencode(params)}")
    last = drive_pages(http, first, username="peter", password=PASSWORD)
    code = parse_qs(urlsplit(last.headers["location"]).query)["code"][0]
    r = http.post(
        world.token_url,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
            "client_id": world.app_client,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["patient"] == PATIENT_A  # picked from the upstream-held record
    token: str = r.json()["access_token"]
    assert jwt_claims(token)["aud"] == world.fhir
    return token


def _count_rows(url: str, sql: str) -> int:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(sql)).scalar_one())
    finally:
        engine.dispose()


def test_patient_sees_own_records_and_keeps_consents_here(world: World, http: httpx.Client) -> None:
    token = _patient_token(world, http)
    assert _get(http, f"{world.fhir}/Patient/{PATIENT_A}", token).status_code == 200
    assert _get(http, f"{world.fhir}/Patient/{PATIENT_B}", token).status_code == 404
    r = _get(http, f"{world.fhir}/DocumentReference", token, _count="100")
    assert set(ids(r.json())) == A_DOCS  # the compartment: never B's
    assert (
        _get(http, f"{world.fhir}/DocumentReference/gen-{PATIENT_B}-01", token).status_code == 404
    )
    # a new Consent goes to our store (with its ledger entry), never to the upstream
    upstream_before = history_totals(http, world.upstream.fhir, ["Consent"])
    entries_before = _count_rows(world.store_url, "SELECT count(*) FROM ledger_outbox") + (
        _count_rows(world.store_url, "SELECT count(*) FROM ledger_entry")
    )
    body = grant(PATIENT_A, "Organization/clinic-c", classes=["Encounter"])
    r = http.post(
        f"{world.fhir}/Consent",
        content=orjson.dumps(body),
        headers={**bearer(token), "content-type": "application/fhir+json"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["location"].startswith(f"{world.fhir}/Consent/")
    cid = r.json()["id"]
    assert _get(http, f"{world.fhir}/Consent/{cid}", token).status_code == 200
    assert history_totals(http, world.upstream.fhir, ["Consent"]) == upstream_before
    entries_after = _count_rows(world.store_url, "SELECT count(*) FROM ledger_outbox") + (
        _count_rows(world.store_url, "SELECT count(*) FROM ledger_entry")
    )
    assert entries_after > entries_before


# -- the upstream is never modified -----------------------------------------------------------


def test_writes_are_refused_and_the_upstream_never_changes(
    world: World, http: httpx.Client
) -> None:
    before = history_totals(http, world.upstream.fhir, UPSTREAM_TYPES)
    assert before["DocumentReference"] == 2 * DOCS_PER_PATIENT + 1
    token = world.clinic_a.token(http, world.token_url)
    doc = {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": f"Patient/{PATIENT_A}"},
        "content": [{"attachment": {"contentType": "text/plain"}}],
    }
    write = {**bearer(token), "content-type": "application/fhir+json"}
    r = http.post(f"{world.fhir}/DocumentReference", content=orjson.dumps(doc), headers=write)
    assert r.status_code == 405, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    assert r.headers["allow"] == "GET"
    existing = http.get(f"{world.upstream.fhir}/DocumentReference/gen-{PATIENT_A}-01").json()
    r = http.put(
        f"{world.fhir}/DocumentReference/gen-{PATIENT_A}-01",
        content=orjson.dumps(existing),
        headers=write,
    )
    assert r.status_code == 405
    r = http.delete(f"{world.fhir}/DocumentReference/gen-{PATIENT_A}-01", headers=write)
    assert r.status_code == 405
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": doc, "request": {"method": "POST", "url": "DocumentReference"}}],
    }
    r = http.post(f"{world.fhir}", content=orjson.dumps(bundle), headers=write)
    assert r.status_code == 501, r.text
    # interactions the gateway does not forward are never served from our store
    for path in (
        "DocumentReference/_history",
        f"Patient/{PATIENT_A}/$everything",
        f"DocumentReference/gen-{PATIENT_A}-01/_history",
    ):
        r = _get(http, f"{world.fhir}/{path}", token)
        assert r.status_code == 501, (path, r.text)
    # reads and searches of every kind, then: the upstream holds exactly what it held
    for _ in range(2):
        _get(http, f"{world.fhir}/DocumentReference", token, _count="30")
        _get(http, f"{world.fhir}/DocumentReference/gen-{PATIENT_A}-01", token)
        _get(http, f"{world.fhir}/Patient", token, _summary="count")
    assert history_totals(http, world.upstream.fhir, UPSTREAM_TYPES) == before
    assert history_totals(http, world.upstream.fhir, ["Consent", "AuditEvent"]) == {
        "Consent": 0,
        "AuditEvent": 0,
    }


# -- the upstream down ------------------------------------------------------------------------


def test_upstream_down_is_503(world: World, http: httpx.Client) -> None:
    dead = f"http://127.0.0.1:{free_port()}/fhir"  # nothing listens there
    gateway = serve(
        ["--upstream", dead, "--database-url", world.store_url],
        {"FHIR_CONSENT_SMART_KEYS_DIR": str(world.keys)},
        world.root / "gateway-dead",
        name="gateway-dead",
    )
    try:
        token = world.clinic_a.token(http, f"{gateway.origin}/auth/token")
        world.clinic_a._token = None  # that token is for the other gateway's base
        for url in (
            f"{gateway.fhir}/DocumentReference/gen-{PATIENT_A}-01",
            f"{gateway.fhir}/DocumentReference?patient={PATIENT_A}",
        ):
            r = http.get(url, headers=bearer(token))
            assert r.status_code == 503, r.text
            outcome = r.json()
            assert outcome["resourceType"] == "OperationOutcome"
            assert outcome["issue"][0]["code"] == "transient"
            assert "127.0.0.1" not in r.text
        # the local parts keep working
        r = http.get(f"{gateway.fhir}/metadata", headers=FHIR_JSON)
        assert r.status_code == 200
    finally:
        gateway.stop()


@pytest.fixture(autouse=True)
def _fresh_tokens(world: World) -> None:
    """Tokens are cached per clinic within a test only (they live five minutes)."""
    world.clinic_a._token = None
    world.clinic_b._token = None
