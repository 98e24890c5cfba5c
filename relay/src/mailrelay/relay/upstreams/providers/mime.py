"""MIME to the fields of the JSON providers (SendGrid, Postmark, Resend); pure functions.

`parse_message` reads the message once with the standard library's `email` package and
returns a `ParsedMessage`: sender, reply-to, subject, the chosen text and HTML bodies,
every other leaf part as an `Attachment` (bytes decoded from their transfer encoding, so
they arrive byte-exact after the provider's base64), and the custom headers worth
passing on. `split_recipients` sorts the *envelope* recipients into to/cc/bcc by the
message's To and Cc headers: whoever the envelope names but the headers do not is Bcc,
delivered but never written into a header. `plan_batches` cuts that into requests that fit
a provider's recipient limit and that each have a To, as the JSON providers require.

What a provider cannot carry raises `UnrepresentableMessage`; the transports turn it into
a permanent failure whose text tells the sender why.
"""

from __future__ import annotations

import email.errors
import mimetypes
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.parser import BytesParser

from mailrelay.relay.address import ascii_form

__all__ = [
    "Attachment",
    "Batch",
    "Mailbox",
    "ParsedMessage",
    "UnrepresentableMessage",
    "ascii_address",
    "parse_message",
    "plan_batches",
    "split_recipients",
]

# Headers the JSON APIs build themselves from fields, or that stop being true once the
# provider re-renders the message (signatures, trace and transport headers).
_STRUCTURAL_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "reply-to",
        "sender",
        "date",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "content-id",
        "content-description",
        "received",
        "return-path",
        "delivered-to",
        "dkim-signature",
        "domainkey-signature",
        "authentication-results",
        "arc-seal",
        "arc-message-signature",
        "arc-authentication-results",
    }
)
_NAME_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')


class UnrepresentableMessage(Exception):
    """The provider's API cannot express this message; the reason is for the sender."""


@dataclass(frozen=True)
class Mailbox:
    """An address (ASCII, as the JSON APIs want it) with its display name, maybe empty."""

    address: str
    name: str = ""
    # The envelope's spelling of the address (before IDNA), so results name the recipient
    # exactly as the spool does.
    original: str = ""

    def formatted(self) -> str:
        """`Name <address>` for APIs that take one string; the name stays Unicode."""
        if not self.name:
            return self.address
        name = self.name
        if _NAME_SPECIALS.search(name):
            name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{name} <{self.address}>"


@dataclass(frozen=True)
class Attachment:
    """A non-body leaf part; `content` is the decoded bytes, exactly as the sender made them."""

    filename: str
    content_type: str
    content: bytes
    content_id: str | None
    inline: bool


@dataclass(frozen=True)
class ParsedMessage:
    """What the JSON providers need from one message."""

    sender: Mailbox
    reply_to: tuple[Mailbox, ...]
    subject: str | None
    text: str | None
    html: str | None
    attachments: tuple[Attachment, ...]
    # Custom headers in message order, values unfolded and decoded.
    headers: tuple[tuple[str, str], ...]
    # Addresses named in the To and Cc headers, with display names, for recipient sorting.
    header_to: tuple[Mailbox, ...]
    header_cc: tuple[Mailbox, ...]


@dataclass(frozen=True)
class Batch:
    """The recipients of one API request. `to` is never empty."""

    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    bcc: tuple[Mailbox, ...]

    @property
    def recipients(self) -> tuple[str, ...]:
        """Every envelope recipient of the request, in to, cc, bcc order."""
        return tuple(m.original or m.address for m in (*self.to, *self.cc, *self.bcc))


def ascii_address(address: str) -> str:
    """The address as the provider accepts it: IDNA domain, ASCII local part or refusal
    (the conversion is `address.ascii_form`, shared with the SMTP transport)."""
    converted = ascii_form(address)
    if converted is not None:
        return converted
    local, at, _ = address.rpartition("@")
    if not at or not local.isascii():
        raise UnrepresentableMessage(
            f"the address {address!r} has a non-ASCII mailbox name (SMTPUTF8), "
            "which this provider does not accept"
        )
    raise UnrepresentableMessage(f"the domain of {address!r} is not valid IDNA")


