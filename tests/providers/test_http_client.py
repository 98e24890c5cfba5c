"""The providers' HTTP layer (`relay/upstreams/providers/http.py`) against raw HTTP peers
on loopback.

Each peer is a plain asyncio server that speaks just enough HTTP/1.1 to answer, stall or
misbehave on purpose, and records what arrived byte for byte, so the tests see what the
client put on the wire: the body unchanged, one keep-alive pool of `concurrency`
connections, no redirects followed, and every failure as one of our own errors.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import email.parser
import email.policy
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailrelay.relay.upstreams import providers
from mailrelay.relay.upstreams.providers.http import (
    MAX_RESPONSE_BYTES,
    ApiClient,
    ApiRequest,
    ApiResponse,
    ApiTimeout,
    ApiUnreachable,
    BlockedDestination,
    FilePart,
    InvalidRequest,
    multipart_form,
    no_proxy_matches,
    tls_context,
)
from mailrelay.support.smtp_peers import TlsCerts

Responder = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Received"], Awaitable[bool]]


@dataclass
class Received:
    """One request as it arrived: the head's lines and the body's bytes."""

    head: list[str]
    body: bytes

    @property
    def headers(self) -> dict[str, str]:
        return {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in self.head[1:])}


@dataclass
class Peer:
    """A raw HTTP/1.1 server: `respond` answers each request (True keeps the connection)."""

    respond: Responder
    port: int = 0
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    requests: list[Received] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[:-2]
                received = Received(head, b"")
                length = int(received.headers.get("content-length", "0"))
                received.body = await reader.readexactly(length)
                self.requests.append(received)
                if not await self.respond(reader, writer, received):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_now -= 1
            writer.close()


PeerFactory = Callable[[Responder], Awaitable[Peer]]


@pytest.fixture
async def peer() -> AsyncIterator[PeerFactory]:
    servers: list[asyncio.Server] = []

    async def make(respond: Responder) -> Peer:
        made = Peer(respond)
        server = await asyncio.start_server(made.serve, "127.0.0.1", 0)
        made.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return made

    yield make
    for server in servers:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


@pytest.fixture
async def client_factory() -> AsyncIterator[Callable[..., ApiClient]]:
    made: list[ApiClient] = []

    def make(**kwargs: object) -> ApiClient:
        settings: dict[str, object] = {
            "concurrency": 4,
            "connect_timeout": 2,
            "timeout": 5,
            "ssl_context": tls_context(None),
            "allow_local": True,
        }
        settings.update(kwargs)
        client = ApiClient(**settings)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def ok(body: bytes = b'{"id":"x"}', *, extra: str = "") -> Responder:
    async def respond(_: asyncio.StreamReader, writer: asyncio.StreamWriter, __: Received) -> bool:
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        return True

    return respond


async def test_the_request_arrives_as_built_and_the_answer_is_read_whole(
    peer: PeerFactory, client_factory: Callable[..., ApiClient]
) -> None:
    server = await peer(ok(extra="X-Message-Id: abc\r\n"))
    body = bytes(range(256)) * 64 + b"\r\n.\r\n"  # any bytes, unchanged
    request = ApiRequest(
        "POST",
        f"http://127.0.0.1:{server.port}/v3/mg.example.com/messages.mime",
        {"Content-Type": "application/octet-stream", "Authorization": "Bearer k"},
        body,
    )
    response = await client_factory().send(request)
    assert response.status_code == 200 and response.is_success
    assert response.headers["x-message-id"] == "abc" == response.headers["X-MESSAGE-ID"]
    assert response.json() == {"id": "x"}
    (received,) = server.requests
    assert received.head[0] == "POST /v3/mg.example.com/messages.mime HTTP/1.1"
    assert received.body == body
    headers = received.headers
    assert headers["user-agent"] == "mailrelay"
    assert headers["authorization"] == "Bearer k"
    assert headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in headers
    assert headers["host"] == f"127.0.0.1:{server.port}" == request.host
    assert headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("size", [0, 1024 * 1024 + 1, 3 * 1024 * 1024 + 7])
async def test_small_and_large_bodies_arrive_exact_with_a_length(
    size: int, peer: PeerFactory, client_factory: Callable[..., ApiClient]
) -> None:
    server = await peer(ok())
    body = bytes(i % 251 for i in range(size))
    await client_factory().send(
        ApiRequest("POST", f"http://127.0.0.1:{server.port}/", {"Content-Type": "x/y"}, body)
    )
    (received,) = server.requests
    assert received.body == body
    assert received.headers["content-length"] == str(size)
    assert received.headers["content-type"] == "x/y"
    assert "transfer-encoding" not in received.headers


async def test_one_keep_alive_pool_of_concurrency_connections(
    peer: PeerFactory, client_factory: Callable[..., ApiClient]
) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, r: Received) -> bool:
        await asyncio.sleep(0.05)
        return await ok()(reader, writer, r)

    server = await peer(slow)
    client = client_factory(concurrency=3)
    request = ApiRequest("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
    for _ in range(3):
        await client.send(request)
    assert server.connections == 1  # sequential requests reuse one connection
    await asyncio.gather(*(client.send(request) for _ in range(12)))
    assert server.most_open <= 3
    assert len(server.requests) == 15


async def test_a_redirect_is_an_answer_not_followed(
    peer: PeerFactory, client_factory: Callable[..., ApiClient]
) -> None:
    async def redirect(_: asyncio.StreamReader, writer: asyncio.StreamWriter, __: Received) -> bool:
        writer.write(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://169.254.169.254/\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        await writer.drain()
        return True

    server = await peer(redirect)
    response = await client_factory(allow_local=True).send(
        ApiRequest("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")
    )
    assert response.status_code == 307 and not response.is_success
    assert len(server.requests) == 1


async def test_no_answer_in_time_is_a_timeout(
    peer: PeerFactory, client_factory: Callable[..., ApiClient]
) -> None:
    async def silent(reader: asyncio.StreamReader, _: asyncio.StreamWriter, __: Received) -> bool:
        await reader.read()  # until the client gives up
        return False

    server = await peer(silent)
    client = client_factory(timeout=0.3)
    with pytest.raises(ApiTimeout, match=r"^timed out$"):
        await asyncio.wait_for(
            client.send(ApiRequest("POST", f"http://127.0.0.1:{server.port}/", {}, b"x")), 10
        )


async def test_an_endpoint_that_stops_reading_the_upload_times_out(
    client_factory: Callable[..., ApiClient],
) -> None:
    """The read timeout only starts once the body is written; without a deadline a peer
    that never reads would hold the connection (and a concurrency slot) for ever."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # never reads: the socket buffers fill, the write stalls

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = client_factory(connect_timeout=0.2, timeout=0.3, min_upload_rate=10**9)
    body = b"x" * (32 * 1024 * 1024)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(ApiTimeout):
            await asyncio.wait_for(
                client.send(ApiRequest("POST", f"http://127.0.0.1:{port}/", {}, body)), 30
            )
        assert loop.time() - started < 10
    finally:
        for writer in accepted:
            writer.close()
        server.close()


