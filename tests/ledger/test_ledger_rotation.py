"""Key rotation of every ledger key by key id (issue 5 scope 1): the signing key, the Record
Management System's seal key (``rms_kid``) and the pseudonym secret (``subject_kid``).

New entries use the new keys, old entries still open and verify, and ``ledger verify`` —
which also recomputes every ``subject`` and opens every sealed box whose private key is
held — passes across rotations done with ``fhir-consent keys rotate --ledger``.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from ledger_testkit import FHIR_JSON, consent_resource, ledger_app, ledger_settings, make_entry

from fhir_consent.config import Settings
from fhir_consent.crypto import KeyRing, KeyRingError, SealKeyPair, b64encode
from fhir_consent.ledger import verify_proof
from fhir_consent.ledger.entry import (
    ENTRY_FIELDS_V1,
    EntryError,
    LedgerEntry,
    check_subject,
    entry_bytes,
    entry_from_bytes,
    entry_from_dict,
    entry_to_dict,
    open_sealed,
    signed_bytes,
    verify_entry,
)
from fhir_consent.ledger.tables import ledger_entry
from fhir_consent.ledger.verify import verify_ledger
from fhir_consent.store.db import Database

ORIGIN = "rotate.example/ledger"


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fhir_consent.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")}
    env.update(extra)
    return env


def test_rotating_rms_and_pseudonym_keys_keeps_the_old_ones(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    first = KeyRing.generate(d)
    old_entry = make_entry(first)
    assert old_entry.rms_kid == first.rms_public.key_id
    assert old_entry.subject_kid == first.pseudonym_key.key_id

    ring = KeyRing.rotate_rms_key(d)
    assert ring.rms_public.key_id != first.rms_public.key_id
    assert set(ring.retired_rms) == {first.rms_public.key_id}
    assert set(ring.retired_rms_keypairs) == {first.rms_public.key_id}
    ring = KeyRing.rotate_pseudonym_key(d)
    assert ring.pseudonym_key.key_id != first.pseudonym_key.key_id
    assert set(ring.retired_pseudonym) == {first.pseudonym_key.key_id}
    assert ring.signing.key_id == first.signing.key_id  # untouched
    for path in d.iterdir():
        if path.suffix == ".key":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    new_entry = make_entry(ring, 1, cid="c2")
    assert new_entry.rms_kid == ring.rms_public.key_id != old_entry.rms_kid
    assert new_entry.subject_kid == ring.pseudonym_key.key_id != old_entry.subject_kid
    assert new_entry.subject != old_entry.subject  # same patient, unrelated pseudonyms
    pairs = ring.rms_keypairs()
    for entry in (old_entry, new_entry):  # both open and check with the rotated ring
        verify_entry(entry, ring.verify_keys())
        assert open_sealed(entry, pairs)["actor"] == "Organization/o2"
        check_subject(entry, "Patient/p1", ring.pseudonym_keys())
    with pytest.raises(EntryError, match="Patient|pseudonym"):
        check_subject(new_entry, "Patient/p2", ring.pseudonym_keys())
    assert ring.rms_keypair is not None
    with pytest.raises(EntryError, match="cannot be opened"):
        open_sealed(old_entry, ring.rms_keypair)  # the current key alone does not open it
    with pytest.raises(EntryError, match="unknown pseudonym key"):
        check_subject(old_entry, "Patient/p1", {ring.pseudonym_key.key_id: ring.pseudonym_key})

    # the environment form carries the retired keys too
    again = KeyRing.from_env(ring.to_env())
    assert set(again.rms_keypairs()) == set(pairs)
    assert set(again.pseudonym_keys()) == set(ring.pseudonym_keys())
    bundle = ring.public_bundle()
    assert set(bundle["rms_seal_keys"]) == {first.rms_public.key_id, ring.rms_public.key_id}
    assert first.pseudonym_key.key_id in bundle["pseudonym_key_ids"]
    assert b64encode(ring.pseudonym_key.secret_bytes()) not in orjson.dumps(bundle).decode()


def test_rms_public_key_from_the_rms(tmp_path: Path) -> None:
    """The RMS makes its own pair and hands over only the public key."""
    d = tmp_path / "keys"
    first = KeyRing.generate(d)
    rms_own = SealKeyPair.generate()
    ring = KeyRing.rotate_rms_key(d, rms_own.public_key)
    assert ring.rms_public == rms_own.public_key and ring.rms_keypair is None
    assert not (d / "rms-seal.key").exists()
    assert set(ring.rms_keypairs()) == {first.rms_public.key_id}  # the old one is still held
    entry = make_entry(ring)
    assert open_sealed(entry, rms_own)["resource"]["id"] == "c1"  # only the RMS opens it
    with pytest.raises(EntryError):
        open_sealed(entry, ring.rms_keypairs())
    with pytest.raises(KeyRingError):
        KeyRing.rotate_rms_key(d, rms_own.public_key)  # already current


def _v1(entry: LedgerEntry, ring: KeyRing) -> LedgerEntry:
    """The same entry in the first format (no subject_kid/rms_kid), signed again."""
    unsigned = dataclasses.replace(entry, subject_kid=None, rms_kid=None)
    return dataclasses.replace(unsigned, sig=b64encode(ring.signing.sign(signed_bytes(unsigned))))


def test_entries_of_the_first_format_still_verify_and_open(tmp_path: Path) -> None:
    ring = KeyRing.generate(tmp_path / "keys")
    old = _v1(make_entry(ring), ring)
    assert set(entry_to_dict(old)) == set(ENTRY_FIELDS_V1)
    assert entry_from_bytes(entry_bytes(old)) == old
    verify_entry(old, ring.verify_keys())
    assert open_sealed(old, ring.rms_keypairs())["actor"] == "Organization/o2"
    check_subject(old, "Patient/p1", ring.pseudonym_keys())
    with pytest.raises(EntryError, match="missing"):
        d = entry_to_dict(make_entry(ring))
        del d["rms_kid"]
        entry_from_dict(d)
    # the standalone verifier accepts both formats
    for entry in (old, make_entry(ring)):
        doc = verify_proof.make_document(
            entry_to_dict(entry),
            0,
            [],
            _checkpoint(ring, entry),
            ring.signing.public_bytes,
        )
        verify_proof.verify_document(doc)


def _checkpoint(ring: KeyRing, entry: LedgerEntry) -> str:
    from fhir_consent.ledger.checkpoint import Checkpoint, sign_checkpoint
    from fhir_consent.ledger.merkle import leaf_hash

    return sign_checkpoint(Checkpoint(ORIGIN, 1, leaf_hash(entry_bytes(entry))), ring.signing)


def _write_round(client: TestClient, ids: list[str]) -> None:
    """New consents, updates of earlier ones, and a deletion."""
    for _ in range(3):
        r = client.post("/fhir/Consent", json=consent_resource())
        assert r.status_code == 201
        ids.append(r.json()["id"])
    for rid in ids[:2]:
        doc = {**consent_resource(), "id": rid, "status": "active"}
        assert client.put(f"/fhir/Consent/{rid}", json=doc).status_code == 200
    assert client.delete(f"/fhir/Consent/{ids.pop()}").status_code in (200, 204)


def _kids(db_url: str) -> list[tuple[str, str, str]]:
    db = Database(db_url)
    try:
        with db.read() as conn:
            rows = conn.execute(sa.select(ledger_entry.c.data).order_by(ledger_entry.c.seq))
            out = []
            for (data,) in rows:
                e = orjson.loads(bytes(data))
                out.append((e["kid"], e["rms_kid"], e["subject_kid"]))
            return out
    finally:
        db.dispose()


def test_verify_passes_across_rotations_by_the_cli(
    settings: Settings, db_url: str, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    lsettings = ledger_settings(tmp_path, origin=ORIGIN, keys_dir=str(keys))
    env = _env(
        FHIR_CONSENT_DATABASE_URL=db_url,
        FHIR_CONSENT_LEDGER_KEYS_DIR=str(keys),
        FHIR_CONSENT_LEDGER_ORIGIN=ORIGIN,
    )
    ids: list[str] = []
    with TestClient(ledger_app(settings, lsettings), base_url="https://testserver") as c:
        c.headers.update(FHIR_JSON)
        _write_round(c, ids)
    first = KeyRing.load(keys)

    rotated = _cli(
        ["keys", "rotate", "--ledger", "--ledger-keys", "all", "--dir", str(keys)], env, tmp_path
    )
    assert rotated.returncode == 0, rotated.stderr
    summary = orjson.loads(rotated.stdout)
    assert summary["rotated"] == ["signing", "rms", "pseudonym"]
    assert first.pseudonym_key.key_id in summary["pseudonym_key_ids"]
    secret = orjson.loads((keys / "pseudonym.key").read_bytes())["secret"]
    assert secret not in rotated.stdout + rotated.stderr  # public summary only

    # a restarted server picks the new keys up
    with TestClient(ledger_app(settings, lsettings), base_url="https://testserver") as c:
        c.headers.update(FHIR_JSON)
        _write_round(c, ids)
    second = KeyRing.load(keys)
    kids = _kids(db_url)
    before = (first.signing.key_id, first.rms_public.key_id, first.pseudonym_key.key_id)
    after = (second.signing.key_id, second.rms_public.key_id, second.pseudonym_key.key_id)
    assert kids[:6] == [before] * 6 and kids[6:] == [after] * 6
    assert len(set(before) & set(after)) == 0

    # only the pseudonym key this time, through the ledger's own command
    only = subprocess.run(
        [sys.executable, "-m", "fhir_consent.ledger.cli", "keys", "rotate", "--keys", "pseudonym"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert only.returncode == 0, only.stderr
    third = KeyRing.load(keys)
    assert third.signing.key_id == second.signing.key_id
    assert third.pseudonym_key.key_id not in (before[2], after[2])
    with TestClient(ledger_app(settings, lsettings), base_url="https://testserver") as c:
        c.headers.update(FHIR_JSON)
        _write_round(c, ids)

    verify = _cli(["ledger", "verify"], env, tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "18 entries" in verify.stdout
    assert "18 subjects and 18 sealed boxes checked" in verify.stdout

    # the checks depend on the retired keys: without them, verify names the problem
    db = Database(db_url)
    try:
        (keys / f"pseudonym-retired-{first.pseudonym_key.key_id}.key").unlink()
        report = verify_ledger(db, third.verify_keys(), ORIGIN, keyring=KeyRing.load(keys))
        assert any(f"unknown pseudonym key id {before[2]}" in p for p in report.problems)
        (keys / f"rms-seal-retired-{first.rms_public.key_id}.key").unlink()
        (keys / f"rms-seal-retired-{first.rms_public.key_id}.pub").unlink()
        report = verify_ledger(db, third.verify_keys(), ORIGIN, keyring=KeyRing.load(keys))
        assert any(f"RMS key {before[1]}, not a key of this log" in p for p in report.problems)
        (keys / f"signing-retired-{first.signing.key_id}.pub").unlink()
        report = verify_ledger(db, KeyRing.load(keys).verify_keys(), ORIGIN)
        assert any("unknown signing key id" in p for p in report.problems)
    finally:
        db.dispose()


def test_verify_catches_a_wrong_subject(settings: Settings, db_url: str, tmp_path: Path) -> None:
    """An entry whose subject is not its patient's pseudonym (signed by the server, so only
    the recomputation can tell) fails verify."""
    lsettings = ledger_settings(tmp_path, origin=ORIGIN)
    with TestClient(ledger_app(settings, lsettings), base_url="https://testserver") as c:
        c.headers.update(FHIR_JSON)
        assert c.post("/fhir/Consent", json=consent_resource()).status_code == 201
        assert c.post("/fhir/Consent", json=consent_resource("Patient/p2")).status_code == 201
    ring = KeyRing.load(lsettings.keys_dir)
    db = Database(db_url)
    try:
        with db.write() as conn:
            rows = conn.execute(sa.select(ledger_entry.c.seq, ledger_entry.c.data)).all()
            data = {int(r.seq): entry_from_bytes(bytes(r.data)) for r in rows}
            # swap subject: entry 1 claims patient p1's pseudonym, re-signed with the real key
            forged = dataclasses.replace(data[1], subject=data[0].subject)
            forged = dataclasses.replace(
                forged, sig=b64encode(ring.signing.sign(signed_bytes(forged)))
            )
            conn.execute(
                ledger_entry.update()
                .where(ledger_entry.c.seq == 1)
                .values(data=entry_bytes(forged))
            )
        report = verify_ledger(db, ring.verify_keys(), ORIGIN, keyring=ring)
        assert any("entry 1: subject is not the pseudonym" in p for p in report.problems)
    finally:
        db.dispose()
