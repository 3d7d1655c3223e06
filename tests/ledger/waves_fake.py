"""A fake Waves Enterprise node for the ledger tests, built from the node's published OpenAPI
document (``../shared/specs/waves-enterprise-openapi.json``, Swagger 2.0).

* Serves only paths (and methods) the document declares — checked when the app is built —
  with the document's ``X-API-Key`` / ``Authorization`` security.
* Validates every request against the document: path parameters by their declared types,
  and the ``signAndBroadcast`` body against ``TransactionsSignAndBroadcastRequest`` and, for
  type 12, ``DataTransaction`` / ``DataEntry`` (types, ``required``, ``enum``, int32/int64
  ranges). One deliberate reading: the document types ``DataEntry.value`` as a number (its
  integer example), while the node accepts a value of the entry's own ``type``; the fake
  checks the value against ``type`` (binary values as ``base64:…``). It also enforces
  ledger.md §3's limits (≤ 100 entries, key ≤ 100 chars, value ≤ 32,767 bytes, ≤ 153,600
  bytes).
* Simulates a chain: accepted transactions wait in the UTX pool and are mined into a block
  every ``block_interval`` seconds (or by :meth:`WavesFake.mine`); ids are deterministic
  hashes of the body, so a re-sent identical transaction is refused as a duplicate, as the
  real node does.
* Failure modes: ``outage = True`` answers 503 to everything; ``reject_next = n`` refuses the
  next ``n`` broadcasts with a node error. Errors have the node's shape
  ``{"error": <int>, "message": "…"}``.
* Optional ``state_file``: blocks survive a restart (the UTX pool does not, as on a real node).

Run standalone (the crash test does): ``python waves_fake.py --port P --state FILE``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SPEC_PATH = (
    Path(__file__).resolve().parents[3] / "shared" / "specs" / "waves-enterprise-openapi.json"
)
SENDER = "3NotQaBygbSvYZW4ftJ2ZwLXex4rTHY1Qzn"
API_KEY = "fake-node-api-key"
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
Handler = Callable[[Request], Awaitable[Response]]
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def _b58(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


class SchemaError(ValueError):
    pass


class Validator:
    """A Swagger 2.0 schema subset: type, properties, required, items, enum, $ref, format."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            schema = self.spec["definitions"][name]
        return schema

    def check(self, value: Any, schema: dict[str, Any], where: str) -> None:
        schema = self.resolve(schema)
        kind = schema.get("type")
        if kind == "object":
            if not isinstance(value, dict):
                raise SchemaError(f"{where} must be an object")
            for name in schema.get("required", []):
                if name not in value:
                    raise SchemaError(f"{where}.{name} is required")
            for name, sub in schema.get("properties", {}).items():
                if name in value and value[name] is not None:
                    self.check(value[name], sub, f"{where}.{name}")
        elif kind == "array":
            if not isinstance(value, list):
                raise SchemaError(f"{where} must be an array")
            for i, item in enumerate(value):
                self.check(item, schema.get("items", {}), f"{where}[{i}]")
        elif kind == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                raise SchemaError(f"{where} must be an integer")
            lo, hi = _INT_RANGES.get(schema.get("format", "int64"), _INT_RANGES["int64"])
            if not lo <= value <= hi:
                raise SchemaError(f"{where} is out of {schema.get('format')} range")
        elif kind == "number":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SchemaError(f"{where} must be a number")
        elif kind == "string":
            if not isinstance(value, str):
                raise SchemaError(f"{where} must be a string")
        elif kind == "boolean":
            if not isinstance(value, bool):
                raise SchemaError(f"{where} must be a boolean")
        if "enum" in schema and str(value) not in [str(v) for v in schema["enum"]]:
            raise SchemaError(f"{where} must be one of {schema['enum']}")

    def path_params(self, path: str, method: str, params: dict[str, str]) -> None:
        op = self.spec["paths"][path][method]
        for p in op.get("parameters", []):
            if p.get("in") != "path":
                continue
            raw = params.get(p["name"])
            if raw is None:
                raise SchemaError(f"path parameter {p['name']} is required")
            if p.get("type") == "integer":
                if not raw.lstrip("-").isdigit():
                    raise SchemaError(f"path parameter {p['name']} must be an integer")
                self.check(int(raw), {"type": "integer", "format": p.get("format")}, p["name"])