def _mailbox(addr: Address) -> Mailbox:
    return Mailbox(address=ascii_address(addr.addr_spec), name=addr.display_name or "")


def _header_mailboxes(msg: EmailMessage, name: str) -> tuple[Mailbox, ...]:
    header = msg.get(name)
    if header is None:
        return ()
    addresses = getattr(header, "addresses", ())
    out = []
    for addr in addresses:
        if addr.addr_spec and addr.addr_spec != "<>":
            out.append(_mailbox(addr))
    return tuple(out)


def _leaves(part: EmailMessage) -> Iterator[EmailMessage]:
    """Leaf parts in order; an attached message counts as one leaf, not its insides."""
    if part.get_content_maintype() == "message":
        yield part
    elif part.is_multipart():
        for sub in part.iter_parts():
            assert isinstance(sub, EmailMessage)
            yield from _leaves(sub)
    else:
        yield part


def _part_bytes(part: EmailMessage) -> bytes:
    if part.get_content_maintype() == "message" and part.is_multipart():
        # An attached message (or a DSN's status blocks) is re-serialised: the parser keeps
        # no raw bytes for it, so folding may differ from the original.
        blocks = part.get_payload()
        assert isinstance(blocks, list)
        return b"\r\n".join(
            block.as_bytes(policy=policy.SMTP) for block in blocks if isinstance(block, Message)
        )
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return b""
    return payload


def _attachment(part: EmailMessage, index: int, *, related: bool, html: str | None) -> Attachment:
    """One attachment. A part with a Content-ID is inline when it says so, says nothing,
    sits in a multipart/related, or the HTML body refers to it by `cid:`; Python's
    `add_related` writes `Content-Disposition: attachment` on the images of a related
    part, and mail clients still show those inline."""
    content_type = part.get_content_type()
    filename = part.get_filename()
    if not filename:
        extension = mimetypes.guess_extension(content_type) or ".bin"
        filename = f"part-{index}{extension}"
    content_id = part.get("Content-ID")
    cid = str(content_id).strip().strip("<>") if content_id is not None else None
    disposition = part.get_content_disposition()
    inline = disposition == "inline" or (
        bool(cid)
        and (
            disposition is None
            or related
            or (html is not None and f"cid:{cid}".lower() in html.lower())
        )
    )
    return Attachment(
        filename=filename,
        content_type=content_type,
        content=_part_bytes(part),
        content_id=cid or None,
        inline=inline,
    )


def _text(part: EmailMessage | None) -> str | None:
    if part is None:
        return None
    content = part.get_content()
    # JSON APIs take text with "\n" line ends and encode for SMTP themselves.
    return content.replace("\r\n", "\n") if isinstance(content, str) else None


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n", "", value)


