"""Spec §2H (RFC 6750 negatives the kits do not cover) and the FHIR API's enforcement of
SMART scopes: 401 challenges, 403 OperationOutcomes, patient compartments, public
``/metadata``, and batch/transaction Bundles checked entry by entry like the requests they
stand for."""

from __future__ import annotations

import time

import pytest

from smart_on_fhir.keys import KeySet
from smart_on_fhir.tokens import issue_access_token
from smart_on_fhir.users import User

from .kit import FHIR, FHIR_JSON, World


def _forge(keys: KeySet, **overrides: object) -> str:
    claims: dict[str, object] = {
        "issuer": FHIR,
        "audience": FHIR,
        "subject": "someone",
        "client_id": "app",
        "scope": "system/*.cruds",
        "lifetime_s": 300,
        "now": int(time.time()),
        "jti": "forged",
    }
    claims.update(overrides)
    return issue_access_token(keys, **claims)  # type: ignore[arg-type]


def test_no_token_is_401_with_bearer_challenge(world: World, peter: tuple[str, User]) -> None:
    """G10 ``g10_unauthorized_access`` and RFC 6750 §3.1: no credentials, no error code."""
    pid, _ = peter
    for path in (f"Patient/{pid}", "Patient", f"Patient/{pid}/_history"):
        r = world.get(path, None)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer ")
        assert "error=" not in r.headers["www-authenticate"]
        assert r.json()["resourceType"] == "OperationOutcome"
    created = world.http.post(
        f"{FHIR}/Patient", json={"resourceType": "Patient"}, headers=FHIR_JSON
    )
    assert created.status_code == 401


@pytest.mark.parametrize(
    "case", ["garbage", "expired", "wrong audience", "wrong issuer", "other keys", "not bearer"]
)
def test_2h_39_invalid_token_is_401_invalid_token(
    world: World, peter: tuple[str, User], smart_keys_dir: str, case: str
) -> None:
    """39: an invalid, expired or wrong-audience token → 401 ``error="invalid_token"``."""
    pid, _ = peter
    keys = KeySet.load(smart_keys_dir)
    token = {
        "garbage": "not.a.token",
        "expired": _forge(keys, now=int(time.time()) - 4000, lifetime_s=600),
        "wrong audience": _forge(keys, audience="https://other.example/fhir"),
        "wrong issuer": _forge(keys, issuer="https://other.example/fhir"),
        "other keys": _forge(KeySet.generate(("RS256",))),
        "not bearer": None,
    }[case]
    if token is None:
        r = world.get(f"Patient/{pid}", None, headers={"authorization": "Basic dXNlcjpwYXNz"})
        assert r.status_code == 401
        return
    r = world.get(f"Patient/{pid}", token)
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
    assert token not in r.text and token not in challenge  # never echoed


def test_signed_but_never_issued_token_is_401(
    world: World, peter: tuple[str, User], smart_keys_dir: str
) -> None:
    """A correctly signed token with no row (never issued here) fails the per-request check."""
    pid, _ = peter
    token = _forge(KeySet.load(smart_keys_dir))
    r = world.get(f"Patient/{pid}", token)
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_2h_40_insufficient_scope_is_403(world: World, peter: tuple[str, User]) -> None:
    """40: a token whose scope is too narrow → 403 with an OperationOutcome."""
    pid, _ = peter
    client = world.add_client().client
    body = world.token(
        client.client_id, username="peter", scope="launch/patient patient/Patient.rs"
    )
    token = body["access_token"]
    assert world.get(f"Patient/{pid}", token).status_code == 200
    for method, path in (("GET", "DocumentReference"), ("DELETE", f"Patient/{pid}")):
        r = world.http.request(
            method, f"{FHIR}/{path}", headers={"authorization": f"Bearer {token}", **FHIR_JSON}
        )
        assert r.status_code == 403, (method, path)
        outcome = r.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "forbidden"
    write = world.http.put(
        f"{FHIR}/Patient/{pid}",
        json={"resourceType": "Patient", "id": pid},
        headers={"authorization": f"Bearer {token}", **FHIR_JSON},
    )
    assert write.status_code == 403


