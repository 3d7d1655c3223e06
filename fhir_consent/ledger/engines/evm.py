"""EVM engine: entries as the calldata of zero-value self-transactions over JSON-RPC
(ledger.md §3 "EVM"; Ethereum JSON-RPC ``eth_*`` methods).

A batch is one transaction from the configured account to itself, value 0, whose ``data`` is::

    b"FCL1" || u16 len(origin) || origin || (u32 len(entry) || entry bytes)*

sent in one of two modes (``evm_send``):

* ``unlocked`` — ``eth_sendTransaction`` from an account the node holds (Anvil's dev accounts,
  a node with a keystore); the node signs.
* ``raw`` — the transaction is signed here with the account's secp256k1 key
  (:mod:`eth_account`, the Ethereum Foundation's signing library) and sent with
  ``eth_sendRawTransaction``, as Hyperledger Besu and other permissioned nodes require. The
  chain id comes from the node (``eth_chainId``; checked against ``evm_chain_id`` when that is
  set), the gas limit from ``eth_estimateGas``, and the fees from the node or the settings:
  an EIP-1559 (type 2) transaction when the chain has a base fee, else a legacy one (free-gas
  QBFT networks price gas at 0).

It is confirmed by ``eth_getTransactionReceipt`` once ``k`` blocks sit on top.

Repeatability and nonces: everything that goes into the transaction — nonce, and in raw mode
chain id, gas and fees — is chosen by :meth:`EvmEngine.prepare` and stored by the relay with
the batch *before* the first broadcast. The same account and nonce can be mined at most once,
and a raw transaction signed again from the same parameters is byte for byte the same
(RFC 6979 deterministic signatures), so a re-send either is the same transaction ("already
known", "nonce too low" for our own hash) or, if the first never left, goes out now. The
nonce is the larger of the node's pending count and one past every nonce the relay's
unconfirmed batches hold (:class:`~.base.PrepareContext`), so it survives a relay restart
and a node that lost its transaction pool; only the relay holding the lease prepares
batches, so relays in several processes never pick the same nonce for different batches. A
batch whose fees went stale keeps its nonce (no hole opens before later batches); one whose
nonce was taken by another transaction gets a new one. After a crash
:meth:`EvmEngine.find` looks the batch up — in raw mode by its own transaction hash, in
unlocked mode by scanning the blocks since it was prepared for the account's transaction
with that nonce.
"""

from __future__ import annotations

import itertools
import os
import stat
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

import httpx

from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.ledger.engines.base import (
    AnchorItem,
    EngineError,
    EngineProtocolError,
    EngineRejected,
    EngineUnavailable,
    PrepareContext,
    StaleParameters,
    TxStatus,
)

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

__all__ = [
    "MAGIC",
    "MAX_ENTRIES",
    "EvmEngine",
    "decode_batch",
    "encode_batch",
    "load_signer",
]

MAGIC: Final = b"FCL1"
MAX_ENTRIES: Final = 100
_NONCE_TOO_LOW: Final = ("nonce too low", "nonce is too low", "already been used")
_KNOWN: Final = ("already known", "already imported", "known transaction")
_UNDERPRICED: Final = (
    "underpriced",
    "less than block base fee",
    "lower than block base fee",
    "gas price too low",
    "fee cap less than",
    "max fee per gas less than",
)
_GAS_MARGIN: Final = 1.2  # eth_estimateGas is exact for calldata; the margin absorbs forks
_BUMP_NUM, _BUMP_DEN = 9, 8  # a replacement must pay >= 10 % more (geth, Besu, Anvil)


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


def _secret_file_text(path: Path) -> str:
    try:
        st = os.stat(path)
    except OSError:
        raise EngineError(f"cannot read the EVM key file {path}", code="config") from None
    if not stat.S_ISREG(st.st_mode):
        raise EngineError(f"the EVM key file {path} is not a regular file", code="config")
    if st.st_mode & 0o077:
        raise EngineError(
            f"the EVM key file {path} is accessible by group/others; it must be 0600",
            code="config",
        )
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise EngineError(f"cannot read the EVM key file {path}", code="config") from None


def load_signer(settings: LedgerSettings) -> LocalAccount | None:
    """The sending account's key for raw mode: ``evm_private_key``, else the file named by
    ``evm_private_key_file`` (hex, or a V3 JSON keystore opened with
    ``evm_keystore_password``); None when neither is set. Errors never contain key material.
    """
    import orjson
    from eth_account import Account

    if settings.evm_private_key is not None:
        text = settings.evm_private_key.get_secret_value().strip()
    elif settings.evm_private_key_file:
        text = _secret_file_text(Path(settings.evm_private_key_file))
    else:
        return None
    key: Any = text
    if text.startswith("{"):
        if settings.evm_keystore_password is None:
            raise EngineError("the EVM keystore needs evm_keystore_password", code="config")
        try:
            key = Account.decrypt(
                orjson.loads(text), settings.evm_keystore_password.get_secret_value()
            )
        except Exception:  # noqa: BLE001 - wrong password, bad file: say neither key nor why
            raise EngineError("cannot open the EVM keystore", code="config") from None
    try:
        account: LocalAccount = Account.from_key(key)
    except Exception:  # noqa: BLE001 - the library's message could quote the input
        raise EngineError("the EVM private key is malformed", code="config") from None
    return account


