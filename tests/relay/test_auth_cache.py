"""The AUTH verification cache: repeated logins skip bcrypt, failures never get cached,
entries expire and are bounded, a reload empties it, and AUTH timing stays equal for
unknown names and wrong passwords while the cache is warm for other users."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import bcrypt
import pytest
import yaml

from mailrelay.relay.auth import UserDatabase, load_users
from mailrelay.relay.authcache import VerificationCache
from mailrelay.relay.config import AuthCacheConfig

from .conftest import USERS, RelayFactory


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _bcrypt(password: str, rounds: int = 4) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()


def _users_file(tmp_path: Path, users: dict[str, str], name: str = "users.yaml") -> Path:
    path = tmp_path / name
    entries = [{"username": u, "password_hash": h} for u, h in users.items()]
    path.write_text(yaml.safe_dump({"users": entries}))
    return path


# -- the cache on its own ---------------------------------------------------------------


def test_a_stored_pair_hits_and_any_other_pair_misses() -> None:
    cache = VerificationCache(ttl=60, max_entries=10)
    cache.store(cache.digest("app", b"secret"), "app")
    assert cache.lookup(cache.digest("app", b"secret")) == "app"
    assert cache.lookup(cache.digest("app", b"secreT")) is None
    assert cache.lookup(cache.digest("other", b"secret")) is None
    # The name/password boundary is part of the key: ("ap", "psecret") is another pair.
    assert cache.lookup(cache.digest("ap", b"psecret")) is None
    assert (cache.hits, cache.misses) == (1, 3)


def test_the_key_is_per_cache_and_never_holds_the_password() -> None:
    one, two = VerificationCache(ttl=60, max_entries=10), VerificationCache(ttl=60, max_entries=10)
    digest = one.digest("app", b"secret-password")
    assert digest != two.digest("app", b"secret-password")
    assert len(digest) == 32 and b"secret-password" not in digest
    one.store(digest, "app")
    assert b"secret-password" not in repr(one).encode()
    assert all(b"secret" not in key for key in one._entries)


def test_entries_expire_after_the_ttl_and_hits_do_not_extend_them() -> None:
    clock = FakeClock()
    cache = VerificationCache(ttl=30, max_entries=10, clock=clock)
    digest = cache.digest("app", b"pw")
    cache.store(digest, "app")
    clock.now += 29
    assert cache.lookup(digest) == "app"
    clock.now += 1
    assert cache.lookup(digest) is None
    assert len(cache) == 0  # an expired entry is dropped, not kept around


def test_size_is_bounded_and_the_least_recently_used_goes_first() -> None:
    cache = VerificationCache(ttl=60, max_entries=3)
    digests = [cache.digest(f"user{i}", b"pw") for i in range(4)]
    for i, digest in enumerate(digests[:3]):
        cache.store(digest, f"user{i}")
    assert cache.lookup(digests[0]) == "user0"  # user0 is now the most recent
    cache.store(digests[3], "user3")
    assert len(cache) == 3
    assert cache.lookup(digests[1]) is None  # the least recently used went
    assert [cache.lookup(d) for d in (digests[0], digests[2], digests[3])] == [
        "user0",
        "user2",
        "user3",
    ]


# -- the cache behind UserDatabase ------------------------------------------------------


def _db(tmp_path: Path, users: dict[str, str], **cache: object) -> UserDatabase:
    settings = AuthCacheConfig.model_validate(cache)
    return load_users(_users_file(tmp_path, users), settings)


async def test_a_repeated_login_is_answered_from_the_cache(tmp_path: Path) -> None:
    db = _db(tmp_path, {"app": _bcrypt("right")})
    try:
        assert db.cache is not None
        first = await db.verify("app", b"right")
        assert first is not None and first.username == "app"
        assert (db.cache.hits, len(db.cache)) == (0, 1)
        # A hit never reaches the slow check: it works even with the worker threads gone.
        db.close()
        again = await db.verify("app", b"right")
        assert again is first
        assert db.cache.hits == 1
    finally:
        db.close()


async def test_wrong_passwords_and_unknown_names_are_never_cached(tmp_path: Path) -> None:
    db = _db(tmp_path, {"app": _bcrypt("right"), "ops": _bcrypt("ops-pw")})
    try:
        assert db.cache is not None
        for _ in range(3):
            assert await db.verify("app", b"wrong") is None
            # An unknown name is checked against a real entry's hash, maybe app's: even
            # app's own password must neither log it in nor leave an entry behind.
            assert await db.verify("intruder", b"right") is None
            assert await db.verify("intruder", b"ops-pw") is None
        assert len(db.cache) == 0 and db.cache.hits == 0
        assert await db.verify("app", b"right") is not None
        assert len(db.cache) == 1
        # With app's pair cached, a wrong password is still a miss and still fails.
        assert await db.verify("app", b"wrong") is None
        assert await db.verify("app", b"righ") is None
        assert db.cache.hits == 0
    finally:
        db.close()


async def test_a_disabled_cache_checks_every_login(tmp_path: Path) -> None:
    db = _db(tmp_path, {"app": _bcrypt("right")}, enabled=False)
    try:
        assert db.cache is None
        assert await db.verify("app", b"right") is not None
        db.close()
        with pytest.raises(RuntimeError):  # the slow check ran again: no cache answered
            await db.verify("app", b"right")
    finally:
        db.close()


async def test_a_new_database_starts_empty(tmp_path: Path) -> None:
    """What a reload does: the cache lives and dies with its UserDatabase."""
    path = _users_file(tmp_path, {"app": _bcrypt("right")})
    old = load_users(path, AuthCacheConfig())
    new = load_users(path, AuthCacheConfig())
    try:
        assert await old.verify("app", b"right") is not None
        assert old.cache is not None and new.cache is not None
        assert len(old.cache) == 1 and len(new.cache) == 0
    finally:
        old.close()
        new.close()


# -- timing: unknown names and wrong passwords, with the cache warm for others -----------


async def _timed(db: UserDatabase, username: str, password: bytes) -> tuple[float, bool]:
    started = time.perf_counter()
    ok = await db.verify(username, password) is not None
    return time.perf_counter() - started, ok


async def test_unknown_names_cost_what_wrong_passwords_cost_with_a_warm_cache(
    tmp_path: Path,
) -> None:
    """With app and ops logged in (cached), a wrong password for either and any unknown
    name all go to a bcrypt check of the same cost; only the right pair is fast."""
    users = {name: _bcrypt(f"{name}-pw", rounds=8) for name in ("app", "ops", "web")}
    db = _db(tmp_path, users)
    try:
        for name in ("app", "ops"):
            assert (await _timed(db, name, f"{name}-pw".encode()))[1]
        wrong: list[float] = []
        unknown: list[float] = []
        hits: list[float] = []
        for i in range(15):
            pair = [
                (f"{('app', 'ops', 'web')[i % 3]}", b"wrong-password", wrong),
                (f"nobody-{i}", b"app-pw", unknown),
            ]
            for name, password, samples in pair if i % 2 else reversed(pair):
                elapsed, ok = await _timed(db, name, password)
                assert not ok
                samples.append(elapsed)
            elapsed, ok = await _timed(db, "app", b"app-pw")
            assert ok
            hits.append(elapsed)
    finally:
        db.close()
    ratio = statistics.median(unknown) / statistics.median(wrong)
    assert 0.67 < ratio < 1.5, (
        f"unknown {statistics.median(unknown) * 1000:.1f} ms vs wrong password "
        f"{statistics.median(wrong) * 1000:.1f} ms"
    )
    # And the cache does its job: a hit is far cheaper than a bcrypt-8 check.
    assert statistics.median(hits) < statistics.median(wrong) / 5


# -- over SMTP, with hot reload ---------------------------------------------------------


async def test_logins_over_smtp_hit_the_cache_and_a_reload_empties_it(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    users_path = _users_file(tmp_path, {"alice": _bcrypt(USERS["alice"])}, "live-users.yaml")
    relay = await relay_factory(auth={"users_file": str(users_path), "cache": {"ttl_seconds": 60}})
    assert relay.app is not None and relay.app.front is not None

    def cache() -> VerificationCache:
        assert relay.app is not None and relay.app.front is not None
        current = relay.app.front.settings.users.cache
        assert current is not None
        return current

    for _ in range(3):
        async with relay.client(login=("alice", USERS["alice"])):
            pass
    assert (cache().hits, len(cache())) == (2, 1)
    verifications = "mailrelay_smtp_auth_verifications_total"
    assert relay.metric(verifications, {"method": "cache"}) == 2
    assert relay.metric(verifications, {"method": "password_hash"}) == 1
    assert relay.metric("mailrelay_smtp_auth_cache_entries") == 1

    # A new password in the users file: the reload empties the cache, so the old password
    # stops working at once although it was cached.
    before = relay.metric("mailrelay_config_reloads_total", {"result": "success"})
    tmp = users_path.with_suffix(".tmp")
    tmp.write_text(
        yaml.safe_dump({"users": [{"username": "alice", "password_hash": _bcrypt("new-pw")}]})
    )
    tmp.replace(users_path)
    for _ in range(200):
        if relay.metric("mailrelay_config_reloads_total", {"result": "success"}) > before:
            break
        await asyncio.sleep(0.05)
    assert len(cache()) == 0
    with pytest.raises(Exception, match="535"):
        async with relay.client(login=("alice", USERS["alice"])):
            pass
    async with relay.client(login=("alice", "new-pw")):
        pass
    assert (cache().hits, len(cache())) == (0, 1)
