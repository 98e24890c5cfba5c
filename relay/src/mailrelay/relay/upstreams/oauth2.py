"""OAuth2 access tokens for SMTP upstreams: one `TokenSource` per upstream.

Shape (docs/oauth2.md):

- `token_request` (pure) builds the RFC 6749 token request for the configured grant
  (`refresh_token`, section 6, or `client_credentials`, section 4.4) with the client's
  credentials in the form (client_secret_post) or in `Authorization: Basic` (2.3.1);
  `parse_token_response` (pure) reads the answer: a token and its lifetime, or an
  `TokenError` that says what the endpoint refused (its `error` code and a cleaned
  `error_description`), and whether only a change of configuration can fix it
  (`invalid_grant`: a revoked or expired refresh token; `invalid_client`: a wrong
  secret) or a later try may do better (5xx, 429, a malformed answer, no connection).
- `TokenSource` caches the token and hands it to every connection of the upstream. It
  fetches a new one when the cached one is within `refresh_skew_seconds` of its expiry,
  and when the upstream refused it (`refresh(stale)`, after a 535 or a 334 error
  challenge). Fetches are single-flight: concurrent callers share one request and its
  outcome, a caller that is cancelled does not cancel it, and a failed fetch is kept for
  `FAILURE_HOLD_SECONDS` so a queue of waiting messages does not hammer a token endpoint
  that refuses. The credential files are read (in a worker thread) for every fetch, so a
  rotated Secret is used at the next one; a refresh token the endpoint rotated (a new
  `refresh_token` in the answer) is used until the file changes.

The HTTP goes through the providers' `ApiClient`: the SSRF guard of `http_guard`, no
redirects, bounded answers. Every secret (client secret, refresh token, each access
token) is registered with `redact.SECRETS` when read, so no log line or delivery result
can carry it; our own messages never include them in the first place.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosmtplib

from mailrelay.relay.config import OAuth2Config
from mailrelay.relay.redact import SECRETS

if TYPE_CHECKING:
    from mailrelay.relay.upstreams.providers.http import ApiClient, ApiRequest, ApiResponse

# The HTTP layer (aiohttp) is imported where a token is fetched, never at module import: the
# SMTP transport imports this module, and a relay without OAuth2 upstreams must not pay for
# aiohttp (about 0.4 s and 9 MB). `preload_transports` imports it in a thread first.

__all__ = [
    "FAILURE_HOLD_SECONDS",
    "AccessToken",
    "TokenError",
    "TokenSource",
    "authenticate",
    "clean_text",
    "error_challenge",
    "parse_token_response",
    "token_request",
]

log = logging.getLogger(__name__)

# A failed fetch is the answer for this long: deliveries that ask meanwhile share it.
FAILURE_HOLD_SECONDS = 10.0
# Without `expires_in` (RFC 6749 5.1 makes it optional), a token is used for this long and
# then refreshed; a refusal by the upstream refreshes it earlier anyway.
DEFAULT_LIFETIME_SECONDS = 3600.0
# Error codes of RFC 6749 5.2 that only a change of configuration fixes.
_CONFIG_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
    }
)
_HINTS = {
    "invalid_grant": (
        "the refresh token was revoked or has expired: get a new one and update the Secret"
    ),
    "invalid_client": "the client id or secret is wrong: check the Secret",
    "unauthorized_client": "the client may not use this grant: check the app registration",
    "invalid_scope": "a scope is unknown or not granted: check scopes",
    "unsupported_grant_type": "the endpoint does not take this grant",
}
_MAX_TEXT = 200


def clean_text(value: object, limit: int = _MAX_TEXT) -> str:
    """Provider text fit for one log line: printable ASCII, at most `limit` characters."""
    text = "".join(ch if " " <= ch <= "~" else " " for ch in str(value))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TokenError(Exception):
    """No token: `str()` says why in our words (with the endpoint's error code and
    description), never a secret; `config` when only a configuration change can help."""

    def __init__(self, message: str, *, config: bool, error: str | None = None) -> None:
        super().__init__(message)
        self.config = config
        self.error = error


@dataclass(frozen=True, eq=False)
class AccessToken:
    """One access token and when it must be refreshed (on the source's monotonic clock)."""

    value: str
    refresh_at: float


@dataclass(frozen=True)
class _Secrets:
    client_id: str
    client_secret: str
    refresh_token: str | None
    # Changes whenever a file changes; a rotated refresh token is kept until then.
    fingerprint: tuple[int, ...]


def token_request(
    config: OAuth2Config,
    *,
    client_id: str,
    client_secret: str,
    refresh_token: str | None,
) -> ApiRequest:
    """The token request of RFC 6749 (4.4.2 or 6) for `config`'s grant."""
    form: list[tuple[str, str]] = [("grant_type", config.grant)]
    if config.grant == "refresh_token":
        assert refresh_token is not None  # the config requires its file
        form.append(("refresh_token", refresh_token))
    if config.scopes:
        form.append(("scope", " ".join(config.scopes)))
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
    }
    if config.client_auth == "basic":
        # RFC 6749 2.3.1: both parts form-encoded before the Basic encoding.
        pair = f"{_form_encode(client_id)}:{_form_encode(client_secret)}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    else:
        form += [("client_id", client_id), ("client_secret", client_secret)]
    body = urllib.parse.urlencode(form).encode("ascii")
    from mailrelay.relay.upstreams.providers.http import ApiRequest  # noqa: PLC0415

    return ApiRequest("POST", config.token_endpoint, headers, body)


