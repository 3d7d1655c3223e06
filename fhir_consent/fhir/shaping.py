"""``_summary`` and ``_elements`` (R4 search.html §3.1.1.5-6): subsetting stored resources.

Only these paths parse stored JSON; a plain read or search serves the stored bytes untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

import orjson
from fhir.resources.R4B import get_fhir_model_class

__all__ = ["shape"]

_SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "Resource encoded in summary mode",
}
_ALWAYS = ("resourceType", "id", "meta")


@cache
def _summary_elements(resource_type: str) -> frozenset[str]:
    model = get_fhir_model_class(resource_type)
    names = set()
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("summary_element_property"):
            names.add(info.alias or name)
    return frozenset(names)


def _keep(resource: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    wanted = set(keys) | set(_ALWAYS)
    out = {k: v for k, v in resource.items() if k in wanted or k.lstrip("_") in wanted}
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), _SUBSETTED]
    out["meta"] = meta
    return out


def shape(content: bytes, summary: str | None, elements: tuple[str, ...] | None) -> bytes:
    """Apply ``_summary`` (true, text, data, false) and ``_elements`` to one stored resource."""
    if (summary in (None, "false", "count")) and not elements:
        return content
    resource = orjson.loads(content)
    rtype = resource.get("resourceType", "")
    if summary == "true":
        resource = _keep(resource, _summary_elements(rtype))
    elif summary == "text":
        resource = _keep(resource, ("text",))
    elif summary == "data":
        resource = _keep(resource, [k for k in resource if k != "text"])
    elif elements:
        resource = _keep(resource, elements)
    return orjson.dumps(resource)