def parse_message(message: bytes, *, envelope_sender: str = "") -> ParsedMessage:
    """Read a message for a JSON provider, or say why it cannot be represented."""
    try:
        msg = BytesParser(policy=policy.default).parsebytes(message)
        assert isinstance(msg, EmailMessage)
        senders = _header_mailboxes(msg, "From")
        if len(senders) > 1:
            raise UnrepresentableMessage(
                "the From header names several mailboxes; this provider takes exactly one"
            )
        if senders:
            sender = senders[0]
        elif envelope_sender:
            sender = Mailbox(address=ascii_address(envelope_sender))
        else:
            raise UnrepresentableMessage("the message has no From header and a null sender")
        text_part = msg.get_body(preferencelist=("plain",))
        html_part = msg.get_body(preferencelist=("html",))
        bodies = {id(p) for p in (text_part, html_part) if p is not None}
        html = _text(html_part if isinstance(html_part, EmailMessage) else None)
        related = {
            id(child)
            for part in msg.walk()
            if part.get_content_type() == "multipart/related"
            for child in part.iter_parts()
        }
        attachments: list[Attachment] = []
        for part in _leaves(msg):
            if id(part) in bodies:
                continue
            attachments.append(
                _attachment(part, len(attachments) + 1, related=id(part) in related, html=html)
            )
        subject = msg.get("Subject")
        headers = tuple(
            (name, _unfold(str(value)))
            for name, value in msg.items()
            if name.lower() not in _STRUCTURAL_HEADERS
        )
        return ParsedMessage(
            sender=sender,
            reply_to=_header_mailboxes(msg, "Reply-To"),
            subject=_unfold(str(subject)) if subject is not None else None,
            text=_text(text_part if isinstance(text_part, EmailMessage) else None),
            html=html,
            attachments=tuple(attachments),
            headers=headers,
            header_to=_header_mailboxes(msg, "To"),
            header_cc=_header_mailboxes(msg, "Cc"),
        )
    except (email.errors.MessageError, LookupError, UnicodeError, ValueError) as exc:
        if isinstance(exc, UnrepresentableMessage):
            raise
        raise UnrepresentableMessage(f"the message could not be parsed as MIME: {exc}") from exc


def split_recipients(
    parsed: ParsedMessage, envelope_recipients: Sequence[str]
) -> tuple[tuple[Mailbox, ...], tuple[Mailbox, ...], tuple[Mailbox, ...]]:
    """(to, cc, bcc): envelope recipients by the header naming them; the rest are Bcc.

    Only envelope recipients are ever returned: an address in the To header that the
    envelope does not name (another route's recipient, a list address) is not sent to.
    """
    named_to = {m.address.lower(): m for m in parsed.header_to}
    named_cc = {m.address.lower(): m for m in parsed.header_cc}
    to: list[Mailbox] = []
    cc: list[Mailbox] = []
    bcc: list[Mailbox] = []
    seen: set[str] = set()
    for raw in envelope_recipients:
        address = ascii_address(raw)
        key = address.lower()
        if key in seen:
            continue
        seen.add(key)
        if key in named_to:
            to.append(Mailbox(address, named_to[key].name, raw))
        elif key in named_cc:
            cc.append(Mailbox(address, named_cc[key].name, raw))
        else:
            bcc.append(Mailbox(address, "", raw))
    return tuple(to), tuple(cc), tuple(bcc)


def plan_batches(
    to: Sequence[Mailbox],
    cc: Sequence[Mailbox],
    bcc: Sequence[Mailbox],
    max_recipients: int | None,
) -> list[Batch]:
    """Requests of at most `max_recipients`, each with a To.

    A chunk that holds no To recipient (only Cc or Bcc left, or a message whose To names
    nobody in this envelope) is sent one request per recipient, each addressed To itself:
    the JSON APIs refuse a request without To, and listing Bcc recipients in To would
    disclose them.
    """
    total = len(to) + len(cc) + len(bcc)
    size = max_recipients or total or 1
    count = -(-total // size)
    # Spread the To recipients over all requests first, so each has one where possible.
    chunks: list[list[tuple[str, Mailbox]]] = [[] for _ in range(count)]
    for i, mailbox in enumerate(to):
        chunks[i % count].append(("to", mailbox))
    rest = [("cc", m) for m in cc] + [("bcc", m) for m in bcc]
    for chunk in chunks:
        while rest and len(chunk) < size:
            chunk.append(rest.pop(0))
    batches: list[Batch] = []
    for chunk in chunks:
        chunk_to = tuple(m for role, m in chunk if role == "to")
        if not chunk_to:
            batches.extend(Batch(to=(m,), cc=(), bcc=()) for _, m in chunk)
            continue
        batches.append(
            Batch(
                to=chunk_to,
                cc=tuple(m for role, m in chunk if role == "cc"),
                bcc=tuple(m for role, m in chunk if role == "bcc"),
            )
        )
    return batches
