"""Ed25519 keys as settings and development key files hold them: PEM text. Access tokens
(auth.py) and the seals of the event history (history_seals.py) are signed with them; a
public key is all a checker needs, and it cannot sign."""

from __future__ import annotations

import re

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_PEM_PUBLIC_KEY = re.compile(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


def new_private_pem() -> bytes:
    """A new private key, as PEM (PKCS#8): what `openssl genpkey -algorithm ed25519` writes."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def load_private_key(pem: str | bytes, what: str) -> Ed25519PrivateKey:
    """The private key of a PEM text; `what` names the key in the error."""
    try:
        key = serialization.load_pem_private_key(pem.encode() if isinstance(pem, str) else pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{what} must be the PEM of an Ed25519 private key (openssl genpkey -algorithm ed25519)")
    return key


def load_public_keys(pem_text: str, what: str, keys_max: int) -> tuple[Ed25519PublicKey, ...]:
    """The public keys of a text of 1 to `keys_max` PEM blocks, one after the other."""
    blocks = _PEM_PUBLIC_KEY.findall(pem_text)
    if not 1 <= len(blocks) <= keys_max:
        raise ValueError(f"give 1 to {keys_max} PEM public keys {what}")
    try:
        keys = tuple(serialization.load_pem_public_key(block.encode()) for block in blocks)
    except (ValueError, UnsupportedAlgorithm):
        keys = ()
    if not keys or not all(isinstance(key, Ed25519PublicKey) for key in keys):
        raise ValueError(f"the keys {what} must be Ed25519 public keys")
    return keys


def public_pem(key: Ed25519PrivateKey) -> str:
    """The PEM of a private key's public key: what a checker is given."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