def _bump(old: object, fresh: int) -> int:
    """A replacement's fee: the fresh estimate, but at least 12.5 % over the old one."""
    if isinstance(old, int) and not isinstance(old, bool):
        return max(fresh, old * _BUMP_NUM // _BUMP_DEN + 1)
    return fresh


class EvmEngine:
    """:class:`~fhir_consent.ledger.engines.base.LedgerEngine` over Ethereum JSON-RPC."""

    name = "evm"

    def __init__(
        self,
        url: str,
        *,
        origin: str,
        account: str | None = None,
        signer: LocalAccount | None = None,
        mode: str = "auto",
        chain_id: int | None = None,
        tx_type: str = "auto",
        gas_price: int | None = None,
        priority_fee: int | None = None,
        max_batch_bytes: int = 96 * 1024,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
    ) -> None:
        if mode == "auto":
            mode = "raw" if signer is not None else "unlocked"
        if mode not in ("raw", "unlocked"):
            raise EngineError(f"unknown EVM send mode {mode!r}", code="config")
        if tx_type not in ("auto", "legacy", "eip1559"):
            raise EngineError(f"unknown EVM transaction type {tx_type!r}", code="config")
        if mode == "raw":
            if signer is None:
                raise EngineError(
                    "raw EVM sending needs evm_private_key or evm_private_key_file",
                    code="config",
                )
            address = signer.address.lower()
            if account is not None and account.lower() != address:
                raise EngineError("evm_account is not the private key's address", code="config")
            account = address
        self.mode = mode
        self._signer = signer if mode == "raw" else None
        self._client = client or httpx.Client(timeout=timeout)
        self._url = url
        self.origin = origin
        self._account = account.lower() if account else None
        self._expected_chain_id = chain_id
        self._chain_id: int | None = None
        self.tx_type = tx_type
        self.gas_price = gas_price
        self.priority_fee = priority_fee
        self.max_batch_bytes = max_batch_bytes
        self._ids = itertools.count(1)

    @classmethod
    def from_settings(cls, settings: LedgerSettings, origin: str) -> Self:
        if not settings.evm_url:
            raise EngineError("evm engine needs evm_url", code="config")
        signer = load_signer(settings) if settings.evm_send != "unlocked" else None
        return cls(
            settings.evm_url,
            origin=origin,
            account=settings.evm_account,
            signer=signer,
            mode=settings.evm_send,
            chain_id=settings.evm_chain_id,
            tx_type=settings.evm_tx_type,
            gas_price=settings.evm_gas_price,
            priority_fee=settings.evm_priority_fee,
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
            if any(s in lowered for s in _UNDERPRICED):
                raise StaleParameters("the transaction's fees are too low", code="fee")
            raise EngineRejected(f"EVM node error {code}: {message[:160]}", code=f"rpc-{code}")
        if resp.status_code >= 400:
            raise EngineRejected(f"EVM node answered {resp.status_code}", code="http-error")
        return doc.get("result")

    @property
    def account(self) -> str:
        """The sending account: the key's address (raw), configured, or the node's first
        unlocked account."""
        if self._account is None:
            accounts = self.rpc("eth_accounts")
            if not isinstance(accounts, list) or not accounts or not isinstance(accounts[0], str):
                raise EngineError("the EVM node has no unlocked account", code="config")
            self._account = accounts[0].lower()
        return self._account

    @property
    def chain_id(self) -> int:
        """The node's chain id (``eth_chainId``, EIP-695), checked against the expected one."""
        if self._chain_id is None:
            got = _int(self.rpc("eth_chainId"), "eth_chainId")
            if self._expected_chain_id is not None and got != self._expected_chain_id:
                raise EngineRejected(
                    f"the EVM node is on chain {got}, not the configured {self._expected_chain_id}",
                    code="chain-id",
                )
            self._chain_id = got
        return self._chain_id

    def tip(self) -> int:
        return _int(self.rpc("eth_blockNumber"), "eth_blockNumber")

    def _count(self, account: str, tag: str) -> int:
        return _int(self.rpc("eth_getTransactionCount", account, tag), "nonce")

    # -- parameters --------------------------------------------------------------------------

    def fit(self, items: Sequence[AnchorItem]) -> int:
        size = 6 + len(self.origin.encode())
        for n, item in enumerate(items[:MAX_ENTRIES]):
            size += 4 + len(item.data)
            if size > self.max_batch_bytes:
                return n
        return min(len(items), MAX_ENTRIES)

    def _nonce(self, account: str, context: PrepareContext) -> int:
        """See the module docstring: keep a stale batch's unused nonce, else the next free."""
        old = context.replacing
        if old is not None and str(old.get("account", "")).lower() == account:
            nonce = old.get("nonce")
            if isinstance(nonce, int) and self._count(account, "latest") <= nonce:
                return nonce
        taken = [
            int(p["nonce"]) + 1
            for p in context.in_flight
            if str(p.get("account", "")).lower() == account
            and isinstance(p.get("nonce"), int)
            and not isinstance(p.get("nonce"), bool)
        ]
        return max([self._count(account, "pending"), *taken])

    def _fees(self, replacing: Mapping[str, Any] | None) -> dict[str, Any]:
        kind = self.tx_type
        base_fee: int | None = None
        if kind != "legacy":
            latest = self.rpc("eth_getBlockByNumber", "latest", False)
            raw_base = latest.get("baseFeePerGas") if isinstance(latest, dict) else None
            if raw_base is not None:
                base_fee = _int(raw_base, "baseFeePerGas")
            elif kind == "eip1559":
                raise EngineRejected("the EVM chain has no base fee (pre-London)", code="no-1559")
            kind = "eip1559" if base_fee is not None else "legacy"
        old = replacing or {}
        if kind == "legacy":
            price = self.gas_price
            if price is None:
                price = _int(self.rpc("eth_gasPrice"), "eth_gasPrice")
            if old.get("type") == "legacy":
                price = _bump(old.get("gas_price"), price)
            return {"type": "legacy", "gas_price": price}
        assert base_fee is not None
        tip = self.priority_fee
        if tip is None:
            try:
                tip = _int(self.rpc("eth_maxPriorityFeePerGas"), "eth_maxPriorityFeePerGas")
            except EngineRejected:  # not every node has it (free-gas networks)
                tip = 0
        max_fee = 2 * base_fee + tip
        if old.get("type") == "eip1559":
            tip = _bump(old.get("priority_fee"), tip)
            max_fee = max(_bump(old.get("max_fee"), max_fee), tip)
        return {"type": "eip1559", "max_fee": max_fee, "priority_fee": tip}

    def prepare(
        self, items: Sequence[AnchorItem], context: PrepareContext | None = None
    ) -> dict[str, Any]:
        ctx = context or PrepareContext()
        account = self.account
        params: dict[str, Any] = {
            "mode": self.mode,
            "account": account,
            "nonce": self._nonce(account, ctx),
            "from_block": self.tip(),
        }
        if self.mode == "raw":
            data = "0x" + encode_batch(self.origin, items).hex()
            call = {"from": account, "to": account, "value": "0x0", "data": data}
            estimate = _int(self.rpc("eth_estimateGas", call), "eth_estimateGas")
            params["chain_id"] = self.chain_id
            params["gas"] = int(estimate * _GAS_MARGIN)
            params.update(self._fees(ctx.replacing))
        return params

    # -- sending -----------------------------------------------------------------------------

    def signed(self, items: Sequence[AnchorItem], params: Mapping[str, Any]) -> tuple[str, str]:
        """The raw transaction of a batch prepared in raw mode and its hash, both 0x-hex; the
        same parameters always give the same bytes."""
        signer = self._signer
        if signer is None or params.get("mode") != "raw":
            raise StaleParameters("the batch was not prepared for raw sending", code="mode")
        if str(params.get("account", "")).lower() != signer.address.lower():
            raise StaleParameters("the batch was prepared for another account", code="account")
        tx: dict[str, Any] = {
            "chainId": int(params["chain_id"]),
            "nonce": int(params["nonce"]),
            "to": signer.address,
            "value": 0,
            "data": encode_batch(self.origin, items),
            "gas": int(params["gas"]),
        }
        if params.get("type") == "eip1559":
            tx["type"] = 2
            tx["maxFeePerGas"] = int(params["max_fee"])
            tx["maxPriorityFeePerGas"] = int(params["priority_fee"])
        else:
            tx["gasPrice"] = int(params["gas_price"])
        try:
            signed = signer.sign_transaction(tx)
        except Exception:  # noqa: BLE001 - never echo the library's text (it may quote fields)
            raise EngineRejected("cannot sign the EVM transaction", code="sign") from None
        return "0x" + bytes(signed.raw_transaction).hex(), "0x" + bytes(signed.hash).hex()

    def _known(self, txid: str) -> bool:
        return isinstance(self.rpc("eth_getTransactionByHash", txid), dict)

    def publish(self, items: Sequence[AnchorItem], params: Mapping[str, Any]) -> str:
        if str(params.get("mode", "unlocked")) != self.mode:
            raise StaleParameters("the batch was prepared for the other send mode", code="mode")
        if self.mode == "raw":
            raw, txid = self.signed(items, params)
            try:
                got = self.rpc("eth_sendRawTransaction", raw)
            except EngineRejected:
                if self._known(txid):  # our very transaction went out before
                    return txid
                raise
            if not isinstance(got, str) or got.lower() != txid:
                raise EngineProtocolError(
                    "eth_sendRawTransaction returned another hash", code="bad-hash"
                )
            return txid
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
        account = str(params.get("account") or self.account).lower()
        if params.get("mode") == "raw" and self._signer is not None:
            try:
                _, own = self.signed(items, params)
            except StaleParameters:
                own = None
            if own is not None and self._known(own):
                return own
        nonce = int(params["nonce"])
        mined = self._count(account, "latest")
        if mined <= nonce:
            if self._count(account, "pending") > nonce:
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
