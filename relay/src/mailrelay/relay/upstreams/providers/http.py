"""The HTTP layer of every provider: our request and response types, one client per upstream.

Providers build an `ApiRequest` (method, absolute URL, headers, body bytes) and read an
`ApiResponse` (status, case-insensitive headers, body bytes); none of them imports an HTTP
library, so a new provider touches only its own module. `ApiClient` sends requests over one
long-lived aiohttp session:

- a keep-alive pool of `concurrency` connections (HTTP/1.1), through the SSRF guard of
  `mailrelay.relay.http_guard` unless the upstream allows local endpoints;
- a connect timeout (lookup, TCP and TLS handshake) and a read timeout (the wait for the
  next bytes of the answer once the request is written), and a deadline for the whole
  request that grows with the body (`MIN_UPLOAD_BYTES_PER_SECOND`), so an endpoint that
  stops reading cannot hold a connection for ever;
- no redirects, no cookies, `User-Agent: mailrelay`, answers uncompressed and read
  whole, at most `MAX_RESPONSE_BYTES` of them; an `http://` proxy from `HTTPS_PROXY` /
  `HTTP_PROXY` unless `NO_PROXY` names the host (`EnvProxies`, read once);
- failures as our own exceptions: `ApiTimeout`, `ApiUnreachable` (with an SMTP-style
  reason from `describe_error`, never an exception's own text), `ApiConfigError`
  (`InvalidRequest`: a header or URL that cannot be sent, found before any I/O;
  `TlsConfigError`: an unloadable `ca_file`) and the guard's `BlockedDestination`.

`multipart_form` encodes a multipart/form-data body for providers that take files.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import io
import ipaddress
import json
import logging
import re
import secrets
import ssl
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import aiohttp
import certifi
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from mailrelay.relay import http_guard
from mailrelay.relay.http_guard import BlockedDestination
from mailrelay.relay.redact import SECRETS
from mailrelay.relay.upstreams.transport import describe_error

__all__ = [
    "MAX_RESPONSE_BYTES",
    "MIN_UPLOAD_BYTES_PER_SECOND",
    "ApiClient",
    "ApiConfigError",
    "ApiError",
    "ApiRequest",
    "ApiResponse",
    "ApiTimeout",
    "ApiUnreachable",
    "BlockedDestination",
    "FilePart",
    "InvalidRequest",
    "TlsConfigError",
    "multipart_form",
    "tls_context",
]

log = logging.getLogger(__name__)

USER_AGENT = "mailrelay"
# Idle pooled connections are closed after this long (what httpx did; servers' own idle
# timeouts are rarely shorter, so a reused connection is rarely one the server just closed).
KEEPALIVE_SECONDS = 5.0
# The deadline of one request allows the body to go out at least this fast on top of the
# connect and read timeouts: 25 MB in about 100 s.
MIN_UPLOAD_BYTES_PER_SECOND = 256 * 1024
# Providers answer with a few hundred bytes; an endpoint sending more is cut off here.
MAX_RESPONSE_BYTES = 1024 * 1024
# Bodies above this size are written in chunks (aiohttp's own threshold for a warning).
LARGE_BODY_BYTES = 1024 * 1024

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")


class ApiError(Exception):
    """A request that got no answer; `str()` is a short reason fit for a bounce.

    `maybe_sent` says whether the provider may have received the request: False only when
    the failure came before a connection was made (lookup, connect, TLS handshake); after
    that the request may have been read and acted on with the answer lost on the way back,
    so the outcome is unknown and a retry can send the mail twice.
    """

    def __init__(self, reason: str, *, maybe_sent: bool = True) -> None:
        super().__init__(reason)
        self.maybe_sent = maybe_sent


class ApiTimeout(ApiError):
    """The connect, the answer or the whole request took longer than allowed."""


class ApiUnreachable(ApiError):
    """The connection failed or broke: refused, reset, TLS, a malformed answer."""


class ApiConfigError(ApiError):
    """Our configuration stands in the way; retrying will not help until it is fixed."""


class InvalidRequest(ApiConfigError):
    """The request cannot be sent as built (a header or URL HTTP cannot carry)."""


class TlsConfigError(ApiConfigError):
    """The upstream's `ca_file` cannot be loaded."""


@functools.lru_cache(maxsize=256)
def _normalized_url(url: str) -> str:
    """The URL as it goes on the wire: IDNA host, percent-encoded path and query."""
    parsed = URL(url)
    if not parsed.absolute or parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise InvalidRequest("the request URL must be an absolute http:// or https:// URL")
    return str(parsed)


@functools.lru_cache(maxsize=256)
def _wire_url(url: str) -> URL:
    return URL(url, encoded=True)


@dataclass(frozen=True)
class ApiRequest:
    """One HTTP request as a provider builds it; `url` is normalized to what is sent."""

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", _normalized_url(self.url))

    @property
    def host(self) -> str:
        """The `Host` header the request is sent with (no port when it is the default)."""
        host = _wire_url(self.url).host_port_subcomponent
        assert host is not None  # an absolute URL (checked in __post_init__)
        return host

    def with_headers(self, extra: Mapping[str, str]) -> ApiRequest:
        """The same request with `extra` headers added or replaced (signing adds some)."""
        merged = {k: v for k, v in self.headers.items() if k.lower() not in _lower(extra)}
        merged.update(extra)
        return ApiRequest(self.method, self.url, merged, self.body)


def _lower(headers: Mapping[str, str]) -> set[str]:
    return {name.lower() for name in headers}


