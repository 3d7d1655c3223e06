"""C2SP tlog-checkpoint / signed-note checkpoints: format, strict parsing, verification."""

from __future__ import annotations

import base64
import hashlib

import pytest

from fhir_consent.crypto import SigningKeyPair
from fhir_consent.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    note_key_hash,
    parse_checkpoint,
    sign_checkpoint,
    verifier_key,
    verify_checkpoint,
)

ORIGIN = "fhir-consent.example/ledger"
ROOT = hashlib.sha256(b"root").digest()
KEY = SigningKeyPair.from_seed(bytes(range(32)))
OTHER = SigningKeyPair.from_seed(bytes(range(1, 33)))


def _note(size: int = 42, root: bytes = ROOT, key: SigningKeyPair = KEY) -> str:
    return sign_checkpoint(Checkpoint(ORIGIN, size, root), key)


def test_format_is_c2sp() -> None:
    note = _note()
    body = f"{ORIGIN}\n42\n{base64.b64encode(ROOT).decode()}\n"
    assert note.startswith(body + "\n\u2014 " + ORIGIN + " ")
    assert note.endswith("\n") and note.count("\n") == 5
    sig = base64.b64decode(note.split(" ")[-1])
    assert len(sig) == 4 + 64
    # key hash = SHA-256(key name || 0x0A || 0x01 || public key)[:4]
    expected_hash = hashlib.sha256(ORIGIN.encode() + b"\n\x01" + KEY.public_bytes).digest()[:4]
    assert sig[:4] == expected_hash == note_key_hash(ORIGIN, KEY.public_bytes)
    KEY.verify(body.encode(), sig[4:])  # the signature covers the body incl. its final newline


def test_round_trip_and_verifier_key() -> None:
    cp = verify_checkpoint(_note(), KEY.public_key)
    assert cp == Checkpoint(ORIGIN, 42, ROOT)
    assert verify_checkpoint(_note(0, hashlib.sha256(b"").digest()), [KEY.public_key]).size == 0
    vkey = verifier_key(ORIGIN, KEY.public_key)
    name, khash, b64key = vkey.split("+", 2)
    assert name == ORIGIN and bytes.fromhex(khash) == note_key_hash(ORIGIN, KEY.public_bytes)
    assert base64.b64decode(b64key) == b"\x01" + KEY.public_bytes


def test_parses_the_c2sp_spec_example() -> None:
    # The example from c2sp.org/tlog-checkpoint (we cannot verify it: no public key given).
    example = (
        "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n"
        "\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URY"
        "N7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
    )
    cp, sigs = parse_checkpoint(example)
    assert (cp.origin, cp.size) == ("example.com/behind-the-sofa", 20852163)
    assert len(sigs) == 1 and len(sigs[0].signature) == 64
    with pytest.raises(CheckpointError, match="no signature by a trusted key"):
        verify_checkpoint(example, KEY.public_key)


def test_rotation_and_cosignatures() -> None:
    # a note signed by the new key verifies under {old, new}
    assert verify_checkpoint(_note(key=OTHER), [KEY.public_key, OTHER.public_key]).size == 42
    # extra signature lines from other keys (witnesses, same-name unknown keys) are ignored
    note = _note()
    witness = SigningKeyPair.generate()
    body = Checkpoint(ORIGIN, 42, ROOT).body()
    wline = (
        "\u2014 witness.example/w1 "
        + base64.b64encode(
            note_key_hash("witness.example/w1", witness.public_bytes) + witness.sign(body)
        ).decode()
        + "\n"
    )
    unknown_same_name = sign_checkpoint(Checkpoint(ORIGIN, 42, ROOT), OTHER).split("\n\n")[1]
    cosigned = note + wline + unknown_same_name
    assert verify_checkpoint(cosigned, KEY.public_key).size == 42


def _rejected(text: str, keys: object = None, match: str | None = None) -> None:
    with pytest.raises(CheckpointError, match=match):
        verify_checkpoint(text, KEY.public_key if keys is None else keys)  # type: ignore[arg-type]


def test_rejects_bad_signature() -> None:
    note = _note()
    body, sigline = note.split("\n\n")
    raw = bytearray(base64.b64decode(sigline.split(" ")[-1]))
    raw[10] ^= 1
    forged = body + "\n\n\u2014 " + ORIGIN + " " + base64.b64encode(bytes(raw)).decode() + "\n"
    _rejected(forged, match="does not verify")
    # a verifying signature elsewhere does not rescue a failing one from the trusted key
    _rejected(forged + note.split("\n\n")[1], match="does not verify")


