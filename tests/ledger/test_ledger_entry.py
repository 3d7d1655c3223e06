"""Ledger entries (ledger.md §1): building, canonical bytes, signatures, sealed boxes, events."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ledger_testkit
import orjson
import pytest

from fhir_consent.crypto import (
    KeyRing,
    SealKeyPair,
    b64decode,
    b64encode,
    canonical_json,
    pseudonym,
    sha256_hex,
)
from fhir_consent.ledger.entry import (
    ENTRY_FIELDS,
    EntryError,
    LedgerEntry,
    build_entry,
    entry_bytes,
    entry_from_bytes,
    entry_from_dict,
    entry_leaf_hash,
    entry_to_dict,
    event_for_consent,
    open_sealed,
    signed_bytes,
    verify_entry,
)

MakeEntry = Callable[..., LedgerEntry]


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> KeyRing:
    return KeyRing.generate(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def make_entry() -> MakeEntry:
    return ledger_testkit.make_entry


@pytest.fixture(scope="module")
def consent_bytes() -> Callable[..., bytes]:
    return ledger_testkit.consent_json


def test_build_entry_fields(
    keyring: KeyRing, make_entry: MakeEntry, consent_bytes: Callable[..., bytes]
) -> None:
    e = make_entry(keyring, 7)
    assert e.seq == 7
    assert e.ts == "2024-05-01T12:00:00.123456Z"
    assert (e.kind, e.ref, e.event) == ("Consent", "Consent/c1/_history/1", "proposed")
    assert e.subject == pseudonym(keyring.pseudonym_key.secret_bytes(), "Patient/p1")
    assert "p1" not in e.subject
    resource = orjson.loads(consent_bytes())
    assert e.resource_sha256 == sha256_hex(canonical_json(resource))
    assert e.kid == e.key_id == keyring.signing.key_id
    assert len(b64decode(e.sig)) == 64
    verify_entry(e, keyring.verify_keys())


def test_no_personal_data_in_clear(keyring: KeyRing, make_entry: MakeEntry) -> None:
    text = entry_bytes(make_entry(keyring)).decode()
    for secret in ("Patient/p1", "Organization/o2", "OPTOUT", "59284-0"):
        assert secret not in text


def test_canonical_bytes(keyring: KeyRing, make_entry: MakeEntry) -> None:
    e = make_entry(keyring)
    data = entry_bytes(e)
    obj = json.loads(data)
    assert list(obj) == sorted(ENTRY_FIELDS)
    assert data == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert signed_bytes(e) == canonical_json({k: v for k, v in obj.items() if k != "sig"})
    assert entry_from_bytes(data) == e
    assert entry_from_dict(entry_to_dict(e)) == e
    assert entry_leaf_hash(e) == hashlib.sha256(b"\x00" + data).digest()
    with pytest.raises(EntryError, match="canonical"):
        entry_from_bytes(json.dumps(obj).encode())  # with spaces
    with pytest.raises(EntryError):
        entry_from_bytes(b"not json")


def test_open_sealed(
    keyring: KeyRing, make_entry: MakeEntry, consent_bytes: Callable[..., bytes]
) -> None:
    e = make_entry(keyring)
    assert keyring.rms_keypair is not None
    payload = open_sealed(e, keyring.rms_keypair)
    assert payload == {"resource": orjson.loads(consent_bytes()), "actor": "Organization/o2"}
    assert keyring.rms_keypair.unseal(b64decode(e.sealed)) == canonical_json(payload)
    with pytest.raises(EntryError, match="cannot be opened"):
        open_sealed(e, SealKeyPair.generate())


def test_open_sealed_checks_the_commitment(keyring: KeyRing, make_entry: MakeEntry) -> None:
    e = make_entry(keyring)
    assert keyring.rms_keypair is not None
    other = keyring.rms_public.seal(
        canonical_json({"resource": {"resourceType": "Consent"}, "actor": "x"})
    )
    forged = dataclasses.replace(e, sealed=b64encode(other))
    with pytest.raises(EntryError, match="resource_sha256"):
        open_sealed(forged, keyring.rms_keypair)
    not_payload = dataclasses.replace(e, sealed=b64encode(keyring.rms_public.seal(b"[1]")))
    with pytest.raises(EntryError, match="resource, actor"):
        open_sealed(not_payload, keyring.rms_keypair)


def _alternatives(e: LedgerEntry, other: LedgerEntry) -> dict[str, Any]:
    """A different but well-formed value for each field."""
    return {
        "seq": e.seq + 1,
        "ts": "2024-05-01T12:00:00.123457Z",
        "kind": "DocumentReference",
        "ref": "Consent/c1/_history/2",
        "event": "granted",
        "subject": "0" * 64,
        "resource_sha256": "f" * 64,
        "sealed": other.sealed,
        "kid": "0123456789abcdef",
        "sig": other.sig,
        "subject_kid": "fedcba9876543210",
        "rms_kid": "00112233445566ff",
    }


def test_tampered_fields_are_rejected(keyring: KeyRing, make_entry: MakeEntry) -> None:
    e = make_entry(keyring)
    other = make_entry(keyring, 1, cid="c2")
    for name, value in _alternatives(e, other).items():
        tampered = dataclasses.replace(e, **{name: value})
        with pytest.raises(EntryError):
            verify_entry(tampered, keyring.verify_keys())
    # the canonical bytes, hence the Merkle leaf, change with every field
    variants = {
        entry_bytes(dataclasses.replace(e, **{k: v})) for k, v in _alternatives(e, other).items()
    }
    assert len(variants | {entry_bytes(e)}) == len(ENTRY_FIELDS) + 1


def test_malformed_fields_are_rejected(keyring: KeyRing, make_entry: MakeEntry) -> None:
    e = make_entry(keyring)
    bad: list[tuple[str, Any]] = [
        ("seq", -1),
        ("seq", True),
        ("seq", 1.0),
        ("seq", 2**53),
        ("ts", "2024-05-01T12:00:00Z"),
        ("ts", "2024-02-30T12:00:00.000000Z"),
        ("ts", "2024-05-01T12:00:00.123456+00:00"),
        ("kind", "Patient"),
        ("ref", "Consent/c1"),
        ("ref", "DocumentReference/c1/_history/1"),
        ("ref", "Consent/c 1/_history/1"),
        ("event", "approved"),
        ("subject", "P1"),
        ("resource_sha256", "A" * 64),
        ("sealed", "!!"),
        ("sealed", b64encode(b"x" * 48)),
        ("kid", "xyz"),
        ("subject_kid", "XYZ"),
        ("rms_kid", "0123"),
        ("rms_kid", None),  # one key id without the other
        ("sig", b64encode(b"x" * 63)),
        ("sig", 5),
    ]
    for name, value in bad:
        with pytest.raises(EntryError):
            verify_entry(dataclasses.replace(e, **{name: value}), keyring.verify_keys())
    d = entry_to_dict(e)
    with pytest.raises(EntryError, match="unexpected"):
        entry_from_dict({**d, "extra": 1})
    del d["kid"]
    with pytest.raises(EntryError, match="missing"):
        entry_from_dict(d)
    doc = make_entry(keyring)
    with pytest.raises(EntryError, match="not valid for DocumentReference"):
        verify_entry(
            dataclasses.replace(
                doc, kind="DocumentReference", ref="DocumentReference/d1/_history/1"
            ),
            keyring.verify_keys(),
        )


def test_wrong_signing_key(keyring: KeyRing, make_entry: MakeEntry, tmp_path: Path) -> None:
    e = make_entry(keyring)
    stranger = KeyRing.generate(tmp_path / "stranger")
    with pytest.raises(EntryError, match="unknown signing key"):
        verify_entry(e, stranger.verify_keys())
    # a stranger's key registered under our key id
    with pytest.raises(EntryError):
        verify_entry(e, {e.kid: stranger.signing.public_key})
    # an entry signed by the stranger but claiming our kid
    forged = make_entry(stranger)
    forged = dataclasses.replace(forged, kid=e.kid)
    with pytest.raises(EntryError, match="does not verify"):
        verify_entry(forged, keyring.verify_keys())


def test_rotation_via_key_directory(tmp_path: Path, make_entry: MakeEntry) -> None:
    ring1 = KeyRing.generate(tmp_path)
    old_entry = make_entry(ring1, 0)
    ring2 = KeyRing.rotate_signing_key(tmp_path)
    new_entry = make_entry(ring2, 1, vid="2", status="active", event="granted")
    assert old_entry.kid != new_entry.kid == ring2.signing.key_id
    for e in (old_entry, new_entry):
        verify_entry(e, ring2.verify_keys())
        verify_entry(e, KeyRing.from_env(ring2.to_env()).verify_keys())
    with pytest.raises(EntryError):
        verify_entry(new_entry, ring1.verify_keys())


def test_build_entry_validation(keyring: KeyRing, consent_bytes: Callable[..., bytes]) -> None:
    ts = dt.datetime(2024, 5, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))

    def build(**kw: object) -> LedgerEntry:
        args: dict[str, object] = {
            "seq": 0,
            "ts": ts,
            "kind": "Consent",
            "ref": "Consent/c1/_history/1",
            "event": "proposed",
            "patient_ref": "Patient/p1",
            "resource_json_bytes": consent_bytes(),
            "actor": "Organization/o2",
            "keyring": keyring,
        }
        args.update(kw)
        return build_entry(**args)  # type: ignore[arg-type]

    assert build().ts == "2024-05-01T12:00:00.000000Z"  # converted to UTC
    with pytest.raises(EntryError, match="timezone"):
        build(ts=dt.datetime(2024, 5, 1))
    with pytest.raises(EntryError, match="not a Consent"):
        build(resource_json_bytes=b'{"resourceType": "Patient"}')
    with pytest.raises(EntryError, match="id"):
        build(ref="Consent/c9/_history/1")
    with pytest.raises(EntryError, match="versionId"):
        build(ref="Consent/c1/_history/9")
    with pytest.raises(EntryError):
        build(resource_json_bytes=b"{not json")
    with pytest.raises(EntryError):
        build(resource_json_bytes=b'{"resourceType": "Consent", "x": NaN}')
    with pytest.raises(EntryError, match="version reference"):
        build(kind="DocumentReference")
    with pytest.raises(EntryError, match="not valid"):
        build(event="granted!")
    with pytest.raises(EntryError):
        build(seq=-1)
    with pytest.raises(EntryError, match="actor"):
        build(actor="")
    with pytest.raises(EntryError, match="omit"):
        build(resource_json_bytes=None)
    deleted = build(event="deleted", resource_json_bytes=None, ref="Consent/c1/_history/3")
    assert deleted.resource_sha256 == hashlib.sha256(b"null").hexdigest()
    assert keyring.rms_keypair is not None
    assert open_sealed(deleted, keyring.rms_keypair)["resource"] is None
    verify_entry(deleted, keyring.verify_keys())


def test_document_reference_entry(keyring: KeyRing) -> None:
    doc = orjson.dumps(
        {
            "resourceType": "DocumentReference",
            "id": "d1",
            "status": "current",
            "subject": {"reference": "Patient/p1"},
            "content": [{"attachment": {"contentType": "application/pdf", "size": 12345}}],
            "extension": [{"url": "http://example.org/weight", "valueDecimal": 1.50}],
        }
    )
    e = build_entry(
        3,
        dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
        "DocumentReference",
        "DocumentReference/d1/_history/1",
        "created",
        "Patient/p1",
        doc,
        "Practitioner/x",
        keyring,
    )
    verify_entry(e, keyring.verify_keys())
    assert e.subject == keyring.pseudonym("Patient/p1")
    # the commitment is over the canonical form: key order and whitespace do not matter
    reordered = json.dumps(json.loads(doc), indent=2, sort_keys=False).encode()
    e2 = build_entry(
        3,
        dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
        "DocumentReference",
        "DocumentReference/d1/_history/1",
        "created",
        "Patient/p1",
        reordered,
        "Practitioner/x",
        keyring,
    )
    assert e2.resource_sha256 == e.resource_sha256
    assert e2.sealed != e.sealed  # fresh ephemeral key per sealed box


@pytest.mark.parametrize(
    ("old", "new", "deleted", "event"),
    [
        (None, "proposed", False, "proposed"),  # consent.md §2.1: a clinic asks
        ("proposed", "active", False, "granted"),  # §2.2: the patient grants
        ("proposed", "rejected", False, "refused"),  # §2.2: the patient refuses
        ("active", "inactive", False, "revoked"),  # §2.3: the patient revokes
        ("proposed", "entered-in-error", False, "withdrawn"),  # §2.1: the clinic withdraws
        ("proposed", "proposed", False, "updated"),  # narrowed before answering
        ("active", "active", False, "updated"),
        (None, "active", False, "granted"),  # §2.4: the patient grants proactively
        (None, "rejected", False, "refused"),  # §2.4: the patient denies up front
        (None, "draft", False, "created"),
        ("draft", "draft", False, "updated"),
        ("active", "draft", False, "updated"),
        ("active", None, True, "deleted"),
        ("active", "active", True, "deleted"),
    ],
)
def test_event_for_consent(old: str | None, new: str | None, deleted: bool, event: str) -> None:
    assert event_for_consent(old, new, deleted) == event


def test_event_for_consent_errors() -> None:
    with pytest.raises(ValueError):
        event_for_consent("active", None, False)
    with pytest.raises(ValueError):
        event_for_consent("active", "bogus", False)
