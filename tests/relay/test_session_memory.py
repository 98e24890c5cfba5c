"""An ended TLS session frees its TLS state at once, not at the next full GC.

aiosmtpd's session, its handler task and the task's CancelledError form reference cycles,
and in a process the relay's size the cyclic GC's full collection runs rarely: before this
was fixed each ended STARTTLS session kept asyncio's 256 KB TLS read buffer and OpenSSL's
state alive for minutes (the relay grew from ~50 to ~160 MB under a few thousand sessions).
"""

from __future__ import annotations

import asyncio
import gc
import ssl
from asyncio import sslproto
from collections.abc import Iterator

import pytest

from .conftest import USERS, RelayFactory

SESSIONS = 12


def _server_tls_objects() -> int:
    """Live server-side TLS protocol and SSL objects (the client side runs in-process too)."""
    count = 0
    for obj in gc.get_objects():
        if (isinstance(obj, sslproto.SSLProtocol) and obj._server_side) or (
            isinstance(obj, ssl.SSLObject) and obj.server_side
        ):
            count += 1
    return count


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
async def test_ended_tls_sessions_free_their_tls_state_without_the_gc(
    relay_factory: RelayFactory, implicit: bool, no_cyclic_gc: None
) -> None:
    relay = await relay_factory(listener={"implicit_tls_port": 0})
    before = _server_tls_objects()
    for _ in range(SESSIONS):
        async with relay.client(implicit=implicit, login=("alice", USERS["alice"])) as smtp:
            await smtp.noop()
    # The relay notices each hang-up a loop turn or two after the client's QUIT.
    for _ in range(50):
        if _server_tls_objects() <= before:
            break
        await asyncio.sleep(0.05)
    assert _server_tls_objects() - before <= 1, "ended sessions still hold their TLS state"
