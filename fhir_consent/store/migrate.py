"""Schema migrations with Alembic, configured in code so an installed package needs no ini file."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from fhir_consent.store.db import normalize_url

__all__ = ["alembic_config", "upgrade"]

_HERE = Path(__file__).resolve().parent


def alembic_config(url: str) -> Config:
    """An Alembic ``Config`` pointing at our migrations and the given database URL."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE / "migrations"))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(url), revision)
