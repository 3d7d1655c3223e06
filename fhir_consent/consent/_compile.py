"""Compiling FHIR R4 Consents into provision trees (consent.md §3.1-3.3); private helper.

:func:`compile_consent` validates and pre-digests a Consent once (dates as epoch microseconds,
codes as frozensets, actors grouped by role, each provision's decision and result object
precomputed), so that deciding is a few set look-ups per provision.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeGuard

from fhir_consent.consent._fhirtime import MAX_US, MIN_US, parse_fhir_time
from fhir_consent.consent._types import (
    ACTCODE_SYSTEM,
    CONSENT_ACTION_SYSTEM,
    MIME_SYSTEM,
    RESOURCE_TYPES_SYSTEM,
    ConsentResult,
    Decision,
    Ref,
    ResourceFacts,
)

__all__ = ["CompiledConsent", "compile_consent", "normalize_reference"]

# Code systems accepted for provision.action / provision.purpose (absent system = same code system).
_ACTION_SYSTEMS: Final = frozenset(
    {None, CONSENT_ACTION_SYSTEM, "http://hl7.org/fhir/consentaction"}
)
_PURPOSE_SYSTEMS: Final = frozenset(
    {
        None,
        "http://terminology.hl7.org/CodeSystem/v3-ActReason",
        "http://hl7.org/fhir/v3/ActReason",
        "urn:oid:2.16.840.1.113883.5.8",
    }
)
# consent.md §3.3: actor roles, grouped.
_CUSTODIAN_ROLES: Final = frozenset({"CST"})
_AUTHOR_ROLES: Final = frozenset({"AUT", "INF", "ENT"})
_RECIPIENT_ROLES: Final = frozenset({"PRCP", "IRCP", "DELEGATEE", "AUTHZR"})
_DATA_MEANINGS: Final = frozenset({"instance", "related", "dependents", "authoredby"})
# Bounds on one Consent's provision tree (beyond them it is rejected as malformed).
_MAX_DEPTH: Final = 16
_MAX_PROVISIONS: Final = 1_000


# ---------------------------------------------------------------------------------------------
# References and small JSON helpers
# ---------------------------------------------------------------------------------------------

_REF_RE = re.compile(
    r"(?:[A-Za-z][A-Za-z0-9+.\-]*://[^?#\s]*?/)?"
    r"(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?"
)


def normalize_reference(reference: object) -> Ref | None:
    """Normalize a literal reference to ``"Type/id"`` (consent.md §3.3 actors and data).

    Accepts relative (``Organization/f001``) and absolute
    (``https://x/fhir/Organization/f001/_history/2``) forms; returns ``None`` for anything that
    does not name a resource by type and id (contained ``#x``, ``urn:uuid:``, searches, junk).
    """
    if not isinstance(reference, str):
        return None
    m = _REF_RE.fullmatch(reference.strip())
    if m is None:
        return None
    return f"{m['type']}/{m['id']}"


def _ref_of(value: object) -> Ref | None:
    """The normalized ``reference`` of a FHIR Reference object, if any (lenient)."""
    if isinstance(value, Mapping):
        return normalize_reference(value.get("reference"))
    return None


def _as_list(value: object) -> list[Any]:
    """A FHIR repeating element as a list (lenient: a single object counts as one)."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return [value]


def _lenient_codings(value: object) -> Iterator[tuple[str | None, str]]:
    """(system, code) pairs from CodeableConcept(s) or Coding(s); silently skips junk."""
    for item in _as_list(value):
        if not isinstance(item, Mapping):
            continue
        codings = item.get("coding") if "coding" in item else [item]
        for coding in _as_list(codings):
            if not isinstance(coding, Mapping):
                continue
            code = coding.get("code")
            system = coding.get("system")
            if isinstance(code, str) and (system is None or isinstance(system, str)):
                yield system, code


def _mime(value: str) -> str:
    """A MIME type without parameters, lower-cased (``Text/Plain; charset=x`` → ``text/plain``)."""
    return value.split(";", 1)[0].strip().lower()


def _is_map(value: object) -> TypeGuard[Mapping[str, Any]]:
    """``isinstance(value, Mapping)``, as a type guard."""
    return isinstance(value, Mapping)


# ---------------------------------------------------------------------------------------------
# Compilation (consent.md §3.1-3.3)
# ---------------------------------------------------------------------------------------------


class _Malformed(ValueError):
    """A Consent this engine cannot interpret safely."""


class _DataRule:
    """A compiled ``provision.data`` list (consent.md §3.3, meanings)."""

    __slots__ = ("authored", "dependents", "instance", "related")

    def __init__(self) -> None:
        self.instance: frozenset[Ref] = frozenset()
        self.related: frozenset[Ref] = frozenset()
        self.dependents: frozenset[Ref] = frozenset()
        self.authored: frozenset[Ref] = frozenset()

    def matches(self, res: ResourceFacts) -> bool:
        """Whether any entry covers the resource: ``instance`` = the resource itself,
        ``related`` = it or anything it references, ``dependents`` = it or anything
        referencing it, ``authoredby`` = one of its authors (consent.md §3.3)."""
        ref = res.ref
        if ref in self.instance or ref in self.related or ref in self.dependents:
            return True
        if self.related and not self.related.isdisjoint(res.references):
            return True
        if self.dependents and not self.dependents.isdisjoint(res.referenced_by):
            return True
        return bool(self.authored) and not self.authored.isdisjoint(res.authors)


class _Node:
    """A compiled provision. ``None`` criteria are not populated (match anything)."""

    __slots__ = (
        "actor_refs",
        "actions",
        "authors",
        "children",
        "cls_mimes",
        "cls_types",
        "codes",
        "custodians",
        "d",
        "data",
        "dp_hi",
        "dp_lo",
        "extra",
        "has_class",
        "hi",
        "lo",
        "purposes",
        "recipients",
        "result",
        "security",
    )

    def __init__(self, d: Decision, result: ConsentResult) -> None:
        self.d = d
        self.result = result
        self.lo = MIN_US
        self.hi = MAX_US
        self.recipients: frozenset[Ref] | None = None
        self.actions: frozenset[str] | None = None
        self.purposes: frozenset[str] | None = None
        self.has_class = False
        self.cls_types: frozenset[str] = frozenset()
        self.cls_mimes: frozenset[str] = frozenset()
        self.extra = False
        self.custodians: frozenset[Ref] | None = None
        self.authors: frozenset[Ref] | None = None
        self.codes: frozenset[tuple[str | None, str]] | None = None
        self.security: frozenset[tuple[str | None, str]] | None = None
        self.data: _DataRule | None = None
        self.dp_lo = MIN_US
        self.dp_hi = MAX_US
        self.children: tuple[_Node, ...] = ()
        self.actor_refs: frozenset[Ref] = frozenset()


def _opposite(d: Decision) -> Decision:
    return Decision.DENY if d is Decision.PERMIT else Decision.PERMIT


def _strict_list(value: object, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Malformed(f"{what} must be an array")
    return value


def _strict_map(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _Malformed(f"{what} must be an object")
    return value


def _strict_codings(value: object, what: str) -> Iterator[tuple[str | None, str]]:
    """(system, code) of a Coding's fields; raises on wrong shapes, skips code-less codings."""
    coding = _strict_map(value, what)
    code = coding.get("code")
    system = coding.get("system")
    if code is None:
        return
    if not isinstance(code, str) or not (system is None or isinstance(system, str)):
        raise _Malformed(f"{what} has a non-string system/code")
    yield system, code


def _concept_codings(value: object, what: str) -> Iterator[tuple[str | None, str]]:
    concept = _strict_map(value, what)
    for coding in _strict_list(concept.get("coding"), f"{what}.coding"):
        yield from _strict_codings(coding, f"{what}.coding")


def _period(value: object, what: str) -> tuple[int, int] | None:
    """(lo, hi) of a populated Period, ``None`` if it sets neither end; raises if malformed."""
    if value is None:
        return None
    period = _strict_map(value, what)
    try:
        lo = parse_fhir_time(period["start"])[0] if period.get("start") is not None else MIN_US
        hi = parse_fhir_time(period["end"])[1] if period.get("end") is not None else MAX_US
    except ValueError as exc:
        raise _Malformed(f"{what}: {exc}") from None
    if lo == MIN_US and hi == MAX_US:
        return None
    if lo > hi:
        raise _Malformed(f"{what}: start is after end")
    return lo, hi


def _strict_ref(value: object, what: str) -> Ref:
    ref = _ref_of(_strict_map(value, what))
    if ref is None:
        raise _Malformed(f"{what} is not a resolvable Type/id reference")
    return ref


def _role_group(role: object) -> str:
    """``"custodian"``, ``"author"`` or ``"recipient"`` for an actor role (consent.md §3.3).

    The first coding with a known code decides; no role, or only unknown codes, means recipient
    (the actor is then someone the request must come from, the narrowest safe reading).
    """
    if role is None:
        return "recipient"
    for _system, code in _concept_codings(role, "provision.actor.role"):
        if code in _CUSTODIAN_ROLES:
            return "custodian"
        if code in _AUTHOR_ROLES:
            return "author"
        if code in _RECIPIENT_ROLES:
            return "recipient"
    return "recipient"


class _Compiler:
    """Compiles one Consent's provision tree (consent.md §3.3-3.4), depth first."""

    def __init__(self, consent_id: str | None, version: str | None) -> None:
        self.consent_id = consent_id
        self.version = version
        self.count = 0

    def provision(self, raw: object, parent: Decision, path: tuple[int, ...]) -> _Node:
        p = _strict_map(raw, "provision")
        self.count += 1
        if len(path) > _MAX_DEPTH or self.count > _MAX_PROVISIONS:
            raise _Malformed("provisions nested too deeply or too many")
        if "modifierExtension" in p:
            raise _Malformed("provision has a modifierExtension this engine does not understand")
        ptype = p.get("type")
        if ptype is None:
            d = _opposite(parent)
        elif ptype == "permit":
            d = Decision.PERMIT
        elif ptype == "deny":
            d = Decision.DENY
        else:
            raise _Malformed(f"provision.type {ptype!r} is not permit/deny")
        node = _Node(d, ConsentResult(d, True, self.consent_id, path, self.version))

        period = _period(p.get("period"), "provision.period")
        if period is not None:
            node.lo, node.hi = period

        recipients: set[Ref] = set()
        custodians: set[Ref] = set()
        authors: set[Ref] = set()
        for actor in _strict_list(p.get("actor"), "provision.actor"):
            actor = _strict_map(actor, "provision.actor")
            ref = _strict_ref(actor.get("reference"), "provision.actor.reference")
            group = _role_group(actor.get("role"))
            (
                custodians if group == "custodian" else authors if group == "author" else recipients
            ).add(ref)
        node.actor_refs = frozenset(recipients | custodians | authors)
        if recipients:
            node.recipients = frozenset(recipients)
        if custodians:
            node.custodians = frozenset(custodians)
        if authors:
            node.authors = frozenset(authors)

        actions = _strict_list(p.get("action"), "provision.action")
        if actions:
            node.actions = frozenset(
                code
                for concept in actions
                for system, code in _concept_codings(concept, "provision.action")
                if system in _ACTION_SYSTEMS
            )

        purposes = _strict_list(p.get("purpose"), "provision.purpose")
        if purposes:
            node.purposes = frozenset(
                code
                for coding in purposes
                for system, code in _strict_codings(coding, "provision.purpose")
                if system in _PURPOSE_SYSTEMS
            )

        classes = _strict_list(p.get("class"), "provision.class")
        if classes:
            node.has_class = True
            types: set[str] = set()
            mimes: set[str] = set()
            for coding in classes:
                for system, code in _strict_codings(coding, "provision.class"):
                    if system == RESOURCE_TYPES_SYSTEM:
                        types.add(code)
                    elif system == MIME_SYSTEM:
                        mimes.add(_mime(code))
            node.cls_types = frozenset(types)
            node.cls_mimes = frozenset(mimes)

        codes = _strict_list(p.get("code"), "provision.code")
        if codes:
            node.codes = frozenset(
                pair for concept in codes for pair in _concept_codings(concept, "provision.code")
            )

        labels = _strict_list(p.get("securityLabel"), "provision.securityLabel")
        if labels:
            node.security = frozenset(
                pair
                for coding in labels
                for pair in _strict_codings(coding, "provision.securityLabel")
            )

        data = _strict_list(p.get("data"), "provision.data")
        if data:
            rule = _DataRule()
            buckets: dict[str, set[Ref]] = {m: set() for m in _DATA_MEANINGS}
            for item in data:
                item = _strict_map(item, "provision.data")
                meaning = item.get("meaning")
                if meaning not in _DATA_MEANINGS:
                    raise _Malformed(f"provision.data.meaning {meaning!r} is unknown")
                buckets[meaning].add(_strict_ref(item.get("reference"), "provision.data.reference"))
            rule.instance = frozenset(buckets["instance"])
            rule.related = frozenset(buckets["related"])
            rule.dependents = frozenset(buckets["dependents"])
            rule.authored = frozenset(buckets["authoredby"])
            node.data = rule

        data_period = _period(p.get("dataPeriod"), "provision.dataPeriod")
        if data_period is not None:
            node.dp_lo, node.dp_hi = data_period

        node.extra = (
            node.custodians is not None
            or node.authors is not None
            or node.codes is not None
            or node.security is not None
            or node.data is not None
            or data_period is not None
        )
        node.children = tuple(
            self.provision(child, d, (*path, i))
            for i, child in enumerate(_strict_list(p.get("provision"), "provision.provision"))
        )
        return node


@dataclass(frozen=True, slots=True)
class CompiledConsent:
    """A Consent prepared for fast, repeated decisions (consent.md §3).

    ``error`` is set for a malformed Consent; such a Consent never applies. ``applicable`` is
    true for an active, well-formed Consent with a patient. Compile each Consent version once
    and reuse it; group a patient's compiled Consents in a ``ConsentSet`` for the fastest
    decisions.
    """

    consent_id: str | None
    version: str | None
    status: str | None
    patient: Ref | None
    base: Decision
    error: str | None
    _root: _Node | None = field(repr=False, compare=False)
    _match_patient: Ref | None = field(repr=False, compare=False)
    _implicit: ConsentResult = field(repr=False, compare=False)
    _inapplicable: ConsentResult = field(repr=False, compare=False)

    @property
    def applicable(self) -> bool:
        """Active, well-formed and about some patient (consent.md §3.1)."""
        return self._match_patient is not None


def _base_decision(consent: Mapping[str, Any]) -> Decision:
    """consent.md §3.2: permit for OPTIN (v3-ActCode) or a ``policy.uri`` ending ``/opt-in``."""
    opt_in = opt_out = False
    rule = consent.get("policyRule")
    if rule is not None:
        for system, code in _concept_codings(rule, "policyRule"):
            if system == ACTCODE_SYSTEM:
                opt_in |= code == "OPTIN"
                opt_out |= code == "OPTOUT"
    for policy in _strict_list(consent.get("policy"), "policy"):
        uri = _strict_map(policy, "policy").get("uri")
        if uri is not None and not isinstance(uri, str):
            raise _Malformed("policy.uri must be a string")
        if isinstance(uri, str) and uri.endswith("/opt-in"):
            opt_in = True
    if opt_in and opt_out:
        raise _Malformed("policyRule is both OPTIN and OPTOUT")
    return Decision.PERMIT if opt_in else Decision.DENY


def compile_consent(consent: Mapping[str, Any]) -> CompiledConsent:
    """Compile a FHIR R4 Consent (JSON object) once, for many decisions (consent.md §3).

    Never raises: a malformed Consent (bad dates, a period that ends before it starts, an
    unresolvable actor/data reference, unknown ``provision.type`` or ``data.meaning``, wrong JSON
    shapes, a ``modifierExtension``, an unparseable base policy) compiles with ``error`` set and
    is treated as not applicable. A Consent without a provision is valid: its result is its base
    policy (consent.md §3.5).
    """
    cid: str | None = None
    version: str | None = None
    status: str | None = None
    patient: Ref | None = None
    base = Decision.DENY
    if isinstance(consent, Mapping):
        raw_id = consent.get("id")
        cid = raw_id if isinstance(raw_id, str) else None
        meta = consent.get("meta")
        raw_version = meta.get("versionId") if isinstance(meta, Mapping) else None
        version = raw_version if isinstance(raw_version, str) else None
        raw_status = consent.get("status")
        status = raw_status if isinstance(raw_status, str) else None
        patient = _ref_of(consent.get("patient"))
    inapplicable = ConsentResult(None, False, cid, (), version)
    try:
        consent = _strict_map(consent, "Consent")
        if consent.get("resourceType") != "Consent":
            raise _Malformed("not a Consent")
        if "modifierExtension" in consent:
            raise _Malformed("Consent has a modifierExtension this engine does not understand")
        if patient is None or not patient.startswith("Patient/"):
            raise _Malformed("Consent.patient is not a resolvable Patient reference")
        base = _base_decision(consent)
        raw_root = consent.get("provision")
        root = None if raw_root is None else _Compiler(cid, version).provision(raw_root, base, ())
    except (_Malformed, TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        return CompiledConsent(
            consent_id=cid,
            version=version,
            status=status,
            patient=patient,
            base=base,
            error=str(exc) or type(exc).__name__,
            _root=None,
            _match_patient=None,
            _implicit=inapplicable,
            _inapplicable=inapplicable,
        )
    return CompiledConsent(
        consent_id=cid,
        version=version,
        status=status,
        patient=patient,
        base=base,
        error=None,
        _root=root,
        _match_patient=sys.intern(patient) if status == "active" else None,
        _implicit=ConsentResult(base, False, cid, (), version),
        _inapplicable=inapplicable,
    )
