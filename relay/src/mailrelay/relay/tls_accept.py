"""The implicit-TLS listener's accept step: admit the client first, then the TLS handshake.

With `loop.create_server(ssl=...)` asyncio does the handshake before the protocol ever
hears of the connection: a client that sends plain text or hangs up mid-handshake is
never seen (asyncio logs it only in debug mode), and sockets in their handshake count
against no limit. `ImplicitTlsAcceptor` is a plain-TCP protocol that instead

1. asks `accept(peer_ip, abort)` at once (`abort` drops the connection while its
   handshake runs, for a shutdown), which counts the connection against the limits (or
   refuses it: the socket is closed before any TLS, as no TLS session exists yet to carry
   a 421 reply);
2. runs the handshake with the public `loop.start_tls` (with a timeout), holding any
   application bytes that arrive before the hand-over;
3. hands the TLS transport to the SMTP session (`connection_made`, then the held bytes),
   or on a failed handshake calls `failed(error)` once and closes the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Handoff", "ImplicitTlsAcceptor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Handoff:
    """What `accept` returns for an admitted connection."""

    protocol: asyncio.Protocol  # gets the TLS transport after the handshake
    failed: Callable[[BaseException], None]  # the handshake failed or the client left


class ImplicitTlsAcceptor(asyncio.Protocol):
    """One accepted TCP connection on the implicit-TLS port, until the hand-over."""

    def __init__(
        self,
        context: ssl.SSLContext,
        handshake_timeout: float,
        accept: Callable[[str, Callable[[], None]], Handoff | None],
    ) -> None:
        self._context = context
        self._timeout = handshake_timeout
        self._accept = accept
        self._held: list[bytes] = []
        self._eof = False
        self._lost: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        # Nothing may be read before start_tls takes over: those bytes are the ClientHello.
        transport.pause_reading()
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        handoff = self._accept(ip, transport.abort)
        if handoff is None:
            transport.abort()
            return
        self._task = asyncio.get_running_loop().create_task(
            self._handshake(transport, handoff), name=f"tls-accept-{ip}"
        )

    async def _handshake(self, transport: asyncio.Transport, handoff: Handoff) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._lost is not None or transport.is_closing():
                raise self._lost or ConnectionResetError("connection closed before TLS")
            tls = await loop.start_tls(
                transport,
                self,
                self._context,
                server_side=True,
                ssl_handshake_timeout=self._timeout,
            )
            if tls is None or self._lost is not None:
                raise self._lost or ConnectionResetError("connection closed after TLS")
        except (OSError, EOFError, TimeoutError) as error:  # ssl.SSLError is an OSError
            transport.abort()
            handoff.failed(error)
            return
        except Exception as error:
            log.exception("Failed to set up TLS on an implicit-TLS connection")
            transport.abort()
            handoff.failed(error)
            return
        protocol = handoff.protocol
        tls.set_protocol(protocol)
        protocol.connection_made(tls)
        for data in self._held:
            protocol.data_received(data)
        self._held.clear()
        if self._eof:
            with contextlib.suppress(Exception):
                protocol.eof_received()

    # Before start_tls these would be raw bytes (reading is paused, so none come); after
    # the handshake they are application data that arrived before the hand-over.
    def data_received(self, data: bytes) -> None:
        self._held.append(data)

    def eof_received(self) -> bool:
        self._eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("connection lost")
