"""AUTH does not tell which usernames exist: unknown names cost what wrong passwords cost.

The timing tests compare distributions, not absolute times: samples of the two paths are
interleaved (so load on the shared machine hits both alike) and the ratio of their fastest
samples must stay within a generous band: load only ever adds time, so the fastest sample of
each path is the closest to its own cost (the medians are printed alongside). Before the
fix an unknown name was checked against one bcrypt dummy whatever the file held: about half
the cost of a bcrypt-11 entry's wrong password, and tens of times the cost of a cheap bcrypt
or argon2 entry.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import argon2
import bcrypt
import pytest
import yaml

from mailrelay.relay.auth import UserDatabase, load_users

PASSWORD = "right-password"

HASHERS: dict[str, Callable[[str], str]] = {
    "bcrypt-4": lambda pw: bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode(),
    "bcrypt-11": lambda pw: bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=11)).decode(),
    "bcrypt-2a-5": lambda pw: bcrypt.hashpw(
        pw.encode(), bcrypt.gensalt(rounds=5, prefix=b"2a")
    ).decode(),
    "argon2id-light": argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash,
    "argon2i-t2": argon2.PasswordHasher(
        time_cost=2, memory_cost=2048, parallelism=2, type=argon2.Type.I
    ).hash,
}
# Samples per path; the slow scheme gets fewer so the test stays within seconds.
SAMPLES = {"bcrypt-11": 9}


def _users_file(tmp_path: Path, hashes: list[tuple[str, str]]) -> Path:
    path = tmp_path / "users.yaml"
    users = [{"username": name, "password_hash": h} for name, h in hashes]
    path.write_text(yaml.safe_dump({"users": users}))
    return path


async def _timed(db: UserDatabase, username: str, password: bytes) -> float:
    started = time.perf_counter()
    assert await db.verify(username, password) is None
    return time.perf_counter() - started


@pytest.mark.parametrize("scheme", sorted(HASHERS))
async def test_unknown_user_costs_what_a_wrong_password_costs(tmp_path: Path, scheme: str) -> None:
    hashed = HASHERS[scheme](PASSWORD)
    db = load_users(_users_file(tmp_path, [("app", hashed), ("ops", HASHERS[scheme]("other"))]))
    try:
        await _timed(db, "app", b"warm-up")  # thread start-up is not part of either path
        known: list[float] = []
        unknown: list[float] = []
        for i in range(SAMPLES.get(scheme, 25)):
            # Interleaved, and alternating which goes first, so drifts in load hit both.
            pair = [("app", known), (f"nobody-{i}", unknown)]
            for name, samples in pair if i % 2 else reversed(pair):
                samples.append(await _timed(db, name, b"wrong-password"))
    finally:
        db.close()
    ratio = min(unknown) / min(known)
    assert 0.67 < ratio < 1.5, (
        f"{scheme}: unknown {min(unknown) * 1000:.1f} ms vs wrong password "
        f"{min(known) * 1000:.1f} ms (fastest of {len(known)}; medians "
        f"{statistics.median(unknown) * 1000:.1f} vs {statistics.median(known) * 1000:.1f} ms)"
    )


async def test_an_unknown_name_never_logs_in_with_a_real_users_password(tmp_path: Path) -> None:
    """Unknown names are checked against a real entry's hash; the result must not count."""
    db = load_users(_users_file(tmp_path, [("app", HASHERS["bcrypt-4"](PASSWORD))]))
    try:
        assert await db.verify("app", PASSWORD.encode()) is not None
        assert await db.verify("intruder", PASSWORD.encode()) is None
        assert await db.verify("APP", PASSWORD.encode()) is None
        assert await db.verify("ąpp-ünïcode", PASSWORD.encode()) is None
    finally:
        db.close()


def test_unknown_names_spread_over_every_entry_and_keep_their_decoy(tmp_path: Path) -> None:
    """In a file mixing schemes, unknown names cost like a mix of real entries, each name
    always the same (so repeating a name reveals nothing either)."""
    hashes = [("a", HASHERS["bcrypt-4"]("x")), ("b", HASHERS["argon2id-light"]("y"))]
    db = load_users(_users_file(tmp_path, hashes))
    try:
        picks = [db.decoy_index(f"name-{i}") for i in range(400)]
        assert set(picks) == {0, 1}
        assert 120 < picks.count(0) < 280
        assert all(db.decoy_index(f"name-{i}") == picks[i] for i in range(400))
    finally:
        db.close()


async def test_a_file_without_users_refuses_everyone(tmp_path: Path) -> None:
    db = load_users(_users_file(tmp_path, []))
    try:
        assert len(db) == 0
        assert await db.verify("anyone", b"anything") is None
    finally:
        db.close()
