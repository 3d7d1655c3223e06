"""The ``fhir-consent`` command.

* ``serve [--workers N]`` (graceful on SIGTERM) and ``migrate``;
* ``backup create DIR [--no-keys]``, ``backup restore DIR``, ``backup verify DIR``: database,
  document blobs and keys (:mod:`fhir_consent.ops.backup`);
* ``keys init [--smart] [--ledger] [--documents] [--dir DIR] [--force]`` (every kind when no
  kind flag is given), ``keys rotate --smart [--alg RS256] | --ledger [--ledger-keys
  signing,rms,pseudonym|all] [--rms-public-key B64]``, ``keys show``: the
  SMART token signing keys, the ledger key ring and the document master key file;
* ``users add USERNAME --fhir-user Patient/123 [--password-stdin]``, ``users deactivate``,
  ``users activate``: login accounts (argon2 password hashes);
* ``clients add --name … --type public|confidential-symmetric|confidential-asymmetric …``,
  ``clients disable``: SMART apps and backend systems; prints the client id (and a generated
  secret, once) as JSON;
* ``launch create --patient ID [--client CLIENT_ID]``: an EHR launch context; prints the
  ``launch`` value as JSON;
* ``ledger verify|relay|status`` (:mod:`fhir_consent.ledger.cli`), ``documents shred|
  rotate-master-key|rewrap|gc`` (:mod:`fhir_consent.documents.admin`) and ``demo``
  (:mod:`fhir_consent.demo`).

Admin commands bring the database schema up to date first (idempotent).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))  # noqa: T201


def _fail(message: str) -> int:
    print(f"fhir-consent: {message}", file=sys.stderr)  # noqa: T201
    return 2


def _settings(args: argparse.Namespace) -> Any:
    from fhir_consent.config import Settings

    url = getattr(args, "database_url", None)
    return Settings(database_url=url) if url else Settings()


def _database(args: argparse.Namespace) -> Any:
    from fhir_consent.store.db import Database
    from fhir_consent.store.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.database_url)
    return Database(settings.database_url, pool_size=1)


#: The kinds of keys the server holds, each in its own place (docs/configuration.md).
_KEY_KINDS = ("smart", "ledger", "documents")


def _key_kinds(args: argparse.Namespace) -> list[str] | int:
    kinds = [kind for kind in _KEY_KINDS if getattr(args, kind, False)] or list(_KEY_KINDS)
    if getattr(args, "dir", None) and len(kinds) != 1:
        return _fail("--dir needs exactly one of --smart, --ledger, --documents")
    return kinds


def _init_smart(args: argparse.Namespace) -> dict[str, Any]:
    from smart_on_fhir.cli import init_keys

    directory = args.dir or _settings(args).smart_keys_dir
    keyset = init_keys(directory, force=args.force)
    return {"kind": "smart", "directory": str(directory), "kids": list(keyset.kids)}


def _init_ledger(args: argparse.Namespace) -> dict[str, Any]:
    from fhir_consent.crypto import KeyRingError
    from fhir_consent.ledger.cli import init_keys

    if args.force:  # a new ring would orphan every entry signed so far
        raise KeyRingError("the ledger key ring is never replaced: use keys rotate --ledger")
    return init_keys(args.dir)


def _init_documents(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from fhir_consent.documents import DocumentSettings
    from fhir_consent.documents.errors import MasterKeyError
    from fhir_consent.documents.keys import MasterKeyRing

    settings = DocumentSettings()
    if settings.master_keys is not None and not args.dir:
        raise MasterKeyError("FHIR_CONSENT_DOCUMENTS_MASTER_KEYS is set: no key file is used")
    path = Path(args.dir) / settings.master_key_file.name if args.dir else settings.master_key_file
    if path.exists():  # replacing it would make every stored document unreadable
        raise MasterKeyError(
            f"{path} exists: use 'fhir-consent documents rotate-master-key' to add a key"
        )
    ring = MasterKeyRing.load(path, create=True)
    return {"kind": "documents", "file": str(path), "active_kid": ring.active_kid}


def _keys_init(args: argparse.Namespace) -> int:
    from fhir_consent.crypto import KeyRingError
    from fhir_consent.documents.errors import MasterKeyError
    from smart_on_fhir.errors import KeyStoreError

    kinds = _key_kinds(args)
    if isinstance(kinds, int):
        return kinds
    makers = {"smart": _init_smart, "ledger": _init_ledger, "documents": _init_documents}
    status = 0
    for kind in kinds:
        try:
            _print_json(makers[kind](args))
        except (KeyStoreError, KeyRingError, MasterKeyError) as error:
            status = _fail(f"{kind}: {error}")
    return status


def _keys_rotate(args: argparse.Namespace) -> int:
    from fhir_consent.crypto import KeyRingError
    from fhir_consent.ledger.cli import rotate_keys as rotate_ledger
    from smart_on_fhir.cli import rotate_keys
    from smart_on_fhir.errors import KeyStoreError

    if args.smart == args.ledger:
        return _fail(
            "say which keys to rotate: --smart or --ledger "
            "(document master keys: fhir-consent documents rotate-master-key)"
        )
    try:
        if args.ledger:
            _print_json(rotate_ledger(args.dir, args.ledger_keys, args.rms_public_key))
            return 0
        directory = args.dir or _settings(args).smart_keys_dir
        keyset = rotate_keys(directory, args.alg)
    except (KeyStoreError, KeyRingError) as error:
        return _fail(str(error))
    _print_json({"kind": "smart", "directory": str(directory), "kids": list(keyset.kids)})
    return 0


def _keys_show(args: argparse.Namespace) -> int:
    """Public keys and key ids only: never a secret."""
    from fhir_consent.crypto import KeyRingError
    from fhir_consent.ledger.config import LedgerSettings
    from fhir_consent.ledger.service import load_keyring
    from smart_on_fhir.errors import KeyStoreError
    from smart_on_fhir.keys import KeySet

    shown: dict[str, Any] = {}
    try:
        if not args.ledger:
            keyset = KeySet.load(args.dir or _settings(args).smart_keys_dir)
            shown["smart"] = keyset.jwks()
        if not args.smart:
            ledger = LedgerSettings(auto_init_keys=False)
            if args.dir:
                ledger = ledger.model_copy(update={"keys_dir": args.dir})
            shown["ledger"] = load_keyring(ledger).public_bundle()
    except (KeyStoreError, KeyRingError) as error:
        return _fail(str(error))
    _print_json(shown)
    return 0


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass("Password: ")
    return first if getpass.getpass("Again: ") == first else None


def _users_add(args: argparse.Namespace) -> int:
    from fhir_consent.auth import fhir_user_exists
    from smart_on_fhir.users import UserError, create_user

    password = _read_password(args)
    if password is None:
        return _fail("give the password on stdin with --password-stdin, or type it twice")
    db = _database(args)
    try:
        with db.write() as conn:
            if (
                args.fhir_user
                and not args.allow_missing
                and not fhir_user_exists(conn, args.fhir_user)
            ):
                return _fail(f"{args.fhir_user} does not exist (create it, or --allow-missing)")
            user = create_user(
                conn,
                args.username,
                password,
                fhir_user=args.fhir_user,
                display_name=args.display_name,
                now=int(time.time()),
            )
    except UserError as error:
        return _fail(str(error))
    finally:
        db.dispose()
    _print_json({"id": user.id, "username": user.username, "fhirUser": user.fhir_user})
    return 0


def _users_set_active(args: argparse.Namespace) -> int:
    from smart_on_fhir.users import set_user_active

    db = _database(args)
    try:
        with db.write() as conn:
            found = set_user_active(conn, args.username, args.active)
    finally:
        db.dispose()
    if not found:
        return _fail(f"no user {args.username}")
    _print_json({"username": args.username, "active": args.active})
    return 0


def _clients_add(args: argparse.Namespace) -> int:
    from smart_on_fhir.cli import client_summary, read_jwks_argument
    from smart_on_fhir.clients import ClientError, create_client

    try:
        jwks = read_jwks_argument(args.jwks) if args.jwks else None
    except ValueError as error:
        return _fail(str(error))
    db = _database(args)
    try:
        with db.write() as conn:
            created = create_client(
                conn,
                client_name=args.name,
                client_type=args.type,
                redirect_uris=args.redirect_uri or [],
                scope=args.scope,
                now=int(time.time()),
                grant_types=args.grant_type or None,
                jwks=jwks,
                jwks_uri=args.jwks_uri,
                organization=args.organization,
                launch_uri=args.launch_uri,
                client_id=args.client_id,
            )
    except (ClientError, ValueError) as error:
        return _fail(str(error))
    finally:
        db.dispose()
    _print_json(client_summary(created))
    return 0


def _clients_disable(args: argparse.Namespace) -> int:
    from smart_on_fhir.clients import set_client_active

    db = _database(args)
    try:
        with db.write() as conn:
            found = set_client_active(conn, args.client_id, False)
    finally:
        db.dispose()
    if not found:
        return _fail(f"no client {args.client_id}")
    _print_json({"client_id": args.client_id, "active": False})
    return 0


def _launch_create(args: argparse.Namespace) -> int:
    from smart_on_fhir.cli import launch_summary
    from smart_on_fhir.clients import get_client
    from smart_on_fhir.launches import LaunchError, create_launch
    from smart_on_fhir.users import get_user_by_name

    settings = _settings(args)
    iss = args.iss or settings.public_base_url or f"http://{settings.host}:{settings.port}"
    iss = iss.rstrip("/") if args.iss or settings.public_base_url else iss + settings.fhir_path
    db = _database(args)
    try:
        with db.write() as conn:
            client = get_client(conn, args.client) if args.client else None
            if args.client and client is None:
                return _fail(f"no active client {args.client}")
            user = get_user_by_name(conn, args.user) if args.user else None
            if args.user and user is None:
                return _fail(f"no user {args.user}")
            context = create_launch(
                conn,
                now=int(time.time()),
                patient=args.patient,
                encounter=args.encounter,
                client_id=args.client,
                user_id=user.id if user else None,
                need_patient_banner=not args.no_banner,
                lifetime=args.lifetime,
            )
    except LaunchError as error:
        return _fail(str(error))
    finally:
        db.dispose()
    _print_json(launch_summary(context, iss=iss, launch_uri=client.launch_uri if client else None))
    return 0


def _add_admin_commands(sub: Any) -> None:
    keys = sub.add_parser("keys", help="server keys: SMART token signing, ledger, documents")
    kinds = keys.add_subparsers(dest="keys", required=True)
    init = kinds.add_parser("init", help="create keys (every kind unless kind flags are given)")
    init.add_argument("--smart", action="store_true", help="the SMART token signing keys")
    init.add_argument("--ledger", action="store_true", help="the ledger key ring")
    init.add_argument("--documents", action="store_true", help="the document master key file")
    init.add_argument("--dir", help="key directory (with exactly one kind flag)")
    init.add_argument(
        "--force", action="store_true", help="replace existing SMART keys (never the others)"
    )
    init.set_defaults(func=_keys_init)
    rotate = kinds.add_parser("rotate", help="new current key; old ones still verify")
    rotate.add_argument("--smart", action="store_true")
    rotate.add_argument("--ledger", action="store_true")
    rotate.add_argument("--alg", default="RS256", choices=["RS256", "ES384"], help="--smart")
    rotate.add_argument("--dir")
    from fhir_consent.ledger.cli import add_rotate_arguments

    add_rotate_arguments(rotate, flag="--ledger-keys")
    rotate.set_defaults(func=_keys_rotate)
    show = kinds.add_parser("show", help="public keys and key ids (SMART and ledger)")
    show.add_argument("--smart", action="store_true")
    show.add_argument("--ledger", action="store_true")
    show.add_argument("--dir")
    show.set_defaults(func=_keys_show)

    users = sub.add_parser("users", help="login accounts").add_subparsers(
        dest="users", required=True
    )
    add = users.add_parser("add", help="create an account linked to a FHIR resource")
    add.add_argument("username")
    add.add_argument("--fhir-user", help="Patient/<id>, Practitioner/<id> or RelatedPerson/<id>")
    add.add_argument("--display-name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument("--allow-missing", action="store_true", help="fhirUser need not exist yet")
    add.add_argument("--database-url")
    add.set_defaults(func=_users_add)
    for name, active in (("deactivate", False), ("activate", True)):
        cmd = users.add_parser(name, help=f"{name} an account (tokens stop/start working)")
        cmd.add_argument("username")
        cmd.add_argument("--database-url")
        cmd.set_defaults(func=_users_set_active, active=active)

    clients = sub.add_parser("clients", help="SMART apps and backend systems")
    csub = clients.add_subparsers(dest="clients", required=True)
    cadd = csub.add_parser("add", help="register a client; prints its id (and secret) as JSON")
    cadd.add_argument("--name", required=True)
    cadd.add_argument(
        "--type",
        required=True,
        choices=["public", "confidential-symmetric", "confidential-asymmetric"],
    )
    cadd.add_argument("--redirect-uri", action="append", help="repeatable")
    cadd.add_argument("--scope", required=True, help='e.g. "launch/patient openid patient/*.rs"')
    cadd.add_argument(
        "--grant-type",
        action="append",
        choices=["authorization_code", "refresh_token", "client_credentials"],
    )
    cadd.add_argument("--jwks", help="public JWK Set: inline JSON or a file path")
    cadd.add_argument("--jwks-uri", help="URL of the client's public JWK Set")
    cadd.add_argument("--organization", help="Organization/<id> a clinic system acts for")
    cadd.add_argument("--launch-uri", help="the app's EHR launch URL")
    cadd.add_argument("--client-id", help="choose the client id (default: random)")
    cadd.add_argument("--database-url")
    cadd.set_defaults(func=_clients_add)
    cdis = csub.add_parser("disable", help="disable a client; its tokens stop working")
    cdis.add_argument("client_id")
    cdis.add_argument("--database-url")
    cdis.set_defaults(func=_clients_disable)

    launch = sub.add_parser("launch", help="EHR launch contexts")
    lsub = launch.add_subparsers(dest="launch", required=True)
    create = lsub.add_parser("create", help="record what the EHR has open; prints the launch id")
    create.add_argument("--patient")
    create.add_argument("--encounter")
    create.add_argument("--client", help="only this client may use the launch")
    create.add_argument("--user", help="only this username may use the launch")
    create.add_argument("--no-banner", action="store_true", help="need_patient_banner=false")
    create.add_argument("--lifetime", type=int, default=3600, help="seconds (default 3600)")
    create.add_argument("--iss", help="the FHIR base to send as iss (default: from settings)")
    create.add_argument("--database-url")
    create.set_defaults(func=_launch_create)


def _add_feature_commands(sub: Any) -> None:
    """``ledger``, ``documents`` and ``demo``: each layer's own commands."""
    from fhir_consent import demo
    from fhir_consent.documents import admin
    from fhir_consent.ledger import cli as ledger_cli

    ledger_cli.add_parser(sub, keys=False)
    admin.add_parser(sub)
    demo.add_parser(sub)


