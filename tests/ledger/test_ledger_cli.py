"""The ledger's command-line helpers as the operator runs them: ``keys init``/``show``/``rotate``
and ``ledger relay --once`` / ``status`` / ``verify`` (a separate relay process, ledger.md §2)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import orjson
from conftest import free_port
from fastapi.testclient import TestClient
from ledger_testkit import FHIR_JSON, ThreadedServer, consent_resource, ledger_app, ledger_settings
from waves_fake import API_KEY, SENDER, WavesFake

from fhir_consent.config import Settings

ORIGIN = "cli.example/ledger"
CLI = [sys.executable, "-m", "fhir_consent.ledger.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_keys_init_show_rotate(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    env = _env()
    out = _run(["keys", "init", "--dir", str(keys)], env)
    assert out.returncode == 0, out.stderr
    for name in ("signing.key", "rms-seal.key", "pseudonym.key"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    secret = orjson.loads((keys / "signing.key").read_bytes())["secret"]
    assert secret not in out.stdout
    again = _run(["keys", "init", "--dir", str(keys)], env)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    shown = _run(["keys", "show", "--dir", str(keys)], env)
    first = orjson.loads(shown.stdout)["signing_key_id"]
    assert _run(["keys", "rotate", "--dir", str(keys)], env).returncode == 0
    bundle = orjson.loads(_run(["keys", "show", "--dir", str(keys)], env).stdout)
    assert bundle["signing_key_id"] != first and first in bundle["signing_keys"]


def test_separate_relay_process_drains_and_verify_passes(
    settings: Settings, db_url: str, tmp_path: Path
) -> None:
    fake = WavesFake(block_interval=0.05)
    with ThreadedServer(fake.app, free_port()) as node:
        lsettings = ledger_settings(
            tmp_path,
            engine="waves",
            waves_url=node.url,
            waves_sender=SENDER,
            waves_api_key=API_KEY,
            origin=ORIGIN,
            relay_in_process=False,
        )
        app = ledger_app(settings, lsettings)
        with TestClient(app, base_url="https://testserver", headers=FHIR_JSON) as c:
            for _ in range(12):
                assert c.post("/fhir/Consent", json=consent_resource()).status_code == 201
        assert fake.broadcasts == 0  # no in-process relay
        env = _env(
            FHIR_CONSENT_DATABASE_URL=db_url,
            FHIR_CONSENT_LEDGER_KEYS_DIR=lsettings.keys_dir,
            FHIR_CONSENT_LEDGER_ORIGIN=ORIGIN,
            FHIR_CONSENT_LEDGER_ENGINE="waves",
            FHIR_CONSENT_LEDGER_WAVES_URL=node.url,
            FHIR_CONSENT_LEDGER_WAVES_SENDER=SENDER,
            FHIR_CONSENT_LEDGER_WAVES_API_KEY=API_KEY,
            FHIR_CONSENT_LEDGER_CONFIRMATIONS="1",
            FHIR_CONSENT_LEDGER_POLL_INTERVAL="0.05",
        )
        assert orjson.loads(_run(["ledger", "status"], env).stdout) == {"pending": 12}
        relay = _run(["ledger", "relay", "--once", "--timeout", "60"], env)
        assert relay.returncode == 0, relay.stdout + relay.stderr
        assert "outbox drained" in relay.stdout
        assert API_KEY not in relay.stdout + relay.stderr
        assert orjson.loads(_run(["ledger", "status"], env).stdout) == {"confirmed": 12}
        assert set(fake.anchored_keys().values()) == {1} and len(fake.anchored_keys()) == 12
        verify = _run(["ledger", "verify", "--scan-chain", "--progress"], env)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "12 anchored entries checked" in verify.stdout
        fake.outage = True
        down = _run(["ledger", "verify"], env)
        assert down.returncode == 1 and "cannot be read (http-503)" in down.stdout
