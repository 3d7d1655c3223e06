"""The console script as the README uses it: ``fhir-consent migrate`` and ``serve``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import free_port


def _cli() -> list[str]:
    exe = shutil.which("fhir-consent")
    return [exe] if exe else [sys.executable, "-m", "fhir_consent.cli"]


def test_migrate_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.sqlite3'}"
    for _ in range(2):
        out = subprocess.run(
            [*_cli(), "migrate", "--database-url", url],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert "revision head" in out.stdout


def test_serve_on_embedded_defaults(tmp_path: Path) -> None:
    """``fhir-consent serve`` in an empty directory: creates its SQLite file and SMART signing
    keys, migrates, serves; the FHIR API needs a token by default (``/metadata`` does not)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")}
    proc = subprocess.Popen(
        [*_cli(), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}/fhir"
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"{base}/metadata", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert r.status_code == 200
        assert r.json()["fhirVersion"] == "4.0.1"
        created = httpx.post(
            f"{base}/Patient",
            json={"resourceType": "Patient"},
            headers={"content-type": "application/fhir+json"},
        )
        assert created.status_code == 401  # secure by default (SMART, issue 3)
        assert created.headers["www-authenticate"].startswith("Bearer")
        smart = httpx.get(f"{base}/.well-known/smart-configuration")
        assert smart.status_code == 200
        assert httpx.get(smart.json()["jwks_uri"]).json()["keys"]
        assert (tmp_path / "fhir-consent.sqlite3").exists()
        assert (tmp_path / "keys" / "smart" / "keyset.json").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
