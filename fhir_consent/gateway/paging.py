"""Sealed paging tokens: our ``next`` links carry where the upstream scan stopped.

A token is a PyNaCl ``SecretBox`` (XSalsa20-Poly1305) over a small JSON state: the upstream URL
to fetch next (one the upstream itself sent, checked to lie under its base), how many of that
page's matches were already served, a digest of the search it continues and of the requester,
and an expiry. Sealed, not just signed: a caller can neither craft an upstream URL (anything
forged or altered fails to open) nor read the upstream's internal address out of the link, and
a link is useless to another requester or for another search.

The key is ``FHIR_CONSENT_GATEWAY_PAGE_KEY`` or ``{keys_dir}/paging.key`` (32 random bytes,
created on first use, safely across workers: written to a temporary file and linked into place).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.secret
import orjson

from fhir_consent.auth import AccessContext
from fhir_consent.gateway.config import GatewaySettings

__all__ = ["PageState", "Sealer", "load_page_key", "query_digest", "requester_digest"]

_KEY_LEN = nacl.secret.SecretBox.KEY_SIZE


@dataclass(frozen=True, slots=True)
class PageState:
    """Where the next page of a gateway search starts."""

    url: str  # the upstream page to (re)fetch
    skip: int  # matches of that page already served
    query: str  # query_digest of the search
    who: str  # requester_digest of the caller


def query_digest(rtype: str, applied: Sequence[tuple[str, str]]) -> str:
    """A digest of a search (type and its applied parameters, order kept)."""
    data = orjson.dumps([rtype, [list(p) for p in applied]])
    return hashlib.sha256(data).hexdigest()[:32]


def requester_digest(access: AccessContext) -> str:
    """A digest of who is asking (token subject, client, fhirUser, patient context)."""
    data = orjson.dumps(
        [
            access.subject,
            access.client_id,
            access.fhir_user,
            access.patient,
            access.client_organization,
        ]
    )
    return hashlib.sha256(data).hexdigest()[:32]


class Sealer:
    """Seals and opens :class:`PageState` tokens (URL-safe base64, no padding)."""

    def __init__(
        self, key: bytes, *, lifetime: int = 3600, clock: Callable[[], float] = time.time
    ) -> None:
        if len(key) != _KEY_LEN:
            raise ValueError("the paging key must be 32 bytes")
        self._box = nacl.secret.SecretBox(key)
        self.lifetime = lifetime
        self.clock = clock

    def __repr__(self) -> str:
        return "Sealer(***)"

    def seal(self, state: PageState) -> str:
        payload = orjson.dumps(
            {
                "u": state.url,
                "k": state.skip,
                "q": state.query,
                "w": state.who,
                "e": int(self.clock()) + self.lifetime,
            }
        )
        sealed = self._box.encrypt(payload)
        return base64.urlsafe_b64encode(bytes(sealed)).rstrip(b"=").decode("ascii")

    def open(self, token: str) -> PageState | None:
        """The state, or None when the token is forged, altered, expired or malformed."""
        if not token or len(token) > 8192:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            data: Any = orjson.loads(self._box.decrypt(raw))
        except (binascii.Error, ValueError, nacl.exceptions.CryptoError, orjson.JSONDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        url, skip, query, who, exp = (data.get(k) for k in ("u", "k", "q", "w", "e"))
        if not (
            isinstance(url, str)
            and isinstance(skip, int)
            and skip >= 0
            and isinstance(query, str)
            and isinstance(who, str)
            and isinstance(exp, int)
        ):
            return None
        if exp < self.clock():
            return None
        return PageState(url, skip, query, who)


def _decode_key(text: str) -> bytes:
    text = text.strip()
    for decode in (bytes.fromhex, base64.b64decode, base64.urlsafe_b64decode):
        try:
            key = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(key) >= _KEY_LEN:
            return hashlib.sha256(b"fhir-consent gateway paging\x00" + key).digest()
    raise ValueError("the paging key must be at least 32 bytes, in hex or base64")


def load_page_key(settings: GatewaySettings) -> bytes:
    """The paging key from the settings, else from ``keys_dir/paging.key`` (created once)."""
    if settings.page_key is not None:
        return _decode_key(settings.page_key.get_secret_value())
    directory = Path(settings.keys_dir)
    path = directory / "paging.key"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = directory / f".paging.key.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, base64.b64encode(secrets.token_bytes(_KEY_LEN)) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic: exactly one worker's key wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return _decode_key(path.read_text())
