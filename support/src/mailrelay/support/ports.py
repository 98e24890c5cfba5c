"""Free loopback ports for the servers tests, benchmarks and dev tools start."""

from __future__ import annotations

import contextlib
import random
import socket

# Ports handed out below the kernel's ephemeral range (32768-60999 by default): a port from
# bind(0) comes from that range, where any outgoing connection (to the API server, an
# upstream) may take it as its source port before the server we meant it for binds it.
_FREE_PORT_RANGE = (12000, 32000)
_handed_out: set[int] = set()


def free_port(span: int = 1) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and no caller got before, with
    the `span - 1` ports after it free too (worker N of a relay serves metrics on port + N).

    Random, outside the ephemeral range and never repeated in one process, so the gap
    between this check and the real bind is not lost to a client's source port or to
    another server of the same test session.
    """
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(_FREE_PORT_RANGE[0], _FREE_PORT_RANGE[1] - span)
        run = range(port, port + span)
        if _handed_out.intersection(run):
            continue
        try:
            with contextlib.ExitStack() as stack:
                for candidate in run:
                    probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        _handed_out.update(run)
        return port
    raise RuntimeError(f"no run of {span} free TCP ports in {_FREE_PORT_RANGE}")
