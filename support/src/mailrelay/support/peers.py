"""Upstreams that run as pods for `make demo` and the cluster tests (image mailrelay-peers).

    peers.py smtp     an SMTP server with STARTTLS and AUTH (aiosmtpd) on $SMTP_PORT (2525)
    peers.py mailgun  the Mailgun-compatible API of provider_servers.py on $HTTP_PORT

Both listen on every address of both families the pod has, and report what they accepted
as JSON on `GET /_received` of $CONTROL_PORT (8025): envelope and the exact bytes
(base64) for SMTP, the form fields and the MIME file for Mailgun. `GET /_ids` is the
Message-ID of every accepted SMTP message, in order (duplicates included), without the bodies.
`POST /_down` closes the SMTP listeners (clients then get "connection refused", like an
upstream that is down; sessions already open finish), `POST /_up` opens them again; what was
received stays recorded across both. Configuration comes from the environment:
SMTP_USERNAME, SMTP_PASSWORD, TLS_CERT, TLS_KEY (paths).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from email.parser import BytesHeaderParser
from typing import Any

RECEIVED: list[dict[str, Any]] = []
# Control actions by path (POST), registered by the mode that supports them.
ACTIONS: dict[str, Callable[[], Awaitable[None]]] = {}


def listening_sockets(port: int) -> list[socket.socket]:
    """One socket per address family the pod has (IPv6 ones set V6ONLY, like asyncio)."""
    sockets = []
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((address, port))
        except OSError:
            sock.close()
            continue
        sock.listen(128)
        sock.setblocking(False)
        sockets.append(sock)
    if not sockets:
        raise OSError(f"Could not listen on port {port} in any address family")
    return sockets


async def serve_control(port: int) -> None:
    """`GET /_received`: what this upstream accepted, as JSON."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        method, path, *_ = [*request.split(), b"", b""]
        status, body = "200 OK", b"{}"
        if method == b"GET" and path == b"/_received":
            body = json.dumps(RECEIVED).encode()
        elif method == b"GET" and path == b"/_ids":
            body = json.dumps([item.get("message_id", "") for item in RECEIVED]).encode()
        elif method == b"POST" and path.decode() in ACTIONS:
            await ACTIONS[path.decode()]()
        else:
            status = "404 Not Found"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    for sock in listening_sockets(port):
        await asyncio.start_server(answer, sock=sock)


async def run_smtp() -> None:
    from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session  # noqa: PLC0415

    username = os.environ["SMTP_USERNAME"].encode()
    password = os.environ["SMTP_PASSWORD"].encode()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.environ["TLS_CERT"], os.environ["TLS_KEY"])

    class Handler:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            RECEIVED.append(
                {
                    "mail_from": envelope.mail_from,
                    "rcpt_tos": list(envelope.rcpt_tos),
                    "data": base64.b64encode(envelope.original_content or b"").decode(),
                    "message_id": str(
                        BytesHeaderParser().parsebytes(envelope.original_content or b"")[
                            "Message-ID"
                        ]
                        or ""
                    ),
                    "tls": session.ssl is not None,
                    "peer": str(session.peer[0]) if session.peer else "",
                }
            )
            print(f"Accepted a message from {envelope.mail_from}", flush=True)
            return "250 2.0.0 Accepted by the in-cluster SMTP upstream"

    def authenticator(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            username,
            password,
        )
        return AuthResult(success=ok, handled=False)

    def factory() -> SMTP:
        return SMTP(
            Handler(),
            hostname="smtp-upstream",
            tls_context=context,
            require_starttls=True,
            auth_required=True,
            auth_require_tls=True,
            authenticator=authenticator,
        )

    loop = asyncio.get_running_loop()
    port = int(os.environ.get("SMTP_PORT", "2525"))
    servers: list[asyncio.Server] = []

    async def up() -> None:
        if not servers:
            for sock in listening_sockets(port):
                servers.append(await loop.create_server(factory, sock=sock))
            print("SMTP upstream listening", flush=True)

    async def down() -> None:
        while servers:
            servers.pop().close()  # stops listening; sessions already open carry on
        print("SMTP upstream stopped listening", flush=True)

    ACTIONS.update({"/_up": up, "/_down": down})
    await up()
    await serve_control(int(os.environ.get("CONTROL_PORT", "8025")))
    print("SMTP upstream ready", flush=True)
    await asyncio.Event().wait()


async def run_mailgun() -> None:
    import uvicorn  # noqa: PLC0415

    from mailrelay.support import provider_servers as servers  # noqa: PLC0415

    server = servers.ProviderServer("mailgun", servers.HANDLERS["mailgun"])
    sent_before = 0

    async def collect() -> None:
        nonlocal sent_before
        while True:
            for request in server.sent[sent_before:]:
                RECEIVED.append(
                    {
                        "form": request.form,
                        "message": base64.b64encode(request.files.get("message", b"")).decode(),
                    }
                )
            sent_before = len(server.sent)
            await asyncio.sleep(0.1)

    config = uvicorn.Config(
        server.app(), log_level="warning", lifespan="off", ws="none", http="h11"
    )
    await serve_control(int(os.environ.get("CONTROL_PORT", "8025")))
    collector = asyncio.create_task(collect())
    print("Mailgun-compatible API ready", flush=True)
    await uvicorn.Server(config).serve(
        sockets=listening_sockets(int(os.environ.get("HTTP_PORT", "8080")))
    )
    collector.cancel()


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "smtp":
        asyncio.run(run_smtp())
    elif mode == "mailgun":
        asyncio.run(run_mailgun())
    else:
        print("usage: peers.py smtp|mailgun", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
