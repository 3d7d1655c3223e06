"""Validation of request bodies with fhir.resources' R4B models (identical to R4 4.0.1 for the
resources we serve), at the boundary only: stored JSON is served back without re-validation.

Error messages are built from pydantic's error *types* and locations, never from the input
values, so an OperationOutcome never echoes patient data (R4 operationoutcome.html).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import Any

import orjson

from fhir_consent.fhir import _validator_cache

_validator_cache.install()  # before any fhir.resources model class is created

from fhir.resources.R4B import get_fhir_model_class  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from fhir_consent.errors import BadRequest, InvalidResource, Issue  # noqa: E402
from fhir_consent.fhir._inlined import compiled_validator  # noqa: E402

__all__ = [
    "MAX_JSON_DEPTH",
    "SUPPORTED_TYPES",
    "check_json_structure",
    "is_valid_id",
    "parse_json",
    "parse_json_body",
    "validate_resource",
]

#: Deepest nesting of JSON arrays and objects a request body may have. Real resources stay far
#: below it (an extension inside an extension inside a contained resource is about 10); the
#: validator recurses per level and fails at about 300, so deeper bodies are refused with 400.
MAX_JSON_DEPTH = 100

#: Characters a FHIR string SHALL NOT contain (R4 datatypes.html#string: nothing below U+0020
#: except tab, CR and LF). PostgreSQL cannot store U+0000 in text or jsonb at all.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")

#: Resource types this server stores. Encounter and Task are kept (with a few search
#: parameters) because the official Consent examples reference them.
SUPPORTED_TYPES: tuple[str, ...] = (
    "AuditEvent",
    "Binary",
    "Consent",
    "DocumentReference",
    "Encounter",
    "Organization",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Provenance",
    "RelatedPerson",
    "Task",
)

_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")

_SAFE_MESSAGES = {
    "missing": "Required element is missing",
    "extra_forbidden": "Unknown element",
    "string_type": "Expected a string",
    "int_type": "Expected an integer",
    "int_parsing": "Expected an integer",
    "bool_type": "Expected a boolean",
    "bool_parsing": "Expected a boolean",
    "list_type": "Expected an array",
    "dict_type": "Expected an object",
    "model_type": "Expected an object",
    "model_attributes_type": "Expected an object",
    "decimal_parsing": "Expected a decimal number",
    "float_parsing": "Expected a decimal number",
    "string_pattern_mismatch": "Value does not match the FHIR datatype's format",
    "string_too_short": "String is empty",
    "literal_error": "Value is not one of the allowed codes",
    "enum": "Value is not one of the allowed codes",
    "date_from_datetime_parsing": "Invalid date",
    "datetime_from_date_parsing": "Invalid dateTime",
    "date_parsing": "Invalid date",
    "datetime_parsing": "Invalid dateTime",
    "url_parsing": "Invalid URI",
}


#: Top-level ``code`` elements with a *required* binding (R4 valuesets); fhir.resources checks
#: only the ``code`` datatype's pattern, so these value sets are checked here.
_REQUIRED_CODES: dict[str, dict[str, frozenset[str]]] = {
    "Patient": {"gender": frozenset({"male", "female", "other", "unknown"})},
    "Practitioner": {"gender": frozenset({"male", "female", "other", "unknown"})},
    "RelatedPerson": {"gender": frozenset({"male", "female", "other", "unknown"})},
    "DocumentReference": {
        "status": frozenset({"current", "superseded", "entered-in-error"}),
        "docStatus": frozenset({"preliminary", "final", "amended", "entered-in-error"}),
    },
    "Consent": {
        "status": frozenset(
            {"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}
        )
    },
    "AuditEvent": {
        "action": frozenset({"C", "R", "U", "D", "E"}),
        "outcome": frozenset({"0", "4", "8", "12"}),
    },
    "Encounter": {
        "status": frozenset(
            {
                "planned",
                "arrived",
                "triaged",
                "in-progress",
                "onleave",
                "finished",
                "cancelled",
                "entered-in-error",
                "unknown",
            }
        )
    },
}


def is_valid_id(value: str) -> bool:
    """FHIR ``id``: ``[A-Za-z0-9\\-\\.]{1,64}`` (R4 datatypes.html#id)."""
    return _ID_RE.fullmatch(value) is not None


def check_json_structure(data: Any, body: bytes | None = None) -> None:
    """Refuse (400) JSON nested deeper than :data:`MAX_JSON_DEPTH` and strings (keys included)
    with control characters. Given the raw ``body``, the walk is skipped when the bytes show
    it cannot find anything (too few brackets, no escaped control character)."""
    deep = body is None or body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH
    control = body is None or any(e in body for e in (b"\\u00", b"\\b", b"\\f"))
    if not (deep or control):
        return
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_JSON_DEPTH:
                raise BadRequest(f"The JSON is nested deeper than {MAX_JSON_DEPTH} levels")
            for key, item in value.items():
                if control and _CONTROL.search(key):
                    raise BadRequest("A JSON key contains a control character")
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            if depth > MAX_JSON_DEPTH:
                raise BadRequest(f"The JSON is nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((item, depth + 1) for item in value)
        elif control and isinstance(value, str) and _CONTROL.search(value):
            raise BadRequest("A string contains a control character (FHIR R4 datatypes: string)")


def parse_json(body: bytes) -> Any:
    """Parse a JSON request body of any shape, with :func:`check_json_structure`'s limits."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON") from None
    check_json_structure(data, body)
    return data


def parse_json_body(body: bytes) -> dict[str, Any]:
    """Parse a request body that must be one JSON object."""
    if not body:
        raise BadRequest("The request body is empty")
    data = parse_json(body)
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object (a FHIR resource)")
    return data


@cache
def _model(resource_type: str) -> Any:
    return get_fhir_model_class(resource_type)


def _expression(resource_type: str, loc: tuple[int | str, ...]) -> str:
    parts = [resource_type]
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]"
        elif item in ("__root__",) or str(item).startswith("function-"):
            continue
        else:
            parts.append(str(item).removesuffix("__ext").rstrip("_"))
    return ".".join(parts)


def validate_resource(resource: Mapping[str, Any], expected_type: str | None = None) -> str:
    """Validate ``resource`` against its R4B model and return its resource type.

    Raises :class:`InvalidResource` with one issue per problem, each with a FHIRPath
    ``expression`` (R4 operationoutcome.html ``issue.expression``).
    """
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise InvalidResource(
            "The resource has no resourceType",
            issues=[
                Issue("The resource has no resourceType", "required", expression=["resourceType"])
            ],
        )
    if expected_type is not None and rtype != expected_type:
        raise BadRequest(
            f"resourceType '{rtype[:64]}' does not match the request URL type '{expected_type}'"
        )
    if rtype not in SUPPORTED_TYPES:
        raise BadRequest(f"Resource type '{rtype[:64]}' is not supported by this server")
    rid = resource.get("id")
    if rid is not None and (not isinstance(rid, str) or not is_valid_id(rid)):
        raise InvalidResource(
            "Resource id is not a valid FHIR id",
            issues=[
                Issue("Resource id is not a valid FHIR id", "value", expression=[f"{rtype}.id"])
            ],
        )
    try:
        # the root resourceType is checked above; the inlined validator has no __init__ to
        # drop it (fhir_consent.fhir._inlined)
        compiled_validator(_model(rtype)).validate_python(
            {key: value for key, value in resource.items() if key != "resourceType"}
        )
    except ValidationError as exc:
        issues = []
        for err in exc.errors(include_url=False, include_input=False)[:50]:
            kind = str(err.get("type", ""))
            message = _SAFE_MESSAGES.get(kind, "Invalid value")
            issues.append(
                Issue(
                    message, _issue_code(kind), expression=[_expression(rtype, tuple(err["loc"]))]
                )
            )
        raise InvalidResource(f"The {rtype} resource is not valid FHIR R4", issues=issues) from None
    except (ValueError, TypeError):
        raise InvalidResource(f"The {rtype} resource is not valid FHIR R4") from None
    bad = [
        Issue("Value is not one of the allowed codes", "code-invalid", expression=[f"{rtype}.{k}"])
        for k, allowed in _REQUIRED_CODES.get(rtype, {}).items()
        if k in resource and resource[k] not in allowed
    ]
    if bad:
        raise InvalidResource(f"The {rtype} resource is not valid FHIR R4", issues=bad)
    return rtype


def _issue_code(kind: str) -> str:
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "structure"
    return "value"
