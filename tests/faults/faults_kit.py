"""Shared helpers for the fault tests: real server processes, a private PostgreSQL cluster,
the Waves fake node as a process, and the checks that prove nothing was lost or half-written.

A plain module rather than a ``conftest.py`` (other test folders import ``conftest`` by name).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from livekit import free_port, wait_for, wait_port

__all__ = [
    "PG_BIN",
    "PrivatePostgres",
    "Server",
    "WavesNode",
    "base_env",
    "child_pids",
    "free_port",
    "integrity_problems",
    "wait_for",
    "wait_port",
]

HERE = Path(__file__).resolve().parent
PG_BIN = Path(os.environ.get("FHIR_CONSENT_PG_BIN", "/usr/lib/postgresql/15/bin"))
WAVES_SENDER = "3NotQaBygbSvYZW4ftJ2ZwLXex4rTHY1Qzn"
WAVES_KEY = "fake-node-api-key"


def child_pids(pid: int) -> list[int]:
    """The uvicorn worker processes of supervisor ``pid`` (its children that run
    multiprocessing's spawn entry point, not its resource tracker), from /proc."""
    out: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"multiprocessing.spawn" in cmdline:
            out.append(int(stat.parent.name))
    return sorted(out)


def base_env(**settings: str) -> dict[str, str]:
    """The test process's environment without any FHIR_CONSENT_ setting, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_CONSENT_")}
    env.update(settings)
    return env


class Server:
    """``fhir-consent serve`` (``--workers N``) as a process group, in its own cwd."""

    def __init__(self, workdir: Path, env: dict[str, str], workers: int = 1) -> None:
        self.workdir, self.env, self.workers = workdir, env, workers
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "server.log"

    def start(self, workers: int | None = None) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fhir_consent.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(workers or self.workers),
            ],
            env=self.env,
            cwd=self.workdir,  # the server's default key files land there
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill -9 takes the workers too
        )
        log.close()
        wait_port(self.port, self.proc)

    def workers_pids(self) -> list[int]:
        assert self.proc is not None
        return child_pids(self.proc.pid)

    def kill_all(self) -> None:
        """kill -9 of the supervisor and every worker at once."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None
        time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class WavesNode:
    """tests/ledger/waves_fake.py as a process; its chain state survives restarts."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.workdir / "waves.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE.parent / "ledger" / "waves_fake.py"),
                "--port",
                str(self.port),
                "--state",
                str(self.workdir / "waves-state.json"),
                "--block-interval",
                "0.1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_port(self.port, self.proc)

    def kill(self) -> None:
        """SIGKILL: the node vanishes (connection refused), as a crashed host would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def env(self) -> dict[str, str]:
        return {
            "FHIR_CONSENT_LEDGER_ENGINE": "waves",
            "FHIR_CONSENT_LEDGER_WAVES_URL": self.url,
            "FHIR_CONSENT_LEDGER_WAVES_SENDER": WAVES_SENDER,
            "FHIR_CONSENT_LEDGER_WAVES_API_KEY": WAVES_KEY,
            "FHIR_CONSENT_LEDGER_CONFIRMATIONS": "1",
            "FHIR_CONSENT_LEDGER_POLL_INTERVAL": "0.05",
            "FHIR_CONSENT_LEDGER_BACKOFF_INITIAL": "0.05",
            "FHIR_CONSENT_LEDGER_BACKOFF_MAX": "1",
            "FHIR_CONSENT_LEDGER_RESEND_AFTER": "1.5",
            "FHIR_CONSENT_LEDGER_LEASE_TTL": "2",
        }


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (initdb + pg_ctl) on a free port in a temporary
    directory, so a test can stop and restart it. Never the machine's shared server.

    PostgreSQL refuses to run as root; as root the cluster runs as the ``postgres`` user."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN}")
        self.root = Path(tempfile.mkdtemp(prefix="fhir-consent-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(PG_BIN / tool), *args]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c max_connections=60"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def integrity_problems(db_url: str) -> list[str]:
    """What a crash may have left half-written, as readable problems (empty when sound):

    * a resource whose versions are not exactly 1..current, or whose current content is not
      its last version's;
    * a current, not deleted resource with an ``identifier`` but no token index row for it;
    * a Consent version without its ledger entry, a current Consent without its consent-index
      row, a ledger entry without its outbox row (when an external engine is configured), a
      gap in the ledger's sequence;
    """
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    problems: list[str] = []
    try:
        with engine.connect() as conn:
            q = conn.execute
            versions: dict[tuple[str, str], list[int]] = {}
            for rtype, rid, vid in q(
                sa.text("SELECT res_type, res_id, version_id FROM resource_versions")
            ):
                versions.setdefault((rtype, rid), []).append(int(vid))
            current = {
                (r.res_type, r.res_id): r
                for r in q(
                    sa.text("SELECT pk, res_type, res_id, version_id, deleted FROM resources")
                )
            }
            for key, vids in versions.items():
                row = current.get(key)
                if row is None:
                    problems.append(f"{key}: versions without a current row")
                    continue
                if sorted(vids) != list(range(1, int(row.version_id) + 1)):
                    problems.append(f"{key}: versions {sorted(vids)} vs current {row.version_id}")
            for key in current.keys() - versions.keys():
                problems.append(f"{key}: current row without versions")
            mismatched = q(
                sa.text(
                    "SELECT r.res_type, r.res_id FROM resources r JOIN resource_versions v"
                    " ON v.res_type = r.res_type AND v.res_id = r.res_id"
                    " AND v.version_id = r.version_id"
                    " WHERE NOT r.deleted AND CAST(r.content AS TEXT) <> CAST(v.content AS TEXT)"
                )
            ).all()
            problems += [
                f"{tuple(m)}: current content differs from its version" for m in mismatched
            ]
            indexed = {
                int(pk)
                for (pk,) in q(
                    sa.text("SELECT DISTINCT resource_pk FROM idx_token WHERE param = 'identifier'")
                )
            }
            with_identifier = q(
                sa.text(
                    "SELECT pk, res_type, res_id FROM resources WHERE NOT deleted"
                    " AND CAST(content AS TEXT) LIKE '%\"identifier\"%'"
                )
            ).all()
            problems += [
                f"{r.res_type}/{r.res_id}: no identifier index row"
                for r in with_identifier
                if int(r.pk) not in indexed
            ]
            refs = {ref for (ref,) in q(sa.text("SELECT ref FROM ledger_entry"))}
            for (rtype, rid), vids in versions.items():
                if rtype == "Consent":
                    for vid in vids:
                        if f"Consent/{rid}/_history/{vid}" not in refs:
                            problems.append(f"Consent/{rid}/_history/{vid}: no ledger entry")
            indexed_consents = {
                int(pk) for (pk,) in q(sa.text("SELECT resource_pk FROM consent_index"))
            }
            for (rtype, rid), row in current.items():
                if rtype == "Consent" and not row.deleted and int(row.pk) not in indexed_consents:
                    problems.append(f"Consent/{rid}: no consent index row")
            seqs = [int(s) for (s,) in q(sa.text("SELECT seq FROM ledger_entry ORDER BY seq"))]
            if seqs != list(range(len(seqs))):
                problems.append("ledger sequence has gaps")
            outbox = {int(s) for (s,) in q(sa.text("SELECT seq FROM ledger_outbox"))}
            if outbox and set(seqs) - outbox:
                problems.append(f"{len(set(seqs) - outbox)} ledger entries without an outbox row")
    finally:
        engine.dispose()
    return problems


def consent_body(identifier: str, status: str = "proposed") -> dict[str, Any]:
    """A clinic's inquiry with a business identifier (consent.md §2.1)."""
    return {
        "resourceType": "Consent",
        "identifier": [{"system": "urn:fault-test", "value": identifier}],
        "status": status,
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": "Patient/fault-p1"},
        "dateTime": "2024-05-01T12:00:00Z",
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
        "provision": {"period": {"start": "2024-05-01", "end": "2030-05-01"}},
    }


class Workload:
    """Clients that write until told to stop, retrying what they could not learn the outcome
    of (a transport error, or a 503) the way a careful client does: creates are conditional
    (``If-None-Exist`` on a unique identifier), updates carry ``If-Match`` and are re-read
    before a retry. ``acked`` holds every write the server acknowledged with a 2xx."""

    RETRY = (502, 503, 504)

    def __init__(self, base: str) -> None:
        import threading

        self.base = base
        self.lock = threading.Lock()
        self.acked: list[tuple[str, str, int]] = []  # (type, id, versionId)
        self.identifiers: list[tuple[str, str]] = []  # (type, identifier) acknowledged
        self.statuses: dict[int, int] = {}
        self.transport_errors = 0
        self.unexpected: list[str] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def _record(self, status: int) -> None:
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def _send(self, client: Any, method: str, url: str, **kw: Any) -> Any:
        """Until an answer that is not 'try again' (or the workload is stopped: None)."""
        import httpx

        while True:
            try:
                r = client.request(method, url, **kw)
            except httpx.TransportError:
                with self.lock:
                    self.transport_errors += 1
                if self.stop.is_set() and method == "GET":
                    return None
                time.sleep(0.2)
                continue
            self._record(r.status_code)
            if r.status_code in self.RETRY:
                if r.status_code >= 500:
                    body = r.json()
                    if body.get("resourceType") != "OperationOutcome":
                        with self.lock:
                            self.unexpected.append(f"{r.status_code} without OperationOutcome")
                time.sleep(0.2)
                continue
            return r

    def _ack(self, rtype: str, body: dict[str, Any]) -> None:
        with self.lock:
            self.acked.append((rtype, body["id"], int(body["meta"]["versionId"])))

    def _create(self, client: Any, rtype: str, body: dict[str, Any], ident: str) -> Any:
        headers = {"If-None-Exist": f"identifier=urn:fault-test|{ident}"}
        r = self._send(client, "POST", f"{self.base}/{rtype}", json=body, headers=headers)
        if r.status_code not in (200, 201):
            with self.lock:
                self.unexpected.append(f"create {rtype}: {r.status_code} {r.text[:200]}")
            return None
        doc = r.json()
        self._ack(rtype, doc)
        with self.lock:
            self.identifiers.append((rtype, ident))
        return doc

    def _set_status(self, client: Any, doc: dict[str, Any], status: str) -> Any:
        url = f"{self.base}/Consent/{doc['id']}"
        while True:
            doc = {**doc, "status": status}
            version = doc["meta"]["versionId"]
            r = self._send(client, "PUT", url, json=doc, headers={"If-Match": f'W/"{version}"'})
            if r.status_code == 200:
                out = r.json()
                self._ack("Consent", out)
                return out
            if r.status_code == 412:  # an earlier attempt did land: see where it stands
                cur = self._send(client, "GET", url)
                current = cur.json()
                if current["status"] == status:
                    self._ack("Consent", current)
                    return current
                doc = current
                continue
            with self.lock:
                self.unexpected.append(f"update Consent: {r.status_code} {r.text[:200]}")
            return None

    def run_client(self, n: int) -> None:
        import uuid

        import httpx

        statuses = ["active", "inactive", "active", "rejected"]
        with httpx.Client(timeout=10, headers={"accept": "application/fhir+json"}) as client:
            i = 0
            while not self.stop.is_set():
                ident = f"c{n}-{i}-{uuid.uuid4().hex[:8]}"
                if i % 3 == 0:
                    patient = {
                        "resourceType": "Patient",
                        "identifier": [{"system": "urn:fault-test", "value": ident}],
                        "name": [{"family": f"Fault{n}", "given": [str(i)]}],
                    }
                    self._create(client, "Patient", patient, ident)
                else:
                    doc = self._create(client, "Consent", consent_body(ident), ident)
                    if doc is not None:
                        for status in statuses[: 1 + i % len(statuses)]:
                            if self.stop.is_set() or doc is None:
                                break
                            doc = self._set_status(client, doc, status)
                i += 1

    def start(self, clients: int) -> None:
        import threading

        self.threads = [
            threading.Thread(target=self.run_client, args=(n,), daemon=True) for n in range(clients)
        ]
        for t in self.threads:
            t.start()

    def finish(self, timeout: float = 60) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a client hung"

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


def lost_or_duplicated(db_url: str, work: Workload) -> list[str]:
    """Acknowledged writes missing from the database, and identifiers stored more than once."""
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    problems: list[str] = []
    try:
        with engine.connect() as conn:
            have = {
                (t, i, int(v))
                for t, i, v in conn.execute(
                    sa.text("SELECT res_type, res_id, version_id FROM resource_versions")
                )
            }
            counts: dict[tuple[str, str], int] = {}
            for rtype, value in conn.execute(
                sa.text(
                    "SELECT res_type, code FROM idx_token WHERE param = 'identifier'"
                    " AND system = 'urn:fault-test'"
                )
            ):
                counts[(rtype, value)] = counts.get((rtype, value), 0) + 1
    finally:
        engine.dispose()
    for ack in work.acked:
        if ack not in have:
            problems.append(f"acknowledged {ack} is missing")
    for key in work.identifiers:
        if counts.get(key, 0) != 1:
            problems.append(f"{key} stored {counts.get(key, 0)} times")
    problems += [f"{k} stored {n} times" for k, n in counts.items() if n > 1]
    return problems