async def test_a_refused_connection_is_unreachable_in_plain_words(
    client_factory: Callable[..., ApiClient],
) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ApiUnreachable) as raised:
        await client_factory().send(ApiRequest("POST", f"http://127.0.0.1:{port}/", {}, b""))
    assert str(raised.value) == "connection refused"


async def test_a_connection_dropped_mid_answer_is_unreachable(
    peer: PeerFactory, client_factory: Callable[..., ApiClient]
) -> None:
    async def half(_: asyncio.StreamReader, writer: asyncio.StreamWriter, __: Received) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        return False

    server = await peer(half)
    with pytest.raises(ApiUnreachable, match=r"^connection lost$"):
        await client_factory().send(ApiRequest("POST", f"http://127.0.0.1:{server.port}/"))


async def test_garbage_instead_of_http_is_a_malformed_answer(
    peer: PeerFactory, client_factory: Callable[..., ApiClient]
) -> None:
    async def garbage(_: asyncio.StreamReader, writer: asyncio.StreamWriter, __: Received) -> bool:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        return False

    server = await peer(garbage)
    with pytest.raises(ApiUnreachable, match=r"^malformed response$"):
        await client_factory().send(ApiRequest("POST", f"http://127.0.0.1:{server.port}/"))


async def test_a_certificate_that_does_not_verify_is_named(
    tls_certs: TlsCerts, client_factory: Callable[..., ApiClient]
) -> None:
    served = Peer(ok())
    server = await asyncio.start_server(
        served.serve, "127.0.0.1", 0, ssl=tls_certs.server_context()
    )
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    try:
        with pytest.raises(ApiUnreachable, match=r"^TLS certificate did not verify"):
            await client_factory().send(ApiRequest("POST", url, {}, b""))
        assert served.requests == []
        # The upstream's `ca_file` makes the same server trusted.
        trusted = client_factory(ssl_context=tls_context(tls_certs.ca_file))
        assert (await trusted.send(ApiRequest("POST", url, {}, b""))).status_code == 200
        assert len(served.requests) == 1
    finally:
        server.close()


