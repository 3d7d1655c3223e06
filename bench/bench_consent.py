"""Cost of consent enforcement (issue 4): the decision itself, and a consent-filtered search.

1. **Decision** — ``decide()`` over a :class:`~fhir_consent.consent.ConsentSet` of 100 Consents
   of one patient (grants to many clinics with periods and classes, nested denies on security
   labels and clinical dates, refusals, revocations, open inquiries), for a mix of requesters,
   times and documents. Target: median ≤ 50 µs.
2. **Per-request filter** — ``ConsentEnforcement.filter_for`` in a read transaction (requester
   set, candidate Consents, SQL compilation) and the SQL predicate it yields, for the clinic.
3. **Search** — ``GET /fhir/DocumentReference?patient=P&_count=50`` through one live uvicorn
   worker, as the clinic (a practitioner whose PractitionerRole's Organization the patient
   granted, among the patient's 100 Consents) and as the patient's own ``patient/`` token, in
   alternation on one keep-alive connection each. Target: clinic median ≤ 1.5 × patient median.

Each backend gets a fresh database: 1 patient with 50 documents and 100 Consents, plus 300
other patients with 10 documents and a grant each. Results are printed and written between
markers in the "Consent" section of ``docs/benchmarks.md``.

    python bench/bench_consent.py            # SQLite and PostgreSQL; rewrites the results
    python bench/bench_consent.py --quick    # fewer rounds, prints only
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- bench:consent:begin -->"
END = "<!-- bench:consent:end -->"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_DB = "bench_fc_consent"
UVICORN_OPTS = ["--workers", "1", "--no-access-log", "--log-level", "warning"]
PATIENT = "bench-p"
CLINIC_ORG = "bench-clinic"
PRACTITIONER = "bench-x"

ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
LOINC = "http://loinc.org"


# -- the server -------------------------------------------------------------------------------


def create_bench_app(url: str | None = None) -> Any:
    """``uvicorn bench_consent:create_bench_app --factory``: settings from the environment
    (or ``url``), the consent layer installed, bearer names ``patient`` / ``clinic``."""
    from starlette.requests import Request

    from fhir_consent.app import create_core_app
    from fhir_consent.auth import AccessContext
    from fhir_consent.consent.workflow import install
    from fhir_consent.errors import Unauthorized
    from smart_on_fhir.scopes import parse_scopes

    callers = {
        "patient": AccessContext(
            scopes=parse_scopes("patient/*.rs"), patient=PATIENT, fhir_user=f"Patient/{PATIENT}"
        ),
        "clinic": AccessContext(
            scopes=parse_scopes("user/*.rs"), fhir_user=f"Practitioner/{PRACTITIONER}"
        ),
    }

    async def authenticate(request: Request) -> AccessContext:
        found = callers.get(request.headers.get("authorization", "").removeprefix("Bearer "))
        if found is None:
            raise Unauthorized("unknown bench token")
        return found

    settings = None
    if url is not None:
        from fhir_consent.config import Settings

        settings = Settings(database_url=url, auto_migrate=False, open_access=True)
    app = create_core_app(settings)
    app.state.fhir.authenticate = authenticate
    install(app.state.fhir)
    return app


# -- data -------------------------------------------------------------------------------------


def _provision(org: str, start: str, end: str, **more: Any) -> dict[str, Any]:
    return {
        "period": {"start": start, "end": end},
        "actor": [
            {
                "role": {"coding": [{"system": PARTICIPATION, "code": "PRCP"}]},
                "reference": {"reference": f"Organization/{org}"},
            }
        ],
        "action": [{"coding": [{"system": ACTION, "code": "access"}]}],
        **more,
    }


def patient_consents(rng: random.Random, n: int = 100) -> list[dict[str, Any]]:
    """One patient's 100 Consents: the clinic's granted inquiry and 99 others."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        status, org = "active", f"org-{i % 60}"
        provision = _provision(org, "2020-01-01", "2035-12-31")
        kind = i % 10
        if i == 0:
            org = CLINIC_ORG
            provision = _provision(
                org,
                "2020-01-01",
                "2035-12-31",
                provision=[
                    {"type": "deny", "securityLabel": [{"system": ACTCODE, "code": "PSY"}]},
                    {"type": "deny", "dataPeriod": {"start": "2012-01-01", "end": "2012-12-31"}},
                ],
            )
        elif kind in (1, 2):
            provision["class"] = [
                {"system": "http://hl7.org/fhir/resource-types", "code": "DocumentReference"}
            ]
        elif kind == 3:
            provision["period"] = {"start": "2015-01-01", "end": "2016-01-01"}  # expired
        elif kind == 4:
            provision["provision"] = [
                {"type": "deny", "securityLabel": [{"system": CONF, "code": "R"}]}
            ]
        elif kind == 5:
            status = rng.choice(["inactive", "rejected"])
        elif kind == 6:
            status = "proposed"
        elif kind == 7:
            provision["code"] = [{"coding": [{"system": LOINC, "code": "34133-9"}]}]
        out.append(
            {
                "resourceType": "Consent",
                "status": status,
                "scope": {"coding": [{"code": "patient-privacy"}]},
                "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
                "patient": {"reference": f"Patient/{PATIENT}"},
                "policyRule": {"coding": [{"system": ACTCODE, "code": "OPTOUT"}]},
                "provision": provision,
            }
        )
    return out


