"""Waves Enterprise engine: entries as type-12 v2 Data Transactions over the node REST API
(ledger.md §3; ``waves-enterprise-openapi.json``).

* ``POST /transactions/signAndBroadcast`` — the node signs with its keystore key (``sender``,
  optional keystore ``password``); each entry is one data entry
  ``{"key": "fc/<origin>/<seq>", "type": "binary", "value": "base64:<entry bytes>"}``, up to
  100 per transaction within the limits below.
* ``GET /transactions/info/{id}`` — the transaction with its ``height`` (404 until in a block);
  ``GET /transactions/unconfirmed/info/{id}`` — while it waits in the UTX pool;
  ``GET /blocks/height`` — the tip. Confirmed at ``height + k`` (k = ``confirmations``).
* ``GET /transactions/address/{address}/limit/{n}`` and ``GET /transactions/unconfirmed`` —
  to find a batch that was broadcast but whose reply was lost (:meth:`WavesEngine.find`).

Repeatability: a Data Transaction's id is a hash of its body, and the relay stores the body's
``timestamp`` before the first broadcast, so every re-send of a batch is the *same*
transaction, which the node accepts at most once.

Authentication: ``X-API-Key`` (``waves_api_key``) or ``Authorization: Bearer``
(``waves_bearer_token``). Node errors come as ``{"error": <int>, "message": "…"}`` and become
:class:`~.base.EngineRejected` with code ``waves-<int>``; 5xx, 429 and network errors become
:class:`~.base.EngineUnavailable`. Limits (ledger.md §3): ≤ 100 entries, key ≤ 100 characters,
value ≤ 32,767 bytes, transaction ≤ 153,600 bytes.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote

import httpx

from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.ledger.engines.base import (
    AnchorItem,
    EngineError,
    EngineProtocolError,
    EngineRejected,
    EngineUnavailable,
    PrepareContext,
    TxStatus,
)

__all__ = [
    "MAX_ENTRIES",
    "MAX_KEY_CHARS",
    "MAX_TX_BYTES",
    "MAX_VALUE_BYTES",
    "WavesEngine",
    "data_key",
    "encode_value",
]

MAX_ENTRIES: Final = 100
MAX_KEY_CHARS: Final = 100
MAX_VALUE_BYTES: Final = 32_767
MAX_TX_BYTES: Final = 153_600
#: Fixed part of a v2 Data Transaction (type, version, keys, timestamp, fee, proofs), generous.
_TX_OVERHEAD: Final = 1_024
_FIND_DEPTH: Final = 1_000


def data_key(origin: str, seq: int) -> str:
    """``fc/<origin>/<seq>`` (ledger.md §3)."""
    return f"fc/{origin}/{seq}"


def encode_value(data: bytes) -> str:
    """A binary data-entry value: ``base64:<standard base64>``."""
    return "base64:" + base64.b64encode(data).decode("ascii")


def _decode_value(value: object) -> bytes | None:
    if not isinstance(value, str) or not value.startswith("base64:"):
        return None
    try:
        return base64.b64decode(value[7:], validate=True)
    except (binascii.Error, ValueError):
        return None


def _entry_size(key: str, data: bytes) -> int:
    # key length (2) + key + type (1) + value length (2) + value
    return 2 + len(key.encode()) + 1 + 2 + len(data)


class WavesEngine:
    """:class:`~fhir_consent.ledger.engines.base.LedgerEngine` for a Waves Enterprise node."""

    name = "waves"

    def __init__(
        self,
        base_url: str,
        *,
        origin: str,
        sender: str,
        api_key: str | None = None,
        bearer_token: str | None = None,
        password: str | None = None,
        fee: int = 5_000_000,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
        clock_ms: Any = None,
    ) -> None:
        if len(data_key(origin, 2**53)) > MAX_KEY_CHARS:
            raise EngineError("origin too long for Waves data keys", code="config")
        headers = {"Accept": "application/json"}
        if api_key:
            headers["X-API-Key"] = api_key
        if bearer_token:
            headers["Authorization"] = f"Bearer {bearer_token}"
        self._client = client or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)
        self._headers = headers
        self.origin = origin
        self.sender = sender
        self._password = password
        self.fee = fee
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)

    @classmethod
    def from_settings(cls, settings: LedgerSettings, origin: str) -> WavesEngine:
        if not settings.waves_url or not settings.waves_sender:
            raise EngineError("waves engine needs waves_url and waves_sender", code="config")
        return cls(
            settings.waves_url,
            origin=origin,
            sender=settings.waves_sender,
            api_key=settings.waves_api_key.get_secret_value() if settings.waves_api_key else None,
            bearer_token=(
                settings.waves_bearer_token.get_secret_value()
                if settings.waves_bearer_token
                else None
            ),
            password=(
                settings.waves_password.get_secret_value() if settings.waves_password else None
            ),
            fee=settings.waves_fee,
            timeout=settings.request_timeout,
        )

    # -- HTTP --------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None, *, allow_404: bool = False) -> Any:
        try:
            resp = self._client.request(method, path, json=body, headers=self._headers)
        except httpx.TimeoutException:
            raise EngineUnavailable("Waves node timed out", code="timeout") from None
        except httpx.TransportError:
            raise EngineUnavailable("Waves node unreachable", code="unreachable") from None
        if resp.status_code == 404 and allow_404:
            return None
        if resp.status_code >= 500 or resp.status_code == 429:
            raise EngineUnavailable(
                f"Waves node answered {resp.status_code}", code=f"http-{resp.status_code}"
            )
        try:
            doc = resp.json()
        except ValueError:
            raise EngineProtocolError(
                f"Waves node answered {resp.status_code} without JSON", code="bad-json"
            ) from None
        failed = isinstance(doc, dict) and "error" in doc and "id" not in doc
        if resp.status_code >= 400 or failed:
            error = doc.get("error") if isinstance(doc, dict) else None
            message = doc.get("message") if isinstance(doc, dict) else None
            code = f"waves-{error}" if isinstance(error, int) else f"http-{resp.status_code}"
            raise EngineRejected(f"Waves node error {code}: {str(message)[:160]}", code=code)
        return doc

    # -- the protocol ------------------------------------------------------------------------

    def fit(self, items: Sequence[AnchorItem]) -> int:
        total = _TX_OVERHEAD
        for n, item in enumerate(items[:MAX_ENTRIES]):
            key = data_key(self.origin, item.seq)
            if len(item.data) > MAX_VALUE_BYTES or len(key) > MAX_KEY_CHARS:
                return n
            total += _entry_size(key, item.data)
            if total > MAX_TX_BYTES:
                return n
        return min(len(items), MAX_ENTRIES)

    def prepare(
        self, items: Sequence[AnchorItem], context: PrepareContext | None = None
    ) -> dict[str, Any]:
        return {"timestamp": int(self._clock_ms())}

    def transaction(self, items: Sequence[AnchorItem], params: Mapping[str, Any]) -> dict[str, Any]:
        """The ``signAndBroadcast`` body of a batch (ledger.md §3)."""
        tx: dict[str, Any] = {
            "type": 12,
            "version": 2,
            "sender": self.sender,
            "author": self.sender,
            "fee": self.fee,
            "feeAssetId": None,
            "timestamp": int(params["timestamp"]),
            "data": [
                {
                    "key": data_key(self.origin, item.seq),
                    "type": "binary",
                    "value": encode_value(item.data),
                }
                for item in items
            ],
        }
        if self._password:
            tx["password"] = self._password
        return tx

    def publish(self, items: Sequence[AnchorItem], params: Mapping[str, Any]) -> str:
        doc = self._call("POST", "/transactions/signAndBroadcast", self.transaction(items, params))
        txid = doc.get("id") if isinstance(doc, dict) else None
        if not isinstance(txid, str) or not txid:
            raise EngineProtocolError("signAndBroadcast returned no transaction id", code="no-id")
        return txid

    def _ours(self, tx: object, key: str) -> str | None:
        if not isinstance(tx, dict) or tx.get("type") != 12:
            return None
        data = tx.get("data")
        if isinstance(data, list) and any(
            isinstance(d, dict) and d.get("key") == key for d in data
        ):
            txid = tx.get("id")
            return txid if isinstance(txid, str) else None
        return None

    def find(self, items: Sequence[AnchorItem], params: Mapping[str, Any]) -> str | None:
        if not items:
            return None
        key = data_key(self.origin, items[0].seq)
        pool = self._call("GET", "/transactions/unconfirmed")
        for tx in pool if isinstance(pool, list) else []:
            if (txid := self._ours(tx, key)) is not None:
                return txid
        seen = 0
        for page in self._pages():
            for tx in page:
                if (txid := self._ours(tx, key)) is not None:
                    return txid
            seen += len(page)
            if seen >= _FIND_DEPTH:
                break
        return None

    def tip(self) -> int:
        doc = self._call("GET", "/blocks/height")
        height = doc.get("height") if isinstance(doc, dict) else None
        if not isinstance(height, int):
            raise EngineProtocolError("/blocks/height returned no height", code="no-height")
        return height

    def status(self, txid: str) -> TxStatus:
        path = quote(txid, safe="")
        doc = self._call("GET", f"/transactions/info/{path}", allow_404=True)
        if isinstance(doc, dict) and isinstance(doc.get("height"), int):
            return TxStatus(True, int(doc["height"]), self.tip())
        pending = self._call("GET", f"/transactions/unconfirmed/info/{path}", allow_404=True)
        return TxStatus(pending is not None, None, self.tip())

    def _decode_tx(self, doc: Mapping[str, Any]) -> dict[int, bytes]:
        prefix = f"fc/{self.origin}/"
        out: dict[int, bytes] = {}
        for item in doc.get("data") or []:
            if not isinstance(item, dict):
                continue
            key = item.get("key")
            if not isinstance(key, str) or not key.startswith(prefix):
                continue
            seq_text = key[len(prefix) :]
            value = _decode_value(item.get("value"))
            if seq_text.isdigit() and value is not None:
                out[int(seq_text)] = value
        return out

    def fetch(self, txid: str) -> dict[int, bytes]:
        doc = self._call("GET", f"/transactions/info/{quote(txid, safe='')}", allow_404=True)
        return self._decode_tx(doc) if isinstance(doc, dict) else {}

    def _pages(self) -> Iterator[list[Any]]:
        after: str | None = None
        sender = quote(self.sender, safe="")
        while True:
            path = f"/transactions/address/{sender}/limit/100"
            if after:
                path += f"?after={quote(after, safe='')}"
            page = self._call("GET", path)
            if isinstance(page, list) and page and isinstance(page[0], list):
                page = page[0]  # the node wraps the list in a list
            if not isinstance(page, list) or not page:
                return
            yield page
            last = page[-1].get("id") if isinstance(page[-1], dict) else None
            if not isinstance(last, str) or len(page) < 100:
                return
            after = last

    def scan(self) -> Iterator[tuple[str, dict[int, bytes]]]:
        """Every confirmed Data Transaction of ours: ``(txid, {seq: entry})``, newest first."""
        for page in self._pages():
            for tx in page:
                if isinstance(tx, dict) and tx.get("type") == 12 and isinstance(tx.get("id"), str):
                    entries = self._decode_tx(tx)
                    if entries:
                        yield tx["id"], entries

    def close(self) -> None:
        self._client.close()