async def test_an_oversized_answer_is_cut_and_the_connection_dropped(
    peer: PeerFactory, client_factory: Callable[..., ApiClient]
) -> None:
    async def flood(_: asyncio.StreamReader, writer: asyncio.StreamWriter, __: Received) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"y" * 65536
        for _i in range(64):  # 4 MiB, more than the client keeps
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    server = await peer(flood)
    client = client_factory()
    response = await client.send(ApiRequest("POST", f"http://127.0.0.1:{server.port}/"))
    assert response.status_code == 200
    assert len(response.body) == MAX_RESPONSE_BYTES
    await client.send(ApiRequest("POST", f"http://127.0.0.1:{server.port}/"))
    assert server.connections == 2  # the cut connection was not reused


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer first-line\nsecret-second-line"},
        {"Authorization": "Bearer key\r\nX-Injected: 1"},
        {"X-Token": "nul\x00secret-after"},
        {"X-Token": "caf\u00e9-secret"},
        {"Bad Name": "v"},
    ],
)
async def test_a_header_http_cannot_carry_is_refused_before_sending(
    headers: dict[str, str], peer: PeerFactory, client_factory: Callable[..., ApiClient]
) -> None:
    server = await peer(ok())
    with pytest.raises(InvalidRequest) as raised:
        await client_factory().send(
            ApiRequest("POST", f"http://127.0.0.1:{server.port}/", headers, b"x")
        )
    assert "secret" not in str(raised.value)
    assert server.connections == 0


async def test_a_request_after_close_fails_without_opening_a_new_session(
    peer: PeerFactory, client_factory: Callable[..., ApiClient]
) -> None:
    server = await peer(ok())
    client = client_factory()
    request = ApiRequest("POST", f"http://127.0.0.1:{server.port}/")
    await client.send(request)
    await client.close()
    with pytest.raises(ApiUnreachable):
        await client.send(request)
    assert server.connections == 1


def test_the_url_is_normalized_to_what_goes_on_the_wire() -> None:
    request = ApiRequest("POST", "https://API.Example.COM:443/v3/a b/m\u00e9?x=1")
    assert request.url == "https://api.example.com/v3/a%20b/m%C3%A9?x=1"
    assert request.host == "api.example.com"
    assert ApiRequest("POST", "http://h.example:8080/").host == "h.example:8080"
    assert ApiRequest("POST", "http://[::1]:8080/").host == "[::1]:8080"
    for bad in ("/relative", "ftp://h.example/", "http:///nohost"):
        with pytest.raises(InvalidRequest):
            ApiRequest("POST", bad)


def test_with_headers_replaces_whatever_the_letter_case() -> None:
    request = ApiRequest("POST", "https://h.example/", {"content-type": "a", "X": "1"}, b"b")
    signed = request.with_headers({"Content-Type": "b", "Authorization": "sig"})
    assert dict(signed.headers) == {"X": "1", "Content-Type": "b", "Authorization": "sig"}
    assert signed.body == b"b" and signed.url == request.url


