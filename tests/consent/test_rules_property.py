"""Property tests: the engine agrees with a naive reference written from consent.md §3.

The reference below works on the raw Consent JSON every time (no compilation, no indexes, no
microseconds) and follows the spec text line by line, plus the interpretations documented in
``fhir_consent.consent.rules`` (what "an explicit deny names the requester" means).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fhir_consent.consent import (
    AccessRequest,
    ConsentSet,
    Decision,
    Reason,
    ResourceFacts,
    compile_consent,
    decide,
    evaluate_consent,
)

ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
MIME = "urn:ietf:bcp:13"
LOINC = "http://loinc.org"

PATIENTS = ["Patient/p1", "Patient/p2"]
PEOPLE = ["Practitioner/a", "Practitioner/b", "Organization/o1", "Organization/o2"]
PARTIES = [*PEOPLE, "Patient/p1", "RelatedPerson/r1"]
RESOURCES = ["DocumentReference/d1", "Observation/x1", "Task/t1", "Encounter/e1"]
RTYPES = ["DocumentReference", "Observation", "Task"]
MIMES = ["application/pdf", "text/plain"]
CODES = [(LOINC, "1"), (LOINC, "2"), ("http://other", "1")]
LABELS = [(CONF, "N"), (CONF, "R"), (ACTCODE, "PSY")]
PURPOSES = ["TREAT", "ETREAT", "HPAYMT"]
ACTIONS = ["access", "correct"]
DAYS = [date(2015, 1, 1) + timedelta(days=n) for n in range(0, 8)]


# ---------------------------------------------------------------------------------------------
# The naive reference (consent.md §3)
# ---------------------------------------------------------------------------------------------


def ref_bounds(text: str) -> tuple[datetime, datetime]:
    """[first instant, first instant after) of a date or a whole-second UTC dateTime."""
    if "T" in text:
        start = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return start, start + timedelta(seconds=1)
    day = date.fromisoformat(text)
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def ref_period(period: dict[str, str]) -> tuple[datetime | None, datetime | None]:
    start = ref_bounds(period["start"])[0] if "start" in period else None
    end = ref_bounds(period["end"])[1] if "end" in period else None
    return start, end


def ref_in(t: datetime, period: dict[str, str]) -> bool:
    """'period contains the time' (inclusive end at the end's precision)."""
    start, end = ref_period(period)
    return (start is None or start <= t) and (end is None or t < end)


def codes_of(concepts: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(c["system"], c["code"]) for cc in concepts for c in cc["coding"]}


def ref_matches(p: dict[str, Any], request: AccessRequest, res: ResourceFacts) -> bool:
    """consent.md §3.3: every criterion the provision populates matches."""
    if "period" in p and not ref_in(request.at, p["period"]):
        return False
    if "dataPeriod" in p:
        if res.clinical_period is None:
            return False
        c_start, c_end = res.clinical_period
        c_start = c_start or c_end
        c_end = c_end or c_start
        if c_start is None or c_end is None:
            return False
        start, end = ref_period(p["dataPeriod"])
        if (start is not None and c_start < start) or (end is not None and c_end >= end):
            return False
    if "actor" in p:
        groups: dict[str, set[str]] = {"recipients": set(), "custodians": set(), "authors": set()}
        for a in p["actor"]:
            role = a["role"]["coding"][0]["code"] if "role" in a else None
            group = (
                "custodians"
                if role == "CST"
                else "authors"
                if role in ("AUT", "INF", "ENT")
                else "recipients"
            )
            groups[group].add(a["reference"]["reference"])
        if groups["recipients"] and not groups["recipients"] & request.requesters:
            return False
        if groups["custodians"] and res.custodian not in groups["custodians"]:
            return False
        if groups["authors"] and not groups["authors"] & res.authors:
            return False
    if "action" in p and request.action not in {c for _, c in codes_of(p["action"])}:
        return False
    if "purpose" in p and not {c["code"] for c in p["purpose"]} & request.purposes:
        return False
    if "class" in p:
        ok = any(
            (c["system"] == RESOURCE_TYPES and c["code"] == res.resource_type)
            or (c["system"] == MIME and c["code"] in res.content_types)
            for c in p["class"]
        )
        if not ok:
            return False
    if "code" in p and not codes_of(p["code"]) & res.codes:
        return False
    if "securityLabel" in p:
        labels = {(c["system"], c["code"]) for c in p["securityLabel"]}
        if not labels & (res.security_labels or {(CONF, "N")}):  # none counts as N
            return False
    if "data" in p:
        ok = False
        for item in p["data"]:
            target = item["reference"]["reference"]
            meaning = item["meaning"]
            if meaning == "instance":
                ok |= target == res.ref
            elif meaning == "related":
                ok |= target == res.ref or target in res.references
            elif meaning == "dependents":
                ok |= target == res.ref or target in res.referenced_by
            else:
                ok |= target in res.authors
        if not ok:
            return False
    return True


def flip(d: str) -> str:
    return "deny" if d == "permit" else "permit"


def ref_evaluate(
    p: dict[str, Any],
    parent: str,
    request: AccessRequest,
    res: ResourceFacts,
    path: tuple[int, ...],
) -> tuple[str, tuple[int, ...]] | None:
    """consent.md §3.4, literally."""
    if not ref_matches(p, request, res):
        return None
    d = p.get("type") or flip(parent)
    children = [
        ref_evaluate(child, d, request, res, (*path, i))
        for i, child in enumerate(p.get("provision", []))
    ]
    said = [c for c in children if c is not None]
    for decision, where in said:
        if decision == "deny":
            return "deny", where
    for decision, where in said:
        if decision == "permit":
            return "permit", where
    return d, path


def ref_base(consent: dict[str, Any]) -> str:
    codes = {c["code"] for c in consent.get("policyRule", {}).get("coding", [])}
    uris = [p["uri"] for p in consent.get("policy", [])]
    return "permit" if "OPTIN" in codes or any(u.endswith("/opt-in") for u in uris) else "deny"


def ref_consent(
    consent: dict[str, Any], request: AccessRequest, res: ResourceFacts
) -> tuple[str | None, bool, tuple[int, ...]]:
    """consent.md §3.1, §3.5: (decision, explicit, path)."""
    if consent["status"] != "active" or consent["patient"]["reference"] != res.patient:
        return None, False, ()
    base = ref_base(consent)
    if "provision" not in consent:
        return base, False, ()
    found = ref_evaluate(consent["provision"], base, request, res, ())
    if found is None:
        return base, False, ()
    return found[0], True, found[1]


def ref_deny_names(
    p: dict[str, Any], parent: str, request: AccessRequest, res: ResourceFacts, above: set[str]
) -> set[str]:
    """Actors on the chain to every matching provision that decides deny by itself."""
    if not ref_matches(p, request, res):
        return set()
    d = p.get("type") or flip(parent)
    chain = above | {a["reference"]["reference"] for a in p.get("actor", [])}
    children = p.get("provision", [])
    said = [ref_evaluate(c, d, request, res, ()) for c in children]
    named: set[str] = set()
    for child in children:
        named |= ref_deny_names(child, d, request, res, chain)
    if d == "deny" and all(s is None for s in said):
        named |= chain
    return named


def ref_decide(
    consents: list[dict[str, Any]],
    request: AccessRequest,
    res: ResourceFacts,
    representatives: frozenset[str],
    break_glass: bool,
) -> tuple[str, str, list[tuple[str, tuple[int, ...]]]]:
    """consent.md §3, last paragraphs: (decision, reason, deciding (id, path) in input order)."""
    if res.patient is not None and res.patient in request.requesters:
        return "permit", "patient-self", []
    if res.patient is not None and representatives & request.requesters:
        return "permit", "representative", []
    tiers: dict[tuple[bool, str], list[tuple[str, tuple[int, ...]]]] = {
        (True, "deny"): [],
        (True, "permit"): [],
        (False, "deny"): [],
        (False, "permit"): [],
    }
    named: set[str] = set()
    for c in consents:
        decision, explicit, path = ref_consent(c, request, res)
        if decision is None:
            continue
        tiers[(explicit, decision)].append((c["id"], path))
        if explicit and decision == "deny":
            named |= ref_deny_names(c["provision"], ref_base(c), request, res, set())
    outcome: tuple[str, str, list[tuple[str, tuple[int, ...]]]] = ("deny", "default-deny", [])
    for explicit, decision in [
        (True, "deny"),
        (True, "permit"),
        (False, "deny"),
        (False, "permit"),
    ]:
        if tiers[(explicit, decision)]:
            reason = "consent-explicit" if explicit else "consent-implicit"
            outcome = (decision, reason, tiers[(explicit, decision)])
            break
    if outcome[0] == "permit":
        return outcome
    if named & request.requesters:
        return outcome
    if res.custodian is not None and res.custodian in request.requesters:
        return "permit", "custodian", []
    if break_glass and "ETREAT" in request.purposes:
        return "permit", "break-glass", []
    return outcome


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def sub(pool: list[Any], min_size: int = 1, max_size: int = 2) -> st.SearchStrategy[list[Any]]:
    return st.lists(st.sampled_from(pool), min_size=min_size, max_size=max_size, unique=True)


time_text = st.one_of(
    st.sampled_from(DAYS).map(lambda d: d.isoformat()),
    st.tuples(st.sampled_from(DAYS), st.sampled_from([0, 12, 23])).map(
        lambda t: f"{t[0].isoformat()}T{t[1]:02d}:00:00Z"
    ),
)


@st.composite
def periods(draw: st.DrawFn) -> dict[str, str]:
    a, b = draw(time_text), draw(time_text)
    if ref_bounds(a)[0] > ref_bounds(b)[1] - timedelta(microseconds=1):
        a, b = b, a
    if ref_bounds(a)[0] > ref_bounds(b)[1] - timedelta(microseconds=1):
        b = a  # e.g. 2015-01-02T12:00Z vs 2015-01-02: use one value for both ends
    which = draw(st.sampled_from(["both", "start", "end"]))
    if which == "start":
        return {"start": a}
    if which == "end":
        return {"end": b}
    return {"start": a, "end": b}


actors = st.builds(
    lambda ref, role: (
        {"reference": {"reference": ref}}
        | ({"role": {"coding": [{"system": PARTICIPATION, "code": role}]}} if role else {})
    ),
    st.sampled_from([*PEOPLE, "Patient/p1"]),
    st.sampled_from([None, "PRCP", "IRCP", "CST", "AUT", "INF"]),
)

criteria: dict[str, st.SearchStrategy[Any]] = {
    "period": periods(),
    "dataPeriod": periods(),
    "actor": st.lists(actors, min_size=1, max_size=2),
    "action": sub(ACTIONS).map(
        lambda cs: [{"coding": [{"system": ACTION, "code": c}]} for c in cs]
    ),
    "purpose": sub(PURPOSES).map(lambda cs: [{"system": ACT_REASON, "code": c} for c in cs]),
    "class": st.lists(
        st.one_of(
            st.sampled_from(RTYPES).map(lambda t: {"system": RESOURCE_TYPES, "code": t}),
            st.sampled_from(MIMES).map(lambda m: {"system": MIME, "code": m}),
        ),
        min_size=1,
        max_size=2,
    ),
    "code": sub(CODES).map(lambda cs: [{"coding": [{"system": s, "code": c}]} for s, c in cs]),
    "securityLabel": sub(LABELS).map(lambda cs: [{"system": s, "code": c} for s, c in cs]),
    "data": st.lists(
        st.builds(
            lambda m, r: {"meaning": m, "reference": {"reference": r}},
            st.sampled_from(["instance", "related", "dependents", "authoredby"]),
            st.sampled_from([*RESOURCES, "Practitioner/a"]),
        ),
        min_size=1,
        max_size=2,
    ),
}


@st.composite
def provisions(draw: st.DrawFn, depth: int = 0) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(sorted(criteria)), max_size=2, unique=True))
    p: dict[str, Any] = {k: draw(criteria[k]) for k in keys}
    kind = draw(st.sampled_from([None, None, "permit", "deny"]))
    if kind is not None:
        p["type"] = kind
    if depth < 3:
        kids = draw(st.lists(provisions(depth + 1), max_size=3 if depth == 0 else 2))
        if kids:
            p["provision"] = kids
    return p