def test_rejects_wrong_key() -> None:
    _rejected(_note(key=OTHER), match="no signature by a trusted key")
    # the right key hash but a signature by another key
    body = Checkpoint(ORIGIN, 42, ROOT).body()
    sig = note_key_hash(ORIGIN, KEY.public_bytes) + OTHER.sign(body)
    _rejected(
        body.decode() + "\n\u2014 " + ORIGIN + " " + base64.b64encode(sig).decode() + "\n",
        match="does not verify",
    )
    # the right signature under a wrong key hash
    sig = b"\x00\x00\x00\x00" + KEY.sign(body)
    _rejected(
        body.decode() + "\n\u2014 " + ORIGIN + " " + base64.b64encode(sig).decode() + "\n",
        match="no signature by a trusted key",
    )
    # the right signature under another key name
    sig = note_key_hash("other.example", KEY.public_bytes) + KEY.sign(body)
    _rejected(
        body.decode() + "\n\u2014 other.example " + base64.b64encode(sig).decode() + "\n",
        match="no signature by a trusted key",
    )
    _rejected(_note(), keys=[], match="no signature by a trusted key")


def _swap_body(note: str, new_body: str) -> str:
    return new_body + "\n" + note.split("\n\n", 1)[1]


def test_rejects_altered_size_or_root() -> None:
    note = _note()
    root_b64 = base64.b64encode(ROOT).decode()
    other_root = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    for body in [
        f"{ORIGIN}\n43\n{root_b64}\n",
        f"{ORIGIN}\n41\n{root_b64}\n",
        f"{ORIGIN}\n4200\n{root_b64}\n",
        f"{ORIGIN}\n42\n{other_root}\n",
        f"other.example\n42\n{root_b64}\n",
    ]:
        _rejected(_swap_body(note, body))


@pytest.mark.parametrize(
    "body",
    [
        "{o}\n42\n{r}\nextension line\n",  # extra line (we never emit extensions)
        "{o}\n42\n",  # missing root
        "{o}\n{r}\n",  # missing size
        "42\n{r}\n",  # missing origin
        "{o}\n042\n{r}\n",  # leading zero
        "{o}\n-42\n{r}\n",
        "{o}\n+42\n{r}\n",
        "{o}\n 42\n{r}\n",
        "{o}\n4.2\n{r}\n",
        "{o}\n\u0664\u0662\n{r}\n",  # non-ASCII digits
        "{o}\n99999999999999999999\n{r}\n",
        "{o}\n42\n{r}=\n",  # bad padding
        "{o}\n42\nnot base64!\n",
        "{o}\n42\n{short}\n",  # 31-byte root
        "{o}\n42\n{r_nc}\n",  # non-canonical base64
        "{o} x\n42\n{r}\n",  # space in origin
        "a+b\n42\n{r}\n",  # plus in origin
        "{o}\n42\n{r}\r\n",  # CR
    ],
)
def test_rejects_malformed_bodies(body: str) -> None:
    r = base64.b64encode(ROOT).decode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    r_nc = r[:-2] + alphabet[alphabet.index(r[-2]) ^ 1] + "="  # sets an unused low bit
    assert base64.b64decode(r_nc) == ROOT and r_nc != r
    text = body.format(o=ORIGIN, r=r, short=base64.b64encode(ROOT[:31]).decode(), r_nc=r_nc)
    with pytest.raises(CheckpointError):
        parse_checkpoint(_swap_body(_note(), text))


def test_rejects_malformed_envelopes() -> None:
    note = _note()
    body, sig_block = note.split("\n\n")
    for bad in [
        note[:-1],  # no final newline
        body + "\n",  # no signatures
        body + "\n\n",
        note.replace("\u2014", "-"),  # ASCII hyphen instead of em dash
        note.replace("\u2014 ", "\u2014"),
        note.replace(f" {ORIGIN} ", f" {ORIGIN}  "),
        body + "\n\n\n" + sig_block,  # extra blank line
        note + "\n",
        note.replace("\n", "\r\n"),
        note + "\u2014 " + ORIGIN + " AAAA\n",  # signature too short
        note + "\u2014 " + ORIGIN + " not-base64\n",
        note + "trailing text\n",
        "\x00" + note,
        body + sig_block,  # no blank line at all
    ]:
        with pytest.raises(CheckpointError):
            verify_checkpoint(bad, KEY.public_key)
    with pytest.raises(CheckpointError):
        parse_checkpoint(b"\xff\xfe" + note.encode())
    assert parse_checkpoint(note.encode())[0].size == 42


def test_origin_pin() -> None:
    assert verify_checkpoint(_note(), KEY.public_key, origin=ORIGIN).origin == ORIGIN
    with pytest.raises(CheckpointError, match="origin"):
        verify_checkpoint(_note(), KEY.public_key, origin="elsewhere.example/log")


def test_checkpoint_validation() -> None:
    for args in [("", 1, ROOT), ("a b", 1, ROOT), (ORIGIN, -1, ROOT), (ORIGIN, 1, ROOT[:31])]:
        with pytest.raises(CheckpointError):
            Checkpoint(*args)
    with pytest.raises(CheckpointError):
        Checkpoint(ORIGIN, True, ROOT)
