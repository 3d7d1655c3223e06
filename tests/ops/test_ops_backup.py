"""``fhir-consent backup create|verify|restore``: a round trip through real servers and the
real console script. Patients, Consents and documents (content in the blob directory) are
written over HTTP; the backup is taken while the server runs; it is restored into an empty
installation elsewhere (same backend, and SQLite → PostgreSQL); a server started on the
restore serves byte-identical documents and ``fhir-consent ledger verify`` passes there."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from opskit import Server, clean_env, cli, consent, document, fresh_database, patient

from fhir_consent.config import Settings
from fhir_consent.documents.config import DocumentSettings
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.ops.backup import BackupError, restore_backup
from smart_on_fhir.cli import init_keys

FHIR = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _install_env(url: str, home: Path) -> dict[str, str]:
    return clean_env(
        FHIR_CONSENT_DATABASE_URL=url,
        FHIR_CONSENT_OPEN_ACCESS="true",
        FHIR_CONSENT_DOCUMENTS_BLOB_DIR=str(home / "blobs"),
        FHIR_CONSENT_LOG_LEVEL="warning",
    )


def _load(base: str) -> dict[str, Any]:
    """Patients, Consents, documents with content; returns what to read back."""
    out: dict[str, Any] = {"patients": {}, "consents": {}, "binaries": {}}
    with httpx.Client(timeout=60, headers=FHIR) as http:
        for n in range(3):
            made = http.post(f"{base}/Patient", json=patient(f"Backup{n}"))
            assert made.status_code == 201, made.text
            pid = made.json()["id"]
            out["patients"][pid] = made.json()
            for status in ("proposed", "active"):
                c = http.post(f"{base}/Consent", json=consent(pid, status))
                assert c.status_code == 201, c.text
                out["consents"][c.json()["id"]] = c.json()
            content = os.urandom(150_000 + n) + f"letter {n}".encode()
            doc = http.post(f"{base}/DocumentReference", json=document(pid, content))
            assert doc.status_code == 201, doc.text
            binary = doc.json()["content"][0]["attachment"]["url"].rsplit("/", 1)[-1]
            out["binaries"][binary] = content
        checkpoint = http.get(f"{base}/$ledger-checkpoint", headers={"accept": "application/json"})
        out["ledger_size"] = checkpoint.json()["size"]
    assert out["ledger_size"] >= 9  # 6 Consents + 3 DocumentReferences
    return out


def _read_back(base: str, loaded: dict[str, Any]) -> None:
    with httpx.Client(timeout=60, headers=FHIR) as http:
        for pid, original in loaded["patients"].items():
            got = http.get(f"{base}/Patient/{pid}")
            assert got.status_code == 200 and got.json() == original
        for cid, original in loaded["consents"].items():
            assert http.get(f"{base}/Consent/{cid}").json() == original
        for binary, content in loaded["binaries"].items():
            got = http.get(f"{base}/Binary/{binary}", headers={"accept": "application/pdf"})
            assert got.status_code == 200 and got.content == content  # byte-identical
        checkpoint = http.get(f"{base}/$ledger-checkpoint", headers={"accept": "application/json"})
        assert checkpoint.json()["size"] == loaded["ledger_size"]
        made = http.post(f"{base}/Patient", json=patient("AfterRestore"))  # ids/sequences go on
        assert made.status_code == 201, made.text


@pytest.mark.parametrize(
    ("source", "target"),
    [("sqlite", "sqlite"), ("postgresql", "postgresql"), ("sqlite", "postgresql")],
)
def test_backup_round_trip(source: str, target: str, tmp_path: Path) -> None:
    first, second, backup = tmp_path / "first", tmp_path / "second", tmp_path / "backup"
    first.mkdir()
    second.mkdir()
    with fresh_database(source, first) as src_url, fresh_database(target, second) as dst_url:
        src_env = _install_env(src_url, first)
        init_keys(first / "keys" / "smart")  # as `fhir-consent keys init --smart` does
        with Server(first, src_env) as server:
            loaded = _load(server.base)
            made = _run(["backup", "create", str(backup)], first, src_env)  # while it serves
            assert made.returncode == 0, made.stderr
        summary = made.stdout
        assert '"blobs": 3' in summary and '"keys"' in summary
        assert sorted(p.name for p in (backup / "keys").iterdir()) == [
            "documents",
            "ledger",
            "smart",
        ]
        assert oct(backup.stat().st_mode & 0o777) == "0o700"

        dst_env = _install_env(dst_url, second)
        restored = _run(["backup", "restore", str(backup)], second, dst_env)
        assert restored.returncode == 0, restored.stderr
        verified = _run(["ledger", "verify", "--no-external"], second, dst_env)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert verified.stdout.strip().splitlines()[-1].startswith("OK")

        with pytest.raises(BackupError, match="not empty"):  # never over data
            restore_backup(
                backup,
                settings=Settings(database_url=dst_url),
                documents=DocumentSettings(blob_dir=second / "blobs"),
                ledger=LedgerSettings(keys_dir=str(second / "keys" / "ledger")),
            )

        with Server(second, dst_env) as server:
            _read_back(server.base, loaded)


def test_a_damaged_backup_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    first, second, backup = tmp_path / "first", tmp_path / "second", tmp_path / "backup"
    first.mkdir()
    second.mkdir()
    src_env = _install_env(f"sqlite:///{first / 'db.sqlite3'}", first)
    with Server(first, src_env) as server:
        _load(server.base)
    assert _run(["backup", "create", str(backup)], first, src_env).returncode == 0
    checked = _run(["backup", "verify", str(backup)], tmp_path, clean_env())
    assert checked.returncode == 0, checked.stdout
    blob = next((backup / "blobs").rglob("*.blob"))
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))

    checked = _run(["backup", "verify", str(backup)], tmp_path, clean_env())
    assert checked.returncode == 1
    assert f"blobs/{blob.parent.name}/{blob.name}: checksum mismatch" in checked.stdout

    dst_env = _install_env(f"sqlite:///{second / 'db.sqlite3'}", second)
    restored = _run(["backup", "restore", str(backup)], second, dst_env)
    assert restored.returncode == 2 and "damaged" in restored.stderr
    assert not (second / "db.sqlite3").exists() and not (second / "keys").exists()

    refused = _run(["backup", "create", str(backup)], first, src_env)
    assert refused.returncode == 2 and "not empty" in refused.stderr
