"""The soak benchmark (bench/soak.py) in a CI-sized run: 20 seconds of the mixed load at two
workers on PostgreSQL must finish with zero errors, every kind of request exercised, and
memory within the bound. The 10-minute run and its figures are in docs/reliability.md.

Marked slow: by design it is 20 s of load plus seeding (~35 s in all).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_soak_smoke(pg_url: str | None, tmp_path: Path) -> None:
    if pg_url is None:
        pytest.skip("PostgreSQL not reachable")
    server = pg_url.split("?", 1)[0]  # the soak makes (and drops) a schema of its own
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "soak.py"),
            "--duration",
            "20",
            "--patients",
            "20",
            "--database-url",
            server,
            "--json",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert report["errors"] == 0 and report["server_log_errors"] == 0
    for kind in ("read", "search", "consent", "download", "baseline"):
        assert report["kinds"][kind]["requests"] > 5, kind
        assert report["kinds"][kind]["p99_ms"] >= report["kinds"][kind]["p50_ms"] > 0
    assert report["rss_mb"]["growth_after_warmup"] <= report["rss_mb"]["bound"]
    assert len(report["rss_mb"]["samples"]) >= 3
