"""Settings of the document store (environment prefix ``FHIR_CONSENT_DOCUMENTS_``).

Every setting has a safe default so that a fresh checkout stores documents encrypted in its
database with a master key generated on first use. ``FHIR_CONSENT_BLOB_DIR`` (the name the
records-repository issue uses) is accepted as an alias of ``FHIR_CONSENT_DOCUMENTS_BLOB_DIR``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DocumentSettings"]

_MiB = 1024 * 1024


class DocumentSettings(BaseSettings):
    """Where and how document content (FHIR R4 Binary, binary.html) is stored and served."""

    model_config = SettingsConfigDict(
        env_prefix="FHIR_CONSENT_DOCUMENTS_",
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
    )

    blob_backend: Literal["auto", "db", "dir"] = Field(
        default="auto",
        description="Where encrypted content lives: 'db' (chunk rows in the database), 'dir' "
        "(one file per blob under blob_dir), or 'auto' ('dir' when blob_dir is set).",
    )
    blob_dir: Path | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "FHIR_CONSENT_DOCUMENTS_BLOB_DIR", "FHIR_CONSENT_BLOB_DIR", "blob_dir"
        ),
        description="Directory of the encrypted blob files (also FHIR_CONSENT_BLOB_DIR). Shared "
        "by all workers; it holds ciphertext only.",
    )
    spool_dir: Path | None = Field(
        default=None,
        description="No longer used: 'db' uploads stream into the database as they arrive and "
        "'dir' uploads spool under blob_dir/.spool. 'fhir-consent documents gc' still removes "
        "spool files older versions left here (the system temporary directory when unset).",
    )
    max_upload_bytes: int = Field(
        default=256 * _MiB,
        ge=1,
        le=2**31 - 1,  # Attachment.size is an unsignedInt (R4 datatypes.html)
        description="Largest raw Binary upload (POST/PUT Binary with the content's own type); "
        "larger bodies are refused with 413.",
    )
    max_json_upload_bytes: int = Field(
        default=32 * _MiB,
        ge=1024,
        description="Largest JSON body carrying base64 content (Binary or DocumentReference "
        "with inline attachment data), which is parsed in memory.",
    )
    chunk_size: int = Field(
        default=_MiB,
        ge=4096,
        le=16 * _MiB,
        description="Plaintext bytes per encrypted chunk (each chunk is authenticated on its own).",
    )
    verify_before_send: bool = Field(
        default=True,
        description="Authenticate every chunk of the requested bytes before sending the first "
        "byte (so a corrupt blob is answered with an OperationOutcome, never partial bytes). "
        "When false, each chunk is verified just before it is sent and the connection is "
        "aborted on a failure after the headers went out.",
    )
    verify_buffer_bytes: int = Field(
        default=16 * _MiB,
        ge=0,
        description="With verify_before_send, a download of at most this many bytes is "
        "decrypted once and sent from memory; larger ones are decrypted a second time while "
        "streaming, so memory per download stays below this bound either way.",
    )
    inline_data_max_bytes: int = Field(
        default=_MiB,
        ge=0,
        description="Largest content put inline as base64 Binary.data where a Binary is "
        "returned as FHIR JSON other than by GET Binary/[id] (write responses, search and "
        "history bundles, batch/transaction responses); larger content is left out and the "
        "Binary is tagged SUBSETTED (GET Binary/[id] streams any size).",
    )
    inline_data_budget_bytes: int = Field(
        default=16 * _MiB,
        ge=0,
        description="Total content one such response (e.g. a search page) puts inline; "
        "Binaries beyond it are tagged SUBSETTED without data.",
    )
    master_key_file: Path = Field(
        default=Path("./keys/documents/master-keys.json"),
        description="Master key ring file (created with a fresh key on first use, mode 0600). "
        "Keep it private, backed up apart from the database, and shared by all workers.",
    )
    master_keys: SecretStr | None = Field(
        default=None,
        description="Master keys as 'kid:base64key[,kid:base64key…]' (the first is active); "
        "overrides master_key_file.",
    )

    @property
    def backend(self) -> Literal["db", "dir"]:
        """The effective blob backend."""
        if self.blob_backend == "auto":
            return "dir" if self.blob_dir is not None else "db"
        return self.blob_backend

    def resolved_blob_dir(self) -> Path:
        """The blob directory of the 'dir' backend (``./blobs`` when unset)."""
        return self.blob_dir if self.blob_dir is not None else Path("./blobs")
