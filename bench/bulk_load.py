"""Bulk loader for the load benchmark: Organizations, Practitioners, Patients and
DocumentReferences, written straight into the store tables exactly as the server writes them.

Rows are identical to API-created ones by construction: every resource goes through the
server's own code for everything but the SQL round-trips:

* ``fhir_consent.fhir.services.finalize`` sets ``id``/``meta`` and produces the canonical
  JSON bytes;
* ``fhir_consent.fhir.searchparams.extract`` produces the search-index rows;
* ``fhir_consent.store.repository.index_rows`` turns the index into table rows — the very
  tuples ``Repository.insert`` writes — and :class:`Recorder` keeps them with the current and
  version rows, so value truncation and column names are the repository's own (``verify``
  checks that an API create writes the same rows).

The recorded rows are then written with ``COPY … FROM STDIN`` (PostgreSQL; several worker
processes, secondary indexes and foreign keys dropped during the load and re-created from
their own catalog definitions afterwards, then ``VACUUM ANALYZE``) or with executemany
(SQLite, small data sets). Generation is deterministic: resource *i* of a kind is a function
of ``(seed, kind, i)`` only, so :func:`verify` can regenerate any of them and compare it with
what the HTTP API returns, and checks that a copy created through the API gets the very same
index rows.

Only a loopback database is accepted, and the PostgreSQL fast path refuses a database that
already holds resources (it drops and re-creates indexes).

    python bench/bulk_load.py --database-url postgresql://postgres@127.0.0.1:5432/bench_fc \
        --patients 100000 --documents 1000000
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import ipaddress
import multiprocessing
import random
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import sqlalchemy as sa

from fhir_consent.fhir.searchparams import extract
from fhir_consent.fhir.services import finalize
from fhir_consent.fhir.validation import validate_resource
from fhir_consent.store.db import Database, normalize_url
from fhir_consent.store.repository import index_rows
from fhir_consent.store.tables import metadata

__all__ = [
    "LoadPlan",
    "Recorder",
    "document",
    "load",
    "organization",
    "patient",
    "patient_id",
    "practitioner",
    "resource_id",
    "rows_for",
    "verify",
]

TABLES = ("resources", "resource_versions", "idx_token", "idx_string", "idx_reference", "idx_date")

# -- deterministic synthetic data ------------------------------------------------------------

_FAMILY = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
    "Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White "
    "Harris Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres "
    "Nguyen Hill Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts "
    "Müller Schmidt Dubois Rossi Kowalski Novák Jensen Virtanen Silva Chalmers Windsor"
).split()
_GIVEN_M = (
    "James John Robert Michael William David Richard Joseph Thomas Charles Christopher Daniel "
    "Matthew Anthony Mark Donald Steven Paul Andrew Joshua Peter Jim Luca Jürgen Mateo Noah"
).split()
_GIVEN_F = (
    "Mary Patricia Jennifer Linda Elizabeth Barbara Susan Jessica Sarah Karen Lisa Nancy Betty "
    "Margaret Sandra Ashley Emily Donna Michelle Carol Amanda Chloé Zoë Sofia Anna Mia"
).split()
_STREETS = (
    "Erewhon St|High Street|Main Street|Oak Avenue|Station Road|Church Lane|Park Road|"
    "Victoria Road|Mill Lane|Maple Drive|Cedar Court|Elm Street|King Street|Queen Street"
).split("|")
_CITIES = (
    ("Pleasantville", "Rainbow", "Vic", "3999", "AU"),
    ("Springfield", "Sangamon", "IL", "62701", "US"),
    ("Riverside", "Riverside", "CA", "92501", "US"),
    ("Franklin", "Williamson", "TN", "37064", "US"),
    ("Greenville", "Pitt", "NC", "27834", "US"),
    ("Bristol", "Sullivan", "TN", "37620", "US"),
    ("Clinton", "Hinds", "MS", "39056", "US"),
    ("Madison", "Dane", "WI", "53703", "US"),
    ("Utrecht", "Utrecht", "UT", "3511", "NL"),
    ("Lyon", "Rhône", "ARA", "69001", "FR"),
)
#: (LOINC code, display, category code, category display)
_DOC_TYPES = (
    ("34108-1", "Outpatient Note", "clinical-note", "Clinical Note"),
    ("11506-3", "Progress note", "clinical-note", "Clinical Note"),
    ("18842-5", "Discharge summary", "clinical-note", "Clinical Note"),
    ("34117-2", "History and physical note", "clinical-note", "Clinical Note"),
    ("11488-4", "Consult note", "clinical-note", "Clinical Note"),
    ("28570-0", "Procedure note", "clinical-note", "Clinical Note"),
    ("57133-1", "Referral note", "clinical-note", "Clinical Note"),
    ("18748-4", "Diagnostic imaging study", "imaging", "Imaging"),
    ("11502-2", "Laboratory report", "laboratory", "Laboratory"),
    ("34133-9", "Summary of episode note", "clinical-note", "Clinical Note"),
)
_CONTENT = (
    ("application/pdf", "urn:ihe:iti:xds:2017:mimeTypeSufficient", "mimeType Sufficient"),
    ("text/plain", "urn:ihe:iti:xds:2017:mimeTypeSufficient", "mimeType Sufficient"),
    ("application/hl7-v3+xml", "urn:hl7-org:sdwg:ccda-structuredBody:2.1", "C-CDA 2.1"),
)
_SETTINGS = (
    ("408443003", "General medical practice"),
    ("394802001", "General medicine"),
    ("394814009", "General practice"),
    ("419192003", "Internal medicine"),
    ("394579002", "Cardiology"),
)
_FACILITIES = (("225732001", "Community hospital"), ("33022008", "Hospital-based outpatient"))
_DOC_EPOCH = datetime(2010, 1, 1, tzinfo=UTC)
_DOC_SPAN_S = int((datetime(2026, 1, 1, tzinfo=UTC) - _DOC_EPOCH).total_seconds())

KINDS = ("Organization", "Practitioner", "Patient", "DocumentReference")


@functools.lru_cache(maxsize=1 << 18)
def resource_id(seed: int, kind: str, index: int) -> str:
    """The id of resource ``index`` of ``kind``: a version-4 UUID like those the server
    assigns, derived from ``(seed, kind, index)``."""
    return _uuid_hex(hashlib.blake2b(f"{seed}/{kind}/{index}".encode(), digest_size=16).hexdigest())


def _uuid_hex(h: str) -> str:
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


def patient_id(seed: int, index: int) -> str:
    return resource_id(seed, "Patient", index)


def _rng(seed: int, kind: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{kind}/{index}")


def _address(rng: random.Random, use: str = "home") -> dict[str, Any]:
    city, district, state, postal, country = rng.choice(_CITIES)
    return {
        "use": use,
        "type": "both",
        "line": [f"{rng.randint(1, 999)} {rng.choice(_STREETS)}"],
        "city": city,
        "district": district,
        "state": state,
        "postalCode": postal,
        "country": country,
    }


def organization(seed: int, index: int) -> dict[str, Any]:
    """A healthcare provider organization."""
    rng = _rng(seed, "Organization", index)
    suffix = rng.choice(("General Hospital", "Clinic", "Medical Center"))
    name = f"{rng.choice(_CITIES)[0]} {suffix}"
    return {
        "resourceType": "Organization",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.7", "value": f"{91000 + index}"}],
        "active": True,
        "type": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                        "code": "prov",
                        "display": "Healthcare Provider",
                    }
                ]
            }
        ],
        "name": f"{name} {index}",
        "telecom": [{"system": "phone", "value": f"+1 555 01{index % 100:02d}", "use": "work"}],
        "address": [_address(rng, "work")],
    }


def practitioner(seed: int, index: int) -> dict[str, Any]:
    """A physician with an NPI."""
    rng = _rng(seed, "Practitioner", index)
    gender = rng.choice(("male", "female"))
    given = rng.choice(_GIVEN_M if gender == "male" else _GIVEN_F)
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": f"{1e9 + index:.0f}"}],
        "active": True,
        "name": [{"family": rng.choice(_FAMILY), "given": [given], "prefix": ["Dr."]}],
        "gender": gender,
    }


def patient(seed: int, index: int, n_orgs: int) -> dict[str, Any]:
    """A patient shaped like the official ``Patient-example`` (narrative, MRN, name, telecom,
    address, managing organization), with varied values."""
    rng = _rng(seed, "Patient", index)
    gender = rng.choice(("male", "female"))
    pool = _GIVEN_M if gender == "male" else _GIVEN_F
    given = [rng.choice(pool), rng.choice(pool)]
    family = rng.choice(_FAMILY)
    birth = datetime(1930, 1, 1) + timedelta(days=rng.randrange(33_000))
    address = _address(rng)
    mrn = f"{1_000_000 + index}"
    div = (
        '<div xmlns="http://www.w3.org/1999/xhtml"><table><tbody>'
        f"<tr><td>Name</td><td>{' '.join(given)} <b>{family}</b></td></tr>"
        f"<tr><td>Address</td><td>{address['line'][0]}, {address['city']}</td></tr>"
        f"<tr><td>Id</td><td>MRN: {mrn}</td></tr></tbody></table></div>"
    )
    return {
        "resourceType": "Patient",
        "text": {"status": "generated", "div": div},
        "identifier": [
            {
                "use": "usual",
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}
                    ]
                },
                "system": "urn:oid:1.2.36.146.595.217.0.1",
                "value": mrn,
                "period": {"start": "2001-05-06"},
                "assigner": {"display": "Acme Healthcare"},
            }
        ],
        "active": True,
        "name": [{"use": "official", "family": family, "given": given}],
        "telecom": [
            {"system": "phone", "value": f"(03) 5555 {rng.randrange(10_000):04d}", "use": "home"},
            {"system": "email", "value": f"patient{index}@example.org", "use": "home"},
        ],
        "gender": gender,
        "birthDate": f"{birth.year:04d}-{birth.month:02d}-{birth.day:02d}",
        "address": [address],
        "managingOrganization": {
            "reference": f"Organization/{resource_id(seed, 'Organization', index % n_orgs)}"
        },
    }


def _instant(dt: datetime, offset_h: int) -> str:
    t = dt + timedelta(hours=offset_h)
    sign = "+" if offset_h >= 0 else "-"
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        f"{sign}{abs(offset_h):02d}:00"
    )


def document(
    seed: int, index: int, n_patients: int, n_practitioners: int, n_orgs: int
) -> tuple[dict[str, Any], int]:
    """A DocumentReference for a random patient (returned with the patient's index): LOINC
    type, category, subject, an instant ``date`` spread over 2010–2025, author, custodian,
    security label, one attachment with format, and a clinical context."""
    rng = _rng(seed, "DocumentReference", index)
    p = rng.randrange(n_patients)
    code, display, cat, cat_display = rng.choice(_DOC_TYPES)
    when = _DOC_EPOCH + timedelta(seconds=rng.randrange(_DOC_SPAN_S))
    offset = rng.choice((-5, 0, 1, 2, 10))
    ctype, fmt, fmt_display = rng.choice(_CONTENT)
    setting = rng.choice(_SETTINGS)
    facility = rng.choice(_FACILITIES)
    digest = hashlib.sha1(f"{seed}/{index}".encode())
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "masterIdentifier": {
            "system": "urn:ietf:rfc:3986",
            "value": f"urn:oid:1.3.6.1.4.1.21367.2005.3.7.{index}",
        },
        "status": "current" if rng.random() < 0.95 else "superseded",
        "docStatus": "final",
        "type": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
        "category": [
            {
                "coding": [
                    {
                        "system": "http://hl7.org/fhir/us/core/CodeSystem/"
                        "us-core-documentreference-category",
                        "code": cat,
                        "display": cat_display,
                    }
                ]
            }
        ],
        "subject": {"reference": f"Patient/{patient_id(seed, p)}"},
        "date": _instant(when, offset),
        "author": [
            {
                "reference": "Practitioner/"
                + resource_id(seed, "Practitioner", rng.randrange(n_practitioners))
            }
        ],
        "custodian": {"reference": f"Organization/{resource_id(seed, 'Organization', p % n_orgs)}"},
        "description": display,
        "securityLabel": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                        "code": "N",
                        "display": "normal",
                    }
                ]
            }
        ],
        "content": [
            {
                "attachment": {
                    "contentType": ctype,
                    "language": "en-US",
                    "url": "http://example.org/documents/Binary/" + _uuid_hex(digest.hexdigest()),
                    "size": rng.randrange(2_000, 400_000),
                    "hash": base64.b64encode(digest.digest()).decode(),
                    "title": display,
                    "creation": _instant(when - timedelta(minutes=rng.randrange(5, 120)), offset),
                },
                "format": {
                    "system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode",
                    "code": fmt,
                    "display": fmt_display,
                },
            }
        ],
        "context": {
            "period": {
                "start": _instant(when - timedelta(hours=1), offset),
                "end": _instant(when, offset),
            },
            "facilityType": {
                "coding": [
                    {
                        "system": "http://snomed.info/sct",
                        "code": facility[0],
                        "display": facility[1],
                    }
                ]
            },
            "practiceSetting": {
                "coding": [
                    {"system": "http://snomed.info/sct", "code": setting[0], "display": setting[1]}
                ]
            },
        },
    }
    return doc, p


# -- rows exactly as the repository writes them ------------------------------------------------


class _Dialect:
    def __init__(self, name: str) -> None:
        self.name = name


class _Returning:
    def __init__(self, value: int) -> None:
        self.value = value

    def scalar_one(self) -> int:
        return self.value


class Recorder:
    """Collects the rows of creates per table (``rows[table_name]``), with ``next_pk`` as the
    resource's surrogate key; ``execute`` records plain SQLAlchemy inserts the same way."""

    def __init__(self, dialect: str = "postgresql") -> None:
        self.dialect = _Dialect(dialect)
        self.rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
        self.next_pk = 0

    def record_create(
        self, res_type: str, res_id: str, content: bytes, now: int, index: Any, method: str
    ) -> None:
        """The rows ``Repository.insert`` writes for a create: the current row, version 1 and
        the index rows (``repository.index_rows``, the very tuples the store inserts)."""
        pk = self.next_pk
        base = {"res_type": res_type, "res_id": res_id, "version_id": 1, "last_updated": now}
        self.rows["resources"].append({**base, "deleted": False, "content": content, "pk": pk})
        self.rows["resource_versions"].append(
            {**base, "deleted": False, "method": method, "content": content}
        )
        for table, rows in index_rows(pk, res_type, index).items():
            self.rows[table].extend(rows)

    def execute(self, stmt: Any, params: Any = None) -> _Returning:
        table = stmt.table.name
        if table == "resources":
            row = dict(params)
            row["pk"] = self.next_pk
            self.rows[table].append(row)
            return _Returning(self.next_pk)
        if isinstance(params, dict):
            self.rows[table].append(params)
        else:
            self.rows[table].extend(params)
        return _Returning(0)


def rows_for(
    rec: Recorder, res_type: str, res_id: str, resource: dict[str, Any], pk: int, now: int
) -> bytes:
    """Record the rows of one create (``POST``) of ``resource`` with this id, pk and time,
    exactly as ``ResourceService.create`` would write them. Returns the stored content."""
    content, parsed = finalize(resource, res_id, 1, now)
    rec.next_pk = pk
    rec.record_create(res_type, res_id, content, now, extract(parsed), "POST")
    return content


# -- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """How many of each kind, and the ordering of pks/timestamps (kinds in :data:`KINDS`
    order, so the global ordinal of resource *i* of a kind is ``offset(kind) + i``)."""

    seed: int
    organizations: int
    practitioners: int
    patients: int
    documents: int
    base_pk: int = 0
    t0: int = 0  # microseconds; resource with ordinal k has last_updated t0 + k

    def count(self, kind: str) -> int:
        return {
            "Organization": self.organizations,
            "Practitioner": self.practitioners,
            "Patient": self.patients,
            "DocumentReference": self.documents,
        }[kind]

    def offset(self, kind: str) -> int:
        total = 0
        for k in KINDS:
            if k == kind:
                return total
            total += self.count(k)
        raise KeyError(kind)

    @property
    def total(self) -> int:
        return sum(self.count(k) for k in KINDS)

    def make(self, kind: str, index: int) -> dict[str, Any]:
        """Resource ``index`` of ``kind`` (without id/meta)."""
        if kind == "Organization":
            return organization(self.seed, index)
        if kind == "Practitioner":
            return practitioner(self.seed, index)
        if kind == "Patient":
            return patient(self.seed, index, self.organizations)
        doc, _ = document(self.seed, index, self.patients, self.practitioners, self.organizations)
        return doc

    def chunks(self, size: int) -> Iterator[tuple[str, int, int]]:
        for kind in KINDS:
            n = self.count(kind)
            for start in range(0, n, size):
                yield kind, start, min(size, n - start)


def _record_chunk(plan: LoadPlan, kind: str, start: int, count: int, dialect: str) -> Recorder:
    rec = Recorder(dialect)
    base = plan.offset(kind)
    for i in range(start, start + count):
        ordinal = base + i
        rows_for(
            rec,
            kind,
            resource_id(plan.seed, kind, i),
            plan.make(kind, i),
            plan.base_pk + ordinal + 1,
            plan.t0 + ordinal,
        )
    return rec


# -- PostgreSQL: COPY ------------------------------------------------------------------------


def _copy_value(value: Any) -> Any:
    # JSON content is recorded as canonical bytes; COPY it as text into the jsonb column.
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _pg_conninfo(url: str) -> str:
    """SQLAlchemy URL -> libpq URL for psycopg."""
    return normalize_url(url).replace("postgresql+psycopg://", "postgresql://", 1)


_WORKER_CONN: Any = None


def _versions_derivable(rec: Recorder) -> bool:
    """True when every recorded ``resource_versions`` row is its ``resources`` row plus
    ``method`` (true for creates), so it can be copied server-side from ``resources``."""
    res, ver = rec.rows["resources"], rec.rows["resource_versions"]
    return len(res) == len(ver) and all(
        set(v) == (set(r) - {"pk"}) | {"method"}
        and v["method"] == "POST"
        and all(v[k] == r[k] for k in v if k != "method")
        for r, v in zip(res, ver, strict=True)
    )


_VERSIONS_FROM_RESOURCES = (
    "INSERT INTO resource_versions "
    "(res_type, res_id, version_id, last_updated, deleted, method, content) "
    "SELECT res_type, res_id, version_id, last_updated, deleted, 'POST', content "
    "FROM resources WHERE pk BETWEEN %s AND %s ORDER BY pk"
)


def _pg_worker_chunk(args: tuple[str, LoadPlan, str, int, int]) -> tuple[str, int, int]:
    """Worker process: build one chunk and COPY it in its own transaction.

    ``resource_versions`` rows of a create equal the ``resources`` rows (plus ``method``), so
    when the recorder confirms that, they are copied server-side with INSERT … SELECT instead
    of sending and parsing the same JSON twice."""
    import psycopg

    global _WORKER_CONN
    url, plan, kind, start, count = args
    if _WORKER_CONN is None:
        _WORKER_CONN = psycopg.connect(_pg_conninfo(url))
        _WORKER_CONN.execute("SET synchronous_commit = off")
        _WORKER_CONN.commit()
    rec = _record_chunk(plan, kind, start, count, "postgresql")
    derive = _versions_derivable(rec)
    n_rows = 0
    with _WORKER_CONN.cursor() as cur:
        for table in TABLES:
            rows = rec.rows[table]
            if not rows:
                continue
            n_rows += len(rows)
            if table == "resource_versions" and derive:
                pks = [r["pk"] for r in rec.rows["resources"]]
                assert pks == list(range(pks[0], pks[0] + len(pks)))
                cur.execute(_VERSIONS_FROM_RESOURCES, (pks[0], pks[-1]))
                continue
            columns = list(rows[0])
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row([_copy_value(row[c]) for c in columns])
    _WORKER_CONN.commit()
    return kind, count, n_rows


def _close_worker_conn() -> None:
    global _WORKER_CONN
    if _WORKER_CONN is not None:
        _WORKER_CONN.close()
        _WORKER_CONN = None


def _pg_secondary_ddl(conn: Any) -> tuple[list[str], list[str]]:
    """(drop statements, re-create statements) for foreign keys, unique constraints and
    plain indexes of the store tables, taken from the catalog so they are re-created exactly."""
    drops: list[str] = []
    creates: list[str] = []
    tables = list(TABLES)
    cons = conn.execute(
        "SELECT c.conrelid::regclass::text, c.conname, c.contype, pg_get_constraintdef(c.oid) "
        "FROM pg_constraint c WHERE c.conrelid::regclass::text = ANY(%s) "
        "AND c.contype IN ('f', 'u') ORDER BY c.contype DESC, 1, 2",
        (tables,),
    ).fetchall()
    # foreign keys go last on re-creation (validated once, against the finished tables)
    for table, name, _kind, _definition in cons:
        drops.append(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for table, name, _kind, definition in sorted(cons, key=lambda c: (c[2] == "f", c[0], c[1])):
        creates.append(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
    idx = conn.execute(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "WHERE i.indrelid::regclass::text = ANY(%s) AND NOT i.indisprimary "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid) "
        "ORDER BY 1",
        (tables,),
    ).fetchall()
    for name, definition in idx:
        drops.append(f"DROP INDEX {name}")
        creates.append(definition)
    return drops, creates


def _check_loopback_url(url: str) -> None:
    if url.startswith("sqlite"):
        return
    host = urlsplit(normalize_url(url)).hostname or "localhost"
    for info in socket.getaddrinfo(host, None):
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise SystemExit(f"refusing a non-loopback database host: {host}")


def _progress(label: str, done: int, total: int, started: float) -> None:
    elapsed = time.monotonic() - started
    rate = done / elapsed if elapsed else 0.0
    eta = (total - done) / rate if rate else 0.0
    print(
        f"  {label}: {done:,}/{total:,} ({100 * done / max(total, 1):.0f}%) "
        f"{rate:,.0f}/s, {elapsed:.0f}s elapsed, ETA {eta:.0f}s",
        flush=True,
    )


def _load_postgres(url: str, plan: LoadPlan, workers: int, chunk: int) -> None:
    import psycopg

    conninfo = _pg_conninfo(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        existing = conn.execute("SELECT count(*) FROM resources").fetchone()
        if existing is None or existing[0] != 0:
            raise SystemExit("the database already holds resources; bulk_load needs an empty one")
        base = conn.execute("SELECT coalesce(max(pk), 0) FROM resources").fetchone()
        plan = LoadPlan(**{**_plan_dict(plan), "base_pk": int(base[0]) if base else 0})
        drops, creates = _pg_secondary_ddl(conn)
        print(f"  dropping {len(drops)} secondary indexes/constraints for the load", flush=True)
        for stmt in drops:
            conn.execute(stmt)
        try:
            started = time.monotonic()
            done = 0
            jobs = [(url, plan, kind, start, count) for kind, start, count in plan.chunks(chunk)]
            next_report = 0.0
            results: Iterator[tuple[str, int, int]]
            with contextlib.ExitStack() as stack:
                if workers > 1 and plan.total > 50_000:
                    pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
                    results = pool.imap_unordered(_pg_worker_chunk, jobs)
                else:  # small data sets: no process start-up cost
                    stack.callback(_close_worker_conn)
                    results = map(_pg_worker_chunk, jobs)
                for _kind, count, _rows in results:
                    done += count
                    if time.monotonic() >= next_report or done == plan.total:
                        _progress("resources", done, plan.total, started)
                        next_report = time.monotonic() + 10
        finally:
            print(f"  re-creating {len(creates)} indexes/constraints", flush=True)
            t = time.monotonic()
            conn.execute("SET maintenance_work_mem = '1GB'")
            conn.execute("SET max_parallel_maintenance_workers = 2")
            for stmt in creates:
                conn.execute(stmt)
            print(f"  indexes/constraints built in {time.monotonic() - t:.0f}s", flush=True)
        for table, column in (
            ("resources", "pk"),
            ("resource_versions", "seq"),
            ("idx_token", "id"),
            ("idx_string", "id"),
            ("idx_reference", "id"),
            ("idx_date", "id"),
        ):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                f"(SELECT coalesce(max({column}), 0) + 1 FROM {table}), false)"
            )
        t = time.monotonic()
        conn.execute("VACUUM (ANALYZE) " + ", ".join(TABLES))
        print(f"  VACUUM ANALYZE in {time.monotonic() - t:.0f}s", flush=True)


def _plan_dict(plan: LoadPlan) -> dict[str, Any]:
    return {f: getattr(plan, f) for f in LoadPlan.__dataclass_fields__}


# -- SQLite (or any database): executemany through the server's own engine -------------------


def _load_generic(url: str, plan: LoadPlan, chunk: int) -> None:
    db = Database(url)
    try:
        with db.read() as conn:
            base = conn.execute(sa.text("SELECT coalesce(max(pk), 0) FROM resources")).scalar()
        plan = LoadPlan(**{**_plan_dict(plan), "base_pk": int(base or 0)})
        started = time.monotonic()
        done = 0
        next_report = 0.0
        for kind, start, count in plan.chunks(chunk):
            rec = _record_chunk(plan, kind, start, count, db.engine.dialect.name)
            with db.write() as conn:
                for table in TABLES:
                    if rec.rows[table]:
                        conn.execute(metadata.tables[table].insert(), rec.rows[table])
            done += count
            if time.monotonic() >= next_report or done == plan.total:
                _progress("resources", done, plan.total, started)
                next_report = time.monotonic() + 10
        with db.write() as conn:
            conn.exec_driver_sql("ANALYZE")
    finally:
        db.dispose()


def _validate_sample(plan: LoadPlan, per_kind: int = 5) -> None:
    """Run the server's validation on a few generated resources of each kind."""
    for kind in KINDS:
        n = plan.count(kind)
        for i in sorted({0, n - 1, *random.Random(plan.seed).sample(range(n), min(per_kind, n))}):
            if 0 <= i < n:
                validate_resource(plan.make(kind, i), kind)


