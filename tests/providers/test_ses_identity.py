"""SES with the pod's AWS identity: no static keys, botocore's web identity chain.

The token is a real ServiceAccount token from the kube-apiserver's TokenRequest API (what
kubelet projects into the relay pods with the audience the operator renders); the STS is
`tests/providers/sts.py` on loopback, which verifies the token against the apiserver's
JWKS and hands out temporary credentials; the SES stand-in accepts only those, with their
session token signed. botocore finds STS through AWS_ENDPOINT_URL_STS.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome
from mailrelay.support.localkube import LocalKube
from mailrelay.support.provider_servers import SES_REGION, ProviderServer
from tests.providers.messages import rich_message
from tests.providers.sts import StsServer

pytestmark = pytest.mark.kube

ROLE = "arn:aws:iam::123456789012:role/mailrelay-ses"
AUDIENCE = "sts.amazonaws.com"
ACCOUNT = "outbound-relay"
RCPTS = ("ann@example.org", "bob@example.org")

# Everything of the AWS chain that could find credentials other than the web identity.
_OTHER_SOURCES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_ENDPOINT_URL",
)


def service_account_token(kube: LocalKube, namespace: str, audience: str) -> str:
    """A token from the TokenRequest API (`kubectl create token`), as kubelet projects."""
    kube.kubectl("create", "serviceaccount", ACCOUNT, "-n", namespace, check=False)
    result = kube.kubectl(
        "create", "token", ACCOUNT, "-n", namespace, "--audience", audience, "--duration", "10m"
    )
    return result.stdout.strip()


@pytest.fixture
async def sts(kube: LocalKube, namespace: str) -> AsyncIterator[StsServer]:
    jwks = json.loads(kube.kubectl("get", "--raw", "/openid/v1/jwks").stdout)
    discovery = json.loads(kube.kubectl("get", "--raw", "/.well-known/openid-configuration").stdout)
    server = StsServer(
        jwks=jwks,
        issuer=discovery["issuer"],
        audience=AUDIENCE,
        roles={ROLE: f"system:serviceaccount:{namespace}:{ACCOUNT}"},
    )
    await server.start()
    yield server
    await server.stop()


def web_identity_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, token: str, sts: StsServer
) -> Path:
    """The environment the operator renders into a relay pod (render.aws_web_identity)."""
    token_file = tmp_path / "token"
    token_file.write_text(token)
    for name in _OTHER_SOURCES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ROLE_ARN", ROLE)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("AWS_ROLE_SESSION_NAME", "outbound-0")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts.url)
    monkeypatch.setenv("AWS_REGION", SES_REGION)
    return token_file


def envelope(queue_id: str) -> Envelope:
    return Envelope(
        queue_id=queue_id,
        mail_from="app@example.com",
        recipients=RCPTS,
        smtputf8=False,
        body_8bitmime=False,
    )


@dataclass
class PodIdentity:
    """What a relay pod with the web identity has: the env, a token, STS, SES."""

    kube: LocalKube
    namespace: str
    sts: StsServer
    provider_server: Callable[[str], Any]
    api_upstream: Any
    transport_factory: Any
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch

    async def ses(self, audience: str) -> tuple[str, ProviderServer, Any]:
        """(token, SES stand-in, SES transport without keys) for a token of `audience`."""
        token = service_account_token(self.kube, self.namespace, audience)
        web_identity_env(self.monkeypatch, self.tmp_path, token, self.sts)
        server: ProviderServer = await self.provider_server("ses")
        server.aws_credentials = self.sts.credentials  # only what STS issued works
        upstream = self.api_upstream("ses", server, credentials_dir=None)
        return token, server, self.transport_factory(upstream)


@pytest.fixture
def pod(
    *,
    kube: LocalKube,
    namespace: str,
    sts: StsServer,
    provider_server: Callable[[str], Any],
    api_upstream: Any,
    transport_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> PodIdentity:
    return PodIdentity(
        kube,
        namespace,
        sts,
        provider_server,
        api_upstream,
        transport_factory,
        tmp_path,
        monkeypatch,
    )


async def test_ses_signs_with_credentials_from_a_service_account_token(
    pod: PodIdentity,
) -> None:
    token, server, transport = await pod.ses(AUDIENCE)
    sts = pod.sts
    # STS answers after 0.5 s; the chain runs in a worker thread, so the loop keeps serving
    # meanwhile (the STS is served on this same loop: a blocked loop could not answer it).
    sts.delay = 0.5
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    ticking = asyncio.create_task(ticker())
    try:
        results = await transport.deliver(envelope("QWI1"), rich_message())
    finally:
        ticking.cancel()
    assert [r.outcome for r in results] == [RecipientOutcome.DELIVERED] * 2, results
    (asked,) = sts.received_at
    assert len([t for t in ticks if asked < t < asked + sts.delay]) >= 5
    (call,) = sts.calls
    assert (call["RoleArn"], call["WebIdentityToken"]) == (ROLE, token)
    assert call["RoleSessionName"] == "outbound-0"
    # The SES request was signed with the temporary key and carried its session token.
    (key_id,) = sts.credentials
    (sent,) = server.sent
    assert f"Credential={key_id}/" in sent.headers["authorization"]
    assert sent.headers["x-amz-security-token"] == sts.credentials[key_id][1]
    # The temporary credentials are reused until botocore's refresh window.
    results = await transport.deliver(envelope("QWI2"), rich_message())
    assert {r.outcome for r in results} == {RecipientOutcome.DELIVERED}
    assert len(sts.calls) == 1 and len(server.sent) == 2


async def test_a_token_for_another_audience_keeps_mail_queued(
    pod: PodIdentity,
) -> None:
    token, server, transport = await pod.ses("https://kubernetes.default.svc")
    sts = pod.sts
    results = await transport.deliver(envelope("QWI3"), rich_message())
    # Kept queued as a configuration problem, with STS's own reason; never bounced.
    assert {r.outcome for r in results} == {RecipientOutcome.CONFIG_ERROR}, results
    assert "InvalidIdentityToken: Incorrect token audience" in results[0].detail
    assert server.sent == []
    assert len(sts.calls) == 1
    assert token not in results[0].detail


async def test_expiring_credentials_are_renewed_with_the_rotated_token(pod: PodIdentity) -> None:
    """Credentials within botocore's refresh window (15 min) are renewed before a send, with
    the token file as kubelet last rotated it."""
    first_token, server, transport = await pod.ses(AUDIENCE)
    sts = pod.sts
    sts.duration = timedelta(minutes=12)
    results = await transport.deliver(envelope("QWI4"), rich_message())
    assert {r.outcome for r in results} == {RecipientOutcome.DELIVERED}
    # kubelet rotates the projected token: a new one in the same file.
    rotated = service_account_token(pod.kube, pod.namespace, AUDIENCE)
    assert rotated != first_token
    (pod.tmp_path / "token").write_text(rotated)
    results = await transport.deliver(envelope("QWI5"), rich_message())
    assert {r.outcome for r in results} == {RecipientOutcome.DELIVERED}
    assert [call["WebIdentityToken"] for call in sts.calls] == [first_token, rotated]
    keys = [r.headers["authorization"].split("Credential=")[1].split("/")[0] for r in server.sent]
    assert keys == list(sts.credentials)  # each send signed with the credentials of its time
