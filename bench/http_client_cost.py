"""Where the HTTP-API path's time goes: the HTTP client's CPU per Mailgun request.

The relay's HTTP providers send each message through `relay/upstreams/providers/http.py`'s
`ApiClient` (aiohttp, HTTP/1.1, keep-alive, a pool of `concurrency` connections, the SSRF
guard). This script posts the same multipart `messages.mime` request (a 2 KB message, one
`to`) to the benchmark's Go Mailgun sink (`loadgen mailgun`), with 16 requests in flight,
three ways: through httpx as the relay used it before, through bare aiohttp, and through
`ApiClient` with the body built by `multipart_form` as the Mailgun transport does (with
`allow_local`, as the sink listens on loopback; the SSRF guard would add one cached
check of the host per request).
It prints requests/s and this process's CPU per request. Nothing else runs in the
process, so the CPU is the client's alone.

    .venv/bin/python bench/http_client_cost.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
from collections.abc import Awaitable, Callable

import aiohttp
import auth_vs_postfix
import httpx
import relay_vs_postfix as base

from mailrelay.relay.upstreams.providers.http import (
    ApiClient,
    ApiRequest,
    FilePart,
    multipart_form,
    tls_context,
)

MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: x\r\n\r\n" + b"x" * 2048
CONCURRENCY = 16


async def _drive(count: int, send: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """(requests per second, CPU ms per request) for `count` requests, 16 in flight."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await send()

    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    return count / wall, cpu / count * 1000


async def with_httpx(url: str, count: int) -> tuple[float, float]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, auth=("api", "key")) as client:

        async def send() -> None:
            reply = await client.post(
                url,
                data={"to": ["b@example.net"]},
                files={"message": ("message.mime", MESSAGE, "message/rfc822")},
            )
            reply.raise_for_status()

        await send()  # connect outside the measurement
        return await _drive(count, send)


async def with_aiohttp(url: str, count: int) -> tuple[float, float]:
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    headers = {"Authorization": aiohttp.encode_basic_auth("api", "key")}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def send() -> None:
            form = aiohttp.FormData()
            form.add_field("to", "b@example.net")
            form.add_field(
                "message", MESSAGE, filename="message.mime", content_type="message/rfc822"
            )
            async with session.post(url, data=form) as reply:
                reply.raise_for_status()
                await reply.read()

        await send()
        return await _drive(count, send)


async def with_api_client(url: str, count: int) -> tuple[float, float]:
    # The guard refuses loopback; the sink lives there, so only this bench allows it.
    client = ApiClient(
        concurrency=CONCURRENCY,
        connect_timeout=10,
        timeout=60,
        ssl_context=tls_context(None),
        allow_local=True,
    )
    auth = "Basic " + base64.b64encode(b"api:key").decode("ascii")
    try:

        async def send() -> None:
            content_type, body = multipart_form(
                [("to", "b@example.net")],
                [FilePart("message", "message.eml", "message/rfc822", MESSAGE)],
            )
            request = ApiRequest(
                "POST", url, {"Authorization": auth, "Content-Type": content_type}, body
            )
            reply = await client.send(request)
            assert reply.is_success, reply.status_code

        await send()
        return await _drive(count, send)
    finally:
        await client.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    loadgen = await asyncio.to_thread(auth_vs_postfix.build_loadgen)
    port = base.free_port()
    sink = await asyncio.create_subprocess_exec(
        str(loadgen), "mailgun", "-addr", f"127.0.0.1:{port}", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert sink.stdout is not None
        await sink.stdout.readline()
        url = f"http://127.0.0.1:{port}/v3/bench.example.com/messages.mime"
        print(f"load average {base.load_average()}; {args.requests} requests, 16 in flight")
        runs = (("httpx", with_httpx), ("aiohttp", with_aiohttp), ("ApiClient", with_api_client))
        for name, run in runs:
            rate, cpu_ms = await run(url, args.requests)
            print(f"{name:<10} {rate:8.0f} req/s {cpu_ms:8.3f} ms CPU/request")
    finally:
        sink.terminate()
        await sink.wait()


if __name__ == "__main__":
    asyncio.run(main())
