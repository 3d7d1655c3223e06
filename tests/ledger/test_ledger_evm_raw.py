"""The EVM engine's raw-transaction mode against a real Anvil node (ledger.md §3 "EVM":
``eth_sendRawTransaction`` with a locally signed transaction, as Besu requires).

The sending account is a fresh key the node does not hold (it is funded with
``anvil_setBalance``), so nothing here can work through Anvil's unlocked accounts: every
transaction on chain from that address was signed by :mod:`eth_account` in this process.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import free_port
from eth_account import Account
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
from pydantic import SecretStr

from fhir_consent.config import Settings
from fhir_consent.crypto import KeyRing
from fhir_consent.ledger import outbox
from fhir_consent.ledger.config import LedgerSettings
from fhir_consent.ledger.engines.base import (
    AnchorItem,
    EngineError,
    EngineRejected,
    PrepareContext,
    StaleParameters,
    create_engine,
)
from fhir_consent.ledger.engines.evm import EvmEngine, load_signer
from fhir_consent.ledger.relay import Relay
from fhir_consent.ledger.verify import verify_ledger
from fhir_consent.store.db import Database

ORIGIN = "raw.example/ledger"
ANVIL_CHAIN_ID = 31337


@pytest.fixture
def anvil(tmp_path: Path) -> Iterator[Anvil]:
    node = Anvil(require_anvil(), tmp_path, free_port())
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _funded_key(node: Anvil) -> Any:
    account = Account.create()
    probe = EvmEngine(node.url, origin=ORIGIN, account="0x" + "0" * 40)
    probe.rpc("anvil_setBalance", account.address, hex(10**20))
    assert account.address.lower() not in [a.lower() for a in probe.rpc("eth_accounts")]
    probe.close()
    return account


def _items(n: int, start: int = 0) -> list[AnchorItem]:
    return [AnchorItem(i, orjson.dumps({"seq": i, "pad": "r" * 40})) for i in range(start, n)]


def _wait_mined(engine: EvmEngine, txid: str) -> int:
    deadline = time.monotonic() + 10
    while (st := engine.status(txid)).height is None:
        assert time.monotonic() < deadline, "not mined"
        time.sleep(0.05)
    return st.height


def test_raw_transaction_is_signed_here_and_confirmed(anvil: Anvil) -> None:
    key = _funded_key(anvil)
    engine = EvmEngine(anvil.url, origin=ORIGIN, signer=key)
    assert engine.mode == "raw" and engine.account == key.address.lower()
    items = _items(50)
    params = engine.prepare(items)
    assert params["chain_id"] == ANVIL_CHAIN_ID  # from eth_chainId
    assert params["nonce"] == 0 and params["type"] == "eip1559"  # anvil has a base fee
    raw, expected = engine.signed(items, params)
    assert engine.signed(items, params) == (raw, expected)  # deterministic: same bytes
    txid = engine.publish(items, params)
    assert txid == expected
    _wait_mined(engine, txid)
    tx = engine.rpc("eth_getTransactionByHash", txid)
    assert tx["from"].lower() == key.address.lower() and tx["to"].lower() == tx["from"].lower()
    assert int(tx["type"], 16) == 2 and int(tx["chainId"], 16) == ANVIL_CHAIN_ID
    assert int(tx["value"], 16) == 0
    assert Account.recover_transaction(raw).lower() == key.address.lower()
    assert engine.fetch(txid) == {i.seq: i.data for i in items}
    assert engine.find(items, params) == txid  # by its own hash
    assert engine.publish(items, params) == txid  # again: "nonce too low", but it is ours
    other = _items(3, 100)
    with pytest.raises(StaleParameters):  # another batch under the used nonce
        engine.publish(other, {**params})
    assert engine.prepare(other)["nonce"] == 1
    engine.close()


def test_legacy_transactions_and_configured_gas_price(anvil: Anvil) -> None:
    key = _funded_key(anvil)
    price = 3 * 10**9
    engine = EvmEngine(anvil.url, origin=ORIGIN, signer=key, tx_type="legacy", gas_price=price)
    items = _items(5)
    params = engine.prepare(items)
    assert params["type"] == "legacy" and params["gas_price"] == price
    txid = engine.publish(items, params)
    _wait_mined(engine, txid)
    tx = engine.rpc("eth_getTransactionByHash", txid)
    assert int(tx["type"], 16) == 0 and int(tx["gasPrice"], 16) == price
    engine.close()


def test_wrong_chain_id_is_refused_before_signing(anvil: Anvil) -> None:
    engine = EvmEngine(anvil.url, origin=ORIGIN, signer=_funded_key(anvil), chain_id=1)
    with pytest.raises(EngineRejected) as exc:
        engine.prepare(_items(1))
    assert exc.value.code == "chain-id"
    engine.close()


def test_nonces_follow_in_flight_batches_even_when_the_node_forgot_them(anvil: Anvil) -> None:
    """A relay restarted after the node lost its pool still numbers new batches after the
    ones it has stored; the later batch waits in the node's queue until the gap is filled."""
    key = _funded_key(anvil)
    engine = EvmEngine(anvil.url, origin=ORIGIN, signer=key)
    first, second = _items(4), _items(8, 4)
    p1 = engine.prepare(first)
    p2 = engine.prepare(second, PrepareContext(in_flight=[p1]))
    assert (p1["nonce"], p2["nonce"]) == (0, 1)
    t2 = engine.publish(second, p2)  # nonce 1 before nonce 0: queued, not mined
    time.sleep(0.3)
    assert engine.status(t2).height is None
    t1 = engine.publish(first, p1)
    h1, h2 = _wait_mined(engine, t1), _wait_mined(engine, t2)
    assert h1 <= h2
    assert int(engine.rpc("eth_getTransactionCount", engine.account, "latest"), 16) == 2
    engine.close()


