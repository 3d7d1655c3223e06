"""How long a patient's revocation waits while audited reads hammer the server (issue 4 §3).

Real HTTP: the app with the consent layer and the batched audit writer, served by uvicorn on a
loopback port in this process; N reader threads (httpx, keep-alive) read and search a granted
document as the clinic while the patient flips the grant (``PUT Consent``: inactive, active,
…) every 0.2 s. Per configuration, in the same run:

* ``audit off`` — the baseline: no audit writer competes for the write lock;
* ``audit on, gap = flush interval`` — the writer as shipped but pausing only its flush
  interval between transactions (what it did before the fix), to show the pause's effect;
* ``audit on`` — the server's configuration;
* with ``--ref REV``: ``audit on @REV`` — the same measurement on the code of git revision
  ``REV`` (exported with ``git archive``, run in a subprocess), e.g. the commit before the fix.

Reported: the PUT's latency (median, max), reads per second, and AuditEvents still queued at
the end. Callers come from the consent tests' kit (``tests/consent/consent_kit.py``: bearer
names mapped to callers), as in ``tests/consent/test_live.py``.

    python bench/bench_revocation.py                       # SQLite and PostgreSQL, 8 and 24 readers
    python bench/bench_revocation.py --backends sqlite --readers 24 --flips 10
    python bench/bench_revocation.py --ref a78442b          # plus the code before the fix
    python bench/bench_revocation.py --write-doc           # also rewrite docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests", ROOT / "tests" / "consent"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import httpx  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from consent_kit import Caller, LiveServer, document, inquiry, make_env  # noqa: E402

from fhir_consent.config import Settings  # noqa: E402
from fhir_consent.store.migrate import upgrade  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- bench:revocation:begin -->"
END = "<!-- bench:revocation:end -->"
PG_BASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
P = "Patient/bench"
VARIANTS = ("audit off", "audit on, gap = flush interval", "audit on")


def _headers(name: str) -> dict[str, str]:
    return {
        "authorization": f"Bearer {name}",
        "accept": "application/fhir+json",
        "content-type": "application/fhir+json",
    }


@contextmanager
def database(kind: str) -> Iterator[str]:
    """A fresh, migrated database of ``kind``."""
    if kind not in ("sqlite", "postgres"):
        raise SystemExit(f"unknown backend {kind!r} (sqlite, postgres)")
    if kind == "sqlite":
        tmp = tempfile.mkdtemp(prefix="bench-revocation-")
        url = f"sqlite:///{tmp}/db.sqlite3"
        upgrade(url)
        try:
            yield url
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    schema = f"bench_rev_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_BASE, poolclass=sa.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_BASE}?options=-csearch_path%3D{schema}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def run(url: str, variant: str, readers: int, flips: int) -> dict[str, Any]:
    settings = Settings(database_url=url, auto_migrate=False, db_pool_size=4, open_access=True)
    with make_env(settings) as env:
        # the server's default (the kit's is 0.02)
        default = Settings.model_fields["audit_flush_interval"].default
        env.audit.flush_interval = default
        if hasattr(env.audit, "gap"):  # (an older revision's writer pauses flush_interval)
            env.audit.gap = max(env.audit.gap, default)
        if variant == "audit off":
            env.app.state.fhir.audit = None
        elif variant == "audit on, gap = flush interval":
            env.audit.gap = env.audit.flush_interval
        env.as_open()
        env.put({"resourceType": "Patient", "id": "bench"})
        for org in ("clinic", "hospital"):
            env.put({"resourceType": "Organization", "id": org})
        env.caller.named.update(
            {
                "clinic": Caller.system("Organization/clinic"),
                "hospital": Caller.system("Organization/hospital"),
                "patient": Caller.patient("bench"),
            }
        )
        with LiveServer(env.app) as server, httpx.Client(base_url=server.base + "/") as http:
            doc = http.post(
                "DocumentReference",
                json=document(P, custodian="Organization/hospital"),
                headers=_headers("hospital"),
            ).json()["id"]
            consent = http.post(
                "Consent",
                json=inquiry(P, ["Organization/clinic"], status="active"),
                headers=_headers("patient"),
            ).json()
            stop = threading.Event()
            count = [0]

            def reader(search: bool) -> None:
                with httpx.Client(base_url=server.base + "/", timeout=120) as c:
                    while not stop.is_set():
                        if search:
                            c.get(f"DocumentReference?patient={P}", headers=_headers("clinic"))
                        else:
                            c.get(f"DocumentReference/{doc}", headers=_headers("clinic"))
                        count[0] += 1

            threads = [threading.Thread(target=reader, args=(i % 2 == 0,)) for i in range(readers)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            started, latencies = time.monotonic(), []
            for k in range(flips):
                status = "inactive" if k % 2 == 0 else "active"
                t0 = time.monotonic()
                r = http.put(
                    f"Consent/{consent['id']}",
                    json=consent | {"status": status},
                    headers=_headers("patient"),
                    timeout=120,
                )
                latencies.append(time.monotonic() - t0)
                assert r.status_code == 200, r.text
                consent = r.json()
                time.sleep(0.2)
            elapsed = time.monotonic() - started
            stop.set()
            for t in threads:
                t.join()
            queued = env.audit._pending if variant != "audit off" else 0
    return {
        "median": statistics.median(latencies),
        "max": max(latencies),
        "reads": count[0] / elapsed,
        "queued": queued,
    }


def report(rows: list[tuple[str, int, str, dict[str, Any]]], argv: str) -> str:
    lines = [
        f"Command: `python bench/bench_revocation.py {argv}`".rstrip(),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other work while "
        "measured; re-run for clean figures).",
        "",
        "| backend | readers | configuration | revocation PUT median | max | reads/s | queued |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, readers, variant, r in rows:
        lines.append(
            f"| {backend} | {readers} | {variant} | {r['median'] * 1000:.0f} ms "
            f"| {r['max'] * 1000:.0f} ms | {r['reads']:.0f} | {r['queued']} |"
        )
    return "\n".join(lines)


def at_revision(ref: str, backend: str, readers: int, flips: int, tmp: str) -> dict[str, Any]:
    """``audit on`` measured on the code of git revision ``ref`` (a subprocess)."""
    tree = Path(tmp) / f"tree-{ref}"
    if not tree.exists():
        tree.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", ref, "fhir_consent", "smart_on_fhir", "tests"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        (tree / "bench").mkdir()
        shutil.copy(__file__, tree / "bench" / "bench_revocation.py")
    out = subprocess.run(
        [sys.executable, str(tree / "bench" / "bench_revocation.py"), "--one"]
        + [backend, str(readers), "audit on", str(flips)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tree)},
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--readers", default="8,24")
    parser.add_argument("--flips", type=int, default=10)
    parser.add_argument("--ref", help="also measure 'audit on' at this git revision")
    parser.add_argument("--write-doc", action="store_true")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # backend readers variant flips
    args = parser.parse_args()
    if args.one:
        backend, readers, variant, flips = args.one
        with tempfile.TemporaryDirectory() as cwd:
            os.chdir(cwd)
            with database(backend) as url:
                print(json.dumps(run(url, variant, int(readers), int(flips))))  # noqa: T201
        return
    rows = []
    with tempfile.TemporaryDirectory() as cwd:
        os.chdir(cwd)  # nothing the app writes lands in the repository
        for backend in args.backends.split(","):
            for readers in (int(n) for n in args.readers.split(",")):
                if args.ref:
                    result = at_revision(args.ref, backend, readers, args.flips, cwd)
                    rows.append((backend, readers, f"audit on @{args.ref}", result))
                    print(backend, readers, args.ref, result, flush=True)  # noqa: T201
                for variant in VARIANTS:
                    with database(backend) as url:
                        result = run(url, variant, readers, args.flips)
                    rows.append((backend, readers, variant, result))
                    print(backend, readers, variant, result, flush=True)  # noqa: T201
    text = report(rows, " ".join(sys.argv[1:]))
    print(text)  # noqa: T201
    if args.write_doc:
        doc = DOC.read_text()
        if BEGIN not in doc:
            doc += (
                "\n## Revocation under audited read load (`bench/bench_revocation.py`)\n\n"
                f"{BEGIN}\n{END}\n"
            )
        head, rest = doc.split(BEGIN, 1)
        DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    main()
