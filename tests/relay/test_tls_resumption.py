"""TLS session resumption: a client that reconnects with its session skips the full handshake,
over STARTTLS and implicit TLS, TLS 1.3 (tickets) and TLS 1.2, and across a certificate
reload (the context, and so its ticket key, stays the same)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
from pathlib import Path

import pytest

from mailrelay.support.smtp_peers import TlsCerts

from .conftest import USERS, RelayFactory

VERSIONS = [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2]


def _session(
    port: int, context: ssl.SSLContext, *, implicit: bool, session: ssl.SSLSession | None
) -> tuple[ssl.SSLSession | None, bool]:
    """One SMTP session with AUTH (blocking; run in a thread): (its session, resumed?)."""
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        if not implicit:
            plain = stack.enter_context(raw.makefile("rb"))
            plain.readline()
            raw.sendall(b"EHLO client.test\r\n")
            while plain.readline()[3:4] == b"-":
                pass
            raw.sendall(b"STARTTLS\r\n")
            assert plain.readline().startswith(b"220")
        sock = stack.enter_context(
            context.wrap_socket(raw, server_hostname="localhost", session=session)
        )
        reader = stack.enter_context(sock.makefile("rb"))
        if implicit:
            reader.readline()
        sock.sendall(b"EHLO client.test\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        # Reading replies after the handshake is what lets TLS 1.3 tickets arrive.
        blob = base64.b64encode(b"\0alice\0" + USERS["alice"].encode())
        sock.sendall(b"AUTH PLAIN " + blob + b"\r\n")
        assert reader.readline().startswith(b"235")
        sock.sendall(b"QUIT\r\n")
        reader.readline()
        return sock.session, bool(sock.session_reused)


@pytest.mark.parametrize("version", VERSIONS, ids=["tls13", "tls12"])
@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
async def test_a_reconnecting_client_resumes_its_session(
    relay_factory: RelayFactory,
    tls_certs: TlsCerts,
    tmp_path: Path,
    version: ssl.TLSVersion,
    implicit: bool,
) -> None:
    relay = await relay_factory(listener={"implicit_tls_port": 0})
    port = relay.implicit_tls_port if implicit else relay.smtp_port
    assert port is not None
    context = tls_certs.client_context()
    context.maximum_version = version
    session, reused = await asyncio.to_thread(
        _session, port, context, implicit=implicit, session=None
    )
    assert session is not None and not reused
    for _ in range(2):
        session, reused = await asyncio.to_thread(
            _session, port, context, implicit=implicit, session=session
        )
        assert reused, "the relay made a full handshake for a client offering its session"


async def test_sessions_resume_across_a_certificate_reload(
    relay_factory: RelayFactory, tls_certs: TlsCerts, tmp_path: Path
) -> None:
    cert, key = tls_certs.issue(tmp_path, "rotated")
    relay = await relay_factory()
    context = tls_certs.client_context()
    session, _ = await asyncio.to_thread(
        _session, relay.smtp_port, context, implicit=False, session=None
    )
    data = relay.config.model_dump(mode="json")
    data["listener"]["tls"] = {"cert_file": str(cert), "key_file": str(key)}
    relay.write_config(data)
    for _ in range(200):
        if relay.metric("mailrelay_config_reloads_total", {"result": "success"}) >= 1:
            break
        await asyncio.sleep(0.05)
    assert relay.metric("mailrelay_config_reloads_total", {"result": "success"}) >= 1
    _, reused = await asyncio.to_thread(
        _session, relay.smtp_port, context, implicit=False, session=session
    )
    assert reused
