"""`GET /status/upstreams`: each upstream's authentication state, against the real OAuth2
peers of `oauth_peers` (a token endpoint and an SMTP upstream that checks the tokens)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailrelay.relay.redact import Redactor
from mailrelay.relay.upstream_status import (
    MAX_REASON,
    AuthTracker,
    UpstreamAuth,
    UpstreamStatusDocument,
    status_document,
)
from tests.relay.conftest import RelayFactory, RelayHandle
from tests.relay.oauth_peers import CLIENT_ID, CLIENT_SECRET, MAILBOX, REFRESH_TOKEN
from tests.relay.test_delivery_e2e import eventually, send
from tests.relay.test_oauth2 import MESSAGE, Peers, envelope

NEW_REFRESH_TOKEN = "1//a-new-refresh-token-value"


@pytest.fixture
async def oauth(tmp_path: Path) -> AsyncIterator[Peers]:
    p = Peers(tmp_path)
    await p.start()
    yield p
    await p.close()


async def http_get(port: int, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET on loopback."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers.get("Content-Type", ""), body


async def upstream_status(relay: RelayHandle) -> dict[str, Any]:
    status, ctype, body = await http_get(relay.health_port, "/status/upstreams")
    assert (status, ctype) == (200, "application/json")
    UpstreamStatusDocument.model_validate_json(body)  # what the operator parses
    document: dict[str, Any] = json.loads(body)
    return document


def oauth_route(peers: Peers, name: str = "out") -> dict[str, Any]:
    files = peers.files(
        username=MAILBOX,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        refresh_token=REFRESH_TOKEN,
    )
    return {
        "name": name,
        "upstream": {
            "type": "smtp",
            "name": name,
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


DATA = b"From: alice@example.com\r\nTo: bob@dest.test\r\nSubject: oauth\r\n\r\nHi.\r\n"


async def test_revoked_refresh_token_shows_the_decoded_error_and_no_secret(
    oauth: Peers, relay_factory: RelayFactory
) -> None:
    route = oauth_route(oauth)
    relay = await relay_factory(routes=[route])
    # Nothing is known before the upstream is used.
    assert (await upstream_status(relay))["upstreams"] == {}
    # The refresh token was revoked: the first login fails at the token endpoint.
    oauth.tokens.revoke(REFRESH_TOKEN)
    assert await send(relay, ["bob@dest.test"], DATA) == {}

    async def failed() -> bool:
        entry = (await upstream_status(relay))["upstreams"].get("out", {})
        return bool(entry.get("state") == "token_failed")

    for _ in range(100):
        if await failed():
            break
        await asyncio.sleep(0.1)
    _, _, body = await http_get(relay.health_port, "/status/upstreams")
    entry = json.loads(body)["upstreams"]["out"]
    assert entry["state"] == "token_failed"
    assert entry["error"] == "invalid_grant"
    assert "Token has been expired or revoked." in entry["reason"]
    assert "get a new one and update the Secret" in entry["reason"]
    failed_since = entry["since"]
    secrets = [CLIENT_SECRET, REFRESH_TOKEN]
    for secret in secrets:
        assert secret not in body.decode()
    # A retry that fails the same way keeps `since`.
    await asyncio.sleep(1.5)
    assert (await upstream_status(relay))["upstreams"]["out"]["since"] == failed_since
    # A new refresh token in the Secret's file: the state is ok again.
    oauth.tokens.refresh_tokens[NEW_REFRESH_TOKEN] = (CLIENT_ID, MAILBOX)
    oauth.files(refresh_token=NEW_REFRESH_TOKEN)  # the same file the route names
    await eventually(lambda: len(oauth.upstream.messages) == 1, within=15)
    entry = (await upstream_status(relay))["upstreams"]["out"]
    assert entry["state"] == "ok"
    assert entry["error"] is None
    body = (await http_get(relay.health_port, "/status/upstreams"))[2]
    assert oauth.tokens.issued
    for secret in [*secrets, NEW_REFRESH_TOKEN, *oauth.tokens.issued]:
        assert secret not in body.decode()


async def test_refused_token_is_auth_refused_with_the_rfc7628_status(oauth: Peers) -> None:
    transport = oauth.transport(mechanism="oauthbearer")
    assert transport.auth_status() is None
    # Tokens for another mailbox: the upstream refuses each with an error challenge.
    oauth.tokens.refresh_tokens[REFRESH_TOKEN] = (CLIENT_ID, "someone-else@example.com")
    await transport.deliver(envelope(), MESSAGE)
    snapshot = transport.auth_status()
    assert snapshot is not None
    assert snapshot.state == "auth_refused"
    assert snapshot.error == "invalid_token"
    assert snapshot.reason.startswith("535")
    document = status_document({"gmail": snapshot}).model_dump_json()
    for token in oauth.tokens.issued:
        assert token not in document


async def test_wrong_client_secret_is_token_failed_invalid_client(oauth: Peers) -> None:
    transport = oauth.transport(client_secret="not-the-client-secret")
    await transport.deliver(envelope(), MESSAGE)
    snapshot = transport.auth_status()
    assert snapshot is not None
    assert (snapshot.state, snapshot.error) == ("token_failed", "invalid_client")
    assert "not-the-client-secret" not in status_document({"gmail": snapshot}).model_dump_json()


async def test_unreadable_credential_file_is_a_config_error(oauth: Peers) -> None:
    transport = oauth.transport()
    assert transport.upstream.username_file is not None
    transport.upstream.username_file.unlink()
    await transport.deliver(envelope(), MESSAGE)
    snapshot = transport.auth_status()
    assert snapshot is not None
    assert snapshot.state == "config_error"
    assert "cannot read the credentials" in snapshot.reason


def test_document_is_cleaned_redacted_and_bounded() -> None:
    redactor = Redactor()
    redactor.add("hunter2-secret-value")
    clock = iter([1_000.0, 2_000.0, 3_000.0]).__next__
    tracker = AuthTracker(clock=clock)
    tracker.record("token_failed", "refused\r\nwith hunter2-secret-value " + "x" * 2000, "bad\x00")
    tracker.record("token_failed", "again")  # the same state: since stays
    snapshot = tracker.snapshot()
    assert snapshot is not None
    assert snapshot.since == datetime.fromtimestamp(1_000.0, UTC)
    tracker.record("token_failed", "refused\r\nwith hunter2-secret-value " + "x" * 2000, "bad\x00")
    document = status_document({"b": tracker.snapshot(), "a": None}, redactor)
    assert list(document.upstreams) == ["b"]
    entry = document.upstreams["b"]
    assert "hunter2" not in entry.reason
    assert entry.reason.startswith("refused with [redacted] xxx")
    assert len(entry.reason) == MAX_REASON
    assert entry.error == "bad"
    tracker.record("ok")
    ok = tracker.snapshot()
    assert ok == UpstreamAuth(state="ok", since=datetime.fromtimestamp(2_000.0, UTC))


async def test_state_follows_each_login(oauth: Peers) -> None:
    transport = oauth.transport()  # idle connections dropped: every delivery logs in
    await transport.deliver(envelope("Q1"), MESSAGE)
    first = transport.auth_status()
    assert first is not None and first.state == "ok"
    oauth.tokens.revoke(REFRESH_TOKEN)  # the cached access token goes with it
    await asyncio.sleep(0.05)
    await transport.deliver(envelope("Q2"), MESSAGE)
    failed = transport.auth_status()
    assert failed is not None
    assert (failed.state, failed.error) == ("token_failed", "invalid_grant")
    assert failed.since >= first.since
