"""Runtime configuration, read from the environment (prefix ``FHIR_CONSENT_``).

Every setting has a safe embedded default so that ``fhir-consent serve`` works on a fresh
machine with nothing configured: a SQLite file in the working directory and port 8000.
``docs/configuration.md`` is the reference for every variable.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr
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

    # -- SMART App Launch 2.2 authorization server (smart_on_fhir) ----------------------------
    open_access: bool = Field(
        default=False,
        description="Serve the FHIR API without tokens. LOCAL DEVELOPMENT ONLY: anyone can "
        "read and write everything. Off by default.",
    )
    smart_auth_path: str = Field(
        default="/auth", description="Path of the authorization server endpoints in the app"
    )
    smart_public_auth_url: str | None = Field(
        default=None,
        description="Absolute URL of the authorization server as clients see it. When unset "
        "it is derived from the FHIR base (its origin plus smart_auth_path).",
    )
    smart_issuer: str | None = Field(
        default=None,
        description="OpenID Connect issuer and access-token iss. When unset it is the FHIR base.",
    )
    smart_keys_dir: str = Field(
        default="./keys/smart",
        description="Directory of the signing keys (fhir-consent keys init --smart). Created "
        "with fresh keys on first use when missing; keep it private and shared by all workers.",
    )
    smart_jwks: SecretStr | None = Field(
        default=None,
        description="Private JWK Set (JSON) of the signing keys; overrides smart_keys_dir.",
    )
    access_token_lifetime: int = Field(
        default=3600, ge=60, le=3600, description="Seconds; SMART: at most one hour"
    )
    backend_token_lifetime: int = Field(
        default=300, ge=30, le=300, description="Seconds, for client_credentials; at most 5 min"
    )
    refresh_token_lifetime: int = Field(
        default=30 * 24 * 3600, ge=300, description="Seconds, for offline_access refresh tokens"
    )
    online_refresh_token_lifetime: int = Field(
        default=12 * 3600, ge=300, description="Seconds, for online_access refresh tokens"
    )
    authorization_code_lifetime: int = Field(
        default=60, ge=10, le=600, description="Seconds; SMART: about one minute, single use"
    )
    login_max_failures: int = Field(
        default=5, ge=1, description="Failed logins per user and client IP within the window"
    )
    login_window: int = Field(default=900, ge=10, description="Seconds of the login window")
    smart_insecure_transport: bool = Field(
        default=False,
        description="Accept plain-http OAuth requests from non-loopback hosts (development and "
        "tests only). https, http://127.0.0.1 and http://localhost always work; behind a TLS "
        "proxy set public_base_url instead.",
    )
    dynamic_registration: bool = Field(
        default=True,
        description="RFC 7591 registration endpoint for user-facing apps (never for "
        "client_credentials); see registration_token",
    )
    registration_token: SecretStr | None = Field(
        default=None,
        description="When set, dynamic registration needs 'Authorization: Bearer <token>'",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Extra origins allowed to call the token endpoint and the FHIR API "
        "(registered clients' redirect origins are always allowed)",
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the process environment, read once."""
    return Settings()
