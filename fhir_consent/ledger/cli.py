"""Command-line helpers of the ledger, hooked into ``fhir-consent`` by :func:`add_parser`:

``fhir-consent keys init [--dir D]``
    Create the ledger key ring (Ed25519 signing key, RMS X25519 key pair, pseudonym secret;
    files 0600 in a 0700 directory; ledger.md §1). Refuses to overwrite.
``fhir-consent keys rotate [--dir D] [--keys signing,rms,pseudonym|all] [--rms-public-key B64]``
    New key(s) by key id — the signing key by default; ``rms`` the Record Management System
    seal key (generated here, or the RMS's own public key with ``--rms-public-key``);
    ``pseudonym`` the subject secret. The old keys stay in the ring (retired), so old entries
    still verify and open; new entries name the new key ids. Servers pick new keys up when
    they restart. (``fhir-consent keys rotate --ledger --ledger-keys …`` is the same.)
``fhir-consent keys show [--dir D]``
    Public keys and key ids only (for verifiers and the RMS).
``fhir-consent ledger verify [--database-url U] [--no-external] [--scan-chain]``
    Re-verify everything (ledger.md §2 "Auditable", :mod:`.verify`); exit 1 naming each
    problem.
``fhir-consent ledger relay [--once] [--database-url U]``
    Run the relay as its own process (:mod:`.relay`); ``--once`` drains the outbox and exits.
``fhir-consent ledger status``
    Outbox counts by state.

Settings: ``FHIR_CONSENT_DATABASE_URL`` and ``FHIR_CONSENT_LEDGER_*``
(:class:`~fhir_consent.ledger.config.LedgerSettings`). Nothing secret is ever printed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, TextIO

import orjson

__all__ = [
    "LEDGER_KEY_KINDS",
    "add_parser",
    "add_rotate_arguments",
    "init_keys",
    "main",
    "parse_key_kinds",
    "rotate_keys",
]


def _out(text: str, stream: TextIO | None = None) -> None:
    (stream or sys.stdout).write(text + "\n")


def _settings(args: argparse.Namespace) -> tuple[Any, Any]:
    from fhir_consent.config import Settings
    from fhir_consent.ledger.config import LedgerSettings

    overrides = {"database_url": args.database_url} if getattr(args, "database_url", None) else {}
    return Settings(**overrides), LedgerSettings()


def _keys_dir(args: argparse.Namespace) -> str:
    from fhir_consent.ledger.config import LedgerSettings

    return str(args.dir or LedgerSettings().keys_dir)


def init_keys(directory: str | None = None) -> dict[str, Any]:
    """Create the ledger key ring; return its public summary (for a shared ``keys init``).

    Raises :class:`fhir_consent.crypto.KeyRingError` (e.g. when keys exist already).
    """
    from fhir_consent.crypto import KeyRing
    from fhir_consent.ledger.config import LedgerSettings

    target = directory or LedgerSettings().keys_dir
    ring = KeyRing.generate(target)
    return {"kind": "ledger", "directory": str(target), **ring.public_bundle()}


#: The ledger keys that rotate, in the order a combined rotation applies them.
LEDGER_KEY_KINDS = ("signing", "rms", "pseudonym")


def parse_key_kinds(text: str) -> tuple[str, ...]:
    """``"signing,rms"`` or ``"all"`` → the kinds, in :data:`LEDGER_KEY_KINDS` order."""
    wanted = {part.strip() for part in text.split(",") if part.strip()}
    if "all" in wanted:
        return LEDGER_KEY_KINDS
    unknown = wanted - set(LEDGER_KEY_KINDS)
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(
            f"ledger keys are {', '.join(LEDGER_KEY_KINDS)} or all (got {text!r})"
        )
    return tuple(k for k in LEDGER_KEY_KINDS if k in wanted)


def rotate_keys(
    directory: str | None = None,
    kinds: tuple[str, ...] = ("signing",),
    rms_public_key: str | None = None,
) -> dict[str, Any]:
    """Rotate the named ledger keys (default: the signing key); return the public summary.

    ``rms_public_key`` (base64 X25519) installs the RMS's own new public key instead of
    generating a pair here. Raises ``KeyRingError``.
    """
    from fhir_consent.crypto import CryptoError, KeyRing, KeyRingError, SealPublicKey
    from fhir_consent.ledger.config import LedgerSettings

    target = directory or LedgerSettings().keys_dir
    public = None
    if rms_public_key is not None:
        if "rms" not in kinds:
            raise KeyRingError("--rms-public-key needs the rms key to be rotated")
        try:
            public = SealPublicKey.from_base64(rms_public_key.strip())
        except CryptoError:
            raise KeyRingError("--rms-public-key is not a base64 X25519 public key") from None
    ring = KeyRing.load(target)  # fail before changing anything
    for kind in kinds:
        if kind == "signing":
            ring = KeyRing.rotate_signing_key(target)
        elif kind == "rms":
            ring = KeyRing.rotate_rms_key(target, public)
        else:
            ring = KeyRing.rotate_pseudonym_key(target)
    return {
        "kind": "ledger",
        "directory": str(target),
        "rotated": list(kinds),
        **ring.public_bundle(),
    }


def keys_init(args: argparse.Namespace) -> int:
    """``keys init``: a fresh key ring in the key directory."""
    from fhir_consent.crypto import KeyRing, KeyRingError

    directory = _keys_dir(args)
    try:
        ring = KeyRing.generate(directory)
    except KeyRingError as exc:
        _out(f"error: {exc}", sys.stderr)
        return 1
    _out(f"created the ledger key ring in {directory}")
    _out(orjson.dumps(ring.public_bundle(), option=orjson.OPT_INDENT_2).decode())
    _out(
        "Give rms-seal.key to the Record Management System and delete it from this server; "
        "keep signing.key and pseudonym.key secret."
    )
    return 0


def keys_rotate(args: argparse.Namespace) -> int:
    from fhir_consent.crypto import KeyRingError

    try:
        summary = rotate_keys(_keys_dir(args), args.keys, args.rms_public_key)
    except KeyRingError as exc:
        _out(f"error: {exc}", sys.stderr)
        return 1
    retired = [k for k in summary["signing_keys"] if k != summary["signing_key_id"]]
    _out(f"new signing key {summary['signing_key_id']}; retired: {', '.join(sorted(retired))}")
    _out(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return 0


def add_rotate_arguments(parser: Any, *, flag: str = "--keys") -> None:
    """``--keys``/``--ledger-keys`` and ``--rms-public-key`` for a rotate command."""
    parser.add_argument(
        flag,
        dest="ledger_keys" if flag != "--keys" else "keys",
        type=parse_key_kinds,
        default=("signing",),
        metavar="signing,rms,pseudonym|all",
        help="which ledger keys to rotate (default: signing)",
    )
    parser.add_argument(
        "--rms-public-key",
        metavar="B64",
        help="with rms: the Record Management System's new X25519 public key (else a key "
        "pair is generated in the key directory)",
    )


def keys_show(args: argparse.Namespace) -> int:
    from fhir_consent.crypto import KeyRingError
    from fhir_consent.ledger.config import LedgerSettings
    from fhir_consent.ledger.service import load_keyring

    settings = LedgerSettings(auto_init_keys=False)
    if args.dir:
        settings = settings.model_copy(update={"keys_dir": args.dir})
    try:
        ring = load_keyring(settings)
    except KeyRingError as exc:
        _out(f"error: {exc}", sys.stderr)
        return 1
    _out(orjson.dumps(ring.public_bundle(), option=orjson.OPT_INDENT_2).decode())
    return 0


class _ProgressBar:
    """A one-line progress indicator on a terminal (ledger verify on large logs)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        width = 30
        filled = width if total <= 0 else min(width, done * width // total)
        line = f"\r{phase:<9} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
        if line != self.last:
            self.stream.write(line)
            self.stream.flush()
            self.last = line

    def close(self) -> None:
        if self.last:
            self.stream.write("\n")


def ledger_verify(args: argparse.Namespace) -> int:
    """``ledger verify``: exit 0 when everything checks out, 1 naming each problem."""
    from fhir_consent.crypto import KeyRingError
    from fhir_consent.ledger.engines.base import EngineError, create_engine
    from fhir_consent.ledger.service import load_keyring
    from fhir_consent.ledger.verify import verify_ledger
    from fhir_consent.store.db import Database

    settings, lsettings = _settings(args)
    try:
        ring = load_keyring(lsettings.model_copy(update={"auto_init_keys": False}))
    except KeyRingError as exc:
        _out(f"error: {exc}", sys.stderr)
        return 2
    engine = None
    if not args.no_external:
        try:
            engine = create_engine(lsettings, lsettings.resolved_origin(settings.public_base_url))
        except EngineError as exc:
            _out(f"error: {exc}", sys.stderr)
            return 2
    progress = _ProgressBar(sys.stderr) if (args.progress or sys.stderr.isatty()) else None
    db = Database(settings.database_url, pool_size=1)
    try:
        report = verify_ledger(
            db,
            ring.verify_keys(),
            lsettings.resolved_origin(settings.public_base_url),
            engine=engine,
            scan_chain=args.scan_chain,
            progress=progress,
            keyring=ring,
        )
    finally:
        if progress is not None:
            progress.close()
        if engine is not None:
            engine.close()
        db.dispose()
    for problem in report.problems:
        _out(f"PROBLEM: {problem}")
    if report.truncated:
        _out("PROBLEM: (more problems not shown)")
    _out(("FAILED: " if report.problems else "OK: ") + report.summary())
    return 1 if report.problems else 0


def ledger_relay(args: argparse.Namespace) -> int:
    """``ledger relay``: publish the outbox until interrupted (or drained, with --once)."""
    import logging

    from fhir_consent.ledger.engines.base import create_engine
    from fhir_consent.ledger.relay import Relay
    from fhir_consent.store.db import Database

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings, lsettings = _settings(args)
    engine = create_engine(lsettings, lsettings.resolved_origin(settings.public_base_url))
    if engine is None:
        _out("error: no external engine configured (FHIR_CONSENT_LEDGER_ENGINE)", sys.stderr)
        return 2
    db = Database(settings.database_url, pool_size=2)
    relay = Relay(db, engine, lsettings)
    try:
        if args.once:
            drained = relay.drain(args.timeout)
            relay.release()
            _out("outbox drained" if drained else "outbox NOT drained before the timeout")
            return 0 if drained else 1
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        relay.run(stop)
        return 0
    finally:
        engine.close()
        db.dispose()


def ledger_status(args: argparse.Namespace) -> int:
    from fhir_consent.ledger import outbox
    from fhir_consent.store.db import Database

    settings, _ = _settings(args)
    db = Database(settings.database_url, pool_size=1)
    try:
        with db.read() as conn:
            counts = outbox.status_counts(conn)
    finally:
        db.dispose()
    _out(orjson.dumps(counts, option=orjson.OPT_SORT_KEYS).decode())
    return 0


def add_parser(subparsers: Any, *, keys: bool = True) -> None:
    """Add ``keys`` (unless ``keys=False``) and ``ledger`` commands to ``fhir-consent``'s
    sub-parsers; each sets ``func`` returning the exit code, as the existing commands do."""
    if keys:
        k = subparsers.add_parser("keys", help="ledger key ring: init, rotate, show")
        ks = k.add_subparsers(dest="keys_command", required=True)
        for name, func, text in (
            ("init", keys_init, "create the ledger key ring (files 0600)"),
            ("rotate", keys_rotate, "rotate ledger keys by id, keeping the old ones"),
            ("show", keys_show, "print public keys and key ids"),
        ):
            p = ks.add_parser(name, help=text)
            p.add_argument("--dir", help="key directory (default FHIR_CONSENT_LEDGER_KEYS_DIR)")
            if name == "rotate":
                add_rotate_arguments(p)
            p.set_defaults(func=func)

    led = subparsers.add_parser("ledger", help="permissions ledger: verify, relay, status")
    ls = led.add_subparsers(dest="ledger_command", required=True)
    v = ls.add_parser("verify", help="re-verify every entry, node, checkpoint and anchor")
    v.add_argument("--database-url", help="overrides FHIR_CONSENT_DATABASE_URL")
    v.add_argument("--no-external", action="store_true", help="skip the external ledger")
    v.add_argument(
        "--scan-chain", action="store_true", help="read every transaction of ours on the chain"
    )
    v.add_argument("--progress", action="store_true", help="progress bar even without a tty")
    v.set_defaults(func=ledger_verify)
    r = ls.add_parser("relay", help="publish the outbox to the external engine")
    r.add_argument("--database-url", help="overrides FHIR_CONSENT_DATABASE_URL")
    r.add_argument("--once", action="store_true", help="drain the outbox, then exit")
    r.add_argument("--timeout", type=float, default=300.0, help="--once: give up after seconds")
    r.set_defaults(func=ledger_relay)
    s = ls.add_parser("status", help="outbox counts by state")
    s.add_argument("--database-url", help="overrides FHIR_CONSENT_DATABASE_URL")
    s.set_defaults(func=ledger_status)


def main(argv: list[str] | None = None) -> int:
    """``python -m fhir_consent.ledger.cli …`` — the same commands, standalone."""
    parser = argparse.ArgumentParser(prog="fhir-consent-ledger", description=__doc__)
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