def test_patient_token_is_confined_to_its_compartment(
    world: World, peter: tuple[str, User]
) -> None:
    """Issue 3 §5: ``patient/`` tokens see only their patient (searches narrowed, reads of
    other patients 403/404)."""
    pid, _ = peter
    other = world.add_patient("Other", "Olga")
    mine = world.add_resource(
        {
            "resourceType": "DocumentReference",
            "status": "current",
            "subject": {"reference": f"Patient/{pid}"},
            "content": [{"attachment": {"contentType": "text/plain", "data": "aGk="}}],
        }
    )
    world.add_resource(
        {
            "resourceType": "DocumentReference",
            "status": "current",
            "subject": {"reference": f"Patient/{other}"},
            "content": [{"attachment": {"contentType": "text/plain", "data": "aGk="}}],
        }
    )
    client = world.add_client().client
    token = world.token(client.client_id, username="peter")["access_token"]
    assert world.get(f"Patient/{other}", token).status_code in (403, 404)
    patients = world.get("Patient", token).json()
    assert [e["resource"]["id"] for e in patients.get("entry", [])] == [pid]
    docs = world.get("DocumentReference", token).json()
    assert [e["resource"]["id"] for e in docs.get("entry", [])] == [mine]


def test_metadata_and_discovery_stay_public(world: World) -> None:
    assert world.get("metadata", None).status_code == 200
    assert world.http.get(f"{FHIR}/.well-known/smart-configuration").status_code == 200


def test_fhir_api_cors_for_registered_origins(world: World, peter: tuple[str, User]) -> None:
    """SMART app-launch CORS: the FHIR API answers browsers from registered origins only;
    preflights are answered without a token."""
    pid, _ = peter
    client = world.add_client().client
    token = world.token(client.client_id, username="peter")["access_token"]
    ok = world.get(f"Patient/{pid}", token, headers={"origin": "https://app.example.org"})
    assert ok.headers["access-control-allow-origin"] == "https://app.example.org"
    assert "WWW-Authenticate" in ok.headers["access-control-expose-headers"]
    evil = world.get(f"Patient/{pid}", token, headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in evil.headers
    pre = world.http.options(
        f"{FHIR}/Patient/{pid}",
        headers={
            "origin": "https://app.example.org",
            "access-control-request-method": "GET",
            "access-control-request-headers": "authorization",
        },
    )
    assert pre.status_code == 204
    assert "Authorization" in pre.headers["access-control-allow-headers"]


# -- batch and transaction Bundles are checked entry by entry -------------------------------


def test_bundle_without_token_is_401(world: World) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "request": {"method": "POST", "url": "Patient"},
                "resource": {"resourceType": "Patient"},
            }
        ],
    }
    r = world.http.post(f"{FHIR}", json=bundle, headers=FHIR_JSON)
    assert r.status_code == 401


def test_bundle_entries_are_checked_per_scope(world: World, peter: tuple[str, User]) -> None:
    pid, _ = peter
    client = world.add_client().client
    token = world.token(
        client.client_id, username="peter", scope="launch/patient patient/Patient.rs"
    )["access_token"]
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "DELETE", "url": f"Patient/{pid}"}}],
    }
    r = world.http.post(
        f"{FHIR}", json=bundle, headers={"authorization": f"Bearer {token}", **FHIR_JSON}
    )
    assert r.status_code == 200
    assert r.json()["entry"][0]["response"]["status"].startswith("403")
    assert world.get(f"Patient/{pid}", token).status_code == 200


def _peter_token(world: World, scope: str) -> tuple[str, str]:
    """``(client_id, access token)`` of Peter's login through a new app, for ``scope``."""
    client = world.add_client(scope=scope).client
    token: str = world.token(client.client_id, username="peter", scope=scope)["access_token"]
    return client.client_id, token


