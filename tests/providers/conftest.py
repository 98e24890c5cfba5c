"""Fixtures for provider tests: running provider stand-ins, credential files, transports.

* `provider_server`: factory starting the stand-in of one provider (see `servers.py`),
  stopped after the test.
* `credentials_dir`: a directory shaped like the mounted Secret, with every provider's
  files (`api_key`, the AWS key pair, `signing_secret`) holding the servers' secrets.
* `api_upstream(provider, server, **fields)`: the `ApiUpstream` pointing at a stand-in.
* `transport_factory`: builds a transport on a fresh registry and closes it afterwards.
* `relay_factory`, `recording_upstream`, `tls_certs`, `users_file`: the relay tests'
  fixtures (tests/relay/conftest.py), for mail sent through the whole relay.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mailrelay.relay.config import ApiUpstream
from mailrelay.relay.upstreams.providers.base import ApiTransport
from mailrelay.relay.upstreams.providers.registry import build_api_transport
from mailrelay.support.provider_servers import (
    API_KEY,
    AWS_KEY_ID,
    AWS_SECRET,
    MAILGUN_DOMAIN,
    SES_REGION,
    SIGNING_SECRET,
    ProviderServer,
    start_provider_server,
)
from tests.relay.conftest import (  # noqa: F401
    recording_upstream,
    relay_factory,
    tls_certs,
    users_file,
)

# The relay's own fixtures (real relay, recording SMTP upstreams), shared with tests/relay.

PROVIDERS = ("mailgun", "ses", "sparkpost", "sendgrid", "postmark", "resend", "webhook")
RAW_PROVIDERS = ("mailgun", "ses", "sparkpost", "webhook")
JSON_PROVIDERS = ("sendgrid", "postmark", "resend")


@pytest.fixture
async def provider_server() -> AsyncIterator[Callable[[str], Awaitable[ProviderServer]]]:
    """Factory: `await provider_server("mailgun")`."""
    servers: list[ProviderServer] = []

    async def make(provider: str) -> ProviderServer:
        server = await start_provider_server(provider)
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
def credentials_dir(tmp_path: Path) -> Path:
    """Every provider's credential files, as a mounted Secret would hold them."""
    directory = tmp_path / "secret"
    directory.mkdir()
    (directory / "api_key").write_text(API_KEY + "\n")
    (directory / "aws_access_key_id").write_text(AWS_KEY_ID)
    (directory / "aws_secret_access_key").write_text(AWS_SECRET)
    (directory / "signing_secret").write_text(SIGNING_SECRET)
    return directory


def upstream_fields(provider: str, server: ProviderServer, credentials: Path) -> dict[str, Any]:
    """Config fields of an api upstream pointing at a stand-in."""
    fields: dict[str, Any] = {
        "type": "api",
        "name": f"{provider}-api",
        "provider": provider,
        "endpoint": server.base_url + ("/hook" if provider == "webhook" else ""),
        "insecure_allow_local_endpoint": True,  # the stand-in listens on loopback
        "credentials_dir": str(credentials),
        "connect_timeout_seconds": 2,
        "timeout_seconds": 5,
    }
    if provider == "mailgun":
        fields["domain"] = MAILGUN_DOMAIN
    if provider == "ses":
        fields["region"] = SES_REGION
    return fields


@pytest.fixture
def api_upstream(credentials_dir: Path) -> Callable[..., ApiUpstream]:
    """Factory: `api_upstream("ses", server, timeout_seconds=0.5)`."""

    def make(provider: str, server: ProviderServer, **extra: Any) -> ApiUpstream:
        fields = upstream_fields(provider, server, credentials_dir)
        fields.update(extra)
        return ApiUpstream.model_validate(fields)

    return make


@pytest.fixture
async def transport_factory() -> AsyncIterator[Callable[..., ApiTransport]]:
    """Factory: `transport_factory(upstream, clock=...)`; `.registry` of the last one built."""
    made: list[ApiTransport] = []

    def make(upstream: ApiUpstream, **kwargs: Any) -> ApiTransport:
        kwargs.setdefault("registry", CollectorRegistry())
        transport = build_api_transport(upstream, **kwargs)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        await transport.close()
