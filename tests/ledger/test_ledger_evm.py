"""The EVM engine against a real Anvil node (ledger.md §3 "EVM"): batches as calldata of
self-transactions, receipts after k blocks, nonce-based repeatability, node restarts.

Anvil comes from npm (``npm install --prefix .tools @foundry-rs/anvil@1.7.1``); without it these
tests skip locally and FAIL under ``CI=true``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import free_port
from fastapi.testclient import TestClient
from ledger_testkit import (
    FHIR_JSON,
    Anvil,
    consent_resource,
    ledger_app,
    ledger_settings,
    require_anvil,
    wait_for,
)

from fhir_consent.config import Settings
from fhir_consent.crypto import KeyRing
from fhir_consent.ledger import outbox
from fhir_consent.ledger.engines.base import AnchorItem, EngineUnavailable, StaleParameters
from fhir_consent.ledger.engines.evm import EvmEngine, decode_batch, encode_batch
from fhir_consent.ledger.relay import Relay
from fhir_consent.ledger.verify import verify_ledger
from fhir_consent.store.db import Database

ORIGIN = "test.example/ledger"


@pytest.fixture
def anvil(tmp_path: Path) -> Iterator[Anvil]:
    node = Anvil(require_anvil(), tmp_path, free_port())
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _items(n: int, start: int = 0) -> list[AnchorItem]:
    return [AnchorItem(i, orjson.dumps({"seq": i, "pad": "z" * 40})) for i in range(start, n)]


def test_batch_encoding_round_trip() -> None:
    items = _items(3)
    origin, entries = decode_batch(encode_batch(ORIGIN, items)) or ("", [])
    assert origin == ORIGIN and entries == [i.data for i in items]
    assert decode_batch(b"nope") is None
    assert decode_batch(encode_batch(ORIGIN, items)[:-1]) is None


def test_engine_publishes_and_confirms_on_anvil(anvil: Anvil) -> None:
    engine = EvmEngine(anvil.url, origin=ORIGIN)
    items = _items(100)
    assert engine.fit(items) == 100
    params = engine.prepare(items)
    txid = engine.publish(items, params)
    deadline = time.monotonic() + 10  # anvil automines, but a loaded machine may lag a beat
    while (st := engine.status(txid)).height is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert st.known and st.height is not None
    assert engine.fetch(txid) == {i.seq: i.data for i in items}
    assert engine.find(items, params) == txid  # the nonce was used by exactly this batch
    with pytest.raises(StaleParameters):
        engine.publish(items, params)  # same nonce again: the node refuses
    assert [t for t, _ in engine.scan()] == [txid]
    # a different batch under a used nonce is detected as such
    with pytest.raises(StaleParameters):
        engine.find(_items(3, 500), params)
    engine.close()


def test_engine_unreachable_is_transient() -> None:
    engine = EvmEngine(f"http://127.0.0.1:{free_port()}", origin=ORIGIN, account="0x" + "1" * 40)
    with pytest.raises(EngineUnavailable):
        engine.prepare(_items(1))


@pytest.fixture
def evm_env(
    settings: Settings, tmp_path: Path, anvil: Anvil
) -> Iterator[tuple[TestClient, Any, Database, Anvil]]:
    lsettings = ledger_settings(
        tmp_path, engine="evm", evm_url=anvil.url, relay_in_process=False, origin=ORIGIN
    )
    app = ledger_app(settings, lsettings)
    db = Database(settings.database_url, pool_size=4)
    with TestClient(app, base_url="https://testserver", headers=FHIR_JSON) as c:
        yield c, lsettings, db, anvil
    db.dispose()


def _counts(db: Database) -> dict[str, int]:
    with db.read() as conn:
        return outbox.status_counts(conn)


def _chain_counts(engine: EvmEngine) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _txid, entries in engine.scan():
        for seq in entries:
            counts[seq] = counts.get(seq, 0) + 1
    return counts


class LossyEvm(EvmEngine):
    lose = 1

    def publish(self, items: Any, params: Any) -> str:
        txid = super().publish(items, params)
        if self.lose:
            self.lose -= 1
            raise EngineUnavailable("reply lost", code="timeout")
        return txid


def test_relay_to_anvil_with_lost_reply_and_node_restart(
    evm_env: tuple[TestClient, Any, Database, Anvil],
) -> None:
    client, lsettings, db, node = evm_env
    for _ in range(120):
        assert client.post("/fhir/Consent", json=consent_resource()).status_code == 201
    lossy = LossyEvm(node.url, origin=ORIGIN)
    relay = Relay(db, lossy, lsettings.model_copy(update={"confirmations": 2}), rng=lambda: 0.0)
    relay.step()  # batch 1 goes out, its reply is "lost"; the step stops there
    wait_for(lambda: relay.step() is not None and "pending" not in _counts(db))
    engine = EvmEngine(node.url, origin=ORIGIN)
    assert _chain_counts(engine) == dict.fromkeys(range(120), 1)
    # the node stops (state saved) and comes back; the relay just waits it out
    node.stop()
    assert relay.step().failed == 0 and relay.step().errors
    node.start()
    for _ in range(2):  # k = 2 blocks on top
        engine.rpc("evm_mine")
    wait_for(lambda: relay.step() is not None and _counts(db) == {"confirmed": 120})
    for _ in range(30):
        client.post("/fhir/Consent", json=consent_resource())
    relay2 = Relay(db, engine, lsettings)
    assert relay2.drain(20)
    assert _chain_counts(engine) == dict.fromkeys(range(150), 1)
    ring = KeyRing.load(lsettings.keys_dir)
    report = verify_ledger(db, ring.verify_keys(), ORIGIN, engine=engine, scan_chain=True)
    assert report.ok, report.problems
    assert report.anchored_checked == 150
    engine.close()
