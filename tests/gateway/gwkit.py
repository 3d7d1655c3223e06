"""Helpers of the gateway tests: real servers (``fhir-consent serve``) on loopback ports, the
upstream's data set, clinic systems with backend-services clients, and our store's rows."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import sqlalchemy as sa

from smart_on_fhir.client_auth import ASSERTION_TYPE, sign_client_assertion
from smart_on_fhir.keys import SigningKey

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hl7-r4-examples"
FHIR_JSON = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}
LOINC = "http://loinc.org"
ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"

#: the two patients (official examples) and the two clinics of the data set
PATIENT_A, PATIENT_B = "example", "f001"
CLINIC_A, CLINIC_B = "Organization/clinic-a", "Organization/clinic-b"
DOCS_PER_PATIENT = 25
#: types of the official examples loaded into the upstream (our server's supported types)
UPSTREAM_TYPES = (
    "Patient",
    "Organization",
    "Practitioner",
    "PractitionerRole",
    "RelatedPerson",
    "Encounter",
    "DocumentReference",
    "Provenance",
    "Task",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    """A ``fhir-consent serve`` process on a loopback port."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fhir(self) -> str:
        return f"{self.origin}/fhir"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def serve(args: Sequence[str], env: dict[str, str], cwd: Path, *, name: str) -> Server:
    """``python -m fhir_consent.cli serve …`` in ``cwd`` (key files land there)."""
    cwd.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = cwd / f"{name}.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")}
    clean["FHIR_CONSENT_LOG_LEVEL"] = "warning"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fhir_consent.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *args,
            ],
            env={**clean, **env},
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return Server(proc, port, log)
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()) from None
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{name} did not start: {log.read_text()[-2000:]}")


def example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def examples(types: Iterable[str]) -> list[dict[str, Any]]:
    wanted = set(types)
    out = []
    for path in sorted(FIXTURES.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("resourceType") in wanted and data.get("id"):
            out.append(data)
    return out


def document(patient: str, i: int, clinic: str) -> dict[str, Any]:
    """A generated DocumentReference of ``patient`` written at ``clinic``."""
    return {
        "resourceType": "DocumentReference",
        "id": f"gen-{patient}-{i:02d}",
        "status": "current",
        "type": {"coding": [{"system": LOINC, "code": "34133-9", "display": "Summary note"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "author": [{"reference": clinic}],
        "date": f"2024-02-{i + 1:02d}T09:00:00Z",
        "description": f"Visit note {i} at {clinic.split('/')[1]}",
        "content": [{"attachment": {"contentType": "text/plain", "title": f"note-{i}.txt"}}],
    }


def generated_documents() -> list[dict[str, Any]]:
    """Both patients' documents, interleaved (so every upstream page mixes them)."""
    out = []
    for i in range(DOCS_PER_PATIENT):
        out.append(document(PATIENT_A, i, CLINIC_A if i % 2 else CLINIC_B))
        out.append(document(PATIENT_B, i, CLINIC_B if i % 2 else CLINIC_A))
    return out


def grant(
    patient: str, organization: str, *, classes: Sequence[str] | None = None
) -> dict[str, Any]:
    """An active Consent of ``patient`` letting ``organization`` access their records
    (optionally only resources of ``classes``)."""
    provision: dict[str, Any] = {
        "actor": [
            {
                "role": {"coding": [{"system": PARTICIPATION, "code": "PRCP"}]},
                "reference": {"reference": organization},
            }
        ],
        "action": [{"coding": [{"system": ACTION, "code": "access"}]}],
    }
    if classes:
        provision["class"] = [{"system": RESOURCE_TYPES, "code": c} for c in classes]
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
        "policyRule": {"coding": [{"system": ACTCODE, "code": "OPTOUT"}]},
        "provision": provision,
    }


def load(http: httpx.Client, fhir: str, resources: Iterable[dict[str, Any]]) -> int:
    """PUT every resource into an open-access server; returns how many."""
    n = 0
    for resource in resources:
        r = http.put(
            f"{fhir}/{resource['resourceType']}/{resource['id']}",
            content=orjson.dumps(resource),
            headers=FHIR_JSON,
        )
        assert r.status_code in (200, 201), (resource["resourceType"], resource["id"], r.text)
        n += 1
    return n


def history_totals(http: httpx.Client, fhir: str, types: Iterable[str]) -> dict[str, int]:
    """``total`` of each type's ``_history`` (every version ever written)."""
    out = {}
    for t in types:
        r = http.get(f"{fhir}/{t}/_history", params={"_count": "1"}, headers=FHIR_JSON)
        assert r.status_code == 200, r.text
        out[t] = r.json()["total"]
    return out


@dataclass
class Clinic:
    """A clinic system: a backend-services client of our SMART server."""

    client_id: str
    key: SigningKey
    scope: str = "system/*.rs system/Consent.c"
    _token: tuple[str, float] | None = field(default=None, repr=False)

    def token(self, http: httpx.Client, token_url: str) -> str:
        if self._token is not None and self._token[1] > time.monotonic():
            return self._token[0]
        r = http.post(
            token_url,
            data={
                "grant_type": "client_credentials",
                "scope": self.scope,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": sign_client_assertion(
                    self.key, client_id=self.client_id, token_url=token_url
                ),
            },
        )
        assert r.status_code == 200, r.text
        token: str = r.json()["access_token"]
        self._token = (token, time.monotonic() + 200)
        return token


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "accept": "application/fhir+json"}


def ids(bundle: dict[str, Any], mode: str | None = None) -> list[str]:
    return [
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if mode is None or e.get("search", {}).get("mode") == mode
    ]


def audit_events(db_url: str) -> list[dict[str, Any]]:
    """Every AuditEvent in our store (read straight from the table)."""
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT content FROM resources WHERE res_type = 'AuditEvent' AND deleted = :no"
                ),
                {"no": False},
            ).scalars()
            # bytes on SQLite; PostgreSQL's JSONB column may come back already parsed
            return [r if isinstance(r, dict) else orjson.loads(r) for r in rows]
    finally:
        engine.dispose()


def empty_smart_tables(db_url: str) -> None:
    """Empty the authorization server's tables (not the store's: the shared PostgreSQL
    schema keeps them between tests; SQLite databases are fresh copies)."""
    from smart_on_fhir.tables import metadata as smart_metadata

    if db_url.startswith("postgresql"):
        engine = sa.create_engine(db_url, poolclass=sa.NullPool)
        with engine.begin() as conn:
            for table in reversed(smart_metadata.sorted_tables):
                conn.execute(table.delete())
        engine.dispose()


def wait_for(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def entity_refs(event: dict[str, Any]) -> set[str]:
    return {
        e["what"]["reference"]
        for e in event.get("entity", [])
        if isinstance(e.get("what"), dict) and "reference" in e["what"]
    }


def agent_client(event: dict[str, Any]) -> str | None:
    for agent in event.get("agent", []):
        ident = agent.get("who", {}).get("identifier", {})
        if ident.get("system") == "urn:fhir-consent:client":
            value: str = ident["value"]
            return value
    return None


def jwt_claims(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return data
