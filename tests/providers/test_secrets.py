"""No upstream credential ever shows: not in a log record, the spool, a bounce or a metric.

Each test plants a distinctive secret in the upstream's credential files, makes the
upstream (an HTTP provider stand-in, or an SMTP server) answer with an error that echoes
it (raw, in its `Authorization: Basic` form, in SMTP AUTH's base64 form) or makes the HTTP
client's own error quote it, sends real mail through the relay, and then searches
everything the relay produced: every log record (message and traceback), stdout and
stderr, every file in the spool (queue records, journal, dead letters), the bounce the
sender received, and the metrics page.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from mailrelay.relay.redact import REDACTED, Redactor
from mailrelay.support.provider_servers import Fault, ProviderServer
from mailrelay.support.smtp_peers import RecordingUpstream, TlsCerts
from tests.providers.conftest import upstream_fields
from tests.providers.messages import plain_message
from tests.providers.test_relay_e2e import eventually, send
from tests.relay.conftest import RelayFactory, RelayHandle

ServerFactory = Callable[[str], Awaitable[ProviderServer]]
PLANTED = "planted-Secret-7f3a9c41e2"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _spool_bytes(relay: RelayHandle) -> bytes:
    return b"".join(p.read_bytes() for p in relay.spool_dir.rglob("*") if p.is_file())


def assert_nowhere(
    fragments: list[str],
    relay: RelayHandle,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    *more: bytes,
) -> None:
    """None of `fragments` in any output of the relay."""
    assert relay.registry is not None
    out, err = capfd.readouterr()
    texts = {
        "log messages": "\n".join(r.getMessage() for r in caplog.records),
        "formatted logs": caplog.text,
        "stdout": out,
        "stderr": err,
        "spool": _spool_bytes(relay).decode("utf-8", "replace"),
        "metrics": generate_latest(relay.registry).decode(),
        "other": b"\n".join(more).decode("utf-8", "replace"),
    }
    for where, text in texts.items():
        for fragment in fragments:
            assert fragment not in text, f"secret {fragment!r} found in {where}"


def _routes(
    provider: str,
    server: ProviderServer,
    credentials: Path,
    sender_box: RecordingUpstream,
    ca: Path,
) -> list[dict[str, Any]]:
    return [
        {
            "name": f"via-{provider}",
            "match": {"recipient_domains": ["example.org"]},
            "upstream": upstream_fields(provider, server, credentials),
        },
        {
            "name": "senders",
            "match": {"recipient_domains": ["example.com"]},
            "upstream": sender_box.smtp_upstream("sender-mx", ca),
        },
    ]


# (provider, credential file, status, body echoing the secret, fragments to search for)
ECHOES = [
    (
        "postmark",
        "api_key",
        422,
        {"ErrorCode": 300, "Message": f"Invalid 'To' address (server token {PLANTED})"},
        [PLANTED],
    ),
    (
        "sendgrid",
        "api_key",
        401,
        {"errors": [{"message": f"bad header Authorization: Bearer {PLANTED}"}]},
        [PLANTED],
    ),
    (
        "mailgun",
        "api_key",
        500,
        f"rejected Basic {_b64('api:' + PLANTED)}",
        [_b64("api:" + PLANTED)],
    ),
    ("webhook", "signing_secret", 400, f"wrong signing secret, expected {PLANTED}", [PLANTED]),
    ("resend", "api_key", 403, {"message": f"API key {PLANTED} is restricted"}, [PLANTED]),
]


@pytest.mark.parametrize(("provider", "file", "status", "body", "fragments"), ECHOES)
async def test_a_provider_echoing_the_key_leaks_it_nowhere(
    *,
    provider: str,
    file: str,
    status: int,
    body: Any,
    fragments: list[str],
    provider_server: ServerFactory,
    credentials_dir: Path,
    tls_certs: TlsCerts,
    recording_upstream: Callable[..., RecordingUpstream],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    relay_factory: RelayFactory,
) -> None:
    caplog.set_level(logging.DEBUG)
    (credentials_dir / file).write_text(PLANTED + "\n")
    (credentials_dir / "signing_secret").unlink()  # the webhook falls back to api_key
    if file == "signing_secret":
        (credentials_dir / file).write_text(PLANTED + "\n")
    server = await provider_server(provider)
    server.inject(*[Fault(status, body)] * 3)
    sender_box = recording_upstream(tls="none")
    routes = _routes(provider, server, credentials_dir, sender_box, tls_certs.ca_file)
    relay = await relay_factory(routes=routes)
    assert await send(relay, ["bob@example.org"], plain_message()) == {}
    bounces: list[bytes] = []
    if status in (400, 422):  # permanent: the sender gets a bounce quoting the reason
        (bounce,) = await sender_box.wait_for(1)
        assert b"multipart/report" in bounce.data
        bounces.append(bounce.data)
    else:  # temporary or our configuration: retried, kept queued
        await eventually(lambda: len(server.requests) >= 2)
    assert any(REDACTED in r.getMessage() for r in caplog.records), "the echo was never logged"
    assert_nowhere(fragments, relay, caplog, capfd, *bounces)


async def test_an_http_client_error_quoting_the_header_leaks_no_key(
    *,
    provider_server: ServerFactory,
    credentials_dir: Path,
    tls_certs: TlsCerts,
    recording_upstream: Callable[..., RecordingUpstream],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    relay_factory: RelayFactory,
) -> None:
    """A key file with a line break inside makes an illegal header; the HTTP library's
    error quotes the whole header value (escaped), key included."""
    caplog.set_level(logging.DEBUG)
    tail = "Tail-of-the-key-" + PLANTED
    (credentials_dir / "api_key").write_text(f"first-line\n{tail}\n")
    server = await provider_server("sendgrid")
    sender_box = recording_upstream(tls="none")
    routes = _routes("sendgrid", server, credentials_dir, sender_box, tls_certs.ca_file)
    relay = await relay_factory(routes=routes)
    assert await send(relay, ["bob@example.org"], plain_message()) == {}
    await eventually(
        lambda: any(
            "sendgrid" in r.getMessage() and "message" in r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING
        )
    )
    await asyncio.sleep(0.5)  # a retry or two
    assert server.sent == []
    assert_nowhere([tail, PLANTED], relay, caplog, capfd)


class _EchoingAuthServer:
    """An SMTP server that refuses AUTH quoting what it got, decoded and encoded."""

    def __init__(self) -> None:
        self.port = 0
        self.attempts = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 echo.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-echo.test\r\n250 AUTH PLAIN\r\n")
                elif verb == b"AUTH":
                    self.attempts += 1
                    given = line.split()[-1]
                    decoded = base64.b64decode(given).replace(b"\0", b" ")
                    writer.write(b"535 5.7.8 bad credentials " + given + b" = " + decoded + b"\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 Bye\r\n")
                    break
                else:
                    writer.write(b"250 OK\r\n")
                await writer.drain()
        finally:
            writer.close()


async def test_an_smtp_upstream_echoing_our_password_leaks_it_nowhere(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    relay_factory: RelayFactory,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = _EchoingAuthServer()
    await server.start()
    try:
        (tmp_path / "user").write_text("relay-user\n")
        (tmp_path / "password").write_text(PLANTED + "\n")
        upstream = {
            "type": "smtp",
            "name": "echo",
            "host": "127.0.0.1",
            "port": server.port,
            "tls": "none",
            "insecure_allow_plaintext": True,
            "username_file": str(tmp_path / "user"),
            "password_file": str(tmp_path / "password"),
        }
        relay = await relay_factory(routes=[{"name": "out", "upstream": upstream}])
        assert await send(relay, ["bob@example.org"], plain_message()) == {}
        await eventually(lambda: server.attempts >= 2)
        await asyncio.sleep(0.3)
        plain = _b64(f"\0relay-user\0{PLANTED}")
        assert any(REDACTED in r.getMessage() for r in caplog.records), "no echo was logged"
        assert_nowhere([PLANTED, plain], relay, caplog, capfd)
    finally:
        await server.stop()


def test_the_redactor_hides_encoded_forms_and_url_passwords() -> None:
    redactor = Redactor()
    redactor.add("s3cr3t-value/with+chars", "short")
    redactor.add_credentials("user", "pass-word-1")
    text = redactor(
        "raw s3cr3t-value/with+chars; quoted s3cr3t-value%2Fwith%2Bchars; "
        f"b64 {_b64('s3cr3t-value/with+chars')}; basic {_b64('user:pass-word-1')}; "
        f"plain {_b64(chr(0) + 'user' + chr(0) + 'pass-word-1')}; "
        "url https://hook:url-pass@example.test/x; short stays short"
    )
    assert "s3cr3t" not in text
    assert "pass-word-1" not in text and _b64("user:pass-word-1") not in text
    assert "url-pass" not in text and "https://hook:[redacted]@example.test/x" in text
    assert "short stays short" in text  # too short to register: it would garble every line
