"""Writes through the gateway where configured (``--forward-writes DocumentReference``).

A create needs the scope (and, for patient tokens, the compartment); changing an existing
upstream record is the consent action ``correct`` (consent.md §3.3): A grants clinic A
``access`` and ``correct``, B grants it ``access`` only, clinic B has nothing. Every
forwarded write is audited in our store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient

from fhir_consent.app import create_app
from fhir_consent.config import Settings
from fhir_consent.store.db import Database
from smart_on_fhir.clients import create_client
from smart_on_fhir.keys import KeySet, generate_signing_key

from .gwkit import (
    ACTION,
    CLINIC_A,
    CLINIC_B,
    FHIR_JSON,
    PATIENT_A,
    PATIENT_B,
    Clinic,
    Server,
    agent_client,
    audit_events,
    bearer,
    document,
    empty_smart_tables,
    example,
    grant,
    load,
    serve,
    wait_for,
)


@dataclass
class Writable:
    upstream: Server
    gateway: Server
    store_url: str
    clinic_a: Clinic
    clinic_b: Clinic


def _grant_with_correct(patient: str, organization: str) -> dict[str, object]:
    body = grant(patient, organization)
    body["provision"]["action"].append(  # type: ignore[index]
        {"coding": [{"system": ACTION, "code": "correct"}]}
    )
    return body


@pytest.fixture
def writable(db_url: str, tmp_path: Path) -> Iterator[Writable]:
    empty_smart_tables(db_url)
    upstream = serve(
        [],
        {
            "FHIR_CONSENT_DATABASE_URL": f"sqlite:///{tmp_path / 'upstream.sqlite3'}",
            "FHIR_CONSENT_OPEN_ACCESS": "true",
        },
        tmp_path / "upstream",
        name="upstream",
    )
    gateway: Server | None = None
    try:
        with httpx.Client(timeout=30) as http:
            load(http, upstream.fhir, [example("Patient-example"), example("Patient-f001")])
            load(
                http,
                upstream.fhir,
                [document(PATIENT_A, 0, CLINIC_A), document(PATIENT_B, 0, CLINIC_A)],
            )
        keys = tmp_path / "keys"
        KeySet.generate().save(keys)
        cwd = tmp_path / "gateway"
        cwd.mkdir()
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(cwd)
            app = create_app(
                Settings(
                    database_url=db_url,
                    auto_migrate=False,
                    open_access=True,
                    smart_keys_dir=str(keys),
                )
            )
            with TestClient(app, base_url="https://seed.test") as c:
                for body in (_grant_with_correct(PATIENT_A, CLINIC_A), grant(PATIENT_B, CLINIC_A)):
                    r = c.post("/fhir/Consent", json=body, headers=FHIR_JSON)
                    assert r.status_code == 201, r.text
        clinics = []
        db = Database(db_url, pool_size=1)
        try:
            with db.write() as conn:
                for org in (CLINIC_A, CLINIC_B):
                    key = generate_signing_key("ES384")
                    created = create_client(
                        conn,
                        client_name=org,
                        client_type="confidential-asymmetric",
                        scope="system/*.rs system/*.cud",
                        jwks={"keys": [dict(key.as_dict(private=False))]},
                        organization=org,
                        now=int(time.time()),
                    )
                    clinics.append(
                        Clinic(created.client.client_id, key, "system/*.rs system/*.cud")
                    )
        finally:
            db.dispose()
        gateway = serve(
            [
                "--upstream",
                upstream.fhir,
                "--database-url",
                db_url,
                "--forward-writes",
                "DocumentReference",
            ],
            {"FHIR_CONSENT_SMART_KEYS_DIR": str(keys)},
            cwd,
            name="gateway",
        )
        yield Writable(upstream, gateway, db_url, clinics[0], clinics[1])
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()


def _write_headers(token: str, **extra: str) -> dict[str, str]:
    return {**bearer(token), "content-type": "application/fhir+json", **extra}


def test_configured_writes_are_forwarded_with_consent(writable: Writable) -> None:
    w = writable
    up = w.upstream.fhir
    with httpx.Client(timeout=30) as http:
        a = w.clinic_a.token(http, f"{w.gateway.origin}/auth/token")
        b = w.clinic_b.token(http, f"{w.gateway.origin}/auth/token")
        # create: forwarded; Location names us, not the upstream
        new = {
            "resourceType": "DocumentReference",
            "status": "current",
            "subject": {"reference": f"Patient/{PATIENT_A}"},
            "content": [{"attachment": {"contentType": "text/plain"}}],
        }
        r = http.post(
            f"{w.gateway.fhir}/DocumentReference",
            content=orjson.dumps(new),
            headers=_write_headers(a),
        )
        assert r.status_code == 201, r.text
        created = r.json()["id"]
        assert r.headers["location"] == (f"{w.gateway.fhir}/DocumentReference/{created}/_history/1")
        assert http.get(f"{up}/DocumentReference/{created}").status_code == 200

        # update and patch of A's record (granted access + correct)
        doc_a = http.get(f"{up}/DocumentReference/gen-{PATIENT_A}-00").json()
        doc_a["description"] = "corrected through the gateway"
        r = http.put(
            f"{w.gateway.fhir}/DocumentReference/gen-{PATIENT_A}-00",
            content=orjson.dumps(doc_a),
            headers=_write_headers(a),
        )
        assert r.status_code == 200, r.text
        assert r.json()["meta"]["versionId"] == "2"
        patch = [{"op": "replace", "path": "/description", "value": "patched"}]
        r = http.patch(
            f"{w.gateway.fhir}/DocumentReference/gen-{PATIENT_A}-00",
            content=orjson.dumps(patch),
            headers={
                **bearer(a),
                "content-type": "application/json-patch+json",
                "if-match": 'W/"2"',
            },
        )
        assert r.status_code == 200, r.text
        upstream_a = http.get(f"{up}/DocumentReference/gen-{PATIENT_A}-00").json()
        assert upstream_a["description"] == "patched"
        assert upstream_a["meta"]["versionId"] == "3"

        # B granted access only: no correction; clinic B has nothing at all
        doc_b = http.get(f"{up}/DocumentReference/gen-{PATIENT_B}-00").json()
        doc_b["description"] = "must not be written"
        r = http.put(
            f"{w.gateway.fhir}/DocumentReference/gen-{PATIENT_B}-00",
            content=orjson.dumps(doc_b),
            headers=_write_headers(a),
        )
        assert r.status_code == 404, r.text
        assert (
            http.get(
                f"{w.gateway.fhir}/DocumentReference/gen-{PATIENT_B}-00", headers=bearer(a)
            ).status_code
            == 200
        )  # it can still read it
        r = http.put(
            f"{w.gateway.fhir}/DocumentReference/gen-{PATIENT_A}-00",
            content=orjson.dumps(upstream_a),
            headers=_write_headers(b),
        )
        assert r.status_code == 404
        r = http.delete(f"{w.gateway.fhir}/DocumentReference/gen-{PATIENT_A}-00", headers=bearer(b))
        assert r.status_code == 404
        assert (
            http.get(f"{up}/DocumentReference/gen-{PATIENT_B}-00").json()["meta"]["versionId"]
            == "1"
        )
        assert (
            http.get(f"{up}/DocumentReference/gen-{PATIENT_A}-00").json()["meta"]["versionId"]
            == "3"
        )

        # delete, forwarded
        r = http.delete(f"{w.gateway.fhir}/DocumentReference/{created}", headers=bearer(a))
        assert r.status_code == 204, r.text
        assert http.get(f"{up}/DocumentReference/{created}").status_code == 410

        # types not configured for writes stay refused
        patient = http.get(f"{up}/Patient/{PATIENT_A}").json()
        r = http.put(
            f"{w.gateway.fhir}/Patient/{PATIENT_A}",
            content=orjson.dumps(patient),
            headers=_write_headers(a),
        )
        assert r.status_code == 405

    def audited() -> set[tuple[str, str]] | None:
        found = {
            (e["subtype"][0]["code"], e["outcome"])
            for e in audit_events(w.store_url)
            if agent_client(e) == w.clinic_a.client_id
        }
        wanted = {("create", "0"), ("update", "0"), ("patch", "0"), ("delete", "0")}
        return found if wanted <= found else None

    assert wait_for(audited)
