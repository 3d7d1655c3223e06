"""A 200 MB document through a real uvicorn server: streamed up and down, byte-identical, with
the server's peak memory (VmHWM, measured after a warm-up) growing far less than the document
(issue 6, "Bytes are streamed in chunks for large files"). Marked ``slow`` (about 20 s)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024
SIZE = 200 * MiB
MEMORY_BOUND = 64 * MiB  # peak RSS growth allowed while moving 200 MiB


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _content(size: int) -> Iterator[bytes]:
    blocks = [os.urandom(MiB) for _ in range(3)]
    for i in range(size // MiB):
        yield blocks[i % 3]


def _start(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "uvicorn", "fhir_consent.app:create_app", "--factory"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(
        cmd, env=env, cwd=log.parent, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()) from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["db", "dir"])
def test_200_mb_document_streams_with_bounded_memory(
    tmp_path: Path, sqlite_template: Path, backend: str
) -> None:
    db = tmp_path / "db.sqlite3"
    shutil.copy(sqlite_template, db)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")},
        "FHIR_CONSENT_DATABASE_URL": f"sqlite:///{db}",
        "FHIR_CONSENT_AUTO_MIGRATE": "false",
        "FHIR_CONSENT_OPEN_ACCESS": "true",
        "FHIR_CONSENT_SMART_KEYS_DIR": str(tmp_path / "smart"),
        "FHIR_CONSENT_DOCUMENTS_BLOB_BACKEND": backend,
        "FHIR_CONSENT_DOCUMENTS_BLOB_DIR": str(tmp_path / "blobs"),
        "FHIR_CONSENT_DOCUMENTS_SPOOL_DIR": str(tmp_path / "spool"),
        "FHIR_CONSENT_DOCUMENTS_MASTER_KEY_FILE": str(tmp_path / "keys" / "master.json"),
        "FHIR_CONSENT_LEDGER_KEYS_DIR": str(tmp_path / "keys" / "ledger"),
    }
    port = free_port()
    proc = _start(env, port, tmp_path / "server.log")
    base = f"http://127.0.0.1:{port}/fhir"
    try:
        with httpx.Client(timeout=120) as client:

            def roundtrip(size: int) -> tuple[str, str]:
                digest = hashlib.sha256()

                def body() -> Iterator[bytes]:
                    for block in _content(size):
                        digest.update(block)
                        yield block

                r = client.post(
                    f"{base}/Binary",
                    content=body(),
                    headers={"content-type": "application/pdf", "accept": "application/fhir+json"},
                )
                assert r.status_code == 201, r.text
                got = hashlib.sha256()
                n = 0
                with client.stream(
                    "GET", f"{base}/Binary/{r.json()['id']}", headers={"accept": "application/pdf"}
                ) as resp:
                    assert resp.status_code == 200
                    assert resp.headers["content-length"] == str(size)
                    for piece in resp.iter_raw():
                        got.update(piece)
                        n += len(piece)
                assert n == size
                return digest.hexdigest(), got.hexdigest()

            sent, received = roundtrip(4 * MiB)  # warm-up: every code path loaded
            assert sent == received
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the peak RSS
            before = _status(proc.pid, "VmRSS")
            start = time.monotonic()
            sent, received = roundtrip(SIZE)
            elapsed = time.monotonic() - start
            peak = _status(proc.pid, "VmHWM")
        assert sent == received
        growth = peak - before
        mib = f"RSS {before / MiB:.0f} MiB, peak +{growth / MiB:.1f} MiB"
        print(f"200 MiB up+down in {elapsed:.1f}s; server {mib}")  # noqa: T201
        assert growth < MEMORY_BOUND, f"server peak RSS grew by {growth / MiB:.0f} MiB"
        if backend == "dir":
            (blob,) = [p for p in (tmp_path / "blobs").rglob("*.blob") if p.stat().st_size > SIZE]
            assert blob.stat().st_size == SIZE + 16 * (SIZE // MiB)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for path in tmp_path.glob("db.sqlite3*"):  # 200 MB each: do not keep them around
            path.unlink()
        shutil.rmtree(tmp_path / "blobs", ignore_errors=True)
