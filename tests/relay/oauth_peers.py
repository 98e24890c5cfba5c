"""Real OAuth2 peers on 127.0.0.1: a token endpoint and an SMTP upstream that checks tokens.

`TokenServer` is an RFC 6749 token endpoint (Starlette under uvicorn, plain HTTP on
loopback): the `refresh_token` (section 6) and `client_credentials` (4.4) grants, client
authentication in the form (client_secret_post) or in `Authorization: Basic` (2.3.1, both
parts form-encoded), `expires_in`, `scope`, and the errors of 5.2 (`invalid_client` with
401, `invalid_grant` for an unknown or revoked refresh token, `unsupported_grant_type`,
`invalid_request`). It issues random opaque tokens and remembers each one's subject,
scope and expiry; `revoke` takes a refresh token (and every token issued from it) back.

`OAuthUpstream` is aiosmtpd with STARTTLS offering `AUTH XOAUTH2` and `AUTH OAUTHBEARER`
(RFC 7628). It checks each presented token against the token server's book: known, not
expired, not revoked, issued for the mailbox named in the SASL message. A refused token
gets the 334 error challenge (base64 JSON, RFC 7628 3.2.2, Gmail's shape for XOAUTH2),
then `535 5.7.8` after the client's dummy response. It records every message and every
AUTH attempt.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mailrelay.support.asgi import LoopbackServer
from tests.relay.delivery_fixtures import Certificates

__all__ = ["Issued", "OAuthUpstream", "TokenServer"]

CLIENT_ID = "mailrelay-client.apps.example"
CLIENT_SECRET = "client-secret-5ecr3t-value"
REFRESH_TOKEN = "1//refresh-token-r3fr3sh-value"
MAILBOX = "relay@example.com"


@dataclass
class Issued:
    """One access token the server gave out."""

    subject: str
    scope: str
    expires_at: float  # time.monotonic()
    refresh_token: str | None
    revoked: bool = False


@dataclass
class TokenServer:
    """An RFC 6749 token endpoint on loopback (see the module doc)."""

    clients: dict[str, str] = field(default_factory=lambda: {CLIENT_ID: CLIENT_SECRET})
    # refresh token -> (client id, subject)
    refresh_tokens: dict[str, tuple[str, str]] = field(
        default_factory=lambda: {REFRESH_TOKEN: (CLIENT_ID, MAILBOX)}
    )
    # client id -> the subject its client_credentials tokens are for
    service_subjects: dict[str, str] = field(default_factory=lambda: {CLIENT_ID: MAILBOX})
    expires_in: float = 3600
    # Seconds each answer waits (lets concurrent requests overlap in tests).
    delay: float = 0.0
    issued: dict[str, Issued] = field(default_factory=dict)
    revoked_refresh: set[str] = field(default_factory=set)
    requests: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    _loopback: LoopbackServer = field(default_factory=LoopbackServer)

    def revoke(self, refresh_token: str) -> None:
        """Revoke a refresh token and every access token issued from it."""
        self.revoked_refresh.add(refresh_token)
        for token in self.issued.values():
            if token.refresh_token == refresh_token:
                token.revoked = True

    def check(self, token: str, subject: str) -> str | None:
        """Why `token` does not let `subject` in (an RFC 7628 status), or None."""
        issued = self.issued.get(token)
        if issued is None or issued.revoked or issued.subject != subject:
            return "invalid_token"
        if time.monotonic() >= issued.expires_at:
            return "invalid_token"
        return None

    async def _token(self, request: Request) -> Response:
        form = dict(urllib.parse.parse_qsl((await request.body()).decode("ascii")))
        self.requests.append(form)
        if self.delay:
            await asyncio.sleep(self.delay)
        if request.headers.get("content-type") != "application/x-www-form-urlencoded":
            return _error(400, "invalid_request", "form encoding expected")
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("authorization", "")
        if auth.startswith("Basic "):
            if client_secret is not None:
                return _error(400, "invalid_request", "two client authentications")
            try:
                pair = base64.b64decode(auth[6:], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return _error(401, "invalid_client", "bad Basic header")
            raw_id, _, raw_secret = pair.partition(":")
            client_id = urllib.parse.unquote_plus(raw_id)
            client_secret = urllib.parse.unquote_plus(raw_secret)
        if client_id is None or self.clients.get(client_id) != client_secret:
            return _error(401, "invalid_client", "Unauthorized client credentials")
        grant = form.get("grant_type")
        refresh = None
        if grant == "refresh_token":
            refresh = form.get("refresh_token", "")
            owner = self.refresh_tokens.get(refresh)
            if owner is None or owner[0] != client_id or refresh in self.revoked_refresh:
                return _error(400, "invalid_grant", "Token has been expired or revoked.")
            subject = owner[1]
        elif grant == "client_credentials":
            subject = self.service_subjects[client_id]
        else:
            return _error(400, "unsupported_grant_type", f"grant {grant!r}")
        token = "ya29." + secrets.token_urlsafe(24)
        scope = form.get("scope", "")
        self.issued[token] = Issued(subject, scope, time.monotonic() + self.expires_in, refresh)
        return JSONResponse(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": self.expires_in,
                "scope": scope,
            },
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )

    async def start(self) -> None:
        """Serve on an ephemeral loopback port."""
        app = Starlette(routes=[Route("/token", self._token, methods=["POST"])])
        self.url = await self._loopback.start(app) + "/token"

    async def stop(self) -> None:
        """Stop serving."""
        await self._loopback.stop()


def _error(status: int, code: str, description: str) -> Response:
    return JSONResponse(
        {"error": code, "error_description": description},
        status_code=status,
        headers={"WWW-Authenticate": "Basic"} if status == 401 else None,
    )


@dataclass
class AuthAttempt:
    """One AUTH the upstream saw."""

    mechanism: str
    subject: str
    token: str
    accepted: bool


class _Handler:
    """aiosmtpd handler: the two OAuth mechanisms, and DATA recorded."""

    def __init__(self, owner: OAuthUpstream) -> None:
        self.owner = owner

    async def _judge(self, server: SMTP, mechanism: str, subject: str, token: str) -> AuthResult:
        status = self.owner.tokens.check(token, subject)
        self.owner.attempts.append(AuthAttempt(mechanism, subject, token, status is None))
        if status is None:
            return AuthResult(success=True, auth_data=subject)
        problem = {"status": "401" if mechanism == "XOAUTH2" else status, "schemes": "Bearer"}
        if mechanism == "OAUTHBEARER":
            problem = {"status": status, "scope": "https://mail.example/", "schemes": "bearer"}
        else:
            problem["scope"] = "https://mail.google.com/"
        reply = await server.challenge_auth(json.dumps(problem).encode())
        if mechanism == "OAUTHBEARER" and reply != b"\x01":
            return AuthResult(success=False, handled=False, message="501 5.5.2 expected %x01")
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Username and Password not accepted"
        )

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        blob = await _initial(server, args)
        if blob is None:
            return AuthResult(success=False, handled=True)
        fields = dict(part.split("=", 1) for part in blob.decode().split("\x01") if "=" in part)
        token = fields.get("auth", "").removeprefix("Bearer ")
        return await self._judge(server, "XOAUTH2", fields.get("user", ""), token)

    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult:
        blob = await _initial(server, args)
        if blob is None:
            return AuthResult(success=False, handled=True)
        gs2, _, rest = blob.decode().partition("\x01")
        parts = gs2.split(",")
        if parts[0] != "n" or len(parts) < 3 or not parts[1].startswith("a="):
            return AuthResult(success=False, handled=False, message="501 5.5.2 bad gs2 header")
        subject = parts[1][2:].replace("=2C", ",").replace("=3D", "=")
        fields = dict(part.split("=", 1) for part in rest.split("\x01") if "=" in part)
        if "host" not in fields or "port" not in fields:
            return AuthResult(success=False, handled=False, message="501 5.5.2 host and port")
        token = fields.get("auth", "").removeprefix("Bearer ")
        return await self._judge(server, "OAUTHBEARER", subject, token)

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.owner.messages.append((session.auth_data, envelope.original_content))
        return f"250 2.0.0 Ok: queued as O{len(self.owner.messages)}"


async def _initial(server: SMTP, args: list[str]) -> bytes | None:
    """The initial response (or, without one, the answer to an empty challenge)."""
    if len(args) > 1:
        try:
            return base64.b64decode(args[1], validate=True)
        except binascii.Error:
            await server.push("501 5.5.2 Can't decode base64")
            return None
    answer = await server.challenge_auth(b"", encode_to_b64=False)
    return answer if isinstance(answer, bytes) else None


@dataclass
class OAuthUpstream:
    """aiosmtpd on 127.0.0.1 with STARTTLS, taking only OAuth tokens."""

    tokens: TokenServer
    certs: Certificates
    host: str = "127.0.0.1"
    port: int = 0
    attempts: list[AuthAttempt] = field(default_factory=list)
    messages: list[tuple[Any, bytes]] = field(default_factory=list)
    _server: asyncio.Server | None = None

    def _factory(self) -> SMTP:
        return SMTP(
            _Handler(self),
            hostname="oauth-upstream.test",
            tls_context=self.certs.server_context,
            require_starttls=True,
            auth_required=True,
            auth_require_tls=True,
            # Only the handler's OAuth mechanisms: the built-in LOGIN and PLAIN are dropped.
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        """Listen on a free port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, host=self.host, port=0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
