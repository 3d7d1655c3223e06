"""The SQL filter agrees with the pure engine, and no path leaks (consent.md §3, §4).

Hypothesis builds random worlds — patients, a legal or non-legal RelatedPerson, practitioners
with active and inactive PractitionerRoles, DocumentReferences, Tasks and Encounters with
random custodians, authors, codes, labels, content types, clinical dates and references, and
random Consents (nested provisions with every criterion) — stores them through the HTTP API
(on SQLite and PostgreSQL), then asks as a random requester at a random time with random
purposes, with break-glass on or off.

* :func:`test_sql_filter_agrees_with_decide`: for every resource, search (by ``_id``), count
  and read return it exactly when ``decide()`` — over ``facts_from_resource`` of the stored
  JSON and the requester set worked out here from the generated roles — permits it.
* :func:`test_no_path_returns_what_decide_refuses`: paging, POST ``_search``, ``_include``,
  ``_revinclude``, type and instance history, vread and ``$everything`` never return a resource
  ``decide()`` refuses, and return every permitted one where they should.
* :func:`test_indexed_facts_equal_facts_from_resource`: what the SQL reads from the index is
  what the engine reads from the JSON.

Each example lives in its own namespace (ids prefixed), so examples share one database.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from consent_kit import ACT_REASON, ACTCODE, ACTION, CONF, LOINC, PARTICIPATION, Env, make_env
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fhir_consent.auth import AccessContext
from fhir_consent.config import Settings
from fhir_consent.consent import (
    AccessRequest,
    Decision,
    compile_consent,
    decide,
    facts_from_resource,
)
from fhir_consent.consent.sql import indexed_facts
from fhir_consent.fhir.searchparams import extract
from smart_on_fhir.scopes import parse_scopes

RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
MIME = "urn:ietf:bcp:13"
DAYS = [f"2015-01-{d:02d}" for d in range(1, 8)]
CODES = [(LOINC, "1"), (LOINC, "2"), ("http://other", "1"), (None, "1")]
LABELS = [(CONF, "N"), (CONF, "R"), (ACTCODE, "PSY")]
CTYPES = ["application/pdf", "Text/Plain; charset=utf-8", "text/plain", "application/hl7-cda+xml"]
PEOPLE = ["Practitioner/@a", "Practitioner/@b", "Organization/@o1", "Organization/@o2"]
PARTIES = [*PEOPLE, "Organization/@o3", "Patient/@p1", "RelatedPerson/@r1"]
PURPOSES = ["TREAT", "ETREAT", "HPAYMT"]
TYPES = [
    "DocumentReference",
    "Task",
    "Encounter",
    "Provenance",
    "Patient",
    "Consent",
    "RelatedPerson",
]


def sub(pool: list[Any], lo: int = 1, hi: int = 2) -> st.SearchStrategy[list[Any]]:
    return st.lists(st.sampled_from(pool), min_size=lo, max_size=hi, unique=True)


def coding(pair: tuple[str | None, str]) -> dict[str, str]:
    system, code = pair
    return {"code": code} if system is None else {"system": system, "code": code}


time_text = st.one_of(
    st.sampled_from(DAYS),
    st.tuples(st.sampled_from(DAYS), st.sampled_from(["00", "12", "23"])).map(
        lambda t: f"{t[0]}T{t[1]}:00:00Z"
    ),
)


@st.composite
def resource_periods(draw: st.DrawFn) -> dict[str, str]:
    """Any Period a client may send: one end, both, even backwards."""
    which = draw(st.sampled_from(["both", "start", "end"]))
    out = {}
    if which in ("both", "start"):
        out["start"] = draw(time_text)
    if which in ("both", "end"):
        out["end"] = draw(time_text)
    return out


@st.composite
def consent_periods(draw: st.DrawFn) -> dict[str, str]:
    """A Period the engine accepts (start not after end)."""
    a, b = sorted([draw(st.sampled_from(DAYS)), draw(st.sampled_from(DAYS))])
    which = draw(st.sampled_from(["both", "start", "end"]))
    return (
        {"start": a}
        if which == "start"
        else {"end": b}
        if which == "end"
        else {"start": a, "end": b}
    )


def build_criteria(refs: list[str]) -> dict[str, st.SearchStrategy[Any]]:
    actor = st.builds(
        lambda ref, role: {
            "reference": {"reference": ref},
            "role": {"coding": [{"system": PARTICIPATION, "code": role}]},
        },
        st.sampled_from(PARTIES),
        st.sampled_from(["PRCP", "IRCP", "CST", "AUT", "INF", "WIT"]),  # WIT: no group → recipient
    )
    return {
        "period": consent_periods(),
        "dataPeriod": consent_periods(),
        "actor": st.lists(actor, min_size=1, max_size=2),
        "action": sub(["access", "correct"]).map(
            lambda cs: [{"coding": [{"system": ACTION, "code": c}]} for c in cs]
        ),
        "purpose": sub(PURPOSES).map(lambda cs: [{"system": ACT_REASON, "code": c} for c in cs]),
        "class": st.lists(
            st.one_of(
                st.sampled_from(TYPES).map(lambda t: {"system": RESOURCE_TYPES, "code": t}),
                st.sampled_from(["application/pdf", "text/plain"]).map(
                    lambda m: {"system": MIME, "code": m}
                ),
            ),
            min_size=1,
            max_size=2,
        ),
        "code": sub(CODES).map(lambda cs: [{"coding": [coding(p)]} for p in cs]),
        "securityLabel": sub(LABELS).map(lambda cs: [coding(p) for p in cs]),
        "data": st.lists(
            st.builds(
                lambda m, r: {"meaning": m, "reference": {"reference": r}},
                st.sampled_from(["instance", "related", "dependents", "authoredby"]),
                st.sampled_from([*refs, "Practitioner/@a", "Patient/@p1"]),
            ),
            min_size=1,
            max_size=2,
        ),
    }


@st.composite
def provisions(draw: st.DrawFn, criteria: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(sorted(criteria)), max_size=2, unique=True))
    p: dict[str, Any] = {k: draw(criteria[k]) for k in keys}
    kind = draw(st.sampled_from([None, None, "permit", "deny"]))
    if kind is not None:
        p["type"] = kind
    if depth < 2:
        kids = draw(st.lists(provisions(criteria, depth + 1), max_size=2))
        if kids:
            p["provision"] = kids
    return p


def meta(draw: st.DrawFn) -> dict[str, Any]:
    labels = draw(sub(LABELS, 0, 2))
    return {"meta": {"security": [coding(p) for p in labels]}} if labels else {}


@st.composite
def documents(draw: st.DrawFn, rid: str, refs: list[str]) -> dict[str, Any]:
    d: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "id": rid,
        "status": "current",
        "content": [{"attachment": {"contentType": draw(st.sampled_from(CTYPES))}}],
        **meta(draw),
    }
    patient = draw(st.sampled_from(["Patient/@p1", "Patient/@p1", "Patient/@p2", None]))
    if patient:
        d["subject"] = {"reference": patient}
    custodian = draw(st.sampled_from(["Organization/@o1", "Organization/@o2", None]))
    if custodian:
        d["custodian"] = {"reference": custodian}
    authors = draw(
        sub(["Practitioner/@a", "Practitioner/@b", "Organization/@o2", "Patient/@p1"], 0)
    )
    if authors:
        d["author"] = [{"reference": a} for a in authors]
    codes = draw(sub(CODES, 0, 2))
    if codes:
        d["type"] = {"coding": [coding(codes[0])]}
        d["category"] = [{"coding": [coding(c)]} for c in codes[1:]]
    labels = draw(sub(LABELS, 0, 1))
    if labels:
        d["securityLabel"] = [{"coding": [coding(labels[0])]}]
    context: dict[str, Any] = {}
    if draw(st.booleans()):
        context["period"] = draw(resource_periods())
    related = draw(sub(refs, 0, 2)) if refs else []
    if related:
        context["related"] = [{"reference": r} for r in related]
    if context:
        d["context"] = context
    if draw(st.booleans()):
        d["date"] = draw(st.sampled_from(DAYS)) + "T06:30:00Z"
    return d


@st.composite
def tasks(draw: st.DrawFn, rid: str, refs: list[str]) -> dict[str, Any]:
    t: dict[str, Any] = {
        "resourceType": "Task",
        "id": rid,
        "status": "requested",
        "intent": "order",
        "for": {"reference": draw(st.sampled_from(["Patient/@p1", "Patient/@p2"]))},
        **meta(draw),
    }
    codes = draw(sub(CODES, 0, 1))
    if codes:
        t["code"] = {"coding": [coding(codes[0])]}
    if draw(st.booleans()):
        t["executionPeriod"] = draw(resource_periods())
    if draw(st.booleans()):
        t["authoredOn"] = draw(st.sampled_from(DAYS)) + "T10:00:00Z"
    focus = draw(sub(refs, 0, 1)) if refs else []
    if focus:
        t["focus"] = {"reference": focus[0]}
    return t


@st.composite
def encounters(draw: st.DrawFn, rid: str, refs: list[str]) -> dict[str, Any]:
    e: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": rid,
        "status": "finished",
        "class": {"system": ACTCODE, "code": "AMB"},
        "subject": {"reference": draw(st.sampled_from(["Patient/@p1", "Patient/@p2"]))},
        **meta(draw),
    }
    codes = draw(sub(CODES, 0, 1))
    if codes:
        e["type"] = [{"coding": [coding(codes[0])]}]
    if draw(st.booleans()):
        e["period"] = draw(resource_periods())
    return e


@st.composite
def provenances(draw: st.DrawFn, rid: str, refs: list[str]) -> dict[str, Any]:
    """Provenance: its patient is the *first* Patient among its targets."""
    targets = draw(sub(["Patient/@p1", "Patient/@p2", *refs], 1, 3))
    return {
        "resourceType": "Provenance",
        "id": rid,
        "target": [{"reference": t} for t in targets],
        "recorded": draw(st.sampled_from(DAYS)) + "T08:00:00Z",
        "agent": [{"who": {"reference": w}} for w in draw(sub(PEOPLE, 1, 2))],
        **meta(draw),
    }


@dataclass
class World:
    """One generated world (references use ``@`` for the example's namespace)."""

    when: str
    roles: dict[str, str]  # role id → active | inactive | expired | future
    legal: bool
    resources: list[dict[str, Any]] = field(default_factory=list)
    consents: list[dict[str, Any]] = field(default_factory=list)
    requester: str = "a"
    purposes: frozenset[str] = frozenset({"TREAT"})
    break_glass: bool = False


@st.composite
def worlds(draw: st.DrawFn) -> World:
    w = World(
        when=draw(st.sampled_from(DAYS)) + draw(st.sampled_from(["T00:00:00Z", "T12:00:00Z"])),
        roles={
            "a-o1": "active",
            "a-o3": draw(st.sampled_from(["active", "inactive", "expired", "future"])),
            "b-o2": draw(st.sampled_from(["active", "inactive"])),
        },
        legal=draw(st.booleans()),
    )
    refs: list[str] = []
    for i in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["d", "d", "t", "e", "v"]))
        rid = f"@{kind}{i}"
        maker = {"d": documents, "t": tasks, "e": encounters, "v": provenances}[kind]
        resource = draw(maker(rid, list(refs)))
        w.resources.append(resource)
        refs.append(f"{resource['resourceType']}/{rid}")
    criteria = build_criteria(refs or ["DocumentReference/@none"])
    for i in range(draw(st.integers(0, 3))):
        c: dict[str, Any] = {
            "resourceType": "Consent",
            "id": f"@c{i}",
            "status": draw(st.sampled_from(["active"] * 5 + ["inactive", "proposed"])),
            "scope": {"coding": [{"code": "patient-privacy"}]},
            "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
            "patient": {"reference": draw(st.sampled_from(["Patient/@p1"] * 3 + ["Patient/@p2"]))},
        }
        policy = draw(st.sampled_from(["OPTIN", "OPTOUT", "uri-in", None]))
        if policy in ("OPTIN", "OPTOUT"):
            c["policyRule"] = {"coding": [{"system": ACTCODE, "code": policy}]}
        elif policy == "uri-in":
            c["policy"] = [{"uri": "https://example.org/policy/opt-in"}]
        if draw(st.booleans() | st.just(True)):
            c["provision"] = draw(provisions(criteria))
        w.consents.append(c)
    w.requester = draw(st.sampled_from(["a", "a", "b", "sys", "p1", "r1"]))
    w.purposes = frozenset(draw(sub(PURPOSES, 1, 2)))
    w.break_glass = draw(st.booleans())
    return w


