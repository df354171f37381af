"""Ed25519 keys for signing bundles (through `cryptography`): the operator
keeps the private key; each board trusts the public keys in a folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import EdgeSlmError

PRIVATE_FILE, PUBLIC_FILE = "fleet.key", "fleet.pub"
MAX_KEY_FILE = 4096  # bytes: a PEM key is a few hundred


class KeyFileError(EdgeSlmError):
    """A key file that is missing, unreadable or not an Ed25519 key."""


def key_id(public_raw: bytes) -> str:
    """A short name for a public key, carried in manifests: which key signed."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def generate(out: Path) -> tuple[Path, Path]:
    """A new key pair in `out`: the private key readable by its owner only.
    An existing key is never overwritten."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out.mkdir(parents=True, exist_ok=True)
    private, public = out / PRIVATE_FILE, out / PUBLIC_FILE
    for path in (private, public):
        if os.path.lexists(path):
            raise KeyFileError(f"{path}: already exists; keys are never overwritten")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _read(path: Path) -> bytes:
    try:
        if not path.is_file():
            raise KeyFileError(f"{path}: no such key file")
        data = path.read_bytes()[:MAX_KEY_FILE + 1]
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{path}: too large for a key file")
    return data


def load_private(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not a private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def load_public(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(_read(path))
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not a public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def raw_public(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def trusted_keys(folder: Path) -> dict[str, object]:
    """The public keys a board trusts: every *.pub file in `folder`, by key id."""
    if not folder.is_dir():
        raise KeyFileError(f"{folder}: no folder of trusted keys")
    keys = {}
    for path in sorted(folder.glob("*.pub")):
        key = load_public(path)
        keys[key_id(raw_public(key))] = key
    if not keys:
        raise KeyFileError(f"{folder}: holds no public key (*.pub)")
    return keys
