"""The per-class caches of ``fhir_consent.fhir._validator_cache`` change the cost of the
model classes' own validation (``model_validate``: Parameters bodies, the conformance kit;
request bodies go through ``fhir_consent.fhir._inlined``), never its outcome: the same inputs
give the same errors as fhir_core's own validators (run in a subprocess whose model classes
were built before the caches)."""

from __future__ import annotations

from typing import Any

from conftest import load_example, run_probe
from pydantic import ValidationError

from fhir_consent.fhir.validation import _model

CASES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "name": [None]},
    {"resourceType": "Patient", "name": [None], "telecom": [{"value": "x"}, None]},
    {"resourceType": "Patient", "name": [{"given": ["A", None]}]},  # primitive list: allowed
    {"resourceType": "Patient", "deceasedBoolean": True, "deceasedDateTime": "2020"},
    {"resourceType": "DocumentReference", "content": [{"attachment": {}}]},
    {"resourceType": "DocumentReference", "status": "current", "content": [None]},
    {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"text": "x"},
        "category": [{"text": "y"}],
        "sourceAttachment": {},
        "sourceReference": {"reference": "DocumentReference/1"},
    },
    load_example("Patient-example"),
    load_example("Consent-consent-example-basic"),
]

_PROBE = """
import json, sys
import fhir.resources.R4B.patient, fhir.resources.R4B.documentreference, fhir.resources.R4B.consent
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError
validators = fhir.resources.R4B.patient.Patient.__pydantic_decorators__.model_validators
assert not validators["reject_null_complex_elements"].func.__qualname__.startswith("install")
out = []
for case in json.loads(sys.stdin.read()):
    try:
        get_fhir_model_class(case["resourceType"]).model_validate(case)
        out.append(None)
    except ValidationError as exc:
        out.append(sorted([e["type"], [str(p) for p in e["loc"]]] for e in exc.errors()))
print(json.dumps(out))
"""


def _outcomes(cases: list[dict[str, Any]]) -> list[Any]:
    out: list[Any] = []
    for case in cases:
        try:
            _model(case["resourceType"]).model_validate(case)
            out.append(None)
        except ValidationError as exc:
            out.append(sorted([e["type"], [str(p) for p in e["loc"]]] for e in exc.errors()))
    return out


def test_cached_validators_are_in_use() -> None:
    validators = _model("Patient").__pydantic_decorators__.model_validators
    for name in ("reject_null_complex_elements", "validate_after_model_construction"):
        assert validators[name].func.__qualname__.startswith("install.<locals>."), name


def test_same_outcome_as_fhir_core_validators() -> None:
    mine = _outcomes(CASES)
    original = run_probe(_PROBE, CASES)
    assert mine == original
    assert mine[-1] is None and mine[-2] is None  # the official examples are valid
    assert sum(1 for o in mine if o is not None) >= 5
    assert len(mine[1]) == 2  # every list holding a null is named, as fhir_core does