# ---------------------------------------------------------------------------------------------
# Storing a world, asking, and the expected answer
# ---------------------------------------------------------------------------------------------


def _role(rid: str, state: str, when: str) -> dict[str, Any]:
    practitioner, org = rid.split("-")
    role: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "id": f"@{rid}",
        "practitioner": {"reference": f"Practitioner/@{practitioner}"},
        "organization": {"reference": f"Organization/@{org}"},
        "active": state != "inactive",
    }
    day = when[:10]
    if state == "expired":
        role["period"] = {"start": "2014-01-01", "end": "2014-12-31"}
    elif state == "future":
        role["period"] = {"start": "2016-01-01"}
    elif state == "active":
        role["period"] = {"start": "2014-01-01", "end": day}  # inclusive of the whole day
    return role


@dataclass
class Stored:
    """A world as stored: its namespace, expected requester set, and the stored JSON."""

    ns: str
    access: AccessContext
    requesters: frozenset[str]
    representatives: frozenset[str]
    clinician: bool
    resources: dict[str, dict[str, Any]]  # Type/id → stored JSON (patient-data resources)
    others: dict[str, dict[str, Any]]  # directory resources (roles, practitioners, …)


def store(env: Env, w: World) -> Stored:
    ns = uuid.uuid4().hex[:10] + "-"

    def nsd(obj: Any) -> Any:
        return json.loads(json.dumps(obj).replace("@", ns))

    env.as_open()
    env.clock.set(w.when)
    directory: list[dict[str, Any]] = [
        {"resourceType": "Organization", "id": f"@{o}"} for o in ("o1", "o2", "o3")
    ]
    directory += [{"resourceType": "Practitioner", "id": f"@{p}"} for p in ("a", "b")]
    directory += [_role(rid, state, w.when) for rid, state in w.roles.items()]
    data: list[dict[str, Any]] = [{"resourceType": "Patient", "id": f"@{p}"} for p in ("p1", "p2")]
    data.append(
        {
            "resourceType": "RelatedPerson",
            "id": "@r1",
            "patient": {"reference": "Patient/@p1"},
            "relationship": [
                {"coding": [{"system": ROLE, "code": "GUARD" if w.legal else "FRND"}]}
            ],
        }
    )
    data += w.resources + w.consents
    stored: dict[str, dict[str, Any]] = {}
    others: dict[str, dict[str, Any]] = {}
    for resource in directory:
        body = env.put(nsd(resource))
        others[f"{body['resourceType']}/{body['id']}"] = body
    for resource in data:
        body = env.put(nsd(resource))
        stored[f"{body['resourceType']}/{body['id']}"] = body

    requesters: set[str] = set()
    clinician = w.requester in ("a", "b")
    if clinician:
        requesters.add(f"Practitioner/{ns}{w.requester}")
        for rid, state in w.roles.items():
            if rid.startswith(w.requester + "-") and state == "active":
                requesters.add(f"Organization/{ns}{rid.split('-')[1]}")
        access = AccessContext(
            scopes=parse_scopes("user/*.cruds"),
            fhir_user=f"Practitioner/{ns}{w.requester}",
            purpose_of_use=w.purposes,
        )
    elif w.requester == "sys":
        requesters.add(f"Organization/{ns}o2")
        access = AccessContext(
            scopes=parse_scopes("system/*.cruds"),
            client_organization=f"Organization/{ns}o2",
            purpose_of_use=w.purposes,
        )
    else:
        who = f"{'Patient' if w.requester == 'p1' else 'RelatedPerson'}/{ns}{w.requester}"
        requesters.add(who)
        access = AccessContext(
            scopes=parse_scopes("user/*.cruds"), fhir_user=who, purpose_of_use=w.purposes
        )
    reps = frozenset({f"RelatedPerson/{ns}r1"}) if w.requester == "r1" and w.legal else frozenset()
    return Stored(ns, access, frozenset(requesters), reps, clinician, stored, others)