def test_the_response_reads_like_the_providers_expect() -> None:
    answer = ApiResponse(
        400, {"Content-Type": "text/plain; charset=iso-8859-1"}, "d\u00e9j\u00e0".encode("latin-1")
    )
    assert answer.headers["content-type"].startswith("text/plain")
    assert answer.text == "d\u00e9j\u00e0"
    assert not answer.is_success
    with pytest.raises(ValueError):
        answer.json()
    assert ApiResponse(204).is_success
    assert ApiResponse(200, {}, b"\xff\xfe{").text == "\ufffd\ufffd{"
    with pytest.raises(ValueError):
        ApiResponse(200, {}, b"").json()


def test_multipart_form_parses_back_to_the_same_fields_and_bytes() -> None:
    message = b"From: a@example.com\r\n\r\n--not-the-boundary\r\n\xff\x00 body\r\n"
    content_type, body = multipart_form(
        [("to", "b@example.org"), ("to", "c\u00e9@example.org")],
        [FilePart("message", "message.eml", "message/rfc822", message)],
    )
    assert re.fullmatch(r"multipart/form-data; boundary=[0-9a-f]{32}", content_type)
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    parts = list(parsed.iter_parts())
    assert [p.get_param("name", header="content-disposition") for p in parts] == [
        "to",
        "to",
        "message",
    ]
    assert [p.get_payload(decode=True) for p in parts[:2]] == [
        b"b@example.org",
        "c\u00e9@example.org".encode(),
    ]
    assert parts[2].get_filename() == "message.eml"
    assert parts[2].get_content_type() == "message/rfc822"
    assert body.split(b"\r\n\r\n", 3)[3].startswith(message)


def test_multipart_boundary_never_occurs_in_a_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """A boundary that happens to be in the content is drawn again."""
    draws = iter(["a" * 32, "b" * 32])
    monkeypatch.setattr(
        "mailrelay.relay.upstreams.providers.http.secrets.token_hex", lambda _: next(draws)
    )
    content_type, body = multipart_form([], [FilePart("f", "f", "text/plain", b"--" + b"a" * 32)])
    assert content_type.endswith("b" * 32)
    assert body.count(b"--" + b"b" * 32) == 2


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


async def test_an_http_proxy_from_the_environment_carries_the_request(
    clean_proxy_env: pytest.MonkeyPatch,
    peer: PeerFactory,
    client_factory: Callable[..., ApiClient],
) -> None:
    """The proxy connects to the endpoint, whose name is never resolved here."""
    proxy = await peer(ok(b'{"via":"proxy"}'))
    clean_proxy_env.setenv("http_proxy", f"http://relay:pr0xy-pass@localhost:{proxy.port}")
    client = client_factory(allow_local=True)  # the test proxy listens on loopback
    response = await client.send(
        ApiRequest("POST", "http://api.provider.invalid/v3/send", {"X-A": "1"}, b"body")
    )
    assert response.json() == {"via": "proxy"}
    (received,) = proxy.requests
    assert received.head[0] == "POST http://api.provider.invalid/v3/send HTTP/1.1"
    assert received.body == b"body"
    assert received.headers["proxy-authorization"] == "Basic cmVsYXk6cHIweHktcGFzcw=="


@pytest.mark.parametrize("proxy_host", ["localhost", "127.0.0.1"])
async def test_a_proxy_passes_the_ssrf_guard_too(
    proxy_host: str,
    clean_proxy_env: pytest.MonkeyPatch,
    peer: PeerFactory,
    client_factory: Callable[..., ApiClient],
) -> None:
    """A proxy on a local address is refused like a local endpoint (by name through the
    resolver, as a literal by the connector), and a local literal endpoint behind a
    proxy is refused too."""
    proxy = await peer(ok())
    clean_proxy_env.setenv("HTTP_PROXY", f"http://{proxy_host}:{proxy.port}")
    client = client_factory(allow_local=False)
    with pytest.raises(BlockedDestination):
        await client.send(ApiRequest("POST", "http://api.provider.invalid/", {}, b""))
    with pytest.raises(BlockedDestination):
        await client.send(ApiRequest("POST", "http://169.254.169.254/", {}, b""))
    assert proxy.connections == 0


