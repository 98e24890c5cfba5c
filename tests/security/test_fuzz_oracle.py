"""The fuzzer's oracle can fail: reply parsing, the model of DATA and the delivery ledger,
checked as pure functions on hand-made inputs."""

from __future__ import annotations

import pytest

from mailrelay.support.fuzz.smtp_model import Body, ExpectedMessage, Ledger, Recipient, normalized
from mailrelay.support.fuzz.target import Limits
from mailrelay.support.fuzz.wire import MalformedReply, parse_reply


@pytest.mark.parametrize(
    ("raw", "code", "lines"),
    [
        (b"250 OK\r\n", 250, ("OK",)),
        (b"250-relay.test\r\n250-SIZE 10\r\n250 HELP\r\n", 250, ("relay.test", "SIZE 10", "HELP")),
        (b"354\r\n", 354, ("",)),
        (b"550 5.7.1 Relaying denied\r\n", 550, ("5.7.1 Relaying denied",)),
    ],
)
def test_well_formed_replies_parse(raw: bytes, code: int, lines: tuple[str, ...]) -> None:
    buffer = bytearray(raw + b"250 next")
    reply = parse_reply(buffer)
    assert reply is not None and (reply.code, reply.lines) == (code, lines)
    assert buffer == b"250 next"  # the incomplete next reply stays
    assert parse_reply(buffer) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"250 OK\n",  # bare LF
        b"25 OK\r\n",  # two digits
        b"650 OK\r\n",  # no such class
        b"250-a\r\n251 b\r\n",  # code changes inside a multi-line reply
        b"250OK\r\n",  # no separator
        b'500 Error: command "NO\x00OP" not recognized\r\n',  # control character echoed
        b"250 \xff\r\n",  # not UTF-8
        b"250 5.0.0 class differs\r\n",  # enhanced code of another class
        b"250 " + b"x" * 600 + b"\r\n",  # over 512 octets
    ],
)
def test_malformed_replies_are_refused(raw: bytes) -> None:
    with pytest.raises(MalformedReply):
        parse_reply(bytearray(raw))


def test_body_model_undoes_dot_stuffing_and_predicts_limits() -> None:
    limits = Limits(max_message_size=2000, max_received_headers=2)
    body = Body(b"Subject: x\r\n\r\n.dot\r\n..two\r\nend")
    assert body.wire == b"Subject: x\r\n\r\n..dot\r\n...two\r\nend\r\n.\r\n"
    assert body.stored == b"Subject: x\r\n\r\n.dot\r\n..two\r\nend\r\n"
    assert body.outcome(limits) == {250: "2.0.0"}
    # Unstuffed, the client loses its leading dots (RFC 5321 4.5.2).
    assert Body(b"a\r\n.dot\r\n", stuff=False).stored == b"a\r\ndot\r\n"
    assert Body(b"L" * 1000 + b"\r\n").outcome(limits) == {500: None}
    assert Body((b"x" * 900 + b"\r\n") * 3).outcome(limits) == {552: "5.3.4"}
    assert Body(b"Received: a\r\n" * 3 + b"\r\nx\r\n").outcome(limits) == {554: "5.4.6"}
    # A bare LF does not end a line for the limit, and becomes CRLF upstream.
    assert Body(b"a\n" * 600 + b"\r\n").outcome(limits) == {500: None}
    assert normalized(b"a\nb\rc\r\n") == b"a\r\nb\r\nc\r\n"


RECEIVED = (
    b"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (mailrelay) with ESMTPSA"
    b" id QID1\r\n\tfor <b@a.test>; Mon, 07 Dec 2026 18:00:00 +0000\r\n"
)


def _message(stored: bytes = b"Subject: x\r\n\r\nhi\r\n") -> ExpectedMessage:
    return ExpectedMessage(
        queue_id="QID1",
        mail_from="a@example.com",
        recipients=(Recipient("b@a.test", "route-a"),),
        stored=stored,
        helo="client.test",
        peer="127.0.0.1",
        protocol="ESMTPSA",
    )


def test_ledger_accepts_exactly_what_got_250() -> None:
    ledger = Ledger()
    ledger.accepted(_message())
    data = RECEIVED + b"Subject: x\r\n\r\nhi\r\n"
    assert ledger.missing([]) == {("QID1", "route-a")}
    assert ledger.missing([("route-a", data)]) == set()
    assert ledger.check([("route-a", "a@example.com", ("b@a.test",), data)]) == 1


@pytest.mark.parametrize(
    ("route", "mail_from", "rcpts", "data", "why"),
    [
        ("route-a", "a@example.com", ("b@a.test",), RECEIVED + b"Subject: x\r\n\r\nHI\r\n", "body"),
        ("route-a", "evil@x.test", ("b@a.test",), RECEIVED + b"Subject: x\r\n\r\nhi\r\n", "sender"),
        ("route-a", "a@example.com", ("c@a.test",), RECEIVED + b"Subject: x\r\n\r\nhi\r\n", "rcpt"),
        (
            "route-b",
            "a@example.com",
            ("b@a.test",),
            RECEIVED + b"Subject: x\r\n\r\nhi\r\n",
            "route",
        ),
        (
            "route-a",
            "a@example.com",
            ("b@a.test",),
            RECEIVED.replace(b"QID1", b"QID2") + b"Subject: x\r\n\r\nhi\r\n",
            "no 250",
        ),
        (
            "route-a",
            "a@example.com",
            ("b@a.test",),
            RECEIVED.replace(b"ESMTPSA", b"ESMTP") + b"Subject: x\r\n\r\nhi\r\n",
            "protocol",
        ),
    ],
)
def test_ledger_refuses_any_other_delivery(
    route: str, mail_from: str, rcpts: tuple[str, ...], data: bytes, why: str
) -> None:
    ledger = Ledger()
    ledger.accepted(_message())
    with pytest.raises(AssertionError):
        ledger.check([(route, mail_from, rcpts, data)])
