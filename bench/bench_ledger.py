"""Benchmarks of the permissions ledger (issue 5), results into ``docs/benchmarks.md`` "Ledger".

1. **Consent write latency, ledger on vs off** — ``POST /fhir/Consent`` through the whole
   server (``create_app``: consent layer, ledger, documents, web) in process (no network),
   and the same create through ``ResourceService`` with the app's write listeners (the write
   transaction alone), on SQLite and PostgreSQL; median and p95 of ``--writes`` sequential
   writes, alternating on/off runs ("off" = ``LedgerSettings(enabled=False)``). Target:
   median ≤ +2 ms.
2. **Embedded log append throughput** — :meth:`EmbeddedLog.append` of prepared entries in
   transactions of 500 entries (sign + seal + Merkle nodes + rows; PostgreSQL gets the rows by
   binary COPY), one thread. Target: ≥ 5,000 entries/s on one core. Besides wall-clock (which
   a busy machine depresses), entries per CPU-second of this process and — on PostgreSQL —
   of this process plus its PostgreSQL backend (``/proc/<pid>/stat``), i.e. one core doing
   all the work.
3. **Relay throughput to Anvil** — ``--relay-entries`` pending entries drained by one relay
   into a real Anvil node (anvil mines each transaction at once), with the node signing
   (``eth_sendTransaction``) and with transactions signed here (``eth_sendRawTransaction``).
   Skipped without anvil.
4. **Proof generation at 10^6 entries** — inclusion proofs (RFC 9162 §2.1.3) for random
   leaves of a 1,000,000-leaf tree stored in ``ledger_node`` (SQLite), and consistency
   proofs; median per proof. Target ≤ 1 ms.

    python bench/bench_ledger.py            # full (~3 minutes), rewrites the doc section
    python bench/bench_ledger.py --quick    # smoke (~30 s), prints only

Only loopback traffic (Anvil on 127.0.0.1); every loop is bounded.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "ledger"))

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:ledger:begin -->", "<!-- bench:ledger:end -->"


def _quiet_logs() -> None:
    import logging

    logging.getLogger("fhir_consent").setLevel(logging.ERROR)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _migrated_sqlite(tmp: Path, name: str) -> str:
    from fhir_consent.store.migrate import upgrade

    url = f"sqlite:///{tmp / name}"
    upgrade(url)
    return url


# -- 1. write latency ------------------------------------------------------------------------


def bench_write_latency(tmp: Path, writes: int, pg_url: str | None) -> dict[str, Any]:
    """The whole server (``create_app``: consent layer, ledger, documents, web) with the ledger
    on and off, in process, on SQLite and (when it answers) PostgreSQL."""
    from fastapi.testclient import TestClient
    from ledger_testkit import FHIR_JSON, consent_resource, ledger_settings

    from fhir_consent.app import create_app
    from fhir_consent.config import Settings
    from fhir_consent.fhir.services import ResourceService

    body = consent_resource()
    backends = [("sqlite", None)] + ([("postgresql", pg_url)] if pg_url else [])
    out: dict[str, Any] = {"writes": writes, "backends": [b for b, _ in backends]}
    for backend, base_url in backends:
        results: dict[str, dict[str, list[float]]] = {
            "http": {"off": [], "on": []},
            "service": {"off": [], "on": []},
        }
        cpu: dict[str, list[float]] = {"off": [], "on": []}  # service layer, CPU seconds
        apps: dict[str, Any] = {}
        for mode in ("off", "on"):
            if base_url is None:
                url = _migrated_sqlite(tmp, f"latency-{mode}.sqlite3")
            else:
                url = _pg_schema(base_url, f"lat_{mode}")
            settings = Settings(database_url=url, auto_migrate=False, open_access=True)
            ledger = ledger_settings(tmp / f"lat-{backend}", enabled=mode == "on")
            apps[mode] = create_app(settings, ledger=ledger)
        clients = {
            m: TestClient(a, base_url="https://testserver", headers=FHIR_JSON)
            for m, a in apps.items()
        }
        for c in clients.values():
            c.__enter__()
        try:
            for c in clients.values():  # warm-up
                for _ in range(30):
                    c.post("/fhir/Consent", json=body)
            rounds = 10
            for _ in range(rounds):
                for mode in ("off", "on"):
                    for _ in range(writes // rounds):
                        t = time.perf_counter()
                        r = clients[mode].post("/fhir/Consent", json=body)
                        results["http"][mode].append(time.perf_counter() - t)
                        assert r.status_code == 201, r.text
                    ctx = apps[mode].state.fhir
                    for _ in range(writes // rounds):
                        t, c0 = time.perf_counter(), time.thread_time()
                        with ctx.db.write() as conn:
                            ResourceService(conn, listeners=ctx.listeners).create(
                                "Consent", dict(body)
                            )
                        results["service"][mode].append(time.perf_counter() - t)
                        cpu[mode].append(time.thread_time() - c0)
        finally:
            for c in clients.values():
                c.__exit__(None, None, None)
        p = f"{backend}_"
        for layer, modes in results.items():
            for mode, values in modes.items():
                out[f"{p}{layer}_{mode}_p50"] = statistics.median(values) * 1000
                out[f"{p}{layer}_{mode}_p95"] = _pct(values, 0.95) * 1000
            out[f"{p}{layer}_delta_p50"] = out[f"{p}{layer}_on_p50"] - out[f"{p}{layer}_off_p50"]
        out[f"{p}cpu_off_p50"] = statistics.median(cpu["off"]) * 1000
        out[f"{p}cpu_on_p50"] = statistics.median(cpu["on"]) * 1000
        out[f"{p}cpu_delta_p50"] = out[f"{p}cpu_on_p50"] - out[f"{p}cpu_off_p50"]
    return out


# -- 2. append throughput --------------------------------------------------------------------


def _items(n: int, start: int = 0) -> list[Any]:
    import orjson
    from ledger_testkit import consent_json

    from fhir_consent.ledger.embedded import NewEntry

    body = orjson.loads(consent_json())
    items = []
    for i in range(start, start + n):
        doc = dict(body, id=f"c{i}", meta={"versionId": "1", "lastUpdated": "2024-05-01T12:00:00Z"})
        items.append(
            NewEntry(
                kind="Consent",
                ref=f"Consent/c{i}/_history/1",
                event="proposed",
                patient_ref=f"Patient/p{i % 1000}",
                resource=orjson.dumps(doc, option=orjson.OPT_SORT_KEYS),
                actor="Organization/o2",
                ts_us=1_714_564_800_000_000 + i,
            )
        )
    return items


def _proc_cpu(pid: int | None) -> float:
    """User + system CPU seconds of a local process (Linux /proc), 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_AFFINITY: dict[int, set[int]] = {}


