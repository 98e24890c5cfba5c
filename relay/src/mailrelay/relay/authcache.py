"""A cache of successful AUTH verifications, in the spirit of Dovecot's ``auth_cache``.

bcrypt and argon2 cost tens to hundreds of milliseconds of CPU per check, by design; apps
that open one SMTP session per message would pay that on every login. After a password
verified against the users file, this cache keeps a keyed digest of the pair (username,
password) for a bounded time and in a bounded number of entries; a later login with the
same pair then costs one HMAC-SHA256 and a dictionary lookup.

What is kept, and what is not:

* The key is HMAC-SHA256 of the length-prefixed username and password under a random key
  made per process (never written anywhere, lost on restart). The password is never
  stored, and the digest is useless without the key: it cannot be checked offline.
* Only successes are stored. A wrong password, or any password for an unknown name, never
  gets an entry, so every failure goes to the slow verification against a real hash, as
  before (``mailrelay.relay.auth``): a known name with a wrong password and an unknown name
  still cost the same, warm cache or not. The one thing that becomes fast is the right
  password for a name that logged in recently, which tells a caller only what the 235
  reply tells it anyway.
* Entries are looked up by the digest itself, so finding one requires the right password;
  a name alone never matches, and the lookup time of a miss does not depend on which
  names are cached.
* Entries expire ``ttl`` seconds after they were stored (a hit does not extend them), the
  least recently used goes when the cache is full, and the whole cache is dropped with its
  ``UserDatabase`` when the users file (or anything in the config) is reloaded: a removed
  user or a changed password stops working at the reload, as without a cache.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["VerificationCache"]


def _encode(username: str, password: bytes) -> bytes:
    """Username and password as one unambiguous byte string (length-prefixed name)."""
    name = username.encode("utf-8", "surrogatepass")
    return len(name).to_bytes(4, "big") + name + password


@dataclass
class VerificationCache:
    """Keyed digests of recently verified (username, password) pairs; bounded in time and size."""

    ttl: float
    max_entries: int
    clock: Callable[[], float] = time.monotonic
    hits: int = 0
    misses: int = 0
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    # digest -> (username, expiry); insertion/use order is the LRU order.
    _entries: OrderedDict[bytes, tuple[str, float]] = field(default_factory=OrderedDict, repr=False)

    def __len__(self) -> int:
        return len(self._entries)

    def digest(self, username: str, password: bytes) -> bytes:
        """The cache key of a pair (computed for every login, hit or miss)."""
        return hmac.new(self._key, _encode(username, password), hashlib.sha256).digest()

    def lookup(self, digest: bytes) -> str | None:
        """The username stored under `digest` if it is there and fresh, else None."""
        entry = self._entries.get(digest)
        if entry is None:
            self.misses += 1
            return None
        username, expiry = entry
        if self.clock() >= expiry:
            del self._entries[digest]
            self.misses += 1
            return None
        self._entries.move_to_end(digest)
        self.hits += 1
        return username

    def store(self, digest: bytes, username: str) -> None:
        """Remember a pair that just verified against the users file."""
        if self.max_entries <= 0:
            return
        self._entries[digest] = (username, self.clock() + self.ttl)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
