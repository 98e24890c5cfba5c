"""A local STS that answers AssumeRoleWithWebIdentity as AWS does, on 127.0.0.1.

botocore's web identity provider (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE) calls STS
with the query protocol: a form POST with `Action=AssumeRoleWithWebIdentity`,
`Version=2011-06-15`, `RoleArn`, `RoleSessionName` and `WebIdentityToken`, unsigned. The
answer is the XML document of the STS API reference, with temporary credentials
(`AccessKeyId` starting `ASIA`, `SecretAccessKey`, `SessionToken`, `Expiration`).

Like STS with an OIDC identity provider, the server checks the token: an RS256 JWT whose
signature verifies against the issuer's JSON Web Key Set (the real kube-apiserver's
`/openid/v1/jwks` in the tests), with the expected issuer, an audience the provider is
registered for, an unexpired `exp`, and a subject the role's trust policy names.
Refusals are the STS error document (`InvalidIdentityToken`, `AccessDenied`,
`ExpiredTokenException`) with status 400 or 403. Issued credentials are kept in
`credentials` (key id -> (secret, session token)), which the SES stand-in accepts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from xml.sax.saxutils import escape

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mailrelay.support.asgi import LoopbackServer

__all__ = ["StsServer"]

_NS = "https://sts.amazonaws.com/doc/2011-06-15/"


def _b64url(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _public_key(jwk: dict[str, Any]) -> rsa.RSAPublicKey:
    n = int.from_bytes(_b64url(jwk["n"]), "big")
    e = int.from_bytes(_b64url(jwk["e"]), "big")
    return rsa.RSAPublicNumbers(e, n).public_key()


class TokenRefused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class StsServer:
    """AssumeRoleWithWebIdentity against a JWKS (see the module doc)."""

    jwks: dict[str, Any]
    issuer: str
    audience: str
    # role ARN -> the token subject its trust policy allows
    roles: dict[str, str]
    duration: timedelta = timedelta(hours=1)
    delay: float = 0.0
    credentials: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    calls: list[dict[str, str]] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)  # time.monotonic() of each call
    url: str = ""
    _loopback: LoopbackServer = field(default_factory=LoopbackServer)

    def _claims(self, token: str) -> dict[str, Any]:
        try:
            head_b64, body_b64, signature_b64 = token.split(".")
            header = json.loads(_b64url(head_b64))
            claims: dict[str, Any] = json.loads(_b64url(body_b64))
            signature = _b64url(signature_b64)
        except ValueError:
            raise TokenRefused(400, "InvalidIdentityToken", "Token is not a JWT") from None
        keys = [k for k in self.jwks.get("keys", []) if k.get("kid") == header.get("kid")]
        if header.get("alg") != "RS256" or not keys:
            raise TokenRefused(400, "InvalidIdentityToken", "No matching signing key")
        try:
            _public_key(keys[0]).verify(
                signature,
                f"{head_b64}.{body_b64}".encode("ascii"),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            raise TokenRefused(400, "InvalidIdentityToken", "Signature is invalid") from None
        if claims.get("iss") != self.issuer:
            raise TokenRefused(400, "InvalidIdentityToken", "Issuer is not registered")
        audiences = claims.get("aud")
        audiences = audiences if isinstance(audiences, list) else [audiences]
        if self.audience not in audiences:
            raise TokenRefused(400, "InvalidIdentityToken", "Incorrect token audience")
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= time.time():
            raise TokenRefused(400, "ExpiredTokenException", "Token is expired")
        return claims

    async def _endpoint(self, request: Request) -> Response:
        form = dict(urllib.parse.parse_qsl((await request.body()).decode()))
        self.calls.append(form)
        self.received_at.append(time.monotonic())
        if self.delay:
            await asyncio.sleep(self.delay)
        if form.get("Action") != "AssumeRoleWithWebIdentity" or form.get("Version") != "2011-06-15":
            return _error(400, "InvalidAction", "Could not find operation")
        role = form.get("RoleArn", "")
        try:
            claims = self._claims(form.get("WebIdentityToken", ""))
            if self.roles.get(role) != claims.get("sub"):
                raise TokenRefused(
                    403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity"
                )
        except TokenRefused as refused:
            return _error(refused.status, refused.code, str(refused))
        key_id = "ASIA" + secrets.token_hex(8).upper()
        secret = secrets.token_urlsafe(30)
        session_token = secrets.token_urlsafe(48)
        self.credentials[key_id] = (secret, session_token)
        session = form.get("RoleSessionName", "")
        expiration = (datetime.now(UTC) + self.duration).strftime("%Y-%m-%dT%H:%M:%SZ")
        account = role.split(":")[4]
        role_name = role.rsplit("/", 1)[-1]
        body = f"""<AssumeRoleWithWebIdentityResponse xmlns="{_NS}">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>{escape(str(claims["sub"]))}</SubjectFromWebIdentityToken>
    <Audience>{escape(self.audience)}</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::{account}:assumed-role/{escape(role_name)}/{escape(session)}</Arn>
      <AssumedRoleId>AROA{secrets.token_hex(8).upper()}:{escape(session)}</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>{session_token}</SessionToken>
      <SecretAccessKey>{secret}</SecretAccessKey>
      <Expiration>{expiration}</Expiration>
      <AccessKeyId>{key_id}</AccessKeyId>
    </Credentials>
    <Provider>{escape(self.issuer)}</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>{secrets.token_hex(16)}</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>
"""
        return Response(body, media_type="text/xml")

    async def start(self) -> None:
        """Serve on an ephemeral loopback port."""
        app = Starlette(routes=[Route("/", self._endpoint, methods=["POST"])])
        self.url = await self._loopback.start(app)

    async def stop(self) -> None:
        """Stop serving."""
        await self._loopback.stop()


def _error(status: int, code: str, message: str) -> Response:
    body = (
        f'<ErrorResponse xmlns="{_NS}"><Error><Type>Sender</Type><Code>{code}</Code>'
        f"<Message>{escape(message)}</Message></Error>"
        f"<RequestId>{secrets.token_hex(16)}</RequestId></ErrorResponse>"
    )
    return Response(body, status_code=status, media_type="text/xml")