@st.composite
def consents(draw: st.DrawFn, cid: str) -> dict[str, Any]:
    c: dict[str, Any] = {
        "resourceType": "Consent",
        "id": cid,
        "status": draw(st.sampled_from(["active"] * 6 + ["inactive", "proposed"])),
        "patient": {"reference": draw(st.sampled_from(["Patient/p1"] * 4 + ["Patient/p2"]))},
    }
    policy = draw(st.sampled_from(["OPTIN", "OPTOUT", "uri-in", "uri-out", None]))
    if policy in ("OPTIN", "OPTOUT"):
        c["policyRule"] = {"coding": [{"system": ACTCODE, "code": policy}]}
    elif policy == "uri-in":
        c["policy"] = [{"uri": "https://example.org/policy/opt-in"}]
    elif policy == "uri-out":
        c["policy"] = [{"uri": "https://example.org/policy/opt-out"}]
    if draw(st.booleans() | st.just(True)):
        c["provision"] = draw(provisions())
    return c


instants = st.tuples(
    st.sampled_from(DAYS), st.sampled_from([(0, 0), (12, 0), (23, 59)]), st.sampled_from([0, 59])
).map(lambda t: datetime(t[0].year, t[0].month, t[0].day, *t[1], t[2], tzinfo=UTC))

