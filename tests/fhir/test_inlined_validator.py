"""The inlined validator (``fhir_consent.fhir._inlined``) accepts and rejects exactly what
fhir.resources' own ``model_validate`` does — run in a subprocess whose model classes were
built with fhir_core's original validators — over every official example and ~1,000
deterministic mutations of them (unknown elements, wrong JSON types, nulls in lists, removed
elements, bad dates, objects replaced by strings or arrays). Where the two deliberately
differ, the difference is asserted on its own."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import all_examples, load_example, run_probe

from fhir_consent.errors import InvalidResource
from fhir_consent.fhir._inlined import compiled_validator
from fhir_consent.fhir.validation import _REQUIRED_CODES, _model, validate_resource

_REFERENCE = """
import json, sys
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError
import fhir_consent.fhir._validator_cache as cache
assert not cache._installed  # fhir_core's own validators, not this project's caches
out = []
for case in json.loads(sys.stdin.read()):
    try:
        get_fhir_model_class(case["resourceType"]).model_validate(case)
        out.append(True)
    except (ValidationError, ValueError, TypeError):
        out.append(False)
print(json.dumps(out))
"""


def _walk(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, (*path, i))


def _at(root: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        root = root[step]
    return root


def _mutations(example: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
    nodes = [(p, v) for p, v in _walk(example) if p and p[0] not in ("resourceType", "id")]
    objects = [p for p, v in nodes if isinstance(v, dict)]
    strings = [p for p, v in nodes if isinstance(v, str)]
    object_lists = [p for p, v in nodes if isinstance(v, list) and v and isinstance(v[0], dict)]
    keys = [p for p, _ in nodes if isinstance(p[-1], str)]
    out = []
    for kind in range(14):
        case = copy.deepcopy(example)
        pools = (objects, strings, objects, object_lists, keys, strings, objects)
        pool = pools[kind % 7]
        if not pool:
            continue
        path = rng.choice(pool)
        parent, last = _at(case, path[:-1]), path[-1]
        match kind % 7:
            case 0:
                _at(case, path)["unknownElement"] = 1
            case 1:
                parent[last] = 12345
            case 2:
                parent[last] = "text"
            case 3:
                items = _at(case, path)
                items.insert(rng.randrange(len(items) + 1), None)
            case 4:
                del parent[last]
            case 5:
                parent[last] = "2020-13-45T99:00"
            case 6:
                parent[last] = []
        out.append(case)
    return out


def _reference(cases: list[dict[str, Any]]) -> list[bool]:
    result: list[bool] = run_probe(_REFERENCE, cases)
    return result


def _accepted(case: dict[str, Any]) -> bool:
    try:
        validate_resource(case)
    except InvalidResource:
        return False
    return True


def _has_bad_code(case: dict[str, Any]) -> bool:
    """Caught by this server's own required-binding check, not by the models."""
    codes = _REQUIRED_CODES.get(case["resourceType"], {})
    return any(k in case and case[k] not in allowed for k, allowed in codes.items())


def test_same_verdicts_as_fhir_resources_on_examples_and_mutations() -> None:
    rng = random.Random(20261203)
    examples = [load_example(name) for name in all_examples()]
    cases = list(examples)
    for example in examples:
        cases.extend(_mutations(example, rng))
    cases = [c for c in cases if not _has_bad_code(c)]
    reference = _reference(cases)
    mine = [_accepted(c) for c in cases]
    disagree = [
        json.dumps(c)[:200] for c, a, b in zip(cases, mine, reference, strict=True) if a != b
    ]
    assert disagree == []
    assert len(cases) > 1000
    assert all(mine[: len(examples)])  # every official example is valid
    assert 500 < mine.count(False) < len(cases) - len(examples)  # the mutations bite


@pytest.mark.parametrize(
    ("case", "where"),
    [
        ({"resourceType": "Patient", "name": [None]}, "Patient.name[0]"),
        ({"resourceType": "Patient", "name": [{"family": "A"}, None]}, "Patient.name[1]"),
        ({"resourceType": "Patient", "name": [[]]}, "Patient.name[0]"),
        ({"resourceType": "Patient", "contained": [None]}, "Patient.contained[0]"),
        ({"resourceType": "Patient", "managingOrganization": 7}, "Patient.managingOrganization"),
    ],
)
def test_rejections_name_the_element(case: dict[str, Any], where: str) -> None:
    with pytest.raises(InvalidResource) as caught:
        validate_resource(case)
    assert [where] in [list(i.expression) for i in caught.value.issues]


def test_deliberate_tightenings() -> None:
    """fhir_core parses a JSON *string* given for an element and drops a matching nested
    ``resourceType``; FHIR JSON allows neither, and the inlined validator refuses both."""
    as_string = {"resourceType": "Patient", "name": ['{"family": "Chalmers"}']}
    nested_type = {"resourceType": "Patient", "name": [{"resourceType": "HumanName"}]}
    assert _reference([as_string, nested_type]) == [True, True]
    assert not _accepted(as_string)
    assert not _accepted(nested_type)


def test_contained_resources_keep_their_own_type() -> None:
    patient = load_example("Patient-example")
    org = {"resourceType": "Organization", "id": "o1", "name": "Clinic"}
    assert _accepted({**patient, "contained": [org]})
    assert not _accepted({**patient, "contained": [{**org, "bogus": 1}]})


def test_built_once_per_class() -> None:
    assert compiled_validator(_model("Patient")) is compiled_validator(_model("Patient"))
