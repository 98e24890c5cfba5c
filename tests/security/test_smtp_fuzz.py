"""The SMTP session fuzzer, short profile (see tests/security/smtp_fuzz.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.security.smtp_fuzz import FuzzRun, run
from tests.security.smtp_model import InputClasses
from tests.security.target import FuzzTarget

# Small and reproducible: a fixed derandomized run in `make test`; bench/smtp_fuzz.py runs
# the same machine for minutes with fresh seeds.
SHORT = settings(
    max_examples=12, stateful_step_count=20, deadline=None, derandomize=True, database=None
)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[FuzzTarget]:
    relay = FuzzTarget.start(tmp_path / "fuzz")
    yield relay
    relay.stop()


def test_hostile_sessions_never_hurt_the_relay_or_other_clients(target: FuzzTarget) -> None:
    fuzz = FuzzRun(target)
    run(fuzz, SHORT)
    assert fuzz.stats.delivered > 0
    assert fuzz.stats.victim_messages >= SHORT.max_examples