requests = st.builds(
    lambda who, action, purposes, when: AccessRequest(
        frozenset(who), action, frozenset(purposes), at=when
    ),
    sub(PARTIES, 1, 3),
    st.sampled_from(ACTIONS),
    sub(PURPOSES, 1, 2),
    instants,
)


@st.composite
def resources(draw: st.DrawFn) -> ResourceFacts:
    rtype = draw(st.sampled_from(RTYPES))
    ref = draw(st.sampled_from([r for r in RESOURCES if r.startswith(rtype)] or [f"{rtype}/z"]))
    clinical = draw(
        st.one_of(
            st.none(),
            st.tuples(instants, st.none()),
            st.tuples(instants, instants).map(lambda t: (min(t), max(t))),
        )
    )
    return ResourceFacts(
        ref=ref,
        resource_type=rtype,
        patient=draw(st.sampled_from(["Patient/p1"] * 6 + ["Patient/p2", None])),
        custodian=draw(st.sampled_from(["Organization/o1", "Organization/o2", None])),
        authors=frozenset(draw(sub(PEOPLE, 0, 2))),
        codes=frozenset(draw(sub(CODES, 0, 2))),
        content_types=frozenset(draw(sub(MIMES, 0, 1))),
        security_labels=frozenset(draw(sub(LABELS, 0, 2))),
        clinical_period=clinical,
        references=frozenset(draw(sub(RESOURCES, 0, 2))),
        referenced_by=frozenset(draw(sub(RESOURCES, 0, 2))),
    )


