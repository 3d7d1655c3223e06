"""``python -m conformance BASE_URL [--section S] [--junit FILE] [credentials…]``.

Prints a table of every check (PASS, FAIL or SKIP with the reason) and exits 1 when a check
failed. Credentials are optional: without them the checks that need them are skipped. They can
also come from a JSON file (``--credentials``), see docs/conformance.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from .consent import ConsentOptions, run_consent
from .report import Recorder, Result, print_table, write_junit
from .rest import RestOptions, run_rest
from .smart import SmartOptions, TokenError, backend_token, run_smart

__all__ = ["main"]

SECTIONS = ("rest", "smart", "consent")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__)
    parser.add_argument("base", help="the FHIR base URL, e.g. http://127.0.0.1:8000/fhir")
    parser.add_argument("--junit", help="write JUnit XML to this file")
    parser.add_argument(
        "--section",
        choices=[*SECTIONS, "all"],
        action="append",
        help="run only this section (repeatable; default: all)",
    )
    parser.add_argument("--credentials", help="a JSON file with any of the credentials below")
    smart = parser.add_argument_group("SMART (and the token of the REST section)")
    smart.add_argument("--client-id", help="a registered app (enables the invalid-aud check)")
    smart.add_argument("--redirect-uri", help="that app's registered redirect URI")
    smart.add_argument("--backend-client-id", help="a backend-services client")
    smart.add_argument(
        "--backend-key", "--private-key", help="its private JWK (JSON file), RS384 or ES384"
    )
    smart.add_argument("--backend-scope", default="system/Patient.rs")
    smart.add_argument("--denied-type", help="a resource type outside --backend-scope")
    rest = parser.add_argument_group("REST")
    rest.add_argument("--types", help="only these resource types, comma-separated")
    rest.add_argument(
        "--rest-scope",
        default="system/*.cruds",
        help="scope of the backend token the REST checks use (with --backend-client-id)",
    )
    rest.add_argument("--token", help="a bearer token for the REST checks instead")
    consent = parser.add_argument_group("consent")
    consent.add_argument("--patient-token", help="the test patient's access token")
    consent.add_argument("--patient", help="the test patient, e.g. Patient/123")
    consent.add_argument("--clinic-client-id", help="a backend client bound to an Organization")
    consent.add_argument("--clinic-key", help="its private JWK (JSON file)")
    consent.add_argument("--clinic-organization", help="that Organization, e.g. Organization/7")
    consent.add_argument("--clinic-scope", default=None, help="default system/*.cruds")
    return parser


def _credentials(path: str | None) -> dict[str, Any]:
    """``{"backend": {...}, "patient": {...}, "clinic": {...}}``; key paths relative to it."""
    if not path:
        return {}
    file = Path(path)
    data = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: not a JSON object")
    for part in data.values():
        if isinstance(part, dict) and isinstance(part.get("key"), str):
            key = Path(part["key"])
            part["key"] = str(key if key.is_absolute() else file.parent / key)
    return data


def _pick(flag: str | None, part: dict[str, Any], key: str) -> str | None:
    value = flag if flag is not None else part.get(key)
    return str(value) if value is not None else None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    wanted = set(args.section or ["all"])
    sections = [s for s in SECTIONS if "all" in wanted or s in wanted]
    creds = _credentials(args.credentials)
    backend = creds.get("backend") or {}
    patient = creds.get("patient") or {}
    clinic = creds.get("clinic") or {}
    backend_id = _pick(args.backend_client_id, backend, "client_id")
    backend_key = _pick(args.backend_key, backend, "key")
    results: list[Result] = []

    if "rest" in sections:
        token = args.token
        if token is None and backend_id and backend_key:
            try:
                with httpx.Client(timeout=30.0) as http:
                    token = backend_token(
                        args.base, backend_id, backend_key, args.rest_scope, http=http
                    )
            except TokenError as error:
                recorder = Recorder()
                recorder.fail(
                    "rest", "token", "backend-services token for the REST checks", str(error)
                )
                results += recorder.results
        if not (token is None and backend_id and backend_key):
            types = tuple(t.strip() for t in (args.types or "").split(",") if t.strip())
            results += run_rest(args.base, RestOptions(types=types, token=token))
    if "smart" in sections:
        options = SmartOptions(
            client_id=args.client_id,
            redirect_uri=args.redirect_uri,
            backend_client_id=backend_id,
            backend_key=backend_key,
            backend_scope=_pick(None, backend, "scope") or args.backend_scope,
            denied_type=args.denied_type,
        )
        results += run_smart(args.base, options)
    if "consent" in sections:
        consent = ConsentOptions(
            patient_token=_pick(args.patient_token, patient, "token"),
            patient=_pick(args.patient, patient, "reference"),
            clinic_client_id=_pick(args.clinic_client_id, clinic, "client_id"),
            clinic_key=_pick(args.clinic_key, clinic, "key"),
            clinic_organization=_pick(args.clinic_organization, clinic, "organization"),
            clinic_scope=_pick(args.clinic_scope, clinic, "scope") or "system/*.cruds",
        )
        results += run_consent(args.base, consent)

    print_table(results, sys.stdout)
    if args.junit:
        write_junit(results, args.junit)
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
