"""``POST [base]/Consent/$decide`` (fhir_consent/consent/decider.py, docs/consent-decide.md) over
real HTTP (uvicorn on a loopback port, httpx), on SQLite and PostgreSQL.

* every row of consent.md §5 — the rows, requesters, data and examples of
  ``test_enforcement_examples`` (reused, not copied) — decided twice: with the resource stored
  here (the server reads its facts) and with the same facts sent as attributes (a gateway in
  front of another server); plus the two rows read/search cannot reach literally (the
  MedicationRequest of smartonfhir, the Observation of notThis);
* the answer names the deciding Consent version and provision, and every decision is an
  AuditEvent for the patient (break-glass ones before the answer leaves);
* negatives: malformed Parameters (400 naming the parameter, no patient data), unknown
  patient (404), an unknown token (401), the wrong scope (403, audited), break-glass purpose
  ETREAT without effect unless the deployment enables it.

Tokens map to callers through the kit's injected authenticator; ``test_decide_with_real_tokens``
runs the whole server (``create_app``) with SMART tokens from its own authorization server.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import load_example
from consent_kit import ROLECODE, Caller, Env, LiveServer, document, make_env
from smart.kit import World
from test_enforcement_examples import (  # the §5 data set of the read/search tests
    F001,
    O2,
    REQUESTERS,
    ROWS,
    SMART,
    Row,
    store_example,
)
from test_enforcement_examples import env as examples_env  # noqa: F401 - fixture: the parties
from test_story_smart import backend_token, story  # noqa: F401 - fixture: the whole server

from fhir_consent.audit import AuditSink
from fhir_consent.auth import AccessContext
from fhir_consent.config import Settings
from fhir_consent.consent.config import ConsentSettings
from fhir_consent.consent.decider import DECIDE_SCOPE, OPERATION_DEFINITION
from fhir_consent.consent.decider import install as install_decider
from smart_on_fhir.keys import generate_signing_key
from smart_on_fhir.scopes import parse_scopes

JSON = {"accept": "application/fhir+json", "content-type": "application/fhir+json"}
GATEWAY = AccessContext(
    scopes=parse_scopes(DECIDE_SCOPE), client_id="gateway", client_organization=None
)
CLINIC = Caller.system("Organization/o2")  # system/*.cruds, but not the decide scope

#: consent.md §5, the table's "explicit" marks: (example, request of ROWS) → explicit,
#: and, when the table says "nested", the deciding provision is a nested one.
EXPLICIT: dict[tuple[str, str], bool] = {
    ("basic", "as above"): True,
    ("basic", "at 2017-01-01"): False,
    ("Out", "as above"): False,
    ("Out", "custodian Organization/f001"): True,
    ("Emergency", "custodian f001, purpose ETREAT"): True,
    ("notThis", "the resource Task/example3"): True,
    ("notThis", "a document that references Task/example3"): True,
    ("notThis", "an unrelated DocumentReference"): False,
    ("notTime", "at 2015-01-15"): True,
    ("notTime", "at 2015-03-01"): False,
    ("notOrg", "requester {Organization/f001}"): True,
    ("notOrg", "as above"): False,
    ("notAuthor", "custodian Organization/f001"): True,
    ("notThem", "requester {Practitioner/f204, Organization/f001}"): True,
    ("notThem", "as above"): False,
    ("grantor", "requester {Patient/example}, custodian f001"): True,
    ("grantor", "requester {Patient/example}, custodian o2"): False,
    ("signature", "Practitioner/13, CDA by xcda-author, LOINC 34133-9"): True,
    ("signature", "Practitioner/13, any other document"): True,
    ("signature", "at 2016-01-01, as above"): False,
    ("smartonfhir", "at 2016-06-23T07:10Z, a DocumentReference"): True,
    ("smartonfhir", "at 2016-06-24"): False,
}
NESTED = {("signature", "Practitioner/13, CDA by xcda-author, LOINC 34133-9")}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def live(examples_env: Env) -> Iterator[tuple[Env, LiveServer]]:  # noqa: F811
    """The §5 parties of the read/search tests, with ``$decide`` installed and served."""
    env = examples_env
    install_decider(env.app, env.app.state.fhir, env.layer)
    env.caller.named.update({"gateway": GATEWAY, "clinic": CLINIC})
    with LiveServer(env.app) as server:
        yield env, server


def _bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {name}", **JSON}


def actors_of(access: AccessContext) -> list[str]:
    """What a gateway knows of a requester: its user and its client's Organization."""
    return [r for r in (access.fhir_user, access.client_organization) if r]