def _pin(pids: list[int], core: int | None) -> bool:
    """Pin processes (0 = this one) to ``core``; False when the OS does not let us."""
    if core is None:
        return False
    try:
        for pid in pids:
            _AFFINITY[pid] = os.sched_getaffinity(pid)
            os.sched_setaffinity(pid, {core})
    except OSError:
        return False
    return True


def _unpin(pids: list[int], pinned: bool) -> None:
    if not pinned:
        return
    for pid in pids:
        try:
            os.sched_setaffinity(pid, _AFFINITY.pop(pid))
        except (OSError, KeyError):
            pass


def bench_append(tmp: Path, total: int, batch: int, pg_url: str | None) -> dict[str, Any]:
    from fhir_consent.crypto import KeyRing
    from fhir_consent.ledger.embedded import EmbeddedLog
    from fhir_consent.store.db import Database

    ring = KeyRing.generate(tmp / "append-keys")
    out: dict[str, Any] = {"total": total, "batch": batch}
    targets = [("sqlite", _migrated_sqlite(tmp, "append.sqlite3"))]
    if pg_url:
        targets.append(("postgresql", pg_url))
    # One core, honestly: this process (and, on PostgreSQL, its backend) pinned to one CPU
    # for the append, so the wall-clock figure is what one core does (less whatever other
    # jobs on the machine take of that core: the load average is printed beside it).
    core = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    for name, url in targets:
        db = Database(url, pool_size=1)
        log = EmbeddedLog(ring, "bench.example/ledger", clock=lambda: 0, outbox=True)
        items = _items(total)
        backend_pid = None
        if name == "postgresql":  # the server process doing our inserts (same machine)
            with db.read() as conn:
                backend_pid = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        pinned = _pin([0] + ([backend_pid] if backend_pid else []), core)
        out[f"{name}_pinned"] = pinned
        out[f"{name}_load"] = os.getloadavg()[0]
        server0 = _proc_cpu(backend_pid)
        cpu0, t0 = time.process_time(), time.perf_counter()
        for start in range(0, total, batch):
            with db.write() as conn:
                log.append(conn, items[start : start + batch])
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        _unpin([0] + ([backend_pid] if backend_pid else []), pinned)
        out[f"{name}_per_s"] = total / elapsed
        out[f"{name}_cpu_share"] = cpu / elapsed
        out[f"{name}_per_cpu_s"] = total / cpu
        if backend_pid is not None:
            server = _proc_cpu(backend_pid) - server0
            out[f"{name}_server_cpu_s"] = server
            out[f"{name}_per_total_cpu_s"] = total / (cpu + server)
            out[f"{name}_total_cpu_share"] = (cpu + server) / elapsed
        db.dispose()
    # the crypto alone (build_entry: canonical JSON, seal, sign), for reference
    from fhir_consent.ledger.embedded import _us_to_datetime
    from fhir_consent.ledger.entry import build_entry

    items = _items(2000)
    t0, c0 = time.perf_counter(), time.process_time()
    for i, it in enumerate(items):
        build_entry(
            i,
            _us_to_datetime(it.ts_us),
            it.kind,
            it.ref,
            it.event,
            it.patient_ref,
            it.resource,
            it.actor,
            ring,
        )
    out["build_only_per_s"] = len(items) / (time.perf_counter() - t0)
    out["build_only_per_cpu_s"] = len(items) / (time.process_time() - c0)
    return out


