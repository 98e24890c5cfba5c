"""DKIM test peers: a real DNS server on loopback and two independent verifiers.

* ``LoopbackDns``: dnslib's DNSServer answering UDP and TCP on a loopback address, serving
  TXT records a test sets and changes (``publish``, ``withdraw``); a name without records
  is NXDOMAIN. Long TXT values are split into 255-byte strings as a zone would hold them.
* ``verify_dkimpy``: dkimpy's ``dkim.verify`` with its DNS lookups sent to that server by
  dnspython (a real query over UDP).
* ``verify_opendkim``: OpenDKIM's verifier, ``opendkim -t`` (Debian's opendkim package,
  installed by .ci/run), with ``Nameservers`` set to a LoopbackDns on port 53 (OpenDKIM
  takes no port), so libopendkim's own DNS lookups reach it. ``opendkim-testmsg`` from
  opendkim-tools was the first choice, but Debian 12's build answers ``dkim_chunk():
  Syntax error`` to every message, even when asked to sign one itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rdatatype
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dnslib import QTYPE, RCODE, RR, TXT, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

__all__ = [
    "DkimEnv",
    "LoopbackDns",
    "assert_verifies",
    "dkim_dns_server",
    "opendkim_dns",
    "pem_ed25519",
    "pem_rsa",
    "verify_dkimpy",
    "verify_opendkim",
]

OPENDKIM = "opendkim"


def pem_rsa(bits: int = 2048) -> bytes:
    """A fresh RSA private key, PKCS#8 PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_ed25519() -> bytes:
    """A fresh Ed25519 private key, PKCS#8 PEM (what `openssl genpkey` writes)."""
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class _Zone(BaseResolver):  # type: ignore[misc]
    records: dict[str, list[str]] = field(default_factory=dict)
    queries: list[str] = field(default_factory=list)

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        self.queries.append(name)
        values = self.records.get(name)
        if values is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if request.q.qtype in (QTYPE.TXT, QTYPE.ANY):
            for value in values:
                raw = value.encode()
                chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
                reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(chunks), ttl=1))
        return reply


class LoopbackDns:
    """A DNS server on ``host:port`` (UDP and TCP) answering the TXT records set here."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.zone = _Zone()
        quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")
        self.host = host
        for attempt in range(20):
            self.udp = DNSServer(self.zone, address=host, port=port, logger=quiet)
            self.port = self.udp.server.server_address[1]
            try:
                self.tcp = DNSServer(
                    self.zone, address=host, port=self.port, tcp=True, logger=quiet
                )
            except OSError:
                self.udp.server.server_close()
                if port or attempt == 19:
                    raise
                continue  # the UDP port's TCP twin is taken: another port
            break

    def __enter__(self) -> LoopbackDns:
        self.udp.start_thread()
        self.tcp.start_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.udp.stop()
        self.tcp.stop()
        self.udp.server.server_close()
        self.tcp.server.server_close()

    @property
    def address(self) -> str:
        """``host:port``, the form the operator's resolver setting takes."""
        return f"{self.host}:{self.port}"

    def publish(self, name: str, value: str) -> None:
        """Add a TXT record at ``name``."""
        self.zone.records.setdefault(name.rstrip(".").lower(), []).append(value)

    def replace(self, name: str, value: str) -> None:
        """Make ``value`` the only TXT record at ``name``."""
        self.zone.records[name.rstrip(".").lower()] = [value]

    def withdraw(self, name: str) -> None:
        """Remove every record at ``name`` (NXDOMAIN from now on)."""
        self.zone.records.pop(name.rstrip(".").lower(), None)

    def txt(self, name: bytes | str, timeout: int = 5, **_: Any) -> bytes | None:
        """A dkimpy ``dnsfunc``: the TXT record at ``name`` through a real UDP query."""
        qname = name.decode() if isinstance(name, bytes) else name
        query = dns.message.make_query(qname, dns.rdatatype.TXT)
        answer = dns.query.udp(query, self.host, port=self.port, timeout=timeout)
        for rrset in answer.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None


def verify_dkimpy(message: bytes, server: LoopbackDns) -> bool:
    """dkimpy's verdict on the message's first DKIM-Signature."""
    return bool(dkim.verify(message, dnsfunc=server.txt, minkey=1024))


def opendkim_available() -> str | None:
    """Why OpenDKIM's verifier cannot run here, or None."""
    if shutil.which(OPENDKIM) is None:
        return "opendkim is not installed (apt-get install opendkim; .ci/run does)"
    if os.geteuid() != 0:
        return "OpenDKIM only asks DNS servers on port 53, which needs root to serve"
    return None


@contextlib.contextmanager
def opendkim_dns() -> Iterator[LoopbackDns]:
    """A LoopbackDns on port 53 of its own loopback address, for ``verify_opendkim``."""
    last: OSError | None = None
    for last_octet in range(53, 73):
        try:
            server = LoopbackDns(f"127.53.0.{last_octet}", 53)
        except OSError as error:
            last = error
            continue
        with server:
            yield server
        return
    raise AssertionError(f"no loopback address with a free port 53: {last}")


def verify_opendkim(message: bytes, server: LoopbackDns) -> str:
    """OpenDKIM's verdict line on the exact bytes (``opendkim -t``: the filter's test mode,
    libopendkim's verifier), its DNS queries sent to ``server``."""
    assert server.port == 53, "OpenDKIM's Nameservers setting takes addresses, not ports"
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "opendkim.conf"
        conf.write_text(f"Nameservers {server.host}\nMode v\nSyslog no\n")
        path = Path(tmp) / "message.eml"
        path.write_bytes(message)
        result = subprocess.run(
            [OPENDKIM, "-x", str(conf), "-t", str(path)],
            capture_output=True,
            timeout=30,
            check=False,
        )
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    lines = [line for line in out.splitlines() if "verification" in line]
    assert lines, f"opendkim gave no verdict (exit {result.returncode}): {out}"
    return lines[0].replace(str(path), "message.eml")


def require_opendkim() -> bool:
    """Whether OpenDKIM can verify here; in CI (where .ci/run installs it) it must."""
    reason = opendkim_available()
    if reason is None:
        return True
    if os.environ.get("CI"):
        raise AssertionError(f"CI must verify with OpenDKIM: {reason}")
    return False


@contextlib.contextmanager
def dkim_dns_server() -> Iterator[LoopbackDns]:
    """The DNS server for a DKIM test: on port 53 when OpenDKIM verifies too."""
    if require_opendkim():
        with opendkim_dns() as server:
            yield server
    else:
        with LoopbackDns() as server:
            yield server


def assert_verifies(message: bytes, server: LoopbackDns) -> str:
    """Both verifiers accept the message's signature; OpenDKIM's verdict line (or dkimpy's)."""
    assert verify_dkimpy(message, server), "dkimpy did not verify the signature"
    if server.port != 53:
        return "dkimpy: signature verified"
    verdict = verify_opendkim(message, server)
    assert "succeeded" in verdict, verdict
    return verdict


@dataclass
class DkimEnv:
    """A DKIM test's DNS server and a folder for its key files."""

    dns: LoopbackDns
    folder: Path

    def key_file(self, name: str, data: bytes) -> Path:
        """Write a key file (as a mounted Secret would hold it)."""
        path = self.folder / name
        path.write_bytes(data)
        return path
