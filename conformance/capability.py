"""What a server's CapabilityStatement claims (R4 capabilitystatement.html), in the terms
the checks use: resource types, their interactions and search parameters, the whole-system
interactions, formats, and the fhir-consent consent-enforcement marker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONSENT_ENFORCEMENT",
    "Capability",
    "ResourceClaim",
    "SearchParamClaim",
    "parse_capability",
]

#: ``CapabilityStatement.instantiates`` of a server that enforces the patient-consent rules
#: of fhir-consent (shared/specs/consent.md); the consent section runs only against such a
#: server. fhir_consent/fhir/capability.py declares it.
CONSENT_ENFORCEMENT = "urn:fhir-consent:CapabilityStatement:consent-enforcement"

TYPE_INTERACTIONS = (
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


@dataclass(frozen=True, slots=True)
class SearchParamClaim:
    name: str
    type: str
    documentation: str = ""
    definition: str = ""


@dataclass(frozen=True)
class ResourceClaim:
    type: str
    interactions: frozenset[str]
    search_params: tuple[SearchParamClaim, ...]
    versioning: str = "no-version"
    update_create: bool = False
    conditional_create: bool = False
    conditional_update: bool = False
    conditional_delete: str = "not-supported"
    read_history: bool = False

    def param(self, name: str) -> SearchParamClaim | None:
        return next((p for p in self.search_params if p.name == name), None)


@dataclass(frozen=True)
class Capability:
    raw: dict[str, Any]
    fhir_version: str
    formats: tuple[str, ...]
    patch_formats: tuple[str, ...]
    resources: dict[str, ResourceClaim] = field(default_factory=dict)
    system_interactions: frozenset[str] = frozenset()
    instantiates: tuple[str, ...] = ()

    def claims(self, rtype: str, interaction: str) -> bool:
        claim = self.resources.get(rtype)
        return claim is not None and interaction in claim.interactions

    @property
    def enforces_consent(self) -> bool:
        return CONSENT_ENFORCEMENT in self.instantiates


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def parse_capability(statement: dict[str, Any]) -> Capability:
    """The claims of a CapabilityStatement (the first ``rest`` entry in ``server`` mode)."""
    if statement.get("resourceType") != "CapabilityStatement":
        raise ValueError("not a CapabilityStatement")
    rests = [r for r in statement.get("rest") or [] if isinstance(r, dict)]
    rest = next((r for r in rests if r.get("mode") == "server"), rests[0] if rests else {})
    resources: dict[str, ResourceClaim] = {}
    for item in rest.get("resource") or []:
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            continue
        interactions = frozenset(
            i["code"]
            for i in item.get("interaction") or []
            if isinstance(i, dict) and isinstance(i.get("code"), str)
        )
        params = tuple(
            SearchParamClaim(
                name=str(p["name"]),
                type=str(p.get("type", "")),
                documentation=str(p.get("documentation", "")),
                definition=str(p.get("definition", "")),
            )
            for p in item.get("searchParam") or []
            if isinstance(p, dict) and isinstance(p.get("name"), str)
        )
        resources[item["type"]] = ResourceClaim(
            type=item["type"],
            interactions=interactions,
            search_params=params,
            versioning=str(item.get("versioning", "no-version")),
            update_create=item.get("updateCreate") is True,
            conditional_create=item.get("conditionalCreate") is True,
            conditional_update=item.get("conditionalUpdate") is True,
            conditional_delete=str(item.get("conditionalDelete", "not-supported")),
            read_history=item.get("readHistory") is True,
        )
    system = frozenset(
        i["code"]
        for i in rest.get("interaction") or []
        if isinstance(i, dict) and isinstance(i.get("code"), str)
    )
    return Capability(
        raw=statement,
        fhir_version=str(statement.get("fhirVersion", "")),
        formats=_strings(statement.get("format")),
        patch_formats=_strings(statement.get("patchFormat")),
        resources=resources,
        system_interactions=system,
        instantiates=_strings(statement.get("instantiates")),
    )