consent_lists = st.integers(min_value=0, max_value=4).flatmap(
    lambda n: st.tuples(*[consents(f"c{i}") for i in range(n)]).map(list)
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(
    raw=consents("c0"),
    request=requests,
    resource=resources(),
    applicable=st.sampled_from([True, True, True, False]),
)
def test_one_consent_matches_the_reference(
    raw: dict[str, Any], request: AccessRequest, resource: ResourceFacts, applicable: bool
) -> None:
    if applicable and resource.patient is not None:
        raw = {**raw, "status": "active", "patient": {"reference": resource.patient}}
    compiled = compile_consent(raw)
    assert compiled.error is None, compiled.error
    result = evaluate_consent(compiled, request, resource)
    decision, explicit, path = ref_consent(raw, request, resource)
    event(f"{decision} explicit={explicit} depth={len(path)}")
    assert (result.decision, result.explicit, result.provision_path) == (decision, explicit, path)


@SETTINGS
@given(
    raws=consent_lists,
    request=requests,
    resource=resources(),
    representatives=st.sampled_from([frozenset(), frozenset({"RelatedPerson/r1"})]),
    break_glass=st.booleans(),
)
def test_decide_matches_the_reference(
    raws: list[dict[str, Any]],
    request: AccessRequest,
    resource: ResourceFacts,
    representatives: frozenset[str],
    break_glass: bool,
) -> None:
    compiled = [compile_consent(r) for r in raws]
    got = decide(
        compiled,
        request,
        resource,
        representatives=representatives,
        break_glass_enabled=break_glass,
    )
    want = ref_decide(raws, request, resource, representatives, break_glass)
    indexed = decide(
        ConsentSet(compiled),
        request,
        resource,
        representatives=representatives,
        break_glass_enabled=break_glass,
    )
    assert indexed == got
    deciding = [(r.consent_id, r.provision_path) for r in got.deciding]
    event(f"{got.reason.value} {got.decision.value}")
    assert (got.decision.value, got.reason.value, deciding) == want


def _permit_reachable(
    p: dict[str, Any], parent: str, request: AccessRequest, res: ResourceFacts
) -> bool:
    """Is there a matching chain from the root to a provision whose decision is permit?"""
    if not ref_matches(p, request, res):
        return False
    d = p.get("type") or flip(parent)
    return d == "permit" or any(
        _permit_reachable(c, d, request, res) for c in p.get("provision", [])
    )


@SETTINGS
@given(raws=consent_lists, request=requests, resource=resources(), break_glass=st.booleans())
def test_no_matching_permit_means_no_access(
    raws: list[dict[str, Any]], request: AccessRequest, resource: ResourceFacts, break_glass: bool
) -> None:
    """A requester with no matching permit (and no OPTIN base) is never permitted (§3)."""
    compiled = [compile_consent(r) for r in raws]
    d = decide(compiled, request, resource, break_glass_enabled=break_glass)
    assert decide(ConsentSet(compiled), request, resource, break_glass_enabled=break_glass) == d
    if d.decision is not Decision.PERMIT:
        return
    applicable = [
        c for c in raws if c["status"] == "active" and c["patient"]["reference"] == resource.patient
    ]
    reasons = {
        Reason.PATIENT_SELF: resource.patient in request.requesters,
        Reason.CUSTODIAN: resource.custodian in request.requesters,
        Reason.BREAK_GLASS: break_glass and "ETREAT" in request.purposes,
        Reason.CONSENT_IMPLICIT: any(ref_base(c) == "permit" for c in applicable),
        Reason.CONSENT_EXPLICIT: any(
            "provision" in c and _permit_reachable(c["provision"], ref_base(c), request, resource)
            for c in applicable
        ),
    }
    assert reasons.get(d.reason, False), d


@SETTINGS
@given(
    raws=consent_lists,
    request=requests,
    resource=resources(),
    who=st.sampled_from(PEOPLE),
    break_glass=st.booleans(),
)
def test_an_explicit_deny_naming_the_requester_always_denies(
    raws: list[dict[str, Any]],
    request: AccessRequest,
    resource: ResourceFacts,
    who: str,
    break_glass: bool,
) -> None:
    """Adding "deny <who>" denies <who>, whatever else holds, unless it is the patient (§3)."""
    if resource.patient is None:
        return
    deny = {
        "resourceType": "Consent",
        "id": "deny",
        "status": "active",
        "patient": {"reference": resource.patient},
        "policyRule": {"coding": [{"system": ACTCODE, "code": "OPTIN"}]},
        "provision": {"type": "deny", "actor": [{"reference": {"reference": who}}]},
    }
    requesters = request.requesters | {who}
    named = AccessRequest(requesters, request.action, request.purposes, at=request.at)
    compiled = [compile_consent(r) for r in [*raws, deny]]
    d = decide(compiled, named, resource, break_glass_enabled=break_glass)
    assert decide(ConsentSet(compiled), named, resource, break_glass_enabled=break_glass) == d
    if resource.patient in requesters:
        assert d.reason is Reason.PATIENT_SELF
    else:
        assert d.decision is Decision.DENY and d.reason is Reason.CONSENT_EXPLICIT


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
consent_keys = st.sampled_from(
    ["provision", "policyRule", "policy", "patient", "status", "period", "actor", "type"]
)


@settings(max_examples=300, deadline=None)
@given(
    base=consents("fuzz"),
    path=st.lists(st.sampled_from(["provision", 0, "actor", "period", "data"]), max_size=3),
    key=consent_keys,
    junk=json_values,
    request=requests,
    resource=resources(),
)
def test_junk_never_crashes_and_never_grants_by_itself(
    base: dict[str, Any],
    path: list[Any],
    key: str,
    junk: Any,
    request: AccessRequest,
    resource: ResourceFacts,
) -> None:
    """Random junk in a Consent: no exception; if rejected it decides nothing (§3.1)."""
    target: Any = base
    for step in path:
        try:
            target = target[step]
        except (KeyError, IndexError, TypeError):
            break
    if isinstance(target, dict):
        target[key] = junk
    compiled = compile_consent(base)
    result = evaluate_consent(compiled, request, resource)
    if compiled.error is not None:
        assert result.decision is None and not compiled.applicable
    d = decide([compiled], request, resource)
    assert decide(ConsentSet([compiled]), request, resource) == d
    assert d.decision in (Decision.PERMIT, Decision.DENY)
