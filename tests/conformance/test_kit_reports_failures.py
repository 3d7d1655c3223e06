# ruff: noqa: F811  (the fixtures are imported from conformance_fixtures)
"""The kit is not a rubber stamp: pointed at our server with false claims injected into its
CapabilityStatement (:mod:`broken_server`), it reports each false claim as a failure and exits
1, while what is true still passes; and a server that does not declare consent enforcement
gets its consent checks skipped, with the reason."""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from conformance_fixtures import (  # noqa: F401  (fixtures)
    Smart,
    cheap_argon2,
    keys_dir,
    serve,
    smart_world,
    stop,
)

from conformance.__main__ import main


def table(out: str) -> dict[str, str]:
    found = {}
    for line in out.splitlines()[1:]:
        if line.startswith(("PASS", "FAIL", "SKIP")):
            found[line.split()[1]] = line
    return found


def sqlite_copy(template: Path, where: Path) -> str:
    """These tests are about the kit, not the database: SQLite only."""
    path = where / "broken.sqlite3"
    shutil.copy(template, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def broken(
    tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path, keys_dir: Path
) -> Iterator[str]:
    where = tmp_path_factory.mktemp("broken")
    env = {
        "FHIR_CONSENT_DATABASE_URL": sqlite_copy(sqlite_template, where),
        "FHIR_CONSENT_OPEN_ACCESS": "true",
        "FHIR_CONSENT_SMART_KEYS_DIR": str(keys_dir),
        "CONFORMANCE_INJECT": "rest",
    }
    proc, origin = serve(env, where, module="broken_server:app")
    try:
        yield f"{origin}/fhir"
    finally:
        stop(proc)


def test_false_rest_claims_are_reported(broken: str, capsys: pytest.CaptureFixture[str]) -> None:
    status = main([broken, "--section", "rest", "--types", "Patient,Observation"])
    out = capsys.readouterr().out
    rows = table(out)
    assert status == 1, out
    failed = {tid for tid, line in rows.items() if line.startswith("FAIL")}
    assert failed == {
        "Patient:search:marital-status",
        "Patient:conditional-update",
        "Observation:create",
        "Observation:search:code",
    }, out
    assert "found the non-matching resource" in rows["Patient:search:marital-status"]
    assert "expected 201, got 404" in rows["Observation:create"]
    assert "refused sample A: 404" in rows["Observation:search:code"]
    assert rows["Observation:read"].startswith("SKIP") and "no sample" in rows["Observation:read"]
    assert rows["Patient:search:family"].startswith("PASS")  # what is true still passes
    assert rows["Patient:read"].startswith("PASS")


def test_consent_is_skipped_without_the_marker(
    broken: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main([broken, "--section", "consent", "--patient-token", "x", "--patient", "P/1"])
    out = capsys.readouterr().out
    rows = table(out)
    assert status == 0, out
    assert "does not instantiate urn:fhir-consent:CapabilityStatement:consent-enforcement" in (
        rows["marker"]
    )
    assert rows["§5.01"].startswith("SKIP") and "does not declare consent enforcement" in (
        rows["§5.01"]
    )
    assert not [line for line in rows.values() if not line.startswith("SKIP")], out


@pytest.fixture
def pretender(
    sqlite_template: Path, keys_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Smart]:
    """Open access (nothing enforced), but the CapabilityStatement claims consent enforcement."""
    monkeypatch.setenv("CONFORMANCE_INJECT", "consent")
    url = sqlite_copy(sqlite_template, tmp_path)
    yield from smart_world(url, keys_dir, tmp_path, module="broken_server:app", open_access=True)


def test_a_server_that_only_claims_consent_enforcement_fails(
    pretender: Smart, capsys: pytest.CaptureFixture[str]
) -> None:
    credentials = pretender.consent_credentials()
    status = main([pretender.base, "--section", "consent", "--credentials", str(credentials)])
    out = capsys.readouterr().out
    rows = table(out)
    assert status == 1, out
    assert rows["marker"].startswith("PASS")
    assert rows["§3-default"].startswith("FAIL") and "without any Consent" in rows["§3-default"]
    denies = [f"§5.{i:02d}" for i in (1, 3, 5, 9, 11, 13, 14, 17, 19, 22)]
    for tid in denies:
        assert rows[tid].startswith("FAIL") and "expected deny" in rows[tid], rows[tid]
    for tid in ("§2.1-nothing-yet", "§2.2-no-self-grant", "§2.1-only-proposed",
                "§2.3-next-request"):  # fmt: skip
        assert rows[tid].startswith("FAIL"), rows[tid]


def test_cli_exit_status_and_junit(broken: str, tmp_path: Path) -> None:
    """The real command line: exit status 1 and a JUnit file with the failures."""
    junit = tmp_path / "broken.xml"
    run = subprocess.run(
        [sys.executable, "-m", "conformance", broken, "--section=rest", "--types=Observation",
         "--junit", str(junit)],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stdout.startswith("RESULT") and "FAIL    Observation:create" in run.stdout
    failures = ET.parse(junit).getroot().findall(".//failure")
    assert len(failures) == run.stdout.count("\nFAIL ") >= 1
