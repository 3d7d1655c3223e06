"""``POST [base]/Consent/$decide``: the consent decision service for gateways (the IHE PCF
"Consent Decider"; consent.md §1, §3, §6). Documentation: ``docs/consent-decide.md``.

A gateway (a Consent Enforcement Point in front of this server or another one) names a
patient, the actors a request would serve, the action, the purpose of use and the resource;
the answer is the decision of consent.md §3 — computed by the same pure
:func:`~fhir_consent.consent.rules.decide` that enforces every request of this server — with
the Consents that decided it and the deciding provision. Nothing of the rule lives here.

* **Who may call**: a token with the scope :data:`DECIDE_SCOPE` (granted only to clients
  registered for it: a decision names Consents of any patient, which the caller may not be
  able to read). No token → 401, another token → 403 (audited, like any scope refusal).
* **Requester set** (consent.md §1): the actors, plus the Organizations of the active
  PractitionerRoles of Practitioner actors (or of a PractitionerRole actor), exactly as the
  server derives it from a token. A RelatedPerson actor who is the patient's legal
  representative decides as the patient would.
* **Resource facts**: a ``resource`` reference that resolves on this server is read from the
  store, through the same index facts as the SQL enforcement (its attributes may then not be
  sent); otherwise the sent attributes (``custodian``, ``author``, ``type``, ``securityLabel``,
  ``contentType``, ``date``, ``reference``, ``referencedBy``) are read as a resource of
  ``resourceType`` by :func:`~fhir_consent.consent.rules.facts_from_resource`.
* **Consents**: every applicable Consent of the patient, read in the call's own transaction
  (a revocation is in force for the next call); the compiled forms are shared with the
  enforcer's cache (keyed by id and version).
* **Audit** (consent.md §6): every decision returned is an AuditEvent for the patient
  (interaction ``operation``, outcome = the decision, the deciding Consent versions, the
  reason, the purpose, the gateway as requestor and the actors as recipients); a break-glass
  permit is stored before the answer leaves, the others through the batched writer.
* **Errors**: bad Parameters → 400 OperationOutcome naming the parameter (never a value); an
  unknown patient → 404.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import TYPE_CHECKING, Any, Final

import orjson
from fastapi import APIRouter, FastAPI, Request
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from fhir_consent.audit import AuditRecord
from fhir_consent.auth import AccessContext
from fhir_consent.consent._fhirtime import parse_fhir_time, us_to_datetime
from fhir_consent.consent._types import (
    CONSENT_ACTION_SYSTEM,
    AccessDecision,
    AccessRequest,
    ConsentResult,
    Decision,
    Reason,
    Ref,
    ResourceFacts,
)
from fhir_consent.consent.enforcement import ConsentEnforcement
from fhir_consent.consent.rules import decide, facts_from_resource, normalize_reference
from fhir_consent.consent.sql import indexed_facts
from fhir_consent.errors import BadRequest, Forbidden, InvalidResource, Issue, NotFound
from fhir_consent.fhir import searchparams
from fhir_consent.fhir.http import check_accept, check_content_type, fhir_response
from fhir_consent.fhir.validation import SUPPORTED_TYPES, parse_json_body
from fhir_consent.requestctx import current_access
from fhir_consent.store.repository import Repository

if TYPE_CHECKING:  # the FHIR layer sits above this one: only its types are needed here
    from fhir_consent.consent.workflow import ConsentLayer
    from fhir_consent.fhir.routes import FHIRContext

__all__ = [
    "DECIDE_PATH",
    "DECIDE_SCOPE",
    "OPERATION_DEFINITION",
    "ConsentDecider",
    "DecideRequest",
    "Verdict",
    "capability_extender",
    "install",
    "parse_decide_parameters",
    "verdict_parameters",
]

#: The scope a caller needs (SMART App Launch 2.2 §"Extensibility": a full URI).
DECIDE_SCOPE: Final = "urn:fhir-consent:scope:consent-decide"
OPERATION_DEFINITION: Final = "urn:fhir-consent:OperationDefinition:Consent-decide"
DECIDE_PATH: Final = "/Consent/$decide"
_AUDIT_QUERY: Final = DECIDE_PATH.lstrip("/")

_ACTOR_TYPES: Final = frozenset(
    {"Practitioner", "PractitionerRole", "Organization", "RelatedPerson", "Patient"}
)
_CLINICIANS: Final = ("Practitioner/", "PractitionerRole/")
#: R4 consentaction codes (http://terminology.hl7.org/CodeSystem/consentaction).
_ACTIONS: Final = frozenset({"collect", "access", "use", "disclose", "correct"})
_ACTION_SYSTEMS: Final = frozenset({CONSENT_ACTION_SYSTEM, "http://hl7.org/fhir/consentaction"})
_PURPOSE_SYSTEMS: Final = frozenset(
    {
        "http://terminology.hl7.org/CodeSystem/v3-ActReason",
        "http://hl7.org/fhir/v3/ActReason",
        "urn:oid:2.16.840.1.113883.5.8",
    }
)
_PURPOSE_RE: Final = re.compile(r"[A-Z][A-Z0-9]{1,31}")
_TYPE_RE: Final = re.compile(r"[A-Z][A-Za-z]{1,63}")
_MIME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")
#: Types whose visibility is not the §3 rule alone: a Binary follows its DocumentReferences,
#: an AuditEvent is shown to its patient only (consent.md §4, §6).
_NOT_DECIDABLE: Final = frozenset({"Binary", "AuditEvent"})

# name → (accepted value[x] keys, min, max)
_SPEC: Final[dict[str, tuple[tuple[str, ...], int, int]]] = {
    "patient": (("valueReference",), 1, 1),
    "actor": (("valueReference",), 1, 20),
    "action": (("valueCoding", "valueCode"), 0, 1),
    "purpose": (("valueCoding", "valueCode"), 0, 8),
    "resource": (("valueReference",), 0, 1),
    "resourceType": (("valueCode",), 0, 1),
    "custodian": (("valueReference",), 0, 1),
    "author": (("valueReference",), 0, 50),
    "type": (("valueCoding",), 0, 50),
    "securityLabel": (("valueCoding",), 0, 50),
    "contentType": (("valueCode",), 0, 20),
    "date": (("valueDateTime", "valueDate", "valueInstant", "valuePeriod"), 0, 1),
    "reference": (("valueReference",), 0, 100),
    "referencedBy": (("valueReference",), 0, 100),
}
_ATTRIBUTES: Final = (
    "custodian",
    "author",
    "type",
    "securityLabel",
    "contentType",
    "date",
    "reference",
    "referencedBy",
)


# ---------------------------------------------------------------------------------------------
# Input (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecideRequest:
    """One parsed ``$decide`` call. ``resource`` is ``Type/id`` or ``None`` (only a type);
    ``attributes`` holds the sent resource attributes by parameter name (values as sent)."""

    patient: Ref
    actors: tuple[Ref, ...]
    action: str
    purposes: frozenset[str]
    resource_type: str
    resource: Ref | None
    attributes: Mapping[str, tuple[Any, ...]]


def _bad(text: str, index: int | None = None) -> BadRequest:
    where = ["Parameters"] if index is None else [f"Parameters.parameter[{index}]"]
    return BadRequest(text, issues=[Issue(text, "invalid", expression=where)])


@cache
def _parameters_model() -> Any:
    return get_fhir_model_class("Parameters")


def _validate(body: Mapping[str, Any]) -> None:
    """The body is a valid R4 Parameters resource (fhir.resources; no input values echoed)."""
    if body.get("resourceType") != "Parameters":
        raise _bad("The body must be a FHIR Parameters resource")
    try:
        _parameters_model().model_validate(body)
    except ValidationError as exc:
        issues = []
        for err in exc.errors(include_url=False, include_input=False)[:20]:
            path = "Parameters"
            for item in err.get("loc", ()):
                if isinstance(item, int):
                    path += f"[{item}]"
                elif not str(item).startswith("function-") and item != "__root__":
                    path += "." + str(item).removesuffix("__ext").rstrip("_")
            issues.append(Issue("Invalid or missing value", "structure", expression=[path]))
        text = "The Parameters resource is not valid FHIR R4"
        raise InvalidResource(text, issues=issues) from None
    except (ValueError, TypeError):
        raise InvalidResource("The Parameters resource is not valid FHIR R4") from None


def _reference(value: Any, index: int, name: str, types: frozenset[str] | None = None) -> Ref:
    ref = normalize_reference(value.get("reference")) if isinstance(value, Mapping) else None
    if ref is None:
        raise _bad(f"Parameter '{name}' needs a literal reference 'Type/id'", index)
    if types is not None and ref.partition("/")[0] not in types:
        raise _bad(f"Parameter '{name}' must reference one of: {', '.join(sorted(types))}", index)
    return ref


def _code(value: Any, index: int, name: str, systems: frozenset[str]) -> str:
    """A code from a ``valueCode`` (str) or a ``valueCoding`` in one of ``systems``."""
    if isinstance(value, str):
        return value
    system = value.get("system")
    code = value.get("code")
    if not isinstance(code, str) or (system is not None and system not in systems):
        raise _bad(f"Parameter '{name}' needs a code of its code system", index)
    return code


def _check_time(value: Any, index: int) -> None:
    texts = [value] if isinstance(value, str) else [value.get("start"), value.get("end")]
    texts = [t for t in texts if t is not None]
    if not texts:
        raise _bad("Parameter 'date' needs a dateTime or a Period with a start or an end", index)
    for text in texts:
        try:
            parse_fhir_time(text)
        except ValueError:
            raise _bad("Parameter 'date' is not a valid FHIR date or dateTime", index) from None


def parse_decide_parameters(body: Mapping[str, Any]) -> DecideRequest:
    """Read a ``$decide`` Parameters resource (docs/consent-decide.md), or raise 400 naming
    the parameter at fault (never its value)."""
    _validate(body)
    found: dict[str, list[tuple[int, Any]]] = {}
    for index, param in enumerate(body.get("parameter") or []):
        name = param.get("name")
        spec = _SPEC.get(name) if isinstance(name, str) else None
        if spec is None:
            raise _bad("Unknown parameter (docs/consent-decide.md lists the accepted ones)", index)
        keys, _low, _high = spec
        values = [k for k in param if k.startswith("value")]
        if "part" in param or "resource" in param or len(values) != 1 or values[0] not in keys:
            raise _bad(f"Parameter '{name}' takes one of: {', '.join(keys)}", index)
        found.setdefault(name, []).append((index, param[values[0]]))
    for name, (_keys, low, high) in _SPEC.items():
        count = len(found.get(name, ()))
        if count < low:
            raise _bad(f"Parameter '{name}' is required")
        if count > high:
            raise _bad(f"Parameter '{name}' may be given at most {high} time(s)")

    def refs(name: str, types: frozenset[str] | None = None) -> tuple[Ref, ...]:
        return tuple(_reference(v, i, name, types) for i, v in found.get(name, ()))

    (patient,) = refs("patient", frozenset({"Patient"}))
    actors = tuple(dict.fromkeys(refs("actor", _ACTOR_TYPES)))
    action = "access"
    for i, v in found.get("action", ()):
        action = _code(v, i, "action", _ACTION_SYSTEMS)
        if action not in _ACTIONS:
            raise _bad(f"Parameter 'action' must be one of: {', '.join(sorted(_ACTIONS))}", i)
    purposes: set[str] = set()
    for i, v in found.get("purpose", ()):
        code = _code(v, i, "purpose", _PURPOSE_SYSTEMS)
        if not _PURPOSE_RE.fullmatch(code):
            raise _bad("Parameter 'purpose' must be a v3-ActReason code, e.g. TREAT", i)
        purposes.add(code)
    resource = refs("resource")[0] if "resource" in found else None
    rtype: str | None = None
    for i, v in found.get("resourceType", ()):
        if not _TYPE_RE.fullmatch(v):
            raise _bad("Parameter 'resourceType' must be a FHIR resource type name", i)
        if resource is not None and resource.partition("/")[0] != v:
            raise _bad("Parameters 'resourceType' and 'resource' name different types", i)
        rtype = v
    if resource is not None:
        rtype = resource.partition("/")[0]
    if rtype is None:
        raise _bad("Parameter 'resource' or 'resourceType' is required")
    if rtype in _NOT_DECIDABLE:
        raise _bad(
            "Binary and AuditEvent are not decided by Consents: ask about the "
            "DocumentReference of a Binary (consent.md §4)"
        )
    attributes: dict[str, tuple[Any, ...]] = {}
    for name in ("custodian", "author", "reference", "referencedBy"):
        if name in found:
            attributes[name] = refs(name)
    for name in ("type", "securityLabel"):
        for i, v in found.get(name, ()):
            if not isinstance(v.get("code"), str):
                raise _bad(f"Parameter '{name}' needs a Coding with a code", i)
        if name in found:
            attributes[name] = tuple(v for _, v in found[name])
    for i, v in found.get("contentType", ()):
        if not _MIME_RE.fullmatch(v.split(";", 1)[0].strip()):
            raise _bad("Parameter 'contentType' must be a MIME type", i)
    if "contentType" in found:
        attributes["contentType"] = tuple(v for _, v in found["contentType"])
    for i, v in found.get("date", ()):
        _check_time(v, i)
        attributes["date"] = (v,)
    return DecideRequest(
        patient=patient,
        actors=actors,
        action=action,
        purposes=frozenset(purposes) or frozenset({"TREAT"}),
        resource_type=rtype,
        resource=resource,
        attributes=attributes,
    )


def _skeleton(req: DecideRequest) -> dict[str, Any]:
    """The sent attributes as a resource of ``resource_type``, for ``facts_from_resource``."""
    a = req.attributes
    out: dict[str, Any] = {"resourceType": req.resource_type}
    if req.resource is not None:
        out["id"] = req.resource.partition("/")[2]
    if req.resource_type != "Patient":
        out["subject"] = {"reference": req.patient}
    if "custodian" in a:
        out["custodian"] = {"reference": a["custodian"][0]}
    if "author" in a:
        out["author"] = [{"reference": r} for r in a["author"]]
    if "type" in a:
        out["type"] = [{"coding": [dict(c)]} for c in a["type"]]
    if "contentType" in a:
        out["content"] = [{"attachment": {"contentType": c}} for c in a["contentType"]]
    if "securityLabel" in a:
        out["meta"] = {"security": [dict(c) for c in a["securityLabel"]]}
    if "date" in a:
        value = a["date"][0]
        out["date" if isinstance(value, str) else "period"] = value
    if "reference" in a:
        out["related"] = [{"reference": r} for r in a["reference"]]
    return out


# ---------------------------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision with what it was decided for."""

    decision: AccessDecision
    patient: Ref
    resource: Ref | None
    requesters: frozenset[Ref]
    actors: tuple[Ref, ...]
    purposes: frozenset[str]

    @property
    def deciding(self) -> tuple[str, ...]:
        """``Consent/id/_history/v`` of the deciding Consents."""
        return tuple(_consent_ref(r) for r in self.decision.deciding if r.consent_id)


