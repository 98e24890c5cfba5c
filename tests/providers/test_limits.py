"""The size a route can promise (relay, route and provider limits), and api upstream checks."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from mailrelay.relay import upstream_rules
from mailrelay.relay.config import ApiUpstream, RouteConfig
from mailrelay.relay.upstreams.providers import registry
from mailrelay.relay.upstreams.providers.limits import (
    BUILD_MEMORY_FACTORS,
    PROVIDER_LIMITS,
    effective_max_message_size,
)

RELAY_LIMIT = 26_214_400


def route(upstream: dict[str, Any], *fallbacks: dict[str, Any], **extra: Any) -> RouteConfig:
    return RouteConfig.model_validate(
        {"name": "r", "upstream": upstream, "fallbacks": list(fallbacks), **extra}
    )


def api(provider: str, name: str | None = None) -> dict[str, Any]:
    return {
        "type": "api",
        "name": name or provider,
        "provider": provider,
        "endpoint": "https://hooks.example.com/mail",
        "domain": "mg.example.com" if provider == "mailgun" else None,
        "region": "us-east-1" if provider == "ses" else None,
    }


SMTP = {"type": "smtp", "name": "smtp", "host": "smtp.example.com"}


def test_smtp_only_route_keeps_the_relay_limit() -> None:
    assert effective_max_message_size(route(SMTP), RELAY_LIMIT) == RELAY_LIMIT


def test_provider_limit_applies_when_smaller() -> None:
    assert effective_max_message_size(route(api("postmark")), RELAY_LIMIT) == 10_000_000
    # SES takes 40 MB, the relay's own limit is smaller.
    assert effective_max_message_size(route(api("ses")), RELAY_LIMIT) == RELAY_LIMIT


def test_route_limit_applies_when_smaller() -> None:
    r = route(api("mailgun"), max_message_size=1_000_000)
    assert effective_max_message_size(r, RELAY_LIMIT) == 1_000_000


def test_fallbacks_count_too() -> None:
    r = route(SMTP, api("sparkpost"))
    assert (
        effective_max_message_size(r, RELAY_LIMIT) == PROVIDER_LIMITS["sparkpost"].max_message_size
    )


def test_webhook_has_no_limit_of_its_own() -> None:
    assert effective_max_message_size(route(api("webhook")), 5_000) == 5_000


def test_api_upstream_config_is_checked_with_readable_messages() -> None:
    def check(fields: dict[str, Any], message: str) -> None:
        with pytest.raises(ValidationError, match=message):
            ApiUpstream.model_validate({"type": "api", "name": "u", **fields})

    check({"provider": "mailgun"}, "upstream 'u': domain is required for provider mailgun")
    check({"provider": "ses"}, "upstream 'u': provider ses needs a region such as eu-west-1")
    check({"provider": "webhook"}, "upstream 'u': provider webhook needs an endpoint")
    check(
        {"provider": "resend", "endpoint": "api.resend.com"},
        "upstream 'u': endpoint must be an absolute http:// or https:// URL",
    )
    check(
        {"provider": "sparkpost", "region": "eu-west-1"},
        "region for mailgun, sparkpost and sendgrid must be us or eu",
    )


def test_every_provider_has_a_transport_and_limits() -> None:
    """A provider named in upstream_rules (the config's and the CRD's list) can be built and
    sized: adding one to the list without the rest fails here."""
    providers = set(upstream_rules.PROVIDERS)
    assert set(registry.PROVIDERS) == providers
    assert set(PROVIDER_LIMITS) == providers
    assert set(BUILD_MEMORY_FACTORS) == providers


@pytest.mark.parametrize(
    ("provider", "region", "base_url"),
    [
        ("mailgun", None, "https://api.mailgun.net"),
        ("mailgun", "eu", "https://api.eu.mailgun.net"),
        ("sparkpost", "eu", "https://api.eu.sparkpost.com"),
        ("sendgrid", "eu", "https://api.eu.sendgrid.com"),
        ("sendgrid", "us", "https://api.sendgrid.com"),
        ("ses", "eu-west-1", "https://email.eu-west-1.amazonaws.com"),
        ("postmark", None, "https://api.postmarkapp.com"),
        ("resend", None, "https://api.resend.com"),
    ],
)
async def test_default_base_urls_follow_the_region(
    provider: str, region: str | None, base_url: str
) -> None:
    from mailrelay.relay.upstreams.providers.registry import build_api_transport  # noqa: PLC0415

    upstream = ApiUpstream.model_validate(
        {
            "type": "api",
            "name": "u",
            "provider": provider,
            "region": region,
            "domain": "mg.example.com" if provider == "mailgun" else None,
        }
    )
    transport = build_api_transport(upstream)
    try:
        assert transport.base_url == base_url
    finally:
        await transport.close()


def test_size_checks_do_not_load_the_provider_sdks() -> None:
    """The relay's SIZE check imports `limits`; botocore, the HTTP client (aiohttp) and
    the provider modules stay unloaded."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = (
        "import sys, mailrelay.relay.upstreams.providers.limits\n"
        "loaded = [m for m in ('botocore', 'aiohttp', 'httpx', "
        "'mailrelay.relay.upstreams.providers.ses', "
        "'mailrelay.relay.upstreams.providers.http', 'mailrelay.relay.http_guard') "
        "if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


def test_the_engine_imports_api_upstreams_off_the_loop_before_the_first_send() -> None:
    """Starting delivery with a Mailgun and an SES upstream loads their modules (aiohttp,
    botocore) in a thread, so the first message does not stall the loop importing them."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = (
        "import asyncio, sys, threading\n"
        "from types import SimpleNamespace\n"
        "from mailrelay.relay.config import ApiUpstream\n"
        "from mailrelay.relay.delivery import _preload_transports\n"
        "def upstream(name, provider, **extra):\n"
        "    return ApiUpstream.model_validate({'type': 'api', 'name': name,\n"
        "        'provider': provider, **extra})\n"
        "ups = {'a': upstream('a', 'mailgun', domain='mg.example'),\n"
        "       'b': upstream('b', 'ses', region='eu-west-1')}\n"
        "config = SimpleNamespace(upstreams=lambda: ups)\n"
        "main = threading.get_ident()\n"
        "importers = set()\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('aiohttp', 'botocore'):\n"
        "            importers.add(threading.get_ident() == main)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Watch())\n"
        "asyncio.run(_preload_transports(config))\n"
        "loaded = [m for m in ('aiohttp', 'botocore',\n"
        "          'mailrelay.relay.upstreams.providers.mailgun',\n"
        "          'mailrelay.relay.upstreams.providers.ses') if m in sys.modules]\n"
        "print(','.join(loaded), sorted(importers))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "aiohttp,botocore,mailrelay.relay.upstreams.providers.mailgun,mailrelay.relay.upstreams.providers.ses",
        "[False]",
    ]
