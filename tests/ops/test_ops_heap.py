"""The server process freezes its startup heap (``fhir_consent.main``): a full garbage
collection then walks only what requests allocated, not the hundreds of thousands of objects
of the modules, models and schemas loaded at startup (a ~90 ms pause every few seconds under
load, otherwise). Apps built in-process (tests, a host that mounts ours) are left alone."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from conftest import run_probe
from fastapi.testclient import TestClient

from fhir_consent.app import create_app
from fhir_consent.config import Settings

_PROBE = """
import gc, json, sys
cfg = json.load(sys.stdin)
import os
os.environ.update(cfg["env"])
os.chdir(cfg["cwd"])
from fastapi.testclient import TestClient
import fhir_consent.main as main
before = gc.get_freeze_count()
with TestClient(main.app) as client:
    status = client.get("/fhir/metadata").status_code
    frozen = gc.get_freeze_count()
    gc.collect()
print(json.dumps({"before": before, "frozen": frozen, "status": status}))
"""


def test_the_server_process_freezes_its_startup_heap(tmp_path: Path) -> None:
    env = {
        "FHIR_CONSENT_DATABASE_URL": f"sqlite:///{tmp_path}/heap.sqlite3",
        "FHIR_CONSENT_SMART_KEYS_DIR": str(tmp_path / "keys"),
    }
    out = run_probe(_PROBE, {"env": env, "cwd": str(tmp_path)})
    assert out["status"] == 200
    assert out["before"] == 0  # importing builds the app; the freeze waits for startup
    assert out["frozen"] > 100_000  # the modules, models and schemas of a started server


def test_apps_built_in_process_are_left_alone(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/inproc.sqlite3",
        smart_keys_dir=str(tmp_path / "keys"),
        open_access=True,
    )
    before = gc.get_freeze_count()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/fhir/metadata").status_code == 200
    finally:
        os.chdir(cwd)
    assert gc.get_freeze_count() == before
