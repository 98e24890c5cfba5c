"""The DSN builder: parse every bounce back with the `email` package and check it field by field."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message

import pytest

from mailrelay.relay.bounce import FailedRecipient, build_dsn, original_headers, status_for

ORIGINAL = (
    b"Received: from client.test by relay.test; Mon, 30 Nov 2026 23:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net, gone@example.net\r\n"
    b"Subject: quarterly figures\r\n"
    b"Message-ID: <q4@example.com>\r\n"
    b"\r\n"
    b"SECRET BODY that must not come back\r\n"
)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def blocks_of(part: Message) -> list[Message]:
    """The header blocks of a parsed message/delivery-status part."""
    payload = part.get_payload()
    assert isinstance(payload, list)
    blocks = [block for block in payload if isinstance(block, Message)]
    assert len(blocks) == len(payload)
    return blocks


def dsn_for(*failed: FailedRecipient, sender: str = "alice@example.com") -> EmailMessage:
    dsn = build_dsn(
        reporting_mta="relay.test",
        original_sender=sender,
        original_message=ORIGINAL,
        failed=list(failed),
        queue_id="0123456789ABCDEF01234567",
        arrival_date=1_700_000_000,
        now=1_700_000_100,
    )
    return parse(dsn.data)


def test_report_structure_and_fields() -> None:
    message = dsn_for(
        FailedRecipient(
            "gone@example.net", "5.1.1", "550 5.1.1 <gone@example.net>: no such user", "mx.test"
        )
    )

    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["To"] == "alice@example.com"
    assert "MAILER-DAEMON@relay.test" in message["From"]
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Message-ID"]
    assert not message.defects
    text, report, headers = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert "gone@example.net" in text.get_content()
    assert report.get_content_type() == "message/delivery-status"
    per_message, per_rcpt = blocks_of(report)
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_rcpt["Final-Recipient"] == "rfc822; gone@example.net"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone@example.net>: no such user"
    assert headers.get_content_type() == "text/rfc822-headers"


def test_original_headers_come_back_exactly_and_the_body_does_not() -> None:
    dsn = build_dsn(
        reporting_mta="relay.test",
        original_sender="alice@example.com",
        original_message=ORIGINAL,
        failed=[FailedRecipient("gone@example.net", "5.1.1", "550 no such user")],
        queue_id="Q",
        arrival_date=0,
        now=0,
    )

    assert original_headers(ORIGINAL) in dsn.data
    assert b"SECRET BODY" not in dsn.data
    assert dsn.smtputf8 is False
    assert all(len(line) <= 998 for line in dsn.data.split(b"\r\n"))
    assert b"\n" not in dsn.data.replace(b"\r\n", b"")


def test_one_block_per_failed_recipient() -> None:
    message = dsn_for(
        FailedRecipient("a@example.net", "5.1.1", "550 5.1.1 unknown"),
        FailedRecipient("b@example.net", "4.4.7", "451 4.4.1 timed out\r\n  (second line)"),
    )

    report = list(message.iter_parts())[1]
    blocks = blocks_of(report)
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; a@example.net",
        "rfc822; b@example.net",
    ]
    assert [b["Status"] for b in blocks[1:]] == ["5.1.1", "4.4.7"]
    # A multi-line upstream reply is folded into one header line.
    assert blocks[2]["Diagnostic-Code"] == "smtp; 451 4.4.1 timed out (second line)"


def test_utf8_mail_gets_global_types() -> None:
    dsn = build_dsn(
        reporting_mta="relay.test",
        original_sender="jürgen@exämple.com",
        original_message="Subject: grüße\r\n\r\nHallo\r\n".encode(),
        failed=[FailedRecipient("zoë@example.net", "5.1.1", "550 5.1.1 unknown")],
        queue_id="Q",
        arrival_date=0,
        now=0,
    )

    assert dsn.smtputf8 is True
    message = parse(dsn.data)
    _, report, headers = message.iter_parts()
    assert report.get_content_type() == "message/global-delivery-status"
    assert headers.get_content_type() == "message/global-headers"
    assert "Final-Recipient: utf-8; zoë@example.net".encode() in dsn.data
    assert "Subject: grüße\r\n".encode() in dsn.data


def test_null_sender_is_never_bounced() -> None:
    with pytest.raises(ValueError, match="null sender"):
        build_dsn(
            reporting_mta="relay.test",
            original_sender="",
            original_message=ORIGINAL,
            failed=[FailedRecipient("x@example.net", "5.0.0", "550 no")],
            queue_id="Q",
            arrival_date=0,
            now=0,
        )


@pytest.mark.parametrize(
    ("detail", "code", "expired", "status"),
    [
        ("550 5.1.1 No such user", 550, False, "5.1.1"),
        ("550 No such user", 550, False, "5.0.0"),
        ("451 Try later", 451, True, "4.4.7"),
        ("452 4.2.2 Mailbox full", 452, True, "4.2.2"),
        ("connection refused", None, True, "4.4.7"),
        ("4.4.1 upstream 'up': connection refused", None, True, "4.4.7"),
        ("5.1.3 Bad recipient address: address contains a control character", 501, False, "5.1.3"),
        ("upstream does not support SMTPUTF8", None, False, "5.0.0"),
    ],
)
def test_status_for(detail: str, code: int | None, expired: bool, status: str) -> None:
    assert status_for(detail, code, expired=expired) == status


def test_original_headers_of_a_message_without_body() -> None:
    assert original_headers(b"Subject: x\r\n") == b"Subject: x\r\n"
    assert original_headers(b"Subject: x\r\n\r\nbody") == b"Subject: x\r\n"
