"""Runtime configuration, read from the environment (prefix ``FHIR_CONSENT_``).

Every setting has a safe embedded default so that ``fhir-consent serve`` works on a fresh
machine with nothing configured: a SQLite file in the working directory and port 8000.
``docs/configuration.md`` is the reference for every variable.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator
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
        "When unset it is derived from the request (Host, the mount point, and X-Forwarded-* "
        "from trusted_proxies only).",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or CIDR networks of reverse proxies whose X-Forwarded-Proto, "
        "-Host, -Port, -Prefix and -For headers set the public URL and client address. "
        "Empty (the default): those headers are ignored. See docs/mounting.md.",
    )
    fhir_path: str = Field(
        default="/fhir",
        description="Path of the FHIR base inside the app ('' when a host app mounts the "
        "app at the FHIR base itself)",
    )
    host: str = Field(default="127.0.0.1", description="Interface fhir-consent serve binds")
    port: int = Field(default=8000, description="Port fhir-consent serve listens on")
    workers: int = Field(
        default=1,
        description="Worker processes of fhir-consent serve (use PostgreSQL for more than one)",
    )
    auto_migrate: bool = Field(
        default=True, description="Run migrations at start-up (always safe for embedded SQLite)"
    )
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest request body (413 above it)"
    )
    default_page_size: int = Field(
        default=20, ge=1, le=1000, description="Search page size when _count is not given"
    )
    max_page_size: int = Field(
        default=1000, ge=1, le=10000, description="Largest _count a search may ask for"
    )
    db_pool_size: int = Field(
        default=10,
        ge=1,
        description="Database work of requests running at once in worker threads; the pool "
        "keeps this many connections plus 4 (audit writer, ledger relay), without overflow",
    )
    sqlite_commit_delay_ms: float = Field(
        default=1.0,
        ge=0,
        le=50,
        description="SQLite group commit: how long a group of writes waits for more before it "
        "commits, when writes are arriving concurrently (PostgreSQL's commit_delay); a lone "
        "write never waits. 0 turns it off",
    )
    log_level: str = Field(
        default="info", description="debug, info, warning or error (libraries: warning at least)"
    )

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

    # -- operations (fhir_consent.ops; docs/operations.md) ------------------------------------
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="Log lines as one JSON object each (json) or as plain text (text). Either "
        "way no log line carries patient data: requests are logged by route template, "
        "exception messages are never logged (docs/operations.md, Logs).",
    )
    access_log: bool = Field(
        default=True,
        description="One log line per request (request id, method, route template, status, "
        "duration); health and metrics probes are logged at debug level",
    )
    trust_request_id: bool = Field(
        default=True,
        description="Reuse a well-formed incoming X-Request-ID (8-64 characters of "
        "[A-Za-z0-9._-], as a proxy sets it) instead of generating one",
    )
    metrics_enabled: bool = Field(
        default=True, description="Serve Prometheus metrics at /metrics (404 when false)"
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="When set, /metrics needs 'Authorization: Bearer <token>' (from anywhere). "
        "When unset, /metrics answers only direct loopback clients (no X-Forwarded-For / "
        "Forwarded header), so a reverse proxy never exposes it.",
    )
    metrics_dir: str | None = Field(
        default=None,
        description="Directory of prometheus-client's multiprocess files when serving with "
        "several workers (PROMETHEUS_MULTIPROC_DIR); a fresh temporary directory when unset. "
        "Emptied at start-up.",
    )
    ready_max_outbox_backlog: int = Field(
        default=10_000,
        ge=0,
        description="/readyz answers 503 when more ledger entries than this wait in the "
        "outbox for the external ledger (pending or sent, not yet confirmed)",
    )
    ready_timeout: float = Field(
        default=2.0, gt=0, le=60, description="Seconds /readyz waits for the database"
    )
    shutdown_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a stopping worker (SIGTERM) waits for in-flight requests before "
        "it cancels them; queued audit events are written after that, in every case",
    )
    worker_healthcheck_timeout: int = Field(
        default=30,
        ge=1,
        description="Seconds the serve supervisor waits for a worker to answer its health ping "
        "before it kills and replaces the worker (several workers only; uvicorn's default of 5 "
        "kills workers that start slowly on a loaded machine)",
    )
    audit_flush_interval: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="Seconds between two batched writes of read/search AuditEvents (the "
        "queue is flushed at shutdown): how far the patient's access log may lag behind under "
        "load, and the window in which repeats of one access are one AuditEvent. Shorter "
        "means more AuditEvents for a polling client, and a writer that costs each read more",
    )
    audit_coalesce: bool = Field(
        default=True,
        description="One AuditEvent for the repeats of the same read or search within one "
        "batched write (same caller, token, purpose, resources, outcome and deciding Consents), "
        "with the number of accesses and the period from the first to the last. false: one "
        "AuditEvent per request",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError("trusted_proxies takes IP addresses or CIDR networks") from None
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the process environment, read once."""
    return Settings()
