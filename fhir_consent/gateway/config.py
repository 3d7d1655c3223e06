"""Settings of gateway mode (prefix ``FHIR_CONSENT_GATEWAY_``; see ``docs/gateway.md``).

Gateway mode puts fhir-consent in front of an existing FHIR server (the *upstream*): reads and
searches of the forwarded types go to the upstream, and what comes back is filtered by our
consent engine and audited in our store. Kept apart from :class:`fhir_consent.config.Settings`
(as the ledger's and the document store's settings are).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fhir_consent.fhir.validation import SUPPORTED_TYPES

__all__ = ["DEFAULT_TYPES", "LOCAL_ONLY", "GatewaySettings"]

#: The patient data forwarded by default. The parties the consent engine resolves (Organization,
#: Practitioner, PractitionerRole, RelatedPerson) stay in our store with the Consents.
DEFAULT_TYPES: Final = ("DocumentReference", "Encounter", "Patient", "Provenance", "Task")
#: Never forwarded: the Consents and their ledger, our audit trail, our encrypted documents.
LOCAL_ONLY: Final = frozenset({"AuditEvent", "Binary", "Consent"})


class GatewaySettings(BaseSettings):
    """Where the upstream FHIR server is, how we authenticate to it, and what goes there."""

    model_config = SettingsConfigDict(
        env_prefix="FHIR_CONSENT_GATEWAY_", env_file=".env", extra="ignore"
    )

    upstream: str | None = Field(
        default=None,
        description="Base URL of the upstream FHIR server (https://ehr.example/fhir). Unset: "
        "no gateway mode",
    )
    types: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TYPES),
        description="Resource types whose reads and searches are forwarded to the upstream",
    )
    write_types: list[str] = Field(
        default_factory=list,
        description="Forwarded types whose creates, updates, patches and deletes are forwarded "
        "too (default none: refused with 405)",
    )
    token_file: Path | None = Field(
        default=None, description="File holding a static bearer token for the upstream"
    )
    token: SecretStr | None = Field(
        default=None, description="A static bearer token for the upstream (prefer token_file)"
    )
    client_id: str | None = Field(
        default=None,
        description="Our client id at the upstream's SMART server (backend services)",
    )
    key_file: Path | None = Field(
        default=None,
        description="The backend-services private key: a JWK (JSON, with its kid) or PEM",
    )
    key_id: str | None = Field(
        default=None, description="kid for a PEM key (default: its RFC 7638 thumbprint)"
    )
    token_url: str | None = Field(
        default=None,
        description="The upstream's token endpoint (default: from its "
        ".well-known/smart-configuration)",
    )
    scope: str = Field(
        default="system/*.rs", description="Scopes our backend-services client asks for"
    )
    timeout: float = Field(default=10.0, gt=0, le=300, description="Seconds per upstream call")
    connections: int = Field(default=32, ge=1, le=1000, description="Upstream connection pool")
    scan_limit: int = Field(
        default=2000,
        ge=10,
        le=100000,
        description="Upstream entries one of our search pages may examine before it returns a "
        "partial page (and for _summary=count: before the count is withheld)",
    )
    upstream_page_size: int = Field(
        default=100, ge=1, le=1000, description="_count we ask the upstream for"
    )
    page_key: SecretStr | None = Field(
        default=None,
        description="32+ byte secret (base64 or hex) sealing our paging tokens; shared by all "
        "workers. Unset: read from (or created in) keys_dir",
    )
    keys_dir: Path = Field(
        default=Path("./keys/gateway"), description="Where the paging key file lives"
    )
    page_lifetime: int = Field(
        default=3600, ge=60, le=86400, description="Seconds a next-page link stays valid"
    )

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("upstream must be an absolute http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError("upstream must be a base URL without query or fragment")
        return value.strip().rstrip("/")

    @field_validator("types", "write_types")
    @classmethod
    def _check_types(cls, value: list[str]) -> list[str]:
        out = [t.strip() for t in value if t.strip()]
        for t in out:
            if t not in SUPPORTED_TYPES:
                raise ValueError(f"{t[:40]} is not a resource type this server knows")
            if t in LOCAL_ONLY:
                raise ValueError(f"{t} always lives in our store and cannot be forwarded")
        return sorted(set(out))

    @model_validator(mode="after")
    def _check_credentials(self) -> GatewaySettings:
        if not set(self.write_types) <= set(self.types):
            raise ValueError("write_types must be forwarded types too")
        static = self.token is not None or self.token_file is not None
        backend = self.client_id is not None or self.key_file is not None
        if static and backend:
            raise ValueError("give either a static token or a backend-services client, not both")
        if backend and (self.client_id is None or self.key_file is None):
            raise ValueError("a backend-services client needs client_id and key_file")
        return self