def _form_encode(value: str) -> str:
    return urllib.parse.quote_plus(value, safe="")


def parse_token_response(
    response: ApiResponse, *, endpoint: str
) -> tuple[str, float | None, str | None]:
    """(access token, lifetime in seconds or None, rotated refresh token or None), or
    `TokenError` naming what the endpoint said (RFC 6749 5.1 and 5.2)."""
    body: Any
    try:
        body = response.json()
    except ValueError:
        body = None
    if not response.is_success:
        temporary = response.status_code == 429 or response.status_code >= 500
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, str) and error:
            code = clean_text(error, 64)
            said = code
            description = body.get("error_description")
            if description:
                said += f": {clean_text(description)}"
            hint = _HINTS.get(code)
            config = code in _CONFIG_ERRORS and not temporary
            message = f"the token endpoint {endpoint} refused (HTTP {response.status_code}, {said})"
            if hint is not None:
                message += f"; {hint}"
            raise TokenError(message, config=config, error=code)
        raise TokenError(
            f"the token endpoint {endpoint} answered HTTP {response.status_code} "
            "without an OAuth2 error",
            # 401/403 without a body: the client's credentials, most likely.
            config=response.status_code in (400, 401, 403),
        )
    if not isinstance(body, dict):
        raise TokenError(
            f"the token endpoint {endpoint} answered {response.status_code} without a JSON object",
            config=False,
        )
    token = body.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenError(
            f"the token endpoint {endpoint} answered without an access_token", config=False
        )
    SECRETS.add(token)
    token_type = body.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenError(
            f"the token endpoint {endpoint} issued a {clean_text(token_type, 32)!r} token; "
            "SMTP needs a Bearer token",
            config=True,
        )
    lifetime = _lifetime(body.get("expires_in"))
    rotated = body.get("refresh_token")
    if isinstance(rotated, str) and rotated:
        SECRETS.add(rotated)
    else:
        rotated = None
    return token, lifetime, rotated