def document(pid: str, rng: random.Random, custodian: str, plain: bool = False) -> dict[str, Any]:
    """A DocumentReference; ``plain``: none the clinic's grant excludes (no PSY, not 2012)."""
    year = rng.randint(2013 if plain else 2010, 2025)
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"coding": [{"system": LOINC, "code": rng.choice(["34133-9", "11488-4"])}]},
        "subject": {"reference": f"Patient/{pid}"},
        "custodian": {"reference": f"Organization/{custodian}"},
        "date": f"{year}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T10:00:00Z",
        "author": [{"reference": "Practitioner/author"}],
        "content": [{"attachment": {"contentType": "application/pdf", "url": "Binary/x"}}],
        "description": "Discharge summary " * 4,
    }
    if not plain and rng.random() < 0.1:
        doc["securityLabel"] = [{"coding": [{"system": ACTCODE, "code": "PSY"}]}]
    return doc


def load(url: str) -> None:
    """Write the data set through the server's own services (index, consent index, hooks)."""
    app = create_bench_app(url)
    ctx = app.state.fhir
    rng = random.Random(4)
    with ctx.db.write() as conn:
        svc = ctx.service(conn)
        svc.update("Organization", CLINIC_ORG, {"resourceType": "Organization", "id": CLINIC_ORG})
        svc.update("Organization", "hospital", {"resourceType": "Organization", "id": "hospital"})
        for i in range(60):
            oid = f"org-{i}"
            svc.update("Organization", oid, {"resourceType": "Organization", "id": oid})
        svc.update(
            "Practitioner", PRACTITIONER, {"resourceType": "Practitioner", "id": PRACTITIONER}
        )
        svc.create(
            "PractitionerRole",
            {
                "resourceType": "PractitionerRole",
                "practitioner": {"reference": f"Practitioner/{PRACTITIONER}"},
                "organization": {"reference": f"Organization/{CLINIC_ORG}"},
            },
        )
        svc.update("Patient", PATIENT, {"resourceType": "Patient", "id": PATIENT})
        for _ in range(50):
            svc.create("DocumentReference", document(PATIENT, rng, "hospital", plain=True))
        for consent in patient_consents(rng):
            svc.create("Consent", consent)
        for k in range(300):
            pid = f"other-{k}"
            svc.update("Patient", pid, {"resourceType": "Patient", "id": pid})
            for _ in range(10):
                svc.create("DocumentReference", document(pid, rng, "hospital"))
            grant = patient_consents(rng, 1)[0]
            grant["patient"] = {"reference": f"Patient/{pid}"}
            grant["provision"]["actor"][0]["reference"]["reference"] = f"Organization/org-{k % 60}"
            svc.create("Consent", grant)
    ctx.db.dispose()