class WavesFake:
    """State and behaviour of the fake node; :attr:`app` is its ASGI application."""

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        sender: str = SENDER,
        block_interval: float = 0.1,
        state_file: Path | None = None,
        spec_path: Path = SPEC_PATH,
    ) -> None:
        self.spec = json.loads(spec_path.read_text())
        self.validator = Validator(self.spec)
        self.api_key = api_key
        self.sender = sender
        self.block_interval = block_interval
        self.state_file = state_file
        self.lock = threading.RLock()
        self.utx: list[dict[str, Any]] = []
        self.blocks: list[list[dict[str, Any]]] = [[]]  # height 1 = genesis, empty
        self.index: dict[str, int] = {}  # tx id -> height
        self.next_block = time.monotonic() + block_interval
        self.outage = False
        self.reject_next = 0
        self.broadcasts = 0
        self.requests = 0
        self.invalid: list[str] = []  # schema violations seen (tests assert it stays empty)
        if state_file is not None and state_file.exists():
            # one JSON line per block, appended as blocks are mined (a crash loses at most
            # the torn last line, like a node losing its last unflushed block)
            for line in state_file.read_text().splitlines():
                try:
                    self.blocks.append(json.loads(line))
                except ValueError:
                    break
            self.index = {tx["id"]: h + 1 for h, block in enumerate(self.blocks) for tx in block}
        self.app = self._build_app()

    # -- chain -----------------------------------------------------------------------------

    @property
    def height(self) -> int:
        return len(self.blocks)

    def mine(self) -> int:
        """Put every UTX transaction in a new block; returns the new height."""
        with self.lock:
            block = [dict(tx, height=self.height + 1) for tx in self.utx]
            self.utx = []
            self.blocks.append(block)
            for tx in block:
                self.index[tx["id"]] = self.height
            self._save(block)
            return self.height

    def _tick(self) -> None:
        with self.lock:
            now = time.monotonic()
            while self.block_interval > 0 and now >= self.next_block:
                self.mine()
                self.next_block += self.block_interval
                if now - self.next_block > 10 * self.block_interval:
                    self.next_block = now + self.block_interval

    def _save(self, block: list[dict[str, Any]]) -> None:
        if self.state_file is not None:
            with self.state_file.open("a") as fh:
                fh.write(json.dumps(block) + "\n")

    def all_transactions(self) -> list[dict[str, Any]]:
        with self.lock:
            return [tx for block in self.blocks for tx in block]

    def by_sender(self, address: str) -> list[dict[str, Any]]:
        """Newest first."""
        with self.lock:
            return [
                tx
                for block in reversed(self.blocks)
                for tx in reversed(block)
                if tx.get("sender") == address
            ]

    def anchored_keys(self) -> dict[str, int]:
        """Data keys on chain → how many times each occurs (tests: exactly once)."""
        counts: dict[str, int] = {}
        for tx in self.all_transactions():
            for item in tx.get("data", []):
                counts[item["key"]] = counts.get(item["key"], 0) + 1
        return counts

    # -- HTTP ------------------------------------------------------------------------------

    def _error(self, status: int, code: int, message: str) -> JSONResponse:
        return JSONResponse({"error": code, "message": message}, status_code=status)

    def _guard(self, request: Request, path: str, method: str) -> Response | None:
        self.requests += 1
        if self.outage:
            return Response("Service Unavailable", status_code=503)
        self._tick()
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if key != self.api_key and auth != f"Bearer {self.api_key}":
            return self._error(403, 2, "Provided API key is not correct")
        try:
            self.validator.path_params(path, method, dict(request.path_params))
        except SchemaError as exc:
            self.invalid.append(str(exc))
            return self._error(400, 1, f"Invalid request: {exc}")
        return None

    def _check_data_tx(self, body: dict[str, Any]) -> None:
        v = self.validator
        v.check(body, {"$ref": "#/definitions/TransactionsSignAndBroadcastRequest"}, "body")
        if body.get("type") != 12:
            raise SchemaError("only Data Transactions (type 12) are supported by this fake")
        v.check(
            {k: x for k, x in body.items() if k != "data"},
            {"$ref": "#/definitions/DataTransaction"},
            "body",
        )
        v.check(body.get("data"), {"type": "array"}, "body.data")
        for name in ("type", "version", "sender", "author", "fee", "timestamp", "data"):
            if name not in body:
                raise SchemaError(f"body.{name} is required")
        if body["version"] != 2:
            raise SchemaError("body.version must be 2")
        if body["sender"] != self.sender or body["author"] != self.sender:
            raise SchemaError("sender is not in the node keystore")
        data = body["data"]
        if not 1 <= len(data) <= 100:
            raise SchemaError("a Data Transaction carries 1 to 100 entries")
        size = 1024
        keys = set()
        for i, item in enumerate(data):
            # DataEntry as documented, but its "value" is checked by the entry's own type
            entry_schema = dict(self.validator.resolve({"$ref": "#/definitions/DataEntry"}))
            entry_schema["properties"] = {
                k: x for k, x in entry_schema["properties"].items() if k != "value"
            }
            v.check(item, entry_schema, f"body.data[{i}]")
            key, kind, value = item["key"], item["type"], item["value"]
            if len(key) > 100:
                raise SchemaError(f"body.data[{i}].key is longer than 100 characters")
            if key in keys:
                raise SchemaError(f"body.data[{i}].key is duplicated")
            keys.add(key)
            if kind == "binary":
                if not isinstance(value, str) or not value.startswith("base64:"):
                    raise SchemaError(f"body.data[{i}].value must be base64:…")
                raw = base64.b64decode(value[7:], validate=True)
                if len(raw) > 32767:
                    raise SchemaError(f"body.data[{i}].value is longer than 32767 bytes")
                size += 5 + len(key.encode()) + len(raw)
            elif kind == "integer":
                v.check(value, {"type": "integer", "format": "int64"}, f"body.data[{i}].value")
            elif kind == "boolean":
                v.check(value, {"type": "boolean"}, f"body.data[{i}].value")
            else:
                v.check(value, {"type": "string"}, f"body.data[{i}].value")
                size += 5 + len(key.encode()) + len(value.encode())
        if size > 153_600:
            raise SchemaError("the transaction is larger than 153600 bytes")

    def _tx_id(self, body: dict[str, Any]) -> str:
        signed = {k: v for k, v in body.items() if k != "password"}
        digest = hashlib.blake2b(
            json.dumps(signed, sort_keys=True, separators=(",", ":")).encode(), digest_size=32
        ).digest()
        return _b58(digest)

    def _find(self, txid: str) -> dict[str, Any] | None:
        height = self.index.get(txid)
        if height is None:
            return None
        return next(tx for tx in self.blocks[height - 1] if tx["id"] == txid)

    def _build_app(self) -> Starlette:
        routes: list[Route] = []

        def route(path: str, method: str) -> Callable[[Handler], Handler]:
            if method.lower() not in self.spec["paths"].get(path, {}):
                raise AssertionError(f"{method} {path} is not in the Waves OpenAPI document")

            def deco(fn: Handler) -> Handler:
                async def endpoint(request: Request) -> Response:
                    denied = self._guard(request, path, method.lower())
                    if denied is not None:
                        return denied
                    with self.lock:
                        result: Response = await fn(request)
                        return result

                routes.append(Route(path, endpoint, methods=[method]))
                return fn

            return deco

        @route("/transactions/signAndBroadcast", "POST")
        async def sign_and_broadcast(request: Request) -> Response:
            try:
                body = json.loads(await request.body())
                self._check_data_tx(body)
            except (ValueError, SchemaError) as exc:
                self.invalid.append(str(exc))
                return self._error(400, 1, f"Invalid transaction: {exc}")
            if self.reject_next > 0:
                self.reject_next -= 1
                return self._error(400, 199, "Transaction is not allowed by account-script")
            txid = self._tx_id(body)
            if txid in self.index or any(tx["id"] == txid for tx in self.utx):
                return self._error(400, 112, f"Transaction {txid} is already in the state")
            self.broadcasts += 1
            tx = {k: v for k, v in body.items() if k != "password"}
            tx.update(
                id=txid,
                senderPublicKey="D56Gk8tvSAhNesghXgjAw67rSYDf4F2vo7HmsFTuGweC",
                authorPublicKey="D56Gk8tvSAhNesghXgjAw67rSYDf4F2vo7HmsFTuGweC",
                proofs=[_b58(hashlib.sha256(txid.encode()).digest())],
                chainId=84,
            )
            self.utx.append(tx)
            return JSONResponse(tx)

        @route("/transactions/info/{id}", "GET")
        async def info(request: Request) -> Response:
            tx = self._find(request.path_params["id"])
            if tx is None:
                return self._error(404, 311, "transactions does not exist")
            return JSONResponse(tx)

        @route("/transactions/unconfirmed/info/{id}", "GET")
        async def unconfirmed_info(request: Request) -> Response:
            txid = request.path_params["id"]
            for tx in self.utx:
                if tx["id"] == txid:
                    return JSONResponse(tx)
            return self._error(404, 311, "transactions does not exist")

        @route("/transactions/unconfirmed", "GET")
        async def unconfirmed(request: Request) -> Response:
            return JSONResponse(list(self.utx))

        @route("/transactions/address/{address}/limit/{limit}", "GET")
        async def by_address(request: Request) -> Response:
            address = request.path_params["address"]
            limit = int(request.path_params["limit"])
            if not 1 <= limit <= 10_000:
                return self._error(400, 1, "limit out of range")
            txs = self.by_sender(address)
            after = request.query_params.get("after")
            if after is not None:
                ids = [tx["id"] for tx in txs]
                if after not in ids:
                    return self._error(400, 1, "after: unknown transaction")
                txs = txs[ids.index(after) + 1 :]
            return JSONResponse([txs[:limit]])

        @route("/blocks/height", "GET")
        async def height(request: Request) -> Response:
            return JSONResponse({"height": self.height})

        @route("/addresses", "GET")
        async def addresses(request: Request) -> Response:
            return JSONResponse([self.sender])

        return Starlette(routes=routes)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state", type=Path)
    parser.add_argument("--block-interval", type=float, default=0.1)
    args = parser.parse_args()
    fake = WavesFake(block_interval=args.block_interval, state_file=args.state)
    uvicorn.run(fake.app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
