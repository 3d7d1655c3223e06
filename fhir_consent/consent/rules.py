"""The pure consent decision engine: who may do what with a patient's data (consent.md §1, §3, §5).

This module holds no I/O and reads no clock. The caller injects the time of the request
(:attr:`AccessRequest.at`), the requester set (consent.md §1), the facts about the resource
(:class:`ResourceFacts`, usually from :func:`facts_from_resource`), the patient's Consents
(compiled once with :func:`compile_consent`, optionally indexed in a :class:`ConsentSet`) and the
resolved legal representatives.

Decision procedure (consent.md §3):

* one Consent (:func:`evaluate_consent`): only ``active`` Consents about the resource's patient
  apply; base = permit for OPTIN / ``…/opt-in``, else deny; the root provision is evaluated
  against the base, a provision matches when *every* criterion it populates matches, a matching
  provision decides its ``type`` or, without one, the opposite of its parent; a matching child's
  deny beats child permits, which beat the provision's own decision. A matched provision makes the
  result *explicit*, otherwise it is the (implicit) base.
* all Consents (:func:`decide`): the patient and their legal representatives always have access;
  the explicit tier outranks the implicit tier; deny wins within a tier; no decision → deny. The
  custodian of the resource keeps access, and break-glass (purpose ETREAT, if the deployment
  enables it) is granted, unless an explicit deny *names* a member of the requester set.

Malformed Consents never raise: :func:`compile_consent` marks them (``error``) and they are
treated as not applicable, so they can never grant anything.
"""

from __future__ import annotations

import sys
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, overload

from fhir_consent.consent._compile import (
    CompiledConsent,
    _as_list,
    _is_map,
    _lenient_codings,
    _mime,
    _Node,
    _ref_of,
    compile_consent,
    normalize_reference,
)
from fhir_consent.consent._fhirtime import (
    MAX_US,
    MIN_US,
    OPEN_END_US,
    OPEN_START_US,
    datetime_to_us,
    parse_fhir_time,
    us_to_datetime,
)
from fhir_consent.consent._types import (
    ACTCODE_SYSTEM,
    BREAK_GLASS_PURPOSE,
    CONFIDENTIALITY_SYSTEM,
    CONSENT_ACTION_SYSTEM,
    LEGAL_REPRESENTATIVE_CODES,
    MIME_SYSTEM,
    RESOURCE_TYPES_SYSTEM,
    ROLECODE_SYSTEM,
    AccessDecision,
    AccessRequest,
    ConsentResult,
    Decision,
    Reason,
    Ref,
    ResourceFacts,
)

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
    "CompiledConsent",
    "ConsentResult",
    "ConsentSet",
    "Decision",
    "Reason",
    "Ref",
    "ResourceFacts",
    "compile_consent",
    "decide",
    "evaluate_consent",
    "facts_from_resource",
    "is_legal_representative",
    "normalize_reference",
]

_DEFAULT_SECURITY: Final = frozenset({(CONFIDENTIALITY_SYSTEM, "N")})


# ---------------------------------------------------------------------------------------------
# Parties (consent.md §1)
# ---------------------------------------------------------------------------------------------


def is_legal_representative(related_person: Mapping[str, Any], patient_ref: Ref) -> bool:
    """Whether a RelatedPerson is a legal representative of ``patient_ref`` (consent.md §1).

    True iff it is a RelatedPerson, its ``patient`` is that patient, ``active`` is not ``false``
    and a ``relationship`` coding is GUARD, POWATT, DPOWATT or HPOWATT in v3-RoleCode.
    """
    if not isinstance(related_person, Mapping):
        return False
    if related_person.get("resourceType") != "RelatedPerson":
        return False
    active = related_person.get("active", True)
    if active is not True:
        return False
    wanted = normalize_reference(patient_ref)
    if wanted is None or _ref_of(related_person.get("patient")) != wanted:
        return False
    return any(
        system == ROLECODE_SYSTEM and code in LEGAL_REPRESENTATIVE_CODES
        for system, code in _lenient_codings(related_person.get("relationship"))
    )


# ---------------------------------------------------------------------------------------------
# Resource facts
# ---------------------------------------------------------------------------------------------