ROLE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"


def expected(s: Stored, w: World) -> set[str]:
    """The references ``decide()`` permits, computed from the stored JSON alone."""
    everything = {**s.resources, **s.others}
    facts = {ref: facts_from_resource(body) for ref, body in everything.items()}
    referenced_by: dict[str, set[str]] = defaultdict(set)
    for ref, f in facts.items():
        for target in f.references:
            referenced_by[target].add(ref)
    consents = [compile_consent(b) for r, b in s.resources.items() if r.startswith("Consent/")]
    when = datetime.fromisoformat(w.when.replace("Z", "+00:00")).astimezone(UTC)
    request = AccessRequest(s.requesters, "access", w.purposes, at=when)
    out: set[str] = set()
    for ref, body in s.resources.items():
        f = facts_from_resource(body, frozenset(referenced_by[ref]))
        reps = s.representatives if f.patient == f"Patient/{s.ns}p1" else frozenset()
        d = decide(
            consents,
            request,
            f,
            representatives=reps,
            break_glass_enabled=w.break_glass and s.clinician,
        )
        if d.decision is Decision.PERMIT:
            out.add(ref)
    return out


def ask(env: Env, s: Stored, w: World) -> None:
    env.layer.enforcement.settings.break_glass = w.break_glass
    env.clock.set(w.when)
    env.caller.be(s.access)


