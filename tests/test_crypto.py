"""Tests for fhir_consent.crypto: canonical JSON, keys, pseudonyms, key files."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_consent import crypto
from fhir_consent.crypto import (
    ENV_PSEUDONYM_SECRET,
    ENV_RETIRED_SIGNING_KEYS,
    ENV_RMS_PRIVATE_KEY,
    ENV_RMS_PUBLIC_KEY,
    ENV_SIGNING_KEY,
    CryptoError,
    KeyRing,
    KeyRingError,
    PseudonymKey,
    PublicSigningKey,
    SealKeyPair,
    SigningKeyPair,
    b64decode,
    canonical_json,
    pseudonym,
    sha256_hex,
)

# ---------------------------------------------------------------------------------------------
# canonical JSON (RFC 8785 style)
# ---------------------------------------------------------------------------------------------


def test_canonical_json_basic() -> None:
    assert canonical_json({"b": 1, "a": [True, None, "x"], "c": {"z": 0, "y": -1}}) == (
        b'{"a":[true,null,"x"],"b":1,"c":{"y":-1,"z":0}}'
    )


def test_canonical_json_strings() -> None:
    # RFC 8785 §3.2.2.2: only " \ and controls are escaped; \b \f \n \r \t short forms;
    # others as lower-case \u00xx; non-ASCII (and '/', DEL, U+2028) written as UTF-8.
    value = '\x00\x01\x08\t\n\x0c\r\x1f"\\/\x7f\u2028é€😀'
    expected = '"\\u0000\\u0001\\b\\t\\n\\f\\r\\u001f\\"\\\\/\x7f\u2028é€😀"'.encode()
    assert canonical_json(value) == expected
    assert canonical_json({"k": value}) == b'{"k":' + expected + b"}"  # slow path via float below
    assert canonical_json({"k": value, "f": 0.5}) == b'{"f":0.5,"k":' + expected + b"}"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        # ECMAScript Number.prototype.toString, as RFC 8785 §3.2.2.3 requires
        (0.0, "0"),
        (-0.0, "0"),
        (1.0, "1"),
        (-1.5, "-1.5"),
        (0.1, "0.1"),
        (123.456, "123.456"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (999999999999999900000.0, "999999999999999900000"),
        (1e-6, "0.000001"),
        (1e-7, "1e-7"),
        (1.5e-7, "1.5e-7"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (9007199254740992.0, "9007199254740992"),
        (333333333.3333333, "333333333.3333333"),
        (4.35, "4.35"),
        (0.000001234, "0.000001234"),
    ],
)
def test_canonical_json_numbers(value: float, text: str) -> None:
    assert canonical_json(value) == text.encode()
    assert canonical_json([value]) == f"[{text}]".encode()


def test_canonical_json_large_integers_are_doubles() -> None:
    assert canonical_json(2**53) == b"9007199254740992"
    assert canonical_json(2**60) == b"1152921504606847000"  # as ECMAScript prints 2**60
    assert canonical_json(10**21) == b"1e+21"
    assert canonical_json([2**53 - 1, -(2**53) + 1]) == b"[9007199254740991,-9007199254740991]"


def test_canonical_json_key_order_is_utf16() -> None:
    # RFC 8785 §3.2.3: sort by UTF-16 code units, so U+1F600 (D83D DE00) sorts before U+E000.
    obj = {"\ue000": 1, "\U0001f600": 2, "a": 3, "é": 4}
    out = canonical_json(obj).decode()
    assert out == '{"a":3,"é":4,"\U0001f600":2,"\ue000":1}'


@pytest.mark.parametrize(
    "bad",
    [
        float("nan"),
        float("inf"),
        [float("-inf")],
        2**53 + 1,
        -(2**53) - 1,
        10**400,
        {1: "x"},
        b"bytes",
        {"s": {1, 2}},
        "\ud800",
        {"\udc00": 1},
    ],
)
def test_canonical_json_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        canonical_json(bad)


_json_scalars = st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text()
_json_no_float = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)
_json_any = st.recursive(
    _json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


def _slow(obj: Any) -> bytes:
    out: list[str] = []
    crypto._encode_slow(obj, out)
    return "".join(out).encode()


@settings(max_examples=300, deadline=None)
@given(_json_no_float)
def test_orjson_fast_path_equals_reference_encoder(obj: Any) -> None:
    # The justification for using orjson: for our value types it is byte-identical to the
    # pure-Python RFC 8785 encoder.
    try:
        expected = _slow(obj)
    except UnicodeEncodeError:
        return  # lone surrogates: rejected by both (tested above)
    if crypto._check_tree(obj):
        assert orjson.dumps(obj, option=orjson.OPT_SORT_KEYS) == expected
    assert canonical_json(obj) == expected


@settings(max_examples=300, deadline=None)
@given(_json_any)
def test_canonical_json_round_trips(obj: Any) -> None:
    try:
        out = canonical_json(obj)
    except ValueError:
        return
    # read back as an I-JSON parser does: numbers beyond ±(2**53-1) are doubles
    back = json.loads(out, parse_int=_ijson_int)
    assert canonical_json(back) == out


def _ijson_int(text: str) -> int | float:
    value = int(text)
    return value if abs(value) <= 2**53 - 1 else float(text)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_text_round_trips(x: float) -> None:
    text = canonical_json(x).decode()
    assert float(text) == x or (x == 0 and float(text) == 0)
    assert not math.isnan(float(text))


def test_sha256_hex() -> None:
    assert sha256_hex(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_b64decode_strict() -> None:
    assert b64decode("AAEC") == b"\x00\x01\x02"
    for bad in ["AAE", "AA=C", "AA EC", "AAEC\n", "AAF=", "ÄAEC", "AA-_"]:
        with pytest.raises(ValueError):
            b64decode(bad)
    with pytest.raises(ValueError):
        b64decode("AAEC", length=4)


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------


def test_signing_key_sign_verify_and_key_id() -> None:
    key = SigningKeyPair.generate()
    sig = key.sign(b"message")
    assert len(sig) == 64
    key.verify(b"message", sig)
    key.public_key.verify(b"message", sig)
    assert key.key_id == hashlib.sha256(key.public_bytes).digest()[:8].hex()
    assert len(key.key_id) == 16
    with pytest.raises(CryptoError):
        key.verify(b"messagE", sig)
    with pytest.raises(CryptoError):
        key.verify(b"message", sig[:-1] + bytes([sig[-1] ^ 1]))
    with pytest.raises(CryptoError):
        key.verify(b"message", sig[:63])
    with pytest.raises(CryptoError):
        SigningKeyPair.generate().verify(b"message", sig)


def test_signing_key_from_seed_is_deterministic() -> None:
    seed = bytes(range(32))
    a, b = SigningKeyPair.from_seed(seed), SigningKeyPair.from_seed(seed)
    assert a.public_bytes == b.public_bytes
    assert a.sign(b"x") == b.sign(b"x")  # Ed25519 is deterministic
    with pytest.raises(CryptoError):
        SigningKeyPair.from_seed(b"short")


def test_public_signing_key() -> None:
    key = SigningKeyPair.generate()
    pub = PublicSigningKey.from_base64(key.public_key.to_base64())
    assert pub == key.public_key and hash(pub) == hash(key.public_key)
    pub.verify(b"m", key.sign(b"m"))
    with pytest.raises(CryptoError):
        PublicSigningKey.from_base64("not base64!")
    with pytest.raises(CryptoError):
        PublicSigningKey(b"\x00" * 31)


def test_sealed_box_round_trip() -> None:
    rms = SealKeyPair.generate()
    box = rms.public_key.seal(b"secret document")
    assert len(box) == len(b"secret document") + 48
    assert rms.unseal(box) == b"secret document"
    assert rms.public_key.seal(b"secret document") != box  # ephemeral key each time
    with pytest.raises(CryptoError):
        SealKeyPair.generate().unseal(box)
    with pytest.raises(CryptoError):
        rms.unseal(box[:-1] + bytes([box[-1] ^ 1]))
    with pytest.raises(CryptoError):
        rms.unseal(b"short")


def test_crypto_errors_are_opaque() -> None:
    rms = SealKeyPair.generate()
    with pytest.raises(CryptoError) as info:
        rms.unseal(b"\x00" * 80)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert type(info.value) is CryptoError


def test_pseudonym() -> None:
    secret = b"\x07" * 32
    p = pseudonym(secret, "Patient/123")
    assert p == hmac.new(secret, b"Patient/123", hashlib.sha256).hexdigest()
    assert len(p) == 64 and p == pseudonym(secret, "Patient/123")
    assert p != pseudonym(secret, "Patient/124")
    assert p != pseudonym(b"\x08" * 32, "Patient/123")
    # RFC 4231 test case 6 (HMAC-SHA-256 with a 131-byte key)
    assert pseudonym(b"\xaa" * 131, "Test Using Larger Than Block-Size Key - Hash Key First") == (
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    )
    with pytest.raises(CryptoError):
        pseudonym(b"short secret", "Patient/1")
    with pytest.raises(ValueError):
        pseudonym(secret, "")
    key = PseudonymKey(secret)
    assert key.pseudonym("Patient/123") == p


def _secret_texts(ring: KeyRing) -> list[str]:
    secrets_ = [ring.signing.secret_seed(), ring.pseudonym_key.secret_bytes()]
    if ring.rms_keypair is not None:
        secrets_.append(ring.rms_keypair.secret_bytes())
    out = []
    for s in secrets_:
        out += [s.hex(), base64.b64encode(s).decode(), repr(s)[2:-1]]
    return out


def test_no_secret_in_repr(tmp_path: Path) -> None:
    ring = KeyRing.generate(tmp_path / "k")
    shown = " ".join(
        [
            repr(ring),
            str(ring),
            repr(ring.signing),
            str(ring.signing),
            repr(ring.rms_keypair),
            repr(ring.pseudonym_key),
            repr(ring.rms_public),
            repr(ring.signing.public_key),
        ]
    )
    for text in _secret_texts(ring):
        assert text not in shown
    assert ring.signing.key_id in repr(ring.signing)
    assert "SigningKeyPair(key_id=" in repr(ring.signing)
    for obj in (ring, ring.signing, ring.rms_keypair, ring.pseudonym_key):
        assert not hasattr(obj, "__dict__")  # nothing hidden in vars() either
    bundle = json.dumps(ring.public_bundle())
    for text in _secret_texts(ring):
        assert text not in bundle


# ---------------------------------------------------------------------------------------------
# key files
# ---------------------------------------------------------------------------------------------

KEY_FILES = ["signing.key", "rms-seal.key", "rms-seal.pub", "pseudonym.key"]


def test_generate_writes_0600_files(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ring = KeyRing.generate(tmp_path / "keys")
    finally:
        os.umask(old)
    d = tmp_path / "keys"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in KEY_FILES:
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
        doc = json.loads((d / name).read_text())
        assert doc["format"] == "fhir-consent-key/1" and doc["key_id"]
    assert json.loads((d / "signing.key").read_text())["key_id"] == ring.signing.key_id
    assert ring.rms_keypair is not None


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    KeyRing.generate(d)
    before = {n: (d / n).read_bytes() for n in KEY_FILES}
    with pytest.raises(KeyRingError, match="refusing to overwrite"):
        KeyRing.generate(d)
    assert before == {n: (d / n).read_bytes() for n in KEY_FILES}
    # even a single existing file blocks generation
    d2 = tmp_path / "keys2"
    d2.mkdir()
    (d2 / "pseudonym.key").write_text("{}")
    with pytest.raises(KeyRingError):
        KeyRing.generate(d2)
    assert sorted(p.name for p in d2.iterdir()) == ["pseudonym.key"]


def test_load_round_trip(tmp_path: Path) -> None:
    ring = KeyRing.generate(tmp_path)
    loaded = KeyRing.load(tmp_path)
    assert loaded.signing.key_id == ring.signing.key_id
    assert loaded.pseudonym("Patient/1") == ring.pseudonym("Patient/1")
    assert loaded.rms_keypair is not None and ring.rms_keypair is not None
    assert loaded.rms_keypair.unseal(ring.rms_public.seal(b"x")) == b"x"
    ring.signing.verify(b"m", loaded.signing.sign(b"m"))


def test_load_without_rms_private_key(tmp_path: Path) -> None:
    ring = KeyRing.generate(tmp_path)
    (tmp_path / "rms-seal.key").unlink()
    loaded = KeyRing.load(tmp_path)
    assert loaded.rms_keypair is None
    assert loaded.rms_public == ring.rms_public


def test_load_refuses_group_readable_secret(tmp_path: Path) -> None:
    KeyRing.generate(tmp_path)
    os.chmod(tmp_path / "signing.key", 0o640)
    with pytest.raises(KeyRingError, match="0600"):
        KeyRing.load(tmp_path)


def test_load_detects_tampered_key_file(tmp_path: Path) -> None:
    KeyRing.generate(tmp_path)
    path = tmp_path / "signing.key"
    doc = json.loads(path.read_text())
    doc["public"] = SigningKeyPair.generate().public_key.to_base64()
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyRingError, match="does not match"):
        KeyRing.load(tmp_path)


def test_load_errors_never_show_secrets(tmp_path: Path) -> None:
    ring = KeyRing.generate(tmp_path)
    path = tmp_path / "pseudonym.key"
    doc = json.loads(path.read_text())
    doc["key_id"] = "0000000000000000"
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyRingError) as info:
        KeyRing.load(tmp_path)
    for text in _secret_texts(ring):
        assert text not in str(info.value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyRingError):
        KeyRing.load(tmp_path / "nope")


def test_rotation_keeps_old_keys_verifiable(tmp_path: Path) -> None:
    ring1 = KeyRing.generate(tmp_path)
    sig1 = ring1.signing.sign(b"entry 1")
    ring2 = KeyRing.rotate_signing_key(tmp_path)
    assert ring2.signing.key_id != ring1.signing.key_id
    assert set(ring2.retired) == {ring1.signing.key_id}
    keys = ring2.verify_keys()
    keys[ring1.signing.key_id].verify(b"entry 1", sig1)
    # the old seed is gone from the directory
    seed1 = base64.b64encode(ring1.signing.secret_seed()).decode()
    for p in tmp_path.iterdir():
        assert seed1 not in p.read_text()
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    # other keys are unchanged
    assert ring2.pseudonym("Patient/1") == ring1.pseudonym("Patient/1")
    assert ring2.rms_public == ring1.rms_public
    ring3 = KeyRing.rotate_signing_key(tmp_path)
    assert set(ring3.verify_keys()) == {
        ring1.signing.key_id,
        ring2.signing.key_id,
        ring3.signing.key_id,
    }
    assert KeyRing.load(tmp_path).signing.key_id == ring3.signing.key_id
    assert ring3.public_bundle()["signing_key_id"] == ring3.signing.key_id
    assert set(ring3.public_bundle()["signing_keys"]) == set(ring3.verify_keys())


def test_from_env_round_trip(tmp_path: Path) -> None:
    ring = KeyRing.generate(tmp_path)
    KeyRing.rotate_signing_key(tmp_path)
    ring = KeyRing.load(tmp_path)
    env = ring.to_env()
    assert set(env) == {
        ENV_SIGNING_KEY,
        ENV_RMS_PUBLIC_KEY,
        ENV_RMS_PRIVATE_KEY,
        ENV_PSEUDONYM_SECRET,
        ENV_RETIRED_SIGNING_KEYS,
    }
    loaded = KeyRing.from_env({**env, "UNRELATED": "x"})
    assert loaded.signing.key_id == ring.signing.key_id
    assert set(loaded.verify_keys()) == set(ring.verify_keys())
    assert loaded.pseudonym("Patient/9") == ring.pseudonym("Patient/9")
    assert loaded.rms_keypair is not None

    # production: no RMS private key on the server
    server_env = {k: v for k, v in env.items() if k != ENV_RMS_PRIVATE_KEY}
    server = KeyRing.from_env(server_env)
    assert server.rms_keypair is None and server.rms_public == ring.rms_public


def test_from_env_errors_name_the_variable_not_the_value(tmp_path: Path) -> None:
    env = KeyRing.generate(tmp_path).to_env()
    for name in (ENV_SIGNING_KEY, ENV_PSEUDONYM_SECRET):
        broken = dict(env)
        del broken[name]
        with pytest.raises(KeyRingError, match=name):
            KeyRing.from_env(broken)
    bad = {**env, ENV_SIGNING_KEY: env[ENV_SIGNING_KEY][:-4] + "!!!!"}
    with pytest.raises(KeyRingError, match=ENV_SIGNING_KEY) as info:
        KeyRing.from_env(bad)
    assert env[ENV_SIGNING_KEY][:-4] not in str(info.value)
    short = {**env, ENV_PSEUDONYM_SECRET: base64.b64encode(b"x" * 16).decode()}
    with pytest.raises(KeyRingError, match=ENV_PSEUDONYM_SECRET):
        KeyRing.from_env(short)
    mismatch = {**env, ENV_RMS_PUBLIC_KEY: SealKeyPair.generate().public_key.to_base64()}
    with pytest.raises(KeyRingError):
        KeyRing.from_env(mismatch)
    no_rms = {k: v for k, v in env.items() if k not in (ENV_RMS_PUBLIC_KEY, ENV_RMS_PRIVATE_KEY)}
    with pytest.raises(KeyRingError, match=ENV_RMS_PUBLIC_KEY):
        KeyRing.from_env(no_rms)
    with pytest.raises(KeyRingError, match=ENV_RETIRED_SIGNING_KEYS):
        KeyRing.from_env({**env, ENV_RETIRED_SIGNING_KEYS: "AAAA"})
