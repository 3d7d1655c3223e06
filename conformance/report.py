"""Check results: a pass/fail table for people and JUnit XML for CI."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import httpx

__all__ = ["Recorder", "Result", "print_table", "write_junit"]


@dataclass(frozen=True, slots=True)
class Result:
    """One check. ``status`` is ``pass``, ``fail`` or ``skip``; ``test_id`` is the id on
    the spec page (Inferno/G10 ids where one exists)."""

    section: str
    test_id: str
    name: str
    status: str
    detail: str = ""


@dataclass
class Recorder:
    """Runs checks and collects their results. A check returns ``None`` (pass), a detail
    string (pass, with a note), ``"skip: why"`` (skipped), or raises (fail)."""

    results: list[Result] = field(default_factory=list)

    def check(self, section: str, test_id: str, name: str, fn: Callable[[], str | None]) -> bool:
        """Run one check; True when it passed."""
        try:
            outcome = fn()
        except AssertionError as error:
            self.results.append(Result(section, test_id, name, "fail", str(error)[:300]))
            return False
        except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as error:
            detail = f"{type(error).__name__}: {str(error)[:200]}"
            self.results.append(Result(section, test_id, name, "fail", detail))
            return False
        if outcome and outcome.startswith("skip"):
            reason = outcome[4:].lstrip(":").strip()
            self.results.append(Result(section, test_id, name, "skip", reason))
            return False
        self.results.append(Result(section, test_id, name, "pass", outcome or ""))
        return True

    def skip(self, section: str, test_id: str, name: str, reason: str) -> None:
        self.results.append(Result(section, test_id, name, "skip", reason))

    def fail(self, section: str, test_id: str, name: str, detail: str) -> None:
        self.results.append(Result(section, test_id, name, "fail", detail[:300]))


def print_table(results: Sequence[Result], out: TextIO) -> None:
    """A fixed-width table, then a one-line summary."""
    rows = [("RESULT", "ID", "CHECK", "DETAIL")] + [
        (r.status.upper(), r.test_id, r.name, r.detail) for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3]))
        print(f"{line}  {row[3]}".rstrip(), file=out)
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped", file=out)


def write_junit(results: Sequence[Result], path: str | Path, *, suite: str = "conformance") -> None:
    """JUnit XML (one ``testsuite`` per section) for CI dashboards."""
    root = ET.Element("testsuites", name=suite)
    sections: dict[str, list[Result]] = {}
    for result in results:
        sections.setdefault(result.section, []).append(result)
    for section, items in sections.items():
        element = ET.SubElement(
            root,
            "testsuite",
            name=f"{suite}.{section}",
            tests=str(len(items)),
            failures=str(sum(r.status == "fail" for r in items)),
            skipped=str(sum(r.status == "skip" for r in items)),
        )
        for result in items:
            case = ET.SubElement(
                element,
                "testcase",
                classname=f"{suite}.{section}",
                name=f"{result.test_id} {result.name}",
            )
            if result.status == "fail":
                ET.SubElement(case, "failure", message=result.detail or "failed")
            elif result.status == "skip":
                ET.SubElement(case, "skipped", message=result.detail or "skipped")
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
