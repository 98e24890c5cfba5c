"""The conditions helper: lastTransitionTime moves only on a flip; inputs never change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mailrelay.operator.conditions import (
    ConditionUpdate,
    find_condition,
    flipped,
    set_condition,
    set_conditions,
    worth_an_event,
)

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


READY = ConditionUpdate("Ready", "True", "ReplicasReady", "2 of 2 ready")
NOT_READY = ConditionUpdate("Ready", "False", "ReplicasNotReady", "1 of 2 ready")


class TestSetCondition:
    def test_new_condition_gets_the_time_and_generation(self) -> None:
        result = set_condition([], READY, generation=3, clock=Clock())
        assert result == [
            {
                "type": "Ready",
                "status": "True",
                "reason": "ReplicasReady",
                "message": "2 of 2 ready",
                "lastTransitionTime": "2026-01-01T12:00:00Z",
                "observedGeneration": 3,
            }
        ]

    @pytest.mark.parametrize(
        ("second", "moves"),
        [
            (READY, False),
            (ConditionUpdate("Ready", "True", "Other", "new message"), False),
            (NOT_READY, True),
        ],
    )
    def test_transition_time_moves_only_on_flip(self, second: ConditionUpdate, moves: bool) -> None:
        clock = Clock()
        first = set_condition([], READY, generation=1, clock=clock)
        clock.now = T0 + timedelta(minutes=5)
        result = set_condition(first, second, generation=2, clock=clock)
        expected = "2026-01-01T12:05:00Z" if moves else "2026-01-01T12:00:00Z"
        assert result[0]["lastTransitionTime"] == expected
        assert result[0]["observedGeneration"] == 2
        assert (result[0]["reason"], result[0]["message"]) == (second.reason, second.message)

    def test_input_is_not_mutated_and_other_types_are_kept_in_order(self) -> None:
        clock = Clock()
        before = set_conditions(
            [],
            [ConditionUpdate("A", "True", "Yes", ""), READY],
            generation=1,
            clock=clock,
        )
        snapshot = [dict(c) for c in before]
        after = set_condition(before, NOT_READY, generation=2, clock=clock)
        assert before == snapshot
        assert [c["type"] for c in after] == ["A", "Ready"]
        assert after[0] == before[0]

    def test_flipped_sees_status_or_reason_changes_only(self) -> None:
        clock = Clock()
        one = set_condition([], READY, generation=1, clock=clock)
        same = set_condition(
            one, ConditionUpdate("Ready", "True", "ReplicasReady", "x"), generation=1, clock=clock
        )
        other = set_condition(one, NOT_READY, generation=1, clock=clock)
        assert not flipped(one, same, "Ready")
        assert flipped(one, other, "Ready")
        assert flipped([], one, "Ready")
        assert find_condition(other, "Missing") is None


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (None, READY, False),  # starts out fine: no news
        (None, NOT_READY, True),  # starts out in trouble
        (NOT_READY, READY, True),  # recovery
        (READY, NOT_READY, True),  # into trouble
        (READY, ConditionUpdate("Ready", "True", "Other", ""), False),  # still fine
    ],
)
def test_worth_an_event(
    first: ConditionUpdate | None, second: ConditionUpdate, expected: bool
) -> None:
    clock = Clock()
    before = set_condition([], first, generation=1, clock=clock) if first else []
    after = set_condition(before, second, generation=1, clock=clock)
    assert worth_an_event(before, after, "Ready") is expected
