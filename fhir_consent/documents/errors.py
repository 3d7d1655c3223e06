"""Failures of the document store. Messages never contain content or key material.

    DocumentError
    ├── IntegrityFailure    stored ciphertext failed authentication, is truncated or missing
    ├── ContentDestroyed    the content's data key was shredded: it is unrecoverable
    ├── StorageFull         the blob (or spool) file system has no space left
    └── MasterKeyError      the master key ring is missing, malformed or lacks a key id

The HTTP layer answers :class:`IntegrityFailure` with a 500 OperationOutcome (after logging it),
:class:`ContentDestroyed` with 410 Gone and :class:`StorageFull` with 507 Insufficient Storage
(RFC 4918 §11.5; nothing was recorded, the upload can be repeated once space is freed).
"""

from __future__ import annotations

__all__ = ["ContentDestroyed", "DocumentError", "IntegrityFailure", "MasterKeyError", "StorageFull"]


class DocumentError(Exception):
    """Root of the document store's errors."""


class IntegrityFailure(DocumentError):
    """Stored content did not authenticate (corrupt, reordered, truncated or missing chunk).

    Carries only identifiers: the blob id and the chunk index (-1 for the blob as a whole).
    """

    def __init__(self, blob_id: str, chunk: int = -1) -> None:
        super().__init__(f"integrity failure in blob {blob_id} chunk {chunk}")
        self.blob_id = blob_id
        self.chunk = chunk


class ContentDestroyed(DocumentError):
    """The content was crypto-shredded (its data key no longer exists)."""


class StorageFull(DocumentError):
    """Writing content failed for want of space (ENOSPC) or quota (EDQUOT)."""

    def __init__(self, errno_name: str) -> None:
        super().__init__(f"no space left for document content ({errno_name})")
        self.errno_name = errno_name


class MasterKeyError(DocumentError):
    """The master key ring cannot be used (the message names the file or variable, never a
    key)."""
