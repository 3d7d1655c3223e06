# ruff: noqa: F811  (the fixtures are imported from conformance_fixtures)
"""The REST section of ``python -m conformance`` against our whole server (open access, the
development mode: the REST checks create and delete freely), on SQLite and PostgreSQL: every
claimed interaction and search parameter of every claimed type is exercised and passes (any
known failure is listed in KNOWN_FAILURES)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from conformance_fixtures import keys_dir, open_server  # noqa: F401  (fixtures)

from conformance.__main__ import main
from conformance.capability import parse_capability
from conformance.samples import KIT_SYSTEM as KIT

#: What the kit found and is not fixed yet (the assertion is exact, so a fix, or a new failure,
#: shows up at once). The Binary ``data`` findings (create, PATCH, history and search entries)
#: were fixed by fhir_consent/documents/inline.py.
KNOWN_FAILURES: dict[str, str] = {}
#: What our CapabilityStatement does not claim, and what the kit cannot exercise here.
ALLOWED_SKIPS = (
    "conditionalUpdate not claimed",
    "conditionalDelete is 'not-supported'",
    "no Identifier search parameter to make a condition with",
)


def rows(out: str) -> list[tuple[str, str, str]]:
    """(status, id, detail) of each table row."""
    found = []
    for line in out.splitlines()[1:]:
        if not line.startswith(("PASS", "FAIL", "SKIP")):
            continue
        status, test_id = line.split()[:2]
        found.append((status, test_id, line))
    return found


def test_rest_section_against_our_server(
    open_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junit = tmp_path / "rest.xml"
    status = main([open_server, "--section", "rest", "--junit", str(junit)])
    out = capsys.readouterr().out
    table = rows(out)
    failures = {tid: line for s, tid, line in table if s == "FAIL"}
    assert set(failures) == set(KNOWN_FAILURES), out
    for tid, text in KNOWN_FAILURES.items():
        assert text in failures[tid], failures[tid]
    assert status == (1 if KNOWN_FAILURES else 0)
    for s, _tid, line in table:
        if s == "SKIP":
            assert any(reason in line for reason in ALLOWED_SKIPS), line

    # every claimed search parameter of every claimed type was searched, and passed
    cap = parse_capability(httpx.get(f"{open_server}/metadata").json())
    passed = {tid for s, tid, _ in table if s == "PASS"}
    for rtype, claim in cap.resources.items():
        for interaction in claim.interactions:
            assert f"{rtype}:{interaction}" in passed | set(failures), (rtype, interaction)
        for param in claim.search_params:
            assert f"{rtype}:search:{param.name}" in passed, (rtype, param.name)
    for tid in ("batch", "transaction", "transaction-atomic", "paging", "cleanup"):
        assert any(t == tid or t.endswith(f":{tid}") for t in passed), tid
    assert "error:404" in passed and "error:400-json" in passed

    root = ET.parse(junit).getroot()
    assert len(root.findall(".//testcase")) == len(table)
    assert len(root.findall(".//failure")) == len(KNOWN_FAILURES)

    # everything the kit created carried the run's tag and was deleted
    for rtype in cap.resources:
        left = httpx.get(f"{open_server}/{rtype}", params={"_tag": f"{KIT}|", "_count": "500"})
        tagged = [
            e for e in left.json().get("entry", [])
            if any(t.get("system") == KIT for t in e["resource"].get("meta", {}).get("tag", []))
        ]  # fmt: skip
        assert tagged == [], (rtype, tagged[:1])
