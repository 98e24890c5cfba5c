"""Status conditions as pure functions over wire-format dicts (metav1.Condition).

``set_condition`` returns a new list and never mutates its input. ``lastTransitionTime``
moves only when the status flips, so a reason or message update does not look like a new
transition in ``kubectl describe``; ``observedGeneration`` always records the generation the
decision was made for. The clock is injected so tests pin time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The default clock: the current time in UTC."""
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339 with second precision and a Z, as the API server writes it."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ConditionUpdate:
    """A condition the operator wants to be true of an object right now."""

    type: str
    status: Status
    reason: str
    message: str


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    update: ConditionUpdate,
    *,
    generation: int | None,
    clock: Clock = utc_now,
) -> list[dict[str, Any]]:
    """Conditions with ``update`` applied; other types are kept as they are, in order."""
    result: list[dict[str, Any]] = []
    found = False
    for existing in conditions:
        if existing.get("type") != update.type:
            result.append(dict(existing))
            continue
        found = True
        flipped = existing.get("status") != update.status
        transition = existing.get("lastTransitionTime")
        result.append(
            _condition(
                update,
                generation,
                format_time(clock()) if flipped or not transition else str(transition),
            )
        )
    if not found:
        result.append(_condition(update, generation, format_time(clock())))
    return result


def set_conditions(
    conditions: Sequence[Mapping[str, Any]],
    updates: Sequence[ConditionUpdate],
    *,
    generation: int | None,
    clock: Clock = utc_now,
) -> list[dict[str, Any]]:
    """Apply several updates in order (see ``set_condition``)."""
    result = [dict(c) for c in conditions]
    for update in updates:
        result = set_condition(result, update, generation=generation, clock=clock)
    return result


def remove_condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> list[dict[str, Any]]:
    """Conditions without ``type_`` (for a condition that no longer applies)."""
    return [dict(c) for c in conditions if c.get("type") != type_]


def find_condition(
    conditions: Sequence[Mapping[str, Any]] | None, type_: str
) -> Mapping[str, Any] | None:
    """The condition of ``type_``, or None."""
    for condition in conditions or ():
        if condition.get("type") == type_:
            return condition
    return None


def flipped(
    before: Sequence[Mapping[str, Any]] | None,
    after: Sequence[Mapping[str, Any]],
    type_: str,
) -> bool:
    """Whether ``type_`` changed status or reason (worth an Event, unlike a re-statement)."""
    old, new = find_condition(before, type_), find_condition(after, type_)
    if new is None:
        return False
    if old is None:
        return True
    return (old.get("status"), old.get("reason")) != (new.get("status"), new.get("reason"))


def worth_an_event(
    before: Sequence[Mapping[str, Any]] | None,
    after: Sequence[Mapping[str, Any]],
    type_: str,
) -> bool:
    """A flip into trouble, or out of it; a condition that starts out fine is no news."""
    if not flipped(before, after, type_):
        return False
    old, new = find_condition(before, type_), find_condition(after, type_)
    assert new is not None
    if new.get("status") == "True":
        return old is not None and old.get("status") != "True"
    return True


def _condition(update: ConditionUpdate, generation: int | None, transition: str) -> dict[str, Any]:
    condition: dict[str, Any] = {
        "type": update.type,
        "status": update.status,
        "reason": update.reason,
        "message": update.message,
        "lastTransitionTime": transition,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition
