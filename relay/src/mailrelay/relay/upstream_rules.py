"""Provider rules for upstreams: the one place they are written.

An upstream is checked in three places, and all three read this module:

* **The relay** (``relay/config.py``): ``ApiUpstream`` calls ``api_upstream_problems`` with
  snake_case field names and refuses the config with the first problem.
* **The operator** (``operator/models.py``): the MailRoute's ``ApiUpstream`` calls the same
  function with camelCase names (``spell=to_camel``), and ``SmtpUpstream``'s host check uses
  ``is_plain_ip``.
* **The API server**: the CEL rules in ``operator/models.py`` are built from the constants
  here (``ENDPOINT_PATTERN``, ``AWS_REGION``, the provider tuples, ``netguard``'s tables)
  and carry the messages here (``messages(to_camel)``); ``make crds`` copies them into the
  CRD. CEL cannot call Python, so ``tests/crd/test_upstream_rules.py`` feeds generated
  specs to the operator's model, to the relay's model (through ``relay_config``) and, for a
  sample, to a real kube-apiserver, and fails when any two disagree.

The endpoint grammar is deliberately narrower than "whatever a URL parser takes": Python's
``urlsplit``, Go's ``net/url`` (behind CEL's ``isURL``) and the HTTP client each read odd
URLs differently (a tab, a ``\\``, ``user@``, a ``%`` escape in the host), so the rule
accepts only the shape all of them read alike: ``http(s)://host[:port][/path][?query]``,
no spaces or control characters, no credentials, no ``#fragment``, ``%`` only as an escape.
The host is then split out by the same string operations in Python and in CEL.

Adding a provider (touch points):

1. ``Provider`` below, and the per-provider tuples if it takes a region, a domain or no
   credentials; a new required field gets a rule in ``api_upstream_problems`` and its CEL
   twin in ``operator/models.py`` (``ApiUpstream.model_config``).
2. ``relay/upstreams/providers/<name>.py`` (the transport), registered in
   ``relay/upstreams/providers/registry.py``.
3. ``relay/upstreams/providers/limits.py``: ``PROVIDER_LIMITS`` and ``BUILD_MEMORY_FACTORS``
   (a test checks both cover ``PROVIDERS``).
4. ``operator/relay_config.py`` only if it reads different Secret keys.
5. ``make crds``; docs/providers.md; an example in examples/ (a test wants every provider
   in one); a local fake in mailrelay.support.provider_servers.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Final, Literal, get_args

from mailrelay.relay import netguard

__all__ = [
    "AMBIENT_CREDENTIAL_PROVIDERS",
    "AWS_REGION",
    "DEFAULT_SIGNING_KEY_ID",
    "ENDPOINT_PATTERN",
    "MAX_SIGNING_KEYS",
    "OAUTH2_GRANTS",
    "OAUTH2_MECHANISMS",
    "PROVIDERS",
    "REGIONAL_PROVIDERS",
    "REGIONAL_REGIONS",
    "REGION_PROVIDERS",
    "SELF_SIGNING_PROVIDERS",
    "SIGNING_KEY_ID_PATTERN",
    "Messages",
    "Provider",
    "api_upstream_problems",
    "dkim_provider_problem",
    "endpoint_host",
    "endpoint_port",
    "is_plain_ip",
    "messages",
    "oauth2_problems",
]

Provider = Literal["mailgun", "ses", "sparkpost", "sendgrid", "postmark", "resend", "webhook"]
PROVIDERS: Final[tuple[str, ...]] = get_args(Provider)
# Providers with a US and an EU API (us when unset), and the one that signs with an AWS region.
REGIONAL_PROVIDERS: Final = ("mailgun", "sparkpost", "sendgrid")
REGIONAL_REGIONS: Final = ("us", "eu")
REGION_PROVIDERS: Final = (*REGIONAL_PROVIDERS, "ses")
AWS_REGION: Final = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"
# Providers that rebuild the message from JSON fields: no DKIM signature of ours survives,
# so a route that signs cannot use them (they sign with the domain keys set up at the
# provider instead; docs/dkim.md). The others carry the raw message byte for byte.
SELF_SIGNING_PROVIDERS: Final = ("sendgrid", "postmark", "resend")
# Only SES can go without a Secret (the pod's AWS identity); a webhook is always signed.
AMBIENT_CREDENTIAL_PROVIDERS: Final = ("ses",)

# Webhook signing keys: at most two (the active one and the one being rotated in or out),
# each with an id sent beside the signature so a receiver knows which secret to check
# with. The id is also part of a file name (`signing_key_file`), hence the narrow grammar.
MAX_SIGNING_KEYS: Final = 2
SIGNING_KEY_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
# The id sent when a webhook has a single secret (`signing_secret` or `api_key`).
DEFAULT_SIGNING_KEY_ID: Final = "default"
_SIGNING_KEY_ID_RE = re.compile(SIGNING_KEY_ID_PATTERN)


def signing_key_file(key_id: str) -> str:
    """The file in an upstream's credentials directory that holds signing key `key_id`."""
    return f"signing_key_{key_id}"


# OAuth2 for SMTP upstreams (docs/oauth2.md): the SASL mechanisms and the token grants.
OAUTH2_MECHANISMS: Final = ("xoauth2", "oauthbearer")
OAUTH2_GRANTS: Final = ("refresh_token", "client_credentials")

# The endpoint grammar, in the subset of regular expressions Python's `re` and RE2 (CEL's
# `matches`) read alike, without a quote (it sits in a CEL r'...' string).
_URL_CHAR = r"([^#%\\\x00-\x20\x7f]|%[0-9A-Fa-f]{2})"
_HOST_LABEL = r"([-_A-Za-z0-9]|[^\x00-\x7f])+"
ENDPOINT_PATTERN: Final = (
    r"^[hH][tT][tT][pP][sS]?://"
    rf"(\[[0-9A-Fa-f:.]+\]|{_HOST_LABEL}(\.{_HOST_LABEL})*\.?)"
    r"(:[0-9]{1,5})?"
    rf"([/?]{_URL_CHAR}*)?$"
)
_ENDPOINT_RE = re.compile(ENDPOINT_PATTERN)


class Messages:
    """The refusals, with field names spelled for the reader (snake_case in the relay's
    YAML, camelCase in a MailRoute)."""

    def __init__(self, spell: Callable[[str], str]) -> None:
        self._allow_local = spell("insecure_allow_local_endpoint")
        self.endpoint = (
            "endpoint must be an absolute http:// or https:// URL such as "
            "https://api.example.com/v3: a host name or address (an IPv6 address in "
            "brackets), an optional port, then an optional path and query; no spaces, "
            "no user@ credentials (use the Secret), no #fragment, '%' only as a %XX escape"
        )
        self.endpoint_port = "endpoint: the port must be between 1 and 65535"
        self.ipv6_literal = (
            "endpoint: write an IPv6 host as a plain address such as [2001:db8::25], without "
            "a %zone and not in the IPv4-mapped form [::ffff:a.b.c.d] (write that as a.b.c.d)"
        )
        self.local_endpoint = netguard.local_endpoint_message("endpoint", self._allow_local)
        self.mailgun_domain = "domain is required for provider mailgun"
        self.domain_only_mailgun = "domain is only used by provider mailgun"
        self.ses_region = "provider ses needs a region such as eu-west-1 (SigV4 signs with it)"
        self.ses_region_format = "region for provider ses must be an AWS region such as eu-west-1"
        self.region_us_eu = "region for mailgun, sparkpost and sendgrid must be us or eu"
        self.region_unused = "region is only used by mailgun, sparkpost, sendgrid and ses"
        self.webhook_endpoint = "provider webhook needs an endpoint"
        self.credentials = (
            f"{spell('credentials_secret_ref')} is required for this provider "
            "(only ses may go without)"
        )
        self.configuration_set = f"{spell('configuration_set')} is only used by provider ses"
        self.message_stream = f"{spell('message_stream')} is only used by provider postmark"
        self.smtp_plaintext = (
            "tls: none sends mail and credentials in cleartext; "
            f"set {spell('insecure_allow_plaintext')}: true to allow it"
        )
        keys, active = spell("signing_keys"), spell("active_signing_key")
        self.signing_keys_only_webhook = f"{keys} and {active} are only used by provider webhook"
        self.signing_keys_count = f"{keys} holds at most {MAX_SIGNING_KEYS} keys"
        self.signing_key_id = (
            f"{keys}: an id is 1 to 63 letters, digits, '-' or '_', starting with a letter or digit"
        )
        self.signing_keys_unique = f"{keys}: every id must be different"
        self.active_signing_key_required = (
            f"{active} must name the key that signs when {keys} has two keys"
        )
        self.active_signing_key_unknown = f"{active} must be the id of one of {keys}"
        token_endpoint = spell("token_endpoint")
        self.token_endpoint_https = (
            f"{token_endpoint} must be an https:// URL (RFC 6749 section 3.2: the token "
            "endpoint takes the client secret); http:// only with "
            f"{self._allow_local}, for a token server on the pod's own loopback"
        )
        self.oauth2_refresh_token = (
            f"{spell('refresh_token_file')} is required for grant refresh_token and not used "
            "by grant client_credentials"
        )
        self.oauth2_password = (
            f"oauth2 replaces the password: set {spell('username_file')} (the mailbox) and "
            f"no {spell('password_file')}"
        )
        self.dkim_self_signing = (
            "dkim cannot be used with providers sendgrid, postmark or resend (upstream or "
            "fallback): they rebuild the message from JSON, so no signature made here "
            "survives; those providers sign with the DKIM keys you set up in their account "
            "(docs/dkim.md). Remove dkim, or deliver through smtp, mailgun, ses, sparkpost "
            "or webhook"
        )

    def local_endpoint_at(self, host: str, reason: str) -> str:
        """``local_endpoint`` naming the host and what it is (CEL messages cannot)."""
        return netguard.local_endpoint_message(
            f"endpoint host {host!r} is {reason}", self._allow_local
        )


def messages(spell: Callable[[str], str] = str) -> Messages:
    """The messages with field names spelled by ``spell`` (default: as written here)."""
    return Messages(spell)


def is_plain_ip(host: str) -> bool:
    """Whether ``host`` is an address the API server's ``isIP`` accepts too: no %zone and
    not an IPv4-mapped IPv6 address (``ip()`` refuses both)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not (
        isinstance(address, ipaddress.IPv6Address)
        and (address.ipv4_mapped is not None or address.scope_id is not None)
    )


def _host_port(endpoint: str) -> str:
    """The ``host[:port]`` of an endpoint that matches ``ENDPOINT_PATTERN`` (no user@)."""
    return endpoint.split("/")[2].split("?", maxsplit=1)[0]


def endpoint_host(endpoint: str) -> str:
    """The host of a matching endpoint, brackets removed; the CEL rules split it alike."""
    host_port = _host_port(endpoint)
    if host_port.startswith("["):
        return host_port[1 : host_port.index("]")]
    return host_port.split(":")[0]


def endpoint_port(endpoint: str) -> int | None:
    """The explicit port of a matching endpoint, if any."""
    host_port = _host_port(endpoint)
    rest = host_port[host_port.index("]") + 1 :] if host_port.startswith("[") else host_port
    _, colon, port = rest.partition(":")
    return int(port) if colon else None


def endpoint_problem(
    endpoint: str, *, allow_local: bool, words: Messages, field: str = "endpoint"
) -> str | None:
    """What is wrong with an endpoint URL, or None; `field` names it in the message."""
    problem = _endpoint_problem(endpoint, allow_local=allow_local, words=words)
    if problem is None or field == "endpoint":
        return problem
    return field + problem.removeprefix("endpoint")


def _endpoint_problem(endpoint: str, *, allow_local: bool, words: Messages) -> str | None:
    if not _ENDPOINT_RE.fullmatch(endpoint):
        return words.endpoint
    port = endpoint_port(endpoint)
    if port is not None and not 1 <= port <= 65535:
        return words.endpoint_port
    host = endpoint_host(endpoint)
    if _host_port(endpoint).startswith("[") and not (":" in host and is_plain_ip(host)):
        return words.ipv6_literal
    # One trailing dot (the grammar allows no more) means the same host; lower case ASCII
    # only, as CEL's lowerAscii() does.
    bare = host.removesuffix(".").translate(_ASCII_LOWER)
    reason = None if allow_local else netguard.local_host_reason(bare)
    if reason is not None:
        return words.local_endpoint_at(host, reason)
    return None


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def api_upstream_problems(
    *,
    provider: str,
    endpoint: str | None,
    region: str | None,
    domain: str | None,
    configuration_set: str | None,
    message_stream: str | None,
    allow_local_endpoint: bool,
    has_credentials: bool | None,
    words: Messages,
    signing_key_ids: Sequence[str] = (),
    active_signing_key: str | None = None,
) -> list[str]:
    """Every rule an HTTP upstream breaks, in a stable order (empty when it is fine).

    ``has_credentials`` is None where the check does not apply (the relay reads whatever
    files ``credentials_dir`` holds; a missing key is a delivery-time configuration error).
    """
    problems = []
    if provider == "mailgun" and domain is None:
        problems.append(words.mailgun_domain)
    if domain is not None and provider != "mailgun":
        problems.append(words.domain_only_mailgun)
    if provider == "ses" and region is None:
        problems.append(words.ses_region)
    if region is not None:
        if provider == "ses" and not re.fullmatch(AWS_REGION[1:-1], region):
            problems.append(words.ses_region_format)
        if provider in REGIONAL_PROVIDERS and region not in REGIONAL_REGIONS:
            problems.append(words.region_us_eu)
        if provider not in REGION_PROVIDERS:
            problems.append(words.region_unused)
    if provider == "webhook" and endpoint is None:
        problems.append(words.webhook_endpoint)
    if configuration_set is not None and provider != "ses":
        problems.append(words.configuration_set)
    if message_stream is not None and provider != "postmark":
        problems.append(words.message_stream)
    problems += _signing_key_problems(provider, signing_key_ids, active_signing_key, words)
    if endpoint is not None:
        problem = endpoint_problem(endpoint, allow_local=allow_local_endpoint, words=words)
        if problem is not None:
            problems.append(problem)
    # Last: the one rule the relay does not apply, so both report the same first problem.
    if has_credentials is False and provider not in AMBIENT_CREDENTIAL_PROVIDERS:
        problems.append(words.credentials)
    return problems


def _signing_key_problems(
    provider: str, ids: Sequence[str], active: str | None, words: Messages
) -> list[str]:
    """The webhook's signing keys: at most two, ids well formed and distinct, and the
    active one named among them when there are two."""
    if provider != "webhook":
        return [words.signing_keys_only_webhook] if ids or active is not None else []
    problems = []
    if len(ids) > MAX_SIGNING_KEYS:
        problems.append(words.signing_keys_count)
    if not all(_SIGNING_KEY_ID_RE.fullmatch(i) for i in ids):
        problems.append(words.signing_key_id)
    if len(set(ids)) != len(ids):
        problems.append(words.signing_keys_unique)
    if active is None and len(ids) > 1:
        problems.append(words.active_signing_key_required)
    if active is not None and active not in ids:
        problems.append(words.active_signing_key_unknown)
    return problems


def active_signing_key_id(ids: Sequence[str], active: str | None) -> str:
    """The id of the key that signs: the named one, the only one, or the default."""
    if active is not None:
        return active
    return ids[0] if ids else DEFAULT_SIGNING_KEY_ID


def oauth2_problems(
    *,
    token_endpoint: str,
    grant: str,
    has_refresh_token: bool | None,
    allow_local_endpoint: bool,
    words: Messages,
    field: str = "token_endpoint",
) -> list[str]:
    """Every rule an SMTP upstream's OAuth2 settings break (empty when fine).

    ``has_refresh_token`` is None where the check does not apply (the operator always
    mounts the key its grant needs). ``field`` spells ``token_endpoint`` for the reader.
    """
    problems = []
    problem = endpoint_problem(
        token_endpoint, allow_local=allow_local_endpoint, words=words, field=field
    )
    if problem is not None:
        problems.append(problem)
    elif not token_endpoint.lower().startswith("https://") and not allow_local_endpoint:
        problems.append(words.token_endpoint_https)
    if has_refresh_token is not None and has_refresh_token != (grant == "refresh_token"):
        problems.append(words.oauth2_refresh_token)
    return problems


def dkim_provider_problem(*, signs: bool, providers: Sequence[str], words: Messages) -> str | None:
    """Why a route that signs with DKIM cannot use these API providers, or None."""
    if signs and any(p in SELF_SIGNING_PROVIDERS for p in providers):
        return words.dkim_self_signing
    return None
