"""Soak test (issue 8 §3): a bounded, loopback-only mixed load against ``fhir-consent serve``.

    python bench/soak.py                      # 10 minutes, 2 workers, PostgreSQL
    python bench/soak.py --duration 20        # the CI-sized smoke run

The server runs as a separate process (``fhir-consent serve --workers N``) in a temporary
directory, on the machine's PostgreSQL (``127.0.0.1:5432``, database ``test``) in a schema of
its own that is dropped afterwards (``--database-url`` for another one). Documents are stored
encrypted in the database. After seeding (patients, consents, documents with 64 KiB of
content), ``--clients`` threads run a fixed mix until ``--duration`` has passed:

==========  ======  =====================================================================
kind        share   request
==========  ======  =====================================================================
read        30 %    ``GET Patient/{id}``
search      25 %    ``GET Patient?family=…`` and ``GET Consent?patient=…``
consent     15 %    grant or revoke: ``PUT Consent/{id}`` (status active ↔ inactive,
                    ``If-Match``), each one a new version with its ledger entry
download    25 %    ``GET Binary/{id}`` (decrypted, verified, 64 KiB)
baseline     5 %    ``GET metadata``: no database work; its latency in the same run shows
                    what the machine and the HTTP stack alone cost
==========  ======  =====================================================================

The report gives per kind the request count, errors (anything but the expected 2xx, or a
transport error), p50/p95/p99 latency, and the server's resident memory (supervisor plus
workers, sampled every 5 s). The run fails (exit 1) on any error or when memory grows by
more than ``--rss-growth-mb`` between the end of the first tenth of the run (warm-up: caches,
pools, lazily imported code) and the end. Open access: this measures the storage, consent
index, ledger and document paths, not token validation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
MIX = (("read", 30), ("search", 25), ("consent", 15), ("download", 25), ("baseline", 5))
DOC_BYTES = 64 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and its live children (uvicorn workers, the resource tracker)."""
    out = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


class Schema:
    """A schema of its own on a PostgreSQL server, dropped at the end."""

    def __init__(self, server_url: str) -> None:
        self.engine = sa.create_engine(server_url, poolclass=sa.NullPool)
        self.name = f"soak_{uuid.uuid4().hex[:10]}"
        with self.engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{self.name}"'))
        self.url = f"{server_url}?options=-csearch_path%3D{self.name}"

    def drop(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{self.name}" CASCADE'))
        self.engine.dispose()


class Load:
    def __init__(self, base: str, seed: dict[str, Any], deadline: float, rng_seed: int) -> None:
        self.base = base
        self.seed = seed
        self.deadline = deadline
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {k: [] for k, _ in MIX}
        self.errors: dict[str, int] = {k: 0 for k, _ in MIX}
        self.error_samples: list[str] = []
        self.rng_seed = rng_seed

    def _done(self, kind: str, started: float, ok: bool, detail: str = "") -> None:
        elapsed = time.perf_counter() - started
        with self.lock:
            self.latency[kind].append(elapsed)
            if not ok:
                self.errors[kind] += 1
                if len(self.error_samples) < 20:
                    self.error_samples.append(f"{kind}: {detail[:200]}")

    def client(self, n: int) -> None:
        rng = random.Random(self.rng_seed + n)
        kinds = [k for k, w in MIX for _ in range(w)]
        consents = self.seed["consents"][n :: self.seed["clients"]]  # each client owns its own
        with httpx.Client(base_url=self.base, timeout=30) as c:
            while time.monotonic() < self.deadline:
                kind = rng.choice(kinds)
                if kind == "consent" and not consents:
                    kind = "read"
                started = time.perf_counter()
                try:
                    ok, detail = self._one(c, rng, kind, consents)
                except httpx.TransportError as exc:
                    ok, detail = False, type(exc).__name__
                self._done(kind, started, ok, detail)

    def _one(
        self, c: httpx.Client, rng: random.Random, kind: str, consents: list[dict[str, Any]]
    ) -> tuple[bool, str]:
        accept = {"accept": "application/fhir+json"}
        if kind == "read":
            r = c.get(f"/Patient/{rng.choice(self.seed['patients'])}", headers=accept)
        elif kind == "search":
            if rng.random() < 0.5:
                r = c.get("/Patient", params={"family": f"Soak{rng.randrange(10)}"}, headers=accept)
            else:
                pid = rng.choice(self.seed["patients"])
                r = c.get("/Consent", params={"patient": f"Patient/{pid}"}, headers=accept)
        elif kind == "consent":
            i = rng.randrange(len(consents))
            doc = consents[i]
            doc = {**doc, "status": "inactive" if doc["status"] == "active" else "active"}
            version = doc["meta"]["versionId"]
            r = c.put(
                f"/Consent/{doc['id']}",
                json=doc,
                headers={**accept, "If-Match": f'W/"{version}"'},
            )
            if r.status_code == 200:
                consents[i] = r.json()
        elif kind == "baseline":
            r = c.get("/metadata", headers=accept)
        else:
            r = c.get(f"/Binary/{rng.choice(self.seed['binaries'])}", headers={"accept": "*/*"})
            if r.status_code == 200 and len(r.content) != DOC_BYTES:
                return False, "short download"
        return 200 <= r.status_code < 300, f"{r.status_code} {r.text[:120]}"


def _seed(base: str, patients: int, clients: int) -> dict[str, Any]:
    out: dict[str, Any] = {"patients": [], "consents": [], "binaries": [], "clients": clients}
    fhir = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}
    with httpx.Client(base_url=base, timeout=60) as c:
        for i in range(patients):
            body = {
                "resourceType": "Patient",
                "name": [{"family": f"Soak{i % 10}", "given": [str(i)]}],
            }
            r = c.post("/Patient", json=body, headers=fhir)
            r.raise_for_status()
            pid = r.json()["id"]
            out["patients"].append(pid)
            consent = {
                "resourceType": "Consent",
                "status": "proposed",
                "scope": {"coding": [{"code": "patient-privacy"}]},
                "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                "patient": {"reference": f"Patient/{pid}"},
                "policyRule": {"coding": [{"code": "OPTIN"}]},
                "provision": {"period": {"start": "2024-01-01", "end": "2030-01-01"}},
            }
            r = c.post("/Consent", json=consent, headers=fhir)
            r.raise_for_status()
            out["consents"].append(r.json())
            if i % 2 == 0:
                data = random.Random(i).randbytes(DOC_BYTES)
                r = c.post(
                    "/Binary",
                    content=data,
                    headers={
                        "content-type": "application/pdf",
                        "X-Security-Context": f"Patient/{pid}",
                    },
                )
                r.raise_for_status()
                out["binaries"].append(r.json()["id"])
    return out


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k] * 1000


