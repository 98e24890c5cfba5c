"""Envelope addresses: the one rule for what MAIL FROM and RCPT TO may carry.

The SMTP front refuses an address this rule refuses, at MAIL or RCPT, with the reply it
gives; the transports check every spooled address against the same rule before any
command goes upstream, so an address that slipped in earlier (a message spooled by an
older version) fails alone, never halfway through another message's transaction.

The rule is RFC 5321's Mailbox, widened by RFC 6531 (SMTPUTF8) to non-ASCII characters
in atoms, quoted strings and domain labels, and kept a little lenient where every peer
copes (an underscore or a trailing dot in a domain). Two kinds of refusal:

* bad syntax, `501 5.1.3`: any control character (C0, DEL, C1), invalid UTF-8 (the
  surrogates aiosmtpd decodes it to), whitespace outside a quoted local part, or a
  malformed local part or domain. None of these can be put on an SMTP command line as
  they are (aiosmtplib refuses most of them only after MAIL has gone out).
* a non-ASCII address in a transaction without SMTPUTF8, `553 5.6.7` (RFC 6531 3.7.4.1).

`address_refusal` is a pure function of the address (aiosmtpd's parsed addr-spec, or the
null sender) and whether the transaction is SMTPUTF8.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "CONTROL_CHARACTER",
    "PLAIN_ADDRESS",
    "SYNTAX_REFUSAL",
    "AddressRefusal",
    "address_refusal",
    "ascii_form",
]

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
PLAIN_ADDRESS = rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
"""A regex for `local@domain` with a dot-atom local part (RFC 5322 atext) and a plain ASCII
domain: the form that needs no RFC 5322 parsing, so the SMTP front and the upstream
transport can take a fast path for it."""

_PLAIN = re.compile(PLAIN_ADDRESS)
# C0 controls, DEL, C1 controls (the SMTP front also looks for them in the raw path).
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What the RFC 5322 parser drops from a path as folding space besides a tab and a comment:
# Python counts non-ASCII spaces (no-break space, en space, ideographic space...) as
# whitespace, so `<a \u00a0@b>` would become a@b, an ASCII address sent without SMTPUTF8.
DROPPED_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]|[^\x00-\x7f](?<=\s)")
# Lone surrogates: aiosmtpd decodes invalid UTF-8 with surrogateescape, and such a string
# cannot be encoded back to UTF-8.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# RFC 6531 atext: RFC 5322 atext plus any non-ASCII character but whitespace.
_U_ATEXT = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f\s])+"
_DOT_STRING = re.compile(rf"{_U_ATEXT}(?:\.{_U_ATEXT})*")
# RFC 5321 Quoted-string: printable ASCII but `"` and `\`, or a backslash pair; RFC 6531
# adds non-ASCII. Control characters are refused before this is tried.
_QUOTED_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
# Labels of letters, digits, hyphens (an underscore is tolerated, as most MTAs do) or
# non-ASCII (U-labels), with at most one trailing dot; or an address literal.
_LABEL = r"(?:[A-Za-z0-9_-]|[^\x00-\x7f\s])+"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
# IPv4, `IPv6:...`, or a general `tag:content` literal of letters, digits, `.:-`.
_ADDRESS_LITERAL = re.compile(r"\[[A-Za-z0-9.:-]+\]")


@dataclass(frozen=True)
class AddressRefusal:
    """Why an address is refused: the SMTP reply code, its enhanced status and words."""

    code: int
    status: str
    reason: str

    @property
    def reply(self) -> str:
        """The SMTP reply line for the front (it never echoes the address)."""
        return f"{self.code} {self.status} {self.reason}"

    def detail(self, role: str) -> str:
        """The text a transport gives a recipient (bounces quote it): `5.1.3 ...`."""
        # RFC 3463: X.1.7 is the sender's X.1.3.
        status = "5.1.7" if role == "sender" and self.status == "5.1.3" else self.status
        return f"{status} Bad {role} address: {self.reason[0].lower()}{self.reason[1:]}"


_CONTROL_REFUSAL = AddressRefusal(501, "5.1.3", "Address contains a control character")
_UTF8_REFUSAL = AddressRefusal(501, "5.1.3", "Address is not valid UTF-8")
SYNTAX_REFUSAL = AddressRefusal(501, "5.1.3", "Bad address syntax")
_SMTPUTF8_REFUSAL = AddressRefusal(
    553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter on MAIL (RFC 6531)"
)


def address_refusal(address: str, *, smtputf8: bool) -> AddressRefusal | None:
    """Why `address` cannot be taken or sent, or None when it can.

    `address` is an addr-spec as aiosmtpd parses it; "" and "<>" (the null sender) pass.
    A bare local part (no `@`) is left to routing, which decides what it may reach.
    """
    if address in ("", "<>") or (_PLAIN.fullmatch(address) is not None):
        return None
    if CONTROL_CHARACTER.search(address):
        return _CONTROL_REFUSAL
    if _SURROGATE.search(address):
        return _UTF8_REFUSAL
    local, at, domain = address.rpartition("@")
    if not at:
        # A bare local part (RFC 5321 allows only `Postmaster`): a dot-string, unquoted.
        if not _DOT_STRING.fullmatch(address):
            return SYNTAX_REFUSAL
    elif not (_QUOTED_STRING.fullmatch(local) or _DOT_STRING.fullmatch(local)) or not (
        _DOMAIN.fullmatch(domain) or _ADDRESS_LITERAL.fullmatch(domain)
    ):
        return SYNTAX_REFUSAL
    if not smtputf8 and not address.isascii():
        return _SMTPUTF8_REFUSAL
    return None


def ascii_form(address: str) -> str | None:
    """`address` as plain ASCII, its domain's U-labels as A-labels (IDNA), for a peer
    without SMTPUTF8 (RFC 6531 3.2); None when the local part is not ASCII or the domain
    is not valid IDNA. An ASCII address is returned as it is."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return None
