"""SMTP AUTH users: a YAML file of password hashes, checked off the event loop.

File format (`auth.users_file`)::

    users:
      - username: app
        password_hash: "$2b$12$..."            # bcrypt, or "$argon2id$..."
        allowed_sender_domains: [example.com, "*.example.com"]   # empty: any sender

bcrypt and argon2 are deliberately slow (tens to hundreds of milliseconds), so checks run
in a small dedicated thread pool: a burst of logins can neither stall SMTP sessions nor
starve the spool's fsync threads. Machine credentials (`auth.app_credentials`, generated
256-bit secrets, see `mailrelay.relay.machinehash`) are checked with one HMAC on the loop;
a cache of successful slow checks (`mailrelay.relay.authcache`) makes repeated logins of
users with slow hashes cheap.

AUTH must not tell which usernames exist. Whatever a name, the password is checked
against one real hash of the file: the user's own, or for an unknown name the hash of the
entry a keyed digest of the name picks (`UserDatabase.decoy_index`), whose result is then
thrown away. So an unknown name costs exactly what a known one of the same scheme and
parameters costs (bcrypt at any cost, argon2 with any memory, time and parallelism), a
given name always costs the same, and in a file mixing schemes unknown names spread over
them in the proportions of the real entries. A cache of verifications added later must
keep this: key it on the name as given and cache only what unknown names can reach too
(e.g. successes, which they never have), so both paths stay one path.

The file's errors never show its values (a hash, or a password pasted where a hash
belongs): see `mailrelay.relay.problems`.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import re
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import argon2
import bcrypt
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from mailrelay.relay.authcache import VerificationCache
from mailrelay.relay.config import AppCredentialConfig, AuthCacheConfig, AuthConfig, ConfigError
from mailrelay.relay.machinehash import MACHINE_PREFIX, check_machine_secret, is_machine_hash
from mailrelay.relay.problems import validation_problems, yaml_problem
from mailrelay.relay.routing import match_specificity

__all__ = ["User", "UserDatabase", "hash_password", "load_auth_users", "load_users"]

_argon = argon2.PasswordHasher()


_BCRYPT_RE = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
_ARGON_TYPES = (argon2.Type.ID, argon2.Type.I)
_HASH_HELP = (
    "must be a bcrypt hash ($2b$<cost>$ and 53 characters), an argon2id hash "
    "($argon2id$v=19$m=...,t=...,p=...$...) or a machine-credential hash "
    f"({MACHINE_PREFIX}...); docs/relay-config.md shows how to make one"
)


def hash_problem(value: str) -> str | None:
    """Why `value` is not a usable password hash, in words that never quote it."""
    match = _BCRYPT_RE.match(value)
    if match is not None:
        cost = int(match.group(1))
        return None if 4 <= cost <= 31 else f"bcrypt cost must be between 4 and 31, not {cost}"
    if value.startswith(MACHINE_PREFIX):
        if is_machine_hash(value):
            return None
        return (
            f"is not a well-formed machine-credential hash ({MACHINE_PREFIX}<salt: 22 "
            "base64url characters>$<digest: 43 base64url characters>)"
        )
    if value.startswith("$argon2"):
        try:
            params = argon2.extract_parameters(value)
        except argon2.exceptions.InvalidHashError:
            return "is not a well-formed argon2 hash; it " + _HASH_HELP
        if params.type not in _ARGON_TYPES:
            return "argon2 hashes must be argon2id (or argon2i), not argon2d"
        return None
    return _HASH_HELP


@functools.cache
def _empty_file_hash() -> str:
    """What a password is checked against when the file has no users at all."""
    return bcrypt.hashpw(secrets.token_bytes(16).hex().encode(), bcrypt.gensalt(rounds=10)).decode()


class User(BaseModel):
    """One submission user."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    username: str = Field(min_length=1)
    password_hash: str
    allowed_sender_domains: list[str] = Field(default_factory=list)

    @field_validator("password_hash")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        problem = hash_problem(value)
        if problem is not None:
            raise ValueError(problem)
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


