"""The console script as the README uses it: ``migrate``, ``serve``, ``keys``, ``demo`` and
``ledger verify`` — each in an empty directory with no ``FHIR_CONSENT_`` settings, as a
newcomer runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
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


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_cli(), *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=180
    )


class _Server:
    """``fhir-consent serve`` in ``cwd`` on a free port."""

    def __init__(self, cwd: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*_cli(), "serve", "--port", str(self.port)],
            cwd=cwd,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> _Server:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{self.origin}/fhir/metadata", timeout=2)
                return self
            except httpx.TransportError:
                if self.proc.poll() is not None:
                    output = self.proc.stdout.read() if self.proc.stdout else b""
                    raise AssertionError(output.decode(errors="replace")) from None
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def test_keys_init_creates_every_kind_once(tmp_path: Path) -> None:
    made = _run(["keys", "init"], tmp_path)
    assert made.returncode == 0, made.stderr
    kinds = [orjson.loads(doc)["kind"] for doc in made.stdout.replace("}\n{", "}\0{").split("\0")]
    assert kinds == ["smart", "ledger", "documents"]
    for secret in (
        tmp_path / "keys" / "ledger" / "signing.key",
        tmp_path / "keys" / "documents" / "master-keys.json",
    ):
        assert secret.stat().st_mode & 0o077 == 0, secret
    again = _run(["keys", "init"], tmp_path)  # never overwrites a key without being told
    assert again.returncode == 2 and again.stdout == ""
    assert [line.split(":")[1].strip() for line in again.stderr.splitlines()] == [
        "smart",
        "ledger",
        "documents",
    ]
    forced = _run(["keys", "init", "--ledger", "--force"], tmp_path)
    assert forced.returncode == 2 and "keys rotate --ledger" in forced.stderr
    shown = _run(["keys", "show"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    public = orjson.loads(shown.stdout)
    assert public["smart"]["keys"] and all("d" not in k for k in public["smart"]["keys"])
    assert public["ledger"]["signing_key_id"]
    signing = orjson.loads((tmp_path / "keys" / "ledger" / "signing.key").read_bytes())
    assert signing["secret"] not in shown.stdout


def test_demo_then_serve_is_the_whole_server(tmp_path: Path) -> None:
    """README/docs/demo.md: ``fhir-consent demo && fhir-consent serve`` — the patient app, the
    ledger and consent enforcement are all there without any setting."""
    port = free_port()
    seeded = _run(
        ["demo", "--json", "--password", "demo-password", "--base-url", f"http://127.0.0.1:{port}"],
        tmp_path,
    )
    assert seeded.returncode == 0, seeded.stderr
    demo = orjson.loads(seeded.stdout)
    assert {login["username"] for login in demo["logins"]} >= {"peter"}
    assert "demo-password" not in seeded.stderr
    with _Server(tmp_path, port) as server:
        app = httpx.get(f"{server.origin}/app/")
        assert app.status_code == 200 and "text/html" in app.headers["content-type"]
        checkpoint = httpx.get(f"{server.origin}/fhir/$ledger-checkpoint")
        assert checkpoint.status_code == 200 and checkpoint.json()["size"] > 0
        # Lakeside's EHR (backend services) before Peter answers its inquiry: it keeps the two
        # documents it holds itself (consent.md §3, custodian), Northgate's stays hidden.
        clinic = _run(
            ["demo", "clinic", "--patient", "peter", "--base-url", server.origin], tmp_path
        )
        assert clinic.returncode == 0, clinic.stderr
        assert "sees 2 of Patient/peter's documents" in clinic.stdout
        assert "Lakeside" in clinic.stdout and "Northgate" not in clinic.stdout
    verified = _run(["ledger", "verify"], tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


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
