"""A tiny HTTP server on the metrics port: /metrics, /healthz, /readyz, /status/upstreams.

It runs on the relay's own event loop (asyncio streams, no extra thread or framework):
the three endpoints are cheap, and being served by the loop means /healthz also proves
the loop is not stuck. /readyz asks a callback, which checks that the SMTP listeners are
open (not draining) and that the spool is writable. /status/upstreams answers the JSON
document of `upstream_status` (each upstream's authentication state, for the operator).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mailrelay.relay.upstream_status import STATUS_PATH

__all__ = ["HealthServer"]

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """Serves metrics from `registry` and health from `ready()`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], Awaitable[tuple[bool, str]]],
        *,
        host: str,
        port: int,
        reuse_port: bool = False,
        upstream_status: Callable[[], bytes] | None = None,
    ) -> None:
        self._registry = registry
        self._ready = ready
        self._upstream_status = upstream_status
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._server: asyncio.Server | None = None
        self.port = port

    async def start(self) -> None:
        """Bind and serve in the background."""
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, reuse_port=self._reuse_port or None
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("Opened the metrics and health server on %s:%d", self._host, self.port)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers are not needed
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            status, body, ctype = await self._respond(method, path)
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        except Exception:
            log.exception("Failed to answer a health or metrics request")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, method: str, path: str) -> tuple[int, bytes, str]:
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", "text/plain"
        if path == "/metrics":
            return 200, generate_latest(self._registry), CONTENT_TYPE_LATEST
        if path == "/healthz":
            return 200, b"ok\n", "text/plain"
        if path == "/readyz":
            ok, detail = await self._ready()
            return (200 if ok else 503), (detail + "\n").encode(), "text/plain"
        if path == STATUS_PATH and self._upstream_status is not None:
            return 200, self._upstream_status(), "application/json"
        return 404, b"not found\n", "text/plain"
