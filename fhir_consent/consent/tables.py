"""The consent index: every stored Consent, denormalized for the per-request look-up (consent.md
§3, §4), on the FHIR store's shared ``metadata``.

* ``consent_index`` — one row per current Consent version (any status): its patient, status,
  whether it applies at all (``active`` and well-formed, consent.md §3.1) and whether it can
  permit *anyone* (``reach_all``: an OPTIN base, or a permitting provision whose path names no
  recipient).
* ``consent_party`` — references a Consent names: ``actor`` rows for every provision actor
  (any role), ``inquirer`` rows for the requester the server recorded on an inquiry
  (consent.md §2.1).

A request loads only the Consents of patients that have an applicable Consent which reaches
everyone or names a member of its requester set (:mod:`fhir_consent.consent.enforcement`); a
patient with none can neither permit nor name the requester, so their other Consents cannot
change the decision. Both tables are written by a WriteListener in the transaction that writes
the Consent, so a revocation is in force for the very next request (consent.md §2.3).
"""

from __future__ import annotations

import sqlalchemy as sa

from fhir_consent.store.tables import metadata

__all__ = ["PARTY_ACTOR", "PARTY_INQUIRER", "consent_index", "consent_party"]

PARTY_ACTOR = "actor"
PARTY_INQUIRER = "inquirer"

_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

consent_index = sa.Table(
    "consent_index",
    metadata,
    sa.Column(
        "resource_pk",
        _PK,
        sa.ForeignKey("resources.pk", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("consent_id", sa.String(64), nullable=False),
    sa.Column("version_id", sa.Integer, nullable=False),
    sa.Column("patient_id", sa.String(64), nullable=True),
    sa.Column("status", sa.String(32), nullable=True),
    sa.Column("applicable", sa.Boolean, nullable=False),
    sa.Column("reach_all", sa.Boolean, nullable=False),
    sa.Index(None, "patient_id", "applicable"),
    sa.Index(None, "applicable", "reach_all"),
)

consent_party = sa.Table(
    "consent_party",
    metadata,
    sa.Column("id", _PK, primary_key=True, autoincrement=True),
    sa.Column(
        "resource_pk",
        _PK,
        sa.ForeignKey("consent_index.resource_pk", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("ref", sa.String(200), nullable=False),
    sa.Index(None, "kind", "ref"),
    sa.Index(None, "resource_pk"),
)
