"""The MailRoute's ``UpstreamAuthenticated`` condition, from a real relay's
``/status/upstreams``: a Pod object (Ready, podIP 127.0.0.1 through the status subresource)
stands for the relay's pod, a real relay process serves the document on the MailRelay's
metrics port, and the real OAuth2 peers refuse, then accept, its refresh token."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from mailrelay.operator.conditions import ConditionUpdate, find_condition
from mailrelay.operator.models import MailRelaySpec, MailRouteSpec
from mailrelay.operator.relays import network_policy_inputs
from mailrelay.operator.render import RelayInputs, render_networkpolicy
from mailrelay.operator.routes import ObjectInfo, RouteVerdict, route_status
from mailrelay.operator.settings import OperatorSettings
from mailrelay.operator.upstream_auth import (
    PodReport,
    UpstreamStatusPoller,
    auth_condition,
    ready_pod_addresses,
    route_auth_update,
    route_upstreams,
    status_url,
)
from mailrelay.relay.upstream_status import AuthState, UpstreamAuth, UpstreamStatusDocument
from mailrelay.support.localkube import LocalKube
from mailrelay.support.operator_harness import OperatorProcess, apply, condition, get, wait_for
from mailrelay.support.ports import free_port
from tests.operator import manifests as m
from tests.operator.test_reconcile import _events, _pod
from tests.relay.conftest import RelayHandle, start_subprocess
from tests.relay.oauth_peers import CLIENT_ID, CLIENT_SECRET, MAILBOX, REFRESH_TOKEN
from tests.relay.test_oauth2 import Peers

NEW_REFRESH_TOKEN = "1//operator-test-new-refresh-token"
DATA = b"From: relay@example.com\r\nTo: bob@dest.test\r\nSubject: oauth\r\n\r\nHi.\r\n"


# --- deciding (pure) ---------------------------------------------------------------------


def _entry(state: AuthState, error: str | None = None, at: float = 1_000.0) -> UpstreamAuth:
    return UpstreamAuth(
        state=state,
        since=datetime.fromtimestamp(at, UTC),
        reason=f"{state} because",
        error=error,
    )


def _report(pod: str, **entries: UpstreamAuth) -> PodReport:
    return PodReport(pod, UpstreamStatusDocument(upstreams=entries))


def test_route_upstreams_are_the_relay_config_names() -> None:
    assert route_upstreams("billing", 2) == ["billing", "billing-fallback-1", "billing-fallback-2"]


NAMES = ("billing", "billing-fallback-1")


class TestAuthCondition:
    names = NAMES

    def test_no_answer_leaves_it(self) -> None:
        assert auth_condition("billing", self.names, None, existing=True) is None
        assert auth_condition("billing", self.names, (), existing=True) is None

    def test_failure_on_any_pod_or_fallback_is_false_with_the_provider_error(self) -> None:
        reports = (
            _report("r-0", billing=_entry("ok")),
            _report("r-1", **{"billing-fallback-1": _entry("token_failed", "invalid_grant")}),
        )
        update = auth_condition("billing", self.names, reports, existing=False)
        assert update is not None
        assert (update.status, update.reason) == ("False", "OAuth2InvalidGrant")
        assert "'billing-fallback-1'" in update.message and "r-1" in update.message
        assert "(invalid_grant)" in update.message

    @pytest.mark.parametrize(
        ("entry", "reason"),
        [
            (_entry("token_failed", "invalid_client"), "OAuth2InvalidClient"),
            (_entry("token_failed", "made_up_code"), "TokenUnavailable"),
            (_entry("token_failed"), "TokenUnavailable"),
            (_entry("auth_refused", "invalid_token"), "AuthRefused"),
            (_entry("config_error"), "UpstreamMisconfigured"),
        ],
    )
    def test_reasons(self, entry: UpstreamAuth, reason: str) -> None:
        update = auth_condition(
            "billing", self.names, (_report("p", billing=entry),), existing=True
        )
        assert update is not None and update.reason == reason

    def test_config_error_comes_before_a_refusal(self) -> None:
        reports = (
            _report("a", billing=_entry("auth_refused", at=1)),
            _report("b", billing=_entry("config_error", at=5)),
        )
        update = auth_condition("billing", self.names, reports, existing=False)
        assert update is not None and update.reason == "UpstreamMisconfigured"
        assert "1 more failing login" in update.message

    def test_all_ok_is_true(self) -> None:
        reports = (_report("a", billing=_entry("ok")), _report("b", other=_entry("config_error")))
        update = auth_condition("billing", self.names, reports, existing=False)
        assert update == ConditionUpdate(
            "UpstreamAuthenticated",
            "True",
            "Authenticated",
            "Logged in to upstream(s) billing from 1 relay pod(s).",
        )

    def test_not_reported_is_unknown_only_once_set(self) -> None:
        reports = (_report("a", other=_entry("token_failed")),)
        assert auth_condition("billing", self.names, reports, existing=False) is None
        update = auth_condition("billing", self.names, reports, existing=True)
        assert update is not None and (update.status, update.reason) == ("Unknown", "NoLoginYet")

    def test_message_is_bounded_printable(self) -> None:
        entry = UpstreamAuth(
            state="auth_refused", since=datetime.now(UTC), reason="x\u00e9\r\n" * 70
        )
        update = auth_condition(
            "billing", self.names, (_report("a", billing=entry),), existing=False
        )
        assert update is not None
        assert update.message.isascii() and "\n" not in update.message


def _verdict(included: bool, conditions: list[dict[str, Any]]) -> RouteVerdict:
    spec = MailRouteSpec.model_validate(m.smtp_route("billing")["spec"])
    info = ObjectInfo("MailRoute", "ns", "billing", "uid", 3, status={"conditions": conditions})
    accepted = ConditionUpdate(
        "Accepted",
        "True" if included else "False",
        "Accepted" if included else "NoRelay",
        "",
    )
    return RouteVerdict(info, spec, accepted, ConditionUpdate("ResolvedRefs", "True", "R", ""))


def test_route_status_sets_and_drops_the_condition() -> None:
    reports = (_report("a", billing=_entry("token_failed", "invalid_grant")),)
    verdict = _verdict(True, [])
    update = route_auth_update(verdict, reports)
    status = route_status(
        verdict,
        relay_name="r",
        relay_ready=True,
        clock=lambda: datetime.now(UTC),
        upstream_auth=update,
    )
    found = find_condition(status["conditions"], "UpstreamAuthenticated")
    assert found is not None
    assert (found["status"], found["reason"], found["observedGeneration"]) == (
        "False",
        "OAuth2InvalidGrant",
        3,
    )
    # Out of the config: no condition about logins the relay no longer makes.
    gone = _verdict(False, status["conditions"])
    assert route_auth_update(gone, reports) is None
    status = route_status(gone, relay_name="r", relay_ready=True, clock=lambda: datetime.now(UTC))
    assert find_condition(status["conditions"], "UpstreamAuthenticated") is None


def test_ready_pod_addresses() -> None:
    def pod(name: str, ip: str | None, ready: str = "True", **meta: Any) -> dict[str, Any]:
        return {
            "metadata": {"name": name, **meta},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
        }

    pods = [
        pod("r-2", "fd00::5"),
        pod("r-1", "10.0.0.1"),
        pod("r-3", None),
        pod("r-4", "10.0.0.4", ready="False"),
        pod("r-5", "10.0.0.5", deletionTimestamp="2026-01-01T00:00:00Z"),
        pod("r-6", "not-an-ip"),
    ]
    assert ready_pod_addresses(pods) == [("r-1", "10.0.0.1"), ("r-2", "fd00::5")]
    assert status_url("fd00::5", 9090) == "http://[fd00::5]:9090/status/upstreams"


def test_network_policy_lets_the_operator_reach_the_status_port() -> None:
    policy = {"enabled": True, "allowedFrom": [{"podSelector": {"matchLabels": {"app": "api"}}}]}
    spec = MailRelaySpec.model_validate(m.relay(networkPolicy=policy)["spec"])
    relay = RelayInputs("outbound", "ns", "uid", spec)
    rendered = render_networkpolicy(relay, network_policy_inputs(spec), OperatorSettings())
    assert rendered is not None
    open_to_all = [rule for rule in rendered["spec"]["ingress"] if "from" not in rule]
    assert {"protocol": "TCP", "port": 9090} in [p for r in open_to_all for p in r["ports"]]


# --- on the real API server, with a real relay -------------------------------------------


@pytest.fixture
async def oauth(tmp_path: Path) -> AsyncIterator[Peers]:
    p = Peers(tmp_path)
    await p.start()
    yield p
    await p.close()


async def _relay(tmp_path: Path, peers: Peers) -> RelayHandle:
    files = peers.files(
        username=MAILBOX,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        refresh_token=REFRESH_TOKEN,
    )
    data = {
        "hostname": "relay.test",
        "listener": {"host": "127.0.0.1", "submission_port": free_port()},
        "auth": {"required": False},
        "allowed_networks": ["127.0.0.0/8"],
        "spool": {"directory": str(tmp_path / "spool"), "min_free_bytes": 0},
        "retry": {"initial_backoff_seconds": 0.2, "max_backoff_seconds": 1, "jitter": 0},
        "delivery": {"poll_interval_seconds": 0.1},
        "metrics": {"host": "127.0.0.1", "port": free_port(span=4)},
        "shutdown_grace_seconds": 2,
        "routes": [
            {
                "name": "gmail",
                "upstream": {
                    "type": "smtp",
                    "name": "gmail",
                    "host": peers.upstream.host,
                    "port": peers.upstream.port,
                    "ca_file": str(peers.certs.ca_file),
                    "username_file": str(files["username"]),
                    "oauth2": {
                        "grant": "refresh_token",
                        "token_endpoint": peers.tokens.url,
                        "client_id_file": str(files["client_id"]),
                        "client_secret_file": str(files["client_secret"]),
                        "refresh_token_file": str(files["refresh_token"]),
                        "insecure_allow_local_endpoint": True,
                    },
                },
            }
        ],
    }
    config_path = tmp_path / "relay.yaml"
    config_path.write_text(yaml.safe_dump(data))
    handle = RelayHandle(config_path, tmp_path / "spool", tmp_path / "relay.log")
    await start_subprocess(handle)
    return handle


def _route_condition(kube: LocalKube, ns: str) -> dict[str, Any] | None:
    return condition(get(kube, "mailroute", "gmail", ns), "UpstreamAuthenticated")


def _has(kube: LocalKube, ns: str, status: str, reason: str) -> dict[str, Any] | None:
    found = _route_condition(kube, ns)
    return found if found and (found["status"], found["reason"]) == (status, reason) else None


def _event(kube: LocalKube, ns: str, type_: str, reason: str) -> bool:
    return any((e["type"], e["reason"]) == (type_, reason) for e in _events(kube, ns, "gmail"))


async def _wait(probe: Any, what: str) -> Any:
    return await asyncio.to_thread(wait_for, probe, timeout=60, what=what)


@pytest.mark.kube
async def test_route_condition_follows_the_relay_pods_oauth2_state(
    crds: LocalKube, operator: OperatorProcess, op_namespace: str, oauth: Peers, tmp_path: Path
) -> None:
    kube, ns = crds, op_namespace
    oauth.tokens.revoke(REFRESH_TOKEN)
    relay = await _relay(tmp_path, oauth)
    try:
        await asyncio.to_thread(
            apply, kube, ns, m.tls_secret(), m.users_secret(), m.smtp_credentials()
        )
        body = m.relay(metrics={"port": relay.health_port})
        await asyncio.to_thread(
            apply, kube, ns, body, m.smtp_route("gmail"), _pod("outbound-0", "outbound")
        )
        status = {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }
        await asyncio.to_thread(
            kube.kubectl,
            "patch",
            "pod",
            "outbound-0",
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )
        async with relay.client(starttls=False) as smtp:
            errors, _ = await smtp.sendmail(MAILBOX, ["bob@dest.test"], DATA)
        assert errors == {}
        found = await _wait(
            lambda: _has(kube, ns, "False", "OAuth2InvalidGrant"),
            "UpstreamAuthenticated=False OAuth2InvalidGrant",
        )
        route = get(kube, "mailroute", "gmail", ns)
        assert route is not None
        assert found["observedGeneration"] == route["metadata"]["generation"]
        assert "invalid_grant" in found["message"]
        assert "Token has been expired or revoked." in found["message"]
        assert "outbound-0" in found["message"]
        for secret in (CLIENT_SECRET, REFRESH_TOKEN):
            assert secret not in json.dumps(route)
        await _wait(lambda: _event(kube, ns, "Warning", "OAuth2InvalidGrant"), "the Warning Event")
        # The mailbox's owner puts a new refresh token in the Secret: the queued message
        # goes out at the next retry, and the condition clears.
        oauth.tokens.refresh_tokens[NEW_REFRESH_TOKEN] = (CLIENT_ID, MAILBOX)
        oauth.files(refresh_token=NEW_REFRESH_TOKEN)
        found = await _wait(
            lambda: _has(kube, ns, "True", "Authenticated"), "UpstreamAuthenticated=True"
        )
        assert len(oauth.upstream.messages) == 1
        await _wait(lambda: _event(kube, ns, "Normal", "Authenticated"), "the Normal Event")
        events = json.dumps(await asyncio.to_thread(_events, kube, ns, "gmail"))
        for secret in (CLIENT_SECRET, REFRESH_TOKEN, NEW_REFRESH_TOKEN, *oauth.tokens.issued):
            assert secret not in events
    finally:
        await relay.stop()


# --- fetching: a pod that is slow, wrong or too talkative is left out ------------------


@pytest.fixture
async def pod_server() -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """A loopback HTTP server standing for a pod; `behaviour["mode"]` picks its answer."""
    behaviour: dict[str, Any] = {"mode": "ok"}
    document = UpstreamStatusDocument(upstreams={"billing": _entry("ok")}).model_dump_json()

    async def handle(request: web.Request) -> web.StreamResponse:
        assert request.path == "/status/upstreams"
        mode = behaviour["mode"]
        if mode == "slow":
            await asyncio.sleep(5)
        if mode == "huge":
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(40):
                await response.write(b" " * 65536)
            return response
        if mode == "garbage":
            return web.Response(text="<html>not it</html>")
        if mode == "500":
            return web.Response(status=500)
        return web.Response(text=document, content_type="application/json")

    app = web.Application()
    app.router.add_get("/status/upstreams", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield port, behaviour
    await runner.cleanup()


async def test_fetch_leaves_out_what_is_not_the_document(
    pod_server: tuple[int, dict[str, Any]],
) -> None:
    port, behaviour = pod_server
    poller = UpstreamStatusPoller(interval=10, timeout=0.5)
    try:
        report = await poller.fetch("r-0", "127.0.0.1", port)
        assert report is not None and report.document.upstreams["billing"].state == "ok"
        for mode in ("slow", "huge", "garbage", "500"):
            behaviour["mode"] = mode
            started = time.monotonic()
            assert await poller.fetch("r-0", "127.0.0.1", port) is None, mode
            assert time.monotonic() - started < 3, mode
        assert await poller.fetch("r-0", "127.0.0.1", free_port()) is None  # nobody listens
    finally:
        await poller.close()
