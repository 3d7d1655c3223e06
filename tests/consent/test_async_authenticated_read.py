"""The authenticated read on the event loop (PostgreSQL): a patient reading their own record
with a real SMART token is served without a worker thread — token check, row and visibility
through ``Database.fetch_async`` — with every property of the threaded path: a revoked token
or a deactivated user gets 401 on the next call, another patient's record is 404 and audited
as a refusal, every read is an AuditEvent searchable by its parameters, and anything the
event loop cannot decide (or a failed connection) takes the threaded path.

On SQLite the same tests check the same behaviour (there every read runs inline).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from consent_kit import document
from livekit import every_layer, smart_world
from smart.kit import World

from fhir_consent.audit import AuditSink
from fhir_consent.fhir import routes
from fhir_consent.fhir.routes import FHIRContext
from fhir_consent.store.db import DatabaseBusy
from smart_on_fhir.users import set_user_active

SCOPES = "openid fhirUser launch/patient patient/*.rs"
JSON = {"accept": "application/fhir+json", "content-type": "application/fhir+json"}


class Env:
    def __init__(self, world: World, ctx: FHIRContext, monkeypatch: pytest.MonkeyPatch) -> None:
        self.world = world
        self.ctx = ctx
        self.threaded = 0  # requests that went through in_db
        self.fetches = 0  # queries on the event loop's connections
        real_in_db = routes.in_db

        async def counting_in_db(*args: Any, **kwargs: Any) -> Any:
            self.threaded += 1
            return await real_in_db(*args, **kwargs)

        monkeypatch.setattr(routes, "in_db", counting_in_db)
        real_fetch = ctx.db.fetch_async

        async def counting_fetch(sql: str, params: tuple[Any, ...]) -> Any:
            self.fetches += 1
            return await real_fetch(sql, params)

        monkeypatch.setattr(ctx.db, "fetch_async", counting_fetch)

    @property
    def on_loop(self) -> bool:
        return not self.ctx.db.is_sqlite

    @property
    def sink(self) -> AuditSink:
        assert self.ctx.audit is not None
        return self.ctx.audit

    def login(self, pid: str) -> tuple[str, str, str]:
        """``(username, client_id, access token)`` of a new login of Patient ``pid``."""
        username = f"p-{uuid.uuid4().hex[:8]}"
        self.world.add_user(username, f"Patient/{pid}")
        client = self.world.add_client("public", scope=SCOPES).client
        token = self.world.token(client.client_id, username=username, scope=SCOPES)
        assert token["patient"] == pid
        return username, client.client_id, token["access_token"]

    def audits(self, query: str) -> list[dict[str, Any]]:
        assert self.sink.flush()
        r = self.world.seed.get(f"/fhir/AuditEvent?{query}&_count=100", headers=JSON)
        assert r.status_code == 200, r.text
        return [e["resource"] for e in r.json().get("entry", [])]


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    with smart_world(db_url, tmp_path, monkeypatch, **every_layer(tmp_path)) as (
        world,
        _server,
        app,
    ):
        yield Env(world, app.state.fhir, monkeypatch)


def _count(env: Env, call: Callable[[], Any]) -> tuple[Any, int, int]:
    threaded, fetches = env.threaded, env.fetches
    out = call()
    return out, env.threaded - threaded, env.fetches - fetches


def test_own_read_on_the_event_loop_is_the_stored_record_and_audited(env: Env) -> None:
    pid = env.world.add_patient()
    _, _, token = env.login(pid)
    opened = env.world.seed.get(f"/fhir/Patient/{pid}", headers=JSON)
    r, threaded, fetches = _count(env, lambda: env.world.get(f"Patient/{pid}", token))
    assert r.status_code == 200
    assert r.content == opened.content
    assert r.headers["etag"] == opened.headers["etag"]
    assert r.headers["last-modified"] == opened.headers["last-modified"]
    if env.on_loop:
        assert (threaded, fetches) == (0, 1)  # the token check and the row: one statement
    vread = env.world.get(f"Patient/{pid}/_history/1", token)
    assert vread.status_code == 200 and vread.json()["id"] == pid

    patient = f"Patient/{pid}"
    events = env.audits(f"patient={patient}&action=R")
    assert len(events) == 2
    subtypes = sorted(e["subtype"][0]["code"] for e in events)
    assert subtypes == ["read", "vread"]
    for event in events:
        assert event["outcome"] == "0"
        assert event["outcomeDesc"] == "Access permitted (patient-self)"
        assert {"reference": patient} in [a["who"] for a in event["agent"]]
        assert event["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
        assert any(e.get("what") == {"reference": patient} for e in event["entity"])
    # every search parameter of the audit trail finds them
    for query in (
        f"agent={patient}",
        f"entity={patient}",
        "outcome=0",
        "type=rest",
        f"date=ge{events[0]['recorded'][:10]}",
    ):
        found = {e["id"] for e in env.audits(f"patient={patient}&{query}")}
        assert {e["id"] for e in events} <= found, query


def test_own_document_is_read_on_the_event_loop(env: Env) -> None:
    pid = env.world.add_patient()
    doc = env.world.add_resource(document(f"Patient/{pid}"))
    _, _, token = env.login(pid)
    r, threaded, fetches = _count(env, lambda: env.world.get(f"DocumentReference/{doc}", token))
    assert r.status_code == 200 and r.json()["id"] == doc
    if env.on_loop:
        assert (threaded, fetches) == (0, 3)  # + the compartment and its first patient
    [event] = env.audits(f"patient=Patient/{pid}&entity=DocumentReference/{doc}")
    assert event["outcomeDesc"] == "Access permitted (patient-self)"


def test_a_revoked_token_is_401_on_the_next_call(env: Env) -> None:
    pid = env.world.add_patient()
    _, client_id, token = env.login(pid)
    assert env.world.get(f"Patient/{pid}", token).status_code == 200
    revoked = env.world.http.post(
        f"{env.world.auth}/revoke", data={"token": token, "client_id": client_id}
    )
    assert revoked.status_code == 200
    r, threaded, _ = _count(env, lambda: env.world.get(f"Patient/{pid}", token))
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    if env.on_loop:
        assert threaded == 0


def test_a_revoked_token_is_401_whatever_it_reads(env: Env) -> None:
    """The token check rides in the row's statement: a revoked token learns nothing, not even
    whether the record exists or the version is well-formed."""
    pid = env.world.add_patient()
    _, client_id, token = env.login(pid)
    assert env.world.get("Patient/no-such-patient", token).status_code == 404
    assert env.world.get(f"Patient/{pid}/_history/x", token).status_code == 404
    revoked = env.world.http.post(
        f"{env.world.auth}/revoke", data={"token": token, "client_id": client_id}
    )
    assert revoked.status_code == 200
    for path in ("Patient/no-such-patient", f"Patient/{pid}/_history/x", f"Patient/{pid}"):
        r, threaded, _ = _count(env, lambda path=path: env.world.get(path, token))
        assert r.status_code == 401, path
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        if env.on_loop:
            assert threaded == 0


def test_a_deactivated_user_is_401_on_the_next_call(env: Env) -> None:
    pid = env.world.add_patient()
    username, _, token = env.login(pid)
    assert env.world.get(f"Patient/{pid}", token).status_code == 200
    with env.world.db.write() as conn:
        assert set_user_active(conn, username, False)
    assert env.world.get(f"Patient/{pid}", token).status_code == 401


def test_another_patients_record_is_404_and_audited_as_refused(env: Env) -> None:
    pid = env.world.add_patient()
    other = env.world.add_patient(family="Other")
    _, _, token = env.login(pid)
    r, threaded, _ = _count(env, lambda: env.world.get(f"Patient/{other}", token))
    assert r.status_code == 404
    assert other not in r.text.replace(f"Patient/{other} is not known", "")
    if env.on_loop:
        assert threaded == 0  # the compartment query ran on the event loop
    unknown = env.world.get("Patient/does-not-exist", token)
    assert unknown.status_code == 404
    [refused] = env.audits(f"patient=Patient/{other}&outcome=4")
    assert refused["subtype"][0]["code"] == "read"
    assert {"reference": f"Patient/{pid}"} in [a["who"] for a in refused["agent"]]
    assert refused["outcomeDesc"] == "Access denied (not permitted)"


def test_a_failed_event_loop_connection_reads_in_a_worker_thread(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = env.world.add_patient()
    _, _, token = env.login(pid)

    async def broken(_sql: str, _params: tuple[Any, ...]) -> Any:
        raise DatabaseBusy()

    monkeypatch.setattr(env.ctx.db, "fetch_async", broken)
    r, threaded, _ = _count(env, lambda: env.world.get(f"Patient/{pid}", token))
    assert r.status_code == 200 and r.json()["id"] == pid
    assert threaded == 1
    assert len(env.audits(f"patient=Patient/{pid}&action=R")) == 1
