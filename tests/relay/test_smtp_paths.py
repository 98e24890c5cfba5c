"""The fast MAIL/RCPT path parser against aiosmtpd's full parser, and on a live session."""

from __future__ import annotations

import random
from types import SimpleNamespace

from aiosmtpd.smtp import SMTP

from mailrelay.relay.server import plain_path
from tests.relay.conftest import RelayFactory
from tests.relay.test_smtp_accept import accept_only, cmd

COMMON = [
    "<a@b.c>",
    "<bench@example.com> SIZE=2300 BODY=8BITMIME",
    "<sink@example.net>",
    "<First.Last+tag@sub.example.org>",
    "<a@b.c>  ",
    "<o'brien@x-y.example> NOTIFY=NEVER",
]
ODD = [
    "<>",
    "<> SIZE=1",
    "<a@b.c>X",
    "<a..b@c>",
    "<a@b..c>",
    "<a@b.c.>",
    "<@x:a@b>",
    "<a@[1.2.3.4]>",
    "< a@b>",
    "<a @b>",
    '<"a b"@c>',
    "<a@b.c>\tSIZE=1",
    "<a@b.c> (comment) SIZE=1",
    "<a(b)@c>",
    "<.a@b>",
    "<a.@b>",
    "<a>",
    "<a@>",
    "<@b>",
    "<a@b.c> <d@e>",
    "<ü@b.c>",
    "a@b.c",
    "<a@b.c",
]


def reference(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None]:
    """aiosmtpd's own `_getaddr` (the full RFC 5322 parser)."""
    result: tuple[str | None, str | None] = SMTP._getaddr(
        SimpleNamespace(local_part_limit=local_part_limit),  # type: ignore[arg-type]
        arg,
    )
    return result


def test_plain_paths_take_the_fast_path_with_the_parsers_result() -> None:
    for arg in COMMON:
        assert plain_path(arg) == reference(arg), arg


def test_anything_else_is_left_to_the_full_parser_or_parsed_the_same() -> None:
    for arg in ODD:
        found = plain_path(arg)
        assert found is None or found == reference(arg), arg
    assert plain_path("<>") is None
    assert plain_path("<a@b.c> (comment) SIZE=1") is None
    assert plain_path('<"a b"@c>') is None


def test_random_arguments_never_differ_from_the_full_parser() -> None:
    rng = random.Random(5321)
    alphabet = "ab.@<>  \t()\"[]:,;\\-+=_'Z9\x00é"
    taken = 0
    for _ in range(20_000):
        arg = "<" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        if rng.random() < 0.5:
            arg = "<x@y.z>" + arg[1:]
        found = plain_path(arg)
        if found is not None:
            taken += 1
            assert found == reference(arg), repr(arg)
    assert taken > 1_000  # the fuzz really exercises the fast path


async def test_session_parses_paths_and_keeps_the_local_part_limit(
    relay_factory: RelayFactory,
) -> None:
    relay = await accept_only(relay_factory, allowed_networks=["127.0.0.1/32"])
    async with relay.client(starttls=False) as smtp:
        assert await cmd(smtp, "MAIL FROM:<Plain.Sender@example.com> SIZE=10") == (
            250,
            "2.1.0 Sender OK",
        )
        assert (await cmd(smtp, "RCPT TO:<rcpt+tag@dest.test>"))[0] == 250
        assert await cmd(smtp, "RCPT TO:<a@b..c>") == (501, "5.1.3 Bad address syntax")
        await smtp.rset()
        assert relay.app is not None and relay.app.front is not None
        for session in relay.app.front.sessions:
            session.local_part_limit = 8
        assert (await cmd(smtp, "MAIL FROM:<toolongname@example.com>"))[0] == 501
        assert (await cmd(smtp, "MAIL FROM:<short@example.com>"))[0] == 250
