"""Sample resources for the search checks: for each advertised search parameter, a value that
a resource A carries and a resource B does not, and the query value that must find A only.

The element a parameter searches comes from its FHIRPath expression (the server's
``searchParam.documentation`` when it is one, else the R4 expressions bundled in
``data/search-expressions-r4.json``). A small, honest subset of FHIRPath is understood:
paths, ``|`` alternatives (the first usable one is taken), ``as``/``as()``/``ofType()`` on
choice elements, ``where(resolve() is Type)`` and ``where(name='value')``; anything else is
reported as not exercised. Element types, cardinality and required elements come from
:mod:`.fhirtypes`, so every sample is a valid resource: required elements get fixed filler
values, and the values that matter are unique to the run and the parameter.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from .fhirtypes import Element, elements

__all__ = [
    "FILLER_SYSTEM",
    "KIT_SYSTEM",
    "Plan",
    "SampleFactory",
    "Unsupported",
    "bundled_parameters",
    "expression_for",
    "parse_expression",
]

KIT_SYSTEM = "http://conformance.invalid/fhir-conformance-kit"
FILLER_SYSTEM = "http://conformance.invalid/filler"
_DATA = Path(__file__).parent / "data"

_SPECIAL_FILLERS: dict[tuple[str, str], Any] = {
    ("Binary", "contentType"): "text/plain",
    ("Binary", "data"): base64.b64encode(b"fhir conformance kit").decode(),
}
#: Required bindings (R4) the R4B models do not enumerate.
_REQUIRED_CODES: dict[tuple[str, str], tuple[str, ...]] = {
    ("AuditEvent", "action"): ("C", "R", "U", "D", "E"),
    ("AuditEvent", "outcome"): ("0", "4", "8", "12"),
}
_PREFERRED_TARGETS = ("Patient", "Organization", "Practitioner")
_STRING_TYPES = frozenset({"string", "markdown"})
_URI_TYPES = frozenset({"uri", "url", "canonical", "oid", "uuid"})
_DATE_TYPES = frozenset({"date", "dateTime", "instant", "Period"})


class Unsupported(Exception):
    """The kit cannot build a sample for this parameter (reported as skipped)."""


# ---------------------------------------------------------------------------------------------
# FHIRPath subset
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    cast: str | None = None  # as(dateTime): the variant of a choice element
    target: str | None = None  # where(resolve() is Patient)
    fixed: tuple[tuple[str, str], ...] = ()  # where(system='email')


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WHERE_RESOLVE = re.compile(r"resolve\(\)\s+is\s+([A-Za-z]+)\Z")
_WHERE_EQ = re.compile(r"([A-Za-z]+)\s*=\s*'([^']*)'\Z")
_AS = re.compile(r"\A\((.*)\s+as\s+([A-Za-z]+)\)\Z|\A(.*)\s+as\s+([A-Za-z]+)\Z", re.S)


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, start = [], 0, 0
    quoted = False
    for i, ch in enumerate(text):
        if ch == "'":
            quoted = not quoted
        elif quoted:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _path(text: str) -> tuple[str, list[Step]]:
    """``Type.a.b.where(…)`` → (``Type``, steps)."""
    m = _AS.match(text.strip())
    cast = None
    if m:
        text, cast = (
            (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        )
    pieces = _split_top(text.strip(), ".")
    if len(pieces) < 2 or not _IDENT.fullmatch(pieces[0]):
        raise Unsupported(f"expression {text[:60]!r}")
    steps: list[Step] = []
    for piece in pieces[1:]:
        fn = re.fullmatch(r"([A-Za-z]+)\((.*)\)", piece, re.S)
        if fn is None:
            if not _IDENT.fullmatch(piece):
                raise Unsupported(f"expression {text[:60]!r}")
            steps.append(Step(piece))
            continue
        name, arg = fn.group(1), fn.group(2).strip()
        if not steps:
            raise Unsupported(f"expression {text[:60]!r}")
        last = steps[-1]
        if name in ("as", "ofType") and _IDENT.fullmatch(arg):
            steps[-1] = Step(last.name, arg, last.target, last.fixed)
        elif name == "where" and (r := _WHERE_RESOLVE.match(arg)):
            steps[-1] = Step(last.name, last.cast, r.group(1), last.fixed)
        elif name == "where" and (e := _WHERE_EQ.match(arg)):
            steps[-1] = Step(last.name, last.cast, last.target, (*last.fixed, (e[1], e[2])))
        else:
            raise Unsupported(f"FHIRPath function {name}() in {text[:60]!r}")
    if cast is not None:
        last = steps[-1]
        steps[-1] = Step(last.name, cast, last.target, last.fixed)
    return pieces[0], steps


def parse_expression(expression: str, rtype: str) -> list[list[Step]]:
    """The alternatives of ``expression`` that apply to ``rtype`` (``Resource.x`` applies to
    every type); raises :class:`Unsupported` when none can be read."""
    out: list[list[Step]] = []
    errors: list[str] = []
    for alternative in _split_top(expression, "|"):
        try:
            root, steps = _path(alternative)
        except Unsupported as error:
            errors.append(str(error))
            continue
        if root in (rtype, "Resource", "DomainResource"):
            out.append(steps)
    if not out:
        raise Unsupported(errors[0] if errors else f"no path for {rtype} in the expression")
    return out


@lru_cache(maxsize=1)
def bundled_parameters() -> dict[str, dict[str, dict[str, str]]]:
    """``{type: {name: {"type": …, "expression": …}}}`` from data/search-expressions-r4.json
    (``Resource`` holds the common parameters)."""
    data: dict[str, dict[str, dict[str, str]]] = json.loads(
        (_DATA / "search-expressions-r4.json").read_text(encoding="utf-8")
    )
    return data


def expression_for(rtype: str, name: str, documentation: str) -> str | None:
    """The FHIRPath of a claimed parameter: the server's documentation when it reads as one
    for this type, else the bundled R4 expression."""
    doc = documentation.strip()
    if doc and re.match(rf"\(?\s*({rtype}|Resource|DomainResource)\.[A-Za-z]", doc):
        return doc
    bundled = bundled_parameters()
    found = bundled.get(rtype, {}).get(name) or bundled.get("Resource", {}).get(name)
    return found["expression"] if found else None


# ---------------------------------------------------------------------------------------------
# Resolving paths against element definitions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hop:
    element: Element
    owner: str  # the type that holds the element
    fixed: tuple[tuple[str, str], ...] = ()


_PARAM_LEAF_PREFERENCE = {
    "reference": ("Reference",),
    "date": ("dateTime", "Period", "date", "instant"),
    "string": ("string", "HumanName", "Address", "markdown"),
    "token": ("CodeableConcept", "Coding", "Identifier", "code", "boolean", "string"),
    "uri": ("uri", "url", "canonical"),
}


def _resolve(rtype: str, steps: list[Step], param_type: str) -> tuple[list[Hop], str | None]:
    hops: list[Hop] = []
    owner = rtype
    target: str | None = None
    for i, step in enumerate(steps):
        defs = elements(owner)
        element = defs.get(step.name)
        if element is None or (step.cast and element.choice is None):
            variants = [e for e in defs.values() if e.choice == step.name]
            if step.cast:
                variants = [e for e in variants if e.type.lower() == step.cast.lower()]
            elif i == len(steps) - 1:
                ranked = _PARAM_LEAF_PREFERENCE.get(param_type, ())
                variants.sort(key=lambda e: ranked.index(e.type) if e.type in ranked else 99)
            if not variants:
                raise Unsupported(f"{owner}.{step.name} is not an R4 element")
            element = variants[0]
        hops.append(Hop(element, owner, step.fixed))
        if step.target:
            target = step.target
        owner = element.type
    return hops, target


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """How one search parameter is exercised: A and B carry ``value_a``/``value_b`` at
    ``hops``; ``query`` must find A and not B."""

    param: str
    param_type: str
    hops: list[Hop]
    value_a: Any
    value_b: Any
    query: str
    references: tuple[str, str] | None = None  # (A's target, B's target) for reference params
    note: str = ""

    @property
    def path(self) -> str:
        return ".".join(h.element.name for h in self.hops)


def _codes(owner: str, element: Element) -> tuple[str, ...]:
    return element.enum or _REQUIRED_CODES.get((owner, element.name), ())


def _day(base: int, k: int) -> date:
    return date(base, 1, 1) + timedelta(days=3 * k)


@dataclass
class SampleFactory:
    """Builds required-only base resources and per-parameter plans for one run.

    ``reference`` returns a ``Type/id`` for a filler or sample reference target of ``Type``
    (the caller decides whether that resource has to exist on the server)."""

    run: str
    claimed_types: frozenset[str]
    reference: Callable[[str, str], str]  # (type, purpose) → "Type/id"
    counter: int = 0
    _fillers: dict[str, str] = field(default_factory=dict)

    # -- fillers ------------------------------------------------------------------------------

    def _pick_target(self, targets: tuple[str, ...]) -> str:
        concrete = [t for t in targets if t not in ("Resource", "Any")]
        for t in concrete:
            if t in self.claimed_types:
                return t
        if concrete:
            return concrete[0]
        for t in _PREFERRED_TARGETS:
            if t in self.claimed_types:
                return t
        return "Patient"

    def _filler_ref(self, targets: tuple[str, ...]) -> str:
        rtype = self._pick_target(targets)
        if rtype not in self._fillers:
            self._fillers[rtype] = self.reference(rtype, "filler")
        return self._fillers[rtype]

    def filler(self, owner: str, element: Element, depth: int = 0) -> Any:
        special = _SPECIAL_FILLERS.get((owner, element.name))
        if special is not None:
            return special
        t = element.type
        if t == "code":
            # enum[1], never enum[0]: that is the value a matching sample A carries
            codes = _codes(owner, element)
            return codes[1] if len(codes) > 1 else codes[0] if codes else "unknown"
        if t == "boolean":
            return False
        if t in _STRING_TYPES or t == "id":
            return "conformance"
        if t in _URI_TYPES:
            return f"{FILLER_SYSTEM}/{element.name}"
        if t in ("instant", "dateTime"):
            return "2020-01-01T00:00:00Z"
        if t == "date":
            return "2020-01-01"
        if t in ("integer", "positiveInt", "unsignedInt", "decimal"):
            return 1
        if t == "base64Binary":
            return base64.b64encode(b"conformance").decode()
        if t == "Coding":
            return {"system": FILLER_SYSTEM, "code": "filler"}
        if t == "CodeableConcept":
            return {"coding": [{"system": FILLER_SYSTEM, "code": "filler"}], "text": "filler"}
        if t == "Reference":
            return {"reference": self._filler_ref(element.targets)}
        if t == "Identifier":
            return {"system": FILLER_SYSTEM, "value": "filler"}
        if t == "Period":
            return {"start": "2020-01-01T00:00:00Z"}
        if t == "Attachment":
            return {"contentType": "text/plain", "title": "conformance"}
        if t == "HumanName":
            return {"family": "Conformance"}
        if t == "Address":
            return {"city": "Conformance"}
        if t == "ContactPoint":
            return {"system": "other", "value": "conformance"}
        if depth > 6:
            raise Unsupported(f"{owner}.{element.name}: nesting too deep")
        return self.required_only(t, depth + 1)

    def required_only(self, type_name: str, depth: int = 0) -> dict[str, Any]:
        """A valid instance of ``type_name`` with only its required elements (plus an
        ``id``-free marker so that no object is empty)."""
        defs = elements(type_name)
        if not defs:
            raise Unsupported(f"unknown type {type_name}")
        out: dict[str, Any] = {}
        choices: set[str] = set()
        for element in defs.values():
            if element.choice and element.choice_required and element.choice not in choices:
                choices.add(element.choice)
                out[element.name] = self.filler(type_name, element, depth)
            elif element.required:
                value = self.filler(type_name, element, depth)
                out[element.name] = [value] if element.many else value
        return out

    def base(self, rtype: str) -> dict[str, Any]:
        """The base sample of ``rtype``: required elements and the run's tag (so every
        resource the kit creates can be found again)."""
        resource = {"resourceType": rtype, **self.required_only(rtype)}
        for (owner, name), value in _SPECIAL_FILLERS.items():
            if owner == rtype:
                resource.setdefault(name, value)  # e.g. a Binary's data: what it is for
        resource["meta"] = {"tag": [{"system": KIT_SYSTEM, "code": self.run}]}
        return resource

    # -- per-parameter plans ---------------------------------------------------------------------

    def _unique(self, k: int, variant: str) -> str:
        return f"conf{self.run}p{k}{variant}"

    def plan(self, rtype: str, name: str, param_type: str, expression: str | None) -> Plan:
        """The plan for one parameter, or :class:`Unsupported`."""
        if param_type not in _PARAM_LEAF_PREFERENCE:
            raise Unsupported(f"parameter type {param_type!r} is not exercised by the kit")
        if expression is None:
            raise Unsupported("no FHIRPath expression known for this parameter")
        self.counter += 1
        k = self.counter
        errors: list[str] = []
        for steps in parse_expression(expression, rtype):
            try:
                hops, target = _resolve(rtype, steps, param_type)
                return self._values(rtype, name, param_type, hops, target, k)
            except Unsupported as error:
                errors.append(str(error))
        raise Unsupported(errors[0])

    def _values(
        self,
        rtype: str,
        name: str,
        param_type: str,
        hops: list[Hop],
        target: str | None,
        k: int,
    ) -> Plan:
        leaf = hops[-1].element
        codes = _codes(hops[-1].owner, leaf)
        t = leaf.type
        ua, ub = self._unique(k, "a"), self._unique(k, "b")
        system = f"{KIT_SYSTEM}/{rtype}/{name}"
        a: Any
        b: Any
        if param_type == "token":
            if t == "code":
                if codes:
                    if len(codes) < 2:
                        raise Unsupported(f"{leaf.name} has a single allowed code")
                    return Plan(name, param_type, hops, codes[0], codes[1], codes[0])
                return Plan(name, param_type, hops, ua, ub, ua)
            if t == "boolean":
                return Plan(name, param_type, hops, True, False, "true")
            if t in _STRING_TYPES or t in _URI_TYPES or t == "id":
                return Plan(name, param_type, hops, ua, ub, ua)
            if t == "Coding":
                a, b = {"system": system, "code": ua}, {"system": system, "code": ub}
                return Plan(name, param_type, hops, a, b, f"{system}|{ua}")
            if t == "CodeableConcept":
                a = {"coding": [{"system": system, "code": ua}]}
                b = {"coding": [{"system": system, "code": ub}]}
                return Plan(name, param_type, hops, a, b, f"{system}|{ua}")
            if t == "Identifier":
                a, b = {"system": system, "value": ua}, {"system": system, "value": ub}
                return Plan(name, param_type, hops, a, b, f"{system}|{ua}")
            if t == "ContactPoint":
                cp = dict(hops[-1].fixed) or {"system": "other"}
                a, b = {**cp, "value": ua}, {**cp, "value": ub}
                return Plan(name, param_type, hops, a, b, ua)
        elif param_type == "string":
            if t in _STRING_TYPES:
                return Plan(name, param_type, hops, ua, ub, ua)
            if t == "HumanName":
                return Plan(name, param_type, hops, {"family": ua}, {"family": ub}, ua)
            if t == "Address":
                return Plan(name, param_type, hops, {"city": ua}, {"city": ub}, ua)
        elif param_type == "uri":
            if t in _URI_TYPES:
                a, b = f"{system}/{ua}", f"{system}/{ub}"
                return Plan(name, param_type, hops, a, b, a)
        elif param_type == "date":
            da, db = _day(2001, k), _day(1991, k)
            if t == "date":
                return Plan(name, param_type, hops, da.isoformat(), db.isoformat(), da.isoformat())
            if t in ("dateTime", "instant"):
                a, b = f"{da.isoformat()}T10:00:00Z", f"{db.isoformat()}T10:00:00Z"
                return Plan(name, param_type, hops, a, b, da.isoformat())
            if t == "Period":
                a = {"start": f"{da.isoformat()}T10:00:00Z", "end": f"{da.isoformat()}T11:00:00Z"}
                b = {"start": f"{db.isoformat()}T10:00:00Z", "end": f"{db.isoformat()}T11:00:00Z"}
                return Plan(name, param_type, hops, a, b, da.isoformat())
        elif param_type == "reference" and t == "Reference":
            rt = target or self._pick_target(leaf.targets)
            ref_a = self.reference(rt, f"{name}-a")
            ref_b = self.reference(rt, f"{name}-b")
            return Plan(
                name,
                param_type,
                hops,
                {"reference": ref_a},
                {"reference": ref_b},
                ref_a,
                references=(ref_a, ref_b),
            )
        raise Unsupported(f"{param_type} parameter on a {t} element ({leaf.name})")

    # -- placing values -----------------------------------------------------------------------

    def place(self, resource: dict[str, Any], plan: Plan, value: Any, owned: set[str]) -> bool:
        """Put ``value`` at the plan's path in ``resource``; False (and nothing changed) when
        another parameter already holds that single-valued element. ``owned`` collects the
        paths of the single-valued elements placed so far."""
        work = copy.deepcopy(resource)
        node = work
        prefix = ""
        for i, hop in enumerate(plan.hops):
            element = hop.element
            key = element.name
            if i == len(plan.hops) - 1:
                if element.many:
                    if not isinstance(node.setdefault(key, []), list):
                        return False
                    node[key].append(copy.deepcopy(value))
                    break
                if prefix + key in owned:
                    return False
                if element.choice:
                    siblings = [
                        e.name
                        for e in elements(hop.owner).values()
                        if e.choice == element.choice and e.name != key
                    ]
                    if any(prefix + other in owned for other in siblings):
                        return False
                    for other in siblings:
                        node.pop(other, None)
                node[key] = copy.deepcopy(value)
                owned.add(prefix + key)
                break
            if element.many:
                child = self.filler(hop.owner, element)
                if not isinstance(child, dict):
                    raise Unsupported(f"{key} is not an element with children")
                child.update(dict(hop.fixed))
                items = node.setdefault(key, [])
                items.append(child)
                prefix += f"{key}[{len(items) - 1}]."
            else:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = self.filler(hop.owner, element)
                    if not isinstance(child, dict):
                        raise Unsupported(f"{key} is not an element with children")
                    node[key] = child
                child.update(dict(hop.fixed))
                prefix += f"{key}."
            node = child
        resource.clear()
        resource.update(work)
        return True