def test_underpriced_batch_keeps_its_nonce_with_higher_fees(anvil: Anvil) -> None:
    key = _funded_key(anvil)
    engine = EvmEngine(anvil.url, origin=ORIGIN, signer=key)
    items = _items(3)
    good = engine.prepare(items)
    cheap = {**good, "max_fee": 1, "priority_fee": 0}  # below the block's base fee
    with pytest.raises(StaleParameters) as exc:
        engine.publish(items, cheap)
    assert exc.value.code == "fee"
    later = _items(6, 3)
    in_flight = [engine.prepare(later, PrepareContext(in_flight=[cheap]))]
    assert in_flight[0]["nonce"] == 1
    fresh = engine.prepare(items, PrepareContext(in_flight=in_flight, replacing=cheap))
    assert fresh["nonce"] == cheap["nonce"] == 0  # no hole before the later batch
    assert fresh["max_fee"] > good["max_fee"] // 2 and fresh["max_fee"] > 1
    t1 = engine.publish(items, fresh)
    t2 = engine.publish(later, in_flight[0])
    _wait_mined(engine, t1)
    _wait_mined(engine, t2)
    engine.close()


def test_key_from_file_or_keystore_and_never_in_errors(tmp_path: Path) -> None:
    account = Account.create()
    hex_key = "0x" + bytes(account.key).hex()
    key_file = tmp_path / "evm.key"
    key_file.write_text(hex_key + "\n")
    key_file.chmod(0o600)
    base: dict[str, Any] = {"_env_file": None, "engine": "evm", "evm_url": "http://127.0.0.1:1"}
    loaded = load_signer(LedgerSettings(**base, evm_private_key_file=str(key_file)))
    assert loaded is not None and loaded.address == account.address
    key_file.chmod(0o644)
    with pytest.raises(EngineError, match="0600"):
        load_signer(LedgerSettings(**base, evm_private_key_file=str(key_file)))
    store = tmp_path / "keystore.json"
    store.write_bytes(orjson.dumps(Account.encrypt(account.key, "pw", iterations=2)))
    os.chmod(store, 0o600)
    opened = load_signer(
        LedgerSettings(
            **base, evm_private_key_file=str(store), evm_keystore_password=SecretStr("pw")
        )
    )
    assert opened is not None and opened.address == account.address
    with pytest.raises(EngineError) as exc:
        load_signer(
            LedgerSettings(
                **base, evm_private_key_file=str(store), evm_keystore_password=SecretStr("no")
            )
        )
    assert hex_key[2:] not in str(exc.value)
    bad = hex_key[:-4] + "zzzz"
    with pytest.raises(EngineError) as exc:
        load_signer(LedgerSettings(**base, evm_private_key=SecretStr(bad)))
    assert bad[2:] not in str(exc.value) and "malformed" in str(exc.value)
    # the settings choose the mode: a key means raw, unless unlocked is asked for
    raw = create_engine(LedgerSettings(**base, evm_private_key=SecretStr(hex_key)), ORIGIN)
    assert isinstance(raw, EvmEngine) and raw.mode == "raw"
    unlocked = create_engine(
        LedgerSettings(**base, evm_private_key=SecretStr(hex_key), evm_send="unlocked"), ORIGIN
    )
    assert isinstance(unlocked, EvmEngine) and unlocked.mode == "unlocked"
    with pytest.raises(EngineError):
        create_engine(LedgerSettings(**base, evm_send="raw"), ORIGIN)  # raw without a key
    with pytest.raises(EngineError):
        create_engine(
            LedgerSettings(**base, evm_private_key=SecretStr(hex_key), evm_account="0x" + "1" * 40),
            ORIGIN,
        )


