"""relay/smtp_base.py against the aiosmtpd it overrides, and aiosmtpd's log as the relay sets it.

The overrides rely on aiosmtpd's private methods and attributes: any other installed
version must fail here, loudly, before anything subtler breaks; and each internal the
module uses must exist with the signature it calls. The copies of aiosmtpd's code
(`smtp_DATA`, `auth_PLAIN`, `auth_LOGIN`) are pinned to the source they were copied from.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import re
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import aiosmtpd
import aiosmtpd.smtp
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailrelay.relay import smtp_base
from mailrelay.relay.smtp_base import SMTPBase, quiet_aiosmtpd_log

from .conftest import USERS, RelayFactory
from .test_smtp_accept import LOOPBACK, accept_only, cmd

ROOT = Path(__file__).resolve().parents[2]
RELAY_PACKAGE = Path(smtp_base.__file__).parent

# The private methods the module overrides or calls, with their parameters in 1.4.6.
PRIVATE_METHODS = {
    "_handle_client": ["self"],
    "_create_envelope": ["self"],
    "_getaddr": ["self", "arg"],
    "_reset_timeout": ["self", "duration"],
    "_timeout_cb": ["self"],
    "_set_post_data_state": ["self"],
    "_call_handler_hook": ["self", "command", "args"],
}
# Public methods whose aiosmtpd code the module copies or calls from the copies.
COPIED_OR_CALLED = {
    "smtp_DATA": ["self", "arg"],
    "smtp_STARTTLS": ["self", "arg"],
    "auth_PLAIN": ["self", "_", "args"],
    "auth_LOGIN": ["self", "_", "args"],
    "check_helo_needed": ["self", "helo"],
    "check_auth_needed": ["self", "caller_method"],
    "challenge_auth": ["self", "challenge", "encode_to_b64", "log_client_response"],
    "connection_made": ["self", "transport"],
    "connection_lost": ["self", "error"],
}
# sha256 of aiosmtpd's source of each method SMTPBase carries a copy of.
COPIED_SOURCE = {
    "smtp_DATA": "3a33f30d3fd6d02f",
    "auth_PLAIN": "71fe14c537cc5039",
    "auth_LOGIN": "f121f6cb809cc2ad",
}


def test_the_overrides_hook_into_the_aiosmtpd_version_they_were_tested_with() -> None:
    installed = metadata.version("aiosmtpd")
    assert installed == smtp_base.AIOSMTPD_VERSION == aiosmtpd.__version__, (
        f"aiosmtpd {installed} is installed, but relay/smtp_base.py overrides the internals "
        f"of aiosmtpd {smtp_base.AIOSMTPD_VERSION}: review every override listed in its "
        "docstring against the new version, then move the pin"
    )
    dependencies = tomllib.loads((ROOT / "relay" / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    assert f"aiosmtpd=={smtp_base.AIOSMTPD_VERSION}" in dependencies
    for name, parameters in {**PRIVATE_METHODS, **COPIED_OR_CALLED}.items():
        assert list(inspect.signature(getattr(SMTP, name)).parameters) == parameters, name
    for name, digest in COPIED_SOURCE.items():
        source = inspect.getsource(getattr(SMTP, name))
        assert hashlib.sha256(source.encode()).hexdigest()[:16] == digest, (
            f"aiosmtpd's SMTP.{name} changed: SMTPBase.{name} is a copy of it"
        )
    # The replies the relay rewrites, and the one log line it drops, are aiosmtpd's words.
    source = inspect.getsource(aiosmtpd.smtp)
    for text in (
        smtp_base.AIOSMTPD_MALFORMED_REPLY,
        smtp_base.AIOSMTPD_BOGUS_REPLY,
        f"{smtp_base.AIOSMTPD_TOO_LARGE_PREFIX}: Too much mail data",
        smtp_base.LOGIN_DATA_DEPRECATION,
    ):
        assert f'"{text}' in source or f"'{text}" in source, text


def _aiosmtpd_private_names() -> set[str]:
    """Underscored names of aiosmtpd's SMTP (class and session state), and the private
    stream attributes the module reaches through it."""
    names = {n for n in dir(SMTP) if n.startswith("_") and not n.startswith("__")}
    loop = asyncio.new_event_loop()
    try:
        session = SMTP(_Handler(), loop=loop)
        names |= {n for n in vars(session) if n.startswith("_") and not n.startswith("__")}
    finally:
        loop.close()
    return names | {"_reader", "_writer", "_buffer", "_extra", "_app_transport"}


def test_no_other_relay_module_touches_aiosmtpd_internals() -> None:
    private = _aiosmtpd_private_names()
    assert {"_handle_client", "_handler_coroutine", "_tls_protocol", "_getaddr"} <= private
    attribute = re.compile(r"\.(_[A-Za-z0-9_]+)\b")
    offenders = []
    for path in sorted(RELAY_PACKAGE.rglob("*.py")):
        if path.name == "smtp_base.py":
            continue
        source = path.read_text()
        if "aiosmtpd" not in source:
            continue
        for number, line in enumerate(source.splitlines(), 1):
            used = set(attribute.findall(line)) & private
            if used:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {sorted(used)}")
        # Subclassing aiosmtpd's SMTP directly would bypass the module as well.
        assert not re.search(r"from aiosmtpd\.smtp import[^\n]*\bSMTP\b", source), path
    assert offenders == [], "aiosmtpd internals outside relay/smtp_base.py"


class _Handler:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


async def test_a_live_session_has_the_private_state_the_module_uses() -> None:
    """The instance attributes SMTPBase reads or clears, on a real loopback session."""
    sessions: list[SMTPBase] = []

    def factory() -> SMTPBase:
        session = SMTPBase(_Handler())
        sessions.append(session)
        return session

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await reader.readline()).startswith(b"220 ")
        writer.write(b"EHLO client.test\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        (session,) = sessions
        assert isinstance(session._reader, asyncio.StreamReader)
        assert isinstance(session._reader._buffer, bytearray)  # type: ignore[attr-defined]
        assert session._reader._transport is session.transport  # type: ignore[attr-defined]
        assert isinstance(session._writer, asyncio.StreamWriter)
        assert isinstance(session._handler_coroutine, asyncio.Task)
        assert session._tls_protocol is None and not session.starttls_done
        assert session._original_transport is None
        assert set(session._auth_methods) == {"LOGIN", "PLAIN"} and session.offers_auth
        assert session._decode_data is False
        assert session.session is not None and session.session.ssl is None
        assert not session.tls_handshake_running
        assert isinstance(session.envelope, Envelope)
        writer.write(b"QUIT\r\n")
        assert (await reader.readline()).startswith(b"221 ")
        for _ in range(100):
            if session._handler_coroutine is None:
                break
            await asyncio.sleep(0.01)
        # Over: the references that form cycles with the session are dropped.
        assert session._handler_coroutine is None
        assert session._reader._transport is None
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
def relay_log_setup() -> Iterator[logging.Logger]:
    """aiosmtpd's logger as the relay sets it up at start, restored afterwards."""
    logger = logging.getLogger("mail.log")
    level, filters = logger.level, list(logger.filters)
    quiet_aiosmtpd_log()
    quiet_aiosmtpd_log()  # idempotent: one filter
    try:
        yield logger
    finally:
        logger.setLevel(level)
        logger.filters[:] = filters


