"""The shape of FHIR resources, read from fhir.resources' R4B models (identical to R4 for
the elements the kit writes): each element's FHIR datatype, cardinality, required-ness,
required-binding codes and reference targets. The kit uses it to build valid sample resources
for whatever types a server claims, without a table of its own.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from functools import lru_cache
from types import NoneType, UnionType
from typing import Any

__all__ = ["Element", "elements", "is_known_type"]

_PRIMITIVES = {
    bool: "boolean",
    int: "integer",
    float: "decimal",
    str: "string",
}
_SKIP = {"fhir_comments", "resource_type"}


@dataclass(frozen=True, slots=True)
class Element:
    """One element of a type, by its JSON name (choice elements appear once per variant,
    e.g. ``deceasedDateTime`` with ``choice = "deceased"``)."""

    name: str
    type: str  # FHIR type: "CodeableConcept", "code", "dateTime", "PatientContact", ...
    many: bool
    required: bool
    enum: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    choice: str | None = None  # the [x] stem of a choice element
    choice_required: bool = False


def _model(type_name: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(type_name)
    except (KeyError, ValueError, AttributeError, ImportError):
        return None


def is_known_type(type_name: str) -> bool:
    """Whether the R4B models define ``type_name`` (a resource, datatype or backbone)."""
    return _model(type_name) is not None


def _unwrap(annotation: Any) -> tuple[Any, bool, bool]:
    """``(inner type, is list, optional)`` of a field annotation."""
    optional = False
    many = False
    current = annotation
    for _ in range(6):
        origin = typing.get_origin(current)
        if origin in (typing.Union, UnionType):
            args = [a for a in typing.get_args(current) if a is not NoneType]
            optional = optional or len(args) < len(typing.get_args(current))
            if len(args) != 1:  # e.g. fhir_comments: str | list[str]
                return None, many, optional
            current = args[0]
        elif origin is list:
            many = True
            current = typing.get_args(current)[0]
        else:
            break
    return current, many, optional


def _type_name(inner: Any) -> str | None:
    if typing.get_origin(inner) is typing.Annotated:
        args = typing.get_args(inner)
        for meta in args[1:]:
            meta_name = type(meta).__name__
            if meta_name in ("EncodedBytes",):
                continue
            return meta_name[0].lower() + meta_name[1:]
        base = args[0]
        return _PRIMITIVES.get(base)
    if inner in _PRIMITIVES:
        return _PRIMITIVES[inner]
    name = getattr(inner, "__name__", None)
    if isinstance(name, str) and name.endswith("Type"):
        return name[: -len("Type")]
    return None


@lru_cache(maxsize=512)
def elements(type_name: str) -> dict[str, Element]:
    """The elements of ``type_name`` by JSON name; empty for an unknown type."""
    model = _model(type_name)
    if model is None:
        return {}
    out: dict[str, Element] = {}
    for field in model.model_fields.values():
        alias = str(field.alias or "")
        if not alias or alias.startswith("_") or alias in _SKIP:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if not extra.get("element_property"):
            continue
        inner, many, optional = _unwrap(field.annotation)
        fhir_type = _type_name(inner) if inner is not None else None
        if fhir_type is None:
            continue
        if fhir_type == "fHIRPrimitiveExtension":
            continue
        required = bool(extra.get("element_required")) or not optional
        enum = tuple(v for v in extra.get("enum_values", ()) if isinstance(v, str) and v != "+")
        targets = tuple(str(t) for t in extra.get("enum_reference_types", ()))
        choice = extra.get("one_of_many")
        out[alias] = Element(
            name=alias,
            type=fhir_type,
            many=many,
            required=required and not choice,
            enum=enum,
            targets=targets,
            choice=str(choice) if choice else None,
            choice_required=bool(extra.get("one_of_many_required")),
        )
    return out
