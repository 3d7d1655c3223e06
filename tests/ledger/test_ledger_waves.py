"""The Waves Enterprise engine and the relay against the fake node built from the node's OpenAPI
document (ledger.md §2 "Exactly once on the external ledger", §3): batching and limits,
repeatable broadcasts, lost replies, rejections, two relays, and a 503 outage while the FHIR
server keeps writing."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from conftest import free_port
from fastapi.testclient import TestClient
from ledger_testkit import (
    FHIR_JSON,
    ThreadedServer,
    consent_resource,
    ledger_app,
    ledger_settings,
    wait_for,
)
from starlette.testclient import TestClient as StarletteClient

from fhir_consent.config import Settings
from fhir_consent.crypto import KeyRing
from fhir_consent.ledger import outbox
from fhir_consent.ledger.engines.base import AnchorItem, EngineRejected, EngineUnavailable
from fhir_consent.ledger.engines.waves import MAX_VALUE_BYTES, WavesEngine, data_key
from fhir_consent.ledger.relay import Relay
from fhir_consent.ledger.tables import ledger_batch, ledger_entry, ledger_outbox
from fhir_consent.ledger.verify import verify_ledger
from fhir_consent.store.db import Database

sys.path.insert(0, str(Path(__file__).parent))
from waves_fake import API_KEY, SENDER, WavesFake  # noqa: E402

ORIGIN = "test.example/ledger"


def _engine(fake: WavesFake, **kw: Any) -> WavesEngine:
    client = StarletteClient(fake.app, base_url="http://waves.test")
    return WavesEngine(
        "http://waves.test", origin=ORIGIN, sender=SENDER, api_key=API_KEY, client=client, **kw
    )


@pytest.fixture
def fake() -> WavesFake:
    return WavesFake(block_interval=0)  # blocks only when the test mines


def test_engine_round_trip_and_validation(fake: WavesFake) -> None:
    engine = _engine(fake)
    items = [AnchorItem(i, orjson.dumps({"seq": i, "x": "y" * 50})) for i in range(3)]
    params = engine.prepare(items)
    txid = engine.publish(items, params)
    st = engine.status(txid)
    assert st.known and st.height is None
    fake.mine()
    st = engine.status(txid)
    assert st.height == fake.height and st.confirmations() == 0
    assert engine.fetch(txid) == {i.seq: i.data for i in items}
    # the same batch again is the same transaction: the node refuses the duplicate
    with pytest.raises(EngineRejected) as exc:
        engine.publish(items, params)
    assert exc.value.code == "waves-112"
    assert engine.find(items, params) == txid
    assert fake.invalid == []
    tx = fake.all_transactions()[0]
    assert tx["type"] == 12 and tx["version"] == 2
    assert tx["data"][0]["key"] == data_key(ORIGIN, 0)
    assert tx["data"][0]["value"].startswith("base64:")


def test_engine_auth_errors_and_outage(fake: WavesFake) -> None:
    bad = WavesEngine(
        "http://waves.test",
        origin=ORIGIN,
        sender=SENDER,
        api_key="wrong",
        client=StarletteClient(fake.app, base_url="http://waves.test"),
    )
    with pytest.raises(EngineRejected) as exc:
        bad.tip()
    assert exc.value.code == "waves-2"
    bearer = WavesEngine(
        "http://waves.test",
        origin=ORIGIN,
        sender=SENDER,
        bearer_token=API_KEY,
        client=StarletteClient(fake.app, base_url="http://waves.test"),
    )
    assert bearer.tip() == 1
    fake.outage = True
    with pytest.raises(EngineUnavailable) as exc2:
        bearer.tip()
    assert exc2.value.code == "http-503"
    unreachable = WavesEngine(f"http://127.0.0.1:{free_port()}", origin=ORIGIN, sender=SENDER)
    with pytest.raises(EngineUnavailable):
        unreachable.tip()


def test_fit_respects_the_node_limits(fake: WavesFake) -> None:
    engine = _engine(fake)
    small = [AnchorItem(i, b"x" * 100) for i in range(250)]
    assert engine.fit(small) == 100
    big = [AnchorItem(i, b"x" * 30_000) for i in range(10)]
    assert engine.fit(big) == 5  # 153,600 bytes per transaction
    assert engine.fit([AnchorItem(0, b"x" * (MAX_VALUE_BYTES + 1))]) == 0
    txid = engine.publish(big[:5], engine.prepare(big[:5]))
    assert txid and fake.invalid == []


def test_fake_validates_requests_against_the_openapi_document(fake: WavesFake) -> None:
    client = StarletteClient(fake.app, base_url="http://waves.test")
    headers = {"X-API-Key": API_KEY}
    good = {
        "type": 12,
        "version": 2,
        "sender": SENDER,
        "author": SENDER,
        "fee": 5_000_000,
        "timestamp": 1,
        "data": [{"key": "k", "type": "binary", "value": "base64:AA=="}],
    }
    assert client.post("/transactions/signAndBroadcast", json=good, headers=headers).is_success
    for broken in (
        {**good, "fee": "5"},
        {**good, "timestamp": 2**64},
        {**good, "data": [{"key": "k", "type": "blob", "value": "x"}]},
        {**good, "data": [{"key": "k", "type": "binary"}]},
        {**good, "password": 7},
        {k: v for k, v in good.items() if k != "sender"},
    ):
        r = client.post("/transactions/signAndBroadcast", json=broken, headers=headers)
        assert r.status_code == 400 and set(r.json()) == {"error", "message"}
    r = client.get("/transactions/address/x/limit/abc", headers=headers)
    assert r.status_code == 400


# -- relay over a real database ---------------------------------------------------------------


@pytest.fixture
def waves_env(settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, Any, Database]]:
    lsettings = ledger_settings(
        tmp_path,
        engine="waves",
        waves_url="http://waves.test",
        waves_sender=SENDER,
        relay_in_process=False,
        origin=ORIGIN,
    )
    app = ledger_app(settings, lsettings)
    db = Database(settings.database_url, pool_size=4)
    with TestClient(app, base_url="https://testserver", headers=FHIR_JSON) as c:
        yield c, lsettings, db
    db.dispose()


def _write(client: TestClient, n: int) -> None:
    for _ in range(n):
        assert client.post("/fhir/Consent", json=consent_resource()).status_code == 201


def _counts(db: Database) -> dict[str, int]:
    with db.read() as conn:
        return outbox.status_counts(conn)


def _assert_exactly_once(fake: WavesFake, n: int) -> None:
    keys = fake.anchored_keys()
    assert sorted(keys) == sorted(data_key(ORIGIN, s) for s in range(n))
    assert set(keys.values()) == {1}


def test_relay_batches_confirms_and_verifies(
    waves_env: tuple[TestClient, Any, Database], fake: WavesFake
) -> None:
    client, lsettings, db = waves_env
    _write(client, 230)
    assert _counts(db) == {"pending": 230}
    relay = Relay(db, _engine(fake), lsettings.model_copy(update={"confirmations": 2}))
    relay.step()
    assert _counts(db) == {"sent": 230}
    assert fake.broadcasts == 3  # 100 + 100 + 30
    fake.mine()
    relay.step()
    assert _counts(db) == {"sent": 230}  # in a block, not yet k = 2 deep
    fake.mine()
    fake.mine()
    relay.step()
    assert _counts(db) == {"confirmed": 230}
    with db.read() as conn:
        heights = set(conn.execute(sa.select(ledger_outbox.c.height)).scalars())
        assert heights == {2}
    _assert_exactly_once(fake, 230)
    ring = KeyRing.load(lsettings.keys_dir)
    report = verify_ledger(db, ring.verify_keys(), ORIGIN, engine=_engine(fake), scan_chain=True)
    assert report.ok, report.problems
    assert report.anchored_checked == 230
    assert fake.invalid == []


class LossyEngine(WavesEngine):
    """Broadcasts, then 'crashes' before the reply is recorded (lost reply / kill -9)."""

    lose = 1

    def publish(self, items: Any, params: Any) -> str:
        txid = super().publish(items, params)
        if self.lose:
            self.lose -= 1
            raise EngineUnavailable("reply lost", code="timeout")
        return txid


def test_lost_reply_is_found_not_resent(
    waves_env: tuple[TestClient, Any, Database], fake: WavesFake
) -> None:
    client, lsettings, db = waves_env
    _write(client, 5)
    engine = LossyEngine(
        "http://waves.test",
        origin=ORIGIN,
        sender=SENDER,
        api_key=API_KEY,
        client=StarletteClient(fake.app, base_url="http://waves.test"),
    )
    relay = Relay(db, engine, lsettings, rng=lambda: 0.0)
    relay.step()
    assert _counts(db) == {"pending": 5}  # rows in a prepared batch, reply never recorded
    assert fake.broadcasts == 1
    wait_for(lambda: relay.step() is not None and _counts(db) == {"sent": 5}, timeout=10)
    assert fake.broadcasts == 1  # found in the UTX pool, not broadcast again
    fake.mine()
    assert relay.drain(10)
    assert _counts(db) == {"confirmed": 5}
    _assert_exactly_once(fake, 5)


def test_rejections_back_off_and_recover(
    waves_env: tuple[TestClient, Any, Database], fake: WavesFake
) -> None:
    client, lsettings, db = waves_env
    _write(client, 3)
    fake.reject_next = 2
    fake.block_interval = 0.02
    relay = Relay(db, _engine(fake), lsettings)
    relay.step()
    with db.read() as conn:
        batch = conn.execute(sa.select(ledger_batch)).one()
    assert batch.state == "prepared" and batch.last_error == "waves-199"
    assert relay.next_delay() > 0
    assert relay.drain(15)
    assert _counts(db) == {"confirmed": 3}
    _assert_exactly_once(fake, 3)


def test_two_relays_never_double_publish(
    waves_env: tuple[TestClient, Any, Database], fake: WavesFake
) -> None:
    client, lsettings, db = waves_env
    _write(client, 150)
    a = Relay(db, _engine(fake), lsettings, holder="a")
    b = Relay(db, _engine(fake), lsettings, holder="b")
    ra, rb = a.step(), b.step()
    assert ra.leased and not rb.leased  # one publisher at a time
    a.release()
    fake.mine()
    assert b.drain(10)  # takes over after the release
    _assert_exactly_once(fake, 150)


def test_oversized_entry_is_skipped_and_reported(
    waves_env: tuple[TestClient, Any, Database], fake: WavesFake
) -> None:
    client, lsettings, db = waves_env
    big = consent_resource()
    big["provision"]["purpose"] = [
        {"system": "http://example.org/p", "code": f"c{i}" + "x" * 60} for i in range(500)
    ]
    _write(client, 1)
    assert client.post("/fhir/Consent", json=big).status_code == 201
    _write(client, 1)
    fake.block_interval = 0.02
    relay = Relay(db, _engine(fake), lsettings)
    assert relay.drain(10)
    assert _counts(db) == {"confirmed": 2, "skipped": 1}
    with db.read() as conn:
        note = conn.execute(
            sa.select(ledger_outbox.c.note).where(ledger_outbox.c.seq == 1)
        ).scalar_one()
        assert "too large" in note
        assert (
            len(
                conn.execute(
                    sa.select(ledger_entry.c.data).where(ledger_entry.c.seq == 1)
                ).scalar_one()
            )
            > MAX_VALUE_BYTES
        )


def test_outage_writes_continue_and_backlog_drains(settings: Settings, tmp_path: Path) -> None:
    """The in-process relay (started by install) against the fake over HTTP: 503s for a
    while, FHIR writes keep succeeding, then the backlog drains; nothing lost or twice."""
    fake = WavesFake(block_interval=0.05)
    with ThreadedServer(fake.app, free_port()) as node:
        lsettings = ledger_settings(
            tmp_path,
            engine="waves",
            waves_url=node.url,
            waves_sender=SENDER,
            waves_api_key=API_KEY,
            origin=ORIGIN,
            confirmations=1,
        )
        app = ledger_app(settings, lsettings)
        db = Database(settings.database_url, pool_size=2)
        try:
            with TestClient(app, base_url="https://testserver", headers=FHIR_JSON) as client:
                _write(client, 20)
                wait_for(lambda: _counts(db).get("confirmed") == 20)
                fake.outage = True
                seen = fake.requests
                _write(client, 60)  # every write succeeds while the node is down
                wait_for(lambda: fake.requests > seen + 3)  # the relay kept trying
                assert _counts(db).get("confirmed") == 20
                fake.outage = False
                wait_for(lambda: _counts(db) == {"confirmed": 80}, timeout=30)
            _assert_exactly_once(fake, 80)
            ring = KeyRing.load(lsettings.keys_dir)
            engine = WavesEngine(node.url, origin=ORIGIN, sender=SENDER, api_key=API_KEY)
            report = verify_ledger(db, ring.verify_keys(), ORIGIN, engine=engine, scan_chain=True)
            engine.close()
            assert report.ok, report.problems
            assert fake.invalid == []
        finally:
            db.dispose()
