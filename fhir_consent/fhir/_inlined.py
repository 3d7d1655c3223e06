"""One pydantic-core validator per resource type, with every nested FHIR element inlined.

fhir.resources (through ``fhir_core``) types a nested element such as ``Patient.name`` as a
``HumanNameType`` whose core schema is a Python *wrap* function: for each element it imports
the model class by name and calls ``HumanName.model_validate`` again, which, because
``FHIRAbstractModel`` defines ``__init__``, calls back into Python once more. A Patient example
costs ~30 such round trips, about half of its validation time. They exist so the 600 model
modules can be imported lazily and in any order; once the classes exist they add nothing.

:func:`compiled_validator` builds, for one resource type, a ``SchemaValidator`` from the
classes' own core schemas (the same fields, patterns, ``extra="forbid"`` config and the same
before/after model validators) in which each such wrap is replaced by a reference to the
nested class's schema and ``custom_init`` is off: pydantic-core walks the whole resource in
Rust and calls Python only for the per-model checks. The fhir.resources classes themselves
are left as they are (other callers, ``model_validate`` included, see no change).

Two differences, both tightenings that match FHIR: a JSON string where an object is expected
is an error (the wrap parsed it as JSON), and so is a ``resourceType`` key inside a nested
element (the model ``__init__`` dropped it when it matched the element's type name). The root
``resourceType`` is checked by the caller and removed before validating. Contained resources
(``ResourceType``, picked by their ``resourceType``) keep fhir_core's own validator.

Hand-written because neither pydantic nor fhir.resources offers it: pydantic builds a model's
schema from its annotations, and these annotations are fhir_core's wrap types.
"""

from __future__ import annotations

import importlib
import threading
from functools import cache
from typing import Any

from fhir_core import types as fhir_types
from pydantic_core import SchemaValidator

__all__ = ["compiled_validator"]

_WRAP = "FhirBase.__get_pydantic_core_schema__.<locals>._validate"
_lock = threading.Lock()


def _model_class(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    cls: type = getattr(importlib.import_module(module), name)
    return cls


def _is_element_wrap(node: dict[str, Any]) -> bool:
    """A fhir_core element wrap (``FhirBase.__get_pydantic_core_schema__``)."""
    func = node.get("function", {}).get("function")
    return getattr(func, "__qualname__", None) == _WRAP


def _wrapped_class(node: dict[str, Any]) -> type | None:
    """The model class behind an element wrap, or None for a polymorphic ``Resource`` /
    ``Element`` slot that picks its class from the data."""
    func = node["function"]["function"]
    cells = dict(zip(func.__code__.co_freevars, func.__closure__ or (), strict=True))
    owner = cells["cls"].cell_contents
    if issubclass(owner, fhir_types.FhirElementOrResourceBase):
        return None
    return _model_class(cells["source_type"].cell_contents._model_klass)


def _is(node: dict[str, Any], name: str) -> bool:
    return getattr(node.get("function", {}).get("function"), "__name__", None) == name


def _not_null(value: Any) -> Any:
    if value is None:
        raise ValueError("null is not allowed as an element of this list")
    return value


def _after_check(cls: Any) -> Any:
    """fhir_core's after-construction checks for ``cls`` (required primitive elements with
    their ``_x`` extension alternative; one value per choice element ``x[x]``), or None
    when the class has neither (most element types). The choice check is fhir_core's
    ``_validate_one_of_many`` with its per-class lookups done once."""
    probe = cls.model_construct()
    required = bool(probe.get_required_fields())
    choices = tuple(
        (
            tuple(fields),
            cls.model_fields[fields[0]].json_schema_extra.get("one_of_many_required") is True,
        )
        for fields in probe.get_one_of_many_fields().values()
    )
    if not required and not choices:
        return None

    def check(self: Any) -> Any:
        if required:
            self._validate_required_primitive_elements()
        for fields, needed in choices:
            found = sum(1 for name in fields if getattr(self, name, None) is not None)
            if found > 1:
                raise ValueError(
                    f"Any of one field value is expected from this list {list(fields)}, "
                    "but got multiple!"
                )
            if needed and not found:
                raise ValueError(f"Expect any of field value from this list {list(fields)}.")
        return self

    return check


class _Builder:
    def __init__(self) -> None:
        self.definitions: dict[str, Any] = {}

    def ref(self, cls: type) -> dict[str, Any]:
        ref = f"fc:{cls.__module__}.{cls.__qualname__}"
        if ref not in self.definitions:
            self.definitions[ref] = None  # placeholder: a cycle reaches here as a reference
            schema = self.walk(cls.__pydantic_core_schema__)  # type: ignore[attr-defined]
            # Only an object reaches the class's own validators (some before-validators
            # call ``.get`` on their input); anything else fails here as ``dict_type``.
            self.definitions[ref] = {
                "type": "chain",
                "steps": [{"type": "dict"}, schema],
                "ref": ref,
            }
        return {"type": "definition-ref", "schema_ref": ref}

    def walk(self, node: Any) -> Any:
        if isinstance(node, list):
            return [self.walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        kind = node.get("type")
        if kind == "function-wrap" and _is_element_wrap(node):
            nested = _wrapped_class(node)
            if nested is not None:
                return self.ref(nested)
            # a kept polymorphic slot (``contained``): only list items reach it with null
            return {
                "type": "function-before",
                "function": {"type": "no-info", "function": _not_null},
                "schema": node,
            }
        if kind == "function-before" and _is(node, "reject_null_complex_elements"):
            # A null in a list of inlined elements now fails the item's own model schema
            # (``model_type``, at the item's index); kept polymorphic slots get _not_null.
            return self.walk(node["schema"])
        if kind == "function-after" and _is(node, "validate_after_model_construction"):
            check = _after_check(node["schema"]["cls"])
            inner = self.walk(node["schema"])
            if check is None:
                return inner
            return {
                "type": "function-after",
                "function": {"type": "no-info", "function": check},
                "schema": inner,
            }
        if kind == "definitions":
            for definition in node["definitions"]:
                self.definitions[definition["ref"]] = self.walk(definition)
            return self.walk(node["schema"])
        out = {
            key: (self.walk(value) if key not in ("metadata", "serialization") else value)
            for key, value in node.items()
            if key != "ref" or kind != "function-after"
        }
        if kind == "model":
            out["custom_init"] = False
        return out


@cache
def compiled_validator(model: type) -> SchemaValidator:
    """A validator equivalent to ``model.model_validate`` for a dict *without* its root
    ``resourceType`` (built once per class; thread-safe)."""
    with _lock:
        builder = _Builder()
        root = builder.ref(model)
        return SchemaValidator(
            {
                "type": "definitions",
                "schema": root,
                "definitions": list(builder.definitions.values()),
            }
        )