def run(args: argparse.Namespace) -> dict[str, Any]:
    schema = Schema(args.database_url) if args.database_url.startswith("postgresql") else None
    db_url = schema.url if schema else args.database_url
    workdir = Path(tempfile.mkdtemp(prefix="fhir-consent-soak-"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")}
    env.update(
        {
            "FHIR_CONSENT_DATABASE_URL": db_url,
            "FHIR_CONSENT_OPEN_ACCESS": "true",
            "FHIR_CONSENT_LOG_LEVEL": "warning",
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhir_consent.cli", "serve", "--host", "127.0.0.1",
         "--port", str(port), "--workers", str(args.workers)],
        env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/fhir"
    rss: list[tuple[float, int]] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/metadata", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(
                    "the server did not start: " + (workdir / "server.log").read_text()
                )
            time.sleep(0.2)
        seed = _seed(base, args.patients, args.clients)
        started = time.monotonic()
        load = Load(base, seed, started + args.duration, args.seed)
        threads = [threading.Thread(target=load.client, args=(n,)) for n in range(args.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append((time.monotonic() - started, sum(_rss_kb(p) for p in _tree(proc.pid))))
            for t in threads:
                t.join(timeout=min(5.0, max(0.1, args.duration / 20)))
                break
        rss.append((time.monotonic() - started, sum(_rss_kb(p) for p in _tree(proc.pid))))
        elapsed = time.monotonic() - started
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        if schema is not None:
            schema.drop()
    warm = [kb for t, kb in rss if t >= args.duration / 10] or [rss[-1][1]]
    kinds = {}
    for kind, _ in MIX:
        values = load.latency[kind]
        kinds[kind] = {
            "requests": len(values),
            "errors": load.errors[kind],
            "p50_ms": round(_pct(values, 50), 1),
            "p95_ms": round(_pct(values, 95), 1),
            "p99_ms": round(_pct(values, 99), 1),
            "mean_ms": round(statistics.fmean(values) * 1000, 1) if values else 0.0,
        }
    total = sum(k["requests"] for k in kinds.values())
    growth_mb = (rss[-1][1] - warm[0]) / 1024
    report = {
        "duration_s": round(elapsed, 1),
        "workers": args.workers,
        "clients": args.clients,
        "requests": total,
        "throughput_rps": round(total / elapsed, 1),
        "errors": sum(k["errors"] for k in kinds.values()),
        "error_samples": load.error_samples,
        "kinds": kinds,
        "rss_mb": {
            "start": round(rss[0][1] / 1024, 1),
            "after_warmup": round(warm[0] / 1024, 1),
            "max": round(max(kb for _, kb in rss) / 1024, 1),
            "end": round(rss[-1][1] / 1024, 1),
            "growth_after_warmup": round(growth_mb, 1),
            "bound": args.rss_growth_mb,
            "samples": [(round(t), round(kb / 1024, 1)) for t, kb in rss],
        },
        "server_log_errors": sum(
            1
            for line in (workdir / "server.log").read_text(errors="replace").splitlines()
            if "internal error" in line or "Traceback" in line
        ),
    }
    report["ok"] = (
        report["errors"] == 0
        and growth_mb <= args.rss_growth_mb
        and report["server_log_errors"] == 0
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (600)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--patients", type=int, default=40, help="seeded patients")
    parser.add_argument(
        "--database-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="PostgreSQL server URL (a fresh schema is used), or a sqlite:/// URL",
    )
    parser.add_argument("--rss-growth-mb", type=float, default=64.0, help="memory bound (64)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text)
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mb"}, indent=2))
    rss = {k: v for k, v in report["rss_mb"].items() if k != "samples"}
    print("rss_mb", json.dumps(rss))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