def _lifetime(value: object) -> float | None:
    """`expires_in` as seconds; a number or a numeric string (some endpoints send one)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def _file_identity(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_dev)


class TokenSource:
    """The access token of one upstream: cached, refreshed early, fetched single-flight."""

    def __init__(
        self,
        upstream: str,
        config: OAuth2Config,
        *,
        client: ApiClient | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.config = config
        from mailrelay.relay.upstreams.providers.http import ApiClient  # noqa: PLC0415

        self._client = client or ApiClient(
            concurrency=1,
            connect_timeout=config.timeout_seconds,
            timeout=config.timeout_seconds,
            ca_file=config.ca_file,
            allow_local=config.insecure_allow_local_endpoint,
        )
        self._monotonic = monotonic
        self._token: AccessToken | None = None
        self._fetch: asyncio.Task[AccessToken] | None = None
        # The last failed fetch: its error, until when it stands, and the credential files'
        # fingerprint then (a changed Secret is tried at once).
        self._failure: tuple[TokenError, float, tuple[int, ...] | None] | None = None
        self._rotated: tuple[tuple[int, ...], str] | None = None

    async def token(self) -> AccessToken:
        """A token that is not due for a refresh; fetched when there is none."""
        token = self._token
        if token is not None and self._monotonic() < token.refresh_at:
            return token
        return await self._fetched()

    async def refresh(self, stale: AccessToken) -> AccessToken:
        """A new token after the upstream refused `stale`; when another delivery has
        already replaced it, that one (one refresh per refused token, not per caller)."""
        if self._token is stale:
            self._token = None
            self._failure = None
        token = self._token
        if token is not None and self._monotonic() < token.refresh_at:
            return token
        return await self._fetched()

    async def _fetched(self) -> AccessToken:
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.create_task(
                self._fetch_token(), name=f"oauth2-token-{self.upstream}"
            )
            # Its outcome is read here even when every caller was cancelled meanwhile.
            self._fetch.add_done_callback(_consume)
        # Shielded: a delivery that is cancelled must not cancel the others' fetch.
        return await asyncio.shield(self._fetch)

    async def _fetch_token(self) -> AccessToken:
        from mailrelay.relay.upstreams.providers.http import (  # noqa: PLC0415
            ApiConfigError,
            ApiError,
            BlockedDestination,
        )

        fingerprint: tuple[int, ...] | None = None
        try:
            secrets = await asyncio.to_thread(self._read_secrets)
            fingerprint = secrets.fingerprint
            if self._failure is not None:
                error, until, failed_with = self._failure
                if self._monotonic() < until and failed_with == fingerprint:
                    raise error  # the same files were refused moments ago
                self._failure = None
            refresh_token = secrets.refresh_token
            if self._rotated is not None and self._rotated[0] == secrets.fingerprint:
                refresh_token = self._rotated[1]
            request = token_request(
                self.config,
                client_id=secrets.client_id,
                client_secret=secrets.client_secret,
                refresh_token=refresh_token,
            )
            started = self._monotonic()
            try:
                response = await self._client.send(request)
            except BlockedDestination as error:
                raise TokenError(str(error), config=True) from None
            except ApiConfigError as error:
                raise TokenError(f"the token endpoint: {error}", config=True) from None
            except ApiError as error:
                raise TokenError(
                    f"the token endpoint {self.config.token_endpoint} could not be reached "
                    f"({error})",
                    config=False,
                ) from None
            value, lifetime, rotated = parse_token_response(
                response, endpoint=self.config.token_endpoint
            )
        except TokenError as error:
            if self._failure is not None and self._failure[0] is error:
                raise
            self._failure = (error, self._monotonic() + FAILURE_HOLD_SECONDS, fingerprint)
            log.warning("Failed to get an OAuth2 token for upstream %s: %s", self.upstream, error)
            raise
        if rotated is not None:
            self._rotated = (secrets.fingerprint, rotated)
        lifetime = DEFAULT_LIFETIME_SECONDS if lifetime is None else lifetime
        # Refreshed `skew` early, but never sooner than half its life (a short-lived token
        # would otherwise be refreshed for every message).
        early = min(self.config.refresh_skew_seconds, lifetime / 2)
        token = AccessToken(value, started + lifetime - early)
        self._token = token
        log.info(
            "Got an OAuth2 token for upstream %s (grant %s, valid for %.0f s)",
            self.upstream,
            self.config.grant,
            lifetime,
        )
        return token

    def _read_secrets(self) -> _Secrets:
        config = self.config
        paths = [config.client_id_file, config.client_secret_file]
        if config.refresh_token_file is not None:
            paths.append(config.refresh_token_file)
        try:
            fingerprint = tuple(n for path in paths for n in _file_identity(path))
            values = [path.read_text(encoding="utf-8").strip() for path in paths]
        except (OSError, UnicodeDecodeError) as error:
            name = getattr(error, "filename", None) or "a credential file"
            raise TokenError(
                f"cannot read the OAuth2 credentials ({name}): "
                f"{getattr(error, 'strerror', None) or 'not UTF-8 text'}",
                config=True,
            ) from None
        SECRETS.add(*values[1:])
        refresh_token = values[2] if len(values) > 2 else None
        return _Secrets(values[0], values[1], refresh_token, fingerprint)

    async def close(self) -> None:
        """Stop a fetch in flight and close the HTTP client."""
        if self._fetch is not None and not self._fetch.done():
            self._fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, TokenError):
                await self._fetch
        await self._client.close()


def _consume(task: asyncio.Task[AccessToken]) -> None:
    if not task.cancelled():
        task.exception()


def error_challenge(challenge: str) -> str | None:
    """The JSON error of a 334 challenge (RFC 7628 3.2.2; XOAUTH2 alike), in words:
    `status` and `scope`, plus any other short string fields; None when not such JSON."""
    try:
        data = json.loads(base64.b64decode(challenge.strip(), validate=True))
    except (ValueError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    parts = [
        f"{clean_text(key, 32)}={clean_text(value, 120)}"
        for key, value in data.items()
        if isinstance(value, str | int) and not isinstance(value, bool)
    ]
    return ", ".join(parts[:6]) or None


class OAuthRefusedError(aiosmtplib.SMTPAuthenticationError):
    """The upstream refused the token; `provider_error` is its decoded JSON, if it sent one."""

    def __init__(self, code: int, message: str, provider_error: str | None) -> None:
        shown = message if provider_error is None else f"{message} ({provider_error})"
        super().__init__(code, shown)
        self.provider_error = provider_error


def _saslname(value: str) -> str:
    """RFC 5801's saslname: ',' and '=' escaped."""
    return value.replace("=", "=3D").replace(",", "=2C")


