"""Throughput of document upload and download (issue 6): a 10 MB document through a live
uvicorn worker running the whole server, on SQLite and PostgreSQL, with blobs in the database
and in a directory — against a bare endpoint moving the same bytes, in the same run.

Each configuration gets a fresh database, a fresh master key and blob directory, and one
uvicorn worker (same options as ``bench/run_core.py``) serving the server's own app
(``fhir_consent.app:create_app`` via ``--factory``: SMART, consent, audit, ledger, documents,
web). The caller is a clinic's system with a real SMART backend-services token (client
credentials, ``private_key_jwt``), so token checks, consent enforcement and the audit trail
are on the path (``--access open`` measures without them). The client (httpx, one keep-alive
connection) then runs warm-up and measured rounds of

* ``upload``   — ``POST /fhir/Binary`` with the raw bytes (``Content-Type: application/pdf``):
  streamed, SHA-1 hashed, encrypted chunk by chunk and stored durably;
* (not timed) ``POST /fhir/DocumentReference`` pointing at it, custodian the clinic — what
  gives the clinic access to the content under the consent rules;
* ``download`` — ``GET /fhir/Binary/{id}`` (``Accept: application/pdf``): every chunk
  authenticated before the first byte is sent.

The *baseline* is ``uvicorn bench_documents:baseline_app --factory`` under the same options:
a bare Starlette app whose ``POST /fhir/Binary`` reads the body (keeping it, no copy) and
whose ``GET`` streams those bytes back in 1 MiB pieces — the ceiling of uvicorn + httpx on
this machine at that moment. Every download is checked byte for byte. Throughput is
document bytes / wall time of the request as the client sees it (MB = 10^6 bytes); each
figure is run ``--repeat`` times (3) and the median run is reported (a run's figure is its
median round). Results are printed and written between markers in the "Documents" section of
``docs/benchmarks.md``.

    python bench/bench_documents.py             # 3 × 15 measured rounds per configuration
    python bench/bench_documents.py --quick     # 1 × 5 rounds, does not touch the doc

Loopback only; every process and request is bounded by timeouts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- bench:documents:begin -->"
END = "<!-- bench:documents:end -->"
TARGET_MB_S = 100.0
UVICORN_OPTS = [
    "--workers",
    "1",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--no-access-log",
    "--log-level",
    "warning",
]
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_DB = "bench_fc_documents"
CLINIC = "bench-clinic"
PATIENT = "bench-patient"
SCOPE = (
    "system/Binary.cruds system/DocumentReference.cruds system/Patient.cu system/Organization.cu"
)
PIECE = 1 << 20


# -- the baseline -------------------------------------------------------------------------------


def baseline_app() -> Any:
    """``uvicorn bench_documents:baseline_app --factory``: the bare endpoint. ``POST
    /fhir/Binary`` reads the body and keeps its pieces (no copy); ``GET /fhir/Binary/{id}``
    streams the last upload back in 1 MiB pieces with its Content-Length. No database, no
    crypto, no middleware."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    kept: list[bytes] = []

    async def upload(request: Request) -> Response:
        pieces = [piece async for piece in request.stream()]
        kept[:] = pieces
        location = f"{str(request.base_url).rstrip('/')}/fhir/Binary/b/_history/1"
        headers = {"location": location, "etag": 'W/"1"'}
        return Response(status_code=201, headers=headers)

    async def download(request: Request) -> Response:
        data = b"".join(kept) if len(kept) != 1 else kept[0]

        async def body() -> AsyncIterator[bytes]:
            view = memoryview(data)
            for i in range(0, len(view), PIECE):
                yield bytes(view[i : i + PIECE])

        headers = {"content-length": str(len(data)), "etag": '"1"'}
        return StreamingResponse(body(), 200, headers, media_type="application/pdf")

    return Starlette(
        routes=[
            Route("/fhir/Binary", upload, methods=["POST"]),
            Route("/fhir/Binary/{rid}", download, methods=["GET"]),
        ]
    )


# -- results -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """One run of measured rounds (seconds per request)."""

    upload_s: list[float]
    download_s: list[float]
    server_cpu_s: float
    other_cores: float  # cores busy with processes outside the benchmark during the run