def _duplicate_names(names: list[tuple[int, object]]) -> list[InitErrorDetails]:
    """A problem for each entry repeating an earlier entry's username."""
    first: dict[object, int] = {}
    problems = []
    for index, name in names:
        if name in first:
            message = f"username is already used by users[{first[name]}]; names must be unique"
            problems.append(
                InitErrorDetails(
                    type=PydanticCustomError("value_error", "{message}", {"message": message}),
                    loc=("users", index, "username"),
                    input=None,
                )
            )
        else:
            first[name] = index
    return problems


class _UsersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    users: list[User] = Field(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _unique(cls, data: Any, handler: ModelWrapValidatorHandler[_UsersFile]) -> _UsersFile:
        """Repeated names are reported even beside other problems (all listed at once)."""
        try:
            parsed = handler(data)
        except ValidationError as exc:
            raw = data.get("users") if isinstance(data, dict) else None
            names = [
                (i, u["username"])
                for i, u in enumerate(raw if isinstance(raw, list) else [])
                if isinstance(u, dict) and isinstance(u.get("username"), str)
            ]
            extra = _duplicate_names(names)
            if not extra:
                raise
            details: list[InitErrorDetails] = [
                InitErrorDetails(
                    type=PydanticCustomError(e["type"], "{message}", {"message": e["msg"]}),
                    loc=e["loc"],
                    input=None,
                )
                for e in exc.errors(include_input=False)
            ]
            raise ValidationError.from_exception_data(cls.__name__, details + extra) from None
        extra = _duplicate_names([(i, u.username) for i, u in enumerate(parsed.users)])
        if extra:
            raise ValidationError.from_exception_data(cls.__name__, extra)
        return parsed


def _is_fast(password_hash: str) -> bool:
    """Whether checking against this hash costs microseconds (a machine credential)."""
    return password_hash.startswith(MACHINE_PREFIX)


def _check(password_hash: str, password: bytes) -> bool:
    if _is_fast(password_hash):
        return check_machine_secret(password_hash, password)
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

    def __init__(self, users: list[User], cache: VerificationCache | None = None) -> None:
        self._users = {u.username: u for u in users}
        self._cache = cache
        # Stable order, so a given unknown name keeps its decoy across reloads of one file.
        self._hashes = [u.password_hash for u in sorted(users, key=lambda u: u.username)]
        self._decoy_key = secrets.token_bytes(32)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="auth")

    def __len__(self) -> int:
        return len(self._users)

    def decoy_index(self, username: str) -> int:
        """The entry whose hash an unknown `username` is checked against (keyed, stable)."""
        digest = hmac.new(self._decoy_key, username.encode("utf-8", "surrogatepass"), "sha256")
        return int.from_bytes(digest.digest()[:8], "big") % max(1, len(self._hashes))

    def _hash_to_check(self, username: str) -> tuple[User | None, str]:
        """The user (None if unknown) and the hash the password is checked against."""
        decoy = self.decoy_index(username)  # computed for every name: one path for both
        user = self._users.get(username)
        if user is not None:
            return user, user.password_hash
        return None, self._hashes[decoy] if self._hashes else _empty_file_hash()

    @property
    def cache(self) -> VerificationCache | None:
        """The verification cache (None when disabled); dropped with this database."""
        return self._cache

    async def verify(
        self, username: str, password: bytes, checked_by: Callable[[str], None] | None = None
    ) -> User | None:
        """The user if the password matches, else None (slow checks in a worker thread).

        With the cache, a pair that verified recently is answered from it. Every other
        login, whether the name is known or not, takes the same path as without a cache:
        the cache holds successes only, which an unknown name or a wrong password never has.
        ``checked_by`` hears which check answered: ``cache``, ``app_credential`` (a fast
        keyed hash) or ``password_hash`` (bcrypt or argon2), for the metrics.
        """
        note = checked_by or (lambda _method: None)
        digest = None if self._cache is None else self._cache.digest(username, password)
        if digest is not None and self._cache is not None:
            cached = self._cache.lookup(digest)
            if cached is not None:
                hit = self._users.get(cached)
                if hit is not None:
                    note("cache")
                    return hit
        user, stored = self._hash_to_check(username)
        if _is_fast(stored):
            # A machine credential: one HMAC, cheaper than a trip to a thread. Whether this
            # branch runs depends on the hash checked, so an unknown name whose decoy is a
            # machine entry takes it too, and costs what a known machine user costs.
            note("app_credential")
            return user if _check(stored, password) and user is not None else None
        note("password_hash")
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._pool, _check, stored, password)
        if user is None or not ok:
            return None
        if digest is not None and self._cache is not None:
            self._cache.store(digest, user.username)
        return user

    def close(self) -> None:
        """Stop the worker threads (after a reload replaced this database)."""
        self._pool.shutdown(wait=False)