def initial_response(mechanism: str, username: str, token: str, host: str, port: int) -> str:
    """The base64 initial client response of XOAUTH2 (Google's and Microsoft's format)
    or OAUTHBEARER (RFC 7628 3.1)."""
    if mechanism == "xoauth2":
        raw = f"user={username}\x01auth=Bearer {token}\x01\x01"
    else:
        raw = (
            f"n,a={_saslname(username)},\x01host={host}\x01port={port}"
            f"\x01auth=Bearer {token}\x01\x01"
        )
    encoded = base64.b64encode(raw.encode("utf-8")).decode("ascii")
    SECRETS.add(encoded)
    return encoded


async def authenticate(
    smtp: aiosmtplib.SMTP,
    mechanism: str,
    username: str,
    token: str,
    *,
    host: str,
    port: int,
    timeout: float,  # noqa: ASYNC109 - passed on to each command
) -> None:
    """AUTH with the token; `OAuthRefusedError` (with the decoded error challenge) when
    refused. After an error challenge (334 with base64 JSON, RFC 7628 3.2.2) the client
    answers as each mechanism wants (OAUTHBEARER: %x01; XOAUTH2: an empty line) to get the
    final reply."""
    response = await smtp.execute_command(
        b"AUTH",
        mechanism.upper().encode("ascii"),
        initial_response(mechanism, username, token, host, port).encode("ascii"),
        timeout=timeout,
    )
    provider_error = None
    if response.code == 334:
        provider_error = error_challenge(response.message)
        dummy = b"AQ==" if mechanism == "oauthbearer" else b""
        response = await smtp.execute_command(dummy, timeout=timeout)
    if response.code != 235:
        raise OAuthRefusedError(response.code, response.message, provider_error)
