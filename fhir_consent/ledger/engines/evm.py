"""EVM engine: entries as the calldata of zero-value self-transactions over JSON-RPC
(ledger.md §3 "EVM"; Ethereum JSON-RPC ``eth_*`` methods).

A batch is one transaction from the configured account to itself, value 0, whose ``data`` is::

    b"FCL1" || u16 len(origin) || origin || (u32 len(entry) || entry bytes)*

sent with ``eth_sendTransaction`` (an unlocked account, as Anvil's dev accounts or a node with
a keystore; Besu with locally signed ``eth_sendRawTransaction`` is a later addition behind the
same protocol). It is confirmed by ``eth_getTransactionReceipt`` once ``k`` blocks sit on top.

Repeatability: the relay stores the batch's ``nonce`` before the first broadcast. The same
account and nonce can be mined at most once, so a re-send either is the same transaction
("already known", "nonce too low") or, if the first never left, goes out now. After a crash
:meth:`EvmEngine.find` scans the blocks since the batch was prepared for the account's
transaction with that nonce.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import httpx

from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.ledger.engines.base import (
    AnchorItem,
    EngineError,
    EngineProtocolError,
    EngineRejected,
    EngineUnavailable,
    StaleParameters,
    TxStatus,
    register_engine,
)

__all__ = ["MAGIC", "MAX_ENTRIES", "EvmEngine", "decode_batch", "encode_batch"]

MAGIC: Final = b"FCL1"
MAX_ENTRIES: Final = 100
_NONCE_TOO_LOW: Final = ("nonce too low", "nonce is too low", "already been used")
_KNOWN: Final = ("already known", "already imported", "known transaction")


def encode_batch(origin: str, items: Sequence[AnchorItem]) -> bytes:
    """The calldata of a batch (see the module docstring)."""
    o = origin.encode()
    parts = [MAGIC, struct.pack(">H", len(o)), o]
    for item in items:
        parts.append(struct.pack(">I", len(item.data)))
        parts.append(item.data)
    return b"".join(parts)


def decode_batch(data: bytes) -> tuple[str, list[bytes]] | None:
    """``(origin, [entry bytes])`` of our calldata, or None for anything else."""
    if not data.startswith(MAGIC) or len(data) < 6:
        return None
    (olen,) = struct.unpack_from(">H", data, 4)
    pos = 6 + olen
    if pos > len(data):
        return None
    try:
        origin = data[6:pos].decode()
    except UnicodeDecodeError:
        return None
    out: list[bytes] = []
    while pos < len(data):
        if pos + 4 > len(data):
            return None
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + n > len(data):
            return None
        out.append(data[pos : pos + n])
        pos += n
    return origin, out


def _hex(n: int) -> str:
    return hex(n)


def _int(value: object, what: str) -> int:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise EngineProtocolError(f"{what} is not a hex quantity", code="bad-quantity")
    return int(value, 16)


def _seq_of(entry: bytes) -> int | None:
    # entries are canonical JSON with sorted keys; parse properly rather than slicing
    import orjson

    try:
        obj = orjson.loads(entry)
    except orjson.JSONDecodeError:
        return None
    seq = obj.get("seq") if isinstance(obj, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


class EvmEngine:
    """:class:`~fhir_consent.ledger.engines.base.LedgerEngine` over Ethereum JSON-RPC."""

    name = "evm"

    def __init__(
        self,
        url: str,
        *,
        origin: str,
        account: str | None = None,
        max_batch_bytes: int = 96 * 1024,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
    ) -> None:
        self._client = client or httpx.Client(timeout=timeout)
        self._url = url
        self.origin = origin
        self._account = account.lower() if account else None
        self.max_batch_bytes = max_batch_bytes
        self._ids = itertools.count(1)

    @classmethod
    def from_settings(cls, settings: LedgerSettings, origin: str) -> EvmEngine:
        if not settings.evm_url:
            raise EngineError("evm engine needs evm_url", code="config")
        return cls(
            settings.evm_url,
            origin=origin,
            account=settings.evm_account,
            max_batch_bytes=settings.evm_max_batch_bytes,
            timeout=settings.request_timeout,
        )

    # -- JSON-RPC ----------------------------------------------------------------------------

    def rpc(self, method: str, *params: Any) -> Any:
        """One JSON-RPC 2.0 call; node errors become :class:`EngineRejected` (``rpc-<code>``)."""
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": list(params)}
        try:
            resp = self._client.post(self._url, json=body)
        except httpx.TimeoutException:
            raise EngineUnavailable("EVM node timed out", code="timeout") from None
        except httpx.TransportError:
            raise EngineUnavailable("EVM node unreachable", code="unreachable") from None
        if resp.status_code >= 500 or resp.status_code == 429:
            raise EngineUnavailable(
                f"EVM node answered {resp.status_code}", code=f"http-{resp.status_code}"
            )
        try:
            doc = resp.json()
        except ValueError:
            raise EngineProtocolError("EVM node answered without JSON", code="bad-json") from None
        if not isinstance(doc, dict):
            raise EngineProtocolError("EVM node answered a non-object", code="bad-json")
        error = doc.get("error")
        if error is not None:
            code = error.get("code") if isinstance(error, dict) else None
            message = str(error.get("message") if isinstance(error, dict) else error)
            lowered = message.lower()
            if any(s in lowered for s in _NONCE_TOO_LOW):
                raise StaleParameters("nonce already used", code="nonce-too-low")
            if any(s in lowered for s in _KNOWN):
                raise EngineRejected("transaction already known", code="already-known")
            raise EngineRejected(f"EVM node error {code}: {message[:160]}", code=f"rpc-{code}")
        if resp.status_code >= 400:
            raise EngineRejected(f"EVM node answered {resp.status_code}", code="http-error")
        return doc.get("result")

    @property
    def account(self) -> str:
        """The sending account: configured, or the node's first unlocked account."""
        if self._account is None:
            accounts = self.rpc("eth_accounts")
            if not isinstance(accounts, list) or not accounts or not isinstance(accounts[0], str):
                raise EngineError("the EVM node has no unlocked account", code="config")
            self._account = accounts[0].lower()
        return self._account

    def tip(self) -> int:
        return _int(self.rpc("eth_blockNumber"), "eth_blockNumber")

    # -- the protocol ------------------------------------------------------------------------

    def fit(self, items: Sequence[AnchorItem]) -> int:
        size = 6 + len(self.origin.encode())
        for n, item in enumerate(items[:MAX_ENTRIES]):
            size += 4 + len(item.data)
            if size > self.max_batch_bytes:
                return n
        return min(len(items), MAX_ENTRIES)

    def prepare(self, items: Sequence[AnchorItem]) -> dict[str, Any]:
        account = self.account
        nonce = _int(self.rpc("eth_getTransactionCount", account, "pending"), "nonce")
        return {"nonce": nonce, "from_block": self.tip(), "account": account}

    def publish(self, items: Sequence[AnchorItem], params: Mapping[str, Any]) -> str:
        account = str(params.get("account") or self.account)
        tx = {
            "from": account,
            "to": account,
            "value": "0x0",
            "data": "0x" + encode_batch(self.origin, items).hex(),
            "nonce": _hex(int(params["nonce"])),
        }
        txid = self.rpc("eth_sendTransaction", tx)
        if not isinstance(txid, str) or not txid.startswith("0x"):
            raise EngineProtocolError("eth_sendTransaction returned no hash", code="no-hash")
        return txid

    def _block(self, number: int) -> dict[str, Any] | None:
        block = self.rpc("eth_getBlockByNumber", _hex(number), True)
        return block if isinstance(block, dict) else None

    def find(self, items: Sequence[AnchorItem], params: Mapping[str, Any]) -> str | None:
        account = str(params.get("account") or self.account)
        nonce = int(params["nonce"])
        mined = _int(self.rpc("eth_getTransactionCount", account, "latest"), "nonce")
        if mined <= nonce:
            pending = _int(self.rpc("eth_getTransactionCount", account, "pending"), "nonce")
            if pending > nonce:
                raise EngineUnavailable("the batch's nonce is still pending", code="pending")
            return None  # nothing with this nonce went out: safe to send
        want = "0x" + encode_batch(self.origin, items).hex()
        tip = self.tip()
        for number in range(max(0, int(params.get("from_block", 0))), tip + 1):
            block = self._block(number)
            for tx in (block or {}).get("transactions") or []:
                if (
                    isinstance(tx, dict)
                    and str(tx.get("from", "")).lower() == account
                    and _int(tx.get("nonce"), "nonce") == nonce
                ):
                    if str(tx.get("input", tx.get("data", ""))).lower() == want:
                        return str(tx["hash"])
                    raise StaleParameters("the nonce carries another transaction", code="nonce")
        raise StaleParameters("the nonce was used outside the scanned blocks", code="nonce")

    def status(self, txid: str) -> TxStatus:
        receipt = self.rpc("eth_getTransactionReceipt", txid)
        if isinstance(receipt, dict) and receipt.get("blockNumber"):
            return TxStatus(True, _int(receipt["blockNumber"], "blockNumber"), self.tip())
        tx = self.rpc("eth_getTransactionByHash", txid)
        return TxStatus(isinstance(tx, dict), None, self.tip())

    def _decode_tx(self, tx: Mapping[str, Any]) -> dict[int, bytes]:
        raw = str(tx.get("input", tx.get("data", "")) or "")
        try:
            data = bytes.fromhex(raw[2:] if raw.startswith("0x") else raw)
        except ValueError:
            return {}
        decoded = decode_batch(data)
        if decoded is None or decoded[0] != self.origin:
            return {}
        out: dict[int, bytes] = {}
        for entry in decoded[1]:
            seq = _seq_of(entry)
            if seq is not None:
                out[seq] = entry
        return out

    def fetch(self, txid: str) -> dict[int, bytes]:
        tx = self.rpc("eth_getTransactionByHash", txid)
        if not isinstance(tx, dict) or not tx.get("blockNumber"):
            return {}
        return self._decode_tx(tx)

    def scan(self, start: int = 0) -> Iterator[tuple[str, dict[int, bytes]]]:
        """Every transaction of ours in blocks ``start``..tip: ``(txid, {seq: entry})``."""
        account = self.account
        for number in range(start, self.tip() + 1):
            block = self._block(number)
            for tx in (block or {}).get("transactions") or []:
                if isinstance(tx, dict) and str(tx.get("from", "")).lower() == account:
                    entries = self._decode_tx(tx)
                    if entries:
                        yield str(tx["hash"]), entries

    def close(self) -> None:
        self._client.close()


register_engine("evm", EvmEngine.from_settings)
