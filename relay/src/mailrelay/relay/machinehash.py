"""Machine credentials: generated 256-bit secrets, stored as a salted HMAC-SHA256.

A password a person chose needs a slow hash (bcrypt, argon2) because it can be guessed; a
secret of 256 random bits cannot, offline or online, so a fast hash protects it as well
as a slow one would and costs microseconds instead of a bcrypt check's hundreds of
milliseconds per login. The operator generates such secrets for the apps a MailRelay
lists (``spec.auth.appCredentials``); this module is the one definition of the format,
used by the relay to verify and by the operator to render::

    $mailrelay-hmac-sha256$<salt: 16 bytes, base64url>$<HMAC-SHA256(salt, secret), base64url>

(base64url without padding). Verification compares digests in constant time. The scheme
is only safe for generated secrets: ``new_machine_secret`` makes them, and nothing here
hashes a human-chosen password this way.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

__all__ = [
    "MACHINE_PREFIX",
    "check_machine_secret",
    "hash_machine_secret",
    "is_machine_hash",
    "new_machine_secret",
]

MACHINE_PREFIX = "$mailrelay-hmac-sha256$"
_MACHINE_RE = re.compile(r"^\$mailrelay-hmac-sha256\$([A-Za-z0-9_-]{22})\$([A-Za-z0-9_-]{43})$")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_machine_secret() -> str:
    """A fresh app password: 256 random bits, 43 URL-safe characters."""
    return secrets.token_urlsafe(32)


def hash_machine_secret(secret: str, salt: bytes | None = None) -> str:
    """The users-file entry for a generated `secret` (a random salt unless given)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hmac.new(salt, secret.encode(), hashlib.sha256).digest()
    return f"{MACHINE_PREFIX}{_b64(salt)}${_b64(digest)}"


def is_machine_hash(value: str) -> bool:
    """Whether `value` is a well-formed machine-credential hash."""
    return _MACHINE_RE.match(value) is not None


def check_machine_secret(stored: str, password: bytes) -> bool:
    """Whether `password` matches `stored`, compared in constant time."""
    match = _MACHINE_RE.match(stored)
    if match is None:
        return False
    salt, expected = _unb64(match.group(1)), _unb64(match.group(2))
    return hmac.compare_digest(hmac.new(salt, password, hashlib.sha256).digest(), expected)
