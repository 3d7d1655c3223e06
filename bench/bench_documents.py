"""Throughput of document upload and download (issue 6): a 10 MB document through a live
uvicorn worker, on SQLite and PostgreSQL, with blobs in the database and in a directory.

Each configuration gets a fresh database, a fresh master key and blob directory, and one
uvicorn worker (same options as ``bench/run_core.py``) serving the server's own app
(``fhir_consent.app:create_app`` via ``--factory``, every layer installed). The client
(httpx, one keep-alive connection) then runs warm-up rounds and measured rounds of

* ``upload``   — ``POST /fhir/Binary`` with the raw bytes (``Content-Type: application/pdf``):
  streamed, SHA-1 hashed, encrypted chunk by chunk and stored;
* ``download`` — ``GET /fhir/Binary/{id}`` (``Accept: application/pdf``): every chunk
  authenticated before the first byte is sent, then decrypted again while streaming.

The first download of every round is checked byte for byte. Throughput is document bytes /
wall time of the request as the client sees it (MB = 10^6 bytes). Results are printed and
written between markers in the "Documents" section of ``docs/benchmarks.md``.

    python bench/bench_documents.py             # 20 measured rounds per configuration
    python bench/bench_documents.py --quick     # 5 rounds, does not touch the doc

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(slots=True)
class Result:
    database: str
    blobs: str
    upload_s: list[float]
    download_s: list[float]
    size: int
    server_cpu_s: float
    other_cores: float  # cores busy with processes outside the benchmark during the rounds

    def mb_s(self, times: list[float]) -> float:
        return self.size / statistics.median(times) / 1e6

    def aggregate(self, times: list[float]) -> float:
        return self.size * len(times) / sum(times) / 1e6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
def server(url: str, blobs: str, tmp: Path) -> Iterator[tuple[str, int]]:
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")},
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "FHIR_CONSENT_DATABASE_URL": url,
        "FHIR_CONSENT_AUTO_MIGRATE": "false",
        "FHIR_CONSENT_OPEN_ACCESS": "true",
        "FHIR_CONSENT_SMART_KEYS_DIR": str(tmp / "smart"),
        "FHIR_CONSENT_DOCUMENTS_BLOB_BACKEND": blobs,
        "FHIR_CONSENT_DOCUMENTS_BLOB_DIR": str(tmp / "blobs"),
        "FHIR_CONSENT_DOCUMENTS_SPOOL_DIR": str(tmp / "spool"),
        "FHIR_CONSENT_DOCUMENTS_MASTER_KEY_FILE": str(tmp / "keys" / "master.json"),
        "FHIR_CONSENT_LEDGER_KEYS_DIR": str(tmp / "keys" / "ledger"),
    }
    cmd = [sys.executable, "-m", "uvicorn", "fhir_consent.app:create_app", "--factory"]
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
        yield f"http://127.0.0.1:{port}/fhir", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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


def measure(base: str, pid: int, size: int, rounds: int, warmup: int) -> tuple[Any, ...]:
    """``(upload times, download times, server CPU s, other processes' cores)``."""
    import httpx

    data = os.urandom(size)
    expected = hashlib.sha1(data).digest()
    ups: list[float] = []
    downs: list[float] = []
    cpu0 = busy0 = own0 = pg0 = wall0 = 0.0
    with httpx.Client(timeout=60) as client:
        for i in range(warmup + rounds):
            if i == warmup:
                cpu0, busy0, own0 = _cpu_seconds(pid), _busy_seconds(), _own_seconds()
                pg0 = _postgres_seconds()
                wall0 = time.monotonic()
            t0 = time.perf_counter()
            r = client.post(
                f"{base}/Binary",
                content=data,
                headers={"content-type": "application/pdf", "prefer": "return=minimal"},
            )
            t1 = time.perf_counter()
            assert r.status_code == 201, r.text
            location = r.headers["location"].split("/_history")[0]
            check = hashlib.sha1() if i == 0 or i == warmup else None
            n = 0
            t2 = time.perf_counter()
            with client.stream("GET", location, headers={"accept": "application/pdf"}) as resp:
                assert resp.status_code == 200
                for piece in resp.iter_raw(1 << 20):
                    n += len(piece)
                    if check is not None:
                        check.update(piece)
            t3 = time.perf_counter()
            assert n == size
            if check is not None:
                assert check.digest() == expected, "downloaded bytes differ"
            if i >= warmup:
                ups.append(t1 - t0)
                downs.append(t3 - t2)
    server = _cpu_seconds(pid) - cpu0
    ours = server + (_own_seconds() - own0) + (_postgres_seconds() - pg0)
    others = _busy_seconds() - busy0 - ours
    return ups, downs, server, max(0.0, others) / (time.monotonic() - wall0)


def render(results: list[Result], args: argparse.Namespace) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Run {when} on {platform.node() or 'this machine'} ({os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}): `python bench/bench_documents.py"
        + (f" --rounds {args.rounds}" if args.rounds != 20 else "")
        + "`",
        "",
        f"Document size {args.size / 1e6:g} MB, {args.rounds} measured rounds after "
        f"{args.warmup} warm-up rounds, one keep-alive connection, one uvicorn worker. "
        f"MB/s = 10^6 bytes per second of request wall time (median round; aggregate = all "
        f"bytes / all time). Target: ≥ {TARGET_MB_S:g} MB/s each way. *Server CPU* is the "
        f"uvicorn process's CPU time per upload + download; *other CPU* is the cores used "
        f"during the rounds by everything but the server, the client and PostgreSQL (this "
        f"machine is shared and has 2 cores: read the figures with that column).",
        "",
        "| database | blobs | upload MB/s (median) | upload aggregate | download MB/s (median)"
        " | download aggregate | server CPU s / round trip | other CPU (cores) | meets target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        up, down = r.mb_s(r.upload_s), r.mb_s(r.download_s)
        ok = "yes" if min(up, down) >= TARGET_MB_S else "**no**"
        lines.append(
            f"| {r.database} | {r.blobs} | {up:.0f} | {r.aggregate(r.upload_s):.0f} | "
            f"{down:.0f} | {r.aggregate(r.download_s):.0f} | "
            f"{r.server_cpu_s / len(r.upload_s):.3f} | {r.other_cores:.1f} | {ok} |"
        )
    return "\n".join(lines)


SECTION = """## Documents

`bench/bench_documents.py` measures the throughput of one 10 MB document going up
(`POST /fhir/Binary`, raw bytes) and down (`GET /fhir/Binary/{{id}}`, raw bytes) through one
live uvicorn worker, for SQLite and PostgreSQL with the encrypted chunks in the database
(`db`) or in a directory (`dir`). Upload includes streaming, SHA-1, XSalsa20-Poly1305
encryption of 1 MiB chunks and the write (the spool file is flushed to disk for `dir`; the
database commits durably for `db`); download includes unwrapping the keys and authenticating
every chunk *before the first byte is sent* (the default `verify_before_send`: a 10 MB
document is decrypted once and sent from the verified plaintext; above `verify_buffer_bytes`,
16 MiB, it is decrypted a second time while streaming).

The `db` backend's uploads are bounded by the database's write path — SQLite writes the
chunks to its WAL and again at the checkpoint, PostgreSQL writes and flushes its WAL — so the
`dir` backend (`FHIR_CONSENT_BLOB_DIR`) is the one for bulk document traffic; the server CPU
per round trip shows the cost of the document store itself.

```sh
python bench/bench_documents.py            # ~1 minute; rewrites the results below
python bench/bench_documents.py --quick    # smoke run, prints only
```

Memory stays bounded whatever the size: `tests/documents/test_documents_large.py` (marked
`slow`) streams a 200 MiB document up and down through a live server and checks that the
server's peak RSS grows by less than 64 MiB (measured: about 12-14 MiB).

{begin}
{end}
"""


def write_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN not in doc:
        doc = doc.rstrip("\n") + "\n\n" + SECTION.format(begin=BEGIN, end=END)
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--blobs", default="db,dir")
    parser.add_argument("--quick", action="store_true", help="5 rounds; do not write the doc")
    parser.add_argument("--write-doc", action="store_true", help="write the doc even if --quick")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup = 5, 1
    results: list[Result] = []
    for db_kind in args.databases.split(","):
        for blobs in args.blobs.split(","):
            with tempfile.TemporaryDirectory(prefix="bench-docs-") as tmp_name:
                tmp = Path(tmp_name)
                try:
                    with database(db_kind, tmp) as url, server(url, blobs, tmp) as (base, pid):
                        ups, downs, cpu, others = measure(
                            base, pid, args.size, args.rounds, args.warmup
                        )
                except Exception as exc:  # noqa: BLE001 - e.g. PostgreSQL not running
                    print(f"{db_kind}/{blobs}: skipped ({type(exc).__name__}: {exc})")
                    continue
            result = Result(db_kind, blobs, ups, downs, args.size, cpu, others)
            results.append(result)
            print(
                f"{db_kind:>8}/{blobs:<3}  upload {result.mb_s(ups):6.0f} MB/s  "
                f"download {result.mb_s(downs):6.0f} MB/s  (other processes: {others:.1f} cores)"
            )
    text = render(results, args)
    print()
    print(text)
    if results and (args.write_doc or not args.quick):
        write_doc(text)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
