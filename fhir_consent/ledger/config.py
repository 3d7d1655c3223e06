"""Settings of the permissions ledger (ledger.md §2–§3), read from ``FHIR_CONSENT_LEDGER_*``.

Kept apart from :class:`fhir_consent.config.Settings` so the ledger can be configured (and
tested) on its own; :func:`fhir_consent.ledger.api.install` takes one of these.

The key ring comes from ``keys_dir`` (files written by ``fhir-consent keys init``) unless
``FHIR_CONSENT_SIGNING_KEY`` and friends are set in the environment
(:meth:`fhir_consent.crypto.KeyRing.from_env`), which production deployments with a secret
store should prefer.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_ORIGIN", "LedgerSettings", "default_origin"]

#: Checkpoint origin when neither ``origin`` nor a public base URL is configured.
DEFAULT_ORIGIN = "fhir-consent.local/ledger"


def default_origin(public_base_url: str | None) -> str:
    """``<host>/ledger`` of the public FHIR base URL, else :data:`DEFAULT_ORIGIN`.

    The origin names the log in every checkpoint (c2sp.org/tlog-checkpoint "origin") and in
    every Waves data key (``fc/<origin>/<seq>``, ledger.md §3), so it must stay stable for
    the life of the log.
    """
    if public_base_url:
        host = urlsplit(public_base_url).hostname
        if host:
            return f"{host}/ledger"
    return DEFAULT_ORIGIN


class LedgerSettings(BaseSettings):
    """All ledger settings. Construct explicitly in tests; from the environment elsewhere."""

    model_config = SettingsConfigDict(
        env_prefix="FHIR_CONSENT_LEDGER_", env_file=".env", extra="ignore"
    )

    enabled: bool = Field(default=True, description="Write a ledger entry for every change")
    keys_dir: str = Field(
        default="./keys/ledger",
        description="Key directory (fhir-consent keys init). Ignored when FHIR_CONSENT_SIGNING_KEY"
        " is set in the environment.",
    )
    auto_init_keys: bool = Field(
        default=True,
        description="Create a fresh key ring in keys_dir when it has none, so a fresh install "
        "serves at once; production sets false and provisions keys with `keys init`",
    )
    origin: str | None = Field(
        default=None,
        description="Checkpoint origin / log name; default <public base URL host>/ledger, else "
        f"{DEFAULT_ORIGIN}. Must never change for an existing log.",
        max_length=64,
    )
    public_checkpoints: bool = Field(
        default=True,
        description="Serve $ledger-checkpoint and $ledger-consistency without a token (they "
        "carry no personal data; witnesses need them)",
    )
    engine: str = Field(
        default="embedded",
        pattern=r"^[a-z][a-z0-9_.-]{0,31}$",
        description="External ledger the relay anchors entries on, by name in the "
        "fhir_consent.ledger_engines entry-point group: embedded (none), waves, evm, or a "
        "third-party engine (docs/ledger-engines.md)",
    )
    engine_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings of a third-party engine (JSON object; the built-in engines "
        "have their own fields below)",
    )
    relay_in_process: bool = Field(
        default=True,
        description="Run the relay as a background thread of each server worker (a lease keeps "
        "one active); set false when running `fhir-consent ledger relay` separately",
    )
    confirmations: int = Field(
        default=1, ge=0, description="k: an anchored entry is confirmed at height + k blocks"
    )
    batch_size: int = Field(default=100, ge=1, le=100, description="Entries per transaction")
    poll_interval: float = Field(default=0.5, gt=0, description="Relay idle poll, seconds")
    backoff_initial: float = Field(default=0.5, gt=0, description="First retry delay, seconds")
    backoff_max: float = Field(default=30.0, gt=0, description="Longest retry delay, seconds")
    resend_after: float = Field(
        default=120.0,
        gt=0,
        description="Re-broadcast a sent transaction the node no longer knows after this long",
    )
    lease_ttl: float = Field(default=15.0, gt=0, description="Relay lease lifetime, seconds")
    request_timeout: float = Field(default=10.0, gt=0, description="Node HTTP timeout, seconds")

    # -- Waves Enterprise (ledger.md §3) ------------------------------------------------------
    waves_url: str | None = Field(default=None, description="Node REST API base URL")
    waves_api_key: SecretStr | None = Field(default=None, description="X-API-Key of the node")
    waves_bearer_token: SecretStr | None = Field(
        default=None, description="OAuth bearer token (instead of the API key)"
    )
    waves_sender: str | None = Field(default=None, description="Node keystore address")
    waves_password: SecretStr | None = Field(default=None, description="Keystore password")
    waves_fee: int = Field(default=5_000_000, ge=0, description="Data Transaction fee")

    # -- EVM (ledger.md §3) -------------------------------------------------------------------
    evm_url: str | None = Field(default=None, description="JSON-RPC URL of the node")
    evm_account: str | None = Field(
        default=None, description="Unlocked sender account (default: the node's first account)"
    )
    evm_max_batch_bytes: int = Field(default=96 * 1024, ge=4096, description="Calldata cap")
    evm_send: Literal["auto", "unlocked", "raw"] = Field(
        default="auto",
        description="unlocked: eth_sendTransaction from an account the node holds (Anvil's dev "
        "accounts); raw: sign locally and send with eth_sendRawTransaction (Besu and other "
        "permissioned nodes); auto: raw when a private key is configured, else unlocked",
    )
    evm_private_key: SecretStr | None = Field(
        default=None,
        description="secp256k1 private key (0x + 64 hex digits) of the sending account, for "
        "raw sending; prefer evm_private_key_file",
    )
    evm_private_key_file: str | None = Field(
        default=None,
        description="File (mode 0600) holding the private key as hex, or an encrypted JSON "
        "keystore (V3) unlocked with evm_keystore_password",
    )
    evm_keystore_password: SecretStr | None = Field(
        default=None, description="Password of the JSON keystore in evm_private_key_file"
    )
    evm_chain_id: int | None = Field(
        default=None,
        ge=1,
        description="Expected chain id; the node's eth_chainId is used and must equal it when "
        "set (a guard against signing for the wrong network)",
    )
    evm_tx_type: Literal["auto", "legacy", "eip1559"] = Field(
        default="auto",
        description="Raw transaction type: eip1559 (type 2) when the chain has a base fee, "
        "else legacy (free-gas QBFT networks)",
    )
    evm_gas_price: int | None = Field(
        default=None,
        ge=0,
        description="Legacy gas price in wei (default: the node's eth_gasPrice; 0 on free-gas "
        "networks)",
    )
    evm_priority_fee: int | None = Field(
        default=None,
        ge=0,
        description="EIP-1559 priority fee in wei (default: eth_maxPriorityFeePerGas, else 0)",
    )

    @field_validator("origin")
    @classmethod
    def _check_origin(cls, value: str | None) -> str | None:
        if value is not None and (
            not value or any(c.isspace() or c == "+" or ord(c) < 0x20 for c in value)
        ):
            raise ValueError("origin must be non-empty, without spaces or '+'")
        return value

    def resolved_origin(self, public_base_url: str | None = None) -> str:
        """The configured origin, or :func:`default_origin` of the public base URL."""
        return self.origin or default_origin(public_base_url)