@dataclass(slots=True)
class Result:
    database: str
    blobs: str
    size: int
    runs: list[Run] = field(default_factory=list)

    def _mb_s(self, times: list[float]) -> float:
        return self.size / statistics.median(times) / 1e6

    def uploads(self) -> list[float]:
        return [self._mb_s(r.upload_s) for r in self.runs]

    def downloads(self) -> list[float]:
        return [self._mb_s(r.download_s) for r in self.runs]

    def upload(self) -> float:
        return statistics.median(self.uploads())

    def download(self) -> float:
        return statistics.median(self.downloads())

    def cpu_per_round_trip(self) -> float:
        return statistics.median(r.server_cpu_s / len(r.upload_s) for r in self.runs)

    def other_cores(self) -> float:
        return statistics.median(r.other_cores for r in self.runs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- databases and servers -------------------------------------------------------------------------


@contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    """A fresh, migrated database URL."""
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
def server(app: str, env_extra: dict[str, str], tmp: Path) -> Iterator[tuple[str, int]]:
    """uvicorn serving ``app`` (a factory); yields its origin and pid."""
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")},
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **env_extra,
    }
    cmd = [sys.executable, "-m", "uvicorn", app, "--factory"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *UVICORN_OPTS]
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
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
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def server_env(url: str, blobs: str, tmp: Path, *, open_access: bool) -> dict[str, str]:
    return {
        "FHIR_CONSENT_DATABASE_URL": url,
        "FHIR_CONSENT_AUTO_MIGRATE": "false",
        "FHIR_CONSENT_OPEN_ACCESS": "true" if open_access else "false",
        "FHIR_CONSENT_SMART_KEYS_DIR": str(tmp / "smart"),
        "FHIR_CONSENT_DOCUMENTS_BLOB_BACKEND": blobs,
        "FHIR_CONSENT_DOCUMENTS_BLOB_DIR": str(tmp / "blobs"),
        "FHIR_CONSENT_DOCUMENTS_SPOOL_DIR": str(tmp / "spool"),
        "FHIR_CONSENT_DOCUMENTS_MASTER_KEY_FILE": str(tmp / "keys" / "master.json"),
        "FHIR_CONSENT_LEDGER_KEYS_DIR": str(tmp / "keys" / "ledger"),
    }


class Clinic:
    """A clinic's system: a SMART backend-services client bound to Organization/bench-clinic,
    registered in the database like ``fhir-consent clients add`` does."""

    def __init__(self, url: str) -> None:
        from fhir_consent.store.db import Database
        from smart_on_fhir.clients import create_client
        from smart_on_fhir.keys import generate_signing_key

        self.key = generate_signing_key("RS384")
        db = Database(url, pool_size=1)
        try:
            with db.write() as conn:
                created = create_client(
                    conn,
                    client_name="bench clinic system",
                    client_type="confidential-asymmetric",
                    scope=SCOPE,
                    now=int(time.time()),
                    organization=f"Organization/{CLINIC}",
                    jwks={"keys": [dict(self.key.as_dict(private=False))]},
                )
        finally:
            db.dispose()
        self.client_id = created.client.client_id

    def token(self, http: Any, origin: str) -> str:
        """A fresh access token (client credentials with a signed client assertion)."""
        from smart_on_fhir.client_auth import ASSERTION_TYPE, sign_client_assertion

        token_url = f"{origin}/auth/token"
        assertion = sign_client_assertion(self.key, client_id=self.client_id, token_url=token_url)
        r = http.post(
            token_url,
            data={
                "grant_type": "client_credentials",
                "scope": SCOPE,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
            },
        )
        assert r.status_code == 200, r.text
        token: str = r.json()["access_token"]
        return token


# -- measuring -------------------------------------------------------------------------------------


def _busy_seconds() -> float:
    """CPU seconds spent by the whole machine (all cores, /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _postgres_seconds() -> float:
    """CPU seconds of the PostgreSQL server processes (part of the benchmark when used)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(postgres)" in text:
            fields = text.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


JSON = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}