async def test_aiosmtpd_warnings_are_logged_but_not_its_login_data_deprecation(
    relay_factory: RelayFactory,
    relay_log_setup: logging.Logger,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert len(relay_log_setup.filters) == 1
    relay = await relay_factory()
    async with relay.client(login=("alice", USERS["alice"])) as smtp:
        # aiosmtpd warns about an unknown command itself, then answers 500.
        reply = await smtp.execute_command(b"FROBNICATE")
        assert reply.code == 500
    aiosmtpd_lines = [r for r in caplog.records if r.name == "mail.log"]
    messages = [r.getMessage() for r in aiosmtpd_lines]
    assert any("unrecognised: FROBNICATE" in m for m in messages), messages
    assert not any("login_data" in m for m in messages), messages
    # Its INFO line per command stays out.
    assert all(r.levelno >= logging.WARNING for r in aiosmtpd_lines), messages


def test_only_the_login_data_deprecation_is_filtered(relay_log_setup: logging.Logger) -> None:
    def record(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
        return relay_log_setup.makeRecord("mail.log", level, __file__, 1, msg, (), None)

    assert not relay_log_setup.filter(
        record("Session.login_data is deprecated and will be removed in version 2.0")
    )
    assert relay_log_setup.filter(record("%r unrecognised: %s"))
    assert relay_log_setup.filter(record("Session.auth_data is deprecated"))
    assert relay_log_setup.filter(record("%r too many bogus commands", logging.ERROR))
    assert not relay_log_setup.isEnabledFor(logging.INFO)
    assert relay_log_setup.isEnabledFor(logging.WARNING)


async def test_the_running_relay_logs_aiosmtpd_warnings_but_not_the_login_data_deprecation(
    relay_factory: RelayFactory,
) -> None:
    """The same through the relay's own start-up (`main`), as a real process."""
    relay = await relay_factory(subprocess=True)
    async with relay.client(login=("alice", USERS["alice"])) as smtp:
        assert (await smtp.execute_command(b"FROBNICATE")).code == 500
        assert (await smtp.noop()).code == 250
    log = ""
    for _ in range(50):
        log = relay.log()
        if "FROBNICATE" in log:
            break
        await asyncio.sleep(0.1)
    assert "unrecognised: FROBNICATE" in log, log
    assert "login_data" not in log, log
    assert "Available AUTH mechanisms" not in log, log  # aiosmtpd's INFO lines stay out


async def test_starttls_state_read_through_the_named_hooks(relay_factory: RelayFactory) -> None:
    """`starttls_done` refuses a second STARTTLS; `tls_handshake_running` keeps the idle
    timeout's 421 out of a handshake in progress (plain text there would corrupt it)."""
    relay = await accept_only(
        relay_factory, allowed_networks=LOOPBACK, limits={"command_timeout_seconds": 0.3}
    )
    async with relay.client() as smtp:  # STARTTLS done
        assert await cmd(smtp, "STARTTLS") == (503, "5.5.1 TLS already active")
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    try:
        await reader.readline()
        writer.write(b"EHLO c\r\nSTARTTLS\r\n")
        await asyncio.wait_for(reader.readuntil(b"220 "), 3)
        await reader.readline()
        # No ClientHello: the command timeout fires in the middle of the handshake.
        with contextlib.suppress(ConnectionError):
            rest = await asyncio.wait_for(reader.read(), 3)
            assert b"421" not in rest
        assert relay.metric("mailrelay_messages_rejected_total", {"reason": "timeout"}) == 1
    finally:
        writer.close()


@pytest.mark.parametrize("client", ["hangs_up", "stays_silent"])
async def test_a_starttls_handshake_that_never_ends_does_not_keep_the_session(
    relay_factory: RelayFactory, client: str
) -> None:
    """asyncio's SSLProtocol never tells its app protocol (aiosmtpd's session) that the
    connection ended while the handshake ran: the session stayed open and counted against
    `max_connections` and the per-client limit for good. The idle timeout now ends it."""
    relay = await accept_only(
        relay_factory,
        allowed_networks=LOOPBACK,
        limits={"command_timeout_seconds": 0.3, "max_connections": 1},
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    await reader.readline()
    writer.write(b"EHLO c\r\nSTARTTLS\r\n")
    await asyncio.wait_for(reader.readuntil(b"220 "), 3)
    await reader.readline()
    if client == "hangs_up":
        writer.close()
    active = 1.0
    for _ in range(40):
        active = relay.metric("mailrelay_smtp_sessions_active")
        if active == 0:
            break
        await asyncio.sleep(0.05)
    writer.close()
    assert active == 0
    # The one connection allowed is free again.
    async with relay.client() as smtp:
        assert (await smtp.noop()).code == 250
