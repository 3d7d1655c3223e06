"""Per-class caches for two model validators of ``fhir_core`` (the base of fhir.resources), so
validating a resource stops re-deriving, for every nested element, facts that are fixed per
model class. The checks themselves are unchanged and still run on every element:

* ``reject_null_complex_elements`` (before): a ``null`` inside a list of complex elements is
  an error. The original walks every field of the class and tests its type on each call; here
  the complex-list fields are listed once per class, and any ``null`` found hands the data to
  the original validator, which raises its own error with every offending field.
* ``validate_after_model_construction`` (after): required primitive elements and choice
  (``value[x]``) elements. Most element classes have neither; which ones a class has is
  fixed per class (``get_required_fields`` / ``get_one_of_many_fields`` return constants), so
  the two checks are called only for classes that have something to check.

pydantic reads a model's validators from the class when the class is created, so
:func:`install` must run before fhir.resources' model modules are imported
(:mod:`fhir_consent.fhir.validation` calls it at import). Classes created earlier keep the
original validators: slower, never different.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["install"]

_lock = threading.Lock()
_installed = False


def install() -> None:
    """Replace the two validators on ``FHIRAbstractModel`` (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        from fhir_core import fhirabstractmodel as fam
        from fhir_core.utils import is_list_type, is_primitive_type

        base: Any = fam.FHIRAbstractModel
        original_before = base.__dict__["reject_null_complex_elements"].__func__
        complex_lists: dict[type, tuple[tuple[str, str | None], ...]] = {}
        checks: dict[type, tuple[bool, bool]] = {}

        def reject_null_complex_elements(cls: type, data: Any) -> Any:
            if not isinstance(data, dict):
                return data
            fields = complex_lists.get(cls)
            if fields is None:
                fields = complex_lists[cls] = tuple(
                    (name, field.alias)
                    for name, field in cls.model_fields.items()  # type: ignore[attr-defined]
                    if is_list_type(field)
                    and not is_primitive_type(field)
                    and not name.endswith("__ext")
                )
            for name, alias in fields:
                value = data.get(alias if alias and alias in data else name)
                if isinstance(value, list) and None in value:
                    return original_before(cls, data)  # raises, naming every bad field
            return data

        def validate_after_model_construction(self: Any) -> Any:
            cls = type(self)
            needed = checks.get(cls)
            if needed is None:
                needed = checks[cls] = (
                    bool(self.get_required_fields()),
                    bool(self.get_one_of_many_fields()),
                )
            if needed[0]:
                self._validate_required_primitive_elements()
            if needed[1]:
                self._validate_one_of_many()
            return self

        base.reject_null_complex_elements = classmethod(reject_null_complex_elements)
        base.validate_after_model_construction = validate_after_model_construction
        _installed = True
