"""FHIR R4 search parameters: definitions, index extraction and query-value parsing.

This module is pure (no web framework, no database).  It has three parts:

* **Definitions** -- :data:`SEARCH_PARAMS` / :data:`COMMON_PARAMS` hold the R4 (4.0.1)
  search parameters this server supports, with the official FHIRPath ``expression`` (for the
  CapabilityStatement) plus a private, precompiled extraction spec.  Names, types and targets
  follow the R4 search-parameter registry
  (https://hl7.org/fhir/R4/searchparameter-registry.html).
* **Extraction** -- :func:`extract` turns a resource dict into index rows at write time
  (token, string, reference, date).  It walks a small tuple of element paths per parameter
  over plain dicts/lists; there is no FHIRPath engine on the write path.
* **Parsing** -- :func:`parse_date`, :func:`parse_token`, :func:`parse_reference`,
  :func:`split_or` and :func:`unescape` turn query-string values into typed queries, raising
  :class:`SearchValueError` (safe to show to a client) on bad input.

References below of the form ``search.html#anchor`` are to the R4 page
https://hl7.org/fhir/R4/search.html (cited by anchor, which is stable across builds).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "COMMON_PARAMS",
    "DATE_MAX",
    "DATE_MIN",
    "PREFIXES",
    "R4_RESOURCE_TYPES",
    "SEARCH_PARAMS",
    "DateQuery",
    "DateRow",
    "IndexRows",
    "ParamType",
    "ReferenceQuery",
    "ReferenceRow",
    "SearchParam",
    "SearchValueError",
    "StringRow",
    "TokenQuery",
    "TokenRow",
    "date_range",
    "extract",
    "normalize_string",
    "params_for",
    "parse_date",
    "parse_reference",
    "parse_token",
    "split_or",
    "unescape",
]


# --------------------------------------------------------------------------------------------
# Errors and small helpers
# --------------------------------------------------------------------------------------------


class SearchValueError(ValueError):
    """A search value that cannot be parsed (maps to HTTP 400 / OperationOutcome ``invalid``).

    The message is safe to return to a client: user input is echoed through :func:`_clip`
    (``repr`` of at most 60 characters), never in full.
    """


_ECHO_MAX: Final = 60


def _clip(value: str) -> str:
    """Return ``repr`` of *value* cut to :data:`_ECHO_MAX` characters for error messages."""
    if len(value) > _ECHO_MAX:
        return repr(value[:_ECHO_MAX]) + "..."
    return repr(value)


#: Every R4 (4.0.1) resource type name.  Used to recognise ``Type/id`` in references.
R4_RESOURCE_TYPES: Final[frozenset[str]] = frozenset(
    """
    Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse
    AuditEvent Basic Binary BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement
    CarePlan CareTeam CatalogEntry ChargeItem ChargeItemDefinition Claim ClaimResponse
    ClinicalImpression CodeSystem Communication CommunicationRequest CompartmentDefinition
    Composition ConceptMap Condition Consent Contract Coverage CoverageEligibilityRequest
    CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric DeviceRequest
    DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference EffectEvidenceSynthesis
    Encounter Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare EventDefinition Evidence
    EvidenceVariable ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal
    GraphDefinition Group GuidanceResponse HealthcareService ImagingStudy Immunization
    ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide InsurancePlan Invoice
    Library Linkage List Location Measure MeasureReport Media Medication MedicationAdministration
    MedicationDispense MedicationKnowledge MedicationRequest MedicationStatement MedicinalProduct
    MedicinalProductAuthorization MedicinalProductContraindication MedicinalProductIndication
    MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured
    MedicinalProductPackaged MedicinalProductPharmaceutical MedicinalProductUndesirableEffect
    MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization
    OrganizationAffiliation Parameters Patient PaymentNotice PaymentReconciliation Person
    PlanDefinition Practitioner PractitionerRole Procedure Provenance Questionnaire
    QuestionnaireResponse RelatedPerson RequestGroup ResearchDefinition ResearchElementDefinition
    ResearchStudy ResearchSubject RiskAssessment RiskEvidenceSynthesis Schedule SearchParameter
    ServiceRequest Slot Specimen SpecimenDefinition StructureDefinition StructureMap Subscription
    Substance SubstanceNucleicAcid SubstancePolymer SubstanceProtein
    SubstanceReferenceInformation SubstanceSourceMaterial SubstanceSpecification SupplyDelivery
    SupplyRequest Task TerminologyCapabilities TestReport TestScript ValueSet VerificationResult
    VisionPrescription
    """.split()
)

_ID_RE: Final = re.compile(r"[A-Za-z0-9\-.]{1,64}\Z")  # R4 datatypes.html#id


# --------------------------------------------------------------------------------------------
# String normalisation (search.html#string)
# --------------------------------------------------------------------------------------------


def _strip_marks(s: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


def normalize_string(s: str) -> str:
    """Normalise *s* for ``string`` search (search.html#string).

    R4 says string search is case- and accent-insensitive and "SHALL ignore ... combining
    characters"; this applies NFKD, drops combining marks, casefolds and collapses runs of
    whitespace to one space (trimming the ends).  ``"Müller"`` -> ``"muller"``,
    ``"Ǆ"`` -> ``"dz"``.  Apply the same function to query values and to indexed values.
    """
    if s.isascii():
        return " ".join(s.lower().split())
    folded = _strip_marks(s).casefold()
    if not folded.isascii():
        # casefold can yield characters with a compatibility decomposition ("ΐ" etc.).
        folded = _strip_marks(folded)
    return " ".join(folded.split())


# --------------------------------------------------------------------------------------------
# Dates (search.html#date; datatypes.html date/dateTime/instant)
# --------------------------------------------------------------------------------------------

_US: Final = 1_000_000
_DAY_US: Final = 86_400 * _US

#: Lower bound stored for a Period without ``start`` (int64 minimum).
DATE_MIN: Final = -(2**63)
#: Upper bound stored for a Period without ``end`` -- "ongoing" (int64 maximum).
DATE_MAX: Final = 2**63 - 1

_DATE_RE: Final = re.compile(
    r"([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2})"
    r"(?:T([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.([0-9]+))?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?"
    r")?)?"
)
_DATE_HELP: Final = (
    "expected YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss[.fff]][Z|(+|-)hh:mm]"
)


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468


def _days_in_month(y: int, m: int) -> int:
    if m == 2:
        return 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    return 30 if m in (4, 6, 9, 11) else 31


def date_range(value: str) -> tuple[int, int]:
    """Return the inclusive ``[low, high]`` range, in microseconds since the Unix epoch (UTC),
    implied by a FHIR date, dateTime or instant string.

    Per search.html#date a date value is an *implicit range* given by its precision:
    ``"2013"`` is the whole year, ``"2013-05"`` the month, ``"2013-05-02"`` the day,
    ``"2013-05-02T10:00"`` the minute, ``"...T10:00:30"`` the second and ``"...T10:00:30.5"``
    the tenth of a second (fractions beyond microseconds are truncated).  A timezone offset is
    converted to UTC; a value without one is taken as UTC (the server's zone).  A leap second
    (``:60``) is accepted and rolls into the next minute.

    Raises :class:`SearchValueError` for anything else (bad calendar date, hour 24, etc.).
    """
    m = _DATE_RE.fullmatch(value)
    if m is None:
        raise SearchValueError(f"Invalid date/time value {_clip(value)}: {_DATE_HELP}")
    ys, mos, ds, hs, mis, ss, frac, tz = m.groups()
    year = int(ys)
    if year < 1:
        raise SearchValueError(f"Invalid date/time value {_clip(value)}: year must be 0001-9999")
    if mos is None:
        low = _days_from_civil(year, 1, 1) * _DAY_US
        return low, _days_from_civil(year + 1, 1, 1) * _DAY_US - 1
    month = int(mos)
    if not 1 <= month <= 12:
        raise SearchValueError(f"Invalid date/time value {_clip(value)}: month out of range")
    if ds is None:
        low = _days_from_civil(year, month, 1) * _DAY_US
        ny, nm = (year + 1, 1) if month == 12 else (year, month + 1)
        return low, _days_from_civil(ny, nm, 1) * _DAY_US - 1
    day = int(ds)
    if not 1 <= day <= _days_in_month(year, month):
        raise SearchValueError(f"Invalid date/time value {_clip(value)}: day out of range")
    days = _days_from_civil(year, month, day)
    if hs is None:
        low = days * _DAY_US
        return low, low + _DAY_US - 1
    hour, minute = int(hs), int(mis)
    if hour > 23 or minute > 59:
        raise SearchValueError(f"Invalid date/time value {_clip(value)}: time out of range")
    secs = days * 86_400 + hour * 3_600 + minute * 60
    if ss is None:
        low = secs * _US
        high = low + 60 * _US - 1
    else:
        second = int(ss)
        if second > 60:
            raise SearchValueError(f"Invalid date/time value {_clip(value)}: time out of range")
        low = (secs + second) * _US
        if frac is None:
            high = low + _US - 1
        elif len(frac) >= 6:
            low += int(frac[:6])
            high = low
        else:
            scale = 10 ** (6 - len(frac))
            low += int(frac) * scale
            high = low + scale - 1
    if tz is not None and tz != "Z":
        tzh, tzm = int(tz[1:3]), int(tz[4:6])
        if tzm > 59 or tzh > 14 or (tzh == 14 and tzm != 0):
            raise SearchValueError(f"Invalid date/time value {_clip(value)}: bad timezone")
        offset = (tzh * 3_600 + tzm * 60) * _US
        if tz[0] == "+":
            low, high = low - offset, high - offset
        else:
            low, high = low + offset, high + offset
    return low, high


# --------------------------------------------------------------------------------------------
# Definitions (search.html#ptypes, searchparameter-registry.html)
# --------------------------------------------------------------------------------------------


class ParamType(StrEnum):
    """The R4 search-parameter types this server supports (search.html#ptypes).

    ``URI`` parameters are indexed as :class:`TokenRow` with ``system=None`` and
    ``code=<uri>`` (exact match, search.html#uri).
    """

    TOKEN = "token"
    STRING = "string"
    REFERENCE = "reference"
    DATE = "date"
    URI = "uri"


@dataclass(frozen=True, slots=True)
class SearchParam:
    """One search parameter.

    ``expression`` is the R4 FHIRPath, for documentation/CapabilityStatement only.
    ``paths`` is the private extraction spec: ``"dotted.path:Kind"`` strings where a segment
    may end in ``*`` (repeat the element recursively, e.g. nested ``provision``) or carry a
    filter ``[field=value]`` (e.g. ``telecom[system=phone]``) and ``Kind`` is the FHIR
    datatype of the element.  ``ref_type`` implements ``.where(resolve() is <Type>)``: only
    references to that type are indexed.  ``column`` marks parameters the store keeps as
    columns (``_id``, ``_lastUpdated``); :func:`extract` never emits rows for them.
    """

    name: str
    type: ParamType
    resource_type: str
    expression: str
    targets: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    ref_type: str | None = None
    column: bool = False


_KINDS_BY_TYPE: Final[Mapping[ParamType, frozenset[str]]] = {
    ParamType.TOKEN: frozenset(
        {"code", "boolean", "Coding", "CodeableConcept", "Identifier", "ContactPoint"}
    ),
    ParamType.URI: frozenset({"uri"}),
    ParamType.STRING: frozenset({"string", "HumanName", "Address"}),
    ParamType.REFERENCE: frozenset({"Reference"}),
    ParamType.DATE: frozenset({"date", "Period"}),
}

_ACTORS: Final = (
    "Practitioner",
    "Organization",
    "Device",
    "Patient",
    "PractitionerRole",
    "RelatedPerson",
)


def _define(rt: str, specs: list[tuple[Any, ...]]) -> Mapping[str, SearchParam]:
    """Build ``name -> SearchParam`` for resource type *rt* from compact tuples
    ``(name, type, expression, paths, targets=(), ref_type=None)``."""
    out: dict[str, SearchParam] = {}
    for spec in specs:
        name, ptype, expression, paths = spec[:4]
        targets: tuple[str, ...] = spec[4] if len(spec) > 4 else ()
        ref_type: str | None = spec[5] if len(spec) > 5 else None
        if isinstance(paths, str):
            paths = (paths,)
        out[name] = SearchParam(
            name=name,
            type=ptype,
            resource_type=rt,
            expression=expression,
            targets=targets,
            paths=tuple(paths),
            ref_type=ref_type,
        )
    return MappingProxyType(out)


_T, _S, _R, _D, _U = (
    ParamType.TOKEN,
    ParamType.STRING,
    ParamType.REFERENCE,
    ParamType.DATE,
    ParamType.URI,
)


def _address_params(rt: str) -> list[tuple[Any, ...]]:
    return [
        ("address", _S, f"{rt}.address", "address:Address"),
        ("address-city", _S, f"{rt}.address.city", "address.city:string"),
        ("address-country", _S, f"{rt}.address.country", "address.country:string"),
        ("address-postalcode", _S, f"{rt}.address.postalCode", "address.postalCode:string"),
        ("address-state", _S, f"{rt}.address.state", "address.state:string"),
        ("address-use", _T, f"{rt}.address.use", "address.use:code"),
    ]


def _telecom_params(rt: str) -> list[tuple[Any, ...]]:
    return [
        ("telecom", _T, f"{rt}.telecom", "telecom:ContactPoint"),
        (
            "phone",
            _T,
            f"{rt}.telecom.where(system='phone')",
            "telecom[system=phone]:ContactPoint",
        ),
        (
            "email",
            _T,
            f"{rt}.telecom.where(system='email')",
            "telecom[system=email]:ContactPoint",
        ),
    ]


def _name_params(rt: str) -> list[tuple[Any, ...]]:
    return [
        ("name", _S, f"{rt}.name", "name:HumanName"),
        ("family", _S, f"{rt}.name.family", "name.family:string"),
        ("given", _S, f"{rt}.name.given", "name.given:string"),
    ]


_DR = "DocumentReference"
_DOCUMENT_REFERENCE = _define(
    _DR,
    [
        (
            "authenticator",
            _R,
            f"{_DR}.authenticator",
            "authenticator:Reference",
            ("Practitioner", "Organization", "PractitionerRole"),
        ),
        ("author", _R, f"{_DR}.author", "author:Reference", _ACTORS),
        ("category", _T, f"{_DR}.category", "category:CodeableConcept"),
        (
            "contenttype",
            _T,
            f"{_DR}.content.attachment.contentType",
            "content.attachment.contentType:code",
        ),
        ("custodian", _R, f"{_DR}.custodian", "custodian:Reference", ("Organization",)),
        ("date", _D, f"{_DR}.date", "date:date"),
        ("description", _S, f"{_DR}.description", "description:string"),
        (
            "encounter",
            _R,
            f"{_DR}.context.encounter",
            "context.encounter:Reference",
            ("Encounter", "EpisodeOfCare"),
        ),
        ("event", _T, f"{_DR}.context.event", "context.event:CodeableConcept"),
        ("facility", _T, f"{_DR}.context.facilityType", "context.facilityType:CodeableConcept"),
        ("format", _T, f"{_DR}.content.format", "content.format:Coding"),
        (
            "identifier",
            _T,
            f"{_DR}.masterIdentifier | {_DR}.identifier",
            ("masterIdentifier:Identifier", "identifier:Identifier"),
        ),
        ("language", _T, f"{_DR}.content.attachment.language", "content.attachment.language:code"),
        ("location", _U, f"{_DR}.content.attachment.url", "content.attachment.url:uri"),
        (
            "patient",
            _R,
            f"{_DR}.subject.where(resolve() is Patient)",
            "subject:Reference",
            ("Patient",),
            "Patient",
        ),
        ("period", _D, f"{_DR}.context.period", "context.period:Period"),
        ("related", _R, f"{_DR}.context.related", "context.related:Reference"),
        (
            "relatesto",
            _R,
            f"{_DR}.relatesTo.target",
            "relatesTo.target:Reference",
            ("DocumentReference",),
        ),
        ("relation", _T, f"{_DR}.relatesTo.code", "relatesTo.code:code"),
        ("security-label", _T, f"{_DR}.securityLabel", "securityLabel:CodeableConcept"),
        (
            "setting",
            _T,
            f"{_DR}.context.practiceSetting",
            "context.practiceSetting:CodeableConcept",
        ),
        ("status", _T, f"{_DR}.status", "status:code"),
        (
            "subject",
            _R,
            f"{_DR}.subject",
            "subject:Reference",
            ("Practitioner", "Group", "Device", "Patient"),
        ),
        ("type", _T, f"{_DR}.type", "type:CodeableConcept"),
    ],
)

# Consent: R4 expressions name only the top-level ``provision``; extraction deliberately also
# walks nested ``provision.provision`` (``provision*``) so that a permit/deny nested rule is
# findable by actor/data/action/purpose/security-label/period.
_CONSENT = _define(
    "Consent",
    [
        ("action", _T, "Consent.provision.action", "provision*.action:CodeableConcept"),
        (
            "actor",
            _R,
            "Consent.provision.actor.reference",
            "provision*.actor.reference:Reference",
            (
                "Device",
                "Group",
                "CareTeam",
                "Organization",
                "Patient",
                "Practitioner",
                "RelatedPerson",
                "PractitionerRole",
            ),
        ),
        ("category", _T, "Consent.category", "category:CodeableConcept"),
        (
            "consentor",
            _R,
            "Consent.performer",
            "performer:Reference",
            ("Organization", "Patient", "Practitioner", "RelatedPerson", "PractitionerRole"),
        ),
        ("data", _R, "Consent.provision.data.reference", "provision*.data.reference:Reference"),
        ("date", _D, "Consent.dateTime", "dateTime:date"),
        ("identifier", _T, "Consent.identifier", "identifier:Identifier"),
        ("organization", _R, "Consent.organization", "organization:Reference", ("Organization",)),
        ("patient", _R, "Consent.patient", "patient:Reference", ("Patient",)),
        ("period", _D, "Consent.provision.period", "provision*.period:Period"),
        ("purpose", _T, "Consent.provision.purpose", "provision*.purpose:Coding"),
        ("scope", _T, "Consent.scope", "scope:CodeableConcept"),
        (
            "security-label",
            _T,
            "Consent.provision.securityLabel",
            "provision*.securityLabel:Coding",
        ),
        (
            "source-reference",
            _R,
            "Consent.source",
            "sourceReference:Reference",
            ("Consent", "Contract", "QuestionnaireResponse", "DocumentReference"),
        ),
        ("status", _T, "Consent.status", "status:code"),
    ],
)

_PATIENT = _define(
    "Patient",
    [
        ("active", _T, "Patient.active", "active:boolean"),
        *_address_params("Patient"),
        ("birthdate", _D, "Patient.birthDate", "birthDate:date"),
        ("death-date", _D, "(Patient.deceased as dateTime)", "deceasedDateTime:date"),
        *_telecom_params("Patient"),
        *_name_params("Patient"),
        ("gender", _T, "Patient.gender", "gender:code"),
        (
            "general-practitioner",
            _R,
            "Patient.generalPractitioner",
            "generalPractitioner:Reference",
            ("Organization", "Practitioner", "PractitionerRole"),
        ),
        ("identifier", _T, "Patient.identifier", "identifier:Identifier"),
        (
            "language",
            _T,
            "Patient.communication.language",
            "communication.language:CodeableConcept",
        ),
        ("link", _R, "Patient.link.other", "link.other:Reference", ("Patient", "RelatedPerson")),
        (
            "organization",
            _R,
            "Patient.managingOrganization",
            "managingOrganization:Reference",
            ("Organization",),
        ),
    ],
)

_PRACTITIONER = _define(
    "Practitioner",
    [
        ("active", _T, "Practitioner.active", "active:boolean"),
        *_address_params("Practitioner"),
        (
            "communication",
            _T,
            "Practitioner.communication",
            "communication:CodeableConcept",
        ),
        *_telecom_params("Practitioner"),
        *_name_params("Practitioner"),
        ("gender", _T, "Practitioner.gender", "gender:code"),
        ("identifier", _T, "Practitioner.identifier", "identifier:Identifier"),
    ],
)

_ORGANIZATION = _define(
    "Organization",
    [
        ("active", _T, "Organization.active", "active:boolean"),
        *_address_params("Organization"),
        ("endpoint", _R, "Organization.endpoint", "endpoint:Reference", ("Endpoint",)),
        ("identifier", _T, "Organization.identifier", "identifier:Identifier"),
        (
            "name",
            _S,
            "Organization.name | Organization.alias",
            ("name:string", "alias:string"),
        ),
        ("partof", _R, "Organization.partOf", "partOf:Reference", ("Organization",)),
        ("type", _T, "Organization.type", "type:CodeableConcept"),
    ],
)

_PRACTITIONER_ROLE = _define(
    "PractitionerRole",
    [
        ("active", _T, "PractitionerRole.active", "active:boolean"),
        ("date", _D, "PractitionerRole.period", "period:Period"),
        ("endpoint", _R, "PractitionerRole.endpoint", "endpoint:Reference", ("Endpoint",)),
        ("identifier", _T, "PractitionerRole.identifier", "identifier:Identifier"),
        ("location", _R, "PractitionerRole.location", "location:Reference", ("Location",)),
        (
            "organization",
            _R,
            "PractitionerRole.organization",
            "organization:Reference",
            ("Organization",),
        ),
        (
            "practitioner",
            _R,
            "PractitionerRole.practitioner",
            "practitioner:Reference",
            ("Practitioner",),
        ),
        ("role", _T, "PractitionerRole.code", "code:CodeableConcept"),
        (
            "service",
            _R,
            "PractitionerRole.healthcareService",
            "healthcareService:Reference",
            ("HealthcareService",),
        ),
        ("specialty", _T, "PractitionerRole.specialty", "specialty:CodeableConcept"),
        *_telecom_params("PractitionerRole"),
    ],
)

_RELATED_PERSON = _define(
    "RelatedPerson",
    [
        ("active", _T, "RelatedPerson.active", "active:boolean"),
        *_address_params("RelatedPerson"),
        ("birthdate", _D, "RelatedPerson.birthDate", "birthDate:date"),
        *_telecom_params("RelatedPerson"),
        ("gender", _T, "RelatedPerson.gender", "gender:code"),
        ("identifier", _T, "RelatedPerson.identifier", "identifier:Identifier"),
        ("name", _S, "RelatedPerson.name", "name:HumanName"),
        ("patient", _R, "RelatedPerson.patient", "patient:Reference", ("Patient",)),
        (
            "relationship",
            _T,
            "RelatedPerson.relationship",
            "relationship:CodeableConcept",
        ),
    ],
)

_AE = "AuditEvent"
_AUDIT_EVENT = _define(
    _AE,
    [
        ("action", _T, f"{_AE}.action", "action:code"),
        ("address", _S, f"{_AE}.agent.network.address", "agent.network.address:string"),
        ("agent", _R, f"{_AE}.agent.who", "agent.who:Reference", _ACTORS),
        ("agent-name", _S, f"{_AE}.agent.name", "agent.name:string"),
        ("agent-role", _T, f"{_AE}.agent.role", "agent.role:CodeableConcept"),
        ("altid", _T, f"{_AE}.agent.altId", "agent.altId:code"),
        ("date", _D, f"{_AE}.recorded", "recorded:date"),
        ("entity", _R, f"{_AE}.entity.what", "entity.what:Reference"),
        ("entity-name", _S, f"{_AE}.entity.name", "entity.name:string"),
        ("entity-role", _T, f"{_AE}.entity.role", "entity.role:Coding"),
        ("entity-type", _T, f"{_AE}.entity.type", "entity.type:Coding"),
        ("outcome", _T, f"{_AE}.outcome", "outcome:code"),
        (
            "patient",
            _R,
            f"{_AE}.agent.who.where(resolve() is Patient)"
            f" | {_AE}.entity.what.where(resolve() is Patient)",
            ("agent.who:Reference", "entity.what:Reference"),
            ("Patient",),
            "Patient",
        ),
        ("policy", _U, f"{_AE}.agent.policy", "agent.policy:uri"),
        ("site", _T, f"{_AE}.source.site", "source.site:code"),
        ("source", _R, f"{_AE}.source.observer", "source.observer:Reference", _ACTORS),
        ("subtype", _T, f"{_AE}.subtype", "subtype:Coding"),
        ("type", _T, f"{_AE}.type", "type:Coding"),
    ],
)

_PROVENANCE = _define(
    "Provenance",
    [
        ("agent", _R, "Provenance.agent.who", "agent.who:Reference", _ACTORS),
        ("agent-role", _T, "Provenance.agent.role", "agent.role:CodeableConcept"),
        ("agent-type", _T, "Provenance.agent.type", "agent.type:CodeableConcept"),
        ("entity", _R, "Provenance.entity.what", "entity.what:Reference"),
        ("location", _R, "Provenance.location", "location:Reference", ("Location",)),
        (
            "patient",
            _R,
            "Provenance.target.where(resolve() is Patient)",
            "target:Reference",
            ("Patient",),
            "Patient",
        ),
        ("recorded", _D, "Provenance.recorded", "recorded:date"),
        ("signature-type", _T, "Provenance.signature.type", "signature.type:Coding"),
        ("target", _R, "Provenance.target", "target:Reference"),
        ("when", _D, "(Provenance.occurred as dateTime)", "occurredDateTime:date"),
    ],
)

_ENCOUNTER = _define(
    "Encounter",
    [
        ("account", _R, "Encounter.account", "account:Reference", ("Account",)),
        ("appointment", _R, "Encounter.appointment", "appointment:Reference", ("Appointment",)),
        ("based-on", _R, "Encounter.basedOn", "basedOn:Reference", ("ServiceRequest",)),
        ("class", _T, "Encounter.class", "class:Coding"),
        ("date", _D, "Encounter.period", "period:Period"),
        (
            "diagnosis",
            _R,
            "Encounter.diagnosis.condition",
            "diagnosis.condition:Reference",
            ("Condition", "Procedure"),
        ),
        (
            "episode-of-care",
            _R,
            "Encounter.episodeOfCare",
            "episodeOfCare:Reference",
            ("EpisodeOfCare",),
        ),
        ("identifier", _T, "Encounter.identifier", "identifier:Identifier"),
        (
            "location",
            _R,
            "Encounter.location.location",
            "location.location:Reference",
            ("Location",),
        ),
        ("location-period", _D, "Encounter.location.period", "location.period:Period"),
        ("part-of", _R, "Encounter.partOf", "partOf:Reference", ("Encounter",)),
        (
            "participant",
            _R,
            "Encounter.participant.individual",
            "participant.individual:Reference",
            ("Practitioner", "PractitionerRole", "RelatedPerson"),
        ),
        (
            "participant-type",
            _T,
            "Encounter.participant.type",
            "participant.type:CodeableConcept",
        ),
        (
            "patient",
            _R,
            "Encounter.subject.where(resolve() is Patient)",
            "subject:Reference",
            ("Patient",),
            "Patient",
        ),
        (
            "practitioner",
            _R,
            "Encounter.participant.individual.where(resolve() is Practitioner)",
            "participant.individual:Reference",
            ("Practitioner",),
            "Practitioner",
        ),
        ("reason-code", _T, "Encounter.reasonCode", "reasonCode:CodeableConcept"),
        (
            "reason-reference",
            _R,
            "Encounter.reasonReference",
            "reasonReference:Reference",
            ("Condition", "Procedure", "Observation", "ImmunizationRecommendation"),
        ),
        (
            "service-provider",
            _R,
            "Encounter.serviceProvider",
            "serviceProvider:Reference",
            ("Organization",),
        ),
        (
            "special-arrangement",
            _T,
            "Encounter.hospitalization.specialArrangement",
            "hospitalization.specialArrangement:CodeableConcept",
        ),
        ("status", _T, "Encounter.status", "status:code"),
        ("subject", _R, "Encounter.subject", "subject:Reference", ("Group", "Patient")),
        ("type", _T, "Encounter.type", "type:CodeableConcept"),
    ],
)

_TASK = _define(
    "Task",
    [
        ("authored-on", _D, "Task.authoredOn", "authoredOn:date"),
        ("based-on", _R, "Task.basedOn", "basedOn:Reference"),
        ("business-status", _T, "Task.businessStatus", "businessStatus:CodeableConcept"),
        ("code", _T, "Task.code", "code:CodeableConcept"),
        ("encounter", _R, "Task.encounter", "encounter:Reference", ("Encounter",)),
        ("focus", _R, "Task.focus", "focus:Reference"),
        ("group-identifier", _T, "Task.groupIdentifier", "groupIdentifier:Identifier"),
        ("identifier", _T, "Task.identifier", "identifier:Identifier"),
        ("intent", _T, "Task.intent", "intent:code"),
        ("modified", _D, "Task.lastModified", "lastModified:date"),
        (
            "owner",
            _R,
            "Task.owner",
            "owner:Reference",
            (
                "Practitioner",
                "Organization",
                "CareTeam",
                "HealthcareService",
                "Patient",
                "Device",
                "PractitionerRole",
                "RelatedPerson",
            ),
        ),
        ("part-of", _R, "Task.partOf", "partOf:Reference", ("Task",)),
        (
            "patient",
            _R,
            "Task.for.where(resolve() is Patient)",
            "for:Reference",
            ("Patient",),
            "Patient",
        ),
        ("performer", _T, "Task.performerType", "performerType:CodeableConcept"),
        ("period", _D, "Task.executionPeriod", "executionPeriod:Period"),
        ("priority", _T, "Task.priority", "priority:code"),
        ("requester", _R, "Task.requester", "requester:Reference", _ACTORS),
        ("status", _T, "Task.status", "status:code"),
        ("subject", _R, "Task.for", "for:Reference"),
    ],
)

#: Resource type -> parameter name -> :class:`SearchParam` (type-specific parameters only).
SEARCH_PARAMS: Final[Mapping[str, Mapping[str, SearchParam]]] = MappingProxyType(
    {
        "AuditEvent": _AUDIT_EVENT,
        "Binary": MappingProxyType({}),
        "Consent": _CONSENT,
        "DocumentReference": _DOCUMENT_REFERENCE,
        "Encounter": _ENCOUNTER,
        "Organization": _ORGANIZATION,
        "Patient": _PATIENT,
        "Practitioner": _PRACTITIONER,
        "PractitionerRole": _PRACTITIONER_ROLE,
        "Provenance": _PROVENANCE,
        "RelatedPerson": _RELATED_PERSON,
        "Task": _TASK,
    }
)

#: The parameters for all resources (search.html, "Parameters for all resources").
#: ``_id`` and ``_lastUpdated`` have ``column=True``: the store keeps them as columns.
COMMON_PARAMS: Final[Mapping[str, SearchParam]] = MappingProxyType(
    {
        "_id": SearchParam("_id", ParamType.TOKEN, "Resource", "Resource.id", column=True),
        "_lastUpdated": SearchParam(
            "_lastUpdated", ParamType.DATE, "Resource", "Resource.meta.lastUpdated", column=True
        ),
        "_profile": SearchParam(
            "_profile",
            ParamType.URI,
            "Resource",
            "Resource.meta.profile",
            paths=("meta.profile:uri",),
        ),
        "_security": SearchParam(
            "_security",
            ParamType.TOKEN,
            "Resource",
            "Resource.meta.security",
            paths=("meta.security:Coding",),
        ),
        "_tag": SearchParam(
            "_tag", ParamType.TOKEN, "Resource", "Resource.meta.tag", paths=("meta.tag:Coding",)
        ),
    }
)

_ALL_PARAMS: Final[Mapping[str, Mapping[str, SearchParam]]] = {
    rt: MappingProxyType({**params, **COMMON_PARAMS}) for rt, params in SEARCH_PARAMS.items()
}


def params_for(resource_type: str) -> Mapping[str, SearchParam]:
    """All parameters searchable on *resource_type*: its own plus :data:`COMMON_PARAMS`.

    An unknown type gets only the common parameters.
    """
    return _ALL_PARAMS.get(resource_type, COMMON_PARAMS)


# --------------------------------------------------------------------------------------------
# Index rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenRow:
    """A token (or uri) index row.  ``text`` is the normalised Coding.display /
    CodeableConcept.text / Identifier.type.text used by ``:text`` (search.html#modifiers)."""

    param: str
    system: str | None
    code: str | None
    text: str | None


@dataclass(frozen=True, slots=True)
class StringRow:
    """A string index row: ``value = normalize_string(exact)``; ``exact`` serves ``:exact``."""

    param: str
    value: str
    exact: str


@dataclass(frozen=True, slots=True)
class ReferenceRow:
    """A reference index row.  ``url`` is ``Reference.reference`` as written; type/id are
    ``None`` when it is not a recognisable ``Type/id`` (e.g. ``urn:uuid:...``)."""

    param: str
    target_type: str | None
    target_id: str | None
    url: str


@dataclass(frozen=True, slots=True)
class DateRow:
    """A date index row: inclusive ``[low, high]`` in microseconds since the epoch (UTC)."""

    param: str
    low: int
    high: int


@dataclass(slots=True)
class IndexRows:
    """All index rows extracted from one resource, de-duplicated, in extraction order."""

    tokens: list[TokenRow] = field(default_factory=list)
    strings: list[StringRow] = field(default_factory=list)
    references: list[ReferenceRow] = field(default_factory=list)
    dates: list[DateRow] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_Tok = tuple[str, str | None, str | None, str | None]
_Str = tuple[str, str, str]
_Ref = tuple[str, str | None, str | None, str]
_Dat = tuple[str, int, int]


class _Acc:
    __slots__ = ("dates", "refs", "strings", "tokens")

    def __init__(self) -> None:
        self.tokens: list[_Tok] = []
        self.strings: list[_Str] = []
        self.refs: list[_Ref] = []
        self.dates: list[_Dat] = []


_Emit = Callable[[str, Any, _Acc, str | None], None]
# (key, filter_key, filter_value, recursive)
_Step = tuple[str, str | None, str | None, bool]


def _opt_str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _opt_norm(v: Any) -> str | None:
    if isinstance(v, str) and v:
        return normalize_string(v) or None
    return None


def _emit_code(p: str, v: Any, acc: _Acc, _rt: str | None) -> None:
    if isinstance(v, str) and v:
        acc.tokens.append((p, None, v, None))


def _emit_boolean(p: str, v: Any, acc: _Acc, _rt: str | None) -> None:
    if isinstance(v, bool):
        acc.tokens.append((p, None, "true" if v else "false", None))


def _coding_row(p: str, v: dict[str, Any]) -> _Tok | None:
    system, code, display = _opt_str(v.get("system")), _opt_str(v.get("code")), v.get("display")
    text = _opt_norm(display)
    if system is None and code is None and text is None:
        return None
    return (p, system, code, text)


def _emit_coding(p: str, v: Any, acc: _Acc, _rt: str | None) -> None:
    if isinstance(v, dict):
        row = _coding_row(p, v)
        if row is not None:
            acc.tokens.append(row)


def _emit_codeable_concept(p: str, v: Any, acc: _Acc, _rt: str | None) -> None:
    if not isinstance(v, dict):
        return
    texts: list[str | None] = []
    codings = v.get("coding")
    if isinstance(codings, list):
        for c in codings:
            if isinstance(c, dict):
                row = _coding_row(p, c)
                if row is not None:
                    acc.tokens.append(row)
                    texts.append(row[3])
    text = _opt_norm(v.get("text"))
    if text is not None and text not in texts:
        acc.tokens.append((p, None, None, text))


def _emit_identifier(p: str, v: Any, acc: _Acc, _rt: str | None) -> None:
    if not isinstance(v, dict):
        return
    system, value = _opt_str(v.get("system")), _opt_str(v.get("value"))
    ityp = v.get("type")
    text = _opt_norm(ityp.get("text")) if isinstance(ityp, dict) else None
    if system is not None or value is not None:
        acc.tokens.append((p, system, value, text))


def _emit_contact_point(p: str, v: Any, acc: _Acc, _rt: str | None) -> None:
    if isinstance(v, dict):
        value = _opt_str(v.get("value"))
        if value is not None:
            acc.tokens.append((p, None, value, None))


def _add_string(p: str, v: Any, acc: _Acc) -> None:
    if isinstance(v, str):
        norm = normalize_string(v)
        if norm:
            acc.strings.append((p, norm, v))


def _emit_string(p: str, v: Any, acc: _Acc, _rt: str | None) -> None:
    _add_string(p, v, acc)


def _emit_parts(
    p: str, v: Any, acc: _Acc, singles: tuple[str, ...], lists: tuple[str, ...]
) -> None:
    if not isinstance(v, dict):
        return
    for key in singles:
        s = v.get(key)
        if s is not None:
            _add_string(p, s, acc)
    for key in lists:
        items = v.get(key)
        if isinstance(items, list):
            for s in items:
                _add_string(p, s, acc)


def _emit_human_name(p: str, v: Any, acc: _Acc, _rt: str | None) -> None:
    # search.html#string: HumanName matches family, given, prefix, suffix and/or text.
    _emit_parts(p, v, acc, ("family", "text"), ("given", "prefix", "suffix"))


def _emit_address(p: str, v: Any, acc: _Acc, _rt: str | None) -> None:
    # search.html#string: Address matches line, city, district, state, country,
    # postalCode and/or text.
    _emit_parts(
        p, v, acc, ("city", "district", "state", "postalCode", "country", "text"), ("line",)
    )


@lru_cache(maxsize=16_384)
def _split_reference(ref: str) -> tuple[str | None, str | None]:
    """``"Type/id"`` / ``".../Type/id"`` (``/_history/n`` stripped) -> (type, id), else
    (None, None).  See references.html#literal."""
    hist = ref.find("/_history/")
    if hist >= 0:
        ref = ref[:hist]
    parts = ref.split("/")
    if len(parts) < 2:
        return None, None
    if len(parts) > 2 and ":" not in parts[0]:
        return None, None  # relative path with extra segments: not Type/id
    rtype, rid = parts[-2], parts[-1]
    if rtype in R4_RESOURCE_TYPES and _ID_RE.match(rid):
        return rtype, rid
    return None, None


#: Public names for builders that index what they construct themselves (the audit trail).
coding_row: Final = _coding_row
split_reference: Final = _split_reference


def _emit_reference(p: str, v: Any, acc: _Acc, ref_type: str | None) -> None:
    if not isinstance(v, dict):
        return
    ref = v.get("reference")
    if not isinstance(ref, str) or not ref or ref[0] == "#":
        return  # identifier/display-only or contained reference: nothing to index
    rtype, rid = _split_reference(ref)
    if ref_type is not None and rtype != ref_type:
        return
    acc.refs.append((p, rtype, rid, ref))


def _emit_date(p: str, v: Any, acc: _Acc, _rt: str | None) -> None:
    if isinstance(v, str):
        try:
            low, high = date_range(v)
        except SearchValueError:
            return
        acc.dates.append((p, low, high))


def _emit_period(p: str, v: Any, acc: _Acc, _rt: str | None) -> None:
    # search.html#date: a Period is the range start..end; a missing end means ongoing.
    if not isinstance(v, dict):
        return
    start, end = v.get("start"), v.get("end")
    if not isinstance(start, str) and not isinstance(end, str):
        return
    try:
        s = date_range(start) if isinstance(start, str) else None
        e = date_range(end) if isinstance(end, str) else None
    except SearchValueError:
        return
    low = s[0] if s is not None else DATE_MIN
    high = e[1] if e is not None else DATE_MAX
    if s is not None and e is not None:  # tolerate start > end: keep low <= high
        low, high = min(s[0], e[0]), max(s[1], e[1])
    acc.dates.append((p, low, high))


_EMITTERS: Final[Mapping[str, _Emit]] = {
    "code": _emit_code,
    "uri": _emit_code,
    "boolean": _emit_boolean,
    "Coding": _emit_coding,
    "CodeableConcept": _emit_codeable_concept,
    "Identifier": _emit_identifier,
    "ContactPoint": _emit_contact_point,
    "string": _emit_string,
    "HumanName": _emit_human_name,
    "Address": _emit_address,
    "Reference": _emit_reference,
    "date": _emit_date,
    "Period": _emit_period,
}

_SEGMENT_RE: Final = re.compile(r"([A-Za-z]+)(\*?)(?:\[([A-Za-z]+)=([^\]]+)\])?\Z")


def _compile_path(path: str) -> tuple[tuple[_Step, ...], str]:
    dotted, _, kind = path.partition(":")
    steps: list[_Step] = []
    for segment in dotted.split("."):
        m = _SEGMENT_RE.match(segment)
        if m is None:
            raise ValueError(f"bad extraction path {path!r}")
        steps.append((m[1], m[3], m[4], bool(m[2])))
    return tuple(steps), kind


def _walk(root: dict[str, Any], steps: tuple[_Step, ...]) -> list[Any]:
    """Follow *steps* from *root*, flattening lists (FHIRPath-style collection semantics)."""
    current: list[Any] = [root]
    for key, fkey, fval, recursive in steps:
        nxt: list[Any] = []
        for item in current:
            if isinstance(item, dict):
                val = item.get(key)
                if val is not None:
                    if isinstance(val, list):
                        nxt.extend(val)
                    else:
                        nxt.append(val)
        if recursive:
            i = 0
            while i < len(nxt):
                node = nxt[i]
                i += 1
                if isinstance(node, dict):
                    child = node.get(key)
                    if isinstance(child, list):
                        nxt.extend(child)
                    elif child is not None:
                        nxt.append(child)
        if fkey is not None:
            nxt = [v for v in nxt if isinstance(v, dict) and v.get(fkey) == fval]
        if not nxt:
            return nxt
        current = nxt
    return current


# (param name, first key, all steps or None for a plain one-key path, emitter, ref_type)
_PlanItem = tuple[str, str, tuple[_Step, ...] | None, _Emit, str | None]


def _compile_plan(params: Mapping[str, SearchParam]) -> tuple[_PlanItem, ...]:
    plan: list[_PlanItem] = []
    for sp in params.values():
        if sp.column:
            continue
        for path in sp.paths:
            steps, kind = _compile_path(path)
            if kind not in _KINDS_BY_TYPE[sp.type]:
                raise ValueError(f"{sp.resource_type}.{sp.name}: kind {kind!r} vs {sp.type}")
            simple = len(steps) == 1 and steps[0][1] is None and not steps[0][3]
            rest = None if simple else steps
            plan.append((sp.name, steps[0][0], rest, _EMITTERS[kind], sp.ref_type))
    return tuple(plan)


_COMMON_PLAN: Final = _compile_plan(COMMON_PARAMS)
_PLANS: Final[Mapping[str, tuple[_PlanItem, ...]]] = {
    rt: _compile_plan(params) + _COMMON_PLAN for rt, params in SEARCH_PARAMS.items()
}


def extract(resource: Mapping[str, Any]) -> IndexRows:
    """Extract the index rows for every parameter of ``resource["resourceType"]`` plus
    ``_security``, ``_tag`` and ``_profile`` from ``meta`` (search.html, "Parameters for all
    resources").

    An unknown resource type yields only the common parameters.  Rows are de-duplicated.
    Values that cannot be indexed (contained ``#refs``, identifier-only references, malformed
    dates in unvalidated input) are skipped rather than raising.
    """
    root = resource if isinstance(resource, dict) else dict(resource)
    acc = _Acc()
    rtype = root.get("resourceType")
    plan = _PLANS.get(rtype, _COMMON_PLAN) if isinstance(rtype, str) else _COMMON_PLAN
    for name, first, steps, emit, ref_type in plan:
        val = root.get(first)
        if val is None:
            continue
        if steps is not None:
            for v in _walk(root, steps):
                emit(name, v, acc, ref_type)
        elif isinstance(val, list):
            for v in val:
                emit(name, v, acc, ref_type)
        else:
            emit(name, val, acc, ref_type)
    return IndexRows(
        tokens=[TokenRow(*t) for t in dict.fromkeys(acc.tokens)],
        strings=[StringRow(*s) for s in dict.fromkeys(acc.strings)],
        references=[ReferenceRow(*r) for r in dict.fromkeys(acc.refs)],
        dates=[DateRow(*d) for d in dict.fromkeys(acc.dates)],
    )


# --------------------------------------------------------------------------------------------
# Query-value parsing
# --------------------------------------------------------------------------------------------

#: Date/number/quantity comparison prefixes (search.html#prefix).
PREFIXES: Final = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")

_ESCAPABLE: Final = frozenset(",|$\\")


def _split_unescaped(value: str, sep: str) -> list[str]:
    """Split on *sep* where it is not preceded by an escaping backslash; keep escapes."""
    if "\\" not in value:
        return value.split(sep)
    parts: list[str] = []
    buf: list[str] = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == "\\" and i + 1 < n:
            buf.append(value[i : i + 2])
            i += 2
            continue
        if c == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(c)
        i += 1
    parts.append("".join(buf))
    return parts


def split_or(value: str) -> list[str]:
    """Split a parameter value on unescaped commas (OR semantics; escaping per
    search.html#escaping).

    Escapes are preserved in the parts (so that a later ``|``/``$`` split still sees them);
    pass each part to :func:`parse_token`/:func:`parse_reference`/:func:`unescape`.  Empty
    parts are kept (``"a,,b"`` -> ``["a", "", "b"]``) so the caller can reject them.
    """
    return _split_unescaped(value, ",")


def unescape(value: str) -> str:
    """Resolve the escapes of search.html#escaping: ``\\,`` ``\\|`` ``\\$`` ``\\\\``.

    A backslash before any other character is kept literally; a dangling final backslash
    raises :class:`SearchValueError`.
    """
    if "\\" not in value:
        return value
    out: list[str] = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == "\\":
            if i + 1 >= n:
                raise SearchValueError(f"Dangling escape character in {_clip(value)}")
            nxt = value[i + 1]
            out.append(nxt if nxt in _ESCAPABLE else c + nxt)
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class DateQuery:
    """A parsed date search value: comparison ``prefix`` and the value's implicit range."""

    prefix: str
    low: int
    high: int


def parse_date(value: str) -> DateQuery:
    """Parse ``[prefix]date`` (search.html#date, #prefix), e.g. ``ge2013-01``.

    The default prefix is ``eq``.  A single space where the ``+`` of a timezone offset should
    be (an un-encoded ``+`` in a query string) is accepted as ``+``.
    """
    prefix = "eq"
    rest = value
    if len(value) >= 2 and value[:2] in PREFIXES:
        prefix, rest = value[:2], value[2:]
    if not rest:
        raise SearchValueError(f"Missing date in search value {_clip(value)}")
    if len(rest) > 6 and rest[-6] == " " and rest.count(" ") == 1:
        rest = rest[:-6] + "+" + rest[-5:]
    low, high = date_range(rest)
    return DateQuery(prefix, low, high)


@dataclass(frozen=True, slots=True)
class TokenQuery:
    """A parsed token value (search.html#token).

    ``system=None, code=X, system_must_be_absent=False``: ``code`` in any system;
    ``system=S, code=X``: ``S|X``; ``system=None, code=X, system_must_be_absent=True``: ``|X``;
    ``system=S, code=None``: ``S|`` (any code in S).
    """

    system: str | None
    code: str | None
    system_must_be_absent: bool


def parse_token(value: str) -> TokenQuery:
    """Parse ``[system]|[code]`` or ``code`` (search.html#token), honouring the escapes
    of search.html#escaping (``\\|`` is a literal bar in a code).  *value* is one OR-part (see
    :func:`split_or`), still escaped."""
    parts = _split_unescaped(value, "|")
    if len(parts) == 1:
        code = unescape(parts[0])
        if not code:
            raise SearchValueError("Empty token search value")
        return TokenQuery(None, code, False)
    if len(parts) != 2:
        raise SearchValueError(f"Token search value {_clip(value)} has more than one unescaped '|'")
    system, code_or_none = unescape(parts[0]) or None, unescape(parts[1]) or None
    if system is None and code_or_none is None:
        raise SearchValueError("Token search value '|' has neither system nor code")
    if system is None:
        return TokenQuery(None, code_or_none, True)
    return TokenQuery(system, code_or_none, False)


@dataclass(frozen=True, slots=True)
class ReferenceQuery:
    """A parsed reference value.  ``target_type=None`` means any type; ``url`` is set for an
    absolute reference (``target_type``/``target_id`` then come from its last two segments
    when those are a valid ``Type/id``)."""

    target_type: str | None
    target_id: str | None
    url: str | None


def parse_reference(
    value: str, param: SearchParam, type_modifier: str | None = None
) -> ReferenceQuery:
    """Parse a reference search value (search.html#reference).

    Accepts ``id``, ``Type/id``, an absolute URL ``http://host/fhir/Type/id`` and a URN
    (``urn:uuid:...``, url only); ``/_history/n`` is stripped.  *type_modifier* is the
    ``:Type`` modifier (with or without the colon).  A bare id gets the modifier's type, or the
    parameter's only target type if it has exactly one.  Types outside ``param.targets``
    (when non-empty) and conflicting types raise :class:`SearchValueError`.
    """
    if param.type is not ParamType.REFERENCE:
        raise SearchValueError(f"Parameter {param.name!r} is not a reference parameter")
    modifier: str | None = None
    if type_modifier:
        modifier = type_modifier[1:] if type_modifier.startswith(":") else type_modifier
        if modifier not in R4_RESOURCE_TYPES:
            raise SearchValueError(f"Unknown resource type modifier {_clip(modifier)}")
        if param.targets and modifier not in param.targets:
            raise SearchValueError(
                f"Type {modifier} is not a valid target of parameter {param.name!r}"
            )
    raw = unescape(value).strip()
    if not raw:
        raise SearchValueError(f"Empty reference value for parameter {param.name!r}")
    hist = raw.find("/_history/")
    if hist >= 0:
        raw = raw[:hist]

    url: str | None = None
    rtype: str | None
    rid: str | None
    if ":" in raw:  # absolute URL or URN
        url = raw
        rtype, rid = _split_reference(raw)
    else:
        parts = raw.split("/")
        if len(parts) == 1:
            rtype, rid = None, parts[0]
        elif len(parts) == 2:
            rtype, rid = parts
            if rtype not in R4_RESOURCE_TYPES:
                raise SearchValueError(f"Unknown resource type in reference {_clip(value)}")
        else:
            raise SearchValueError(f"Invalid reference {_clip(value)}: expected [Type/]id or URL")
        if not _ID_RE.match(rid):
            raise SearchValueError(f"Invalid resource id in reference {_clip(value)}")

    if modifier is not None:
        if rtype is not None and rtype != modifier:
            raise SearchValueError(
                f"Reference {_clip(value)} conflicts with the :{modifier} modifier"
            )
        if rid is not None:
            rtype = modifier
    elif rtype is None and rid is not None and len(param.targets) == 1:
        rtype = param.targets[0]
    if rtype is not None and param.targets and rtype not in param.targets:
        raise SearchValueError(f"Type {rtype} is not a valid target of parameter {param.name!r}")
    return ReferenceQuery(rtype, rid, url)
