"""Test messages as a mail client would submit them (CRLF line ends, no Bcc header)."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage

# A PNG header plus every byte value: binary content that any re-encoding would break.
INLINE_IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
BINARY_ATTACHMENT = bytes((i * 7 + 3) % 256 for i in range(5000)) + b"\r\n\x00\r\r\n"
TEXT_BODY = "Hello Zoë,\n\nthe report is attached.\n"
HTML_BODY = '<p>Hello Zoë,</p><p><img src="cid:logo@example.com"> the report.</p>\n'
SUBJECT = "Quarterly report: Übersicht ✓"
FILENAME = "Bericht-Größe-ü.pdf"


def rich_message(
    *,
    sender: str = "Ann Sender <ann@example.com>",
    to: str = "Bob <bob@example.org>",
    cc: str | None = "carol@example.net",
    reply_to: str | None = "replies@example.com",
    extra_headers: dict[str, str] | None = None,
) -> bytes:
    """Text + HTML alternative, an inline image, a binary attachment, non-ASCII names."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = SUBJECT
    msg["Message-ID"] = "<rich-1@example.com>"
    msg["Date"] = "Mon, 30 Nov 2026 12:00:00 +0000"
    msg["X-Campaign"] = "q4-report"
    for name, value in (extra_headers or {}).items():
        msg[name] = value
    msg.set_content(TEXT_BODY)
    msg.add_alternative(HTML_BODY, subtype="html")
    payload = msg.get_payload()
    assert isinstance(payload, list)
    html_part = payload[1]
    assert isinstance(html_part, EmailMessage)
    html_part.add_related(
        INLINE_IMAGE,
        "image",
        "png",
        cid="<logo@example.com>",
        disposition="inline",
        filename="logo.png",
    )
    msg.add_attachment(BINARY_ATTACHMENT, maintype="application", subtype="pdf", filename=FILENAME)
    return msg.as_bytes()


def plain_message(
    *,
    sender: str = "ann@example.com",
    to: str = "bob@example.org",
    subject: str = "Plain hello",
    body: str = "Just text.\n",
) -> bytes:
    """A one-part text message."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = "<plain-1@example.com>"
    msg.set_content(body)
    return msg.as_bytes()
