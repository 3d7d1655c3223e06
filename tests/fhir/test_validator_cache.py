"""The per-class caches of ``fhir_consent.fhir._validator_cache`` change the cost of
validation, never its outcome: the same inputs give the same issues as fhir_core's own
validators (run in a subprocess whose model classes were built before the caches)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from conftest import load_example

from fhir_consent.errors import InvalidResource
from fhir_consent.fhir.validation import _model, validate_resource

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
from fhir_consent.fhir import _validator_cache
from fhir_consent.fhir.validation import validate_resource
from fhir_consent.errors import InvalidResource
validators = fhir.resources.R4B.patient.Patient.__pydantic_decorators__.model_validators
assert not validators["reject_null_complex_elements"].func.__qualname__.startswith("install")
out = []
for case in json.loads(sys.stdin.read()):
    try:
        validate_resource(case)
        out.append(None)
    except InvalidResource as exc:
        out.append([[i.code, list(i.expression), i.diagnostics] for i in exc.issues])
print(json.dumps(out))
"""


def _outcomes(cases: list[dict[str, Any]]) -> list[Any]:
    out: list[Any] = []
    for case in cases:
        try:
            validate_resource(case)
            out.append(None)
        except InvalidResource as exc:
            out.append([[i.code, list(i.expression), i.diagnostics] for i in exc.issues])
    return out


def test_cached_validators_are_in_use() -> None:
    validators = _model("Patient").__pydantic_decorators__.model_validators
    for name in ("reject_null_complex_elements", "validate_after_model_construction"):
        assert validators[name].func.__qualname__.startswith("install.<locals>."), name


def test_same_outcome_as_fhir_core_validators() -> None:
    mine = _outcomes(CASES)
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE],
        input=json.dumps(CASES),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    original = json.loads(probe.stdout)
    assert mine == original
    assert mine[-1] is None and mine[-2] is None  # the official examples are valid
    assert sum(1 for o in mine if o is not None) >= 5
    assert len(mine[1]) == 2  # every list holding a null is named, as fhir_core does