async def test_no_proxy_sends_directly(
    clean_proxy_env: pytest.MonkeyPatch,
    peer: PeerFactory,
    client_factory: Callable[..., ApiClient],
) -> None:
    proxy = await peer(ok())
    endpoint = await peer(ok(b'{"via":"direct"}'))
    clean_proxy_env.setenv("HTTP_PROXY", f"http://localhost:{proxy.port}")
    clean_proxy_env.setenv("NO_PROXY", "127.0.0.1,.internal.example")
    response = await client_factory().send(
        ApiRequest("POST", f"http://127.0.0.1:{endpoint.port}/", {}, b"")
    )
    assert response.json() == {"via": "direct"}
    assert proxy.requests == []


@pytest.mark.parametrize(
    ("host", "entries", "bypass"),
    [
        ("api.example.com", ["*"], True),
        ("api.example.com", ["example.com"], True),
        ("api.example.com", [".example.com"], True),
        ("api.example.com", ["*.example.com"], True),
        ("example.com", [".example.com"], True),
        ("badexample.com", ["example.com"], False),
        ("api.example.com", ["example.com:443"], True),
        ("10.1.2.3", ["10.0.0.0/8"], True),
        ("11.1.2.3", ["10.0.0.0/8"], False),
        ("10.1.2.3", ["10.1.2.3"], True),
        ("::1", ["[::1]"], True),
        ("fd00::5", ["fd00::/8"], True),
        ("api.example.com", [], False),
    ],
)
def test_no_proxy_entries_are_read_as_curl_and_go_read_them(
    host: str, entries: list[str], bypass: bool
) -> None:
    assert no_proxy_matches(host, entries) is bypass


async def test_an_https_endpoint_goes_through_a_connect_tunnel(
    clean_proxy_env: pytest.MonkeyPatch,
    tls_certs: TlsCerts,
    client_factory: Callable[..., ApiClient],
) -> None:
    """For https the proxy only relays bytes: the credentials go on the CONNECT, TLS is
    end to end and verified for the endpoint's name."""
    endpoint = Peer(ok(b'{"via":"tunnel"}'))
    target = await asyncio.start_server(
        endpoint.serve, "127.0.0.1", 0, ssl=tls_certs.server_context()
    )
    target_port = target.sockets[0].getsockname()[1]
    connects: list[Received] = []

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[:-2]
        connects.append(Received(head, b""))
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    proxy = await asyncio.start_server(tunnel, "127.0.0.1", 0)
    proxy_port = proxy.sockets[0].getsockname()[1]
    clean_proxy_env.setenv("https_proxy", f"http://relay:pr0xy-pass@127.0.0.1:{proxy_port}")
    try:
        client = client_factory(ssl_context=tls_context(tls_certs.ca_file))
        response = await client.send(
            ApiRequest("POST", f"https://localhost:{target_port}/emails", {}, b"{}")
        )
        assert response.json() == {"via": "tunnel"}
        (connect,) = connects
        assert connect.head[0] == f"CONNECT localhost:{target_port} HTTP/1.1"
        assert connect.headers["proxy-authorization"] == "Basic cmVsYXk6cHIweHktcGFzcw=="
        (received,) = endpoint.requests
        assert received.head[0] == "POST /emails HTTP/1.1"
        assert "proxy-authorization" not in received.headers
    finally:
        proxy.close()
        target.close()


def test_no_provider_module_imports_an_http_library() -> None:
    """Providers build `ApiRequest`s and read `ApiResponse`s; only `http` (and the guard)
    touch the HTTP library, so a new provider touches only its own module."""
    libraries = {"aiohttp", "httpx", "httpcore", "yarl", "multidict", "h11"}
    directory = Path(providers.__file__).parent
    checked = []
    for module in sorted(directory.glob("*.py")):
        if module.name == "http.py":
            continue
        tree = ast.parse(module.read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & libraries, module.name
        checked.append(module.name)
    assert {"base.py", "mailgun.py", "ses.py", "webhook.py"} <= set(checked)
