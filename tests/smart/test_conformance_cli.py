"""``python -m conformance`` against our own live server: every SMART check passes (none is
skipped when credentials are given), and the JUnit XML is written."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from smart_on_fhir.keys import generate_signing_key

from .kit import REDIRECT, World


def test_conformance_smart_section_against_live_server(
    world: World, smart_server: str, tmp_path: Path
) -> None:
    world.add_patient()
    app = world.add_client().client
    key = generate_signing_key("ES384")
    key_file = tmp_path / "backend.jwk.json"
    key_file.write_text(json.dumps(dict(key.as_dict(private=True))))
    key_file.chmod(0o600)
    backend = world.add_client(
        "confidential-asymmetric",
        scope="system/Patient.rs",
        redirect_uris=(),
        jwks={"keys": [dict(key.as_dict(private=False))]},
    ).client
    junit = tmp_path / "smart.xml"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "conformance",
            f"{smart_server}/fhir",
            "--section",
            "smart",
            "--junit",
            str(junit),
            f"--client-id={app.client_id}",  # generated ids may begin with "-"
            "--redirect-uri",
            REDIRECT,
            f"--backend-client-id={backend.client_id}",
            "--backend-key",
            str(key_file),
            "--denied-type",
            "DocumentReference",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[:3] == ["RESULT", "ID", "CHECK"]
    for test_id in ("1.1.01", "1.1.02", "g10_unauthorized_access", "2F.33", "3.2.04", "9.4"):
        assert any(line.startswith("PASS") and f" {test_id} " in line for line in lines), test_id
    assert not any(line.startswith(("FAIL", "SKIP")) for line in lines), run.stdout
    root = ET.parse(junit).getroot()
    cases = root.findall(".//testcase")
    assert len(cases) >= 25
    assert not root.findall(".//failure") and not root.findall(".//skipped")


def test_conformance_without_credentials_skips_and_fails_nothing(smart_server: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "conformance", f"{smart_server}/fhir"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SKIP" in run.stdout and "FAIL" not in run.stdout


def test_conformance_reports_failures(tmp_path: Path) -> None:
    """A server that is not there: the run fails, with a table and a non-zero status."""
    junit = tmp_path / "down.xml"
    run = subprocess.run(
        [sys.executable, "-m", "conformance", "http://127.0.0.1:9/fhir", "--junit", str(junit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1
    assert run.stdout.startswith("RESULT") and "FAIL" in run.stdout
    assert ET.parse(junit).getroot().findall(".//failure")