def _consent_ref(result: ConsentResult) -> str:
    version = f"/_history/{result.consent_version}" if result.consent_version else ""
    return f"Consent/{result.consent_id}{version}"


class ConsentDecider:
    """Decides ``$decide`` calls with the enforcer's parties, Consents and cache."""

    def __init__(self, enforcement: ConsentEnforcement) -> None:
        self.enforcement = enforcement

    def _parties(
        self, conn: Connection, req: DecideRequest, now: int
    ) -> tuple[frozenset[Ref], frozenset[Ref]]:
        """(requester set, the actors who are the patient's legal representatives)."""
        requesters: set[Ref] = set(req.actors)
        representatives: set[Ref] = set()
        for actor in req.actors:
            as_token = AccessContext(scopes=None, fhir_user=actor)
            if actor.startswith(_CLINICIANS):
                requesters |= self.enforcement.requester_set(conn, as_token, now)
            elif actor.startswith("RelatedPerson/"):
                if req.patient in self.enforcement.own_patients(conn, as_token):
                    representatives.add(actor)
        return frozenset(requesters), frozenset(representatives)

    def _facts(
        self, conn: Connection, req: DecideRequest, referenced_by: frozenset[Ref]
    ) -> ResourceFacts:
        row = None
        if req.resource is not None and req.resource_type in SUPPORTED_TYPES:
            rtype, _, rid = req.resource.partition("/")
            row = Repository(conn).current(rtype, rid)
        if row is None or row.deleted or row.content is None:
            sent = frozenset(req.attributes.get("referencedBy", ()))
            return facts_from_resource(_skeleton(req), referenced_by | sent, patient=req.patient)
        if req.attributes:
            raise _bad(
                "The resource is stored on this server: its attributes are read from the store, "
                "do not send them"
            )
        facts = indexed_facts(
            row.res_type, row.res_id, searchparams.extract(orjson.loads(row.content)), referenced_by
        )
        if facts.patient != req.patient:
            raise _bad("The resource is not in the patient's compartment")
        return facts

    def decide(self, conn: Connection, req: DecideRequest, now: int) -> Verdict:
        """consent.md §3 for one call, in the caller's transaction (``now``: µs since the
        epoch). 404 when the patient is not stored."""
        patient = Repository(conn).current("Patient", req.patient.partition("/")[2])
        if patient is None or patient.deleted:
            raise NotFound("The patient is not known to this server")
        requesters, representatives = self._parties(conn, req, now)
        consents = self.enforcement.patient_consents(conn, req.patient)
        ref = req.resource
        dependents = self.enforcement.dependents(conn, {req.patient: consents})
        referenced_by = frozenset(
            x for x, targets in dependents.items() if ref is not None and ref in targets
        )
        facts = self._facts(conn, req, referenced_by)
        clinician = any(a.startswith(_CLINICIANS) for a in req.actors)
        decision = decide(
            consents,
            AccessRequest(requesters, req.action, req.purposes, at=us_to_datetime(now)),
            facts,
            representatives=representatives,
            break_glass_enabled=self.enforcement.settings.break_glass and clinician,
        )
        return Verdict(decision, req.patient, ref, requesters, req.actors, req.purposes)


