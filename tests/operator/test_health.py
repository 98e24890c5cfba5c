"""Liveness decisions (pure, with an injected clock) and kopf settings that keep progress."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import kopf
import pytest

from mailrelay.operator.health import Progress, health_response, serve_health
from mailrelay.operator.settings import OperatorSettings, api_backoffs, configure_kopf
from mailrelay.support.ports import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _progress(clock: Clock) -> Progress:
    return Progress(index_timeout=60, stall=120, clock=clock)


class TestProgress:
    def test_an_empty_cluster_is_live(self) -> None:
        clock = Clock()
        progress = _progress(clock)
        clock.now += 3600
        assert progress.problems() == []

    def test_indexed_objects_without_any_event_fail_after_the_bound(self) -> None:
        clock = Clock()
        progress = _progress(clock)
        progress.saw_index("Secret")
        progress.saw_index("MailRelay")
        clock.now += 59
        assert progress.problems() == []
        clock.now += 2
        (problem,) = progress.problems()
        assert "not loaded 61s after start-up" in problem
        assert "MailRelay, Secret" in problem
        status, body = health_response(progress)
        assert (status, body["live"], body["indicesReady"]) == (503, False, False)

    def test_one_event_means_the_caches_are_loaded(self) -> None:
        clock = Clock()
        progress = _progress(clock)
        progress.saw_index("MailRelay")
        clock.now += 10
        progress.saw_event()
        clock.now += 3600
        assert progress.problems() == []
        assert health_response(progress) == (
            200,
            {"live": True, "indicesReady": True, "problems": []},
        )

    def test_a_pass_waiting_while_none_finishes_fails(self) -> None:
        clock = Clock()
        progress = _progress(clock)
        due = clock.now
        progress.oldest_waiting = lambda: due
        clock.now += 121
        (problem,) = progress.problems()
        assert "waited 121s for its pass" in problem

    def test_a_long_queue_that_keeps_moving_is_live(self) -> None:
        clock = Clock()
        progress = _progress(clock)
        due = clock.now
        progress.oldest_waiting = lambda: due
        clock.now += 500
        progress.passed()
        clock.now += 60
        assert progress.problems() == []
        clock.now += 61
        assert len(progress.problems()) == 1


async def test_healthz_answers_503_with_the_reasons() -> None:
    clock = Clock()
    progress = _progress(clock)
    port = free_port()
    runner = await serve_health(progress, port, host="127.0.0.1")
    try:

        def fetch() -> tuple[int, dict[str, object]]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        assert (await asyncio.to_thread(fetch))[0] == 200
        progress.saw_index("Secret")
        clock.now += 61
        status, body = await asyncio.to_thread(fetch)
        assert status == 503
        assert body["live"] is False
    finally:
        await runner.cleanup()


class TestKopfSettings:
    def test_no_worker_limit(self) -> None:
        """kopf's pre-index barrier needs a worker per object: any limit can deadlock it."""
        kopf_settings = kopf.OperatorSettings()
        configure_kopf(kopf_settings, OperatorSettings(), {})
        assert kopf_settings.queueing.worker_limit is None

    @pytest.mark.parametrize(("cap", "outage"), [(1.0, 300.0), (2.0, 60.0), (0.3, 10.0)])
    def test_api_retries_are_short_and_last_the_outage(self, cap: float, outage: float) -> None:
        backoffs = api_backoffs(OperatorSettings(api_retry_seconds=cap, api_outage_seconds=outage))
        assert max(backoffs) == cap
        assert outage <= sum(backoffs) < outage + cap

    def test_selectors_go_to_the_watches(self) -> None:
        kopf_settings = kopf.OperatorSettings()
        selectors = {("", "v1", "secrets"): "mailrelay.dev/watch=true", ("", "v1", "pods"): ""}
        configure_kopf(kopf_settings, OperatorSettings(), selectors)

        def selector(group: str, plural: str) -> list[str]:
            resource = kopf.Resource(group, "v1", plural, namespaced=True)
            return kopf_settings.watching.label_selectors.collect(resource)

        assert selector("", "secrets") == ["mailrelay.dev/watch=true"]
        assert selector("", "pods") == []
        assert selector("other.example.com", "secrets") == []