class PausingEvm(EvmEngine):
    """Stalls once right after broadcasting, past the relay's lease (a paused process)."""

    pause = 0.0
    found = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stalled = threading.Event()

    def find(self, items: Any, params: Any) -> str | None:
        txid = super().find(items, params)
        self.found += txid is not None
        return txid

    def publish(self, items: Any, params: Any) -> str:
        txid = super().publish(items, params)
        if self.pause:
            pause, self.pause = self.pause, 0.0
            self.stalled.set()
            time.sleep(pause)
        return txid


def test_competing_relays_in_raw_mode_anchor_each_entry_once(
    settings: Settings, tmp_path: Path, anvil: Anvil
) -> None:
    key = _funded_key(anvil)
    lsettings = ledger_settings(
        tmp_path,
        engine="evm",
        evm_url=anvil.url,
        evm_private_key=SecretStr("0x" + bytes(key.key).hex()),
        relay_in_process=False,
        origin=ORIGIN,
        lease_ttl=0.4,
        batch_size=20,
    )
    app = ledger_app(settings, lsettings)
    db = Database(settings.database_url, pool_size=6)
    with TestClient(app, base_url="https://testserver", headers=FHIR_JSON) as client:
        for _ in range(90):
            assert client.post("/fhir/Consent", json=consent_resource()).status_code == 201
    engines = [PausingEvm.from_settings(lsettings, ORIGIN) for _ in range(3)]
    assert all(isinstance(e, PausingEvm) and e.mode == "raw" for e in engines)
    engines[0].pause = 1.0  # relay 0 loses its lease mid-send; another takes over
    relays = [Relay(db, e, lsettings, holder=f"relay-{n}") for n, e in enumerate(engines)]
    stop = threading.Event()
    threads = [threading.Thread(target=r.run, args=(stop,)) for r in relays]
    threads[0].start()
    try:
        assert engines[0].stalled.wait(20)  # relay 0 has broadcast and hangs, lease held
        for t in threads[1:]:
            t.start()

        def done() -> bool:
            with db.read() as conn:
                return outbox.status_counts(conn) == {"confirmed": 90}

        wait_for(done, timeout=60, interval=0.1)
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:
                t.join(10)
    assert engines[0].pause == 0  # relay 0 did stall with a broadcast in flight
    assert sum(e.found for e in engines[1:]) >= 1  # and another found it on chain, not re-sent
    check = EvmEngine.from_settings(lsettings, ORIGIN)
    counts: dict[int, int] = {}
    txids = []
    for txid, entries in check.scan():
        txids.append(txid)
        for seq in entries:
            counts[seq] = counts.get(seq, 0) + 1
    assert counts == dict.fromkeys(range(90), 1)
    # no nonce gap and nothing else sent: the account's nonce is exactly its transactions
    assert int(check.rpc("eth_getTransactionCount", check.account, "latest"), 16) == len(txids)
    ring = KeyRing.load(lsettings.keys_dir)
    report = verify_ledger(db, ring.verify_keys(), ORIGIN, engine=check, scan_chain=True)
    assert report.ok, report.problems
    assert report.anchored_checked == 90
    check.close()
    for e in engines:
        e.close()
    db.dispose()