# ---------------------------------------------------------------------------------------------
# Output (pure)
# ---------------------------------------------------------------------------------------------


def provision_path(path: Sequence[int]) -> str:
    """The FHIRPath of a provision: ``()`` → ``Consent.provision``, ``(0, 1)`` →
    ``Consent.provision.provision[0].provision[1]``."""
    return "Consent.provision" + "".join(f".provision[{i}]" for i in path)


def verdict_parameters(verdict: Verdict) -> dict[str, Any]:
    """The answer as a Parameters resource (docs/consent-decide.md)."""
    d = verdict.decision
    params: list[dict[str, Any]] = [
        {"name": "decision", "valueCode": d.decision.value},
        {"name": "reason", "valueCode": d.reason.value},
    ]
    for result in d.deciding:
        if not result.consent_id:
            continue
        part: list[dict[str, Any]] = [
            {"name": "reference", "valueReference": {"reference": _consent_ref(result)}},
            {"name": "explicit", "valueBoolean": result.explicit},
        ]
        if result.explicit:
            part.append({"name": "provision", "valueString": provision_path(result.provision_path)})
        params.append({"name": "consent", "part": part})
    params += [
        {"name": "requester", "valueReference": {"reference": ref}}
        for ref in sorted(verdict.requesters)
    ]
    return {"resourceType": "Parameters", "parameter": params}