def _post_bundle(world: World, token: str, bundle: dict[str, object]) -> dict[str, object]:
    r = world.http.post(
        f"{FHIR}", json=bundle, headers={"authorization": f"Bearer {token}", **FHIR_JSON}
    )
    assert r.status_code in (200, 403), r.text
    return {"status": r.status_code, **r.json()}


def test_transaction_with_one_forbidden_entry_writes_nothing(
    world: World, peter: tuple[str, User]
) -> None:
    pid, _ = peter
    _, token = _peter_token(world, "launch/patient patient/Patient.rus")
    before = world.get(f"Patient/{pid}", token).json()["meta"]["versionId"]
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "request": {"method": "PUT", "url": f"Patient/{pid}"},
                "resource": {"resourceType": "Patient", "id": pid, "gender": "male"},
            },
            {  # no scope allows creating a Practitioner
                "request": {"method": "POST", "url": "Practitioner"},
                "resource": {"resourceType": "Practitioner"},
            },
        ],
    }
    out = _post_bundle(world, token, transaction)
    assert out["status"] == 403 and out["resourceType"] == "OperationOutcome"
    assert "Bundle.entry[1]" in str(out["issue"])
    after = world.get(f"Patient/{pid}", token).json()
    assert after["meta"]["versionId"] == before and "gender" not in after


def test_batch_search_entries_stay_in_the_patients_compartment(
    world: World, peter: tuple[str, User]
) -> None:
    pid, _ = peter
    other = world.add_patient(family="Other")
    _, token = _peter_token(world, "launch/patient patient/Patient.rs")
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "Patient"}},
            {"request": {"method": "GET", "url": f"Patient/{other}"}},
            {"request": {"method": "GET", "url": f"Patient/{pid}"}},
        ],
    }
    out = _post_bundle(world, token, batch)
    search, foreign, own = out["entry"]  # type: ignore[misc]
    assert search["resource"]["total"] == 1
    assert [e["resource"]["id"] for e in search["resource"]["entry"]] == [pid]
    assert foreign["response"]["status"][:3] in ("403", "404")
    assert "resource" not in foreign
    assert own["response"]["status"].startswith("200") and own["resource"]["id"] == pid


def test_a_revoked_token_cannot_run_a_bundle(world: World, peter: tuple[str, User]) -> None:
    pid, _ = peter
    client_id, token = _peter_token(world, "launch/patient patient/Patient.rs")
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": f"Patient/{pid}"}}],
    }
    assert _post_bundle(world, token, batch)["entry"][0]["response"]["status"].startswith("200")  # type: ignore[index]
    revoked = world.http.post(
        f"{FHIR.rsplit('/', 1)[0]}/auth/revoke",
        data={"token": token, "client_id": client_id},
    )
    assert revoked.status_code == 200
    out = _post_bundle(world, token, batch)
    assert out["entry"][0]["response"]["status"].startswith("401")  # type: ignore[index]
    assert "resource" not in out["entry"][0]  # type: ignore[index]


def test_audit_events_cannot_be_written_in_a_bundle(
    world: World, peter: tuple[str, User]
) -> None:
    pid, _ = peter
    _, token = _peter_token(world, "launch/patient patient/*.cruds")
    forged = {
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
        "recorded": "2015-06-01T00:00:00Z",
        "agent": [{"who": {"reference": f"Patient/{pid}"}, "requestor": True}],
        "source": {"observer": {"display": "forged"}},
        "entity": [{"what": {"reference": f"Patient/{pid}"}}],
    }
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "POST", "url": "AuditEvent"}, "resource": forged}],
    }
    out = _post_bundle(world, token, batch)
    assert out["entry"][0]["response"]["status"].startswith("403")  # type: ignore[index]
    direct = world.http.post(
        f"{FHIR}/AuditEvent",
        json=forged,
        headers={"authorization": f"Bearer {token}", **FHIR_JSON},
    )
    assert direct.status_code == 403
    found = world.get("AuditEvent?source=forged", token)
    assert all(
        e["resource"]["source"]["observer"].get("display") != "forged"
        for e in found.json().get("entry", [])
    )
