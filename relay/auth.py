"""SMTP AUTH users: a YAML file of password hashes, checked off the event loop.

File format (`auth.users_file`)::

    users:
      - username: app
        password_hash: "$2b$12$..."            # bcrypt, or "$argon2id$..."
        allowed_sender_domains: [example.com, "*.example.com"]   # empty: any sender

bcrypt and argon2 are deliberately slow (tens to hundreds of milliseconds), so checks run
in a small dedicated thread pool: a burst of logins can neither stall SMTP sessions nor
starve the spool's fsync threads. An unknown user is checked against a dummy hash so the
answer takes as long as for a wrong password.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import argon2
import bcrypt
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mailrelay.relay.config import ConfigError
from mailrelay.relay.routing import match_specificity

__all__ = ["User", "UserDatabase", "hash_password", "load_users"]

_argon = argon2.PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """A hash to check unknown users against, so they take as long as wrong passwords."""
    return bcrypt.hashpw(b"not-a-password", bcrypt.gensalt(rounds=10)).decode()


class User(BaseModel):
    """One submission user."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    username: str = Field(min_length=1)
    password_hash: str
    allowed_sender_domains: list[str] = Field(default_factory=list)

    @field_validator("password_hash")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("$2a$", "$2b$", "$2y$", "$argon2id$", "$argon2i$")):
            raise ValueError("password_hash must be a bcrypt ($2b$) or argon2 ($argon2id$) hash")
        return value

    @field_validator("allowed_sender_domains")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [v.strip().lower() for v in value]

    def may_send_as(self, sender_domain: str) -> bool:
        """Whether this user may use an envelope sender in `sender_domain`."""
        if not self.allowed_sender_domains:
            return True
        if not sender_domain:
            return False  # a null sender from a restricted user would dodge the check
        return match_specificity(self.allowed_sender_domains, sender_domain) is not None


class _UsersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    users: list[User] = Field(default_factory=list)


def _check(password_hash: str | None, password: bytes) -> bool:
    if password_hash is None:  # unknown user: same work, always False
        bcrypt.checkpw(password, _dummy_hash().encode())
        return False
    if password_hash.startswith("$argon2"):
        try:
            return bool(_argon.verify(password_hash, password))
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    try:
        return bcrypt.checkpw(password, password_hash.encode())
    except ValueError:
        return False


def hash_password(password: str, scheme: str = "bcrypt") -> str:
    """A hash for the users file (tests and the docs' example use it)."""
    if scheme == "argon2":
        return _argon.hash(password)
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()


class UserDatabase:
    """Users by name, with a password check that never blocks the event loop."""

    def __init__(self, users: list[User]) -> None:
        self._users = {u.username: u for u in users}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="auth")

    def __len__(self) -> int:
        return len(self._users)

    async def verify(self, username: str, password: bytes) -> User | None:
        """The user if the password matches, else None (in a worker thread)."""
        user = self._users.get(username)
        stored = user.password_hash if user is not None else None
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._pool, _check, stored, password)
        if user is None or not ok:
            return None
        # Compare names in constant time too; cheap, and keeps the two paths alike.
        return user if hmac.compare_digest(user.username, username) else None

    def close(self) -> None:
        """Stop the worker threads (after a reload replaced this database)."""
        self._pool.shutdown(wait=False)


def load_users(path: Path | None) -> UserDatabase:
    """Read the users file; no file means no users (AUTH then always fails)."""
    if path is None:
        return UserDatabase([])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        parsed = _UsersFile.model_validate(data)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the users file: {exc.strerror}") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"{path}: invalid users file: {exc}") from exc
    names = [u.username for u in parsed.users]
    if len(names) != len(set(names)):
        raise ConfigError(f"{path}: usernames must be unique")
    return UserDatabase(parsed.users)
