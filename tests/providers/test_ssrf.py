"""SSRF: an HTTP upstream never reaches loopback, link-local or metadata addresses unless told.

The config check refuses literal addresses and known names; these tests go past it with
host names the config cannot judge (``127.1`` is a name to a URL parser and 127.0.0.1 to
the resolver), so only the connect-time guard stands between the relay and a local server.
Each test also shows the same server answering once the upstream allows local endpoints,
so a refusal is the guard's doing and not a dead server.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from mailrelay.relay import http_guard, netguard
from mailrelay.relay.config import ApiUpstream, ConfigError, parse_config
from mailrelay.relay.main import main as relay_main
from mailrelay.relay.upstreams.providers.base import ApiTransport
from mailrelay.relay.upstreams.providers.http import (
    ApiClient,
    ApiRequest,
    ApiUnreachable,
    tls_context,
)
from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome
from mailrelay.support.provider_servers import ProviderServer
from tests.providers.messages import rich_message

ServerFactory = Callable[[str], Awaitable[ProviderServer]]


def _envelope() -> Envelope:
    return Envelope(
        queue_id="Q0001",
        mail_from="ann@example.com",
        recipients=("bob@example.org",),
        smtputf8=False,
        body_8bitmime=True,
    )


def _disguised(server: ProviderServer, host: str) -> str:
    """The server's URL with its loopback address written as another host name."""
    return server.base_url.replace("127.0.0.1", host)


@pytest.mark.parametrize("host", ["0x7f.1", "0x7F000001"])
async def test_a_name_that_resolves_to_loopback_is_refused_at_connect_time(
    host: str,
    provider_server: ServerFactory,
    api_upstream: Callable[..., ApiUpstream],
    transport_factory: Callable[..., ApiTransport],
) -> None:
    server = await provider_server("webhook")
    endpoint = _disguised(server, host) + "/hook"
    registry: CollectorRegistry = CollectorRegistry()
    guarded = transport_factory(
        api_upstream("webhook", server, endpoint=endpoint, insecure_allow_local_endpoint=False),
        registry=registry,
    )

    results = await guarded.deliver(_envelope(), rich_message())

    assert [r.outcome for r in results] == [RecipientOutcome.CONFIG_ERROR]
    assert "resolved to 127.0.0.1" in results[0].detail
    assert "insecure_allow_local_endpoint" in results[0].detail
    assert server.requests == []
    labels = {"upstream": "webhook-api", "provider": "webhook"}
    assert registry.get_sample_value("mailrelay_provider_config_error", labels) == 1

    allowed = transport_factory(
        api_upstream("webhook", server, endpoint=endpoint, insecure_allow_local_endpoint=True)
    )
    results = await allowed.deliver(_envelope(), rich_message())
    assert [r.outcome for r in results] == [RecipientOutcome.DELIVERED]
    assert len(server.sent) == 1


async def test_every_provider_is_guarded(
    provider_server: ServerFactory,
    api_upstream: Callable[..., ApiUpstream],
    transport_factory: Callable[..., ApiTransport],
) -> None:
    """The guard sits in the base class, so it holds for each provider's own requests."""
    for provider in ("mailgun", "ses", "sparkpost", "sendgrid", "postmark", "resend"):
        server = await provider_server(provider)
        transport = transport_factory(
            api_upstream(
                provider,
                server,
                endpoint=_disguised(server, "0177.1"),
                insecure_allow_local_endpoint=False,
            )
        )
        results = await transport.deliver(_envelope(), rich_message())
        assert [r.outcome for r in results] == [RecipientOutcome.CONFIG_ERROR], provider
        assert server.requests == [], provider


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0177.0.0.1"])
async def test_a_legacy_numeric_host_never_connects(
    host: str,
    provider_server: ServerFactory,
    api_upstream: Callable[..., ApiUpstream],
    transport_factory: Callable[..., ApiTransport],
) -> None:
    """Numeric forms the C library maps onto 127.0.0.1: the guard judges what they mean;
    allowed, aiohttp still refuses them (not a dotted quad), as a configuration error."""
    server = await provider_server("webhook")
    endpoint = _disguised(server, host) + "/hook"
    guarded = transport_factory(
        api_upstream("webhook", server, endpoint=endpoint, insecure_allow_local_endpoint=False)
    )
    results = await guarded.deliver(_envelope(), rich_message())
    assert [r.outcome for r in results] == [RecipientOutcome.CONFIG_ERROR]
    assert "resolved to 127.0.0.1" in results[0].detail
    allowed = transport_factory(
        api_upstream("webhook", server, endpoint=endpoint, insecure_allow_local_endpoint=True)
    )
    results = await allowed.deliver(_envelope(), rich_message())
    assert [r.outcome for r in results] == [RecipientOutcome.CONFIG_ERROR]
    assert f"the host {host!r} cannot be connected to as written" in results[0].detail
    assert server.requests == []