# -- 3. relay to Anvil -----------------------------------------------------------------------


def bench_relay(tmp: Path, entries: int) -> dict[str, Any] | None:
    from conftest import free_port
    from ledger_testkit import Anvil, anvil_binary, ledger_settings

    from fhir_consent.crypto import KeyRing
    from fhir_consent.ledger.embedded import EmbeddedLog
    from fhir_consent.ledger.engines.evm import EvmEngine
    from fhir_consent.ledger.relay import Relay
    from fhir_consent.store.db import Database

    binary = anvil_binary()
    if binary is None:
        return None
    out: dict[str, Any] = {"entries": entries}
    for mode in ("unlocked", "raw"):
        work = tmp / f"relay-{mode}"
        work.mkdir()
        node = Anvil(binary, work, free_port())
        node.start()
        try:
            url = _migrated_sqlite(work, "relay.sqlite3")
            db = Database(url, pool_size=2)
            ring = KeyRing.generate(work / "relay-keys")
            log = EmbeddedLog(ring, "bench.example/ledger", clock=lambda: 0, outbox=True)
            items = _items(entries)
            for start in range(0, entries, 500):
                with db.write() as conn:
                    log.append(conn, items[start : start + 500])
            settings = ledger_settings(
                work,
                engine="evm",
                evm_url=node.url,
                origin="bench.example/ledger",
                confirmations=0,
            )
            signer = None
            if mode == "raw":  # a key the node does not hold: signed here, eth_sendRawTransaction
                from eth_account import Account

                signer = Account.create()
                probe = EvmEngine(node.url, origin="-", account="0x" + "0" * 40)
                probe.rpc("anvil_setBalance", signer.address, hex(10**20))
                probe.close()
            engine = EvmEngine(node.url, origin="bench.example/ledger", signer=signer)
            relay = Relay(db, engine, settings, max_new_batches=1000)
            t0 = time.perf_counter()
            assert relay.drain(600), "relay did not drain"
            elapsed = time.perf_counter() - t0
            out[f"{mode}_per_s"] = entries / elapsed
            out[f"{mode}_seconds"] = elapsed
            out[f"{mode}_txs"] = sum(1 for _ in engine.scan())
            engine.close()
            db.dispose()
        finally:
            node.stop()
    return out


# -- 4. proofs at 10^6 -----------------------------------------------------------------------


def bench_proofs(tmp: Path, leaves: int, samples: int) -> dict[str, Any]:
    import hashlib

    import sqlalchemy as sa

    from fhir_consent.ledger.embedded import DbTreeStore
    from fhir_consent.ledger.merkle import (
        CompactRange,
        consistency_proof,
        inclusion_proof,
        tree_root,
        verify_consistency,
        verify_inclusion,
    )
    from fhir_consent.ledger.tables import ledger_node
    from fhir_consent.store.db import Database

    url = _migrated_sqlite(tmp, "proofs.sqlite3")
    db = Database(url, pool_size=1)
    cr = CompactRange()
    t0 = time.perf_counter()
    batch: list[dict[str, Any]] = []
    leaf_hashes: list[bytes] = []
    with db.write() as conn:
        for i in range(leaves):
            leaf = hashlib.sha256(b"\x00" + i.to_bytes(8, "big")).digest()
            leaf_hashes.append(leaf)
            batch.extend({"level": lv, "idx": ix, "hash": h} for lv, ix, h in cr.append(leaf))
            if len(batch) >= 50_000:
                conn.execute(ledger_node.insert(), batch)
                batch = []
        if batch:
            conn.execute(ledger_node.insert(), batch)
    build_s = time.perf_counter() - t0
    root = cr.root()
    rng = random.Random(5)
    incl: list[float] = []
    cons: list[float] = []
    with db.read() as conn:
        store = DbTreeStore(conn, readonly=True)
        assert tree_root(leaves, store) == root
        count = conn.execute(sa.select(sa.func.count()).select_from(ledger_node)).scalar_one()
        for _ in range(samples):
            index = rng.randrange(leaves)
            t = time.perf_counter()
            proof = inclusion_proof(index, leaves, store)
            incl.append(time.perf_counter() - t)
            verify_inclusion(leaf_hashes[index], index, leaves, proof, root)
            m = rng.randrange(1, leaves)
            t = time.perf_counter()
            cproof = consistency_proof(m, leaves, store)
            cons.append(time.perf_counter() - t)
            if len(cons) <= 5:
                verify_consistency(m, leaves, cproof, tree_root(m, store), root)
    db.dispose()
    return {
        "leaves": leaves,
        "nodes": count,
        "build_s": build_s,
        "inclusion_p50_ms": statistics.median(incl) * 1000,
        "inclusion_p95_ms": _pct(incl, 0.95) * 1000,
        "consistency_p50_ms": statistics.median(cons) * 1000,
        "samples": samples,
    }


