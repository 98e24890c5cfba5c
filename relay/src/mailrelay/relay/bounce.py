"""Delivery status notifications (bounces): a pure builder for RFC 3464 reports.

`build_dsn` returns the bytes of a `multipart/report; report-type=delivery-status`
message (RFC 6522) with three parts: a human explanation (`text/plain`), the machine
report (`message/delivery-status`: one per-message block, then one block per failed
recipient with Final-Recipient, Action, Status, Diagnostic-Code), and the original
message's header section (`text/rfc822-headers`), never its body, so a bounce cannot
carry a large attachment back or leak more than the sender already had.

The envelope of a bounce is the caller's business: it is sent with the null reverse-path
(`MAIL FROM:<>`) so that it can never be bounced in turn. When the failed recipients or
the original headers are not ASCII (SMTPUTF8 mail), the RFC 6533 types
`message/global-delivery-status` and `message/global-headers` are used and the result
says it needs SMTPUTF8.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage, MIMEPart

__all__ = ["Dsn", "FailedRecipient", "build_dsn", "original_headers", "status_for"]

_ENHANCED_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient the relay gave up on, with what the upstream said."""

    address: str
    status: str  # RFC 3463 enhanced status, e.g. "5.1.1"
    diagnostic: str  # the upstream's reply or our reason, free text
    remote_mta: str | None = None
    last_attempt: float | None = None


@dataclass(frozen=True)
class Dsn:
    """A bounce ready to enqueue: bytes, and whether it needs SMTPUTF8 to travel."""

    data: bytes
    smtputf8: bool


def status_for(detail: str, code: int | None, *, expired: bool = False) -> str:
    """The enhanced status code for a failure: the upstream's own, else one derived.

    An expired temporary failure reports 4.4.7 ("delivery time expired"), as Postfix and
    Sendmail do; a permanent one without an enhanced code reports 5.0.0.
    """
    match = _ENHANCED_STATUS.search(detail)
    # An expired failure keeps an upstream's own code (a reply came with it); the relay's
    # words for a connection problem ("4.4.1 ... connection refused") give way to 4.4.7.
    if match is not None and (code is not None or not expired):
        return ".".join(match.groups())
    if expired:
        return "4.4.7"
    if code is not None and 400 <= code < 500:
        return "4.0.0"
    return "5.0.0"


def original_headers(message: bytes) -> bytes:
    """The header section of a message, up to (not including) the blank line."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = message.find(separator)
        if end >= 0:
            return message[: end + len(separator) // 2]
    return message


def _is_ascii(text: str | bytes) -> bool:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return data.isascii()


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _one_line(text: str) -> str:
    """Header values must not break lines; upstream replies sometimes span several."""
    return " ".join(text.split())


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    original_message: bytes,
    failed: list[FailedRecipient],
    queue_id: str,
    arrival_date: float,
    now: float,
    message_id_domain: str | None = None,
) -> Dsn:
    """A complete bounce message for `failed`, addressed to `original_sender`."""
    if not failed:
        raise ValueError("a bounce needs at least one failed recipient")
    if not original_sender:
        raise ValueError("a message with the null sender is never bounced")
    headers = original_headers(original_message)
    utf8 = not (_is_ascii(headers) and all(_is_ascii(f.address) for f in failed))
    utf8 = utf8 or not _is_ascii(original_sender)

    smtp_policy = (policy.SMTPUTF8 if utf8 else policy.SMTP).clone(max_line_length=998)
    boundary = f"=_dsn_{secrets.token_hex(12)}"

    root = EmailMessage(policy=smtp_policy)
    root["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    root["To"] = original_sender
    root["Subject"] = "Undelivered Mail Returned to Sender"
    root["Date"] = email.utils.formatdate(now, usegmt=True)
    root["Message-ID"] = email.utils.make_msgid(
        "dsn." + queue_id, message_id_domain or reporting_mta
    )
    # RFC 3834: an automatic reply, so autoresponders must not answer it.
    root["Auto-Submitted"] = "auto-replied"
    root["MIME-Version"] = "1.0"
    root["Content-Type"] = f'multipart/report; report-type=delivery-status; boundary="{boundary}"'

    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "Its headers are attached below. The reasons, as reported:",
        "",
    ]
    lines += [f"<{f.address}>: {_one_line(f.diagnostic)}" for f in failed]
    text = "\r\n".join(lines) + "\r\n"
    # Quoted-printable keeps a non-ASCII explanation readable in a raw view.
    explanation = MIMEPart(policy=smtp_policy)
    if text.isascii():
        explanation.set_content(text, subtype="plain", charset="us-ascii", cte="7bit")
    else:
        explanation.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
    explanation["Content-Description"] = "Notification"

    def block(fields: list[tuple[str, str]]) -> bytes:
        return b"".join(f"{name}: {value}\r\n".encode() for name, value in fields)

    blocks = [
        block(
            [
                ("Reporting-MTA", f"dns; {reporting_mta}"),
                ("X-Queue-ID", queue_id),
                ("Arrival-Date", email.utils.formatdate(arrival_date, usegmt=True)),
            ]
        )
    ]
    for rcpt in failed:
        address_type = "utf-8" if not _is_ascii(rcpt.address) else "rfc822"
        fields = [
            ("Final-Recipient", f"{address_type}; {rcpt.address}"),
            ("Action", "failed"),
            ("Status", rcpt.status),
        ]
        if rcpt.remote_mta:
            fields.append(("Remote-MTA", f"dns; {rcpt.remote_mta}"))
        fields.append(("Diagnostic-Code", f"smtp; {_one_line(rcpt.diagnostic)}"))
        if rcpt.last_attempt is not None:
            last = email.utils.formatdate(rcpt.last_attempt, usegmt=True)
            fields.append(("Last-Attempt-Date", last))
        blocks.append(block(fields))

    # The machine-readable parts are assembled by hand: the email generator refolds
    # report blocks, knows no RFC 6533 "global" types, and would re-encode the original
    # headers, which must go back byte for byte.
    eight_bit = b"Content-Transfer-Encoding: 8bit\r\n" if utf8 else b""
    report_type = b"message/global-delivery-status" if utf8 else b"message/delivery-status"
    headers_type = b"message/global-headers" if utf8 else b"text/rfc822-headers"
    parts = [
        explanation.as_bytes(policy=smtp_policy),
        b"Content-Type: " + report_type + b"\r\n"
        b"Content-Description: Delivery report\r\n" + eight_bit + b"\r\n" + b"\r\n".join(blocks),
        b"Content-Type: " + headers_type + b"\r\n"
        b"Content-Description: Undelivered message headers\r\n"
        + eight_bit
        + b"\r\n"
        + _crlf(headers),
    ]
    delimiter = b"--" + boundary.encode()
    data = b"".join(smtp_policy.fold_binary(name, value) for name, value in root.items())
    data += b"\r\n"
    data += b"This is a MIME-encapsulated delivery status notification.\r\n"
    for part in parts:
        data += b"\r\n" + delimiter + b"\r\n" + part
        if not part.endswith(b"\r\n"):
            data += b"\r\n"
    data += b"\r\n" + delimiter + b"--\r\n"
    return Dsn(data=data, smtputf8=utf8)