# -- measurements -----------------------------------------------------------------------------


def decision_cost(samples: int) -> dict[str, float]:
    """Median and p95 of ``decide()`` with a ConsentSet of 100 Consents, in microseconds."""
    from fhir_consent.consent import (
        AccessRequest,
        ConsentSet,
        compile_consent,
        decide,
        facts_from_resource,
    )

    rng = random.Random(7)
    raw = patient_consents(rng)
    for i, c in enumerate(raw):
        c["id"] = f"c{i}"
    consents = ConsentSet(compile_consent(c) for c in raw)
    docs = []
    for i in range(200):
        d = document(PATIENT, rng, rng.choice(["hospital", CLINIC_ORG]))
        d["id"] = f"d{i}"
        docs.append(facts_from_resource(d))
    orgs = [CLINIC_ORG, *(f"org-{i}" for i in range(70))]
    base = datetime(2020, 1, 1, tzinfo=UTC)
    requests = [
        AccessRequest(
            frozenset({f"Practitioner/p{i}", f"Organization/{rng.choice(orgs)}"}),
            at=base + timedelta(days=rng.randint(0, 6000)),
        )
        for i in range(200)
    ]
    times: list[float] = []
    permits = 0
    for i in range(samples):
        request, resource = requests[i % 200], docs[(i * 7) % 200]
        t0 = time.perf_counter_ns()
        decision = decide(consents, request, resource)
        times.append((time.perf_counter_ns() - t0) / 1000)
        permits += decision.decision.value == "permit"
    times.sort()
    return {
        "median": statistics.median(times),
        "p95": times[int(len(times) * 0.95)],
        "permit_share": permits / samples,
    }


def filter_cost(url: str, rounds: int) -> dict[str, float]:
    """``filter_for`` + building the DocumentReference predicate, for the clinic (ms)."""
    from fhir_consent.auth import AccessContext
    from fhir_consent.consent.enforcement import ConsentEnforcement
    from fhir_consent.store.db import Database
    from fhir_consent.store.tables import resources
    from smart_on_fhir.scopes import parse_scopes

    db = Database(url, pool_size=2)
    enforcement = ConsentEnforcement()
    access = AccessContext(
        scopes=parse_scopes("user/*.rs"), fhir_user=f"Practitioner/{PRACTITIONER}"
    )
    now = int(datetime(2024, 6, 1, tzinfo=UTC).timestamp() * 1_000_000)
    times = []
    for _ in range(rounds):
        with db.read() as conn:
            t0 = time.perf_counter()
            flt = enforcement.filter_for(conn, access, now)
            assert flt is not None
            predicate = flt.predicate("DocumentReference")
            assert predicate is not None
            predicate(resources)  # the SQL expression (SQLAlchemy caches its compiled form)
            times.append((time.perf_counter() - t0) * 1000)
    db.dispose()
    return {"median": statistics.median(times), "p95": sorted(times)[int(len(times) * 0.95)]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    from fhir_consent.store.migrate import upgrade

    if kind == "sqlite":
        url = f"sqlite:///{tmp / 'bench.sqlite3'}"
        upgrade(url)
        yield url
        return
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {PG_DB}"))
        conn.execute(sa.text(f"CREATE DATABASE {PG_DB}"))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{PG_DB}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)"))
        admin.dispose()