def load(
    url: str,
    plan: LoadPlan,
    *,
    workers: int = 3,
    chunk: int = 5000,
) -> LoadPlan:
    """Load ``plan`` into the (migrated, empty) database at ``url``; returns the plan with its
    actual ``base_pk``."""
    _check_loopback_url(url)
    _validate_sample(plan)
    started = time.monotonic()
    print(
        f"bulk load: {plan.organizations:,} Organizations, {plan.practitioners:,} "
        f"Practitioners, {plan.patients:,} Patients, {plan.documents:,} DocumentReferences "
        f"-> {urlsplit(normalize_url(url)).scheme}",
        flush=True,
    )
    if normalize_url(url).startswith("postgresql"):
        _load_postgres(url, plan, workers, chunk)
    else:
        _load_generic(url, plan, chunk)
    print(f"bulk load done in {time.monotonic() - started:.0f}s", flush=True)
    return plan


# -- verification through the HTTP API ---------------------------------------------------------


def _without_meta(resource: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in resource.items() if k not in ("id", "meta")}
    return out


def _index_rows(conn: sa.Connection, pk: int) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    for name in ("idx_token", "idx_string", "idx_reference", "idx_date"):
        table = metadata.tables[name]
        cols = [c for c in table.c if c.name not in ("id", "resource_pk")]
        rows = conn.execute(sa.select(*cols).where(table.c.resource_pk == pk)).all()
        out[name] = sorted((tuple(r) for r in rows), key=repr)
    return out


