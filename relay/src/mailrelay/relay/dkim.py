"""DKIM signing (RFC 6376, RFC 8463): keys, their DNS records, and signing with dkimpy.

Shape of the module:

* The rules, one place for the relay's config model and the operator's MailRoute model:
  ``SELECTOR_PATTERN``, ``HEADER_NAME_PATTERN``, ``CANONICALIZATIONS``, the messages.
* ``parse_private_key`` (pure): the bytes of a key file or Secret value -> ``SigningKey``
  (algorithm, size, what dkimpy signs with, the public key for DNS), or ``KeyProblem``
  saying what is wrong with it, never quoting it. RSA keys are PEM (PKCS#1 or PKCS#8) of
  2048 bits or more; Ed25519 keys are PEM (PKCS#8, what ``openssl genpkey -algorithm
  ed25519`` writes) or dkimpy's base64 of the 32-byte seed.
* ``txt_record`` / ``record_matches`` (pure): the TXT record a key needs at
  ``<selector>._domainkey.<domain>``, and whether a published one carries that key.
* ``sign_message`` (pure, CPU-bound: callers run it in a worker thread): the message with a
  ``DKIM-Signature`` header field prepended. Canonicalisation and hashing are dkimpy's.
* ``signer_for`` (pure): which of a route's signing domains a message is signed for: the
  domain of its From header (or the closest parent domain configured), else its envelope
  sender's, else the route's first.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Final, Literal

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

__all__ = [
    "CANONICALIZATIONS",
    "HEADER_NAME_PATTERN",
    "MIN_RSA_BITS",
    "SELECTOR_PATTERN",
    "Algorithm",
    "KeyProblem",
    "Signer",
    "SigningError",
    "SigningKey",
    "headers_problem",
    "parse_private_key",
    "record_matches",
    "record_name",
    "sign_message",
    "signer_for",
    "txt_record",
]

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
Canonicalization = Literal["relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple"]
CANONICALIZATIONS: Final[tuple[str, ...]] = (
    "relaxed/relaxed",
    "relaxed/simple",
    "simple/relaxed",
    "simple/simple",
)
# RFC 8301 3.2: signers MUST use RSA keys of at least 1024 bits and SHOULD use 2048; we
# require 2048 (large mailbox providers treat 1024 as weak).
MIN_RSA_BITS: Final = 2048
# A selector is one or more DNS labels (RFC 6376 3.1), lower case here so that the record
# name the status shows is the one to publish.
SELECTOR_PATTERN: Final = (
    r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
)
# A header field name (RFC 5322 ftext: printable ASCII but the colon).
HEADER_NAME_PATTERN: Final = r"^[!-9;-~]+$"
HEADERS_NEED_FROM: Final = "headers must include From (RFC 6376 5.4: From is always signed)"
SELECTOR_MESSAGE: Final = (
    "selector must be one or more lower-case DNS labels, such as mail2026 or s1.eu"
)
TWO_SELECTORS_MESSAGE: Final = "next must name a different selector than active"


class KeyProblem(ValueError):
    """A key that cannot sign; the message says what is wrong (never the key itself)."""


class SigningError(Exception):
    """A message that cannot be signed (dkimpy refused it), in words."""


@dataclass(frozen=True, repr=False)
class SigningKey:
    """A parsed private key: what dkimpy signs with and what DNS must publish."""

    algorithm: Algorithm
    bits: int
    private: bytes  # PEM (PKCS#1) for RSA; base64 of the seed for Ed25519 (dkimpy's forms)
    public: str  # the p= value: base64 of the SubjectPublicKeyInfo (RSA) or raw key (Ed25519)

    def __repr__(self) -> str:  # never print the private part
        return f"SigningKey({self.algorithm}, {self.bits} bits)"

    @property
    def key_type(self) -> str:
        """The k= tag of the DNS record."""
        return "rsa" if self.algorithm == "rsa-sha256" else "ed25519"


def parse_private_key(data: bytes) -> SigningKey:
    """The signing key in ``data``, or KeyProblem saying why it is not one."""
    text = data.strip()
    if not text:
        raise KeyProblem("is empty; it must hold a PEM private key (RSA or Ed25519)")
    key: object
    if text.startswith(b"-----BEGIN"):
        if b"ENCRYPTED" in text.split(b"\n", 1)[0]:
            raise KeyProblem("is an encrypted PEM key; store it without a passphrase")
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyProblem(
                "is not a readable PEM private key; use an unencrypted RSA (PKCS#1 or PKCS#8) "
                "or Ed25519 (PKCS#8) key, such as `openssl genpkey -algorithm ed25519` makes"
            ) from None
    else:
        try:
            seed = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            raise KeyProblem(
                "is neither a PEM private key nor dkimpy's base64 Ed25519 seed; use an "
                "unencrypted PEM RSA or Ed25519 key"
            )
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyProblem(
                f"is an RSA key of {key.key_size} bits; DKIM keys must have at least "
                f"{MIN_RSA_BITS} bits (generate one with `openssl genpkey -algorithm rsa "
                "-pkeyopt rsa_keygen_bits:2048`)"
            )
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return SigningKey("rsa-sha256", key.key_size, private, base64.b64encode(public).decode())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        raw_public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return SigningKey(
            "ed25519-sha256", 256, base64.b64encode(seed), base64.b64encode(raw_public).decode()
        )
    kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
    raise KeyProblem(
        f"is a {kind} key; DKIM signs with RSA (rsa-sha256) or Ed25519 (ed25519-sha256) keys"
    )


def record_name(selector: str, domain: str) -> str:
    """Where the selector's public key is published."""
    return f"{selector}._domainkey.{domain.rstrip('.')}"


