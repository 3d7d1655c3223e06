"""Signing keys for the authorization server, with joserfc: generate, load, rotate, publish.

* :class:`KeySet` holds one current private signing key per algorithm (RS256 for access
  tokens and id_tokens, as SMART 2.2 "Scopes and Launch Context" §"Scopes for requesting
  identity data" requires RSA SHA-256 for id_tokens; ES384 on P-384 as well) plus retired
  keys that still verify tokens already issued, all named by ``kid``
  (RFC 7517 §4.5; generated kids are RFC 7638 thumbprints).
* :meth:`KeySet.jwks` is the public JWK Set served at ``jwks_uri`` (RFC 7517 §5), with
  bare keys as SMART's ``sso-openid-connect`` requires.
* :class:`VerificationKeys` is the fast path of the resource server: public keys imported
  once and kept by ``kid``, plus a bounded cache of JWS compact tokens whose signature
  already verified (RFC 7515 §5.2). Build it from a :class:`KeySet` or from any JWKS.

Storage (both carry private keys: protect them like passwords):

* a directory: ``keyset.json`` names the current kid per algorithm and the retired kids,
  and each key sits in ``<kid>.jwk.json``; files are written 0600 in a 0700 directory,
  and loading refuses key files that group or others can read;
* an environment variable holding a private JWKS (RFC 7517 §5): per algorithm, the first
  private key is current and every later key is retired.

Nothing here logs, and no message or ``repr`` contains key material.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeAlias, cast

from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey
from joserfc.jws import JWSRegistry

from .errors import InvalidToken, KeyStoreError

__all__ = [
    "DEFAULT_ALGORITHMS",
    "SIGNING_ALGORITHMS",
    "KeySet",
    "SigningKey",
    "VerificationKeys",
    "generate_signing_key",
    "load_or_create",
]

SigningKey: TypeAlias = RSAKey | ECKey

#: JWS algorithms (RFC 7518 §3.1) a key here may carry, with the key type and curve each
#: needs. RS256 signs access tokens and id_tokens; RS384 and ES384 are the algorithms
#: SMART asymmetric client authentication names.
SIGNING_ALGORITHMS: Final[Mapping[str, tuple[str, str | None]]] = MappingProxyType(
    {"RS256": ("RSA", None), "RS384": ("RSA", None), "ES384": ("EC", "P-384")}
)
#: What :meth:`KeySet.generate` makes by default.
DEFAULT_ALGORITHMS: Final = ("RS256", "ES384")

_MANIFEST: Final = "keyset.json"
_KEY_SUFFIX: Final = ".jwk.json"
_KID_RE: Final = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")
_MAX_TOKEN_LENGTH: Final = 16 * 1024


def _check_alg(alg: str) -> tuple[str, str | None]:
    if alg not in SIGNING_ALGORITHMS:
        raise KeyStoreError(f"unsupported signing algorithm {alg!r}")
    return SIGNING_ALGORITHMS[alg]


def generate_signing_key(alg: str = "RS256", *, rsa_bits: int = 2048) -> SigningKey:
    """A new private key for *alg*, with ``alg``, ``use: sig`` and a thumbprint ``kid``.

    :param rsa_bits: RSA modulus size; at least 2048 (NIST SP 800-131A)
    :raises KeyStoreError: for an algorithm outside :data:`SIGNING_ALGORITHMS`
    """
    kty, curve = _check_alg(alg)
    parameters: dict[str, Any] = {"alg": alg, "use": "sig"}
    if kty == "RSA":
        if rsa_bits < 2048:
            raise KeyStoreError("RSA keys must have at least 2048 bits")
        return RSAKey.generate_key(rsa_bits, parameters=cast(Any, parameters), auto_kid=True)
    return ECKey.generate_key(curve, parameters=cast(Any, parameters), auto_kid=True)


def _import_jwk(data: object, *, where: str) -> SigningKey:
    """Import one RSA or EC JWK (RFC 7517 §4) and pin its ``alg`` and ``kid``."""
    if not isinstance(data, Mapping):
        raise KeyStoreError(f"{where}: a JWK must be a JSON object")
    value = dict(data)
    kty = value.get("kty")
    alg = value.get("alg")
    if alg is None:
        if kty == "RSA":
            alg = "RS256"
        elif kty == "EC" and value.get("crv") == "P-384":
            alg = "ES384"
    if not isinstance(alg, str) or alg not in SIGNING_ALGORITHMS:
        raise KeyStoreError(f"{where}: key type or algorithm not supported")
    want_kty, want_curve = SIGNING_ALGORITHMS[alg]
    if kty != want_kty or (want_curve is not None and value.get("crv") != want_curve):
        raise KeyStoreError(f"{where}: a {alg} key must be {want_kty} {want_curve or ''}".strip())
    if value.get("use", "sig") != "sig":
        raise KeyStoreError(f"{where}: key is not for signatures (use != sig)")
    value["alg"] = alg
    value["use"] = "sig"
    try:
        key: SigningKey = (RSAKey if kty == "RSA" else ECKey).import_key(cast(Any, value))
    except (JoseError, ValueError, TypeError, binascii.Error):
        raise KeyStoreError(f"{where}: not a valid {kty} JWK") from None
    key.ensure_kid()
    if not isinstance(key.kid, str) or not _KID_RE.fullmatch(key.kid):
        raise KeyStoreError(f"{where}: kid must match {_KID_RE.pattern}")
    if kty == "RSA" and cast(Any, key.public_key).key_size < 2048:
        raise KeyStoreError(f"{where}: RSA keys must have at least 2048 bits")
    return key


def _public(key: SigningKey) -> SigningKey:
    if not key.is_private:
        return key
    return type(key).import_key(cast(Any, key.as_dict(private=False)))


def _describe(key: SigningKey) -> str:
    return f"{key.alg}:{key.kid}"


class KeySet:
    """The authorization server's signing keys: one current key per algorithm, plus
    retired keys kept for verification until every token they signed has expired.

    Immutable: :meth:`rotate` and :meth:`remove` return new sets. ``repr`` shows only
    algorithms and kids.

    :param current: private keys, at most one per algorithm
    :param retired: keys (private or public) that verify but no longer sign
    :raises KeyStoreError: duplicate kids or algorithms, or a public current key
    """

    __slots__ = ("_by_kid", "_current", "_retired", "_verifier")

    def __init__(self, current: Iterable[SigningKey], retired: Iterable[SigningKey] = ()) -> None:
        self._current: dict[str, SigningKey] = {}
        for key in current:
            alg = key.alg
            if not isinstance(alg, str):
                raise KeyStoreError("every key needs an 'alg'")
            _check_alg(alg)
            if alg in self._current:
                raise KeyStoreError(f"two current keys for {alg}")
            if not key.is_private:
                raise KeyStoreError(f"the current {alg} key must be a private key")
            self._current[alg] = key
        self._retired: tuple[SigningKey, ...] = tuple(retired)
        self._by_kid: dict[str, SigningKey] = {}
        for key in (*self._current.values(), *self._retired):
            kid = key.kid
            if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
                raise KeyStoreError("every key needs a kid matching " + _KID_RE.pattern)
            if not isinstance(key.alg, str):
                raise KeyStoreError(f"key {kid} needs an 'alg'")
            if kid in self._by_kid:
                raise KeyStoreError(f"duplicate kid {kid}")
            self._by_kid[kid] = key
        self._verifier: VerificationKeys | None = None

    # -- construction ------------------------------------------------------------------

    @classmethod
    def generate(
        cls, algorithms: Iterable[str] = DEFAULT_ALGORITHMS, *, rsa_bits: int = 2048
    ) -> KeySet:
        """A fresh set with one new key per algorithm (RS256 and ES384 by default)."""
        return cls([generate_signing_key(alg, rsa_bits=rsa_bits) for alg in algorithms])

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any] | str) -> KeySet:
        """Import a private JWK Set (RFC 7517 §5), as a mapping or as JSON text.

        Per algorithm the first private key is current; later keys, and public ones, are
        retired. A key without ``alg`` counts as RS256 (RSA) or ES384 (EC P-384).
        """
        if isinstance(jwks, str):
            try:
                jwks = json.loads(jwks)
            except ValueError:
                raise KeyStoreError("the JWKS is not valid JSON") from None
        if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
            raise KeyStoreError("a JWKS is a JSON object with a 'keys' array")
        current: dict[str, SigningKey] = {}
        retired: list[SigningKey] = []
        for index, data in enumerate(jwks["keys"]):
            key = _import_jwk(data, where=f"JWKS key #{index}")
            alg = cast(str, key.alg)
            if key.is_private and alg not in current:
                current[alg] = key
            else:
                retired.append(key)
        if not current:
            raise KeyStoreError("the JWKS holds no private signing key")
        return cls(current.values(), retired)

    @classmethod
    def from_env(
        cls, variable: str = "SMART_JWKS", *, environ: Mapping[str, str] | None = None
    ) -> KeySet:
        """Load from an environment variable holding a private JWKS (see :meth:`from_jwks`)."""
        env = os.environ if environ is None else environ
        text = env.get(variable)
        if not text:
            raise KeyStoreError(f"environment variable {variable} is not set")
        try:
            return cls.from_jwks(text)
        except KeyStoreError as error:
            raise KeyStoreError(f"{variable}: {error}") from None

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, strict_permissions: bool = True) -> KeySet:
        """Load a set saved by :meth:`save`.

        :param strict_permissions: refuse key files that group or others may read, as
            OpenSSH does for private keys
        """
        root = Path(directory)
        manifest = _read_json(root / _MANIFEST, strict_permissions=False)
        current_kids = manifest.get("current")
        retired_kids = manifest.get("retired", [])
        if not isinstance(current_kids, dict) or not isinstance(retired_kids, list):
            raise KeyStoreError(f"{root / _MANIFEST}: expected 'current' and 'retired'")

        def load_key(kid: object) -> SigningKey:
            if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
                raise KeyStoreError(f"{root / _MANIFEST}: invalid kid")
            path = root / f"{kid}{_KEY_SUFFIX}"
            key = _import_jwk(_read_json(path, strict_permissions), where=str(path))
            if key.kid != kid:
                raise KeyStoreError(f"{path}: kid does not match its file name")
            return key

        current = []
        for alg, kid in current_kids.items():
            key = load_key(kid)
            if key.alg != alg:
                raise KeyStoreError(f"{root}: key {kid} is not a {alg} key")
            current.append(key)
        return cls(current, [load_key(kid) for kid in retired_kids])

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write every key 0600 into *directory* (created 0700) and remove key files of
        keys no longer in the set. The manifest is replaced last, atomically."""
        root = Path(directory)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for key in self._by_kid.values():
            data = key.as_dict(private=key.is_private)
            _write_private(root / f"{key.kid}{_KEY_SUFFIX}", json.dumps(data, indent=2))
        manifest = {
            "current": {alg: key.kid for alg, key in self._current.items()},
            "retired": [key.kid for key in self._retired],
        }
        _write_private(root / _MANIFEST, json.dumps(manifest, indent=2))
        for path in root.glob(f"*{_KEY_SUFFIX}"):
            if path.name[: -len(_KEY_SUFFIX)] not in self._by_kid:
                path.unlink()

    # -- use -----------------------------------------------------------------------------

    @property
    def algorithms(self) -> tuple[str, ...]:
        """Algorithms with a current signing key."""
        return tuple(self._current)

    @property
    def kids(self) -> tuple[str, ...]:
        """Every kid: current keys first, then retired ones."""
        return tuple(self._by_kid)

    def signing_key(self, alg: str = "RS256") -> SigningKey:
        """The current private key for *alg*.

        :raises KeyStoreError: when the set has no current key for *alg*
        """
        try:
            return self._current[alg]
        except KeyError:
            raise KeyStoreError(f"no current signing key for {alg}") from None

    def get(self, kid: str) -> SigningKey | None:
        """The key (current or retired) named *kid*, or ``None``."""
        return self._by_kid.get(kid)

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set (RFC 7517 §5) for ``jwks_uri``: current keys first, then
        retired ones, each with ``kty``, ``kid``, ``alg`` and ``use``; never private
        members."""
        return {"keys": [dict(key.as_dict(private=False)) for key in self._by_kid.values()]}

    def export_private_jwks(self) -> dict[str, Any]:
        """The whole set as a private JWKS, the format :meth:`from_jwks` and
        :meth:`from_env` read.

        .. warning:: the result contains private keys. Never log or serve it.
        """
        return {
            "keys": [dict(key.as_dict(private=key.is_private)) for key in self._by_kid.values()]
        }

    def rotate(
        self, alg: str = "RS256", *, new_key: SigningKey | None = None, rsa_bits: int = 2048
    ) -> KeySet:
        """A new set whose current *alg* key is *new_key* (or a fresh one); the previous
        current key becomes retired, so tokens it signed keep verifying until
        :meth:`remove` drops it."""
        key = new_key if new_key is not None else generate_signing_key(alg, rsa_bits=rsa_bits)
        if key.alg != alg:
            raise KeyStoreError(f"the new key is not a {alg} key")
        current = dict(self._current)
        old = current.get(alg)
        current[alg] = key
        retired = (old, *self._retired) if old is not None else self._retired
        return KeySet(current.values(), retired)

    def remove(self, kid: str) -> KeySet:
        """A new set without the retired key *kid*; tokens it signed stop verifying.

        :raises KeyStoreError: if *kid* is unknown or is a current key
        """
        if any(key.kid == kid for key in self._current.values()):
            raise KeyStoreError(f"{kid} is a current signing key: rotate it first")
        if kid not in self._by_kid:
            raise KeyStoreError(f"no key {kid}")
        return KeySet(self._current.values(), [k for k in self._retired if k.kid != kid])

    @property
    def verifier(self) -> VerificationKeys:
        """The :class:`VerificationKeys` of this set, built once."""
        if self._verifier is None:
            self._verifier = VerificationKeys(self._by_kid.values())
        return self._verifier

    def __repr__(self) -> str:
        current = ", ".join(_describe(k) for k in self._current.values())
        retired = ", ".join(_describe(k) for k in self._retired)
        return f"KeySet(current=[{current}], retired=[{retired}])"


def load_or_create(
    directory: str | os.PathLike[str], *, algorithms: Iterable[str] = DEFAULT_ALGORITHMS
) -> tuple[KeySet, bool]:
    """Load the set in *directory*, or generate and save a new one if there is none.

    Safe when several worker processes start at once: creation happens under an exclusive
    ``flock`` on ``<directory>.lock``, so every process ends up with the same keys.
    Returns ``(keyset, created)``.
    """
    import fcntl

    root = Path(directory)
    if (root / _MANIFEST).exists():
        return KeySet.load(root), False
    root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_path = root.parent / f".{root.name}.lock"
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if (root / _MANIFEST).exists():
            return KeySet.load(root), False
        keyset = KeySet.generate(algorithms)
        keyset.save(root)
        return keyset, True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_json(path: Path, strict_permissions: bool) -> dict[str, Any]:
    try:
        if strict_permissions:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise KeyStoreError(f"{path}: permissions {oct(mode & 0o777)} are too open")
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise KeyStoreError(f"{path}: cannot read ({error.strerror})") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise KeyStoreError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict):
        raise KeyStoreError(f"{path}: expected a JSON object")
    return data


def _write_private(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _b64decode(segment: str) -> bytes:
    return base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)


class VerificationKeys:
    """Public keys by ``kid``, imported once, for fast JWS signature checks.

    :meth:`verify_compact` checks a JWS compact serialization (RFC 7515 §7.1, §5.2) and
    remembers up to *cache_size* tokens whose signature verified, so a client reusing its
    token costs a dictionary look-up. The cache holds only signature results: claims
    (expiry, audience …) are for the caller to check on every request, as
    :func:`smart_on_fhir.tokens.verify_access_token` does. Safe to share across threads.

    :param keys: RSA or EC keys; private keys are reduced to their public part
    :param algorithms: the JWS ``alg`` values accepted; ``none`` and HMAC never are
    :param cache_size: tokens remembered; 0 turns the cache off
    """

    def __init__(
        self,
        keys: Iterable[SigningKey],
        *,
        algorithms: Iterable[str] = tuple(SIGNING_ALGORITHMS),
        cache_size: int = 4096,
    ) -> None:
        allowed = frozenset(algorithms)
        for name in allowed:
            _check_alg(name)
        self._keys: dict[str, tuple[SigningKey, str]] = {}
        for key in keys:
            key_alg, kid = key.alg, key.kid
            if not isinstance(key_alg, str) or not isinstance(kid, str) or key_alg not in allowed:
                continue
            public = _public(key)
            JWSRegistry.algorithms[key_alg].check_key(public)
            self._keys[kid] = (public, key_alg)
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[Mapping[str, Any], Mapping[str, Any]]] = OrderedDict()
        self._headers: dict[str, tuple[Mapping[str, Any], str, str | None]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_jwks(
        cls,
        jwks: Mapping[str, Any],
        *,
        algorithms: Iterable[str] = tuple(SIGNING_ALGORITHMS),
        cache_size: int = 4096,
    ) -> VerificationKeys:
        """Import a public (or private) JWK Set; unsupported keys are skipped."""
        keys: list[SigningKey] = []
        for index, data in enumerate(jwks.get("keys", ())):
            try:
                keys.append(_import_jwk(data, where=f"JWKS key #{index}"))
            except KeyStoreError:
                continue
        return cls(keys, algorithms=algorithms, cache_size=cache_size)

    @property
    def kids(self) -> frozenset[str]:
        """The kids of the usable keys."""
        return frozenset(self._keys)

    def _header(self, segment: str) -> tuple[Mapping[str, Any], str, str | None]:
        cached = self._headers.get(segment)
        if cached is not None:
            return cached
        try:
            header = json.loads(_b64decode(segment))
        except (ValueError, binascii.Error):
            raise InvalidToken("malformed") from None
        if not isinstance(header, dict):
            raise InvalidToken("malformed")
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str) or alg not in SIGNING_ALGORITHMS:
            raise InvalidToken("unsupported_alg")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed")
        if "crit" in header:  # RFC 7515 §4.1.11: we understand no extension
            raise InvalidToken("malformed")
        result = (MappingProxyType(header), alg, kid)
        if len(self._headers) < 1024:
            self._headers[segment] = result
        return result

    def verify_compact(self, token: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
        """Verify the signature of a JWS compact token and return ``(header, payload)``.

        Both mappings are read-only and may be shared with other callers.

        :raises InvalidToken: ``malformed``, ``unsupported_alg`` (``none``, HMAC, or an
            ``alg`` that does not fit the key), ``unknown_kid`` or ``bad_signature``
        """
        if not isinstance(token, str):
            raise InvalidToken("malformed")
        if self._cache_size:
            with self._lock:
                hit = self._cache.get(token)
                if hit is not None:
                    self._cache.move_to_end(token)
                    return hit
        if len(token) > _MAX_TOKEN_LENGTH or not token.isascii():
            raise InvalidToken("malformed")
        parts = token.split(".")
        if len(parts) != 3:
            raise InvalidToken("malformed")
        header_segment, payload_segment, signature_segment = parts
        header, alg, kid = self._header(header_segment)
        if kid is None:
            if len(self._keys) != 1:
                raise InvalidToken("unknown_kid")
            (entry,) = self._keys.values()
        else:
            found = self._keys.get(kid)
            if found is None:
                raise InvalidToken("unknown_kid")
            entry = found
        key, key_alg = entry
        if alg != key_alg:
            raise InvalidToken("unsupported_alg")
        try:
            signature = _b64decode(signature_segment)
        except (ValueError, binascii.Error):
            raise InvalidToken("malformed") from None
        signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
        if not JWSRegistry.algorithms[alg].verify(signing_input, signature, key):
            raise InvalidToken("bad_signature")
        try:
            payload = json.loads(_b64decode(payload_segment))
        except (ValueError, binascii.Error):
            raise InvalidToken("malformed") from None
        if not isinstance(payload, dict):
            raise InvalidToken("malformed")
        result: tuple[Mapping[str, Any], Mapping[str, Any]] = (header, MappingProxyType(payload))
        if self._cache_size:
            with self._lock:
                self._cache[token] = result
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return result

    def __repr__(self) -> str:
        return f"VerificationKeys(kids={sorted(self._keys)})"
