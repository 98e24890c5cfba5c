"""Machine credentials: generated 256-bit secrets behind a fast keyed hash, alongside
bcrypt/argon2 users, with AUTH timing still equal for unknown names in a mixed file."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import aiosmtplib
import bcrypt
import pytest
import yaml

from mailrelay.relay.auth import UserDatabase, load_users
from mailrelay.relay.config import AppCredentialConfig, AuthCacheConfig, ConfigError
from mailrelay.relay.machinehash import (
    MACHINE_PREFIX,
    check_machine_secret,
    hash_machine_secret,
    is_machine_hash,
    new_machine_secret,
)

from .conftest import RelayFactory


def test_a_generated_secret_has_256_bits_and_verifies_only_itself() -> None:
    secret = new_machine_secret()
    assert len(secret) == 43 and secret != new_machine_secret()
    stored = hash_machine_secret(secret)
    assert is_machine_hash(stored) and stored.startswith(MACHINE_PREFIX)
    assert secret not in stored
    assert check_machine_secret(stored, secret.encode())
    assert not check_machine_secret(stored, secret[:-1].encode())
    assert not check_machine_secret(stored, (secret + "x").encode())
    assert not check_machine_secret(stored, b"")
    # Salted: the same secret hashes differently each time, and each verifies.
    again = hash_machine_secret(secret)
    assert again != stored and check_machine_secret(again, secret.encode())


@pytest.mark.parametrize(
    "bad",
    [
        "$mailrelay-hmac-sha256$short$short",
        MACHINE_PREFIX + "A" * 22 + "$" + "B" * 42,
        MACHINE_PREFIX + "A" * 22 + "$" + "B" * 43 + "=",
    ],
)
def test_a_malformed_machine_hash_is_refused_without_quoting_it(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(yaml.safe_dump({"users": [{"username": "app", "password_hash": bad}]}))
    with pytest.raises(ConfigError, match="machine-credential hash") as info:
        load_users(path)
    assert bad not in str(info.value)
    assert not check_machine_secret(bad, b"anything")


def _app(
    tmp_path: Path, name: str, secret: str, domains: list[str] | None = None
) -> dict[str, object]:
    hash_file = tmp_path / f"{name}.hash"
    hash_file.write_text(hash_machine_secret(secret) + "\n")  # as a mounted Secret key may end
    return {
        "username": name,
        "password_hash_file": str(hash_file),
        "allowed_sender_domains": domains or [],
    }


def _apps(*entries: dict[str, object]) -> list[AppCredentialConfig]:
    return [AppCredentialConfig.model_validate(e) for e in entries]


async def test_app_credentials_log_in_beside_the_users_file(tmp_path: Path) -> None:
    users = tmp_path / "users.yaml"
    human = bcrypt.hashpw(b"human-pw", bcrypt.gensalt(rounds=4)).decode()
    users.write_text(yaml.safe_dump({"users": [{"username": "alice", "password_hash": human}]}))
    secret = new_machine_secret()
    apps = _apps(_app(tmp_path, "billing", secret, ["billing.example.com"]))
    db = load_users(users, AuthCacheConfig(), apps)
    try:
        assert len(db) == 2
        user = await db.verify("billing", secret.encode())
        assert user is not None and user.allowed_sender_domains == ["billing.example.com"]
        assert await db.verify("billing", b"human-pw") is None
        assert await db.verify("alice", secret.encode()) is None
        assert await db.verify("alice", b"human-pw") is not None
        methods: list[str] = []
        assert await db.verify("billing", secret.encode(), methods.append) is not None
        assert await db.verify("alice", b"human-pw", methods.append) is not None
        assert await db.verify("alice", b"wrong", methods.append) is None
        assert methods == ["app_credential", "cache", "password_hash"]
        # Machine checks never go to the worker threads (nor to the cache): they still
        # work with the threads gone.
        db.close()
        assert await db.verify("billing", secret.encode()) is not None
        assert await db.verify("billing", b"wrong") is None
        assert db.cache is not None and len(db.cache) == 1  # alice only
    finally:
        db.close()


def test_app_credential_problems_are_reported_without_values(tmp_path: Path) -> None:
    plain = tmp_path / "plain.hash"
    plain.write_text("not-a-hash-but-a-password")
    bcrypt_file = tmp_path / "bcrypt.hash"
    bcrypt_file.write_text(bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode())
    apps = _apps(
        {"username": "a", "password_hash_file": str(plain)},
        {"username": "b", "password_hash_file": str(bcrypt_file)},
        {"username": "c", "password_hash_file": str(tmp_path / "missing")},
    )
    with pytest.raises(ConfigError) as info:
        load_users(None, apps=apps)
    text = str(info.value)
    assert "3 problem(s)" in text and "cannot read the hash file" in text
    assert "not-a-hash-but-a-password" not in text and "$2b$" not in text


def test_an_app_named_like_a_user_is_refused(tmp_path: Path) -> None:
    users = tmp_path / "users.yaml"
    human = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    users.write_text(yaml.safe_dump({"users": [{"username": "billing", "password_hash": human}]}))
    apps = _apps(_app(tmp_path, "billing", new_machine_secret()))
    with pytest.raises(ConfigError, match="billing are also app credentials"):
        load_users(users, apps=apps)


# -- timing in a file that mixes fast and slow entries ----------------------------------


async def _timed(db: UserDatabase, username: str, password: bytes) -> float:
    started = time.perf_counter()
    assert await db.verify(username, password) is None
    return time.perf_counter() - started


def _unknown_names(db: UserDatabase, index: int, count: int) -> list[str]:
    names = (f"nobody-{i}" for i in range(100_000))
    return [n for n in names if db.decoy_index(n) == index][:count]


async def test_unknown_names_cost_what_the_entry_they_land_on_costs(tmp_path: Path) -> None:
    """bcrypt user "a", machine user "b": an unknown name costs a bcrypt check when its
    decoy is "a" and a fast check when it is "b", each equal to that user's wrong password."""
    users = tmp_path / "users.yaml"
    slow = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=8)).decode()
    users.write_text(yaml.safe_dump({"users": [{"username": "a", "password_hash": slow}]}))
    db = load_users(users, apps=_apps(_app(tmp_path, "b", new_machine_secret())))
    try:
        await _timed(db, "a", b"warm-up")
        for user, index in (("a", 0), ("b", 1)):
            known: list[float] = []
            unknown: list[float] = []
            samples = 15 if user == "a" else 300
            for i, name in enumerate(_unknown_names(db, index, samples)):
                pair = [(user, known), (name, unknown)]
                for who, into in pair if i % 2 else reversed(pair):
                    into.append(await _timed(db, who, b"wrong-password"))
            ratio = statistics.median(unknown) / statistics.median(known)
            # The fast path is microseconds: a wider band, as scheduler noise dominates.
            band = (0.67, 1.5) if user == "a" else (0.5, 2.0)
            assert band[0] < ratio < band[1], (
                f"{user}: unknown {statistics.median(unknown) * 1e6:.0f} us vs wrong "
                f"password {statistics.median(known) * 1e6:.0f} us"
            )
            if user == "b":
                # ...and fast: no bcrypt, no thread hop.
                assert statistics.median(known) < 0.002
    finally:
        db.close()


# -- over SMTP ------------------------------------------------------------------------


async def test_an_app_logs_in_over_smtp_and_a_rotated_secret_replaces_the_old(
    tmp_path: Path, relay_factory: RelayFactory
) -> None:
    secret = new_machine_secret()
    app = _app(tmp_path, "billing", secret, ["billing.example.com"])
    relay = await relay_factory(auth={"app_credentials": [app]})
    async with relay.client(login=("billing", secret)) as smtp:
        code, _ = await smtp.mail("invoices@billing.example.com")
        assert code == 250
        await smtp.rset()
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await smtp.mail("ceo@example.com")
        assert refused.value.code == 553

    before = relay.metric("mailrelay_config_reloads_total", {"result": "success"})
    rotated = new_machine_secret()
    hash_file = Path(str(app["password_hash_file"]))
    tmp = hash_file.with_suffix(".tmp")
    tmp.write_text(hash_machine_secret(rotated))
    tmp.replace(hash_file)
    for _ in range(200):
        if relay.metric("mailrelay_config_reloads_total", {"result": "success"}) > before:
            break
        await asyncio.sleep(0.05)
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        async with relay.client(login=("billing", secret)):
            pass
    async with relay.client(login=("billing", rotated)):
        pass