# -- report ----------------------------------------------------------------------------------


def _one_core(app: dict[str, Any], name: str) -> str:
    where = "pinned to one core" if app.get(f"{name}_pinned") else "(not pinned: no affinity)"
    return f"{where}, load average {app[f'{name}_load']:.1f}"


def _section(r: dict[str, Any], quick: bool) -> str:
    lat, app, relay, proofs = r["latency"], r["append"], r["relay"], r["proofs"]
    lines = [
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
        + (" (quick)" if quick else "")
        + f", load average {r['load'][0]:.1f} at the start and {r['load'][1]:.1f} at the end"
        + ": `python bench/bench_ledger.py`.",
        "",
        "| measure (whole server, `create_app`) | ledger off | ledger on | difference | target |",
        "|---|---|---|---|---|",
    ]
    for b in lat["backends"]:
        lines += [
            f"| {b}: `POST /fhir/Consent` in process, median (p95) | "
            f"{lat[b + '_http_off_p50']:.2f} ms ({lat[b + '_http_off_p95']:.2f}) | "
            f"{lat[b + '_http_on_p50']:.2f} ms ({lat[b + '_http_on_p95']:.2f}) | "
            f"{lat[b + '_http_delta_p50']:+.2f} ms | ≤ +2 ms |",
            f"| {b}: Consent create transaction alone, median (p95) | "
            f"{lat[b + '_service_off_p50']:.2f} ms ({lat[b + '_service_off_p95']:.2f}) | "
            f"{lat[b + '_service_on_p50']:.2f} ms ({lat[b + '_service_on_p95']:.2f}) | "
            f"{lat[b + '_service_delta_p50']:+.2f} ms | ≤ +2 ms |",
            f"| {b}: same, CPU time of the writing thread, median | "
            f"{lat[b + '_cpu_off_p50']:.2f} ms | {lat[b + '_cpu_on_p50']:.2f} ms | "
            f"{lat[b + '_cpu_delta_p50']:+.2f} ms | ≤ +2 ms |",
        ]
    lines += [
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| embedded log append, SQLite, {app['batch']} entries per commit | "
        f"{app['sqlite_per_cpu_s']:,.0f} entries per CPU-second; wall-clock "
        f"{app['sqlite_per_s']:,.0f} entries/s {_one_core(app, 'sqlite')}, of which this "
        f"process got {app['sqlite_cpu_share']:.0%} | ≥ 5,000/s |",
    ]
    if "postgresql_per_s" in app:
        lines.append(
            f"| embedded log append, PostgreSQL, {app['batch']} per commit (binary COPY) | "
            f"{app['postgresql_per_total_cpu_s']:,.0f} entries per CPU-second of this process "
            f"and its PostgreSQL backend together ({app['postgresql_per_cpu_s']:,.0f} per "
            f"CPU-second of this process alone); wall-clock {app['postgresql_per_s']:,.0f} "
            f"entries/s {_one_core(app, 'postgresql')}, of which both processes got "
            f"{app['postgresql_total_cpu_share']:.0%} | ≥ 5,000/s |"
        )
    lines.append(
        f"| entry construction alone (canonical JSON + sealed box + Ed25519) | "
        f"{app['build_only_per_s']:,.0f} entries/s wall-clock; "
        f"{app['build_only_per_cpu_s']:,.0f} per CPU-second | — |"
    )
    if relay is not None:
        for mode, how in (
            ("unlocked", "eth_sendTransaction"),
            ("raw", "signed here, eth_sendRawTransaction"),
        ):
            lines.append(
                f"| relay to Anvil (EVM, {how}), {relay['entries']:,} entries | "
                f"{relay[mode + '_per_s']:,.0f} entries/s ({relay[mode + '_txs']} transactions, "
                f"{relay[mode + '_seconds']:.1f} s) | — |"
            )
    else:
        lines.append("| relay to Anvil | not run (anvil not installed) | — |")
    lines += [
        f"| inclusion proof at {proofs['leaves']:,} entries (SQLite `ledger_node`, "
        f"{proofs['nodes']:,} rows), median (p95) | {proofs['inclusion_p50_ms']:.3f} ms "
        f"({proofs['inclusion_p95_ms']:.3f}) | ≤ 1 ms |",
        f"| consistency proof at {proofs['leaves']:,} entries, median | "
        f"{proofs['consistency_p50_ms']:.3f} ms | — |",
        "",
    ]
    return "\n".join(lines)


