"""The write path and the proof API of the permissions ledger (ledger.md §1–§2), on SQLite and
PostgreSQL: one entry per Consent/DocumentReference version, in the write's transaction,
gap-free ``seq``; proofs the offline verifier accepts; checkpoints and consistency proofs."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from ledger_testkit import (
    FHIR_JSON,
    consent_resource,
    document_resource,
    ledger_app,
    ledger_settings,
)

from fhir_consent.config import Settings
from fhir_consent.crypto import KeyRing
from fhir_consent.fhir.services import WriteEvent
from fhir_consent.ledger import verify_proof
from fhir_consent.ledger.checkpoint import verify_checkpoint
from fhir_consent.ledger.entry import entry_from_bytes, open_sealed
from fhir_consent.ledger.merkle import verify_consistency
from fhir_consent.ledger.service import current_actor, patient_reference
from fhir_consent.ledger.tables import ledger_entry, ledger_outbox
from fhir_consent.ledger.verify import verify_ledger
from fhir_consent.store.db import Database


@pytest.fixture
def lsettings(tmp_path: Path) -> Any:
    return ledger_settings(tmp_path)


@pytest.fixture
def lclient(settings: Settings, lsettings: Any) -> Iterator[TestClient]:
    app = ledger_app(settings, lsettings)
    with TestClient(app, base_url="https://testserver", headers=FHIR_JSON) as c:
        yield c


def _entries(db_url: str) -> list[dict[str, Any]]:
    db = Database(db_url)
    try:
        with db.read() as conn:
            rows = conn.execute(
                sa.select(ledger_entry.c.seq, ledger_entry.c.data).order_by(ledger_entry.c.seq)
            ).all()
        return [orjson.loads(bytes(r.data)) for r in rows]
    finally:
        db.dispose()


def _keyring(lsettings: Any) -> KeyRing:
    return KeyRing.load(lsettings.keys_dir)


def test_consent_workflow_writes_one_entry_per_version(
    lclient: TestClient, db_url: str, lsettings: Any
) -> None:
    """consent.md §2: proposed → granted → revoked → deleted, plus a DocumentReference."""
    r = lclient.post("/fhir/Consent", json=consent_resource())
    assert r.status_code == 201, r.text
    consent = r.json()
    cid = consent["id"]
    consent["status"] = "active"
    token = current_actor.set("Patient/p1")
    try:
        assert lclient.put(f"/fhir/Consent/{cid}", json=consent).status_code == 200
    finally:
        current_actor.reset(token)
    patch = [{"op": "replace", "path": "/status", "value": "inactive"}]
    r = lclient.patch(
        f"/fhir/Consent/{cid}",
        content=orjson.dumps(patch),
        headers={"content-type": "application/json-patch+json"},
    )
    assert r.status_code == 200, r.text
    assert lclient.delete(f"/fhir/Consent/{cid}").status_code == 204
    r = lclient.post("/fhir/DocumentReference", json=document_resource())
    did = r.json()["id"]
    assert lclient.post("/fhir/Patient", json={"resourceType": "Patient"}).status_code == 201

    entries = _entries(db_url)
    assert [e["seq"] for e in entries] == [0, 1, 2, 3, 4]
    assert [(e["ref"], e["event"]) for e in entries] == [
        (f"Consent/{cid}/_history/1", "proposed"),
        (f"Consent/{cid}/_history/2", "granted"),
        (f"Consent/{cid}/_history/3", "revoked"),
        (f"Consent/{cid}/_history/4", "deleted"),
        (f"DocumentReference/{did}/_history/1", "created"),
    ]
    ring = _keyring(lsettings)
    assert {e["subject"] for e in entries} == {ring.pseudonym("Patient/p1")}
    raw = orjson.dumps(entries)
    assert b"Patient/p1" not in raw and b"Organization/o2" not in raw  # no PHI in clear
    # the RMS opens the sealed box: the version and who made it
    assert ring.rms_keypair is not None
    opened = open_sealed(entry_from_bytes(_canon(entries[1])), ring.rms_keypair)
    assert opened["actor"] == "Patient/p1"
    assert opened["resource"]["status"] == "active"
    # the open-access (development) client that asked is named as such
    assert open_sealed(entry_from_bytes(_canon(entries[0])), ring.rms_keypair)["actor"] == (
        "open-access"
    )
    report = verify_ledger(Database(db_url), ring.verify_keys(), lsettings.origin)
    assert report.ok, report.problems
    assert report.size == 5 and report.versions == 5


def _canon(entry: dict[str, Any]) -> bytes:
    return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)


def test_failed_write_leaves_no_entry_and_no_gap(
    lclient: TestClient, db_url: str, lsettings: Any
) -> None:
    assert lclient.post("/fhir/Consent", json=consent_resource()).status_code == 201
    bad = consent_resource()
    bad["status"] = "not-a-status"
    assert lclient.post("/fhir/Consent", json=bad).status_code in (400, 422)
    r = lclient.put("/fhir/Consent/x1", json={**consent_resource(), "id": "x1"})
    assert r.status_code == 201
    r = lclient.put(
        "/fhir/Consent/x1",
        json={**consent_resource(), "id": "x1"},
        headers={**FHIR_JSON, "If-Match": 'W/"7"'},
    )
    assert r.status_code == 412
    assert [e["seq"] for e in _entries(db_url)] == [0, 1]


def test_listener_failure_rolls_the_write_back(
    settings: Settings, lsettings: Any, db_url: str
) -> None:
    """ledger.md §2 "Atomic with the change": no entry → no change."""
    app = ledger_app(settings, lsettings)
    ctx = app.state.fhir

    def boom(_conn: Any, event: WriteEvent) -> None:
        if event.current.res_type == "Consent":
            raise RuntimeError("after the ledger append")

    ctx.listeners.append(boom)
    with TestClient(
        app, base_url="https://testserver", headers=FHIR_JSON, raise_server_exceptions=False
    ) as c:
        assert c.post("/fhir/Consent", json=consent_resource()).status_code == 500
        assert c.get("/fhir/Consent").json().get("total", 0) == 0
    assert _entries(db_url) == []


def test_bundle_transaction_entries_commit_together(lclient: TestClient, db_url: str) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": consent_resource(), "request": {"method": "POST", "url": "Consent"}}
            for _ in range(3)
        ],
    }
    r = lclient.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    bundle["entry"].append(
        {"resource": {"resourceType": "Consent"}, "request": {"method": "POST", "url": "Consent"}}
    )
    assert lclient.post("/fhir", json=bundle).status_code >= 400
    assert [e["seq"] for e in _entries(db_url)] == [0, 1, 2]


def test_proof_endpoint_documents_verify_offline(
    lclient: TestClient, lsettings: Any, tmp_path: Path
) -> None:
    ids = [lclient.post("/fhir/Consent", json=consent_resource()).json()["id"] for _ in range(5)]
    doc_id = lclient.post("/fhir/DocumentReference", json=document_resource()).json()["id"]
    ring = _keyring(lsettings)
    pub = ring.signing.public_bytes
    for rtype, rid in [*(("Consent", i) for i in ids), ("DocumentReference", doc_id)]:
        r = lclient.get(f"/fhir/{rtype}/{rid}/_history/1/$ledger-proof")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json")
        doc = r.json()
        verify_proof.verify_document(doc, trusted_keys=[pub], origin=lsettings.origin)
        assert doc["entry"]["ref"] == f"{rtype}/{rid}/_history/1"
    # the standalone CLI agrees
    path = tmp_path / "proof.json"
    path.write_bytes(orjson.dumps(doc))
    assert verify_proof.main([str(path), "--trusted-key", base64.b64encode(pub).decode()]) == 0
    # a proof for an old entry after the log grew: a newer checkpoint, still valid
    for _ in range(3):
        lclient.post("/fhir/Consent", json=consent_resource())
    r = lclient.get(f"/fhir/Consent/{ids[0]}/_history/1/$ledger-proof")
    verify_proof.verify_document(r.json(), trusted_keys=[pub])
    # unknown version, unknown resource, unsupported type
    assert lclient.get(f"/fhir/Consent/{ids[0]}/_history/9/$ledger-proof").status_code == 404
    assert lclient.get("/fhir/Consent/nope/_history/1/$ledger-proof").status_code == 404
    assert lclient.get("/fhir/Patient/p/_history/1/$ledger-proof").status_code == 404


def test_checkpoint_and_consistency(lclient: TestClient, lsettings: Any) -> None:
    ring = _keyring(lsettings)
    r = lclient.get("/fhir/$ledger-checkpoint")
    assert r.status_code == 200
    first = r.json()
    assert first["size"] == 0 and first["origin"] == lsettings.origin
    for _ in range(7):
        lclient.post("/fhir/Consent", json=consent_resource())
    r = lclient.get("/fhir/$ledger-checkpoint", headers={"accept": "text/plain"})
    assert r.headers["content-type"].startswith("text/plain")
    cp7 = verify_checkpoint(r.text, ring.signing.public_key, origin=lsettings.origin)
    assert cp7.size == 7
    assert lclient.get("/fhir/$ledger-checkpoint", headers={"accept": "text/plain"}).text == r.text
    for _ in range(6):
        lclient.post("/fhir/Consent", json=consent_resource())
    r = lclient.get("/fhir/$ledger-consistency", params={"from": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    cp13 = verify_checkpoint(body["checkpoint"], ring.signing.public_key)
    assert body["to"] == cp13.size == 13
    proof = [base64.b64decode(p) for p in body["proof"]]
    verify_consistency(7, 13, proof, cp7.root, cp13.root)
    r = lclient.get("/fhir/$ledger-consistency", params={"from": 3, "to": 7})
    assert r.status_code == 200
    assert base64.b64decode(r.json()["to_root"]) == cp7.root
    for bad in ({"from": 9, "to": 8}, {"from": 99}, {"from": "x"}, {}):
        assert lclient.get("/fhir/$ledger-consistency", params=bad).status_code == 400


def test_capability_statement_declares_the_operations(lclient: TestClient) -> None:
    statement = lclient.get("/fhir/metadata").json()
    rest = statement["rest"][0]
    assert {op["name"] for op in rest["operation"]} >= {"ledger-checkpoint", "ledger-consistency"}
    by_type = {r["type"]: r for r in rest["resource"]}
    for rtype in ("Consent", "DocumentReference"):
        assert [op["name"] for op in by_type[rtype]["operation"]].count("ledger-proof") == 1
    assert "ledger-proof" not in {op["name"] for op in by_type["Patient"].get("operation", [])}


def test_patient_reference_normalisation() -> None:
    assert patient_reference({"resourceType": "Consent", "patient": {"reference": "Patient/1"}})
    absolute = {"resourceType": "Consent", "patient": {"reference": "https://x/fhir/Patient/1"}}
    assert patient_reference(absolute) == "Patient/1"
    doc = {"resourceType": "DocumentReference", "subject": {"reference": "Patient/1/_history/2"}}
    assert patient_reference(doc) == "Patient/1"
    assert patient_reference({"resourceType": "Consent"}).startswith("urn:")


def test_concurrent_writers_get_gap_free_sequence(
    settings: Settings, lsettings: Any, db_url: str
) -> None:
    """Many threads over a pool (PostgreSQL: truly concurrent transactions serialised by the
    ledger_head row lock) — seq is 0..n-1, no gap, no duplicate, tree verifies."""
    app = ledger_app(settings, lsettings)
    errors: list[str] = []
    with TestClient(app, base_url="https://testserver", headers=FHIR_JSON) as c:

        def worker() -> None:
            for _ in range(10):
                r = c.post("/fhir/Consent", json=consent_resource())
                if r.status_code != 201:
                    errors.append(r.text)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    entries = _entries(db_url)
    assert [e["seq"] for e in entries] == list(range(60))
    ring = _keyring(lsettings)
    report = verify_ledger(Database(db_url), ring.verify_keys(), lsettings.origin)
    assert report.ok, report.problems


def test_embedded_only_writes_no_outbox_rows(lclient: TestClient, db_url: str) -> None:
    lclient.post("/fhir/Consent", json=consent_resource())
    db = Database(db_url)
    with db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ledger_outbox)).scalar() == 0
    db.dispose()


def test_install_twice_replaces_the_first(
    settings: Settings, lsettings: Any, db_url: str, tmp_path: Path
) -> None:
    """create_app may install the ledger with default settings; a second install (tests,
    other settings) must replace it, not write every entry twice."""
    from fhir_consent.ledger.api import install

    app = ledger_app(settings, ledger_settings(tmp_path / "first"))
    install(app, app.state.fhir, lsettings)
    with TestClient(app, base_url="https://testserver", headers=FHIR_JSON) as c:
        assert c.post("/fhir/Consent", json=consent_resource()).status_code == 201
        assert c.get("/fhir/$ledger-checkpoint").json()["size"] == 1
        ops = c.get("/fhir/metadata").json()["rest"][0]["operation"]
        assert [op["name"] for op in ops].count("ledger-checkpoint") == 1
    assert len(_entries(db_url)) == 1


def test_keyring_from_environment_and_secret_files(tmp_path: Path) -> None:
    from fhir_consent.crypto import KeyRingError
    from fhir_consent.ledger.service import load_keyring

    ring = KeyRing.generate(tmp_path / "k")
    env = ring.to_env()
    settings = ledger_settings(tmp_path, keys_dir=str(tmp_path / "none"), auto_init_keys=False)
    assert load_keyring(settings, env).signing_key_id == ring.signing_key_id
    files: dict[str, str] = {}
    for name, value in env.items():
        path = tmp_path / f"{name}.secret"
        path.write_text(value + "\n")
        files[f"{name}_FILE"] = str(path)
    assert load_keyring(settings, files).pseudonym_key.key_id == ring.pseudonym_key.key_id
    with pytest.raises(KeyRingError, match="FHIR_CONSENT_SIGNING_KEY_FILE"):
        load_keyring(settings, {"FHIR_CONSENT_SIGNING_KEY_FILE": str(tmp_path / "missing")})
    with pytest.raises(KeyRingError):
        load_keyring(settings, {})  # no keys and no auto-init: refuse to start