def audit_record(verdict: Verdict, access: AccessContext, recorded: int) -> AuditRecord:
    """The AuditEvent of one decision (consent.md §6)."""
    d = verdict.decision
    return AuditRecord(
        interaction="operation",
        recorded=recorded,
        permitted=d.decision is Decision.PERMIT,
        access=replace(access, purpose_of_use=verdict.purposes),
        entities=(verdict.resource,) if verdict.resource else (),
        patient=verdict.patient,
        decided_by=tuple(sorted(set(verdict.deciding))),
        reason=d.reason.value,
        query=_AUDIT_QUERY,
        on_behalf_of=verdict.actors,
    )


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


def build_router(decider: ConsentDecider) -> APIRouter:
    """The ``$decide`` route, relative to the FHIR base."""
    router = APIRouter()

    @router.post(DECIDE_PATH)
    async def consent_decide(request: Request) -> Response:
        ctx: FHIRContext = request.app.state.fhir
        check_accept(request)
        access = await ctx.authenticate(request)  # 401 without a valid token
        current_access.set(access)
        now = ctx.clock()
        sink = ctx.audit
        if not access.is_open and (access.scopes is None or DECIDE_SCOPE not in access.scopes):
            if sink is not None:
                sink.record_access(
                    "operation", access, [], now, permitted=False, reason="scope",
                    query=_AUDIT_QUERY,
                )  # fmt: skip
            raise Forbidden(f"Consent/$decide needs the scope {DECIDE_SCOPE}")
        check_content_type(request)
        query = parse_decide_parameters(parse_json_body(await request.body()))

        def run() -> Verdict:
            with ctx.db.read() as conn:
                if ctx.token_check is not None and not access.is_open:
                    ctx.token_check(conn, access)  # a revoked token fails on its next call
                return decider.decide(conn, query, now)

        verdict = await run_in_threadpool(run)
        if sink is not None:
            record = audit_record(verdict, access, now)
            if verdict.decision.reason is Reason.BREAK_GLASS:
                await run_in_threadpool(sink.record_now, record)  # before the answer leaves
            else:
                sink.record(record)
        return fhir_response(verdict_parameters(verdict))

    return router


