"""Consent checks: the §5 table of shared/specs/consent.md and the inquiry round trip of §2,
against a server that enforces those rules (its CapabilityStatement ``instantiates``
:data:`~conformance.capability.CONSENT_ENFORCEMENT`; otherwise every check is skipped).

Two parties, with real credentials:

* the **patient**: a bearer token whose ``fhirUser`` is the patient (e.g. ``patient/*.cruds``
  from a standalone launch) and the patient's reference. Use a patient kept for testing: the
  checks need that no other active Consent of theirs is in force, and they say so if one is;
* the **clinic**: a SMART backend-services client bound to an Organization (``system/*.cruds``),
  whose token the kit obtains itself (:func:`conformance.smart.backend_token`).

**§5 table.** Each row stores its official example Consent (``data/``), authored by the patient
with status ``active``, re-pointed at the run's parties: the references that the row names as
the requester become the clinic's Organization (the rule of §3 matches actors by reference,
whatever their type), every other party becomes a stand-in resource the clinic creates, and
the Consent's patient becomes the test patient. The request time of a row cannot be set on a
live server, so the Consent is moved in time instead: every date in it is shifted by
(server time − row time). The clinic then reads and searches the row's resource; permit means
200 and found, deny means 404/403 and not found. The Consent is deleted before the next row.
As in the server's own tests, documents are held by an Organization outside the requester set
(the custodian exception of §3 would otherwise permit them), and the row "a MedicationRequest"
runs only on a server that claims MedicationRequest.

**Inquiry (§2).** The clinic asks (``proposed``), cannot grant its own inquiry or author an
active Consent (403, nothing written), sees nothing until the patient grants, reads once the
patient grants, and is refused on the very next request after the patient revokes. The kit
reads and searches as the requester; it does not use ``Consent/$decide``.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from .capability import CONSENT_ENFORCEMENT, Capability, parse_capability
from .fhirhttp import Api, bundle_ids, expect, is_outcome, json_of
from .report import Recorder, Result
from .samples import KIT_SYSTEM
from .smart import TokenError, backend_token

__all__ = ["ROWS", "ConsentOptions", "Row", "load_example", "run_consent"]

SECTION = "consent"
DATA = Path(__file__).parent / "data"
LOINC = "http://loinc.org"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_DATE = re.compile(r"\A\d{4}-\d{2}-\d{2}\Z")


@dataclass(frozen=True)
class ConsentOptions:
    patient_token: str | None = None
    patient: str | None = None  # "Patient/123"
    clinic_client_id: str | None = None
    clinic_key: str | None = None  # path of the clinic client's private JWK
    clinic_organization: str | None = None  # "Organization/abc"
    clinic_scope: str = "system/*.cruds"
    clinic_token: str | None = None  # instead of the client id and key

    def missing(self) -> list[str]:
        out = []
        if not self.patient_token:
            out.append("--patient-token")
        if not self.patient:
            out.append("--patient")
        if not self.clinic_token and not (self.clinic_client_id and self.clinic_key):
            out.append("--clinic-client-id and --clinic-key")
        if not self.clinic_organization:
            out.append("--clinic-organization")
        return out


@dataclass(frozen=True)
class Row:
    """One row of consent.md §5."""

    example: str
    request: str
    permit: bool
    at: str = "2015-06-01T00:00:00Z"
    requester: tuple[str, ...] = ()  # the example's references that stand for the clinic
    resource: str = "doc"  # doc, doc-f001, doc-related, doc-cda, task, medication
    purpose: str | None = None

    @property
    def title(self) -> str:
        return f"{self.example}: {self.request} -> {'permit' if self.permit else 'deny'}"


_SMART = "2016-06-23T07:10:00Z"
_SIG = "2016-01-01T00:00:00Z"
F001, PATIENT_EXAMPLE = "Organization/f001", "Patient/example"
ROWS: tuple[Row, ...] = (
    Row("basic", "as above", False),
    Row("basic", "at 2017-01-01", True, at="2017-01-01T00:00:00Z"),
    Row("Out", "as above", False),
    Row("Out", "custodian Organization/f001", True, resource="doc-f001"),
    Row(
        "Emergency", "custodian f001, purpose ETREAT", False, resource="doc-f001", purpose="ETREAT"
    ),
    Row("notThis", "the resource Task/example3", False, resource="task"),
    Row("notThis", "a resource that references Task/example3", False, resource="doc-related"),
    Row("notThis", "an unrelated DocumentReference", True),
    Row("notTime", "at 2015-01-15", False, at="2015-01-15T00:00:00Z"),
    Row("notTime", "at 2015-03-01", True, at="2015-03-01T00:00:00Z"),
    Row("notOrg", "requester {Organization/f001}", False, requester=(F001,)),
    Row("notOrg", "as above", True),
    Row("notAuthor", "custodian Organization/f001", False, resource="doc-f001"),
    Row(
        "notThem",
        "requester {Practitioner/f204, Organization/f001}",
        False,
        requester=("Practitioner/f204", F001),
    ),
    Row("notThem", "as above", True),
    Row(
        "grantor",
        "requester {Patient/example}, custodian f001",
        True,
        requester=(PATIENT_EXAMPLE,),
        resource="doc-f001",
    ),
    Row(
        "grantor",
        "requester {Patient/example}, custodian o2",
        False,
        requester=(PATIENT_EXAMPLE,),
    ),
    Row(
        "signature",
        "requester {Practitioner/13}, CDA by xcda-author, LOINC 34133-9",
        True,
        at=_SIG,
        requester=("Practitioner/13",),
        resource="doc-cda",
    ),
    Row(
        "signature",
        "requester {Practitioner/13}, any other document",
        False,
        at=_SIG,
        requester=("Practitioner/13",),
    ),
    Row("signature", "at 2016-01-01, as above", True, at=_SIG),
    Row("smartonfhir", "a MedicationRequest", True, at=_SMART, resource="medication"),
    Row("smartonfhir", "a DocumentReference", False, at=_SMART),
    Row("smartonfhir", "at 2016-06-24", True, at="2016-06-24T00:00:00Z"),
)

#: Stand-ins: every party of the examples that is not the patient or the requester.
_STAND_INS = {
    "Organization/f001": "f001",
    "Practitioner/f204": "f204",
    "Practitioner/13": "p13",
    "Practitioner/xcda-author": "author",
    "Task/example3": "task",
    "Patient/example": "patient",
    "Patient/f001": "patient",
    "Patient/72": "patient",
    "Patient/xcda": "patient",
    "RelatedPerson/peter": "patient",
}


def load_example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))
    return data


# ---------------------------------------------------------------------------------------------
# Moving an example in time and onto the run's parties
# ---------------------------------------------------------------------------------------------


def _parse(value: str, *, end: bool) -> datetime:
    if _DATE.match(value):
        day = datetime.fromisoformat(value).replace(tzinfo=UTC)
        return day + timedelta(days=1, seconds=-1) if end else day
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def _fmt(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shift_provision(provision: dict[str, Any], delta: timedelta) -> None:
    for key in ("period", "dataPeriod"):
        period = provision.get(key)
        if isinstance(period, dict):
            for side in ("start", "end"):
                if isinstance(period.get(side), str):
                    moved = _parse(period[side], end=side == "end") + delta
                    period[side] = _fmt(moved)
    for child in provision.get("provision") or []:
        if isinstance(child, dict):
            _shift_provision(child, delta)


def _remap(value: Any, mapping: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                if item not in mapping:
                    raise ValueError(f"no stand-in for {item}")
                out[key] = mapping[item]
            elif key == "display":
                continue
            else:
                out[key] = _remap(item, mapping)
        return out
    if isinstance(value, list):
        return [_remap(v, mapping) for v in value]
    return value


def consent_for(row: Row, parties: Mapping[str, str], clinic: str, now: datetime) -> dict[str, Any]:
    """The row's example Consent, active, on the run's parties, shifted to ``now``."""
    consent = load_example(f"Consent-consent-example-{row.example}")
    for key in ("id", "text", "meta", "sourceAttachment"):
        consent.pop(key, None)
    mapping = {ref: parties[role] for ref, role in _STAND_INS.items()}
    mapping.update(dict.fromkeys(row.requester, clinic))
    consent = dict(_remap(consent, mapping))
    delta = now - _parse(row.at, end=False)
    if isinstance(consent.get("dateTime"), str):
        consent["dateTime"] = _fmt(_parse(consent["dateTime"], end=False) + delta)
    if isinstance(consent.get("provision"), dict):
        _shift_provision(consent["provision"], delta)
    consent["status"] = "active"
    consent["meta"] = {"tag": [{"system": KIT_SYSTEM, "code": "consent"}]}
    return consent


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _tagged(resource: dict[str, Any], run: str) -> dict[str, Any]:
    resource["meta"] = {"tag": [{"system": KIT_SYSTEM, "code": run}]}
    return resource


@dataclass
class _Consent:
    api: Api
    cap: Capability
    options: ConsentOptions
    rec: Recorder
    clinic: str = ""
    patient: str = ""
    run: str = field(default_factory=lambda: secrets.token_hex(4))
    parties: dict[str, str] = field(default_factory=dict)
    docs: dict[str, str] = field(default_factory=dict)  # kind → "DocumentReference/id"
    by_clinic: list[str] = field(default_factory=list)
    by_patient: list[str] = field(default_factory=list)
    clinic_token: str = ""

    def check(self, test_id: str, name: str, fn: Callable[[], str | None]) -> bool:
        return self.rec.check(SECTION, test_id, name, fn)

    # -- as each party ---------------------------------------------------------------------

    def as_clinic(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.api.request(method, path, token=self.clinic_token, **kwargs)

    def as_patient(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.api.request(method, path, token=self.options.patient_token, **kwargs)

    def clinic_creates(self, resource: dict[str, Any]) -> str:
        rtype = resource["resourceType"]
        r = self.as_clinic("POST", rtype, json=_tagged(resource, self.run))
        expect(r, 201, what=f"the clinic creates a {rtype}")
        ref = f"{rtype}/{json_of(r)['id']}"
        self.by_clinic.append(ref)
        return ref

    def visible(self, ref: str, purpose: str | None = None) -> tuple[bool, bool]:
        """(read answered 200, search by _id found it) for the clinic."""
        headers = {"x-purpose-of-use": purpose} if purpose else {}
        rtype, _, rid = ref.partition("/")
        read = self.as_clinic("GET", ref, headers=headers)
        assert read.status_code in (200, 403, 404), f"read of {rtype}: status {read.status_code}"
        search = self.as_clinic("GET", rtype, params={"_id": rid}, headers=headers)
        expect(search, 200, what=f"the clinic searches {rtype}?_id=")
        return read.status_code == 200, bundle_ids(json_of(search), rtype) == [rid]

    # -- setup -----------------------------------------------------------------------------

    def setup(self) -> str | None:
        options = self.options
        self.patient = str(options.patient)
        self.clinic = str(options.clinic_organization)
        if options.clinic_token:
            self.clinic_token = options.clinic_token
        else:
            try:
                self.clinic_token = backend_token(
                    self.api.base,
                    str(options.clinic_client_id),
                    str(options.clinic_key),
                    options.clinic_scope,
                    http=self.api.http,
                )
            except TokenError as error:
                raise AssertionError(f"clinic token: {error}") from error
        me = self.as_patient("GET", self.patient)
        expect(me, 200, what=f"the patient reads {self.patient}")
        org = self.as_clinic("GET", self.clinic)
        expect(org, 200, what=f"the clinic reads {self.clinic}")
        name = "conformance stand-in"
        self.parties = {
            "patient": self.patient,
            "f001": self.clinic_creates({"resourceType": "Organization", "name": f"{name} f001"}),
            "other": self.clinic_creates({"resourceType": "Organization", "name": f"{name} o2"}),
            "f204": self.clinic_creates({"resourceType": "Practitioner", "active": True}),
            "p13": self.clinic_creates({"resourceType": "Practitioner", "active": True}),
            "author": self.clinic_creates({"resourceType": "Practitioner", "active": True}),
        }
        task = load_example("Task-example3")
        for key in ("id", "text", "focus", "owner"):
            task.pop(key, None)
        task["for"] = task["requester"] = {"reference": self.patient}
        self.parties["task"] = self.clinic_creates(task)
        other = {"reference": self.parties["other"]}
        self.docs = {
            "doc": self.clinic_creates(self._document(custodian=other)),
            "doc-f001": self.clinic_creates(
                self._document(custodian={"reference": self.parties["f001"]})
            ),
            "doc-related": self.clinic_creates(
                self._document(
                    custodian=other, context={"related": [{"reference": self.parties["task"]}]}
                )
            ),
            "doc-cda": self.clinic_creates(
                self._document(
                    custodian=other,
                    author=[{"reference": self.parties["author"]}],
                    type={"coding": [{"system": LOINC, "code": "34133-9"}]},
                    content_type="application/hl7-cda+xml",
                )
            ),
        }
        return None

    def _document(self, *, content_type: str = "text/plain", **extra: Any) -> dict[str, Any]:
        return {
            "resourceType": "DocumentReference",
            "status": "current",
            "subject": {"reference": self.patient},
            "content": [{"attachment": {"contentType": content_type, "title": "conformance"}}],
            **extra,
        }

    def no_other_consent(self) -> str | None:
        r = self.as_patient(
            "GET", "Consent", params={"patient": self.patient, "status": "active", "_count": "50"}
        )
        expect(r, 200, what="the patient searches their active Consents")
        ids = bundle_ids(json_of(r), "Consent")
        assert not ids, (
            f"{self.patient} has {len(ids)} active Consent(s) the kit did not write: "
            "use a patient kept for testing"
        )
        return None

    def baseline(self) -> str | None:
        for kind, ref in self.docs.items():
            read, found = self.visible(ref)
            assert not (read or found), f"{kind} is visible to the clinic without any Consent"
        return None

    # -- §5 ----------------------------------------------------------------------------------

    def row(self, row: Row) -> str | None:
        if row.resource == "medication":
            if not (
                self.cap.claims("MedicationRequest", "create")
                and self.cap.claims("MedicationRequest", "read")
            ):
                return "skip: the server does not claim MedicationRequest create and read"
            ref = self.clinic_creates(
                {
                    "resourceType": "MedicationRequest",
                    "status": "active",
                    "intent": "order",
                    "subject": {"reference": self.patient},
                    "medicationCodeableConcept": {"text": "conformance"},
                }
            )
        elif row.resource == "task":
            ref = self.parties["task"]
        else:
            ref = self.docs[row.resource]
        consent = consent_for(row, self.parties, self.clinic, self.api.now())
        r = self.as_patient("POST", "Consent", json=consent)
        expect(r, 201, what="the patient stores the example Consent")
        cid = f"Consent/{json_of(r)['id']}"
        try:
            read, found = self.visible(ref, row.purpose)
        finally:
            gone = self.as_patient("DELETE", cid)
            if gone.status_code not in (200, 202, 204):
                self.by_patient.append(cid)
        want = row.permit
        seen = f"read {'200' if read else 'refused'}, search {'found' if found else 'not found'}"
        assert (read, found) == (want, want), f"{seen}; expected {'permit' if want else 'deny'}"
        return seen

    # -- §2 ----------------------------------------------------------------------------------

    def inquiry(self) -> None:
        doc = self.docs.get("doc")
        state: dict[str, Any] = {}

        def proposal() -> dict[str, Any]:
            now = self.api.now()
            return {
                "resourceType": "Consent",
                "status": "proposed",
                "scope": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                            "code": "patient-privacy",
                        }
                    ]
                },
                "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
                "patient": {"reference": self.patient},
                "dateTime": _fmt(now),
                "policyRule": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                            "code": "OPTOUT",
                        }
                    ]
                },
                "provision": {
                    "actor": [
                        {
                            "role": {"coding": [{"system": PARTICIPATION, "code": "PRCP"}]},
                            "reference": {"reference": self.clinic},
                        }
                    ],
                    "action": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/consentaction",
                                    "code": "access",
                                }
                            ]
                        }
                    ],
                    "period": {
                        "start": _fmt(now - timedelta(minutes=5)),
                        "end": _fmt(now + timedelta(hours=1)),
                    },
                    "class": [
                        {
                            "system": "http://hl7.org/fhir/resource-types",
                            "code": "DocumentReference",
                        }
                    ],
                },
                "meta": {"tag": [{"system": KIT_SYSTEM, "code": self.run}]},
            }

        def needs(*keys: str) -> str | None:
            if doc is None:
                return "skip: no document (setup failed)"
            missing = [k for k in keys if k not in state]
            return f"skip: needs {', '.join(missing)}" if missing else None

        def ask() -> str | None:
            if (skip := needs()) is not None:
                return skip
            r = self.as_clinic("POST", "Consent", json=proposal())
            expect(r, 201, what="the clinic creates a proposed Consent")
            body = json_of(r)
            state["id"] = body["id"]
            self.by_patient.append(f"Consent/{body['id']}")
            state["proposed"] = body
            return None

        def nothing_yet() -> str | None:
            if (skip := needs("id")) is not None:
                return skip
            assert doc is not None
            assert self.visible(doc) == (False, False), "a proposed Consent granted access"
            return None

        def clinic_cannot_grant() -> str | None:
            if (skip := needs("proposed")) is not None:
                return skip
            before = self.as_patient("GET", f"Consent/{state['id']}")
            expect(before, 200, what="the patient reads the inquiry")
            body = json_of(before)
            r = self.as_clinic("PUT", f"Consent/{state['id']}", json=dict(body, status="active"))
            expect(r, 403, what="the clinic sets its own inquiry to active")
            assert is_outcome(r), "403 without an OperationOutcome"
            after = json_of(self.as_patient("GET", f"Consent/{state['id']}"))
            assert after.get("status") == "proposed", "the status changed anyway"
            version = (after.get("meta") or {}).get("versionId")
            assert version == (body.get("meta") or {}).get("versionId"), "a version was written"
            return None

        def clinic_cannot_author() -> str | None:
            if (skip := needs()) is not None:
                return skip
            active = dict(proposal(), status="active")
            marker = f"active-{self.run}"
            active["meta"] = {"tag": [{"system": KIT_SYSTEM, "code": marker}]}
            r = self.as_clinic("POST", "Consent", json=active)
            if r.status_code == 201:
                self.by_patient.append(f"Consent/{json_of(r)['id']}")
            expect(r, 403, what="the clinic creates an active Consent")
            assert is_outcome(r), "403 without an OperationOutcome"
            found = self.as_patient(
                "GET",
                "Consent",
                params={"patient": self.patient, "_tag": f"{KIT_SYSTEM}|{marker}"},
            )
            expect(found, 200, what="the patient searches their Consents")
            assert not bundle_ids(json_of(found), "Consent"), "the refused Consent was stored"
            return None

        def patient_sees() -> str | None:
            if (skip := needs("id")) is not None:
                return skip
            r = self.as_patient(
                "GET", "Consent", params={"patient": self.patient, "status": "proposed"}
            )
            expect(r, 200, what="the patient lists the inquiries")
            assert state["id"] in bundle_ids(json_of(r), "Consent"), "the inquiry is not listed"
            return None

        def grant() -> str | None:
            if (skip := needs("id")) is not None:
                return skip
            body = json_of(self.as_patient("GET", f"Consent/{state['id']}"))
            r = self.as_patient("PUT", f"Consent/{state['id']}", json=dict(body, status="active"))
            expect(r, 200, what="the patient grants")
            state["granted"] = json_of(self.as_patient("GET", f"Consent/{state['id']}"))
            return None

        def reads() -> str | None:
            if (skip := needs("granted")) is not None:
                return skip
            assert doc is not None
            read, found = self.visible(doc)
            assert read and found, f"granted, but read {read}, search {found}"
            return None

        def revoke() -> str | None:
            if (skip := needs("granted")) is not None:
                return skip
            body = state["granted"]
            r = self.as_patient("PUT", f"Consent/{state['id']}", json=dict(body, status="inactive"))
            expect(r, 200, what="the patient revokes")
            state["revoked"] = True
            return None

        def refused() -> str | None:
            if (skip := needs("revoked")) is not None:
                return skip
            assert doc is not None
            read, found = self.visible(doc)  # the very next request
            assert not (read or found), f"revoked, but read {read}, search {found}"
            return None

        def history() -> str | None:
            if (skip := needs("revoked")) is not None:
                return skip
            r = self.as_patient("GET", f"Consent/{state['id']}/_history")
            expect(r, 200, what="the patient reads the inquiry's history")
            statuses = [
                (e.get("resource") or {}).get("status") for e in json_of(r).get("entry") or []
            ]
            assert statuses[:3] == ["inactive", "active", "proposed"], f"history {statuses[:4]}"
            return None

        self.check("§2.1-ask", "the clinic asks: proposed Consent -> 201", ask)
        self.check("§2.1-nothing-yet", "a proposed Consent grants nothing", nothing_yet)
        self.check("§2.2-no-self-grant", "the clinic cannot grant: 403, nothing written",
                   clinic_cannot_grant)  # fmt: skip
        self.check("§2.1-only-proposed", "the clinic cannot author an active Consent: 403",
                   clinic_cannot_author)  # fmt: skip
        self.check("§2.2-patient-sees", "the patient lists the inquiry", patient_sees)
        self.check("§2.2-grant", "the patient grants: active -> 200", grant)
        self.check("§2.2-clinic-reads", "granted: the clinic reads and finds it", reads)
        self.check("§2.3-revoke", "the patient revokes: inactive -> 200", revoke)
        self.check("§2.3-next-request", "revoked: the very next read and search are refused",
                   refused)  # fmt: skip
        self.check("§2-history", "every change is a version: proposed, active, inactive", history)

    # -- cleanup -----------------------------------------------------------------------------

    def cleanup(self) -> str | None:
        left = []
        for ref in reversed(self.by_patient + list(self.docs.values())):
            r = self.as_patient("DELETE", ref)
            if r.status_code not in (200, 202, 204, 404, 410):
                left.append(ref)
        docs = set(self.docs.values())
        for ref in reversed(self.by_clinic):
            if ref in docs:
                continue
            r = self.as_clinic("DELETE", ref)
            if r.status_code not in (200, 202, 204, 404, 410):
                r = self.as_patient("DELETE", ref)
                if r.status_code not in (200, 202, 204, 404, 410):
                    left.append(ref)
        assert not left, f"could not delete {len(left)}: {', '.join(left[:4])}"
        return None


def _skip_all(rec: Recorder, reason: str) -> None:
    for number, row in enumerate(ROWS, 1):
        rec.skip(SECTION, f"§5.{number:02d}", row.title, reason)
    rec.skip(SECTION, "§2-inquiry", "the inquiry round trip", reason)


def run_consent(
    base: str, options: ConsentOptions, *, http: httpx.Client | None = None
) -> list[Result]:
    """Run the consent checks against the FHIR base *base*; returns the results in order."""
    own = http is None
    client = http or httpx.Client(timeout=30.0)
    rec = Recorder()
    try:
        api = Api(client, base)
        holder: list[Capability] = []

        def marker() -> str | None:
            r = api.get("metadata")
            expect(r, 200, what="GET metadata")
            cap = parse_capability(json_of(r))
            holder.append(cap)
            if not cap.enforces_consent:
                return f"skip: the CapabilityStatement does not instantiate {CONSENT_ENFORCEMENT}"
            return None

        if not rec.check(SECTION, "marker", "the server declares consent enforcement", marker):
            reason = (
                "the server does not declare consent enforcement"
                if holder
                else "no CapabilityStatement"
            )
            _skip_all(rec, reason)
            return rec.results
        missing = options.missing()
        if missing:
            _skip_all(rec, f"needs {', '.join(missing)}")
            return rec.results
        checks = _Consent(api, holder[0], options, rec)
        if not checks.check(
            "setup", "the clinic creates the stand-ins and documents", checks.setup
        ):
            _skip_all(rec, "setup failed")
            checks.check("cleanup", "delete what the kit created", checks.cleanup)
            return rec.results
        try:
            ready = checks.check(
                "precondition", "no other active Consent of the patient", checks.no_other_consent
            )
            if ready:
                checks.check("§3-default", "no Consent at all: deny", checks.baseline)
                for number, row in enumerate(ROWS, 1):
                    checks.check(f"§5.{number:02d}", row.title, functools.partial(checks.row, row))
            else:
                for number, row in enumerate(ROWS, 1):
                    rec.skip(SECTION, f"§5.{number:02d}", row.title, "precondition failed")
            checks.inquiry()
        finally:
            checks.check("cleanup", "delete what the kit created", checks.cleanup)
        return rec.results
    finally:
        if own:
            client.close()
