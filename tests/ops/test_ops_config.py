"""docs/configuration.md is checked against the settings classes: every field of every one is
documented there under the environment variable it is read from, with its default and its
description, and the generated tables are up to date."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_consent.config import Settings
from fhir_consent.ops.configdoc import SECTIONS, env_names, main, render, update

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

FIELDS = [
    pytest.param(cls, name, info, id=f"{cls.__name__}.{name}")
    for _heading, cls in SECTIONS
    for name, info in cls.model_fields.items()
]


@pytest.mark.parametrize(("cls", "name", "info"), FIELDS)
def test_every_setting_is_described_and_documented(cls: type, name: str, info: object) -> None:
    description = getattr(info, "description", None)
    assert description and description.strip(), f"{cls.__name__}.{name} has no description"
    text = DOC.read_text(encoding="utf-8")
    for env in env_names(cls, name, info):  # type: ignore[arg-type]
        assert f"`{env}`" in text, f"{env} is not in docs/configuration.md"


def test_the_generated_tables_are_up_to_date() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert update(text) == text, "run: python -m fhir_consent.ops.configdoc --write " + str(DOC)
    assert main(["--check", str(DOC)]) == 0


def test_the_environment_names_are_the_ones_pydantic_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_CONSENT_SHUTDOWN_TIMEOUT", "12.5")
    monkeypatch.setenv("FHIR_CONSENT_LOG_FORMAT", "text")
    monkeypatch.setenv("FHIR_CONSENT_METRICS_TOKEN", "t0ken")
    settings = Settings()
    assert settings.shutdown_timeout == 12.5 and settings.log_format == "text"
    assert settings.metrics_token is not None
    assert settings.metrics_token.get_secret_value() == "t0ken"
    assert "`FHIR_CONSENT_BLOB_DIR`" in render()  # an alias is listed as such


def test_a_stale_reference_is_reported(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(DOC.read_text(encoding="utf-8").replace("FHIR_CONSENT_LOG_FORMAT", "X"))
    assert main(["--check", str(stale)]) == 1
    assert main(["--write", str(stale)]) == 0
    assert main(["--check", str(stale)]) == 0
