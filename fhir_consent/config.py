"""Runtime configuration, read from the environment (prefix ``FHIR_CONSENT_``).

Every setting has a safe embedded default so that ``fhir-consent serve`` works on a fresh
machine with nothing configured: a SQLite file in the working directory and port 8000.
``docs/configuration.md`` is the reference for every variable.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """All runtime settings. Construct explicitly in tests; ``get_settings()`` elsewhere."""

    model_config = SettingsConfigDict(env_prefix="FHIR_CONSENT_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default="sqlite:///./fhir-consent.sqlite3",
        description="SQLAlchemy URL. sqlite:///path or postgresql+psycopg://user@host/db",
    )
    public_base_url: str | None = Field(
        default=None,
        description="Absolute FHIR base URL as clients see it (e.g. https://ehr.example/fhir). "
        "When unset it is derived from the request (Host, X-Forwarded-*) and the mount point.",
    )
    fhir_path: str = Field(default="/fhir", description="Path of the FHIR base inside the app")
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    auto_migrate: bool = Field(
        default=True, description="Run migrations at start-up (always safe for embedded SQLite)"
    )
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    default_page_size: int = Field(default=20, ge=1, le=1000)
    max_page_size: int = Field(default=1000, ge=1, le=10000)
    db_pool_size: int = Field(default=10, ge=1)
    log_level: str = "info"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the process environment, read once."""
    return Settings()
