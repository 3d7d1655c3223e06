"""``GET [base]/metadata``: a CapabilityStatement generated from what is actually registered
(types, interactions, search parameters, formats), so it claims nothing more (R4
capabilitystatement.html). Extra sections (SMART security, operations) are added by the
features that provide them through ``extend``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fhir_consent.fhir import searchparams as sp
from fhir_consent.fhir.validation import SUPPORTED_TYPES

__all__ = [
    "CONSENT_ENFORCEMENT",
    "CapabilityExtender",
    "capability_statement",
    "declare_consent_enforcement",
]

CapabilityExtender = Callable[[dict[str, Any]], None]

#: ``CapabilityStatement.instantiates`` when the consent rules of shared/specs/consent.md are
#: enforced: how a client (and ``python -m conformance``) discovers that this server decides
#: access by the patient's Consents.
CONSENT_ENFORCEMENT = "urn:fhir-consent:CapabilityStatement:consent-enforcement"


def declare_consent_enforcement(statement: dict[str, Any]) -> None:
    """A :data:`CapabilityExtender`: the statement says that consent is enforced."""
    listed = statement.setdefault("instantiates", [])
    if CONSENT_ENFORCEMENT not in listed:
        listed.append(CONSENT_ENFORCEMENT)

_INTERACTIONS = (
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)
_SEARCH_TYPE_NAMES = {
    sp.ParamType.TOKEN: "token",
    sp.ParamType.STRING: "string",
    sp.ParamType.REFERENCE: "reference",
    sp.ParamType.DATE: "date",
    sp.ParamType.URI: "uri",
}
_RESULT_PARAMS = ("_count", "_sort", "_include", "_revinclude", "_summary", "_total", "_elements")


_OPERATIONS: dict[str, list[dict[str, str]]] = {
    "Patient": [
        {
            "name": "everything",
            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
        }
    ],
}


_READ_ONLY = ("read", "vread", "history-instance", "history-type", "search-type")


def _resource(rtype: str, *, read_only: bool = False) -> dict[str, Any]:
    params = sp.params_for(rtype)
    ref_params = sorted(n for n, p in params.items() if p.type is sp.ParamType.REFERENCE)
    rev = sorted(
        f"{other}:{name}"
        for other in SUPPORTED_TYPES
        for name, p in sp.params_for(other).items()
        if p.type is sp.ParamType.REFERENCE and (not p.targets or rtype in p.targets)
    )
    out: dict[str, Any] = {
        "type": rtype,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}",
        "interaction": [
            {"code": code} for code in (_READ_ONLY if read_only else _INTERACTIONS)
        ],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": not read_only,
        "conditionalCreate": not read_only,
        "conditionalRead": "not-supported",
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
        "searchInclude": ["*", *(f"{rtype}:{n}" for n in ref_params)],
        "searchRevInclude": rev,
        "searchParam": [
            {
                "name": name,
                "type": _SEARCH_TYPE_NAMES[p.type],
                "documentation": p.expression,
            }
            for name, p in sorted(params.items())
        ],
    }
    if rtype in _OPERATIONS:
        out["operation"] = _OPERATIONS[rtype]
    return out


def capability_statement(
    base: str,
    *,
    software_version: str,
    date: str,
    extenders: Sequence[CapabilityExtender] = (),
    read_only_types: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The server's CapabilityStatement for FHIR 4.0.1. ``read_only_types`` are served but
    never written through the API (AuditEvents, unless access is open): only their read,
    history and search interactions are claimed."""
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "fhir-consent",
        "kind": "instance",
        "software": {"name": "fhir-consent", "version": software_version},
        "implementation": {"description": "fhir-consent FHIR R4 server", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [
            {
                "mode": "server",
                "documentation": "Result parameters: "
                + ", ".join(_RESULT_PARAMS)
                + ". Unknown search parameters are ignored unless Prefer: handling=strict.",
                "resource": [
                    _resource(t, read_only=t in read_only_types) for t in SUPPORTED_TYPES
                ],
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }
    for extend in extenders:
        extend(statement)
    return statement