@contextmanager
def server(url: str, tmp: Path) -> Iterator[str]:
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")},
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "FHIR_CONSENT_DATABASE_URL": url,
        "FHIR_CONSENT_AUTO_MIGRATE": "false",
        "FHIR_CONSENT_OPEN_ACCESS": "true",  # replaced by the bench authenticator
        "FHIR_CONSENT_SMART_KEYS_DIR": str(tmp / "smart"),
    }
    cmd = [sys.executable, "-m", "uvicorn", "bench_consent:create_bench_app", "--factory"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *UVICORN_OPTS]
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp / "server.log").read_text()) from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/fhir"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def search_cost(base: str, rounds: int, warmup: int) -> dict[str, Any]:
    """Alternating searches as the patient and as the clinic (ms per request)."""
    import httpx

    query = f"DocumentReference?patient=Patient/{PATIENT}&_count=50"
    timings: dict[str, list[float]] = {"patient": [], "clinic": []}
    totals: dict[str, int] = {}
    clients = {
        who: httpx.Client(
            base_url=base + "/",
            timeout=30,
            headers={"authorization": f"Bearer {who}", "accept": "application/fhir+json"},
        )
        for who in timings
    }
    try:
        for i in range(warmup + rounds):
            for who in ("patient", "clinic") if i % 2 else ("clinic", "patient"):
                t0 = time.perf_counter()
                r = clients[who].get(query)
                elapsed = (time.perf_counter() - t0) * 1000
                r.raise_for_status()
                totals[who] = len(r.json().get("entry", []))
                if i >= warmup:
                    timings[who].append(elapsed)
    finally:
        for c in clients.values():
            c.close()
    out: dict[str, Any] = {"entries": totals}
    for who, times in timings.items():
        times.sort()
        out[who] = {"median": statistics.median(times), "p95": times[int(len(times) * 0.95)]}
    out["ratio"] = out["clinic"]["median"] / out["patient"]["median"]
    return out


# -- report -----------------------------------------------------------------------------------


def report(decision: dict[str, float], rows: list[tuple[str, dict[str, Any]]], argv: str) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Run {when} on {platform.node()} ({os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}): `python bench/bench_consent.py{argv}`",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| `decide()`, ConsentSet of 100 Consents, median (p95) | "
        f"{decision['median']:.1f} µs ({decision['p95']:.1f} µs); "
        f"{decision['permit_share']:.0%} permits | ≤ 50 µs |",
    ]
    for backend, r in rows:
        f, s = r["filter"], r["search"]
        ok = "yes" if s["ratio"] <= 1.5 else "**no**"
        lines.append(
            f"| {backend}: `filter_for` + SQL for the clinic (100 Consents), median (p95) | "
            f"{f['median']:.2f} ms ({f['p95']:.2f} ms) | — |"
        )
        lines.append(
            f"| {backend}: search of {s['entries']['clinic']} DocumentReferences, clinic vs "
            f"patient token, median (p95) | {s['clinic']['median']:.2f} ms "
            f"({s['clinic']['p95']:.2f}) vs {s['patient']['median']:.2f} ms "
            f"({s['patient']['p95']:.2f}): **{s['ratio']:.2f}×** ({ok}) | ≤ 1.5× |"
        )
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds; print only")
    parser.add_argument("--backends", default="sqlite,postgres")
    args = parser.parse_args()
    rounds, warmup = (60, 10) if args.quick else (400, 40)
    decision = decision_cost(20_000 if args.quick else 200_000)
    print(f"decide(): median {decision['median']:.1f} µs, p95 {decision['p95']:.1f} µs")
    rows: list[tuple[str, dict[str, Any]]] = []
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp_name, database(backend, Path(tmp_name)) as url:
            load(url)
            filt = filter_cost(url, 50 if args.quick else 300)
            with server(url, Path(tmp_name)) as base:
                search = search_cost(base, rounds, warmup)
            rows.append((backend, {"filter": filt, "search": search}))
            print(
                f"{backend}: filter_for {filt['median']:.2f} ms; search clinic "
                f"{search['clinic']['median']:.2f} ms vs patient "
                f"{search['patient']['median']:.2f} ms = {search['ratio']:.2f}x "
                f"({search['entries']})"
            )
    text = report(decision, rows, " --quick" if args.quick else "")
    print(text)
    if not args.quick:
        write_doc(text)


if __name__ == "__main__":
    main()