_PATIENT_KEYS: Final = ("patient", "subject", "for", "beneficiary")
_AUTHOR_KEYS: Final = ("author", "recorder", "performer")
_CODE_KEYS: Final = ("type", "category", "code")
# Where a resource keeps its clinical date, in order (consent.md §3.3: DocumentReference uses
# context.period, else date; other types use the analogous elements).
_CLINICAL_KEYS: Final = (
    ("context", "period"),
    ("effectivePeriod",),
    ("effectiveDateTime",),
    ("effectiveInstant",),
    ("performedPeriod",),
    ("performedDateTime",),
    ("occurrencePeriod",),
    ("occurrenceDateTime",),
    ("executionPeriod",),
    ("period",),
    ("date",),
    ("authoredOn",),
    ("recorded",),
    ("issued",),
)


def _walk_references(value: object, out: set[Ref]) -> None:
    """Collect every resolvable literal reference anywhere inside a JSON value."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            ref = item.get("reference")
            if isinstance(ref, str):
                norm = normalize_reference(ref)
                if norm is not None:
                    out.add(norm)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _lenient_range(value: object) -> tuple[int, int] | None:
    """(lo, hi) of a FHIR time value or Period, or None if absent/unparseable.

    A Period follows R4 datatypes.html#Period: a missing ``start`` is an unknown (open) start
    and a missing ``end`` means the period is ongoing, so the open side is the earliest or
    latest representable instant; a period written backwards covers both ends. This is
    exactly the range the search index stores for the element (searchparams ``_emit_period``),
    so SQL and the engine read a resource's clinical date the same way (consent.md §3.3, §4).
    """
    if isinstance(value, str):
        try:
            return parse_fhir_time(value)
        except ValueError:
            return None
    if isinstance(value, Mapping):
        try:
            start = parse_fhir_time(value["start"]) if "start" in value else None
            end = parse_fhir_time(value["end"]) if "end" in value else None
        except ValueError:
            return None
        if start is None and end is None:
            return None
        if start is None:
            return OPEN_START_US, end[1] if end is not None else OPEN_END_US
        if end is None:
            return start[0], OPEN_END_US
        return min(start[0], end[0]), max(start[1], end[1])
    return None


def _clamp(us: int) -> int:
    """Keep a time inside what :class:`datetime` can hold (offsets can push year 1 or 9999
    past it); the open sentinels are exactly its bounds."""
    return min(max(us, OPEN_START_US), OPEN_END_US)


def _clinical_range(resource: Mapping[str, Any]) -> tuple[int, int] | None:
    for path in _CLINICAL_KEYS:
        value: object = resource
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if value is None:
            continue
        found = _lenient_range(value)
        if found is not None:
            return found
    return None


def facts_from_resource(
    resource: Mapping[str, Any],
    referenced_by: frozenset[Ref] = frozenset(),
    *,
    patient: Ref | None = None,
    custodian: Ref | None = None,
) -> ResourceFacts:
    """Extract :class:`ResourceFacts` from a FHIR R4 resource (JSON object), any type.

    * ``patient``: the resource itself for Patient, else ``patient``/``subject``/``for``/
      ``beneficiary`` when it references a Patient (AuditEvent: ``entity.what``; Provenance:
      ``target``; Binary: ``securityContext``); the keyword ``patient`` is a fallback used only
      when the resource names none (e.g. a Binary served for a patient's DocumentReference).
    * ``custodian``: ``custodian`` (keyword fallback as for ``patient``).
    * ``authors``: ``author``, ``recorder``, ``performer`` (or ``performer.actor``), Provenance
      ``agent.who``.
    * ``codes``: codings of ``type``, ``category`` and ``code``.
    * ``content_types``: attachment MIME types (``content.attachment``, Binary ``contentType``,
      ``presentedForm``, ``valueAttachment``), lower-case without parameters.
    * ``security_labels``: ``meta.security`` plus DocumentReference ``securityLabel`` /
      Composition ``confidentiality``; none at all → Confidentiality N (consent.md §3.3).
    * ``clinical_period``: ``context.period``, else ``date`` (and analogous elements for other
      types); ``None`` when absent or unparseable. A Period without ``end`` is ongoing and one
      without ``start`` has an unknown start (R4 datatypes.html#Period): the open side is
      the last / first instant a ``datetime`` holds, so such a resource is inside a
      ``dataPeriod`` only when that side of the ``dataPeriod`` is open too.
    * ``references``: every resolvable literal reference inside the resource.
    """
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise ValueError("resource has no resourceType")
    rid = resource.get("id")
    ref = f"{rtype}/{rid}" if isinstance(rid, str) and rid else f"{rtype}/"

    found_patient: Ref | None = None
    if rtype == "Patient":
        found_patient = ref if isinstance(rid, str) and rid else None
    else:
        candidates: list[object] = [resource.get(k) for k in _PATIENT_KEYS]
        if rtype == "AuditEvent":
            candidates += [e.get("what") for e in _as_list(resource.get("entity")) if _is_map(e)]
        elif rtype == "Provenance":
            candidates += _as_list(resource.get("target"))
        elif rtype == "Binary":
            candidates.append(resource.get("securityContext"))
        for candidate in candidates:
            norm = _ref_of(candidate)
            if norm is not None and norm.startswith("Patient/"):
                found_patient = norm
                break
    if found_patient is None and patient is not None:
        found_patient = normalize_reference(patient)

    found_custodian = _ref_of(resource.get("custodian"))
    if found_custodian is None and custodian is not None:
        found_custodian = normalize_reference(custodian)

    authors: set[Ref] = set()
    for key in _AUTHOR_KEYS:
        for item in _as_list(resource.get(key)):
            norm = _ref_of(item)
            if norm is None and _is_map(item):
                norm = _ref_of(item.get("actor"))
            if norm is not None:
                authors.add(norm)
    if rtype == "Provenance":
        for agent in _as_list(resource.get("agent")):
            norm = _ref_of(agent.get("who")) if _is_map(agent) else None
            if norm is not None:
                authors.add(norm)

    codes: set[tuple[str | None, str]] = set()
    for key in _CODE_KEYS:
        codes.update(_lenient_codings(resource.get(key)))

    content_types: set[str] = set()
    attachments: list[object] = []
    for content in _as_list(resource.get("content")):
        if _is_map(content):
            attachments.append(content.get("attachment", content))
    attachments += _as_list(resource.get("presentedForm"))
    attachments.append(resource.get("valueAttachment"))
    attachments.append(resource)  # Binary.contentType
    for attachment in attachments:
        if _is_map(attachment):
            ctype = attachment.get("contentType")
            if isinstance(ctype, str) and ctype.strip():
                content_types.add(_mime(ctype))

    security: set[tuple[str | None, str]] = set()
    meta = resource.get("meta")
    if _is_map(meta):
        security.update(_lenient_codings(meta.get("security")))
    security.update(_lenient_codings(resource.get("securityLabel")))
    confidentiality = resource.get("confidentiality")
    if rtype == "Composition" and isinstance(confidentiality, str):
        security.add((CONFIDENTIALITY_SYSTEM, confidentiality))

    clinical = _clinical_range(resource)
    references: set[Ref] = set()
    _walk_references(resource, references)

    return ResourceFacts(
        ref=ref,
        resource_type=rtype,
        patient=found_patient,
        custodian=found_custodian,
        authors=frozenset(authors),
        codes=frozenset(codes),
        content_types=frozenset(content_types),
        security_labels=frozenset(security) if security else _DEFAULT_SECURITY,
        clinical_period=(
            None
            if clinical is None
            else (us_to_datetime(_clamp(clinical[0])), us_to_datetime(_clamp(clinical[1])))
        ),
        references=frozenset(references),
        referenced_by=frozenset(referenced_by),
    )


# ---------------------------------------------------------------------------------------------
# Evaluation (consent.md §3.3-3.5)
# ---------------------------------------------------------------------------------------------

_UNSET: Final[Any] = object()


class _Ctx:
    """Per-request values, computed once per decision."""

    __slots__ = ("_clinical", "action", "ctypes", "purposes", "req", "res", "rtype", "t")

    def __init__(self, request: AccessRequest, resource: ResourceFacts) -> None:
        self.t = datetime_to_us(request.at)
        self.req = request.requesters
        self.action = request.action
        self.purposes = request.purposes
        self.rtype = resource.resource_type
        self.ctypes = resource.content_types
        self.res = resource
        self._clinical: tuple[int, int] | None = _UNSET

    def clinical(self) -> tuple[int, int] | None:
        """The resource's clinical date as (lo, hi) microseconds, or None."""
        if self._clinical is _UNSET:
            period = self.res.clinical_period
            start, end = period if period is not None else (None, None)
            if start is None:
                start = end
            if end is None:
                end = start
            self._clinical = (
                None
                if start is None or end is None
                else (datetime_to_us(start), datetime_to_us(end))
            )
        return self._clinical


def _eval(n: _Node, x: _Ctx) -> ConsentResult | None:
    """consent.md §3.3-3.4: the provision's result, ``None`` when it does not match.

    A provision matches when every criterion it populates matches (the cheapest and most
    selective checks first); a matching child's deny wins, then a child's permit, then the
    provision's own decision. This is the hot loop of :func:`decide`.
    """
    refs = n.recipients
    if refs is not None and refs.isdisjoint(x.req):
        return None
    if not n.lo <= x.t <= n.hi:
        return None
    words = n.actions
    if words is not None and x.action not in words:
        return None
    words = n.purposes
    if words is not None and words.isdisjoint(x.purposes):
        return None
    if n.has_class and x.rtype not in n.cls_types and n.cls_mimes.isdisjoint(x.ctypes):
        return None
    if n.extra and not _matches_resource(n, x):
        return None
    children = n.children
    if not children:
        return n.result
    permit: ConsentResult | None = None
    for child in children:
        r = _eval(child, x)
        if r is not None:
            if r.decision is Decision.DENY:
                return r
            if permit is None:
                permit = r
    return n.result if permit is None else permit


def _matches_resource(n: _Node, x: _Ctx) -> bool:
    """consent.md §3.3, the less common criteria: custodian and author actors, ``code``,
    ``securityLabel``, ``data`` and ``dataPeriod``."""
    res = x.res
    refs = n.custodians
    if refs is not None and res.custodian not in refs:
        return False
    refs = n.authors
    if refs is not None and refs.isdisjoint(res.authors):
        return False
    pairs = n.codes
    if pairs is not None and pairs.isdisjoint(res.codes):
        return False
    pairs = n.security
    if pairs is not None and pairs.isdisjoint(res.security_labels or _DEFAULT_SECURITY):
        return False
    if n.data is not None and not n.data.matches(res):
        return False
    if n.dp_lo != MIN_US or n.dp_hi != MAX_US:
        clinical = x.clinical()
        if clinical is None or clinical[0] < n.dp_lo or clinical[1] > n.dp_hi:
            return False
    return True


def _deny_names(
    n: _Node, x: _Ctx, inherited: frozenset[Ref]
) -> tuple[Decision, frozenset[Ref]] | None:
    """Like :func:`_eval`, but also returns the actors a deny result names.

    A deny names every actor of the denying provision and of the (matching) provisions that
    enclose it, across every matching denying branch.
    """
    if _eval(n, x) is None:  # None exactly when the provision does not match
        return None
    here = inherited | n.actor_refs
    named: set[Ref] = set()
    any_deny = any_permit = False
    for child in n.children:
        r = _deny_names(child, x, here)
        if r is None:
            continue
        if r[0] is Decision.DENY:
            any_deny = True
            named |= r[1]
        else:
            any_permit = True
    if any_deny:
        return Decision.DENY, frozenset(named)
    if any_permit:
        return Decision.PERMIT, frozenset()
    return n.d, here if n.d is Decision.DENY else frozenset()


def evaluate_consent(
    consent: CompiledConsent, request: AccessRequest, resource: ResourceFacts
) -> ConsentResult:
    """The result of one Consent for one request (consent.md §3.1-3.5).

    ``decision`` is ``None`` when the Consent does not apply (not active, malformed, or about a
    patient other than ``resource.patient``).
    """
    if consent._match_patient is None or consent._match_patient != resource.patient:
        return consent._inapplicable
    root = consent._root
    if root is None:
        return consent._implicit
    result = _eval(root, _Ctx(request, resource))
    return consent._implicit if result is None else result


# ---------------------------------------------------------------------------------------------
# ConsentSet: one patient's Consents, indexed by criterion (same semantics as the plain loop)
# ---------------------------------------------------------------------------------------------


class _Plan:
    """A provision inside a :class:`ConsentSet`: its bit, static result and children.

    When every child is a leaf (the usual shape of nested exceptions), the children are also
    summarized as two masks, so that the first matching deny/permit child is found with a few
    integer operations (children's bits increase in document order).
    """

    __slots__ = ("bit", "by_bit", "children", "deny_kids", "flat", "permit_kids", "result")

    def __init__(self, bit: int, result: ConsentResult, children: tuple[_Plan, ...]) -> None:
        self.bit = bit
        self.result = result
        self.children = children
        self.flat = bool(children) and not any(child.children for child in children)
        self.deny_kids = self.permit_kids = 0
        self.by_bit: dict[int, ConsentResult] = {}
        if self.flat:
            for child in children:
                self.by_bit[child.bit] = child.result
                if child.result.decision is Decision.DENY:
                    self.deny_kids |= child.bit
                else:
                    self.permit_kids |= child.bit


class _KeyIndex:
    """Criteria of one kind, keyed by value: ``by[value]`` = bits of the criteria that contain
    ``value`` (a criterion holds when any of the request's/resource's values is in it)."""

    __slots__ = ("all", "by")

    def __init__(self) -> None:
        self.all = 0
        self.by: dict[Any, int] = {}

    def add(self, values: Iterable[Any], bit: int) -> None:
        self.all |= bit
        for value in values:
            self.by[value] = self.by.get(value, 0) | bit

    def hits(self, values: Iterable[Any]) -> int:
        """Bits of the criteria satisfied by any of ``values``."""
        by = self.by
        sat = 0
        for value in values:
            bits = by.get(value)
            if bits:
                sat |= bits
        return sat


class _IntervalIndex:
    """Closed intervals ``[lo, hi]``; finds those containing ``[a, b]`` with two bisections."""

    __slots__ = ("_items", "all", "his", "los", "lo_prefix", "hi_suffix")

    def __init__(self) -> None:
        self.all = 0
        self._items: list[tuple[int, int, int]] = []
        self.los: list[int] = []
        self.his: list[int] = []
        self.lo_prefix: list[int] = [0]
        self.hi_suffix: list[int] = [0]

    def add(self, lo: int, hi: int, bit: int) -> None:
        self.all |= bit
        self._items.append((lo, hi, bit))

    def freeze(self) -> None:
        by_lo = sorted(self._items)
        self.los = [lo for lo, _, _ in by_lo]
        self.lo_prefix = [0]
        for _, _, bit in by_lo:
            self.lo_prefix.append(self.lo_prefix[-1] | bit)
        by_hi = sorted(self._items, key=lambda item: item[1])
        self.his = [hi for _, hi, _ in by_hi]
        self.hi_suffix = [0] * (len(by_hi) + 1)
        for k in range(len(by_hi) - 1, -1, -1):
            self.hi_suffix[k] = self.hi_suffix[k + 1] | by_hi[k][2]

    def containing(self, a: int, b: int) -> int:
        """Bits of the intervals with ``lo <= a`` and ``b <= hi``."""
        return self.lo_prefix[bisect_right(self.los, a)] & self.hi_suffix[bisect_left(self.his, b)]


class _PatientIndex:
    """The applicable Consents of one patient, indexed by criterion (consent.md §3.3).

    Every provision gets a bit (consent *i*'s root provision gets bit *i*); each criterion kind
    has an inverted index from values to the bits of the provisions whose criterion of that kind
    contains the value. For a request, :meth:`failing` ORs, kind by kind, the bits of the
    provisions whose criterion is populated but not satisfied: a provision matches exactly when
    its bit is not failing. The cost grows with the request, not with the number of Consents.
    """

    __slots__ = (
        "_next",
        "action",
        "author",
        "code",
        "consents",
        "cust",
        "data_all",
        "data_auth",
        "data_dep",
        "data_inst",
        "data_rel",
        "dperiod",
        "implicit_deny",
        "implicit_permit",
        "kind",
        "period",
        "plans",
        "purpose",
        "rec",
        "all_bits",
        "leaf_deny",
        "leaf_permit",
        "results",
        "roots",
        "security",
        "trees",
    )

    def __init__(self, consents: Sequence[CompiledConsent]) -> None:
        self.consents = tuple(consents)
        self._next = 1 << len(self.consents)  # bits below are the root provisions'
        self.rec = _KeyIndex()
        self.action = _KeyIndex()
        self.purpose = _KeyIndex()
        self.kind = _KeyIndex()  # provision.class: resource types and MIME types (never clash)
        self.cust = _KeyIndex()
        self.author = _KeyIndex()
        self.code = _KeyIndex()
        self.security = _KeyIndex()
        self.data_inst = _KeyIndex()
        self.data_rel = _KeyIndex()
        self.data_dep = _KeyIndex()
        self.data_auth = _KeyIndex()
        self.data_all = 0
        self.period = _IntervalIndex()
        self.dperiod = _IntervalIndex()
        self.roots = 0
        plans: list[_Plan | None] = []
        for i, c in enumerate(self.consents):
            if c._root is None:
                plans.append(None)
            else:
                plans.append(self._plan(c._root, 1 << i))
                self.roots |= 1 << i
        self.plans = tuple(plans)
        self.all_bits = self._next - 1
        # Root provisions without children decide by themselves: their result is static.
        self.results = tuple(
            c._implicit if plan is None else plan.result
            for c, plan in zip(self.consents, plans, strict=True)
        )
        self.leaf_deny = self.leaf_permit = self.trees = 0
        for i, plan in enumerate(plans):
            if plan is None:
                continue
            if plan.children:
                self.trees |= 1 << i
            elif plan.result.decision is Decision.DENY:
                self.leaf_deny |= 1 << i
            else:
                self.leaf_permit |= 1 << i
        self.implicit_deny = tuple(c._implicit for c in self.consents if c.base is Decision.DENY)
        self.implicit_permit = tuple(
            c._implicit for c in self.consents if c.base is Decision.PERMIT
        )
        self.period.freeze()
        self.dperiod.freeze()

    def _plan(self, n: _Node, bit: int) -> _Plan:
        if n.recipients is not None:
            self.rec.add(n.recipients, bit)
        if n.lo != MIN_US or n.hi != MAX_US:
            self.period.add(n.lo, n.hi, bit)
        if n.actions is not None:
            self.action.add(n.actions, bit)
        if n.purposes is not None:
            self.purpose.add(n.purposes, bit)
        if n.has_class:
            self.kind.add(n.cls_types | n.cls_mimes, bit)
        if n.custodians is not None:
            self.cust.add(n.custodians, bit)
        if n.authors is not None:
            self.author.add(n.authors, bit)
        if n.codes is not None:
            self.code.add(n.codes, bit)
        if n.security is not None:
            self.security.add(n.security, bit)
        if n.data is not None:
            self.data_all |= bit
            self.data_inst.add(n.data.instance, bit)
            self.data_rel.add(n.data.related, bit)
            self.data_dep.add(n.data.dependents, bit)
            self.data_auth.add(n.data.authored, bit)
        if n.dp_lo != MIN_US or n.dp_hi != MAX_US:
            self.dperiod.add(n.dp_lo, n.dp_hi, bit)
        children = []
        for child in n.children:
            child_bit = self._next
            self._next <<= 1
            children.append(self._plan(child, child_bit))
        return _Plan(bit, n.result, tuple(children))

    def failing(self, x: _Ctx) -> int:
        """Bits of the provisions with a populated criterion this request does not satisfy."""
        res = x.res
        fail = 0
        if self.rec.all:
            fail |= self.rec.all & ~self.rec.hits(x.req)
        if self.period.all:
            fail |= self.period.all & ~self.period.containing(x.t, x.t)
        if self.action.all:
            fail |= self.action.all & ~self.action.by.get(x.action, 0)
        if self.purpose.all:
            fail |= self.purpose.all & ~self.purpose.hits(x.purposes)
        if self.kind.all:
            sat = self.kind.by.get(x.rtype, 0) | self.kind.hits(x.ctypes)
            fail |= self.kind.all & ~sat
        if self.cust.all:
            fail |= self.cust.all & ~self.cust.by.get(res.custodian, 0)
        if self.author.all:
            fail |= self.author.all & ~self.author.hits(res.authors)
        if self.code.all:
            fail |= self.code.all & ~self.code.hits(res.codes)
        if self.security.all:
            labels = res.security_labels or _DEFAULT_SECURITY  # none counts as N (§3.3)
            fail |= self.security.all & ~self.security.hits(labels)
        if self.data_all:
            ref = res.ref
            sat = (
                self.data_inst.by.get(ref, 0)
                | self.data_rel.by.get(ref, 0)
                | self.data_dep.by.get(ref, 0)
                | self.data_rel.hits(res.references)
                | self.data_dep.hits(res.referenced_by)
                | self.data_auth.hits(res.authors)
            )
            fail |= self.data_all & ~sat
        if self.dperiod.all:
            clinical = x.clinical()
            sat = 0 if clinical is None else self.dperiod.containing(*clinical)
            fail |= self.dperiod.all & ~sat
        return fail


def _eval_plan(plan: _Plan, fail: int, ok: int) -> ConsentResult | None:
    """:func:`_eval` over a plan: a provision matches when its bit is not failing
    (``ok`` is the complement of ``fail`` within the index's bits)."""
    if fail & plan.bit:
        return None
    if not plan.children:
        return plan.result
    if plan.flat:
        hit = plan.deny_kids & ok
        if hit:
            return plan.by_bit[hit & -hit]
        hit = plan.permit_kids & ok
        if hit:
            return plan.by_bit[hit & -hit]
        return plan.result
    permit: ConsentResult | None = None
    for child in plan.children:
        r = _eval_plan(child, fail, ok)
        if r is not None:
            if r.decision is Decision.DENY:
                return r
            if permit is None:
                permit = r
    return plan.result if permit is None else permit


def _set_bits(value: int) -> list[int]:
    """Indexes of the 1 bits of a non-negative int, lowest first."""
    if value.bit_count() <= 8:
        out = []
        while value:
            low = value & -value
            out.append(low.bit_length() - 1)
            value ^= low
        return out
    return [i for i, digit in enumerate(bin(value)[:1:-1]) if digit == "1"]


class ConsentSet(Sequence[CompiledConsent]):
    """An immutable sequence of compiled Consents, indexed for fast :func:`decide` calls.

    Build it once per patient (or per cache entry) and pass it to :func:`decide` instead of a
    list: the decision is the same (consent.md §3), but every criterion kind is evaluated once
    per request through an inverted index, and each provision then costs one integer test,
    whatever the number of Consents. Rebuild it when any Consent changes (revocation takes
    effect on the next request only if the caller passes the new set).
    """

    __slots__ = ("_by_patient", "_items")

    def __init__(self, consents: Iterable[CompiledConsent] = ()) -> None:
        self._items = tuple(consents)
        groups: dict[Ref, list[CompiledConsent]] = {}
        for c in self._items:
            if c._match_patient is not None:
                groups.setdefault(c._match_patient, []).append(c)
        self._by_patient = {p: _PatientIndex(cs) for p, cs in groups.items()}

    @overload
    def __getitem__(self, index: int) -> CompiledConsent: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[CompiledConsent, ...]: ...

    def __getitem__(self, index: int | slice) -> CompiledConsent | tuple[CompiledConsent, ...]:
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[CompiledConsent]:
        return iter(self._items)

    def __repr__(self) -> str:
        return f"ConsentSet({len(self._items)} consents, {len(self._by_patient)} patients)"


# ---------------------------------------------------------------------------------------------
# decide (consent.md §3, last paragraphs)
# ---------------------------------------------------------------------------------------------

_SELF: Final = AccessDecision(Decision.PERMIT, Reason.PATIENT_SELF)
_REPRESENTATIVE: Final = AccessDecision(Decision.PERMIT, Reason.REPRESENTATIVE)
_CUSTODIAN: Final = AccessDecision(Decision.PERMIT, Reason.CUSTODIAN)
_BREAK_GLASS: Final = AccessDecision(Decision.PERMIT, Reason.BREAK_GLASS)
_DEFAULT_DENY: Final = AccessDecision(Decision.DENY, Reason.DEFAULT_DENY)


class _Tiers:
    """The Consent results of one decision, by tier (consent.md §3)."""

    __slots__ = ("denying", "explicit_deny", "explicit_permit", "implicit_deny", "implicit_permit")

    def __init__(self) -> None:
        self.explicit_deny: list[ConsentResult] = []
        self.explicit_permit: list[ConsentResult] = []
        self.implicit_deny: list[ConsentResult] = []
        self.implicit_permit: list[ConsentResult] = []
        self.denying: list[CompiledConsent] = []  # the Consents behind explicit_deny

    def scan(self, consents: Iterable[CompiledConsent], patient: Ref, x: _Ctx) -> None:
        """Evaluate every applicable Consent, one provision tree at a time."""
        evaluate, deny = _eval, Decision.DENY
        for c in consents:
            if c._match_patient != patient:
                continue
            root = c._root
            r = None if root is None else evaluate(root, x)
            if r is None:
                (self.implicit_deny if c.base is deny else self.implicit_permit).append(c._implicit)
            elif r.decision is deny:
                self.explicit_deny.append(r)
                self.denying.append(c)
            else:
                self.explicit_permit.append(r)

    def scan_index(self, index: _PatientIndex, x: _Ctx) -> None:
        """The same as :meth:`scan`, through a patient's criterion index.

        A Consent whose root provision matches always has an explicit result, so when no root
        matches the results are exactly the precomputed implicit ones. Matching roots without
        children have static results, gathered by bit; only matching trees are walked.
        """
        fail = index.failing(x)
        matched = index.roots & ~fail
        if not matched:
            self.implicit_deny.extend(index.implicit_deny)
            self.implicit_permit.extend(index.implicit_permit)
            return
        results, consents = index.results, index.consents
        if not matched & index.trees:
            deny_bits = matched & index.leaf_deny
            if deny_bits:  # deny wins: the permits do not matter
                where = _set_bits(deny_bits)
                self.explicit_deny.extend([results[i] for i in where])
                self.denying.extend([consents[i] for i in where])
            else:
                self.explicit_permit.extend([results[i] for i in _set_bits(matched)])
            return
        plans, ok, deny = index.plans, index.all_bits & ~fail, Decision.DENY
        for i in _set_bits(matched):
            plan = plans[i]
            if plan is None:  # impossible: only Consents with a root provision have a root bit
                continue
            if plan.flat:  # plan.children are all leaves: the first matching deny, else permit
                hit = plan.deny_kids & ok or plan.permit_kids & ok
                r = plan.by_bit[hit & -hit] if hit else plan.result
            elif plan.children:
                r = _eval_plan(plan, fail, ok) or plan.result
            else:
                r = results[i]
            if r.decision is deny:
                self.explicit_deny.append(r)
                self.denying.append(consents[i])
            else:
                self.explicit_permit.append(r)


def decide(
    consents: Sequence[CompiledConsent],
    request: AccessRequest,
    resource: ResourceFacts,
    *,
    representatives: frozenset[Ref] = frozenset(),
    break_glass_enabled: bool = False,
) -> AccessDecision:
    """The final access decision over all of a patient's Consents (consent.md §3).

    In order:

    1. the patient (``resource.patient`` in the requester set) → permit ``patient-self``;
       a legal representative of that patient (caller-resolved ``representatives``, see
       :func:`is_legal_representative`) → permit ``representative``;
    2. the applicable Consents (active, ``Consent.patient`` = ``resource.patient``): an explicit
       decision outranks implicit ones; within the tier deny wins → ``consent-explicit`` /
       ``consent-implicit``; nothing applicable → deny ``default-deny``;
    3. if that is a deny: the resource's custodian in the requester set → permit ``custodian``,
       then a break-glass request (``ETREAT`` in ``purposes``, ``break_glass_enabled``) →
       permit ``break-glass`` — each only if no explicit deny names a member of the requester
       set (an actor of the denying provision or of a provision enclosing it).

    ``consents`` may be any sequence; a :class:`ConsentSet` gives the same answer faster.
    """
    req = request.requesters
    patient = resource.patient
    if patient is not None:
        if patient in req:
            return _SELF
        if representatives and not representatives.isdisjoint(req):
            return _REPRESENTATIVE

    x = _Ctx(request, resource)
    tiers = _Tiers()
    if patient is not None:
        patient = sys.intern(patient)  # compiled patients are interned: `!=` is then `is not`
        if isinstance(consents, ConsentSet):
            index = consents._by_patient.get(patient)
            if index is not None:
                tiers.scan_index(index, x)
        else:
            tiers.scan(consents, patient, x)

    if tiers.explicit_deny:
        outcome = AccessDecision(Decision.DENY, Reason.CONSENT_EXPLICIT, tuple(tiers.explicit_deny))
    elif tiers.explicit_permit:
        return AccessDecision(
            Decision.PERMIT, Reason.CONSENT_EXPLICIT, tuple(tiers.explicit_permit)
        )
    elif tiers.implicit_deny:
        outcome = AccessDecision(Decision.DENY, Reason.CONSENT_IMPLICIT, tuple(tiers.implicit_deny))
    elif tiers.implicit_permit:
        return AccessDecision(
            Decision.PERMIT, Reason.CONSENT_IMPLICIT, tuple(tiers.implicit_permit)
        )
    else:
        outcome = _DEFAULT_DENY

    custodian = resource.custodian
    is_custodian = custodian is not None and custodian in req
    is_break_glass = break_glass_enabled and BREAK_GLASS_PURPOSE in request.purposes
    if not (is_custodian or is_break_glass):
        return outcome
    if _names_requester(tiers.denying, x):
        return outcome
    return _CUSTODIAN if is_custodian else _BREAK_GLASS


def _names_requester(denying: Iterable[CompiledConsent], x: _Ctx) -> bool:
    """Whether an explicit deny of one of these Consents names a member of the requester set."""
    for c in denying:
        if c._root is None:
            continue
        r = _deny_names(c._root, x, frozenset())
        if r is not None and r[0] is Decision.DENY and not r[1].isdisjoint(x.req):
            return True
    return False
