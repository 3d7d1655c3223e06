"""Ledger engines as entry points (issue 9 scope 2): engines are found by name in the
``fhir_consent.ledger_engines`` entry-point group, the built-in ones are declared there in
``pyproject.toml``, and a third-party engine package — ``tests/plugins/fc_engine_example``,
installed for real with pip into a target directory — is discovered through
:mod:`importlib.metadata` and used end to end by a real server configured with its name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import free_port
from ledger_testkit import consent_resource, wait_for, wait_port

from fhir_consent.ledger import outbox
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.ledger.engines import (
    BUILTIN_ENGINES,
    ENTRY_POINT_GROUP,
    EngineError,
    LedgerEngine,
    available_engines,
    create_engine,
    load_engine_factory,
    register_engine,
)
from fhir_consent.ledger.engines.evm import EvmEngine
from fhir_consent.ledger.engines.waves import WavesEngine
from fhir_consent.store.db import Database

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests" / "plugins" / "fc_engine_example"
ORIGIN = "plugin.example/ledger"


def test_pyproject_declares_the_builtin_engines_as_entry_points() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["entry-points"][ENTRY_POINT_GROUP]
    assert declared == dict(BUILTIN_ENGINES)  # the fallback table is exactly the declaration
    settings = LedgerSettings(
        _env_file=None,  # type: ignore[call-arg]
        waves_url="http://127.0.0.1:1",
        waves_sender="3N",
        evm_url="http://127.0.0.1:1",
        evm_account="0x" + "1" * 40,
    )
    kinds = {"embedded": type(None), "waves": WavesEngine, "evm": EvmEngine}
    for name, kind in kinds.items():
        engine = create_engine(settings.model_copy(update={"engine": name}), ORIGIN)
        assert isinstance(engine, kind)
        if engine is not None:
            assert isinstance(engine, LedgerEngine) and engine.name == name
            engine.close()


def test_unknown_broken_and_registered_engines() -> None:
    with pytest.raises(EngineError, match="unknown ledger engine 'nope'; available: .*evm"):
        load_engine_factory("nope")
    register_engine("not-an-engine", lambda settings, origin: object())  # type: ignore[arg-type,return-value]
    register_engine("makes-nothing", lambda settings, origin: None)
    try:
        for name in ("not-an-engine", "makes-nothing"):
            settings = LedgerSettings(_env_file=None, engine=name)  # type: ignore[call-arg]
            with pytest.raises(EngineError) as exc:
                create_engine(settings, ORIGIN)
            assert exc.value.code == "config"
        assert "makes-nothing" in available_engines()
    finally:
        from fhir_consent.ledger.engines import ENGINES

        ENGINES.pop("not-an-engine")
        ENGINES.pop("makes-nothing")
    with pytest.raises(ValueError):
        LedgerSettings(_env_file=None, engine="Bad Name!")  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install`` the example package (a copy, so no build files land in the repo)
    into a target directory, offline and without dependencies (fhir-consent is here)."""
    work = tmp_path_factory.mktemp("plugin")
    src = work / "src"
    shutil.copytree(PLUGIN, src)
    site = work / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(site.glob("fc_engine_example-*.dist-info/entry_points.txt"))
    return site


@pytest.fixture
def on_path(plugin_site: Path) -> Iterator[Path]:
    sys.path.insert(0, str(plugin_site))
    try:
        yield plugin_site
    finally:
        sys.path.remove(str(plugin_site))
        for name in [m for m in sys.modules if m.startswith("fc_engine_example")]:
            del sys.modules[name]


def test_installed_plugin_is_discovered_through_importlib_metadata(
    on_path: Path, tmp_path: Path
) -> None:
    eps = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == "fc-example"]
    assert [ep.value for ep in eps] == ["fc_engine_example:NotaryFileEngine.from_settings"]
    assert eps[0].dist is not None and eps[0].dist.name == "fc-engine-example"
    assert "fc-example" in available_engines()
    settings = LedgerSettings(
        _env_file=None,  # type: ignore[call-arg]
        engine="fc-example",
        engine_options={"path": str(tmp_path / "notary.jsonl")},
    )
    engine = create_engine(settings, ORIGIN)
    assert isinstance(engine, LedgerEngine) and engine.name == "fc-example"
    assert type(engine).__module__ == "fc_engine_example"
    assert Path(sys.modules["fc_engine_example"].__file__ or "").is_relative_to(on_path)
    with pytest.raises(EngineError, match="engine_options.path"):
        create_engine(settings.model_copy(update={"engine_options": {}}), ORIGIN)


def test_a_consent_change_lands_on_the_plugin_engine(
    plugin_site: Path, db_url: str, tmp_path: Path
) -> None:
    notary = tmp_path / "notary" / "ledger.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")}
    env.update(
        {
            # the server finds the plugin only through its installed metadata on sys.path
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(plugin_site)]),
            "FHIR_CONSENT_DATABASE_URL": db_url,
            "FHIR_CONSENT_AUTO_MIGRATE": "false",
            "FHIR_CONSENT_OPEN_ACCESS": "true",
            "FHIR_CONSENT_LEDGER_KEYS_DIR": str(tmp_path / "keys"),
            "FHIR_CONSENT_LEDGER_ORIGIN": ORIGIN,
            "FHIR_CONSENT_LEDGER_ENGINE": "fc-example",
            "FHIR_CONSENT_LEDGER_ENGINE_OPTIONS": orjson.dumps({"path": str(notary)}).decode(),
            "FHIR_CONSENT_LEDGER_CONFIRMATIONS": "0",
            "FHIR_CONSENT_LEDGER_POLL_INTERVAL": "0.05",
        }
    )
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "fhir_consent.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    db = Database(db_url, pool_size=1)
    try:
        wait_port(port, proc, timeout=60)
        base = f"http://127.0.0.1:{port}/fhir"
        headers = {"content-type": "application/fhir+json"}
        created = httpx.post(f"{base}/Consent", json=consent_resource(), headers=headers)
        assert created.status_code == 201, created.text
        doc = {**created.json(), "status": "active"}
        granted = httpx.put(f"{base}/Consent/{doc['id']}", json=doc, headers=headers)
        assert granted.status_code == 200, granted.text

        def confirmed() -> bool:
            with db.read() as conn:
                return outbox.status_counts(conn) == {"confirmed": 2}

        wait_for(confirmed, timeout=30, interval=0.1)
        lines = [orjson.loads(line) for line in notary.read_text().splitlines()]
        anchored = {int(seq) for tx in lines for seq in tx["entries"]}
        assert anchored == {0, 1} and all(tx["origin"] == ORIGIN for tx in lines)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        db.dispose()
    verify = subprocess.run(
        [sys.executable, "-m", "fhir_consent.cli", "ledger", "verify"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "2 anchored entries checked on the external ledger" in verify.stdout
    notary.write_text("")  # the notary lost its log: verify must notice
    broken = subprocess.run(
        [sys.executable, "-m", "fhir_consent.cli", "ledger", "verify"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert broken.returncode == 1 and "not found" in broken.stdout
