"""Server CPU per read, open and authenticated, over real HTTP: ``GET /fhir/Patient/{id}`` of 16
patients against a uvicorn worker (``fhir_consent.main:app``, as ``bench/run_core.py`` starts
it) on a small fresh data set (500 patients, 5,000 documents), with wrk. ``--mode open``
serves without tokens (``FHIR_CONSENT_OPEN_ACCESS``); ``--mode auth`` is the secured server,
each patient reading their own record with their own token from a real standalone launch
(PKCE), so every read is verified, checked for revocation, consent-filtered and audited.

Prints, per round, req/s, the server process's CPU time per request (``/proc``: the event
loop, the audit writer and worker threads; not the PostgreSQL backend), p99 latency, and at
the end how many AuditEvents were stored. CPU per request moves far less than req/s with
what else the machine runs; an A/B of two trees is this script run from each tree in turn:

    python bench/read_cpu.py --backend sqlite --mode auth --rounds 2 --duration 6
    python /tmp/ab/base/bench/read_cpu.py --backend postgres --mode open
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import bulk_load  # noqa: E402
import run_core  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from loadgen import LoadSpec, RequestTemplate, run_load  # noqa: E402

PLAN = bulk_load.LoadPlan(seed=7, organizations=5, practitioners=10, patients=500, documents=5000)
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_DATABASE = "bench_fc_read_cpu"
READERS = 16


def _database(backend: str, tmp: Path) -> AbstractContextManager[str]:
    """A fresh database, as ``run_core`` makes them (the PostgreSQL one dropped after)."""
    if backend == "sqlite":
        return run_core.sqlite_database(tmp)
    return run_core.postgres_database(PG_ADMIN, PG_DATABASE, keep=False, reuse=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--mode", choices=("open", "auth"), default="auth")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="read-cpu-"))
    with _database(args.backend, tmp) as url:
        _measure(url, args, tmp)


def _measure(url: str, args: argparse.Namespace, tmp: Path) -> None:
    from fhir_consent.store.db import Database
    from fhir_consent.store.migrate import upgrade
    from fhir_consent.store.tables import resources

    upgrade(url)
    bulk_load.load(url, PLAN)
    env = {
        "FHIR_CONSENT_DATABASE_URL": url,
        "FHIR_CONSENT_AUTO_MIGRATE": "false",
        "FHIR_CONSENT_SMART_KEYS_DIR": str(tmp / "smart-keys"),
    }
    if args.mode == "open":
        env["FHIR_CONSENT_OPEN_ACCESS"] = "true"
    ids = [bulk_load.patient_id(PLAN.seed, i) for i in range(READERS)]
    accept = ("Accept", "application/fhir+json")
    log = tmp / "server.log"
    with run_core.serving("fhir_consent.main:app", env, log, "/fhir/metadata") as srv:
        if args.mode == "auth":
            client_id, password, prefix = run_core.provision_patient_logins(url, ids)
            reads = [
                RequestTemplate(
                    f"/fhir/Patient/{pid}",
                    headers=(
                        accept,
                        (
                            "Authorization",
                            "Bearer "
                            + run_core.patient_token(srv.base, client_id, f"{prefix}{i}", password),
                        ),
                    ),
                )
                for i, pid in enumerate(ids)
            ]
        else:
            reads = [RequestTemplate(f"/fhir/Patient/{pid}", headers=(accept,)) for pid in ids]
        spec = LoadSpec(
            port=srv.port, requests=reads, connections=args.connections, duration=args.duration
        )
        run_load(LoadSpec(port=srv.port, requests=reads, connections=args.connections, duration=2))
        for _ in range(args.rounds):
            before = run_core._cpu_seconds(srv.proc.pid)
            result = run_load(spec)
            used = run_core._cpu_seconds(srv.proc.pid) - before
            print(
                f"{args.backend} {args.mode}: {result.rps:,.0f} req/s, "
                f"{used / max(result.requests, 1) * 1e6:,.0f} µs CPU/request, "
                f"p99 {result.p99_ms:.1f} ms, errors {result.errors}",
                flush=True,
            )
    db = Database(url, pool_size=1)
    try:
        with db.read() as conn:
            stored = conn.execute(
                sa.select(sa.func.count()).where(resources.c.res_type == "AuditEvent")
            ).scalar_one()
    finally:
        db.dispose()
    print(f"AuditEvents stored: {stored:,}")


if __name__ == "__main__":
    main()
