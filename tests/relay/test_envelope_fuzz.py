"""Property: one client's bad envelopes never change another client's mail.

A relay delivers to two real aiosmtpd upstreams on loopback, one with PIPELINING and one
without, each through a pool of a single connection (so every message shares it). Each
hypothesis example runs, at the same time, one hostile session that sends random
envelopes (control characters, NUL, undecodable bytes, non-ASCII with and without
SMTPUTF8, mixed with routable recipients) and a few well-behaved sessions from other
clients. The well-behaved messages must all arrive, each exactly once, byte for byte,
to exactly their recipients, and nothing may bounce or be dead-lettered for them.

The default profile is short (`FUZZ_EXAMPLES`, default 40 examples, under ten seconds) so it
runs in `make test`; set `MAILRELAY_FUZZ_EXAMPLES` for a longer run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay.relay.spool import Spool
from mailrelay.relay.spool_admin import SpoolAdmin
from mailrelay.support.smtp_peers import RecordingUpstream, TlsCerts
from tests.relay.conftest import RelayFactory, RelayHandle
from tests.relay.delivery_fixtures import Upstream, start_upstream
from tests.relay.test_envelope_addresses import RawSession

FUZZ_EXAMPLES = int(os.environ.get("MAILRELAY_FUZZ_EXAMPLES", "40"))
DOMAINS = ("a.test", "b.test")  # a.test: no PIPELINING; b.test: PIPELINING


@dataclass
class World:
    relay: RelayHandle
    plain: RecordingUpstream
    pipelined: Upstream
    counter: int = 0

    def arrived(self) -> list[tuple[str, tuple[str, ...], bytes]]:
        """(mail_from, rcpt_tos, data) of everything both upstreams received."""
        got = [(m.mail_from, m.rcpt_tos, m.data) for m in self.plain.snapshot()]
        return got + [(m.mail_from, m.rcpt_tos, m.data) for m in self.pipelined.messages]


@pytest.fixture
async def world(
    relay_factory: RelayFactory,
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
) -> AsyncIterator[World]:
    plain = recording_upstream(tls="starttls")
    pipelined = await start_upstream(tls="none", pipelining=True)
    routes: list[dict[str, Any]] = [
        {
            "name": "a",
            "match": {"recipient_domains": ["a.test"]},
            "upstream": plain.smtp_upstream("a-up", tls_certs.ca_file, pool_size=1),
        },
        {
            "name": "b",
            "match": {"recipient_domains": ["b.test"]},
            "upstream": {
                "type": "smtp",
                "name": "b-up",
                "host": pipelined.host,
                "port": pipelined.port,
                "tls": "none",
                "insecure_allow_plaintext": True,
                "pool_size": 1,
                "connect_timeout_seconds": 2,
                "timeout_seconds": 5,
            },
        },
    ]
    relay = await relay_factory(routes=routes, allowed_networks=["127.0.0.0/8"])
    try:
        yield World(relay=relay, plain=plain, pipelined=pipelined)
    finally:
        await relay.stop()
        await pipelined.stop()


@contextlib.asynccontextmanager
async def session(relay: RelayHandle) -> AsyncIterator[RawSession]:
    reader, writer = await asyncio.open_connection(relay.host, relay.smtp_port)
    smtp = RawSession(reader, writer)
    try:
        await smtp.reply()
        await smtp.send(b"EHLO fuzz.test")
        yield smtp
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# -- hostile envelopes ----------------------------------------------------------------

_NASTY = st.sampled_from(
    [
        *("\x00", "\x01", "\x07", "\x08", "\x1b", "\x7f", "\r", "\t", " ", "\udcff", "\udc80"),
        *("\x85", "\u00a0", "\u2028", "é", "ß", "漢", '"', "\\", "<", ">", "(", ")", ".", ","),
    ]
)
_PLAIN = st.sampled_from(list("abcxyz019.-+_"))


@st.composite
def hostile_address(draw: st.DrawFn) -> bytes:
    """An address with at least one character that should never go upstream raw, or a
    non-ASCII one; routed to one of our upstreams, or not."""
    local = draw(st.lists(st.one_of(_PLAIN, _NASTY), min_size=1, max_size=8))
    if not any(c in "\x00\x01\x07\x08\x1b\x7f\r\t\udcff\udc80\x85éß漢" for c in local):
        local.append(draw(_NASTY))
    domain = draw(st.sampled_from([*DOMAINS, "exämple.a.test", "nowhere.test"]))
    text = "".join(draw(st.permutations(local))) + "@" + domain
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Hostile:
    sender: bytes
    smtputf8: bool
    recipients: tuple[bytes, ...]
    send_data: bool


hostile = st.builds(
    Hostile,
    sender=st.one_of(st.just(b"evil@attacker.test"), st.just(b""), hostile_address()),
    smtputf8=st.booleans(),
    recipients=st.lists(
        st.one_of(hostile_address(), st.sampled_from([b"ok@a.test", b"ok@b.test"])),
        min_size=1,
        max_size=5,
    ).map(tuple),
    send_data=st.booleans(),
)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def must_refuse(address: bytes, smtputf8: bool) -> bool:
    """Whether the relay may never answer 250 for this address."""
    try:
        text = address.decode("utf-8")
    except UnicodeDecodeError:
        return True
    # Non-ASCII only in a comment is dropped with it by the parser, never sent.
    non_ascii = not text.isascii() and b"(" not in address
    return bool(_CONTROL.search(text)) or (not smtputf8 and non_ascii)


async def run_hostile(relay: RelayHandle, plan: Hostile) -> None:
    async with session(relay) as smtp:
        mail = b"MAIL FROM:<" + plan.sender + b">" + (b" SMTPUTF8" if plan.smtputf8 else b"")
        code, _ = await smtp.send(mail)
        if must_refuse(plan.sender, plan.smtputf8):
            assert code != 250, plan.sender
        if code != 250:
            return
        accepted = []
        for rcpt in plan.recipients:
            code, _ = await smtp.send(b"RCPT TO:<" + rcpt + b">")
            if must_refuse(rcpt, plan.smtputf8):
                assert code != 250, rcpt
            accepted.append(code == 250)
        if plan.send_data and any(accepted):
            assert (await smtp.send(b"DATA"))[0] == 354
            await smtp.send(b"Subject: hostile\r\n\r\nx\r\n.")
        await smtp.send(b"QUIT")


# -- well-behaved clients -------------------------------------------------------------


@dataclass(frozen=True)
class Valid:
    sender: str
    recipients: tuple[str, ...]
    data: bytes


async def run_valid(relay: RelayHandle, message: Valid) -> None:
    async with session(relay) as smtp:
        assert (await smtp.send(f"MAIL FROM:<{message.sender}>".encode()))[0] == 250
        for rcpt in message.recipients:
            assert (await smtp.send(f"RCPT TO:<{rcpt}>".encode()))[0] == 250
        assert (await smtp.send(b"DATA"))[0] == 354
        code, text = await smtp.send(message.data + b".")
        assert code == 250, text
        await smtp.send(b"QUIT")


def valid_messages(world: World, shapes: list[tuple[int, ...]]) -> list[Valid]:
    out = []
    for shape in shapes:
        world.counter += 1
        n = world.counter
        rcpts = tuple(f"u{n}-{i}@{DOMAINS[d]}" for i, d in enumerate(shape))
        data = (
            f"From: s{n}@a.test\r\nTo: {', '.join(rcpts)}\r\nSubject: valid {n}\r\n"
            f"Message-ID: <valid-{n}@fuzz.test>\r\n\r\nBody of {n}.\r\n"
        ).encode()
        out.append(Valid(sender=f"s{n}@a.test", recipients=rcpts, data=data))
    return out


async def wait_for_valid(world: World, messages: list[Valid], within: float = 15.0) -> None:
    """Until every valid message's recipients all arrived (then checked exactly)."""
    deadline = time.monotonic() + within
    while True:
        arrived = world.arrived()
        missing = [
            m
            for m in messages
            if {r for _, rcpts, data in arrived if data.endswith(m.data) for r in rcpts}
            != set(m.recipients)
        ]
        if not missing:
            return
        if time.monotonic() > deadline:
            dead = SpoolAdmin(world.relay.spool_dir).list_dead_letters()
            raise AssertionError(f"not delivered: {[m.sender for m in missing]}; dead: {dead}")
        await asyncio.sleep(0.05)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    attacks=st.lists(hostile, min_size=1, max_size=3),
    shapes=st.lists(
        st.lists(st.integers(0, 1), min_size=1, max_size=2).map(tuple), min_size=1, max_size=3
    ),
)
async def test_hostile_envelopes_never_change_other_clients_mail(
    world: World, attacks: list[Hostile], shapes: list[tuple[int, ...]]
) -> None:
    messages = valid_messages(world, shapes)
    # All sessions at once, hostile ones started first in each pair: their messages and
    # the valid ones share each upstream's single pooled connection.
    jobs = []
    for index in range(max(len(attacks), len(messages))):
        if index < len(attacks):
            jobs.append(run_hostile(world.relay, attacks[index]))
        if index < len(messages):
            jobs.append(run_valid(world.relay, messages[index]))
    await asyncio.gather(*jobs)
    await wait_for_valid(world, messages)

    arrived = world.arrived()
    for message in messages:
        copies = [
            (sender, rcpts, data) for sender, rcpts, data in arrived if data.endswith(message.data)
        ]
        # Exactly once per recipient, from its sender, with only our Received header added.
        assert sorted(r for _, rcpts, _ in copies for r in rcpts) == sorted(message.recipients)
        for sender, _, data in copies:
            assert sender == message.sender
            assert data.startswith(b"Received: from fuzz.test")
            assert data.count(b"\r\nReceived: ") == 0
    senders = {m.sender for m in messages}
    # Nothing of theirs bounced (a bounce has the null sender and goes to a.test).
    bounces = [rcpts for sender, rcpts, _ in arrived if sender in ("", "<>")]
    assert not [rcpts for rcpts in bounces if set(rcpts) & senders]
    spool = Spool(world.relay.spool_dir)
    for entry in SpoolAdmin(spool.directory).list_dead_letters():
        assert entry.mail_from not in senders, entry