def ref(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "valueReference": {"reference": value}}


def parameters(
    patient: str,
    actors: list[str],
    *,
    resource: str | None = None,
    resource_type: str | None = None,
    purpose: str | None = None,
    extra: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    params = [ref("patient", patient), *(ref("actor", a) for a in actors)]
    if resource is not None:
        params.append(ref("resource", resource))
    if resource_type is not None:
        params.append({"name": "resourceType", "valueCode": resource_type})
    if purpose is not None:
        params.append(
            {
                "name": "purpose",
                "valueCoding": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                    "code": purpose,
                },
            }
        )
    params += extra or []
    return {"resourceType": "Parameters", "parameter": params}


def attributes_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A DocumentReference's decision attributes as $decide parameters."""
    out: list[dict[str, Any]] = []
    if "custodian" in doc:
        out.append(ref("custodian", doc["custodian"]["reference"]))
    out += [ref("author", a["reference"]) for a in doc.get("author", [])]
    out += [{"name": "type", "valueCoding": c} for c in doc.get("type", {}).get("coding", [])]
    out += [
        {"name": "contentType", "valueCode": c["attachment"]["contentType"]}
        for c in doc.get("content", [])
    ]
    out += [ref("reference", r["reference"]) for r in doc.get("context", {}).get("related", [])]
    return out


def answer(body: dict[str, Any]) -> dict[str, Any]:
    """The Parameters answer as {decision, reason, consents: [{reference, explicit, provision}],
    requesters}."""
    assert body["resourceType"] == "Parameters", body
    out: dict[str, Any] = {"consents": [], "requesters": set()}
    for p in body["parameter"]:
        if p["name"] in ("decision", "reason"):
            out[p["name"]] = p["valueCode"]
        elif p["name"] == "consent":
            part = {x["name"]: x for x in p["part"]}
            out["consents"].append(
                {
                    "reference": part["reference"]["valueReference"]["reference"],
                    "explicit": part["explicit"]["valueBoolean"],
                    "provision": part.get("provision", {}).get("valueString"),
                }
            )
        elif p["name"] == "requester":
            out["requesters"].add(p["valueReference"]["reference"])
    return out


def call(http: httpx.Client, body: Any, who: str = "gateway") -> httpx.Response:
    content = body if isinstance(body, bytes) else None
    return http.post(
        "Consent/$decide", content=content, json=None if content else body, headers=_bearer(who)
    )


