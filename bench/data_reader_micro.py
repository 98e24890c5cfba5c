"""Event-loop CPU per message of the SMTP DATA reader: aiosmtpd's vs `SMTPBase`.

A server loop in this process runs aiosmtpd's `SMTP` or `SMTPBase` with a handler
that answers 250 at once (no spool); a client in a subprocess sends 2 KB messages over
loopback sessions (MAIL, RCPT, DATA, wait 354, body, wait 250; no pipelining, like
smtp-source). The server's CPU time (`process_time`, the loop is its only busy thread)
is divided by the messages. Rounds alternate between the readers to spread the load
other processes put on the machine.

    .venv/bin/python bench/data_reader_micro.py --messages 3000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailrelay.relay.smtp_base import SMTPBase

# ~2 KB in 47 lines, some dot-stuffed, like the bench's smtp-source messages.
LINE = b"The quick brown fox jumps over the lazy dog 0123\r\n"
BODY = (
    b"From: a@example.com\r\nTo: b@dest.test\r\nSubject: bench\r\n\r\n"
    + LINE * 20
    + b"..stuffed\r\n"
    + LINE * 20
)


class Answer250:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok"


async def client(port: int, messages: int, sessions: int) -> None:
    """Send `messages` over `sessions` sequential-per-session connections in parallel."""

    async def one_session(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"EHLO bench.test\r\n")
        while (await reader.readline())[3:4] == b"-":
            pass
        for _ in range(count):
            for command in (b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@dest.test>\r\n"):
                writer.write(command)
                await reader.readline()
            writer.write(b"DATA\r\n")
            await reader.readline()
            writer.write(BODY + b".\r\n")
            reply = await reader.readline()
            assert reply.startswith(b"250"), reply
        writer.write(b"QUIT\r\n")
        await reader.readline()
        writer.close()

    per = messages // sessions
    await asyncio.gather(*(one_session(per) for _ in range(sessions)))


async def serve_round(server_class: type[SMTP], messages: int, sessions: int) -> float:
    """Server CPU ms per message for one round."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: server_class(Answer250(), data_size_limit=10 << 20), host="127.0.0.1", port=0
    )
    port = server.sockets[0].getsockname()[1]
    env = dict(os.environ)
    started = time.process_time()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--client",
        str(port),
        "--messages",
        str(messages),
        "--sessions",
        str(sessions),
        env=env,
    )
    if await proc.wait() != 0:
        raise RuntimeError("the client failed")
    spent = time.process_time() - started
    server.close()
    await server.wait_closed()
    return spent * 1000 / (messages // sessions * sessions)


async def main(args: argparse.Namespace) -> None:
    results: dict[str, list[float]] = {"aiosmtpd": [], "bulk": []}
    for _ in range(args.rounds):
        for name, cls in (("aiosmtpd", SMTP), ("bulk", SMTPBase)):
            results[name].append(await serve_round(cls, args.messages, args.sessions))
    load = os.getloadavg()
    for name, values in results.items():
        shown = ", ".join(f"{v:.3f}" for v in values)
        print(f"{name:9s} server CPU ms/msg: {shown} (min {min(values):.3f})")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.client:
        asyncio.run(client(parsed.client, parsed.messages, parsed.sessions))
    else:
        asyncio.run(main(parsed))
