"""Shared helpers of the consent enforcement tests: an app with the consent layer installed, a
settable clock, a switchable caller (injected authenticator, as tests/fhir/test_visibility.py
does; bearer names map to callers for real-HTTP tests), resource builders, and a uvicorn server
running the app in-process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from conftest import FHIR_JSON
from fastapi import FastAPI
from fastapi.testclient import TestClient
from livekit import LiveServer
from starlette.requests import Request

from fhir_consent.app import create_core_app
from fhir_consent.auth import AccessContext
from fhir_consent.config import Settings
from fhir_consent.consent.auditing import ConsentAuditSink
from fhir_consent.consent.config import ConsentSettings
from fhir_consent.consent.workflow import ConsentLayer, install
from fhir_consent.errors import Unauthorized
from smart_on_fhir.scopes import parse_scopes

__all__ = [
    "ACTCODE",
    "ACTION",
    "ACT_REASON",
    "CONF",
    "FHIR_JSON",
    "LOINC",
    "PARTICIPATION",
    "ROLECODE",
    "Caller",
    "Clock",
    "Env",
    "LiveServer",
    "document",
    "ids",
    "inquiry",
    "make_env",
    "us",
]

ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
LOINC = "http://loinc.org"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ROLECODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"


def us(text: str) -> int:
    """Epoch microseconds of an ISO instant ending in Z (or a date: midnight UTC)."""
    if "T" not in text:
        text += "T00:00:00Z"
    dt = datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    return int(dt.timestamp() * 1_000_000)


class Clock:
    """The app's clock: real time unless a test pins it."""

    def __init__(self) -> None:
        self.pinned: int | None = None

    def __call__(self) -> int:
        return self.pinned if self.pinned is not None else time.time_ns() // 1000

    def set(self, text: str | None) -> None:
        self.pinned = None if text is None else us(text)


class Caller:
    """Who the app thinks is calling: the current caller, or a named one when the request
    carries ``Authorization: Bearer <name>`` (real-HTTP tests)."""

    def __init__(self) -> None:
        self.access = AccessContext(scopes=None)
        self.named: dict[str, AccessContext] = {}

    async def __call__(self, request: Request) -> AccessContext:
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer "):
            found = self.named.get(header[len("Bearer ") :])
            if found is None:
                raise Unauthorized("unknown test token")
            return found
        return self.access

    def open(self) -> None:
        self.access = AccessContext(scopes=None)

    def be(self, access: AccessContext) -> None:
        self.access = access

    @staticmethod
    def practitioner(
        pid: str,
        *,
        scopes: str = "user/*.cruds",
        organization: str | None = None,
        purposes: frozenset[str] = frozenset({"TREAT"}),
    ) -> AccessContext:
        return AccessContext(
            scopes=parse_scopes(scopes),
            fhir_user=f"Practitioner/{pid}",
            client_id="ehr",
            client_organization=organization,
            purpose_of_use=purposes,
        )

    @staticmethod
    def system(organization: str, scopes: str = "system/*.cruds") -> AccessContext:
        return AccessContext(
            scopes=parse_scopes(scopes), client_id="clinic-system", client_organization=organization
        )

    @staticmethod
    def patient(pid: str, scopes: str = "patient/*.cruds") -> AccessContext:
        return AccessContext(
            scopes=parse_scopes(scopes), patient=pid, fhir_user=f"Patient/{pid}", client_id="app"
        )

    @staticmethod
    def user(fhir_user: str, scopes: str = "user/*.cruds") -> AccessContext:
        return AccessContext(scopes=parse_scopes(scopes), fhir_user=fhir_user, client_id="app")


@dataclass
class Env:
    """An app with the consent layer, its test client, clock, caller and audit sink."""

    app: FastAPI
    c: TestClient
    clock: Clock
    caller: Caller
    layer: ConsentLayer
    audit: ConsentAuditSink

    def post(self, resource: dict[str, Any]) -> str:
        r = self.c.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR_JSON)
        assert r.status_code == 201, r.text
        rid: str = r.json()["id"]
        return rid

    def put(self, resource: dict[str, Any]) -> dict[str, Any]:
        r = self.c.put(
            f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource, headers=FHIR_JSON
        )
        assert r.status_code in (200, 201), r.text
        body: dict[str, Any] = r.json()
        return body

    def get(self, path: str, **headers: str) -> Any:
        return self.c.get(f"/fhir/{path}", headers={"accept": "application/fhir+json", **headers})

    def as_open(self) -> None:
        self.caller.open()


@contextmanager
def make_env(settings: Settings, consent: ConsentSettings | None = None) -> Iterator[Env]:
    clock = Clock()
    app = create_core_app(settings, clock=clock)
    caller = Caller()
    ctx = app.state.fhir
    ctx.authenticate = caller
    layer = install(ctx, consent or ConsentSettings(break_glass=False))
    sink = ConsentAuditSink(ctx.db, flush_interval=0.02)
    ctx.audit = sink
    sink.start()
    try:
        with TestClient(app, base_url="https://testserver") as c:
            yield Env(app, c, clock, caller, layer, sink)
    finally:
        sink.stop()


def ids(bundle: dict[str, Any], mode: str | None = None) -> set[str]:
    """``Type/id`` of a Bundle's entries (optionally only search mode ``match``/``include``)."""
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if mode is None or e.get("search", {}).get("mode") == mode
    }


def document(
    patient: str,
    *,
    custodian: str | None = None,
    content_type: str = "application/pdf",
    **more: Any,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": patient},
        "content": [{"attachment": {"contentType": content_type}}],
        **more,
    }
    if custodian is not None:
        doc["custodian"] = {"reference": custodian}
    return doc


def inquiry(
    patient: str,
    recipients: list[str],
    *,
    start: str = "2015-01-01",
    end: str = "2030-12-31",
    status: str = "proposed",
    classes: list[str] | None = None,
) -> dict[str, Any]:
    """A clinic's inquiry (consent.md §2.1): OPTOUT, one root provision naming the clinic."""
    provision: dict[str, Any] = {
        "period": {"start": start, "end": end},
        "actor": [
            {
                "role": {"coding": [{"system": PARTICIPATION, "code": "PRCP"}]},
                "reference": {"reference": ref},
            }
            for ref in recipients
        ],
        "action": [{"coding": [{"system": ACTION, "code": "access"}]}],
    }
    if classes:
        provision["class"] = [
            {"system": "http://hl7.org/fhir/resource-types", "code": c} for c in classes
        ]
    return {
        "resourceType": "Consent",
        "status": status,
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": patient},
        "dateTime": "2015-06-01",
        "policyRule": {"coding": [{"system": ACTCODE, "code": "OPTOUT"}]},
        "provision": provision,
    }
