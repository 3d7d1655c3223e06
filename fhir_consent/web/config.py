"""Settings of the patient web app and its live-updates stream (prefix ``FHIR_CONSENT_WEB_``).

Kept apart from :class:`fhir_consent.config.Settings` (as the ledger and document settings are)
so :func:`fhir_consent.web.install` can be configured and tested on its own.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_CLIENT_ID", "DEFAULT_SCOPE", "WebSettings"]

#: The client id the app uses unless configured (``fhir-consent demo`` registers it).
DEFAULT_CLIENT_ID = "fhir-consent-patient-app"
#: SMART v2 scopes: read the patient's compartment, and update Consents (grant, refuse,
#: revoke). Nothing else is ever written by the app.
DEFAULT_SCOPE = "openid fhirUser launch/patient patient/*.rs patient/Consent.u"


class WebSettings(BaseSettings):
    """The patient app (``/app``) and the ``$events`` stream."""

    model_config = SettingsConfigDict(
        env_prefix="FHIR_CONSENT_WEB_", env_file=".env", extra="ignore"
    )

    enabled: bool = Field(default=True, description="Serve the patient app at app_path")
    app_path: str = Field(default="/app", description="Where the patient app is served")
    client_id: str = Field(
        default=DEFAULT_CLIENT_ID,
        description="The app's SMART client id (a public client whose redirect URI is "
        "<origin><app_path>/; `fhir-consent demo` registers it)",
    )
    scope: str = Field(default=DEFAULT_SCOPE, description="The scopes the app asks for")
    events_poll_interval: float = Field(
        default=0.5,
        gt=0,
        le=10,
        description="Seconds between two database polls of one $events stream (new rows are "
        "found by polling, so it works across several workers)",
    )
    events_heartbeat: float = Field(
        default=15.0, gt=0, description="Seconds between keep-alive comments on a quiet stream"
    )
    events_recheck: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between re-validations of the stream's access token (expiry); "
        "revocation is checked on every poll",
    )
    events_settle: float = Field(
        default=5.0,
        ge=0,
        description="Seconds a row may take to become visible after rows with higher "
        "sequence numbers (concurrent PostgreSQL transactions commit out of order)",
    )
