"""The route template of a served request: what logs and metrics name a request by.

``GET /fhir/Patient/4f0c…/_history/2?family=Chalmers`` is ``/fhir/Patient/{rid}/_history/{vid}``:
the mount prefix, then the matched route's path with its parameters left as placeholders —
except ``{rtype}`` when its value is an R4 resource type name (a fixed vocabulary, never
patient data). Resource ids, query strings and anything a client typed stay out, which keeps
patient data out of logs and keeps the metrics' label sets small. A request no route matched
is ``unmatched``.

The matched route is the one Starlette/FastAPI records in ``scope["route"]``; its path may or
may not include the prefixes of the routers it sits under (it depends on the FastAPI
version), so the prefix is recovered as the longest of the app's known mount points (the FHIR
base, the authorization server, the patient app) after which the route's own pattern matches
the rest of the path; failing that, the first ``/`` after which it does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from fhir_consent.fhir.searchparams import R4_RESOURCE_TYPES

__all__ = ["UNMATCHED", "route_template"]

UNMATCHED: Final = "unmatched"
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: Path parameters whose value may be shown when it is a resource type name.
_TYPE_PARAMS: Final = frozenset({"rtype", "resource_type", "type"})


def _prefix(path: str, pattern: re.Pattern[str], known: Sequence[str]) -> str | None:
    """The part of ``path`` before the route pattern matches the rest of it, or None."""
    for prefix in sorted(known, key=len, reverse=True):
        if path.startswith(prefix) and pattern.match(path[len(prefix) :]):
            return prefix
    if pattern.match(path):
        return ""
    for i, ch in enumerate(path):
        if ch == "/" and i > 0 and pattern.match(path[i:]):
            return path[:i]
    return None


def _fill(template: str, params: Mapping[str, Any]) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1)
        raw = params.get(name)
        if name in _TYPE_PARAMS and isinstance(raw, str) and raw in R4_RESOURCE_TYPES:
            return raw
        return m.group(0)

    return _PARAM.sub(value, template)


def route_template(scope: Mapping[str, Any], prefixes: Sequence[str] = ()) -> str:
    """The route template of the request in ``scope`` (see the module docstring);
    ``prefixes`` are the app's mount points (``"/fhir"``, …)."""
    route = scope.get("route")
    path_format = getattr(route, "path_format", None)
    pattern = getattr(route, "path_regex", None)
    if not isinstance(path_format, str) or not isinstance(pattern, re.Pattern):
        return UNMATCHED
    path = scope.get("path", "")
    prefix = _prefix(path, pattern, prefixes) if isinstance(path, str) else None
    return (prefix or "") + _fill(path_format, scope.get("path_params") or {})
