"""``python -m conformance http://host:port/fhir [--junit FILE] [credentials…]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .report import print_table, write_junit
from .smart import SmartOptions, run_smart

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__)
    parser.add_argument("base", help="the FHIR base URL, e.g. http://127.0.0.1:8000/fhir")
    parser.add_argument("--junit", help="write JUnit XML to this file")
    parser.add_argument("--section", choices=["smart"], action="append", help="default: all")
    parser.add_argument("--client-id", help="a registered app (enables the invalid-aud check)")
    parser.add_argument("--redirect-uri", help="that app's registered redirect URI")
    parser.add_argument("--backend-client-id", help="a backend-services client")
    parser.add_argument("--backend-key", help="its private JWK (JSON file), RS384 or ES384")
    parser.add_argument("--backend-scope", default="system/Patient.rs")
    parser.add_argument("--denied-type", help="a resource type outside --backend-scope")
    args = parser.parse_args(argv)
    options = SmartOptions(
        client_id=args.client_id,
        redirect_uri=args.redirect_uri,
        backend_client_id=args.backend_client_id,
        backend_key=args.backend_key,
        backend_scope=args.backend_scope,
        denied_type=args.denied_type,
    )
    results = run_smart(args.base, options)
    print_table(results, sys.stdout)
    if args.junit:
        write_junit(results, args.junit)
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