def measure(
    http: Any,
    fhir: str,
    pid: int,
    data: bytes,
    rounds: int,
    warmup: int,
    *,
    auth: dict[str, str],
    link: bool,
) -> Run:
    """Warm-up and measured rounds of upload (+ link, untimed) + download."""
    expected = hashlib.sha1(data).digest()
    ups: list[float] = []
    downs: list[float] = []
    cpu0 = busy0 = own0 = pg0 = wall0 = 0.0
    for i in range(warmup + rounds):
        if i == warmup:
            cpu0, busy0, own0 = _cpu_seconds(pid), _busy_seconds(), _own_seconds()
            pg0 = _postgres_seconds()
            wall0 = time.monotonic()
        t0 = time.perf_counter()
        r = http.post(
            f"{fhir}/Binary",
            content=data,
            headers={"content-type": "application/pdf", "prefer": "return=minimal", **auth},
        )
        t1 = time.perf_counter()
        assert r.status_code == 201, r.text
        location = r.headers["location"].split("/_history")[0]
        if link:
            doc = {
                "resourceType": "DocumentReference",
                "status": "current",
                "subject": {"reference": f"Patient/{PATIENT}"},
                "custodian": {"reference": f"Organization/{CLINIC}"},
                "content": [
                    {
                        "attachment": {
                            "contentType": "application/pdf",
                            "url": "Binary/" + location.rsplit("/", 1)[1],
                        }
                    }
                ],
            }
            linked = http.post(f"{fhir}/DocumentReference", json=doc, headers={**JSON, **auth})
            assert linked.status_code == 201, linked.text
        check = hashlib.sha1()
        n = 0
        t2 = time.perf_counter()
        with http.stream("GET", location, headers={"accept": "application/pdf", **auth}) as resp:
            assert resp.status_code == 200, resp.read()
            for piece in resp.iter_raw(PIECE):
                n += len(piece)
                check.update(piece)
        t3 = time.perf_counter()
        assert n == len(data) and check.digest() == expected, "downloaded bytes differ"
        if i >= warmup:
            ups.append(t1 - t0)
            downs.append(t3 - t2)
    server_cpu = _cpu_seconds(pid) - cpu0
    ours = server_cpu + (_own_seconds() - own0) + (_postgres_seconds() - pg0)
    others = _busy_seconds() - busy0 - ours
    return Run(ups, downs, server_cpu, max(0.0, others) / (time.monotonic() - wall0))


def run_baseline(args: argparse.Namespace, data: bytes) -> Result:
    import httpx

    result = Result("baseline", "—", len(data))
    with tempfile.TemporaryDirectory(prefix="bench-docs-") as tmp_name:
        tmp = Path(tmp_name)
        with server("bench_documents:baseline_app", {}, tmp) as (origin, pid):
            with httpx.Client(timeout=60) as http:
                for _ in range(args.repeat):
                    result.runs.append(
                        measure(
                            http,
                            f"{origin}/fhir",
                            pid,
                            data,
                            args.rounds,
                            args.warmup,
                            auth={},
                            link=False,
                        )
                    )
                    # the baseline ignores the id: it streams back what it last received
    return result


def run_server(args: argparse.Namespace, db_kind: str, blobs: str, data: bytes) -> Result:
    import httpx

    result = Result(db_kind, blobs, len(data))
    open_access = args.access == "open"
    with tempfile.TemporaryDirectory(prefix="bench-docs-") as tmp_name:
        tmp = Path(tmp_name)
        with database(db_kind, tmp) as url:
            clinic = None if open_access else Clinic(url)
            env = server_env(url, blobs, tmp, open_access=open_access)
            app = "fhir_consent.app:create_app"
            with server(app, env, tmp) as (origin, pid), httpx.Client(timeout=60) as http:
                fhir = f"{origin}/fhir"
                for n in range(args.repeat):
                    auth = {}
                    if clinic is not None:  # a fresh token per run (they live 5 minutes)
                        auth = {"authorization": f"Bearer {clinic.token(http, origin)}"}
                    if n == 0:  # the clinic and the patient the documents are about
                        for path, body in (
                            (f"Organization/{CLINIC}", {"resourceType": "Organization"}),
                            (f"Patient/{PATIENT}", {"resourceType": "Patient"}),
                        ):
                            body = {**body, "id": path.split("/")[1]}
                            r = http.put(f"{fhir}/{path}", json=body, headers={**JSON, **auth})
                            assert r.status_code == 201, r.text
                    result.runs.append(
                        measure(
                            http, fhir, pid, data, args.rounds, args.warmup, auth=auth, link=True
                        )
                    )
    return result


# -- the report ------------------------------------------------------------------------------------