class _Listener:
    """A TCP server on loopback that counts connections and answers every request 200."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _Listener:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        writer.close()


def _client(*, allow_local: bool) -> ApiClient:
    return ApiClient(
        concurrency=2,
        connect_timeout=1,
        timeout=2,
        ssl_context=tls_context(None),
        allow_local=allow_local,
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/",
        "http://[::1]:{port}/",
        "http://[::ffff:127.0.0.1]:{port}/",
        "http://0.0.0.0:{port}/",
        "http://169.254.169.254/latest/meta-data/",
        "https://[fd00:ec2::254]/",
    ],
)
async def test_an_address_literal_is_refused_although_aiohttp_skips_its_resolver(
    url: str,
) -> None:
    """aiohttp connects to an IP literal without asking the resolver: the connector's own
    check must refuse it, and the same request goes through when local is allowed."""
    async with _Listener() as listener:
        request = ApiRequest("POST", url.format(port=listener.port), {}, b"{}")
        client = _client(allow_local=False)
        try:
            with pytest.raises(http_guard.BlockedDestination, match="may not reach loopback"):
                await client.send(request)
        finally:
            await client.close()
        assert listener.connections == 0
        if url.startswith("http://127.0.0.1"):
            client = _client(allow_local=True)
            try:
                assert (await client.send(request)).status_code == 200
            finally:
                await client.close()
            assert listener.connections == 1


async def test_a_name_is_checked_by_the_resolver_at_connect_time() -> None:
    """`localhost` goes through aiohttp's resolver: the guarded one refuses every address."""
    async with _Listener() as listener:
        request = ApiRequest("POST", f"http://localhost:{listener.port}/", {}, b"{}")
        client = _client(allow_local=False)
        try:
            with pytest.raises(
                http_guard.BlockedDestination,
                match=r"'localhost' \(resolved to (127\.0\.0\.1|::1)\)",
            ):
                await client.send(request)
        finally:
            await client.close()
        assert listener.connections == 0


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped: the kernel connects to 127.0.0.1
        ("::ffff:169.254.169.254", True),
        ("0.0.0.0", True),
        ("::", True),
        ("169.254.169.254", True),
        ("fe80::1", True),
        ("fd00:ec2::254", True),
        ("10.0.0.1", False),  # in-cluster webhooks are private, not local
        ("fd00::1", False),
        ("93.184.215.14", False),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", False),
    ],
)
async def test_resolver_refuses_local_addresses(address: str, refused: bool) -> None:
    resolver = http_guard.GuardedResolver()
    if refused:
        with pytest.raises(http_guard.BlockedDestination, match="may not reach loopback"):
            await resolver.resolve(address, 443)
        with pytest.raises(http_guard.BlockedDestination, match="may not reach loopback"):
            http_guard.check_numeric_host(address)
    else:
        results = await resolver.resolve(address, 443)
        assert [r["host"] for r in results] == [str(ipaddress.ip_address(address))]
        assert results[0]["port"] == 443
        http_guard.check_numeric_host(address)


async def test_unresolvable_name_is_a_lookup_error_not_a_refusal() -> None:
    with pytest.raises(socket.gaierror):
        await http_guard.GuardedResolver().resolve("no-such-host.invalid", 443)
    client = _client(allow_local=False)
    try:
        with pytest.raises(ApiUnreachable) as raised:
            await client.send(ApiRequest("POST", "http://no-such-host.invalid/", {}, b""))
    finally:
        await client.close()
    assert "no-such-host" not in str(raised.value)  # the OS's words, not aiohttp's text


async def test_the_guard_hooks_into_the_aiohttp_version_it_was_tested_with() -> None:
    """The guard relies on how aiohttp's TCPConnector calls its resolver and `connect`; a
    version outside the tested range must fail here, not silently (the tests above show
    both hooks at work on this one)."""
    assert aiohttp.__version__.startswith(http_guard.SUPPORTED_AIOHTTP)
    guarded = http_guard.connector(
        ssl_context=tls_context(None), limit=2, keepalive_timeout=5, allow_local=False
    )
    open_ = http_guard.connector(
        ssl_context=tls_context(None), limit=2, keepalive_timeout=5, allow_local=True
    )
    try:
        assert isinstance(guarded, http_guard.GuardedConnector)
        assert not isinstance(open_, http_guard.GuardedConnector)
        parameters = list(inspect.signature(aiohttp.TCPConnector.connect).parameters)
        assert parameters == ["self", "req", "traces", "timeout"]
    finally:
        await guarded.close()
        await open_.close()


