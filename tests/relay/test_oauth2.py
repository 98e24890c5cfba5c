"""OAuth2 (XOAUTH2, OAUTHBEARER) to SMTP upstreams, against real peers on loopback.

The token endpoint and the SMTP upstream are `tests/relay/oauth_peers.py`: the upstream
takes only tokens the token server issued, unexpired and unrevoked, for the mailbox named.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mailrelay.relay.config import OAuth2Config, SmtpUpstream
from mailrelay.relay.spool_admin import SpoolAdmin
from mailrelay.relay.upstreams import oauth2
from mailrelay.relay.upstreams.providers.http import ApiResponse
from mailrelay.relay.upstreams.smtp import SmtpTransport
from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome
from tests.relay.conftest import RelayFactory
from tests.relay.delivery_fixtures import make_certificates
from tests.relay.oauth_peers import (
    CLIENT_ID,
    CLIENT_SECRET,
    MAILBOX,
    REFRESH_TOKEN,
    OAuthUpstream,
    TokenServer,
)
from tests.relay.test_delivery_e2e import eventually, send, spool_of

MESSAGE = b"From: relay@example.com\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


class Peers:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.certs = make_certificates(tmp_path)
        self.tokens = TokenServer()
        self.upstream = OAuthUpstream(self.tokens, self.certs)
        self.transports: list[SmtpTransport] = []

    async def start(self) -> None:
        await self.tokens.start()
        await self.upstream.start()

    def files(self, **values: str) -> dict[str, Path]:
        out = {}
        for name, value in values.items():
            path = self.tmp_path / name
            path.write_text(value + "\n")
            out[name] = path
        return out

    def transport(
        self,
        *,
        mechanism: str = "xoauth2",
        grant: str = "refresh_token",
        client_auth: str = "post",
        refresh_token: str = REFRESH_TOKEN,
        client_secret: str = CLIENT_SECRET,
        **oauth: Any,
    ) -> SmtpTransport:
        files = self.files(
            username=MAILBOX,
            client_id=CLIENT_ID,
            client_secret=client_secret,
            refresh_token=refresh_token,
        )
        config = SmtpUpstream(
            type="smtp",
            name="gmail",
            host=self.upstream.host,
            port=self.upstream.port,
            ca_file=self.certs.ca_file,
            username_file=files["username"],
            connect_timeout_seconds=5,
            timeout_seconds=5,
            oauth2=OAuth2Config(
                mechanism=mechanism,
                grant=grant,
                token_endpoint=self.tokens.url,
                client_id_file=files["client_id"],
                client_secret_file=files["client_secret"],
                refresh_token_file=files["refresh_token"] if grant == "refresh_token" else None,
                scopes=["https://mail.google.com/"],
                client_auth=client_auth,
                insecure_allow_local_endpoint=True,
                **oauth,
            ),
        )
        # Idle connections are dropped at once, so each delivery presents a token again.
        transport = SmtpTransport(config, local_hostname="relay.test", idle_timeout=0.02)
        self.transports.append(transport)
        return transport

    async def close(self) -> None:
        for transport in self.transports:
            await transport.close()
        await self.upstream.stop()
        await self.tokens.stop()


@pytest.fixture
async def peers(tmp_path: Path) -> AsyncIterator[Peers]:
    p = Peers(tmp_path)
    await p.start()
    yield p
    await p.close()


def envelope(queue_id: str = "Q1") -> Envelope:
    return Envelope(
        queue_id=queue_id,
        mail_from=MAILBOX,
        recipients=("bob@example.net",),
        smtputf8=False,
        body_8bitmime=False,
    )


@pytest.mark.parametrize(
    ("mechanism", "grant", "client_auth"),
    [
        ("xoauth2", "refresh_token", "post"),
        ("oauthbearer", "refresh_token", "basic"),
        ("xoauth2", "client_credentials", "basic"),
        ("oauthbearer", "client_credentials", "post"),
    ],
)
async def test_first_token_delivers(
    peers: Peers, mechanism: str, grant: str, client_auth: str
) -> None:
    transport = peers.transport(mechanism=mechanism, grant=grant, client_auth=client_auth)
    results = await transport.deliver(envelope(), MESSAGE)
    assert [r.outcome for r in results] == [RecipientOutcome.DELIVERED], results
    assert peers.upstream.messages == [(MAILBOX, MESSAGE)]
    (request,) = peers.tokens.requests
    assert request["grant_type"] == grant
    assert request["scope"] == "https://mail.google.com/"
    assert ("client_secret" in request) == (client_auth == "post")
    (attempt,) = peers.upstream.attempts
    assert attempt.mechanism == mechanism.upper() and attempt.accepted


async def test_token_is_cached_across_connections(peers: Peers) -> None:
    transport = peers.transport()
    await transport.deliver(envelope("Q1"), MESSAGE)
    await asyncio.sleep(0.05)  # past the idle timeout: the next delivery reconnects
    await transport.deliver(envelope("Q2"), MESSAGE)
    assert len(peers.upstream.attempts) == 2
    assert len(peers.tokens.requests) == 1


async def test_token_is_refreshed_before_it_expires(peers: Peers) -> None:
    # 6 s tokens, 3 s skew: refreshed once 3 s have passed, while still valid upstream.
    peers.tokens.expires_in = 6
    transport = peers.transport(refresh_skew_seconds=3)
    tokens = transport.pool.tokens
    assert tokens is not None
    first = await tokens.token()
    assert await tokens.token() is first
    await asyncio.sleep(3.2)
    second = await tokens.token()
    assert second is not first
    assert len(peers.tokens.requests) == 2
    # The first was still valid when it was replaced: the refresh came before expiry.
    assert peers.tokens.check(first.value, MAILBOX) is None


async def test_refused_token_is_refreshed_once_and_retried(
    peers: Peers, caplog: pytest.LogCaptureFixture
) -> None:
    transport = peers.transport()
    tokens = transport.pool.tokens
    assert tokens is not None
    stale = await tokens.token()
    peers.tokens.issued[stale.value].revoked = True  # revoked early, upstream side only
    with caplog.at_level(logging.INFO):
        results = await transport.deliver(envelope(), MESSAGE)
    assert [r.outcome for r in results] == [RecipientOutcome.DELIVERED], results
    assert [a.accepted for a in peers.upstream.attempts] == [False, True]
    assert len(peers.tokens.requests) == 2
    # The provider's JSON error (334 challenge) is decoded into the log.
    assert "status=401" in caplog.text and "scope=https://mail.google.com/" in caplog.text


async def test_second_refusal_is_a_config_error_with_the_provider_error(peers: Peers) -> None:
    transport = peers.transport(mechanism="oauthbearer")
    # The token server issues tokens for another subject: the upstream refuses each one.
    peers.tokens.refresh_tokens[REFRESH_TOKEN] = (CLIENT_ID, "someone-else@example.com")
    results = await transport.deliver(envelope(), MESSAGE)
    (result,) = results
    assert result.outcome is RecipientOutcome.CONFIG_ERROR
    assert result.code == 535
    assert "status=invalid_token" in result.detail
    assert "OAuth2 client" in result.detail
    assert [a.accepted for a in peers.upstream.attempts] == [False, False]
    assert len(peers.tokens.requests) == 2  # one refresh, not a loop


async def test_revoked_refresh_token_keeps_mail_queued(peers: Peers) -> None:
    transport = peers.transport()
    peers.tokens.revoke(REFRESH_TOKEN)
    (result,) = await transport.deliver(envelope(), MESSAGE)
    assert result.outcome is RecipientOutcome.CONFIG_ERROR  # kept queued, never bounced
    assert "invalid_grant" in result.detail
    assert "Token has been expired or revoked." in result.detail
    assert "update the Secret" in result.detail
    assert peers.upstream.messages == []
    # A second delivery right after shares the held failure: no new token request.
    (again,) = await transport.deliver(envelope("Q2"), MESSAGE)
    assert again.outcome is RecipientOutcome.CONFIG_ERROR
    assert len(peers.tokens.requests) == 1
    # A new refresh token in the Secret is tried at once, held failure or not.
    peers.tokens.refresh_tokens["1//a-new-refresh-token"] = (CLIENT_ID, MAILBOX)
    await asyncio.sleep(0.01)  # a new mtime even on coarse file systems
    peers.files(refresh_token="1//a-new-refresh-token")
    (delivered,) = await transport.deliver(envelope("Q3"), MESSAGE)
    assert delivered.outcome is RecipientOutcome.DELIVERED, delivered
    assert len(peers.tokens.requests) == 2


async def test_revoked_mid_life_refreshes_then_keeps_queued(peers: Peers) -> None:
    transport = peers.transport()
    await transport.deliver(envelope("Q1"), MESSAGE)
    peers.tokens.revoke(REFRESH_TOKEN)  # the cached access token goes with it
    await asyncio.sleep(0.05)  # past the idle timeout: the next delivery reconnects
    (result,) = await transport.deliver(envelope("Q2"), MESSAGE)
    assert result.outcome is RecipientOutcome.CONFIG_ERROR
    assert "invalid_grant" in result.detail
    assert len(peers.upstream.messages) == 1


async def test_wrong_client_secret_is_a_config_error(peers: Peers) -> None:
    transport = peers.transport(client_secret="not-the-secret-at-all")
    (result,) = await transport.deliver(envelope(), MESSAGE)
    assert result.outcome is RecipientOutcome.CONFIG_ERROR
    assert "invalid_client" in result.detail


async def test_token_endpoint_down_is_temporary(peers: Peers) -> None:
    transport = peers.transport()
    await peers.tokens.stop()
    (result,) = await transport.deliver(envelope(), MESSAGE)
    assert result.outcome is RecipientOutcome.TEMPORARY
    assert "could not be reached" in result.detail


async def test_concurrent_deliveries_share_one_token_request(peers: Peers) -> None:
    peers.tokens.delay = 0.3
    transport = peers.transport()
    results = await asyncio.gather(
        *(transport.deliver(envelope(f"Q{i}"), MESSAGE) for i in range(4))
    )
    assert all(r.outcome is RecipientOutcome.DELIVERED for rs in results for r in rs)
    assert len(peers.tokens.requests) == 1
    # Concurrent refusals of one token lead to one refresh, not one per connection.
    tokens = transport.pool.tokens
    assert tokens is not None
    stale = await tokens.token()
    fresh = await asyncio.gather(*(tokens.refresh(stale) for _ in range(5)))
    assert len({id(t) for t in fresh}) == 1
    assert len(peers.tokens.requests) == 2


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(peers: Peers) -> None:
    peers.tokens.delay = 0.3
    tokens = peers.transport().pool.tokens
    assert tokens is not None
    first = asyncio.create_task(tokens.token())
    second = asyncio.create_task(tokens.token())
    await asyncio.sleep(0.1)
    first.cancel()
    token = await second
    assert peers.tokens.check(token.value, MAILBOX) is None
    assert len(peers.tokens.requests) == 1


async def test_no_secret_reaches_logs_or_results(
    peers: Peers, caplog: pytest.LogCaptureFixture
) -> None:
    transport = peers.transport()
    with caplog.at_level(logging.DEBUG):
        await transport.deliver(envelope("Q1"), MESSAGE)
        tokens = transport.pool.tokens
        assert tokens is not None
        token = await tokens.token()
        peers.tokens.issued[token.value].revoked = True
        await asyncio.sleep(0.05)
        await transport.deliver(envelope("Q2"), MESSAGE)  # refused, refreshed, retried
        peers.tokens.revoke(REFRESH_TOKEN)
        await asyncio.sleep(0.05)
        (failed,) = await transport.deliver(envelope("Q3"), MESSAGE)
    issued = list(peers.tokens.issued)
    assert len(issued) == 2
    secrets = [CLIENT_SECRET, REFRESH_TOKEN, *issued]
    secrets += [base64.b64encode(s.encode()).decode() for s in secrets]
    text = caplog.text + failed.detail
    assert "invalid_grant" in text
    for secret in secrets:
        assert secret not in text


def response(status: int, body: object) -> ApiResponse:
    return ApiResponse(status, {"content-type": "application/json"}, json.dumps(body).encode())


@pytest.mark.parametrize(
    ("status", "body", "config", "words"),
    [
        (400, {"error": "invalid_grant", "error_description": "bad"}, True, "invalid_grant: bad"),
        (401, {"error": "invalid_client"}, True, "invalid_client"),
        (400, {"error": "invalid_scope"}, True, "check scopes"),
        (503, {"error": "temporarily_unavailable"}, False, "temporarily_unavailable"),
        (500, "oops", False, "without an OAuth2 error"),
        (200, {"token_type": "Bearer"}, False, "without an access_token"),
        (200, {"access_token": "abcdefgh", "token_type": "mac"}, True, "Bearer"),
        (200, ["not", "an", "object"], False, "without a JSON object"),
    ],
)
def test_token_endpoint_answers_are_classified(
    status: int, body: object, config: bool, words: str
) -> None:
    with pytest.raises(oauth2.TokenError) as caught:
        oauth2.parse_token_response(response(status, body), endpoint="https://t.example/token")
    assert caught.value.config is config
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("expires_in", "lifetime"), [(3599, 3599.0), ("3599", 3599.0), (None, None), (-1, None)]
)
def test_expires_in_is_read_as_endpoints_send_it(
    expires_in: object, lifetime: float | None
) -> None:
    body: dict[str, object] = {"access_token": "tok-123456", "token_type": "bearer"}
    if expires_in is not None:
        body["expires_in"] = expires_in
    token, seconds, rotated = oauth2.parse_token_response(
        response(200, body), endpoint="https://t.example/token"
    )
    assert (token, seconds, rotated) == ("tok-123456", lifetime, None)


def test_error_challenge_is_decoded() -> None:
    blob = base64.b64encode(b'{"status":"invalid_token","scope":"s","schemes":"bearer"}')
    assert oauth2.error_challenge(blob.decode()) == "status=invalid_token, scope=s, schemes=bearer"
    assert oauth2.error_challenge("not base64 !") is None
    assert oauth2.error_challenge(base64.b64encode(b"[1]").decode()) is None


def test_oauthbearer_initial_response_escapes_the_authzid() -> None:
    raw = base64.b64decode(oauth2.initial_response("oauthbearer", "a,b=c@x", "tok", "h", 587))
    assert raw == b"n,a=a=2Cb=3Dc@x,\x01host=h\x01port=587\x01auth=Bearer tok\x01\x01"


async def test_relay_keeps_mail_queued_until_the_refresh_token_is_replaced(
    peers: Peers, relay_factory: RelayFactory
) -> None:
    """Through the whole relay: a revoked refresh token keeps the message in the spool
    (never bounced, not even past max_age); a new one in the Secret's file delivers it."""
    files = peers.files(
        username=MAILBOX,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        refresh_token=REFRESH_TOKEN,
    )
    route = {
        "name": "out",
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
    peers.tokens.revoke(REFRESH_TOKEN)
    relay = await relay_factory(routes=[route], retry={"max_age_seconds": 0.5})
    data = b"From: alice@example.com\r\nTo: bob@dest.test\r\nSubject: oauth\r\n\r\nHi.\r\n"
    assert await send(relay, ["bob@dest.test"], data) == {}
    admin = SpoolAdmin(spool_of(relay).directory)

    def refused() -> bool:
        queued = admin.list_queue()
        return bool(queued) and "invalid_grant" in (queued[0].recipients[0].last_error or "")

    await eventually(refused)
    await asyncio.sleep(0.6)  # past max_age: still queued, nothing bounced
    [queued] = admin.list_queue()
    assert queued.recipients[0].status == "deferred"
    assert admin.list_dead_letters() == []
    assert relay.metric("mailrelay_upstream_config_errors_total", {"upstream": "gmail"}) >= 1
    # The operator of the mailbox gets a new refresh token into the Secret.
    peers.tokens.refresh_tokens["1//a-new-refresh-token"] = (CLIENT_ID, MAILBOX)
    files["refresh_token"].write_text("1//a-new-refresh-token\n")
    # Delivered at the next retry (backoff at most 1 s), not after the 10 s failure hold.
    await eventually(lambda: len(peers.upstream.messages) == 1, within=5)
    await eventually(lambda: admin.list_queue() == [])
    assert admin.list_dead_letters() == []