def _command(args: argparse.Namespace) -> str:
    parts = ["python bench/bench_documents.py"]
    defaults = {"rounds": 15, "warmup": 3, "repeat": 3, "access": "token"}
    for name, default in defaults.items():
        value = getattr(args, name)
        if value != default:
            parts.append(f"--{name} {value}")
    return " ".join(parts)


def render(
    results: list[Result],
    args: argparse.Namespace,
    load: str,
    skipped: Sequence[tuple[str, str]] = (),
) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    baseline = next((r for r in results if r.database == "baseline"), None)
    access = (
        "a clinic system's SMART backend-services token (token checks, consent, audit on)"
        if args.access == "token"
        else "open access (no token, consent or audit: development mode)"
    )
    lines = [
        f"Run {when} on {platform.node() or 'this machine'} ({os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, load average before the run {load}): "
        f"`{_command(args)}`",
        "",
        f"Document size {args.size / 1e6:g} MB; per configuration {args.repeat} runs of "
        f"{args.rounds} measured rounds after {args.warmup} warm-up rounds, one keep-alive "
        f"connection, one uvicorn worker running `fhir_consent.app:create_app`, caller: "
        f"{access}. MB/s = 10^6 bytes per second of request wall time; a run's figure is its "
        f"median round, the table gives the median run and, in brackets, all runs. Target: "
        f"≥ {TARGET_MB_S:g} MB/s each way. *% of baseline* compares with the bare endpoint "
        f"measured in the same run. *Server CPU* is the uvicorn process's CPU time per upload "
        f"+ download; *other CPU* is the cores used during the runs by everything but the "
        f"server, the client and PostgreSQL — this machine has 2 cores shared with other "
        f"work: read the figures with that column.",
        "",
        "| database | blobs | upload MB/s | download MB/s | % of baseline (up / down) "
        "| server CPU s / round trip | other CPU (cores) | meets target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        up, down = r.upload(), r.download()
        ups = " / ".join(f"{v:.0f}" for v in r.uploads())
        downs = " / ".join(f"{v:.0f}" for v in r.downloads())
        share = "—"
        if baseline is not None and r is not baseline:
            share = f"{100 * up / baseline.upload():.0f}% / {100 * down / baseline.download():.0f}%"
        ok = "—" if r is baseline else ("yes" if min(up, down) >= TARGET_MB_S else "**no**")
        lines.append(
            f"| {r.database} | {r.blobs} | **{up:.0f}** ({ups}) | **{down:.0f}** ({downs}) | "
            f"{share} | {r.cpu_per_round_trip():.3f} | {r.other_cores():.1f} | {ok} |"
        )
    for name, reason in skipped:
        database, _, blobs = name.partition("/")
        lines.append(f"| {database} | {blobs or '—'} | skipped: {reason} | | | | | **no** |")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration")
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--blobs", default="db,dir")
    parser.add_argument("--access", choices=("token", "open"), default="token")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 × 5 rounds; do not write the doc")
    parser.add_argument("--write-doc", action="store_true", help="write the doc even if --quick")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.repeat = 5, 1, 1
    load = "/".join(Path("/proc/loadavg").read_text().split()[:3])
    data = os.urandom(args.size)
    results: list[Result] = []
    jobs: list[tuple[str, Callable[[], Result]]] = []
    if not args.no_baseline:
        jobs.append(("baseline", lambda: run_baseline(args, data)))
    for db_kind in args.databases.split(","):
        for blobs in args.blobs.split(","):
            jobs.append(
                (f"{db_kind}/{blobs}", lambda d=db_kind, b=blobs: run_server(args, d, b, data))
            )
    skipped: list[tuple[str, str]] = []
    for name, job in jobs:
        try:
            result = job()
        except Exception as exc:  # noqa: BLE001 - e.g. PostgreSQL not running
            print(f"{name}: skipped ({type(exc).__name__}: {exc})")
            skipped.append((name, type(exc).__name__))
            continue
        results.append(result)
        ups = " ".join(f"{v:.0f}" for v in result.uploads())
        downs = " ".join(f"{v:.0f}" for v in result.downloads())
        print(
            f"{name:>13}  upload {result.upload():5.0f} MB/s [{ups}]  download "
            f"{result.download():5.0f} MB/s [{downs}]  (other processes: "
            f"{result.other_cores():.1f} cores)",
            flush=True,
        )
    text = render(results, args, load, skipped)
    print()
    print(text)
    if results and (args.write_doc or not args.quick):
        write_doc(text)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