@pytest.mark.parametrize(
    ("endpoint", "refused"),
    [
        ("http://127.0.0.1:8080/", True),
        ("http://[::1]/", True),
        ("http://169.254.169.254/latest/meta-data/", True),
        ("http://LOCALHOST:80/", True),
        ("http://api.localhost/", True),
        ("http://metadata.google.internal./", True),
        ("http://0.0.0.0/", True),
        ("http://10.1.2.3/hook", False),
        ("https://hooks.example.org/in", False),
    ],
)
def test_config_refuses_literal_local_endpoints(endpoint: str, refused: bool) -> None:
    text = f"""
hostname: relay.example.com
auth: {{required: false}}
allowed_networks: [10.0.0.0/8]
spool: {{directory: /tmp/spool}}
routes:
  - name: hook
    upstream: {{type: api, name: hook, provider: webhook, endpoint: "{endpoint}"}}
"""
    if refused:
        with pytest.raises(ConfigError, match="set insecure_allow_local_endpoint: true"):
            parse_config(text)
        parse_config(text.replace("provider: webhook", "provider: webhook, "
                                  "insecure_allow_local_endpoint: true"))  # fmt: skip
    else:
        parse_config(text)


@pytest.mark.parametrize("allow_local", [False, True])
def test_config_refuses_an_ipv4_mapped_endpoint_in_any_case(allow_local: bool) -> None:
    """The API server cannot read [::ffff:127.0.0.1] as an address (its ip() refuses the
    form), so the MailRoute refuses it even with the opt-in; the relay says the same."""
    text = f"""
hostname: relay.example.com
auth: {{required: false}}
allowed_networks: [10.0.0.0/8]
spool: {{directory: /tmp/spool}}
routes:
  - name: hook
    upstream:
      type: api
      name: hook
      provider: webhook
      endpoint: "http://[::ffff:127.0.0.1]/"
      insecure_allow_local_endpoint: {str(allow_local).lower()}
"""
    with pytest.raises(ConfigError, match=r"IPv4-mapped form \[::ffff:a\.b\.c\.d\]"):
        parse_config(text)


@pytest.mark.parametrize(
    ("networks", "public"),
    [
        (["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"], []),
        (["127.0.0.0/8", "169.254.0.0/16", "fc00::/7", "::1/128", "fe80::/10"], []),
        (["0.0.0.0/0"], ["0.0.0.0/0"]),
        (["::/0", "10.0.0.0/8"], ["::/0"]),
        (["10.0.0.0/7"], ["10.0.0.0/7"]),  # reaches 11.0.0.0/8
        (["172.0.0.0/11"], ["172.0.0.0/11"]),
        (["100.64.0.0/9"], ["100.0.0.0/9"]),
        (["::ffff:10.0.0.0/104"], ["::ffff:a00:0/104"]),  # written as IPv6: judged as such
    ],
)
def test_public_networks(networks: list[str], public: list[str]) -> None:
    parsed = [ipaddress.ip_network(n, strict=False) for n in networks]
    assert [str(n) for n in netguard.public_networks(parsed)] == public


def test_relay_refuses_to_start_as_an_open_relay() -> None:
    text = """
hostname: relay.example.com
auth: {required: false}
allowed_networks: [10.0.0.0/8, 0.0.0.0/0]
spool: {directory: /tmp/spool}
routes:
  - name: out
    upstream: {type: smtp, name: out, host: smtp.example.net}
"""
    with pytest.raises(ConfigError) as refused:
        parse_config(text)
    message = str(refused.value)
    assert "allowed_networks" in message and "0.0.0.0/0" in message
    assert "open relay" in message and "insecure_allow_public_networks: true" in message
    assert "and 0.0.0.0/0 there reaches" in message  # names only the culprit
    config = parse_config(text + "insecure_allow_public_networks: true\n")
    assert config.insecure_allow_public_networks


def test_loopback_names_resolve_here() -> None:
    """The disguised hosts above really mean loopback on this machine's resolver."""
    for host in ("127.1", "2130706433", "0x7f.1", "0177.1"):
        infos = socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM)
        assert {info[4][0] for info in infos} == {"127.0.0.1"}, host


def test_an_open_relay_is_listed_with_the_other_problems_of_the_file() -> None:
    """One pass shows every problem: a bad field elsewhere does not hide the open relay."""
    text = """
hostname: relay.example.com
auth: {required: false}
allowed_networks: [0.0.0.0/0, nonsense]
spool: {directory: /tmp/spool}
routes:
  - name: out
    match: {sender_domains: ["bad..domain"]}
    upstream: {type: smtp, name: out, host: smtp.example.net}
"""
    with pytest.raises(ConfigError) as refused:
        parse_config(text)
    message = str(refused.value)
    assert "'nonsense' is not a network" in message
    assert "bad..domain" in message
    assert "0.0.0.0/0 there reaches beyond private addresses" in message


def test_check_config_refuses_an_open_relay_and_a_local_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The relay's own start-up check: what the API server refuses, the relay refuses too."""
    config = tmp_path / "relay.yaml"
    config.write_text(
        f"""
hostname: relay.example.com
auth: {{required: false}}
allowed_networks: ["::/0"]
spool: {{directory: {tmp_path / "spool"}}}
routes:
  - name: hook
    upstream:
      type: api
      name: hook
      provider: webhook
      endpoint: "http://169.254.169.254/latest/meta-data/"
"""
    )
    assert relay_main(["--config", str(config), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert "::/0 there reaches beyond private addresses" in err
    assert "endpoint host '169.254.169.254' is link-local" in err