def _metrics_dir(settings: Any) -> tuple[str, bool]:
    """The multiprocess metrics directory for several workers, emptied; whether we made it."""
    import tempfile
    from pathlib import Path

    chosen = settings.metrics_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    made = not chosen
    path = Path(chosen or tempfile.mkdtemp(prefix="fhir-consent-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # values of a previous run's workers
        stale.unlink()
    return str(path), made


def _serve(args: argparse.Namespace) -> int:
    """Run the server: migrate once, create missing keys once, then start the workers.

    Logging is configured (``log_format``, ``log_level``) in this process and in every worker;
    with several workers the Prometheus multiprocess directory is prepared before they start.
    SIGTERM (or Ctrl-C) stops gracefully: no new connections, in-flight requests finish (up
    to ``shutdown_timeout`` seconds), then each worker's shutdown writes its queued audit
    events and stops the ledger relay.
    """
    import logging
    import shutil

    import uvicorn

    from fhir_consent.config import Settings
    from fhir_consent.ops.logs import configure_logging, logging_config
    from fhir_consent.store.migrate import upgrade

    overrides = {k: v for k, v in (("database_url", args.database_url),) if v}
    settings = Settings(**overrides)
    configure_logging(settings.log_format, settings.log_level)
    if args.database_url:
        os.environ["FHIR_CONSENT_DATABASE_URL"] = args.database_url
    if _gateway_environment(args, settings) != 0:
        return 2
    upgrade(settings.database_url)  # once, before workers start
    os.environ["FHIR_CONSENT_AUTO_MIGRATE"] = "false"
    if not settings.open_access and settings.smart_jwks is None:
        from smart_on_fhir.keys import load_or_create

        _keys, created = load_or_create(settings.smart_keys_dir)  # before workers start
        if created:  # a log line like every other (JSON by default)
            logging.getLogger("fhir_consent").warning(
                "created SMART signing keys in %s", settings.smart_keys_dir
            )
    workers = args.workers or settings.workers
    metrics_dir: str | None = None
    made = False
    if workers > 1:
        metrics_dir, made = _metrics_dir(settings)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by each worker at import
    try:
        uvicorn.run(
            "fhir_consent.main:app",
            host=args.host or settings.host,
            port=args.port or settings.port,
            workers=workers,
            log_level=settings.log_level,
            log_config=logging_config(settings.log_format, settings.log_level),
            # fhir_consent.forwarded decides which proxies it trusts (trusted_proxies, none by
            # default); uvicorn's own handling would silently trust 127.0.0.1
            proxy_headers=False,
            access_log=False,  # the server's own access log has no ids or query values
            timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
            timeout_worker_healthcheck=settings.worker_healthcheck_timeout,
        )
    finally:
        if made and metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _backup(args: argparse.Namespace) -> int:
    """``backup create|restore|verify DIR`` (:mod:`fhir_consent.ops.backup`)."""
    from pathlib import Path

    from fhir_consent.documents.config import DocumentSettings
    from fhir_consent.ledger.config import LedgerSettings
    from fhir_consent.ops.backup import (
        BackupError,
        create_backup,
        restore_backup,
        verify_backup,
    )

    directory = Path(args.dir)
    try:
        if args.backup == "verify":
            problems = verify_backup(directory)
            for problem in problems:
                print("PROBLEM:", problem)  # noqa: T201
            print("FAILED" if problems else "OK: every file matches the manifest")  # noqa: T201
            return 1 if problems else 0
        layers = {
            "settings": _settings(args),
            "documents": DocumentSettings(),
            "ledger": LedgerSettings(),
        }
        if args.backup == "create":
            manifest = create_backup(directory, include_keys=not args.no_keys, **layers)
        else:
            manifest = restore_backup(directory, **layers)
    except BackupError as error:
        return _fail(str(error))
    _print_json(
        {
            "backup": str(directory),
            "source_backend": manifest.source_backend,
            "revision": manifest.revision,
            "rows": sum(manifest.tables.values()),
            "blobs": manifest.blobs,
            "keys": manifest.keys,
        }
    )
    return 0


def _add_backup_commands(sub: Any) -> None:
    backup = sub.add_parser("backup", help="back up or restore database, document blobs, keys")
    bsub = backup.add_subparsers(dest="backup", required=True)
    create = bsub.add_parser("create", help="write a backup into DIR (new or empty)")
    create.add_argument("dir")
    create.add_argument("--database-url", help="overrides FHIR_CONSENT_DATABASE_URL")
    create.add_argument(
        "--no-keys", action="store_true", help="leave the keys out (back them up apart)"
    )
    create.set_defaults(func=_backup)
    restore = bsub.add_parser("restore", help="restore DIR into an empty installation")
    restore.add_argument("dir")
    restore.add_argument("--database-url", help="overrides FHIR_CONSENT_DATABASE_URL")
    restore.set_defaults(func=_backup)
    verify = bsub.add_parser("verify", help="check every file of DIR against its manifest")
    verify.add_argument("dir")
    verify.set_defaults(func=_backup)


#: ``serve`` options of gateway mode → the GatewaySettings variables they set (for every worker)
_GATEWAY_OPTIONS = {
    "upstream": "UPSTREAM",
    "upstream_token_file": "TOKEN_FILE",
    "upstream_client_id": "CLIENT_ID",
    "upstream_key": "KEY_FILE",
    "upstream_key_id": "KEY_ID",
    "upstream_token_url": "TOKEN_URL",
    "upstream_scope": "SCOPE",
}


def _gateway_environment(args: argparse.Namespace, settings: Any) -> int:
    """Put the ``--upstream…`` options into the environment the workers read, and check them
    (and create the paging key) before any worker starts."""
    import json

    from pydantic import ValidationError

    from fhir_consent.gateway.config import GatewaySettings
    from fhir_consent.gateway.paging import load_page_key

    for option, name in _GATEWAY_OPTIONS.items():
        value = getattr(args, option, None)
        if value:
            os.environ[f"FHIR_CONSENT_GATEWAY_{name}"] = str(value)
    for option, name in (("forward_types", "TYPES"), ("forward_writes", "WRITE_TYPES")):
        value = getattr(args, option, None)
        if value is not None:
            types = [t.strip() for t in value.split(",") if t.strip()]
            os.environ[f"FHIR_CONSENT_GATEWAY_{name}"] = json.dumps(types)
    try:
        gateway = GatewaySettings()
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "gateway"
            print(f"fhir-consent serve: {where}: {error['msg']}", file=sys.stderr)  # noqa: T201
        return 2
    if gateway.upstream is None:
        return 0
    if settings.open_access:
        print(  # noqa: T201
            "fhir-consent serve: gateway mode needs the SMART server (unset open_access)",
            file=sys.stderr,
        )
        return 2
    load_page_key(gateway)
    print(f"gateway mode: forwarding {', '.join(gateway.types)} to the upstream")  # noqa: T201
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
    gw = serve.add_argument_group(
        "gateway mode", "serve in front of an existing FHIR server (docs/gateway.md)"
    )
    gw.add_argument("--upstream", metavar="URL", help="the upstream FHIR base URL")
    gw.add_argument(
        "--upstream-token-file", metavar="FILE", help="a static bearer token for the upstream"
    )
    gw.add_argument(
        "--upstream-client-id", metavar="ID", help="our backend-services client id upstream"
    )
    gw.add_argument(
        "--upstream-key", metavar="FILE", help="its private key (JWK JSON with kid, or PEM)"
    )
    gw.add_argument("--upstream-key-id", metavar="KID", help="kid for a PEM key")
    gw.add_argument(
        "--upstream-token-url",
        metavar="URL",
        help="the upstream token endpoint (default: from its smart-configuration)",
    )
    gw.add_argument("--upstream-scope", metavar="SCOPES", help="default system/*.rs")
    gw.add_argument(
        "--forward-types", metavar="T1,T2", help="forwarded resource types (docs/gateway.md)"
    )
    gw.add_argument(
        "--forward-writes", metavar="T1,T2", help="forwarded types whose writes go upstream too"
    )
    serve.set_defaults(func=_serve)

    migrate = sub.add_parser("migrate", help="bring the database schema up to date")
    migrate.add_argument("--database-url", help="overrides FHIR_CONSENT_DATABASE_URL")
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(func=_migrate)

    _add_admin_commands(sub)
    _add_feature_commands(sub)
    _add_backup_commands(sub)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
