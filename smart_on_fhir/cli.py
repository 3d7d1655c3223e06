"""Helpers behind the host application's admin commands (``fhir-consent keys|users|clients|
launch``): argument parsing and printable summaries. No command-line parsing happens here;
nothing here prints secrets except :func:`client_summary`, whose output is the one moment a
generated client secret is shown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .clients import NewClient
from .errors import KeyStoreError
from .keys import DEFAULT_ALGORITHMS, KeySet
from .launches import LaunchContext, launch_url

__all__ = [
    "client_summary",
    "init_keys",
    "launch_summary",
    "read_jwks_argument",
    "rotate_keys",
]


def read_jwks_argument(value: str) -> dict[str, Any]:
    """A public JWK Set given inline as JSON or as the path of a JSON file."""
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"cannot read the JWKS file {value}: {error.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("the JWKS is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError("a JWKS is a JSON object with a 'keys' array")
    return data


def init_keys(directory: str | Path, *, force: bool = False) -> KeySet:
    """Create the signing keys (RS256 for tokens and id_tokens, ES384) in *directory*.

    :raises KeyStoreError: when keys exist already and *force* is false
    """
    root = Path(directory)
    if (root / "keyset.json").exists() and not force:
        raise KeyStoreError(f"{root} already holds a key set (use rotate, or --force)")
    keyset = KeySet.generate(DEFAULT_ALGORITHMS)
    keyset.save(root)
    return keyset


def rotate_keys(directory: str | Path, alg: str = "RS256") -> KeySet:
    """Make a new current *alg* key; the old one stays for verification (RFC 7517 ``kid``)."""
    keyset = KeySet.load(directory).rotate(alg)
    keyset.save(directory)
    return keyset


def client_summary(created: NewClient) -> dict[str, Any]:
    """What to tell the administrator about a new client (the secret, once)."""
    client = created.client
    out: dict[str, Any] = {
        "client_id": client.client_id,
        "client_name": client.client_name,
        "client_type": client.client_type,
        "token_endpoint_auth_method": client.token_endpoint_auth_method,
        "grant_types": list(client.grant_types),
        "redirect_uris": list(client.redirect_uris),
        "scope": client.scope,
    }
    if client.organization:
        out["organization"] = client.organization
    if client.jwks_uri:
        out["jwks_uri"] = client.jwks_uri
    if created.client_secret is not None:
        out["client_secret"] = created.client_secret
    return out


def launch_summary(context: LaunchContext, *, iss: str, launch_uri: str | None) -> dict[str, Any]:
    """The launch id, and the URL to open when the app's launch URI is known."""
    out: dict[str, Any] = {"launch": context.id, "iss": iss, "expires_at": context.expires_at}
    if context.patient:
        out["patient"] = context.patient
    if context.encounter:
        out["encounter"] = context.encounter
    if launch_uri:
        out["url"] = launch_url(launch_uri, iss=iss, launch=context.id)
    return out