def decided(http: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = call(http, body)
    assert r.status_code == 200, r.text
    return answer(r.json())


def check_row(got: dict[str, Any], row: Row, consent: str) -> None:
    what = f"{row.example}: {row.request}"
    assert got["decision"] == ("permit" if row.permit else "deny"), (what, got)
    explicit = EXPLICIT[(row.example, row.request)]
    assert got["reason"] == ("consent-explicit" if explicit else "consent-implicit"), (what, got)
    assert [c["reference"] for c in got["consents"]] == [consent], (what, got)
    (deciding,) = got["consents"]
    assert deciding["explicit"] is explicit, what
    if not explicit:
        assert deciding["provision"] is None, what
    elif (row.example, row.request) in NESTED:
        assert deciding["provision"].startswith("Consent.provision.provision["), what
    else:
        assert deciding["provision"] is not None, what


# ---------------------------------------------------------------------------------------------
# consent.md §5
# ---------------------------------------------------------------------------------------------


def test_explicit_marks_cover_the_rows() -> None:
    assert set(EXPLICIT) == {(r.example, r.request) for r in ROWS}


@pytest.mark.parametrize("example", sorted({r.example for r in ROWS}))
def test_section_5_rows_through_decide(live: tuple[Env, LiveServer], example: str) -> None:
    env, server = live
    stored = store_example(env, example)
    consent = f"Consent/{stored['id']}/_history/{stored['meta']['versionId']}"
    patient = stored["patient"]["reference"]
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        for row in (r for r in ROWS if r.example == example):
            env.clock.set(row.when)
            actors = actors_of(REQUESTERS[row.who])
            if isinstance(row.resource, str):  # a stored resource: Task/example3
                ways = [parameters(patient, actors, resource=row.resource, purpose=row.purpose)]
            else:
                doc = row.resource(patient)
                env.as_open()
                held = f"DocumentReference/{env.post(doc)}"
                ways = [
                    parameters(patient, actors, resource=held, purpose=row.purpose),
                    parameters(
                        patient,
                        actors,
                        resource=f"DocumentReference/elsewhere-{uuid.uuid4().hex[:8]}",
                        purpose=row.purpose,
                        extra=attributes_of(doc),
                    ),
                ]
            for body in ways:
                check_row(decided(http, body), row, consent)


def test_section_5_rows_only_decide_can_ask(live: tuple[Env, LiveServer]) -> None:
    """The two rows about resource types this server does not store, asked literally."""
    env, server = live
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        smart = store_example(env, "smartonfhir")
        env.clock.set(SMART)
        med = decided(
            http,
            parameters("Patient/xcda", ["Practitioner/x"], resource="MedicationRequest/m1"),
        )
        assert (med["decision"], med["reason"]) == ("permit", "consent-explicit")
        assert med["consents"] == [
            {
                "reference": f"Consent/{smart['id']}/_history/1",
                "explicit": True,
                "provision": "Consent.provision.provision[0]",  # "explicit, nested"
            }
        ]
        assert med["requesters"] == {"Practitioner/x", O2}  # x's active role (consent.md §1)

        store_example(env, "notThis")
        env.clock.set("2015-06-01T00:00:00Z")
        observation = parameters(
            "Patient/f001",
            ["Practitioner/x"],
            resource="Observation/o1",
            extra=[ref("reference", "Task/example3")],
        )
        got = decided(http, observation)
        assert (got["decision"], got["reason"]) == ("deny", "consent-explicit")
        unrelated = parameters("Patient/f001", ["Practitioner/x"], resource="Observation/o2")
        assert decided(http, unrelated)["decision"] == "permit"  # implicit OPTIN


def test_the_whole_rule_applies(live: tuple[Env, LiveServer]) -> None:
    """consent.md §3's exceptions above Consents: the custodian keeps its documents unless
    named, the patient and a legal representative always see the patient's data."""
    env, server = live
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        store_example(env, "Out")
        env.clock.set("2015-06-01T00:00:00Z")
        held = parameters(
            "Patient/f001",
            ["Practitioner/x"],
            resource_type="DocumentReference",
            extra=[ref("custodian", O2)],
        )
        custodian = decided(http, held)
        assert (custodian["decision"], custodian["reason"]) == ("permit", "custodian")
        own = decided(
            http, parameters("Patient/f001", ["Patient/f001"], resource_type="DocumentReference")
        )
        assert (own["decision"], own["reason"]) == ("permit", "patient-self")
        env.as_open()
        guardian = {
            "resourceType": "RelatedPerson",
            "id": "guardian",
            "patient": {"reference": "Patient/f001"},
            "relationship": [{"coding": [{"system": ROLECODE, "code": "GUARD"}]}],
        }
        env.put(guardian)
        env.put(guardian | {"id": "friend", "relationship": []})
        body = parameters(
            "Patient/f001", ["RelatedPerson/guardian"], resource_type="DocumentReference"
        )
        assert decided(http, body)["reason"] == "representative"
        body = parameters(
            "Patient/f001", ["RelatedPerson/friend"], resource_type="DocumentReference"
        )
        assert decided(http, body)["decision"] == "deny"


def test_revocation_is_in_force_for_the_next_call(live: tuple[Env, LiveServer]) -> None:
    env, server = live
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        stored = store_example(env, "Out")
        body = parameters(
            "Patient/f001",
            ["Organization/f001"],
            resource_type="DocumentReference",
            extra=[ref("custodian", F001)],
        )
        env.clock.set("2015-06-01T00:00:00Z")
        granted = decided(http, body)
        assert (granted["decision"], granted["reason"]) == ("permit", "consent-explicit")
        store_example(env, "Out", "inactive")
        after = decided(http, body)  # the custodian exception still holds for f001's own …
        assert after["reason"] == "custodian" and after["consents"] == []
        denied = decided(
            http,
            parameters("Patient/f001", ["Organization/f001"], resource_type="DocumentReference"),
        )
        assert (denied["decision"], denied["reason"]) == ("deny", "default-deny")
        assert stored["id"]


# ---------------------------------------------------------------------------------------------
# Audit (consent.md §6)
# ---------------------------------------------------------------------------------------------


def _audit_events(env: Env, patient: str, want: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        env.audit.flush()
        env.as_open()
        bundle = env.get(f"AuditEvent?patient={patient}&_count=200").json()
        events = [
            e["resource"]
            for e in bundle.get("entry", [])
            if e["resource"]["subtype"][0]["code"] == "operation"
        ]
        if len(events) >= want or time.monotonic() > deadline:
            return events


def test_every_decision_is_audited(live: tuple[Env, LiveServer]) -> None:
    env, server = live
    stored = store_example(env, "notOrg")
    consent = f"Consent/{stored['id']}/_history/1"
    env.clock.set("2015-06-01T00:00:00Z")
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        deny = parameters("Patient/f001", ["Organization/f001"], resource="Task/example3")
        permit = parameters("Patient/f001", ["Practitioner/x"], resource="Task/example3")
        assert decided(http, deny)["decision"] == "deny"
        assert decided(http, permit)["decision"] == "permit"
    events = _audit_events(env, "Patient/f001", 2)
    assert len(events) == 2
    by_outcome = {e["outcome"]: e for e in events}
    denied, permitted = by_outcome["4"], by_outcome["0"]
    assert denied["outcomeDesc"] == "Access denied (consent-explicit)"
    assert permitted["outcomeDesc"] == "Access permitted (consent-implicit)"
    for event, actor in ((denied, "Organization/f001"), (permitted, "Practitioner/x")):
        roles = {
            (x.get("role", {}).get("code"), x.get("what", {}).get("reference"))
            for x in event["entity"]
        }
        assert ("1", "Patient/f001") in roles
        assert ("4", "Task/example3") in roles
        assert ("13", consent) in roles  # the deciding Consent version
        assert any(x.get("description") == "Consent/$decide" for x in event["entity"])
        agents = event["agent"]
        assert agents[0]["who"]["identifier"]["value"] == "gateway" and agents[0]["requestor"]
        assert {"reference": actor} in [a["who"] for a in agents[1:]]
        assert event["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"


def test_wrong_scope_and_unknown_token(live: tuple[Env, LiveServer]) -> None:
    env, server = live
    body = parameters("Patient/f001", ["Practitioner/x"], resource_type="DocumentReference")
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        refused = call(http, body, who="clinic")  # a clinic system: system/*.cruds only
        assert refused.status_code == 403, refused.text
        assert refused.json()["resourceType"] == "OperationOutcome"
        assert DECIDE_SCOPE in refused.json()["issue"][0]["diagnostics"]
        unknown = call(http, body, who="nobody")
        assert unknown.status_code == 401
    env.audit.flush()
    env.as_open()
    log = env.get("AuditEvent?_count=200").json()
    scope = [
        e["resource"]
        for e in log.get("entry", [])
        if e["resource"].get("outcomeDesc") == "Access denied (scope)"
    ]
    assert len(scope) == 1 and scope[0]["agent"][0]["who"]["reference"] == "Organization/o2"


# ---------------------------------------------------------------------------------------------
# Break-glass
# ---------------------------------------------------------------------------------------------


def test_break_glass_is_off_by_default(live: tuple[Env, LiveServer]) -> None:
    env, server = live
    store_example(env, "Out")
    env.clock.set("2015-06-01T00:00:00Z")
    body = parameters(
        "Patient/f001", ["Practitioner/x"], resource_type="DocumentReference", purpose="ETREAT"
    )
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        got = decided(http, body)
    assert (got["decision"], got["reason"]) == ("deny", "consent-implicit")


@pytest.fixture
def glass(settings: Settings) -> Iterator[tuple[Env, LiveServer]]:
    with make_env(settings, ConsentSettings(break_glass=True)) as e:
        e.as_open()
        for org in ("o2", "f001"):
            e.put({"resourceType": "Organization", "id": org})
        e.put(load_example("Patient-f001"))
        e.put(load_example("Practitioner-f204"))
        e.put({"resourceType": "Practitioner", "id": "x"})
        install_decider(e.app, e.app.state.fhir, e.layer)
        e.caller.named["gateway"] = GATEWAY
        with LiveServer(e.app) as server:
            yield e, server


def test_break_glass_where_enabled_is_audited_before_the_answer(
    glass: tuple[Env, LiveServer],
) -> None:
    env, server = glass
    store_example(env, "Out")
    store_example(env, "notThem")  # an explicit deny naming Practitioner/f204
    env.clock.set("2015-06-01T00:00:00Z")
    env.audit.stop()  # the batched writer is off: only a synchronous write can store it
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        emergency = parameters(
            "Patient/f001", ["Practitioner/x"], resource_type="Encounter", purpose="ETREAT"
        )
        got = decided(http, emergency)
        assert (got["decision"], got["reason"]) == ("permit", "break-glass")
        env.as_open()
        log = env.get("AuditEvent?patient=Patient/f001").json()
        (event,) = [e["resource"] for e in log.get("entry", [])]
        assert event["outcomeDesc"] == "Access permitted (break-glass)"
        assert event["purposeOfEvent"][0]["coding"][0]["code"] == "ETREAT"
        named = parameters(
            "Patient/f001", ["Practitioner/f204"], resource_type="Encounter", purpose="ETREAT"
        )
        got = decided(http, named)
        assert (got["decision"], got["reason"]) == ("deny", "consent-explicit")
        routine = parameters(
            "Patient/f001", ["Organization/o2"], resource_type="Encounter", purpose="ETREAT"
        )
        assert decided(http, routine)["decision"] == "deny"  # break-glass is for clinicians


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

SECRET = "Patient/secret-4711"


def _bad_bodies() -> dict[str, Any]:
    ok = parameters(SECRET, ["Practitioner/x"], resource_type="DocumentReference")

    def without(name: str) -> dict[str, Any]:
        return ok | {"parameter": [p for p in ok["parameter"] if p["name"] != name]}

    def plus(*more: dict[str, Any]) -> dict[str, Any]:
        return ok | {"parameter": [*ok["parameter"], *more]}

    return {
        "not json": b"{not json",
        "not Parameters": {"resourceType": "Patient", "id": "secret-4711"},
        "invalid R4": ok | {"parameter": [{"name": "patient", "valueReference": {"reference": 7}}]},
        "no patient": without("patient"),
        "two patients": plus(ref("patient", "Patient/secret-0815")),
        "patient not a Patient": ok | {"parameter": [ref("patient", "Organization/secret-4711"), *without("patient")["parameter"]]},  # noqa: E501
        "no actor": without("actor"),
        "actor of another type": plus(ref("actor", "Device/secret-4711")),
        "no resource": without("resourceType"),
        "unknown parameter": plus({"name": "secret-4711", "valueString": "secret-4711"}),
        "two values": plus({"name": "action", "valueCode": "access", "valueString": "x"}),
        "unknown action": plus({"name": "action", "valueCode": "secret-4711"}),
        "purpose of another system": plus({"name": "purpose", "valueCoding": {"system": "urn:x", "code": "TREAT"}}),  # noqa: E501
        "purpose not a code": plus({"name": "purpose", "valueCode": "secret-4711"}),
        "bad date": plus({"name": "date", "valueDateTime": "2015-13-45"}),
        "bad content type": plus({"name": "contentType", "valueCode": "secret-4711"}),
        "types differ": plus(ref("resource", "Task/secret-4711")),
        "a Binary": without("resourceType") | {"parameter": [*without("resourceType")["parameter"], ref("resource", "Binary/secret-4711")]},  # noqa: E501
    }  # fmt: skip


@pytest.mark.parametrize("case", sorted(_bad_bodies()))
def test_malformed_parameters_are_400(live: tuple[Env, LiveServer], case: str) -> None:
    _env, server = live
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        r = call(http, _bad_bodies()[case])
    assert r.status_code == 400, (case, r.status_code, r.text)
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"] and all(i["severity"] == "error" for i in outcome["issue"])
    assert "secret" not in r.text and "4711" not in r.text  # no input value echoed


def test_stored_resources_are_read_from_the_store(live: tuple[Env, LiveServer]) -> None:
    env, server = live
    env.as_open()
    mine = env.post(document("Patient/f001", custodian=O2))
    theirs = env.post(document("Patient/72", custodian=O2))
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        attrs = parameters(
            "Patient/f001",
            ["Practitioner/x"],
            resource=f"DocumentReference/{mine}",
            extra=[ref("custodian", F001)],
        )
        r = call(http, attrs)
        assert r.status_code == 400 and "stored" in r.json()["issue"][0]["diagnostics"]
        other = parameters(
            "Patient/f001", ["Practitioner/x"], resource=f"DocumentReference/{theirs}"
        )
        r = call(http, other)
        assert r.status_code == 400 and "compartment" in r.json()["issue"][0]["diagnostics"]
        held = parameters("Patient/f001", ["Practitioner/x"], resource=f"DocumentReference/{mine}")
        assert decided(http, held)["reason"] == "custodian"  # o2 read from the store


def test_unknown_patient_is_404(live: tuple[Env, LiveServer]) -> None:
    _env, server = live
    body = parameters(SECRET, ["Practitioner/x"], resource_type="DocumentReference")
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        r = call(http, body)
    assert r.status_code == 404, r.text
    assert r.json()["resourceType"] == "OperationOutcome" and "4711" not in r.text


# ---------------------------------------------------------------------------------------------
# The whole server, real tokens
# ---------------------------------------------------------------------------------------------


def test_decide_with_real_tokens(story: tuple[World, LiveServer, AuditSink]) -> None:  # noqa: F811
    world, server, sink = story
    pid = world.add_patient()
    key = generate_signing_key("RS384")
    for org in ("gateway", "clinic"):
        world.seed.put(
            f"/fhir/Organization/{org}",
            json={"resourceType": "Organization", "id": org},
            headers=JSON,
        )
    gateway = backend_token(world, key, "Organization/gateway", f"system/Consent.rs {DECIDE_SCOPE}")
    clinic = backend_token(world, key, "Organization/clinic", "system/*.cruds")
    body = parameters(f"Patient/{pid}", ["Practitioner/x"], resource_type="DocumentReference")
    with httpx.Client(base_url=server.base + "/", timeout=10) as http:
        statement = http.get("metadata", headers=JSON).json()
        consent = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Consent")
        operations = {o["name"]: o["definition"] for o in consent.get("operation", [])}
        assert operations.get("decide") == OPERATION_DEFINITION
        anonymous = http.post("Consent/$decide", json=body, headers=JSON)
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        assert anonymous.json()["resourceType"] == "OperationOutcome"
        wrong = http.post(
            "Consent/$decide", json=body, headers={"authorization": f"Bearer {clinic}", **JSON}
        )
        assert wrong.status_code == 403, wrong.text
        ok = http.post(
            "Consent/$decide", json=body, headers={"authorization": f"Bearer {gateway}", **JSON}
        )
        assert ok.status_code == 200, ok.text
        got = answer(ok.json())
        assert (got["decision"], got["reason"]) == ("deny", "default-deny")
    assert sink.flush()
    log = world.seed.get(
        f"/fhir/AuditEvent?patient=Patient/{pid}", headers={"accept": "application/fhir+json"}
    ).json()
    outcomes = [
        (e["resource"]["subtype"][0]["code"], e["resource"]["outcomeDesc"])
        for e in log.get("entry", [])
    ]
    assert ("operation", "Access denied (default-deny)") in outcomes