@dataclass(frozen=True)
class ApiResponse:
    """One HTTP answer, read whole; `headers` are case-insensitive."""

    status_code: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    reason_phrase: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.headers, CIMultiDictProxy):
            object.__setattr__(self, "headers", CIMultiDictProxy(CIMultiDict(self.headers)))

    @property
    def is_success(self) -> bool:
        """A 2xx status."""
        return 200 <= self.status_code < 300

    @functools.cached_property
    def text(self) -> str:
        """The body decoded with the charset the answer names (UTF-8 by default)."""
        return self.body.decode(_charset(self.headers.get("content-type", "")), errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON; ValueError when it is not JSON."""
        return json.loads(self.body)


def _charset(content_type: str) -> str:
    message = Message()
    message["content-type"] = content_type
    charset = message.get_content_charset() or "utf-8"
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return "utf-8"


def check_headers(headers: Mapping[str, str]) -> None:
    """Refuse what HTTP/1.1 cannot carry: a name that is not a token, a value with a line
    break, a control character or a non-ASCII character. The error names the header but
    never shows its value (it may hold a key)."""
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise InvalidRequest(
                f"the request cannot be sent: the header name {name!r} is not an HTTP token"
            )
        if not _FIELD_VALUE.fullmatch(value):
            raise InvalidRequest(
                f"the request cannot be sent: the value of header {name} has a line break, "
                "a control character or a non-ASCII character (is a credential file more "
                "than one line?)"
            )


@functools.cache
def _default_tls_context() -> ssl.SSLContext:
    """System CAs plus certifi's bundle, built once: loading CAs takes tens of milliseconds,
    and a minimal image may lack a system store."""
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=certifi.where())
    return context


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The context that verifies an upstream: only `ca_file` when given, else the default."""
    if ca_file is not None:
        return ssl.create_default_context(cafile=str(ca_file))
    return _default_tls_context()


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy from the environment, its credentials apart."""

    url: URL
    headers: Mapping[str, str]


class EnvProxies:
    """`HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` (either case), read once: the proxy for a URL.

    The proxy makes the connection to the endpoint, so the relay's SSRF guard cannot judge
    the endpoint's resolved addresses (literals it still refuses); the connection to the
    proxy passes the guard like any other. Only `http://` proxies are supported (also for
    https endpoints, through CONNECT).
    """

    def __init__(self, environment: Mapping[str, str] | None = None) -> None:
        found = (
            urllib.request.getproxies_environment()
            if environment is None
            else {k.lower().removesuffix("_proxy"): v for k, v in environment.items()}
        )
        self._no_proxy = [e.strip().lower() for e in found.get("no", "").split(",") if e.strip()]
        self.proxies: dict[str, Proxy] = {}
        for scheme in ("http", "https"):
            value = found.get(scheme)
            if not value:
                continue
            url = URL(value if "://" in value else f"http://{value}")
            if url.scheme != "http" or not url.raw_host:
                log.warning("Ignored %s_PROXY: only http:// proxies are supported", scheme.upper())
                continue
            auth = aiohttp.BasicAuth.from_url(url)
            headers = {}
            if auth is not None:
                SECRETS.add(auth.password)
                headers["Proxy-Authorization"] = auth.encode()
            self.proxies[scheme] = Proxy(url.with_user(None), headers)
        self._chosen: dict[tuple[str, str], Proxy | None] = {}

    def for_url(self, url: URL) -> Proxy | None:
        """The proxy for `url`, or None for a direct connection (none set, or NO_PROXY)."""
        key = (url.scheme, url.raw_host or "")
        if key not in self._chosen:
            proxy = self.proxies.get(url.scheme)
            if proxy is not None and no_proxy_matches(key[1], self._no_proxy):
                proxy = None
            if len(self._chosen) > 1024:
                self._chosen.clear()
            self._chosen[key] = proxy
        return self._chosen[key]


def no_proxy_matches(host: str, entries: Sequence[str]) -> bool:
    """Whether `NO_PROXY` entries name `host`: `*`, the host, a parent domain (`example.com`,
    `.example.com`, `*.example.com`), an address or a network (`10.0.0.0/8`), as curl and
    Go read them; a port on an entry is ignored."""
    host = host.strip("[]").rstrip(".").lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in entries:
        if entry == "*":
            return True
        bare = entry.split("]")[0].lstrip("[") if entry.startswith("[") else entry
        if bare.count(":") == 1:
            bare = bare.partition(":")[0]
        bare = bare.lstrip("*").lstrip(".").rstrip(".")
        if address is not None:
            try:
                if address in ipaddress.ip_network(bare, strict=False):
                    return True
            except ValueError:
                pass
        elif bare and (host == bare or host.endswith("." + bare)):
            return True
    return False


def _reason(error: BaseException) -> str:
    """What went wrong, in words for a bounce: the OS or TLS error behind aiohttp's."""
    if isinstance(error, aiohttp.ClientConnectorError):
        return describe_error(error.os_error)
    if isinstance(error, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return "connection lost"
    if isinstance(error, aiohttp.ClientResponseError):
        return "malformed response"
    return describe_error(error)


class ApiClient:
    """Sends `ApiRequest`s over one keep-alive aiohttp session (see the module doc).

    The session is opened on the first request, on the running loop, and closed by
    `close`; a request after `close` fails as unreachable, it never opens a new one.
    Without an `ssl_context`, the one for `ca_file` (`tls_context`) is built then, in a
    worker thread: loading CA bundles takes tens of milliseconds of file reading and
    parsing, which would stall every SMTP session on the loop.
    """

    def __init__(
        self,
        *,
        concurrency: int,
        connect_timeout: float,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: Path | None = None,
        allow_local: bool = False,
        min_upload_rate: float = MIN_UPLOAD_BYTES_PER_SECOND,
    ) -> None:
        self._concurrency = concurrency
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._ssl_context = ssl_context
        self._ca_file = ca_file
        self._allow_local = allow_local
        self._min_upload_rate = min_upload_rate
        self._session: aiohttp.ClientSession | None = None
        self._proxies = EnvProxies({})
        self._opening = asyncio.Lock()
        self._closed = False

    async def _ready_session(self) -> aiohttp.ClientSession:
        if self._session is not None:
            return self._session
        async with self._opening:
            if self._ssl_context is None:
                try:
                    self._ssl_context = await asyncio.to_thread(tls_context, self._ca_file)
                except (OSError, ssl.SSLError) as error:
                    reason = (
                        "it is not a PEM bundle of CA certificates"
                        if isinstance(error, ssl.SSLError)
                        else describe_error(error)
                    )
                    raise TlsConfigError(
                        f"the CA file {self._ca_file} cannot be loaded: {reason}"
                    ) from None
            if self._closed:
                raise ApiUnreachable("connection closed", maybe_sent=False)
            if self._session is None:
                self._proxies = EnvProxies()
                self._session = self._open(self._ssl_context)
            return self._session

    def _open(self, ssl_context: ssl.SSLContext) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=http_guard.connector(
                ssl_context=ssl_context,
                limit=self._concurrency,
                keepalive_timeout=KEEPALIVE_SECONDS,
                allow_local=self._allow_local,
            ),
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=self._connect_timeout,
                sock_connect=self._connect_timeout,
                sock_read=self._timeout,
            ),
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    def deadline(self, request: ApiRequest) -> float:
        """Seconds the whole request may take: connect, upload at the slowest rate
        allowed, and the read timeout."""
        return self._connect_timeout + self._timeout + len(request.body) / self._min_upload_rate

    async def send(self, request: ApiRequest) -> ApiResponse:
        """Send `request` and read the whole answer; any failure is one of our errors."""
        check_headers(request.headers)
        if self._closed:
            raise ApiUnreachable("connection closed", maybe_sent=False)
        session = self._session or await self._ready_session()
        url = _wire_url(request.url)
        headers, proxy_url, proxy_headers = request.headers, None, None
        proxy = self._proxies.for_url(url)
        if proxy is not None:
            # Proxy credentials go on the CONNECT of a tunnel, else on the request itself.
            proxy_url = proxy.url
            if url.scheme == "https":
                proxy_headers = dict(proxy.headers)
            elif proxy.headers:
                headers = {**request.headers, **proxy.headers}
        try:
            async with (
                asyncio.timeout(self.deadline(request)),
                session.request(
                    request.method,
                    url,
                    data=_payload(request.body),
                    headers=headers,
                    allow_redirects=False,
                    proxy=proxy_url,
                    proxy_headers=proxy_headers,
                ) as response,
            ):
                body = await _read_body(response)
                return ApiResponse(
                    status_code=response.status,
                    headers=response.headers,
                    body=body,
                    reason_phrase=response.reason or "",
                )
        except BlockedDestination:
            raise
        except TimeoutError as error:
            connecting = isinstance(error, aiohttp.ConnectionTimeoutError)
            raise ApiTimeout("timed out", maybe_sent=not connecting) from error
        except aiohttp.InvalidURL as error:
            raise InvalidRequest(
                f"the host {_wire_url(request.url).raw_host!r} cannot be connected to as "
                f"written: {error.description or 'not a valid URL'}"
            ) from None
        except (aiohttp.ClientError, OSError) as error:
            connecting = isinstance(error, aiohttp.ClientConnectorError)
            raise ApiUnreachable(_reason(error), maybe_sent=not connecting) from error

    async def close(self) -> None:
        """Close the session and its pooled connections; later requests fail."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None


def _payload(body: bytes) -> bytes | io.BytesIO:
    """Big bodies go out in chunks with the loop free in between (aiohttp writes a bytes
    body in one go, copying it into the transport's buffer)."""
    return io.BytesIO(body) if len(body) > LARGE_BODY_BYTES else body


async def _read_body(response: aiohttp.ClientResponse) -> bytes:
    """The whole body, or its first `MAX_RESPONSE_BYTES` (the connection is then dropped)."""
    length = response.content_length
    if length is not None and length <= MAX_RESPONSE_BYTES:
        return await response.read()
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_RESPONSE_BYTES:
            response.close()
            return bytes(body[:MAX_RESPONSE_BYTES])
    return bytes(body)


@dataclass(frozen=True)
class FilePart:
    """A file field of a multipart form."""

    name: str
    filename: str
    content_type: str
    content: bytes


def _quoted(value: str) -> str:
    """A name or file name inside a quoted Content-Disposition parameter (as browsers do)."""
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def multipart_form(
    fields: Sequence[tuple[str, str]], files: Sequence[FilePart]
) -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart/form-data request: text fields in UTF-8, then
    files. The boundary is random and never occurs in any part."""
    parts: list[tuple[bytes, bytes]] = [
        (f'Content-Disposition: form-data; name="{_quoted(name)}"\r\n\r\n'.encode(), value.encode())
        for name, value in fields
    ]
    parts += [
        (
            f'Content-Disposition: form-data; name="{_quoted(part.name)}"; '
            f'filename="{_quoted(part.filename)}"\r\n'
            f"Content-Type: {part.content_type}\r\n\r\n".encode(),
            part.content,
        )
        for part in files
    ]
    while True:
        boundary = secrets.token_hex(16)
        delimiter = b"--" + boundary.encode("ascii")
        if not any(delimiter in content for _, content in parts):
            break
    pieces = []
    for head, content in parts:
        pieces += [delimiter, b"\r\n", head, content, b"\r\n"]
    pieces += [delimiter, b"--\r\n"]
    return f"multipart/form-data; boundary={boundary}", b"".join(pieces)
