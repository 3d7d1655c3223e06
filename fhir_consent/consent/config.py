"""Settings of the consent layer (environment prefix ``FHIR_CONSENT_``, like the server's)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ConsentSettings"]


class ConsentSettings(BaseSettings):
    """consent.md §3 deployment choices."""

    model_config = SettingsConfigDict(env_prefix="FHIR_CONSENT_", env_file=".env", extra="ignore")

    break_glass: bool = Field(
        default=False,
        description="Allow emergency access (purpose of use ETREAT, from the token or an "
        "X-Purpose-Of-Use header) where no explicit deny names the requester. Off by default; "
        "every such access is audited at once with the purpose (consent.md §3, break-glass).",
    )
    compiled_cache_size: int = Field(
        default=20_000,
        ge=0,
        description="Compiled Consent versions kept in memory per worker (keyed by id and "
        "version, so a new version is never served from the cache).",
    )