def txt_record(key: SigningKey) -> str:
    """The TXT record value to publish for ``key``."""
    return f"v=DKIM1; k={key.key_type}; p={key.public}"


def _tags(record: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip(), re.sub(r"\s+", "", value))
    return tags


def record_matches(record: str, key: SigningKey) -> bool:
    """Whether a published TXT record (its strings joined) carries ``key``'s public key."""
    tags = _tags(record)
    if tags.get("v", "DKIM1") != "DKIM1":
        return False
    if tags.get("k", "rsa") != key.key_type:
        return False
    published = tags.get("p", "")
    if not published:
        return False  # an empty p= revokes the key
    if published == key.public:
        return True
    if key.key_type != "rsa":
        return False
    # Also the PKCS#1 RSAPublicKey form some tools publish; compare the key, not the text.
    try:
        der = base64.b64decode(published, validate=True)
        ours = serialization.load_der_public_key(base64.b64decode(key.public))
        theirs = serialization.load_der_public_key(der)
    except (binascii.Error, ValueError, UnsupportedAlgorithm):
        return False
    return ours == theirs


def headers_problem(headers: Sequence[str]) -> str | None:
    """Why a list of header names to sign is not acceptable, or None."""
    if not any(h.lower() == "from" for h in headers):
        return HEADERS_NEED_FROM
    return None


@dataclass(frozen=True, repr=False)
class Signer:
    """One signing domain of a route, with its loaded key."""

    domain: str
    selector: str
    key: SigningKey
    headers: tuple[str, ...] | None  # None: dkimpy's RFC 6376 list
    canonicalization: str = "relaxed/relaxed"

    def __repr__(self) -> str:
        return f"Signer(d={self.domain}, s={self.selector}, {self.key!r})"


def sign_message(message: bytes, signer: Signer) -> bytes:
    """``message`` with a DKIM-Signature header field on top (CRLF line endings).

    Raises SigningError when dkimpy refuses the message (no From header, for one).
    """
    header, _, body = signer.canonicalization.partition("/")
    include = None if signer.headers is None else [h.lower().encode() for h in signer.headers]
    try:
        signature = dkim.sign(
            message,
            signer.selector.encode(),
            signer.domain.encode(),
            signer.key.private,
            canonicalize=(header.encode(), body.encode()),
            signature_algorithm=signer.key.algorithm.encode(),
            include_headers=include,
            linesep=b"\r\n",
        )
    except dkim.DKIMException as error:
        raise SigningError(str(error)) from None
    return bytes(signature) + message


def _header_section(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    return message if end < 0 else message[: end + 2]


def from_domains(message: bytes) -> list[str]:
    """The domains of the addresses in the message's From header fields, lower case."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(_header_section(message))
    values = [str(v) for v in headers.get_all("From") or []]
    return [
        address.rpartition("@")[2].lower().rstrip(".")
        for _, address in email.utils.getaddresses(values)
        if "@" in address
    ]


def _closest(domain: str, signers: Sequence[Signer]) -> Signer | None:
    """The signer for ``domain`` itself or its closest parent (relaxed DMARC alignment)."""
    best: Signer | None = None
    for signer in signers:
        d = signer.domain.lower()
        if (domain == d or domain.endswith("." + d)) and (
            best is None or len(d) > len(best.domain)
        ):
            best = signer
    return best


def signer_for(message: bytes, mail_from: str, signers: Sequence[Signer]) -> Signer:
    """The signer a message is signed with: From's domain, else the envelope sender's,
    else the first one configured."""
    candidates = [*from_domains(message), mail_from.rpartition("@")[2].lower().rstrip(".")]
    for domain in candidates:
        if domain and (signer := _closest(domain, signers)) is not None:
            return signer
    return signers[0]
