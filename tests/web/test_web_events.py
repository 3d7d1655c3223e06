"""The patient app's server side without a browser: the ``$events`` stream (live updates
within 2 s, scoped to the token's patient, resumable, ended by revocation), the static app
and its headers, and the CapabilityStatement entry."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from webkit import EventReader, Live, clinic_headers, live_app, patient_token, propose

from fhir_consent.web.events import Cursor
from smart_on_fhir.keys import KeySet


@pytest.fixture(scope="module")
def smart_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("web-smart") / "keys"
    KeySet.generate().save(path)
    return path


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path, smart_keys: Path
) -> Iterator[Live]:
    with live_app(tmp_path_factory.mktemp("web-live"), sqlite_template, smart_keys) as app:
        yield app


@pytest.fixture(scope="module")
def peter(live: Live) -> str:
    return patient_token(live, "peter")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}


def test_events_need_a_patient_token(live: Live) -> None:
    r = httpx.get(f"{live.fhir}/$events")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.get(f"{live.fhir}/$events", headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401
    # a clinic system's token has no patient context
    r = httpx.get(f"{live.fhir}/$events", headers=clinic_headers(live))
    assert r.status_code == 403
    # the token is never taken from the query string
    r = httpx.get(f"{live.fhir}/$events", params={"access_token": "x"})
    assert r.status_code == 401


def test_new_inquiries_and_accesses_arrive_within_two_seconds(live: Live, peter: str) -> None:
    with EventReader(f"{live.fhir}/$events", _bearer(peter)) as stream:
        _, _, ready = stream.next("ready")
        info = json.loads(ready)
        assert info["patient"] == "Patient/peter"
        assert set(info["types"]) == {"Consent", "AuditEvent"}

        start = time.monotonic()
        cid = propose(live, "peter")
        _, eid, data = stream.next("Consent", timeout=2.0)
        assert time.monotonic() - start < 2.0
        consent = json.loads(data)
        assert consent["id"] == cid and consent["status"] == "proposed"
        assert eid is not None and eid.isdigit()

        # the clinic reads one of Peter's documents: its AuditEvent reaches Peter live
        doc = live.demo.documents["summary"]
        start = time.monotonic()
        httpx.get(f"{live.fhir}/DocumentReference/{doc}", headers=clinic_headers(live))
        while True:
            _, _, data = stream.next("AuditEvent", timeout=2.0)
            event = json.loads(data)
            agents = [a.get("who", {}).get("reference") for a in event.get("agent", [])]
            if "Organization/lakeside" in agents:
                break
        assert time.monotonic() - start < 2.0
        assert any(
            e.get("what", {}).get("reference") == f"DocumentReference/{doc}"
            for e in event.get("entity", [])
        )


def test_events_are_only_the_patients_own(live: Live, peter: str) -> None:
    with EventReader(f"{live.fhir}/$events", _bearer(peter)) as stream:
        stream.next("ready")
        propose(live, "maria")  # someone else's inquiry
        mine = propose(live, "peter")
        _, _, data = stream.next("Consent", timeout=3.0)
        assert json.loads(data)["id"] == mine  # Maria's never came first, nor at all
        time.sleep(0.5)
        while not stream.events.empty():
            kind, _, data = stream.events.get()
            resource = json.loads(data)
            if kind == "Consent":
                assert resource["patient"]["reference"] == "Patient/peter"


def test_last_event_id_resumes_where_the_client_left(live: Live, peter: str) -> None:
    with EventReader(f"{live.fhir}/$events", _bearer(peter)) as stream:
        _, _, ready = stream.next("ready")
        cursor = json.loads(ready)["cursor"]
    missed = propose(live, "peter")  # while disconnected
    headers = {**_bearer(peter), "Last-Event-ID": str(cursor)}
    with EventReader(f"{live.fhir}/$events", headers) as stream:
        stream.next("ready")
        _, _, data = stream.next("Consent", timeout=3.0)
        assert json.loads(data)["id"] == missed
    r = httpx.get(f"{live.fhir}/$events", headers={**_bearer(peter), "Last-Event-ID": "x1"})
    assert r.status_code == 400


def test_a_revoked_token_ends_the_stream(live: Live) -> None:
    token = patient_token(live, "peter")
    with EventReader(f"{live.fhir}/$events", _bearer(token)) as stream:
        stream.next("ready")
        r = httpx.post(
            f"{live.origin}/auth/revoke",
            data={"token": token, "client_id": live.demo.app_client_id},
        )
        assert r.status_code == 200
        _, _, data = stream.next("error", timeout=3.0)
        assert json.loads(data) == {"status": 401}
        assert stream.ended.wait(3)


def test_cursor_looks_back_for_late_commits() -> None:
    cursor = Cursor(top=10, settle=5.0)
    assert cursor.floor == 10
    assert cursor.fresh(12) and not cursor.fresh(12)
    cursor.advance(100.0)
    assert cursor.floor == 10 and cursor.top == 12
    assert cursor.fresh(11)  # committed late, below the top: still delivered, once
    assert not cursor.fresh(11)
    cursor.advance(106.0)  # the mark of t=100 (top 12) has settled
    assert cursor.floor == 12
    assert cursor.sent == set()
    assert not cursor.fresh(11)


def test_app_is_served_with_a_strict_policy(live: Live) -> None:
    r = httpx.get(f"{live.origin}/app", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "/app/"
    r = httpx.get(f"{live.origin}/app/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "http" not in csp.replace("https", "")
    assert r.headers["referrer-policy"] == "no-referrer"
    assert '<script type="module" src="js/main.js">' in r.text
    assert httpx.head(f"{live.origin}/app/").status_code == 200
    js = httpx.get(f"{live.origin}/app/js/ledger.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    for bad in ("js/../../demo.py", ".hidden", "js/%2e%2e/x", "nothing.js"):
        assert httpx.get(f"{live.origin}/app/{bad}").status_code == 404
    config = httpx.get(f"{live.origin}/app/config.json").json()
    assert config == {
        "clientId": "fhir-consent-patient-app",
        "fhirBase": live.fhir,
        "scope": "openid fhirUser launch/patient patient/*.rs patient/Consent.u",
    }


def test_capability_statement_declares_events(live: Live) -> None:
    r = httpx.get(f"{live.fhir}/metadata", headers={"Accept": "application/fhir+json"})
    ops = {op["name"]: op for op in r.json()["rest"][0].get("operation", [])}
    assert ops["events"]["definition"] == "urn:fhir-consent:OperationDefinition:events"


def test_no_external_resources_in_the_app() -> None:
    """No CDN, no remote fonts or scripts: every asset is this package's."""
    static = Path(__file__).resolve().parents[2] / "fhir_consent" / "web" / "static"
    for path in static.rglob("*"):
        if path.suffix in {".js", ".html", ".css"}:
            text = path.read_text()
            assert "http://" not in text and "https://" not in text, path


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_events_on_postgresql(db_url: str, tmp_path: Path, sqlite_template: Path) -> None:
    """The same stream over PostgreSQL (several workers share it: rows are found by polling)."""
    import sqlalchemy as sa

    from smart_on_fhir.tables import metadata as smart_metadata

    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    names = ", ".join(f'"{t.name}"' for t in smart_metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()
    keys = tmp_path / "smart"
    KeySet.generate().save(keys)
    with live_app(tmp_path, sqlite_template, keys, database_url=db_url) as live:
        token = patient_token(live, "peter")
        with EventReader(f"{live.fhir}/$events", _bearer(token)) as stream:
            stream.next("ready")
            cid = propose(live, "peter")
            start = time.monotonic()  # from the committed write (the POST itself is not timed)
            _, _, data = stream.next("Consent", timeout=2.0)
            assert json.loads(data)["id"] == cid
            assert time.monotonic() - start < 2.0
