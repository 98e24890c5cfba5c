"""Defects the SMTP fuzzer found in the relay's replies, each pinned by a plain test.

Each runs the relay in-process and speaks raw bytes, so what is checked is exactly what
a client sees on the wire.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest

from mailrelay.support.fuzz.wire import Reply, parse_reply
from tests.relay.conftest import RelayFactory, RelayHandle

ROUTE = {
    "name": "default",
    "upstream": {"type": "smtp", "name": "default-up", "host": "127.0.0.1", "port": 9},
}


class RawClient:
    """Raw bytes over asyncio streams; replies parsed and checked by `wire.parse_reply`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, relay: RelayHandle, *, implicit: bool = False) -> RawClient:
        context = ssl.create_default_context(cafile=str(relay.ca_file)) if implicit else None
        port = relay.implicit_tls_port if implicit else relay.smtp_port
        assert port is not None
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost" if implicit else None
        )
        client = cls(reader, writer)
        assert (await client.reply()).code == 220
        return client

    async def reply(self) -> Reply:
        while (reply := parse_reply(self.buffer)) is None:
            chunk = await asyncio.wait_for(self.reader.read(65536), 10)
            assert chunk, f"connection closed, pending {bytes(self.buffer)!r}"
            self.buffer.extend(chunk)
        return reply

    async def command(self, line: bytes) -> Reply:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def starttls(self, relay: RelayHandle) -> None:
        assert (await self.command(b"STARTTLS")).code == 220
        context = ssl.create_default_context(cafile=str(relay.ca_file))
        await self.writer.start_tls(context, server_hostname="localhost")

    def close(self) -> None:
        self.writer.close()


async def _relay(relay_factory: RelayFactory) -> RelayHandle:
    return await relay_factory(
        routes=[ROUTE], enable_delivery=False, listener={"implicit_tls_port": 0}
    )


@pytest.mark.parametrize(
    "line",
    [b"NO\x00OP", b"NOOP\rRSET", b"X\x1b[2J", b"VRFY <\xff@a.test>", b"VRFY <a\x00b@a.test>"],
)
async def test_replies_that_echo_client_input_carry_no_control_characters(
    relay_factory: RelayFactory, line: bytes
) -> None:
    relay = await _relay(relay_factory)
    client = await RawClient.connect(relay)
    try:
        reply = await client.command(line)  # parse_reply refuses control characters
        assert reply.code in (252, 500, 502)
        assert (await client.command(b"NOOP")).code == 250  # nothing left unanswered
    finally:
        client.close()
    assert relay.metric("mailrelay_messages_rejected_total", {"reason": "internal_error"}) == 0


async def test_starttls_inside_tls_is_refused_not_nested(relay_factory: RelayFactory) -> None:
    relay = await _relay(relay_factory)
    client = await RawClient.connect(relay)
    try:
        await client.starttls(relay)
        reply = await client.command(b"STARTTLS")
        assert (reply.code, reply.enhanced) == (503, "5.5.1")
        assert (await client.command(b"EHLO client.test")).code == 250  # still in the TLS
    finally:
        client.close()
    implicit = await RawClient.connect(relay, implicit=True)
    try:
        reply = await implicit.command(b"STARTTLS")
        assert (reply.code, reply.enhanced) == (503, "5.5.1")
    finally:
        implicit.close()


async def test_help_lists_every_command_the_relay_takes(relay_factory: RelayFactory) -> None:
    relay = await _relay(relay_factory)
    client = await RawClient.connect(relay)
    try:
        listed = set((await client.command(b"HELP")).text.split(":", 1)[1].split())
        assert {"MAIL", "RCPT", "DATA", "STARTTLS", "AUTH", "RSET", "NOOP", "QUIT"} <= listed
        for command in (b"MAIL", b"DATA", b"STARTTLS"):
            reply = await client.command(b"HELP " + command)
            assert (reply.code, reply.text.split()[:2]) == (250, ["Syntax:", command.decode()])
    finally:
        client.close()


async def test_commands_pipelined_behind_a_hang_up_in_tls_are_not_an_internal_error(
    relay_factory: RelayFactory,
) -> None:
    """Found by the fuzzer: after the relay answered 421 and closed a TLS session (too many
    unknown commands), a QUIT pipelined behind them still ran, wrote to the closed TLS
    transport and was counted as an internal error with a traceback."""
    relay = await _relay(relay_factory)
    client = await RawClient.connect(relay, implicit=True)
    try:
        client.writer.write(b"".join(b"XBAD%d\r\n" % n for n in range(8)) + b"QUIT\r\n")
        await client.writer.drain()
        codes: list[int] = []
        while not codes or codes[-1] != 421:
            codes.append((await client.reply()).code)
        assert codes[-1] == 421 and set(codes[:-1]) == {500}
        assert await asyncio.wait_for(client.reader.read(), 10) == b""
    finally:
        client.close()
    await asyncio.sleep(0.2)
    assert relay.metric("mailrelay_messages_rejected_total", {"reason": "internal_error"}) == 0
