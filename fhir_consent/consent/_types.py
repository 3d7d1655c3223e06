"""Public data types of the consent engine (consent.md §1, §3); re-exported by ``rules``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final, TypeAlias

__all__ = [
    "ACTCODE_SYSTEM",
    "BREAK_GLASS_PURPOSE",
    "CONFIDENTIALITY_SYSTEM",
    "CONSENT_ACTION_SYSTEM",
    "LEGAL_REPRESENTATIVE_CODES",
    "MIME_SYSTEM",
    "RESOURCE_TYPES_SYSTEM",
    "ROLECODE_SYSTEM",
    "AccessDecision",
    "AccessRequest",
    "ConsentResult",
    "Decision",
    "Reason",
    "Ref",
    "ResourceFacts",
]

Ref: TypeAlias = str
"""A relative literal reference ``"Type/id"`` (``"Practitioner/x"``, ``"Organization/o2"``)."""

ACTCODE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ROLECODE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
CONFIDENTIALITY_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
CONSENT_ACTION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/consentaction"
RESOURCE_TYPES_SYSTEM: Final = "http://hl7.org/fhir/resource-types"
MIME_SYSTEM: Final = "urn:ietf:bcp:13"
BREAK_GLASS_PURPOSE: Final = "ETREAT"
#: consent.md §1: relationship codes (v3-RoleCode) that make a RelatedPerson a legal representative.
LEGAL_REPRESENTATIVE_CODES: Final = frozenset({"GUARD", "POWATT", "DPOWATT", "HPOWATT"})

# ---------------------------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------------------------


class Decision(StrEnum):
    """A permit/deny outcome (consent.md §3)."""

    PERMIT = "permit"
    DENY = "deny"


class Reason(StrEnum):
    """Why :func:`decide` answered as it did (a machine code; consent.md §3, §6 audit)."""

    PATIENT_SELF = "patient-self"
    REPRESENTATIVE = "representative"
    CUSTODIAN = "custodian"
    CONSENT_EXPLICIT = "consent-explicit"
    CONSENT_IMPLICIT = "consent-implicit"
    BREAK_GLASS = "break-glass"
    DEFAULT_DENY = "default-deny"


@dataclass(frozen=True, slots=True)
class AccessRequest:
    """One request to act on a resource (consent.md §1 requester set, §3.3 action/purpose).

    ``at`` is keyword-only (it has no default but follows fields that do) and must be
    timezone-aware; the engine never reads the clock itself.
    """

    requesters: frozenset[Ref]
    action: str = "access"
    purposes: frozenset[str] = frozenset({"TREAT"})
    at: datetime = field(kw_only=True)

    def __post_init__(self) -> None:
        if self.at.tzinfo is None or self.at.utcoffset() is None:
            raise ValueError("AccessRequest.at must be timezone-aware")
        if not isinstance(self.requesters, frozenset):
            object.__setattr__(self, "requesters", frozenset(self.requesters))
        if not isinstance(self.purposes, frozenset):
            object.__setattr__(self, "purposes", frozenset(self.purposes))


@dataclass(frozen=True, slots=True)
class ResourceFacts:
    """What the decision needs to know about one resource (consent.md §3.3).

    ``clinical_period`` is the closed range of the resource's clinical date (``None`` = it has
    none); a missing bound means a single point at the other bound.
    """

    ref: Ref
    resource_type: str
    patient: Ref | None
    custodian: Ref | None
    authors: frozenset[Ref]
    codes: frozenset[tuple[str | None, str]]
    content_types: frozenset[str]
    security_labels: frozenset[tuple[str | None, str]]
    clinical_period: tuple[datetime | None, datetime | None] | None
    references: frozenset[Ref]
    referenced_by: frozenset[Ref] = frozenset()


@dataclass(frozen=True, slots=True)
class ConsentResult:
    """The outcome of one Consent (consent.md §3.1-3.5).

    ``decision`` is ``None`` only when the Consent does not apply (not active, another patient,
    malformed). ``provision_path`` locates the deciding provision: ``()`` is the root provision
    (or no provision, when not ``explicit``), ``(0,)`` its first nested provision, and so on.
    """

    decision: Decision | None
    explicit: bool
    consent_id: str | None
    provision_path: tuple[int, ...]
    consent_version: str | None = None


@dataclass(frozen=True, slots=True)
class AccessDecision:
    """The final answer of :func:`decide` (consent.md §3, last paragraphs).

    ``deciding`` lists the Consent results that decided it (all explicit denies, all explicit
    permits, … of the winning tier); it is empty for the patient/representative/custodian/
    break-glass exceptions and for the default deny.
    """

    decision: Decision
    reason: Reason
    deciding: tuple[ConsentResult, ...] = ()
