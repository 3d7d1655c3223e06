"""Shared helpers for the ledger format tests (no database, no web).

A plain module rather than a ``conftest.py``: other test folders import ``conftest`` by name,
which a second ``conftest.py`` outside a package would shadow.
"""

from __future__ import annotations

import datetime as dt

import orjson

from fhir_consent.crypto import KeyRing
from fhir_consent.ledger.entry import LedgerEntry, build_entry

__all__ = ["TS", "consent_json", "make_entry"]

TS = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)


def consent_json(cid: str = "c1", vid: str = "1", status: str = "proposed") -> bytes:
    """A proposed Consent as a clinic would create it (consent.md §2.1)."""
    return orjson.dumps(
        {
            "resourceType": "Consent",
            "id": cid,
            "meta": {"versionId": vid, "lastUpdated": "2024-05-01T12:00:00Z"},
            "status": status,
            "scope": {"coding": [{"code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": "Patient/p1"},
            "policyRule": {"coding": [{"code": "OPTOUT"}]},
            "provision": {"period": {"start": "2024-05-01", "end": "2024-06-01"}},
        }
    )


def make_entry(
    keyring: KeyRing,
    seq: int = 0,
    *,
    status: str = "proposed",
    event: str = "proposed",
    cid: str = "c1",
    vid: str = "1",
) -> LedgerEntry:
    """A signed entry for Consent/<cid>/_history/<vid> of Patient/p1, by Organization/o2."""
    return build_entry(
        seq,
        TS,
        "Consent",
        f"Consent/{cid}/_history/{vid}",
        event,
        "Patient/p1",
        consent_json(cid, vid, status),
        "Organization/o2",
        keyring,
    )
