"""An ASGI app (Starlette) served by uvicorn on an ephemeral loopback port, in this loop.

The local provider APIs, the STS and the OAuth2 token server of the tests all serve this way.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn


class LoopbackServer:
    """One uvicorn server on 127.0.0.1; `base_url` once `start` returns."""

    def __init__(self) -> None:
        self.base_url = ""
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, app: Any) -> str:
        """Serve `app` on an ephemeral port; returns the base URL (http://127.0.0.1:PORT)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            ws="none",
            http="h11",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.005)
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        """Stop serving; handlers still running are cut off after a second."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None