def _version_row(conn: sa.Connection, res_type: str, res_id: str) -> tuple[Any, ...]:
    v = metadata.tables["resource_versions"].c
    row = conn.execute(
        sa.select(v.version_id, v.deleted, v.method).where(
            v.res_type == res_type, v.res_id == res_id
        )
    ).one()
    return tuple(row)


def verify(base_url: str, db_url: str, plan: LoadPlan, samples: int = 3) -> list[str]:
    """Check the loaded data through the running server; returns a list of findings (empty
    when everything matches).

    * a few Patients and DocumentReferences read back equal their regenerated content;
    * ``DocumentReference?patient=X`` and ``…&date=ge2020-01-01`` return exactly the documents
      of X (resp. dated from 2020) that the database content says;
    * a copy of a bulk document and of a bulk patient created through ``POST`` get the same
      index rows and version row as the bulk ones (then the copies are deleted).
    """
    problems: list[str] = []
    rng = random.Random(plan.seed + 1)
    db = Database(db_url)
    headers = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
    r = metadata.tables["resources"].c
    try:
        with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
            for kind in ("Patient", "DocumentReference"):
                for i in rng.sample(range(plan.count(kind)), min(samples, plan.count(kind))):
                    rid = resource_id(plan.seed, kind, i)
                    resp = client.get(f"/{kind}/{rid}")
                    if resp.status_code != 200:
                        problems.append(f"GET {kind}/{i}: HTTP {resp.status_code}")
                        continue
                    got = resp.json()
                    if _without_meta(got) != plan.make(kind, i) or got.get("id") != rid:
                        problems.append(f"GET {kind}/{i}: content differs from the generator")
            for _ in range(samples):
                p = rng.randrange(plan.patients)
                pid = patient_id(plan.seed, p)
                with db.read() as conn:
                    stored = conn.execute(
                        sa.select(r.res_id, r.content).where(
                            r.res_type == "DocumentReference",
                            r.pk.in_(
                                sa.select(metadata.tables["idx_reference"].c.resource_pk).where(
                                    metadata.tables["idx_reference"].c.url == f"Patient/{pid}"
                                )
                            ),
                        )
                    ).all()
                expected_all = {rid for rid, _ in stored}
                cutoff = datetime(2020, 1, 1, tzinfo=UTC)
                expected_2020 = {
                    rid
                    for rid, content in stored
                    if datetime.fromisoformat(orjson.loads(content)["date"]) >= cutoff
                }
                for query, expected in (
                    ({"patient": pid, "_count": "1000"}, expected_all),
                    ({"patient": pid, "date": "ge2020-01-01", "_count": "1000"}, expected_2020),
                ):
                    resp = client.get("/DocumentReference", params=query)
                    bundle = resp.json()
                    got_ids = {e["resource"]["id"] for e in bundle.get("entry", [])}
                    if (
                        resp.status_code != 200
                        or got_ids != expected
                        or (bundle.get("total") != len(expected))
                    ):
                        problems.append(
                            f"search {sorted(query)} for patient {p}: {len(got_ids)} ids, "
                            f"total {bundle.get('total')}, expected {len(expected)}"
                        )
            for kind in ("DocumentReference", "Patient"):
                i = rng.randrange(plan.count(kind))
                body = plan.make(kind, i)
                resp = client.post(f"/{kind}", content=orjson.dumps(body))
                if resp.status_code != 201:
                    problems.append(f"POST {kind}: HTTP {resp.status_code}")
                    continue
                api_id = resp.json()["id"]
                bulk_id = resource_id(plan.seed, kind, i)
                with db.read() as conn:
                    pks = dict(
                        conn.execute(
                            sa.select(r.res_id, r.pk).where(
                                r.res_type == kind, r.res_id.in_([api_id, bulk_id])
                            )
                        ).all()
                    )
                    if _index_rows(conn, pks[api_id]) != _index_rows(conn, pks[bulk_id]):
                        problems.append(f"{kind}: API-created index rows differ from bulk rows")
                    if _version_row(conn, kind, api_id) != _version_row(conn, kind, bulk_id):
                        problems.append(f"{kind}: API-created version row differs")
                client.delete(f"/{kind}/{api_id}")
    finally:
        db.dispose()
    return problems


# -- command line ----------------------------------------------------------------------------


def plan_for(patients: int, documents: int, seed: int = 42) -> LoadPlan:
    """The standard plan: 1 Organization per 1,000 patients (at least 5), 1 Practitioner per
    200 patients (at least 10)."""
    return LoadPlan(
        seed=seed,
        organizations=max(5, patients // 1000),
        practitioners=max(10, patients // 200),
        patients=patients,
        documents=documents,
        t0=int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1_000_000),
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--database-url", required=True)
    ap.add_argument("--patients", type=int, default=100_000)
    ap.add_argument("--documents", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=5000)
    ap.add_argument("--migrate", action="store_true", help="run the migrations first")
    args = ap.parse_args(argv)
    if args.migrate:
        from fhir_consent.store.migrate import upgrade

        upgrade(args.database_url)
    load(
        args.database_url,
        plan_for(args.patients, args.documents, args.seed),
        workers=args.workers,
        chunk=args.chunk,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
