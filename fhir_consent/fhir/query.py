"""Parsing of FHIR search requests (R4 search.html) into a store-level :class:`SearchSpec`.

Pure: no HTTP objects, no database. Values are parsed by :mod:`.searchparams`; this module
applies modifiers, the result parameters (``_count``, ``_sort``, ``_include``,
``_revinclude``, ``_summary``, ``_total``, ``_elements``) and the lenient/strict handling of
unknown parameters, and records which parameters were actually applied for the ``self`` link.
Error messages name the parameter, never echo its value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fhir_consent.errors import BadRequest
from fhir_consent.fhir import searchparams as sp
from fhir_consent.fhir.validation import SUPPORTED_TYPES
from fhir_consent.store.search import (
    Condition,
    DateCond,
    IdCond,
    LastUpdatedCond,
    MissingCond,
    ReferenceCond,
    SearchSpec,
    SortKey,
    StringCond,
    TokenCond,
)

__all__ = ["Include", "ParsedSearch", "parse_search", "SUMMARY_MODES"]

SUMMARY_MODES = ("true", "false", "text", "data", "count")
#: Parameters that control the response format, not the result set.
_FORMAT_PARAMS = frozenset({"_format", "_pretty"})
_RESULT_PARAMS = frozenset(
    {"_count", "_sort", "_include", "_revinclude", "_summary", "_total", "_elements", "_cursor"}
)
_MODIFIERS = {
    sp.ParamType.TOKEN: {"not", "text", "missing"},
    sp.ParamType.URI: {"missing"},
    sp.ParamType.STRING: {"exact", "contains", "missing"},
    sp.ParamType.REFERENCE: {"missing"},
    sp.ParamType.DATE: {"missing"},
}
_TABLE = {
    sp.ParamType.TOKEN: "token",
    sp.ParamType.URI: "token",
    sp.ParamType.STRING: "string",
    sp.ParamType.REFERENCE: "reference",
    sp.ParamType.DATE: "date",
}


@dataclass(frozen=True, slots=True)
class Include:
    """``_include=Source:param[:Target]`` or ``_revinclude=…`` (``iterate`` for ``:iterate``)."""

    source_type: str
    param: str
    target_type: str | None
    iterate: bool = False

    def render(self) -> str:
        tail = f":{self.target_type}" if self.target_type else ""
        return f"{self.source_type}:{self.param}{tail}"


@dataclass(slots=True)
class ParsedSearch:
    spec: SearchSpec
    applied: list[tuple[str, str]] = field(default_factory=list)
    includes: list[Include] = field(default_factory=list)
    revincludes: list[Include] = field(default_factory=list)
    summary: str | None = None
    elements: tuple[str, ...] | None = None
    unknown: list[str] = field(default_factory=list)


def _bad(param: str, what: str = "has an invalid value") -> BadRequest:
    return BadRequest(f"Search parameter '{param[:64]}' {what}")


def parse_search(
    resource_type: str,
    items: Sequence[tuple[str, str]],
    *,
    strict: bool = False,
    default_count: int = 20,
    max_count: int = 1000,
    now: int = 0,
) -> ParsedSearch:
    """Parse query ``items`` (decoded key/value pairs, repeats allowed) for ``resource_type``."""
    params = sp.params_for(resource_type)
    spec = SearchSpec(resource_type=resource_type, count=default_count, now=now)
    out = ParsedSearch(spec=spec)
    for raw_key, value in items:
        if "\x00" in raw_key or "\x00" in value:  # no database can match (or store) U+0000
            raise BadRequest("A search parameter contains a NUL character")
        name, _, modifier = raw_key.partition(":")
        if name in _FORMAT_PARAMS:
            continue
        if name in _RESULT_PARAMS:
            _result_param(out, resource_type, name, modifier, value, max_count)
            continue
        param = params.get(name)
        if param is None:
            if strict:
                raise _bad(name, "is not supported for " + resource_type)
            out.unknown.append(name)
            continue
        cond = _condition(param, name, modifier, value)
        if cond is None:  # empty value: ignored (R4 search.html §2.1.1.0)
            continue
        spec.conditions.append(cond)
        out.applied.append((raw_key, value))
    return out


def _condition(param: sp.SearchParam, name: str, modifier: str, value: str) -> Condition | None:
    if value == "":
        return None
    ptype = param.type
    if modifier:
        if modifier == "missing":
            if value not in ("true", "false"):
                raise _bad(name + ":missing", "must be true or false")
            if name in ("_id", "_lastUpdated"):
                raise _bad(name + ":missing", "is not supported")
            return MissingCond(name, _TABLE[ptype], value == "true")
        is_type_modifier = (
            ptype is sp.ParamType.REFERENCE
            and modifier in SUPPORTED_TYPES
            and (not param.targets or modifier in param.targets)
        )
        if not is_type_modifier and modifier not in _MODIFIERS.get(ptype, set()):
            raise _bad(f"{name}:{modifier}", "uses an unsupported modifier")
    values = sp.split_or(value)
    try:
        if name == "_id":
            return IdCond(tuple(values))
        if name == "_lastUpdated":
            return LastUpdatedCond(tuple(sp.parse_date(v) for v in values))
        if ptype is sp.ParamType.DATE:
            return DateCond(name, tuple(sp.parse_date(v) for v in values))
        if ptype in (sp.ParamType.TOKEN, sp.ParamType.URI):
            if modifier == "text":
                return TokenCond(name, (), text=tuple(sp.normalize_string(v) for v in values))
            if ptype is sp.ParamType.URI:
                queries = tuple(sp.TokenQuery(None, v, False) for v in values)
            else:
                queries = tuple(sp.parse_token(v) for v in values)
            return TokenCond(name, queries, negate=modifier == "not")
        if ptype is sp.ParamType.STRING:
            if modifier == "exact":
                return StringCond(name, tuple(values), "exact")
            mode = "contains" if modifier == "contains" else "prefix"
            return StringCond(name, tuple(sp.normalize_string(v) for v in values), mode)
        if ptype is sp.ParamType.REFERENCE:
            type_mod = modifier or None
            return ReferenceCond(
                name, tuple(sp.parse_reference(v, param, type_mod) for v in values)
            )
    except sp.SearchValueError:
        raise _bad(name) from None
    raise _bad(name, "has a type this server cannot search")


def _int(name: str, value: str) -> int:
    if not value.isdigit():
        raise _bad(name, "must be a non-negative integer")
    return int(value)


def _result_param(
    out: ParsedSearch, rtype: str, name: str, modifier: str, value: str, max_count: int
) -> None:
    spec = out.spec
    if name == "_cursor":
        spec.cursor = value
        return
    if name == "_count":
        spec.count = min(_int(name, value), max_count)
        out.applied.append((name, str(spec.count)))
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise _bad(name, "must be none, estimate or accurate")
        spec.want_total = value != "none"
        out.applied.append((name, value))
    elif name == "_summary":
        if value not in SUMMARY_MODES:
            raise _bad(name, "must be one of " + ", ".join(SUMMARY_MODES))
        out.summary = value
        out.applied.append((name, value))
    elif name == "_elements":
        elements = tuple(e.strip() for e in value.split(",") if e.strip())
        if not all(e.replace("-", "").isalnum() for e in elements):
            raise _bad(name)
        out.elements = elements
        out.applied.append((name, value))
    elif name == "_sort":
        spec.sort = [_sort_key(rtype, k) for k in value.split(",") if k]
        out.applied.append((name, value))
    elif name in ("_include", "_revinclude"):
        inc = _include(rtype, name, modifier, value)
        (out.includes if name == "_include" else out.revincludes).append(inc)
        out.applied.append((f"{name}:{modifier}" if modifier else name, value))


def _sort_key(rtype: str, raw: str) -> SortKey:
    desc = raw.startswith("-")
    name = raw[1:] if desc else raw
    if name in ("_id", "_lastUpdated"):
        return SortKey(name, desc)
    param = sp.params_for(rtype).get(name)
    kinds = {sp.ParamType.DATE: "date", sp.ParamType.STRING: "string", sp.ParamType.TOKEN: "token"}
    if param is None or param.type not in kinds:
        raise _bad("_sort", "names a parameter this server cannot sort by")
    return SortKey(f"{kinds[param.type]}:{name}", desc)


def _include(rtype: str, name: str, modifier: str, value: str) -> Include:
    if modifier not in ("", "iterate", "recurse"):
        raise _bad(f"{name}:{modifier}", "uses an unsupported modifier")
    iterate = modifier in ("iterate", "recurse")
    if value == "*" and name == "_include":
        return Include(rtype, "*", None, iterate)
    parts = value.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise _bad(name, "must be Type:param or Type:param:TargetType")
    source, param_name = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if source not in SUPPORTED_TYPES or (target is not None and target not in SUPPORTED_TYPES):
        raise _bad(name, "names an unsupported resource type")
    if name == "_include" and source != rtype and not iterate:
        raise _bad(name, "must start with the searched resource type")
    if name == "_revinclude" and not iterate and target is not None and target != rtype:
        raise _bad(name, "must target the searched resource type")
    if param_name != "*":
        param = sp.params_for(source).get(param_name)
        if param is None or param.type is not sp.ParamType.REFERENCE:
            raise _bad(name, "names a parameter that is not a reference")
    elif name == "_revinclude":
        raise _bad(name, "does not support '*'")
    return Include(source, param_name, target, iterate)