_INTRO = """
## Ledger

`python bench/bench_ledger.py` (about 4 minutes; `--quick` for a smoke run that prints only)
measures the permissions ledger of issue 5 (see the module docstring for exactly what):
the latency a Consent write pays for its ledger entry on the whole server (`create_app`, on
SQLite and PostgreSQL), the embedded log's append throughput with batched commits, the
relay's throughput to a real Anvil node (`npm install --prefix .tools @foundry-rs/anvil`) with
node-signed and locally signed transactions, and RFC 9162 proof generation from the stored
tree at 10^6 entries. The machine is shared by several jobs: wall-clock figures fall with the
load average printed in the run line, so the CPU-second figures are printed beside them (the
append target is about one core: see "per CPU-second of this process and its PostgreSQL
backend together").

"""


def write_doc(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + BEGIN + "\n" + section + "\n" + END + tail
    else:
        text = text.rstrip("\n") + "\n" + _INTRO + BEGIN + "\n" + section + "\n" + END + "\n"
    DOC.write_text(text)


def _pg_url() -> str | None:
    import sqlalchemy as sa

    url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    try:
        engine = sa.create_engine(url, poolclass=sa.NullPool)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception:  # noqa: BLE001 - not available
        return None
    schema = f"bench_ledger_{os.getpid()}"
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    from fhir_consent.store.migrate import upgrade

    scoped = f"{url}?options=-csearch_path%3D{schema}"
    upgrade(scoped)
    return scoped


_EXTRA_SCHEMAS: list[str] = []


def _pg_schema(url: str, name: str) -> str:
    """Another migrated schema beside the one of ``url`` (dropped with it)."""
    import sqlalchemy as sa

    from fhir_consent.store.migrate import upgrade

    schema = f"{url.rsplit('%3D', 1)[1]}_{name}"
    engine = sa.create_engine(url.split("?")[0], poolclass=sa.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    _EXTRA_SCHEMAS.append(schema)
    scoped = f"{url.split('?')[0]}?options=-csearch_path%3D{schema}"
    upgrade(scoped)
    return scoped


def _drop_pg(url: str | None) -> None:
    if url is None:
        return
    import sqlalchemy as sa

    schemas = [url.rsplit("%3D", 1)[1], *_EXTRA_SCHEMAS]
    engine = sa.create_engine(url.split("?")[0], poolclass=sa.NullPool)
    with engine.begin() as conn:
        for schema in schemas:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write-doc", action="store_true", help="also with --quick")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    _quiet_logs()
    q = args.quick
    results: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[Path], Any]]] = []
    pg = None if args.no_postgres else _pg_url()
    load_start = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            cwd = os.getcwd()
            os.chdir(tmp)  # the whole server's default key files land there
            steps = [
                ("latency", lambda t: bench_write_latency(t, 200 if q else 1000, pg)),
                ("append", lambda t: bench_append(t, 2_000 if q else 20_000, 500, pg)),
                ("relay", lambda t: bench_relay(t, 300 if q else 3_000)),
                (
                    "proofs",
                    lambda t: bench_proofs(t, 50_000 if q else 1_000_000, 300 if q else 2_000),
                ),
            ]
            for name, fn in steps:
                t0 = time.perf_counter()
                results[name] = fn(tmp)
                print(f"{name}: {results[name]}  ({time.perf_counter() - t0:.1f} s)", flush=True)
            os.chdir(cwd)
    finally:
        _drop_pg(pg)
    results["load"] = (load_start, os.getloadavg()[0])
    section = _section(results, q)
    print(section)
    if not q or args.write_doc:
        write_doc(section)
        print(f"wrote the Ledger section of {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