def _cache_for(settings: AuthCacheConfig | None) -> VerificationCache | None:
    if settings is None or not settings.enabled:
        return None
    return VerificationCache(ttl=settings.ttl_seconds, max_entries=settings.max_entries)


def _read_app_credentials(apps: list[AppCredentialConfig]) -> tuple[list[User], list[str]]:
    """The machine users of the config, and the problems of their hash files."""
    users: list[User] = []
    problems: list[str] = []
    for index, app in enumerate(apps):
        where = f"auth.app_credentials[{index}] ({app.username}): {app.password_hash_file}"
        try:
            value = app.password_hash_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            problems.append(f"{where}: cannot read the hash file: {exc.strerror}")
            continue
        except UnicodeDecodeError:
            problems.append(f"{where}: the hash file is not UTF-8 text")
            continue
        if not is_machine_hash(value):
            problems.append(
                f"{where}: must hold a machine-credential hash ({MACHINE_PREFIX}...), as the "
                "operator generates"
            )
            continue
        users.append(
            User(
                username=app.username,
                password_hash=value,
                allowed_sender_domains=app.allowed_sender_domains,
            )
        )
    return users, problems


def load_users(
    path: Path | None,
    cache: AuthCacheConfig | None = None,
    apps: list[AppCredentialConfig] | None = None,
) -> UserDatabase:
    """Read the users file and the app credentials; no users at all means AUTH always fails.

    `cache` configures a fresh verification cache for the new database: every load, and so
    every reload, starts with an empty one.
    """
    machine, machine_problems = _read_app_credentials(apps or [])
    if machine_problems:
        lines = [f"invalid app credentials ({len(machine_problems)} problem(s)):"]
        raise ConfigError("\n".join(lines + [f"  - {p}" for p in machine_problems]))
    if path is None:
        return UserDatabase(machine, _cache_for(cache))
    # Errors are raised outside the `except` blocks: a chained exception (even one a
    # traceback would not print) could quote the file's content.
    problem: str | None = None
    text = ""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problem = f"cannot read the users file: {exc.strerror}"
    except UnicodeDecodeError:
        problem = "the users file is not UTF-8 text"
    if problem is not None:
        raise ConfigError(f"{path}: {problem}")
    data: object = None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        problem = f"the users file is not valid YAML: {yaml_problem(exc)}"
    if problem is not None:
        raise ConfigError(f"{path}: {problem}")
    problems: list[str] = []
    try:
        parsed = _UsersFile.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc, data)
    if problems:
        lines = [f"{path}: invalid users file ({len(problems)} problem(s)):"]
        raise ConfigError("\n".join(lines + [f"  - {p}" for p in problems]))
    names = {u.username for u in parsed.users}
    clashes = sorted(u.username for u in machine if u.username in names)
    if clashes:
        raise ConfigError(
            f"{path}: users {', '.join(clashes)} are also app credentials "
            "(auth.app_credentials); rename one of each pair"
        )
    return UserDatabase([*parsed.users, *machine], _cache_for(cache))


def load_auth_users(auth: AuthConfig) -> UserDatabase:
    """The users of an `auth` config section: its users file, app credentials and cache."""
    return load_users(auth.users_file, auth.cache, auth.app_credentials)