def capability_extender(statement: dict[str, Any]) -> None:
    """Declare ``$decide`` on Consent in the CapabilityStatement (``rest.resource.operation``)."""
    for rest in statement.get("rest", []):
        for resource in rest.get("resource", []):
            if resource.get("type") == "Consent":
                resource.setdefault("operation", []).append(
                    {
                        "name": "decide",
                        "definition": OPERATION_DEFINITION,
                        "documentation": "Consent decision for a gateway (IHE PCF Consent "
                        f"Decider): POST a Parameters resource; needs the scope {DECIDE_SCOPE}",
                    }
                )


def install(app: FastAPI, ctx: FHIRContext, layer: ConsentLayer) -> ConsentDecider:
    """Serve ``POST [base]/Consent/$decide`` on ``app`` with the consent layer's enforcer, and
    declare it in the CapabilityStatement. Call it once, after the consent layer."""
    decider = ConsentDecider(layer.enforcement)
    routes = app.router.routes
    before = len(routes)
    app.include_router(build_router(decider), prefix=ctx.settings.fhir_path.rstrip("/"))
    ours = routes[before:]
    del routes[before:]
    routes[0:0] = ours  # ahead of the generic "/{rtype}/…" routes
    ctx.capability_extenders.append(capability_extender)
    return decider
