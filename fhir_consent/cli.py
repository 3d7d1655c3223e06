"""The ``fhir-consent`` command: ``serve`` and ``migrate`` (later: keys, users, clients, ledger,
demo)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fhir_consent.config import Settings
    from fhir_consent.store.migrate import upgrade

    overrides = {k: v for k, v in (("database_url", args.database_url),) if v}
    settings = Settings(**overrides)
    if args.database_url:
        os.environ["FHIR_CONSENT_DATABASE_URL"] = args.database_url
    upgrade(settings.database_url)  # once, before workers start
    os.environ["FHIR_CONSENT_AUTO_MIGRATE"] = "false"
    uvicorn.run(
        "fhir_consent.main:app",
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers or settings.workers,
        log_level=settings.log_level,
        proxy_headers=True,
        access_log=False,
    )
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from fhir_consent.config import Settings
    from fhir_consent.store.migrate import upgrade

    url = args.database_url or Settings().database_url
    upgrade(url, args.revision)
    print("database is at revision", args.revision)  # noqa: T201
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fhir-consent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the FHIR server (migrates the database first)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.add_argument("--database-url", help="overrides FHIR_CONSENT_DATABASE_URL")
    serve.set_defaults(func=_serve)

    migrate = sub.add_parser("migrate", help="bring the database schema up to date")
    migrate.add_argument("--database-url", help="overrides FHIR_CONSENT_DATABASE_URL")
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(func=_migrate)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
