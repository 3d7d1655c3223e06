"""The standalone proof verifier: end to end, tampering, CLI, and independence from the package."""

from __future__ import annotations

import ast
import base64
import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ledger_testkit
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fhir_consent
from fhir_consent.crypto import KeyRing, canonical_json
from fhir_consent.ledger import verify_proof as vp
from fhir_consent.ledger.checkpoint import Checkpoint, note_key_hash, sign_checkpoint
from fhir_consent.ledger.entry import LedgerEntry, entry_bytes, entry_to_dict
from fhir_consent.ledger.merkle import (
    MemoryTreeStore,
    MerkleTree,
    leaf_hash,
    root_from_inclusion_proof,
)

ORIGIN = "fhir-consent.example/ledger"
REPO = Path(fhir_consent.__file__).resolve().parent.parent
MODULE_FILE = Path(vp.__file__).resolve()

MakeEntry = Callable[..., LedgerEntry]


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> KeyRing:
    return KeyRing.generate(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def make_entry() -> MakeEntry:
    return ledger_testkit.make_entry


class Log:
    """A small in-memory ledger: entries, tree, and a signed checkpoint."""

    def __init__(self, keyring: KeyRing, make_entry: MakeEntry, n: int) -> None:
        self.keyring = keyring
        self.entries = [make_entry(keyring, i, cid=f"c{i}") for i in range(n)]
        self.tree = MerkleTree(MemoryTreeStore())
        for e in self.entries:
            self.tree.append(entry_bytes(e))

    def checkpoint(self, size: int | None = None) -> str:
        size = self.tree.size if size is None else size
        return sign_checkpoint(Checkpoint(ORIGIN, size, self.tree.root(size)), self.keyring.signing)

    def document(self, seq: int, size: int | None = None) -> dict[str, Any]:
        size = self.tree.size if size is None else size
        return vp.make_document(
            entry_to_dict(self.entries[seq]),
            seq,
            self.tree.inclusion_proof(seq, size),
            self.checkpoint(size),
            self.keyring.signing.public_bytes,
        )


@pytest.fixture(scope="module")
def log(keyring: KeyRing, make_entry: MakeEntry) -> Log:
    return Log(keyring, make_entry, 13)


def test_valid_documents_verify(log: Log) -> None:
    for seq in range(13):
        vp.verify_document(log.document(seq))
    for size in (1, 6, 8, 13):
        vp.verify_document(log.document(0, size))
    vp.verify_document(
        log.document(5),
        trusted_keys=[log.keyring.signing.public_bytes],
        origin=ORIGIN,
    )
    # survives a JSON round trip (what the web app receives)
    vp.verify_document(json.loads(json.dumps(log.document(4))))


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        keys = path.split(".")
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value

    return mutate


def _b64_flip(text: str, byte: int = 0) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[byte] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def _tamper_cases(log: Log) -> dict[str, Callable[[dict[str, Any]], None]]:
    other = log.document(6)
    stranger = KeyRing.from_env(
        {
            **log.keyring.to_env(),
            "FHIR_CONSENT_SIGNING_KEY": base64.b64encode(b"\x01" * 32).decode(),
        }
    )
    cp = log.checkpoint()
    body, sigs = cp.split("\n\n")
    lines = body.split("\n")
    return {
        "entry event": _set("entry.event", "refused"),
        "entry seq": _set("entry.seq", 6),
        "entry subject": _set("entry.subject", "0" * 64),
        "entry resource hash": _set("entry.resource_sha256", "f" * 64),
        "entry sealed": _set("entry.sealed", other["entry"]["sealed"]),
        "entry ts": _set("entry.ts", "2024-05-01T12:00:00.000000Z"),
        "entry sig": lambda d: _set("entry.sig", _b64_flip(d["entry"]["sig"], 5))(d),
        "entry kid": _set("entry.kid", "0123456789abcdef"),
        "entry extra field": _set("entry.note", "x"),
        "entry missing field": lambda d: d["entry"].pop("sealed"),
        "entry from elsewhere": _set("entry", other["entry"]),
        "leaf index": _set("leaf_index", 6),
        "leaf index type": _set("leaf_index", "5"),
        "proof element": lambda d: d["inclusion_proof"].__setitem__(
            1, _b64_flip(d["inclusion_proof"][1])
        ),
        "proof shortened": lambda d: d["inclusion_proof"].pop(),
        "proof extended": lambda d: d["inclusion_proof"].append(d["inclusion_proof"][0]),
        "proof swapped": lambda d: d["inclusion_proof"].reverse(),
        "proof not base64": lambda d: d["inclusion_proof"].__setitem__(0, "!!"),
        "proof of another entry": _set("inclusion_proof", other["inclusion_proof"]),
        "checkpoint size": _set(
            "checkpoint", "\n".join([lines[0], "14", *lines[2:]]) + "\n\n" + sigs
        ),
        "checkpoint smaller size": _set(
            "checkpoint", "\n".join([lines[0], "12", *lines[2:]]) + "\n\n" + sigs
        ),
        "checkpoint root": _set(
            "checkpoint",
            "\n".join([*lines[:2], _b64_flip(lines[2]), *lines[3:]]) + "\n\n" + sigs,
        ),
        "checkpoint origin": _set("checkpoint", cp.replace(ORIGIN, "evil.example/log")),
        "checkpoint signature": _set(
            "checkpoint",
            body + "\n\n" + sigs[:-10] + ("A" if sigs[-10] != "A" else "B") + sigs[-9:],
        ),
        "checkpoint by stranger": _set(
            "checkpoint",
            sign_checkpoint(Checkpoint(ORIGIN, log.tree.size, log.tree.root()), stranger.signing),
        ),
        "checkpoint extension line": _set("checkpoint", body + "\nextension\n\n" + sigs),
        "checkpoint of an older tree": _set("checkpoint", log.checkpoint(8)),
        "public key": _set("public_key", stranger.signing.public_key.to_base64()),
        "public key bad": _set("public_key", "AAAA"),
        "extra top-level field": _set("format", 2),
        "missing checkpoint": lambda d: d.pop("checkpoint"),
    }


def test_tampered_documents_fail(log: Log) -> None:
    for name, mutate in _tamper_cases(log).items():
        doc = copy.deepcopy(log.document(5))
        mutate(doc)
        with pytest.raises(vp.ProofError):
            vp.verify_document(doc)
            pytest.fail(f"tampered document accepted: {name}")


def test_pins(log: Log) -> None:
    doc = log.document(5)
    with pytest.raises(vp.ProofError, match="trusted"):
        vp.verify_document(doc, trusted_keys=[b"\x02" * 32])
    with pytest.raises(vp.ProofError, match="origin"):
        vp.verify_document(doc, origin="other.example/ledger")
    with pytest.raises(vp.ProofError):
        vp.verify_document([doc])  # type: ignore[arg-type]


def test_entry_signed_by_a_retired_key(tmp_path: Path, make_entry: MakeEntry) -> None:
    ring1 = KeyRing.generate(tmp_path)
    old = make_entry(ring1, 0)
    ring2 = KeyRing.rotate_signing_key(tmp_path)
    new = make_entry(ring2, 1, cid="c2")
    tree = MerkleTree(MemoryTreeStore())
    for e in (old, new):
        tree.append(entry_bytes(e))
    cp = sign_checkpoint(Checkpoint(ORIGIN, 2, tree.root()), ring2.signing)
    doc = vp.make_document(
        entry_to_dict(old), 0, tree.inclusion_proof(0), cp, ring2.signing.public_bytes
    )
    with pytest.raises(vp.ProofError, match="lacks"):
        vp.verify_document(doc)
    doc = vp.make_document(
        entry_to_dict(old),
        0,
        tree.inclusion_proof(0),
        cp,
        ring2.signing.public_bytes,
        entry_public_key=ring1.signing.public_bytes,
    )
    vp.verify_document(doc)
    pinned = [ring2.signing.public_bytes]
    with pytest.raises(vp.ProofError, match="entry_public_key is not one of the trusted keys"):
        vp.verify_document(doc, trusted_keys=pinned)
    vp.verify_document(doc, trusted_keys=[*pinned, ring1.signing.public_bytes])
    # the retired key cannot stand in for the log key on the checkpoint
    doc["public_key"], doc["entry_public_key"] = doc["entry_public_key"], doc["public_key"]
    with pytest.raises(vp.ProofError, match="checkpoint"):
        vp.verify_document(doc)


# ---------------------------------------------------------------------------------------------
# The command line, as a subprocess
# ---------------------------------------------------------------------------------------------


def _run(args: list[str], cwd: Path, env_path: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if env_path is not None:
        env["PYTHONPATH"] = env_path
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_ok_and_failed(log: Log, tmp_path: Path) -> None:
    good = tmp_path / "proof.json"
    good.write_text(json.dumps(log.document(5), indent=2))
    r = _run(["-m", "fhir_consent.ledger.verify_proof", str(good)], tmp_path, str(REPO))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK: entry 5 (proposed Consent/c5/_history/1)")
    assert ORIGIN in r.stdout and "size 13" in r.stdout

    key = log.keyring.signing.public_key.to_base64()
    r = _run(
        [
            "-m",
            "fhir_consent.ledger.verify_proof",
            str(good),
            "--trusted-key",
            key,
            "--origin",
            ORIGIN,
        ],
        tmp_path,
        str(REPO),
    )
    assert r.returncode == 0, r.stdout

    for name, mutate in list(_tamper_cases(log).items())[::3]:
        doc = copy.deepcopy(log.document(5))
        mutate(doc)
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(doc))
        r = _run(["-m", "fhir_consent.ledger.verify_proof", str(bad)], tmp_path, str(REPO))
        assert r.returncode == 1, name
        assert r.stdout.startswith("FAILED: "), (name, r.stdout, r.stderr)
        assert r.stderr == ""


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('{"a": NaN}', "invalid JSON constant"),
        ('{"a": 1, "a": 2}', "duplicate JSON key"),
        ("[]", "must be a JSON object"),
    ],
)
def test_cli_malformed_files(content: str, reason: str, tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(content)
    assert vp.main([str(f)]) == 1
    r = _run(["-m", "fhir_consent.ledger.verify_proof", str(f)], tmp_path, str(REPO))
    assert r.returncode == 1 and reason in r.stdout


def test_cli_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert vp.main([str(tmp_path / "nope.json")]) == 1
    assert capsys.readouterr().out.startswith("FAILED: cannot read")


def test_copied_file_runs_alone(log: Log, tmp_path: Path) -> None:
    """The verifier works as a lone file, in isolated mode, without the package on the path."""
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    shutil.copy(MODULE_FILE, alone / "verify_proof.py")
    proof = alone / "proof.json"
    proof.write_text(json.dumps(log.document(3)))
    r = _run(["-I", "verify_proof.py", "proof.json"], alone, None)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK:")
    doc = log.document(3)
    doc["entry"]["event"] = "granted"
    proof.write_text(json.dumps(doc))
    r = _run(["-I", "verify_proof.py", "proof.json"], alone, None)
    assert r.returncode == 1 and r.stdout == "FAILED: entry signature does not verify\n"


def test_imports_only_stdlib_and_nacl() -> None:
    tree = ast.parse(MODULE_FILE.read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            assert node.module is not None
            roots.add(node.module.split(".")[0])
    assert roots - {"nacl"} <= set(sys.stdlib_module_names) | {"__future__"}
    assert "nacl" in roots


def test_running_the_module_loads_no_package_code(tmp_path: Path) -> None:
    code = (
        "import sys, runpy; sys.argv=['x', '--help'];\n"
        "try: runpy.run_module('fhir_consent.ledger.verify_proof', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('fhir_consent', 'orjson'))))"
    )
    r = _run(["-c", code], tmp_path, str(REPO))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "['fhir_consent', 'fhir_consent.ledger']"


# ---------------------------------------------------------------------------------------------
# The independent re-implementations agree with the package
# ---------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from(list(vp.ENTRY_FIELDS[1:])), st.text(max_size=20), min_size=1),
    st.integers(0, 2**53 - 1),
)
def test_canonical_json_agrees(values: dict[str, str], seq: int) -> None:
    obj: dict[str, Any] = {"seq": seq, **values}
    try:
        expected = canonical_json(obj)
    except ValueError:
        with pytest.raises(vp.ProofError):
            vp._canonical(obj)
        return
    assert vp._canonical(obj) == expected


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_inclusion_and_hashes_agree(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 70))
    i = data.draw(st.integers(0, n - 1))
    t = MerkleTree(MemoryTreeStore())
    for k in range(n):
        t.append(k.to_bytes(2, "big"))
    proof = t.inclusion_proof(i)
    lh = leaf_hash(i.to_bytes(2, "big"))
    assert vp._leaf_hash(i.to_bytes(2, "big")) == lh
    assert vp._root_from_inclusion(lh, i, n, proof) == root_from_inclusion_proof(lh, i, n, proof)
    assert vp._root_from_inclusion(lh, i, n, proof) == t.root()
    if proof:
        with pytest.raises(vp.ProofError):
            vp._root_from_inclusion(lh, i, n, proof[:-1])


def test_key_hashes_agree(keyring: KeyRing) -> None:
    pub = keyring.signing.public_bytes
    assert vp._note_key_hash(ORIGIN, pub) == note_key_hash(ORIGIN, pub)
    assert vp._key_id(pub) == keyring.signing.key_id
