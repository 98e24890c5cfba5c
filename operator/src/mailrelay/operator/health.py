"""Liveness: whether the operator can still make progress, served on ``/healthz``.

kopf's own liveness endpoint answers 200 as long as the event loop runs, even when no event
can ever be handled (a watch cache that never finishes loading). This endpoint fails, so
that Kubernetes restarts the process, when:

* the watch caches are not loaded ``index_timeout`` seconds after start-up: objects were
  indexed, but no event handler ran (kopf calls none until every object of every watched
  kind is listed and indexed);
* a relay has waited ``stall`` seconds for its pass while no pass finished (every worker of
  the work queue is stuck).

``Progress`` keeps the facts (the handlers in ``main`` and the work queue record them) and
decides with a pure method; ``serve_health`` is the thin HTTP layer (aiohttp, kopf's own).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

Monotonic = Callable[[], float]


@dataclass
class Progress:
    """What liveness decides from; every field is written by the operator's own tasks."""

    index_timeout: float
    stall: float
    clock: Monotonic = time.monotonic
    started: float = field(default=0.0)
    # Kinds with at least one indexed object, and when the first one was indexed.
    indexed: dict[str, float] = field(default_factory=dict)
    # When the first event handler ran: every watch cache was loaded by then.
    events_since: float | None = None
    # When the pass waiting longest became due (None: nothing waits); the work queue's.
    oldest_waiting: Callable[[], float | None] = lambda: None
    # When the last pass finished.
    last_pass: float | None = None

    def __post_init__(self) -> None:
        if not self.started:
            self.started = self.clock()

    def saw_index(self, kind: str) -> None:
        """An index handler ran for an object of ``kind``."""
        if kind not in self.indexed:
            self.indexed[kind] = self.clock()

    def saw_event(self) -> None:
        """An event handler ran (so every watch cache is loaded)."""
        if self.events_since is None:
            self.events_since = self.clock()

    def passed(self) -> None:
        """A pass finished (whatever its outcome)."""
        self.last_pass = self.clock()

    @property
    def indices_ready(self) -> bool:
        return self.events_since is not None

    def problems(self) -> list[str]:
        """Why the operator cannot make progress; empty when it can."""
        now = self.clock()
        found: list[str] = []
        if self.events_since is None and self.indexed and now - self.started > self.index_timeout:
            found.append(
                f"The watch caches are not loaded {now - self.started:.0f}s after start-up "
                f"(objects indexed: {', '.join(sorted(self.indexed))}); no event has been "
                "handled, so nothing is reconciled."
            )
        waiting = self.oldest_waiting()
        if waiting is not None and now - waiting > self.stall:
            last = self.last_pass
            if last is None or now - last > self.stall:
                found.append(
                    f"A relay has waited {now - waiting:.0f}s for its pass and no "
                    f"pass finished in the last {self.stall:.0f}s."
                )
        return found


def health_response(progress: Progress) -> tuple[int, dict[str, object]]:
    """The status code and JSON body of ``/healthz`` (pure)."""
    problems = progress.problems()
    body: dict[str, object] = {
        "live": not problems,
        "indicesReady": progress.indices_ready,
        "problems": problems,
    }
    return (503 if problems else 200), body


# Every address of both families: asyncio binds host "" as one IPv4 and one IPv6 socket, so
# kubelet's probe reaches the pod in IPv4-only, IPv6-only and dual-stack clusters ("0.0.0.0"
# would miss IPv6, "::" alone IPv4, since asyncio sets IPV6_V6ONLY).
ALL_ADDRESSES = ""


async def serve_health(progress: Progress, port: int, host: str = ALL_ADDRESSES) -> web.AppRunner:
    """Serve ``/healthz`` on ``port``; the caller cleans the returned runner up."""

    async def healthz(request: web.Request) -> web.Response:
        status, body = health_response(progress)
        return web.Response(status=status, text=json.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
