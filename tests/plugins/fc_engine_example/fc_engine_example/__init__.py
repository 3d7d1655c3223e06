"""``fc-example``: a fhir-consent ledger engine that notarises batches in a local file.

Each published batch is one JSON line ``{"txid", "origin", "entries": {seq: base64}}``
appended to ``engine_options["path"]``; a transaction's height is its line number (from 1),
the tip the number of lines. The transaction id is SHA-256 of the origin and the entries, so
publishing the same batch again finds the line already there instead of adding a second
one: that, with :meth:`NotaryFileEngine.find`, is all the relay needs for exactly-once.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.ledger.engines.base import (
    AnchorItem,
    EngineError,
    EngineUnavailable,
    PrepareContext,
    TxStatus,
)

__all__ = ["NotaryFileEngine"]

MAX_ENTRIES = 50


class NotaryFileEngine:
    """:class:`fhir_consent.ledger.engines.base.LedgerEngine` over an append-only file."""

    name = "fc-example"

    def __init__(self, path: Path, origin: str) -> None:
        self.path = path
        self.origin = origin

    @classmethod
    def from_settings(cls, settings: LedgerSettings, origin: str) -> NotaryFileEngine:
        path = settings.engine_options.get("path")
        if not isinstance(path, str) or not path:
            raise EngineError("fc-example needs engine_options.path", code="config")
        return cls(Path(path), origin)

    @contextmanager
    def _locked(self) -> Iterator[IO[str]]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = self.path.open("a+", encoding="utf-8")
        except OSError:
            raise EngineUnavailable("the notary file cannot be opened", code="io") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            yield fh
        finally:
            fh.close()

    def _lines(self, fh: IO[str]) -> list[dict[str, Any]]:
        out = []
        for line in fh.read().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # a torn last line: as if never written
        return out

    def _txid(self, items: Sequence[AnchorItem]) -> str:
        h = hashlib.sha256(self.origin.encode())
        for item in items:
            h.update(item.seq.to_bytes(8, "big") + hashlib.sha256(item.data).digest())
        return h.hexdigest()

    # -- the protocol ------------------------------------------------------------------------

    def fit(self, items: Sequence[AnchorItem]) -> int:
        return min(len(items), MAX_ENTRIES)

    def prepare(
        self, items: Sequence[AnchorItem], context: PrepareContext | None = None
    ) -> dict[str, Any]:
        return {}  # the transaction id depends on the entries alone

    def publish(self, items: Sequence[AnchorItem], params: Mapping[str, Any]) -> str:
        txid = self._txid(items)
        with self._locked() as fh:
            if any(tx.get("txid") == txid for tx in self._lines(fh)):
                return txid
            record = {
                "txid": txid,
                "origin": self.origin,
                "entries": {str(i.seq): base64.b64encode(i.data).decode("ascii") for i in items},
            }
            fh.seek(0, os.SEEK_END)
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return txid

    def find(self, items: Sequence[AnchorItem], params: Mapping[str, Any]) -> str | None:
        txid = self._txid(items)
        with self._locked() as fh:
            return txid if any(tx.get("txid") == txid for tx in self._lines(fh)) else None

    def status(self, txid: str) -> TxStatus:
        with self._locked() as fh:
            lines = self._lines(fh)
        for height, tx in enumerate(lines, start=1):
            if tx.get("txid") == txid:
                return TxStatus(True, height, len(lines))
        return TxStatus(False, None, len(lines))

    def fetch(self, txid: str) -> dict[int, bytes]:
        with self._locked() as fh:
            for tx in self._lines(fh):
                if tx.get("txid") == txid and tx.get("origin") == self.origin:
                    return {int(k): base64.b64decode(v) for k, v in tx["entries"].items()}
        return {}

    def close(self) -> None:
        pass