def of_type(refs: Any, rtype: str) -> set[str]:
    return {r for r in refs if r.startswith(rtype + "/")}


def bundle_refs(bundle: dict[str, Any]) -> list[str]:
    return [
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if "resource" in e
    ]


@pytest.fixture
def env(settings: Settings) -> Iterator[Env]:
    with make_env(settings) as e:
        yield e


#: Examples per database (CI budget); FHIR_CONSENT_PROPERTY_EXAMPLES=500 for a deep run.
EXAMPLES = int(os.environ.get("FHIR_CONSENT_PROPERTY_EXAMPLES", "15"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(w=worlds())
def test_sql_filter_agrees_with_decide(env: Env, w: World) -> None:
    s = store(env, w)
    want = expected(s, w)
    event(f"permitted {min(len(want), 5)} of {min(len(s.resources), 9)}")
    ask(env, s, w)
    for rtype in TYPES:
        mine = of_type(s.resources, rtype)
        if not mine:
            continue
        ids = ",".join(sorted(r.split("/", 1)[1] for r in mine))
        found = env.get(f"{rtype}?_id={ids}&_count=500").json()
        assert set(bundle_refs(found)) == of_type(want, rtype), rtype
        assert found["total"] == len(of_type(want, rtype))
        counted = env.get(f"{rtype}?_id={ids}&_summary=count").json()["total"]
        assert counted == len(of_type(want, rtype))
    for ref in s.resources:
        status = env.get(ref).status_code
        assert status == (200 if ref in want else 404), ref


@settings(
    max_examples=max(2, EXAMPLES // 2),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(w=worlds())
def test_no_path_returns_what_decide_refuses(env: Env, w: World) -> None:
    s = store(env, w)
    want = expected(s, w)
    directory = set(s.others)
    ask(env, s, w)
    mine = set(s.resources)

    def only_allowed(refs: Any, where: str) -> None:
        leaked = (set(refs) & mine) - want
        assert not leaked, f"{where}: {sorted(leaked)}"
        assert not (set(refs) - mine - directory - {r for r in refs if s.ns not in r}), where

    for rtype in ("DocumentReference", "Task", "Patient", "Consent"):
        if not of_type(mine, rtype):
            continue
        ids = ",".join(sorted(r.split("/", 1)[1] for r in of_type(mine, rtype)))
        # paging: every page filtered, every permitted row once
        seen: list[str] = []
        page = env.get(f"{rtype}?_id={ids}&_count=2").json()
        while True:
            seen += bundle_refs(page)
            nxt = [x["url"] for x in page.get("link", []) if x["relation"] == "next"]
            if not nxt:
                break
            page = env.c.get(nxt[0].replace("https://testserver", "")).json()
        assert sorted(seen) == sorted(of_type(want, rtype)), f"paging {rtype}"
        posted = env.c.post(
            f"/fhir/{rtype}/_search",
            content=f"_id={ids}",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ).json()
        assert set(bundle_refs(posted)) == of_type(want, rtype), f"POST _search {rtype}"
        history = env.get(f"{rtype}/_history?_count=1000").json()
        only_allowed(bundle_refs(history), f"{rtype}/_history")
        assert of_type(want, rtype) <= set(bundle_refs(history)), f"{rtype}/_history"
    docs = of_type(mine, "DocumentReference") or {"DocumentReference/none"}
    includes = env.get(
        "DocumentReference?_include=DocumentReference:subject"
        "&_include=DocumentReference:related&_include=DocumentReference:custodian"
        "&_revinclude=Task:focus&_count=500&_id=" + ",".join(r.split("/", 1)[1] for r in docs)
    ).json()
    only_allowed(bundle_refs(includes), "_include")
    rev = env.get(
        f"Patient?_id={s.ns}p1,{s.ns}p2&_revinclude=DocumentReference:subject"
        "&_revinclude=Task:patient&_revinclude=Consent:patient&_revinclude=RelatedPerson:patient"
        "&_revinclude=Encounter:patient"
    ).json()
    only_allowed(bundle_refs(rev), "_revinclude")
    for ref in mine:
        allowed = ref in want
        assert env.get(f"{ref}/_history").status_code == (200 if allowed else 404), ref
        assert env.get(f"{ref}/_history/1").status_code == (200 if allowed else 404), ref
    for p in ("p1", "p2"):
        everything = env.get(f"Patient/{s.ns}{p}/$everything")
        allowed = f"Patient/{s.ns}{p}" in want
        assert everything.status_code == (200 if allowed else 404)
        if allowed:
            only_allowed(bundle_refs(everything.json()), "$everything")


def test_indexed_facts_equal_facts_from_resource() -> None:
    """What the SQL reads from the index is what the engine reads from the JSON, for every
    element the generated worlds use (including one-ended and backwards periods)."""

    @settings(max_examples=200, deadline=None)
    @given(
        st.one_of(
            documents("d", ["Task/t", "Encounter/e"]),
            tasks("t", ["DocumentReference/d"]),
            encounters("e", []),
            provenances("v", ["DocumentReference/d"]),
        )
    )
    def check(resource: dict[str, Any]) -> None:
        resource = json.loads(json.dumps(resource).replace("@", "x-"))
        by_json = facts_from_resource(resource)
        by_index = indexed_facts(resource["resourceType"], resource["id"], extract(resource))
        assert by_index == by_json

    check()
