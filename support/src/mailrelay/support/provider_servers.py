"""Local stand-ins for the provider APIs, each enforcing the provider's documented contract.

Every provider is a small Starlette app served by uvicorn on 127.0.0.1 (port 0). A server
checks what the real API checks and answers in the real API's shapes: method, path (with
the Mailgun domain), authentication (Basic, Bearer, bare key, Postmark token, a SigV4
signature recomputed independently of botocore, the webhook HMAC), content type,
required fields, recipient and size limits. It records every request (`requests`) and,
separately, what it accepted for sending (`sent`), so tests assert on what a provider
would have delivered.

Faults are queued with `inject`: the next requests get a status and body (429 with
`Retry-After`, 500, 400, 401, SES error names ...) before any processing, or, with
`delay`, are processed and accepted normally but answered only after `delay` seconds:
the client times out after its request was sent, like a response lost in the network;
with `drop`, they are processed and accepted, then the connection is closed in the middle
of the answer (the status line and headers went out, the body never does).

Where the provider takes an idempotency key, the server keeps the provider's store and
enforces its documented semantics (`_idempotent`): Resend answers a key it has seen with
the same body with the first answer and sends nothing, the same key with another body
with 409 `invalid_idempotent_request`, and a key over 256 characters with 400
`invalid_idempotency_key`. The webhook receiver does what docs/providers.md asks of
one: it verifies the v2 signature (which covers the key) with the secret of the key id
the request names (`webhook_keys`, two during a rotation), then deduplicates on the key.
The other providers take no key (docs/providers.md cites their documentation), so their
servers send every request they accept, as the real ones do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mailrelay.support.asgi import LoopbackServer

__all__ = [
    "API_KEY",
    "AWS_KEY_ID",
    "AWS_SECRET",
    "DEFAULT_KEY_ID",
    "SIGNING_SECRET",
    "Fault",
    "ProviderServer",
    "Recorded",
    "start_provider_server",
]

API_KEY = "test-key-0123456789"
AWS_KEY_ID = "AKIDTESTEXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SIGNING_SECRET = "whsec-test-secret"
DEFAULT_KEY_ID = "default"
MAILGUN_DOMAIN = "mg.example.com"
SES_REGION = "eu-west-1"

Json = dict[str, Any]


@dataclass
class Recorded:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None
    form: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Fault:
    """An injected answer for the next request (or a slow but successful one)."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


class ContractError(Exception):
    """The request breaks the provider's contract; answered with `status` and `body`."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(str(body))
        self.status = status
        self.body = body


Handler = Callable[["ProviderServer", Recorded], Awaitable[Response]]


class ProviderServer:
    """One running provider stand-in."""

    def __init__(self, provider: str, handler: Handler) -> None:
        self.provider = provider
        self._handler = handler
        self.requests: list[Recorded] = []
        self.sent: list[Recorded] = []
        self.faults: collections.deque[Fault] = collections.deque()
        # (text, fault): every request whose body or headers contain `text` gets `fault`,
        # as a provider refuses a whole request for one address it does not accept.
        self.refuse_containing: tuple[str, Fault] | None = None
        self.idempotency: dict[str, tuple[str, Json]] = {}
        # Webhook receiver: key id -> secret it accepts signatures from.
        self.webhook_keys: dict[str, str] = {DEFAULT_KEY_ID: SIGNING_SECRET}
        # SES: access key id -> (secret, session token or None); temporary credentials
        # (from STS) are added here and must come with their signed X-Amz-Security-Token.
        self.aws_credentials: dict[str, tuple[str, str | None]] = {AWS_KEY_ID: (AWS_SECRET, None)}
        self.base_url = ""
        self._loopback = LoopbackServer()

    def inject(self, *faults: Fault) -> None:
        """Answer the next requests with these faults, in order."""
        self.faults.extend(faults)

    async def _endpoint(self, request: Request) -> Response:
        body = await request.body()
        recorded = Recorded(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        if recorded.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form() as form:
                for key, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        recorded.files[key] = await value.read()
                    else:
                        recorded.form.setdefault(key, []).append(value)
        self.requests.append(recorded)
        if self.refuse_containing is not None:
            text, refusal = self.refuse_containing
            if text.encode() in body or any(text in v for v in recorded.headers.values()):
                return _answer(refusal.status, refusal.body, refusal.headers)
        fault = self.faults.popleft() if self.faults else None
        if fault is not None and fault.delay == 0 and not fault.drop:
            return _answer(fault.status, fault.body, fault.headers)
        try:
            response = await self._handler(self, recorded)
        except ContractError as exc:
            return _answer(exc.status, exc.body, {})
        if fault is not None and fault.drop:
            return _Dropped()
        if fault is not None:
            await asyncio.sleep(fault.delay)
        return response

    def app(self) -> Starlette:
        """Every path goes to the handler, which checks method and path itself."""
        return Starlette(
            routes=[
                Route(
                    "/{path:path}",
                    self._endpoint,
                    methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                )
            ]
        )

    async def start(self) -> None:
        """Serve on an ephemeral loopback port."""
        self.base_url = await self._loopback.start(self.app())

    async def stop(self) -> None:
        """Stop serving; slow handlers still sleeping are cut off."""
        await self._loopback.stop()


class _Dropped(Response):
    """Starts a 200 with a body it never sends, then returns: uvicorn closes the
    connection, and the client sees the answer cut off after the provider acted."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")],
            }
        )


class _QuietDrops(logging.Filter):
    """uvicorn logs a dropped answer as an application error; here it is on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


logging.getLogger("uvicorn.error").addFilter(_QuietDrops())


def _answer(status: int, body: Any, headers: dict[str, str]) -> Response:
    if body is None:
        return Response(status_code=status, headers=headers)
    if isinstance(body, str):
        return Response(body, status_code=status, headers=headers)
    return JSONResponse(body, status_code=status, headers=headers)


def _require(condition: bool, status: int, body: Any) -> None:
    if not condition:
        raise ContractError(status, body)


def _json_body(req: Recorded, error: Callable[[str], Any]) -> Any:
    _require(
        req.headers.get("content-type", "").split(";")[0].strip() == "application/json",
        415 if "content-type" in req.headers else 400,
        error("Content-Type must be application/json"),
    )
    try:
        req.json = json.loads(req.body)
    except ValueError:
        raise ContractError(400, error("body is not valid JSON")) from None
    return req.json


def _b64(value: Any, error: Any) -> bytes:
    _require(isinstance(value, str), 400, error)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ContractError(400, error) from None


# --- Mailgun -----------------------------------------------------------------------------


async def mailgun(server: ProviderServer, req: Recorded) -> Response:
    """POST /v3/{domain}/messages.mime, Basic api:key, multipart `to` + `message`."""

    def err(msg: str) -> Json:
        return {"message": msg}

    _require(req.method == "POST", 405, err("Method not allowed"))
    _require(req.path == f"/v3/{MAILGUN_DOMAIN}/messages.mime", 404, err("Domain not found"))
    expected = "Basic " + base64.b64encode(f"api:{API_KEY}".encode()).decode()
    _require(req.headers.get("authorization") == expected, 401, "Forbidden")
    _require(bool(req.form.get("to")), 400, err("'to' parameter is missing"))
    _require("message" in req.files, 400, err("'message' parameter is missing"))
    _require(len(req.files["message"]) <= 25_000_000, 413, err("Message size exceeds limit"))
    _require(len(req.form["to"]) <= 1000, 400, err("Too many recipients"))
    server.sent.append(req)
    return JSONResponse(
        {"id": f"<{uuid.uuid4()}@{MAILGUN_DOMAIN}>", "message": "Queued. Thank you."}
    )


# --- Amazon SES v2 -------------------------------------------------------------------------


def _sigv4_problem(
    req: Recorded, region: str, credentials: dict[str, tuple[str, str | None]] | None = None
) -> str | None:
    """Recompute the SigV4 signature from the AWS spec; None when it matches."""
    credentials = credentials or {AWS_KEY_ID: (AWS_SECRET, None)}
    auth = req.headers.get("authorization", "")
    algorithm, _, rest = auth.partition(" ")
    if algorithm != "AWS4-HMAC-SHA256":
        return "missing or unknown Authorization algorithm"
    parts = dict(p.strip().split("=", 1) for p in rest.split(",") if "=" in p)
    try:
        key_id, date, scope_region, service, terminator = parts["Credential"].split("/")
        signed = parts["SignedHeaders"].split(";")
        given = parts["Signature"]
    except (KeyError, ValueError):
        return "malformed Authorization header"
    if key_id not in credentials:
        return "The security token included in the request is invalid."
    secret, session_token = credentials[key_id]
    if session_token is not None and (
        req.headers.get("x-amz-security-token") != session_token
        or "x-amz-security-token" not in parts["SignedHeaders"].split(";")
    ):
        return "The security token included in the request is invalid."
    if (scope_region, service, terminator) != (region, "ses", "aws4_request"):
        return f"Credential should be scoped to a valid region and service ({region}/ses)"
    if "host" not in signed or "x-amz-date" not in signed:
        return "host and x-amz-date must be signed"
    amz_date = req.headers.get("x-amz-date", "")
    if not amz_date.startswith(date):
        return "Date in Credential scope does not match X-Amz-Date"
    canonical_headers = "".join(f"{h}:{' '.join(req.headers[h].split())}\n" for h in signed)
    canonical_request = "\n".join(
        [
            req.method,
            quote(req.path, safe="/~"),
            "",
            canonical_headers,
            ";".join(signed),
            hashlib.sha256(req.body).hexdigest(),
        ]
    )
    scope = f"{date}/{region}/ses/aws4_request"
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = f"AWS4{secret}".encode()
    for piece in (date, region, "ses", "aws4_request"):
        key = hmac.new(key, piece.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, given):
        return "The request signature we calculated does not match the signature you provided."
    return None


def ses_error(status: int, kind: str, message: str) -> Fault:
    """An SES error as the v2 REST API sends it (type in a header and the body)."""
    return Fault(
        status=status,
        body={"message": message, "__type": kind},
        headers={"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/"},
    )


async def ses(server: ProviderServer, req: Recorded) -> Response:
    """POST /v2/email/outbound-emails, SigV4 (ses), JSON Content.Raw + Destination."""

    def fail(status: int, kind: str, msg: str) -> ContractError:
        fault = ses_error(status, kind, msg)
        return ContractError(status, fault.body)

    if req.method != "POST" or req.path != "/v2/email/outbound-emails":
        raise fail(404, "NotFoundException", "Unknown operation")
    problem = _sigv4_problem(req, SES_REGION, server.aws_credentials)
    if problem is not None:
        raise fail(403, "InvalidSignatureException", problem)
    try:
        body = _json_body(req, lambda m: {"message": m})
    except ContractError as exc:
        raise fail(400, "BadRequestException", str(exc)) from None
    raw = body.get("Content", {}).get("Raw", {}).get("Data")
    data = _b64(raw, {"message": "Content.Raw.Data must be base64"})
    to = body.get("Destination", {}).get("ToAddresses", [])
    if not isinstance(to, list) or not to or len(to) > 50:
        raise fail(400, "BadRequestException", "Destination needs 1 to 50 addresses")
    if len(data) > 40_000_000:
        raise fail(400, "MessageRejected", "Message length is more than 40 MB")
    req.files["raw"] = data
    server.sent.append(req)
    return JSONResponse({"MessageId": f"0100{uuid.uuid4().hex}-000000"})


# --- SparkPost -----------------------------------------------------------------------------


async def sparkpost(server: ProviderServer, req: Recorded) -> Response:
    """POST /api/v1/transmissions, bare API key, JSON recipients + content.email_rfc822."""

    def err(msg: str, code: str = "1400") -> Json:
        return {"errors": [{"message": msg, "code": code}]}

    _require(req.method == "POST" and req.path == "/api/v1/transmissions", 404, err("Not found"))
    _require(req.headers.get("authorization") == API_KEY, 401, err("Unauthorized.", "1902"))
    body = _json_body(req, err)
    recipients = body.get("recipients")
    _require(
        isinstance(recipients, list)
        and bool(recipients)
        and all(isinstance(r.get("address", {}).get("email"), str) for r in recipients),
        422,
        err("recipients: each needs address.email"),
    )
    content = body.get("content", {})
    _require(isinstance(content.get("email_rfc822"), str), 422, err("content.email_rfc822"))
    _require(
        body.get("options", {}).get("perform_substitutions") is False,
        422,
        err("this relay must switch substitutions off"),
    )
    _require(
        len(content["email_rfc822"].encode()) <= 20_000_000, 422, err("message too large", "5002")
    )
    server.sent.append(req)
    return JSONResponse(
        {
            "results": {
                "total_rejected_recipients": 0,
                "total_accepted_recipients": len(recipients),
                "id": str(uuid.uuid4().int)[:18],
            }
        }
    )


# --- SendGrid ------------------------------------------------------------------------------

_SENDGRID_RESERVED = {
    "x-sg-id",
    "x-sg-eid",
    "received",
    "dkim-signature",
    "content-type",
    "content-transfer-encoding",
    "to",
    "from",
    "subject",
    "reply-to",
    "cc",
    "bcc",
}


async def sendgrid(server: ProviderServer, req: Recorded) -> Response:
    """POST /v3/mail/send, Bearer, personalizations/from/subject/content/attachments."""

    def err(msg: str, field_name: str | None = None) -> Json:
        return {"errors": [{"message": msg, "field": field_name, "help": None}]}

    _require(req.method == "POST" and req.path == "/v3/mail/send", 404, err("not found"))
    _require(
        req.headers.get("authorization") == f"Bearer {API_KEY}",
        401,
        err("The provided authorization grant is invalid, expired, or revoked"),
    )
    _require(len(req.body) <= 30_000_000, 413, err("Payload too large"))
    body = _json_body(req, err)
    personalizations = body.get("personalizations")
    _require(
        isinstance(personalizations, list) and 1 <= len(personalizations) <= 1000,
        400,
        err("personalizations: 1 to 1000 required", "personalizations"),
    )
    total = 0
    for i, p in enumerate(personalizations):
        _require(bool(p.get("to")), 400, err("to is required", f"personalizations.{i}.to"))
        seen: set[str] = set()
        for role in ("to", "cc", "bcc"):
            for person in p.get(role, []):
                email = person.get("email", "").lower()
                _require(bool(email), 400, err("email required", f"personalizations.{i}.{role}"))
                _require(
                    email not in seen,
                    400,
                    err("Each email address in the personalization block should be unique"),
                )
                seen.add(email)
                total += 1
    _require(total <= 1000, 400, err("too many recipients"))
    _require(bool(body.get("from", {}).get("email")), 400, err("from.email required", "from"))
    _require(
        isinstance(body.get("subject"), str) and bool(body["subject"]),
        400,
        err("The subject is required.", "subject"),
    )
    content = body.get("content")
    _require(
        isinstance(content, list) and bool(content) and all(c.get("value") for c in content),
        400,
        err("content: at least one non-empty value", "content"),
    )
    types = [c.get("type") for c in content]
    _require(
        "text/plain" not in types or types[0] == "text/plain",
        400,
        err("text/plain must be first", "content"),
    )
    for att in body.get("attachments", []):
        _b64(att.get("content"), err("attachment content must be base64", "attachments"))
        _require(bool(att.get("filename")), 400, err("filename required", "attachments"))
        if att.get("disposition") == "inline":
            _require(bool(att.get("content_id")), 400, err("inline needs content_id"))
    for name in body.get("headers", {}):
        _require(name.lower() not in _SENDGRID_RESERVED, 400, err(f"reserved header {name}"))
    server.sent.append(req)
    return Response(status_code=202, headers={"X-Message-Id": uuid.uuid4().hex[:22]})


# --- Postmark ------------------------------------------------------------------------------


async def postmark(server: ProviderServer, req: Recorded) -> Response:
    """POST /email, X-Postmark-Server-Token, From/To, a body, <= 50 recipients, 10 MB."""

    def err(code: int, msg: str) -> Json:
        return {"ErrorCode": code, "Message": msg}

    _require(req.method == "POST" and req.path == "/email", 404, err(404, "Not found"))
    _require(
        req.headers.get("x-postmark-server-token") == API_KEY,
        401,
        err(
            10,
            "The Server Token you provided in the X-Postmark-Server-Token request header "
            "was invalid.",
        ),
    )
    _require(
        "application/json" in req.headers.get("accept", ""), 406, err(0, "Accept application/json")
    )
    _require(len(req.body) <= 10_000_000, 422, err(300, "Message is too large"))
    body = _json_body(req, lambda m: err(300, m))
    _require(bool(body.get("From")), 422, err(300, "Invalid 'From' address"))
    _require(bool(body.get("To")), 422, err(300, "Invalid 'To' address"))
    count = sum(
        len([a for a in str(body.get(k, "")).split(",") if a.strip()]) for k in ("To", "Cc", "Bcc")
    )
    _require(count <= 50, 422, err(300, "Maximum of 50 recipients"))
    _require(
        bool(body.get("TextBody") or body.get("HtmlBody")),
        422,
        err(300, "Provide either email TextBody or HtmlBody or both."),
    )
    for att in body.get("Attachments", []):
        _b64(att.get("Content"), err(300, "Invalid attachment content"))
        _require(bool(att.get("Name")), 422, err(300, "Attachment name required"))
    server.sent.append(req)
    return JSONResponse(
        {
            "To": body["To"],
            "SubmittedAt": "2026-01-01T00:00:00Z",
            "MessageID": str(uuid.uuid4()),
            "ErrorCode": 0,
            "Message": "OK",
        }
    )


# --- Resend --------------------------------------------------------------------------------


async def resend(server: ProviderServer, req: Recorded) -> Response:
    """POST /emails, Bearer, from/to/subject, <= 50 recipients, idempotency keys."""

    def err(status: int, name: str, msg: str) -> Json:
        return {"statusCode": status, "name": name, "message": msg}

    _require(req.method == "POST" and req.path == "/emails", 404, err(404, "not_found", "nf"))
    _require(
        req.headers.get("authorization") == f"Bearer {API_KEY}",
        403 if req.headers.get("authorization") else 401,
        err(403, "invalid_api_key", "API key is invalid"),
    )
    body = _json_body(req, lambda m: err(422, "validation_error", m))
    for name in ("from", "to", "subject"):
        _require(bool(body.get(name)), 422, err(422, "missing_required_field", f"{name} missing"))
    count = sum(len(body.get(k, [])) for k in ("to", "cc", "bcc"))
    _require(count <= 50, 422, err(422, "validation_error", "max 50 recipients"))
    for att in body.get("attachments", []):
        _b64(att.get("content"), err(422, "validation_error", "attachment content"))
        _require(bool(att.get("filename")), 422, err(422, "validation_error", "filename"))
    _require(len(req.body) <= 40_000_000, 422, err(422, "validation_error", "too large"))
    key = req.headers.get("idempotency-key")
    if key is not None:
        _require(
            1 <= len(key) <= 256,
            400,
            err(400, "invalid_idempotency_key", "The key must be between 1-256 chars."),
        )
    conflict = err(
        409,
        "invalid_idempotent_request",
        "Same idempotency key used with a different request payload.",
    )
    return _idempotent(
        server,
        req,
        key=key,
        content=req.body,
        conflict=conflict,
        answer=lambda: {"id": str(uuid.uuid4())},
    )


def _idempotent(
    server: ProviderServer,
    req: Recorded,
    *,
    key: str | None,
    content: bytes,
    conflict: Json,
    answer: Callable[[], Json],
) -> Response:
    """Send once per key: a key seen with the same content gets the first answer and
    nothing is sent; with other content, 409 and `conflict`; a new key is sent."""
    fingerprint = hashlib.sha256(content).hexdigest()
    if key is not None:
        stored = server.idempotency.get(key)
        if stored is not None:
            _require(stored[0] == fingerprint, 409, conflict)
            return JSONResponse(stored[1])
    body = answer()
    if key is not None:
        server.idempotency[key] = (fingerprint, body)
    server.sent.append(req)
    return JSONResponse(body)


# --- Webhook -------------------------------------------------------------------------------


async def webhook(server: ProviderServer, req: Recorded) -> Response:
    """POST /hook, message/rfc822, v2 HMAC-SHA256 over version, timestamp, key id,
    idempotency key, envelope and body with the named key's secret; dedupe on the key."""
    _require(req.method == "POST" and req.path == "/hook", 404, {"error": "not found"})
    _require(req.headers.get("content-type") == "message/rfc822", 415, {"error": "message/rfc822"})
    timestamp = req.headers.get("x-mailrelay-timestamp", "")
    key_id = req.headers.get("x-mailrelay-key-id", "")
    key = req.headers.get("idempotency-key", "")
    envelope = req.headers.get("x-mailrelay-envelope", "")
    secret = server.webhook_keys.get(key_id)
    _require(secret is not None, 401, {"error": f"unknown key id {key_id!r}"})
    assert secret is not None
    fields = ["v2", timestamp, key_id, key, envelope]
    _require(all("\n" not in f for f in fields), 400, {"error": "line break in a header"})
    signed = "\n".join(fields).encode() + b"\n" + req.body
    expected = "v2=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    _require(
        hmac.compare_digest(expected, req.headers.get("x-mailrelay-signature", "")),
        401,
        {"error": "bad signature"},
    )
    _require(bool(key), 400, {"error": "no Idempotency-Key"})
    try:
        req.json = json.loads(envelope)
    except ValueError:
        raise ContractError(400, {"error": "envelope is not JSON"}) from None
    _require(bool(req.json.get("recipients")), 400, {"error": "no recipients"})
    conflict = {"error": "idempotency key reused for another message"}
    return _idempotent(
        server,
        req,
        key=key,
        content=envelope.encode() + b"\n" + req.body,
        conflict=conflict,
        answer=lambda: {"id": f"hook-{uuid.uuid4().hex[:12]}"},
    )


HANDLERS: dict[str, Handler] = {
    "mailgun": mailgun,
    "ses": ses,
    "sparkpost": sparkpost,
    "sendgrid": sendgrid,
    "postmark": postmark,
    "resend": resend,
    "webhook": webhook,
}


async def start_provider_server(provider: str) -> ProviderServer:
    """A running stand-in for `provider`; stop it with `await server.stop()`."""
    server = ProviderServer(provider, HANDLERS[provider])
    await server.start()
    return server


# --- what a provider would send, in one shape for assertions --------------------------------


@dataclass
class SentMail:
    """A JSON provider's request read back as mail: who, what, which files."""

    sender: str
    to: list[str]
    cc: list[str]
    bcc: list[str]
    subject: str | None
    text: str | None
    html: str | None
    # filename -> (bytes, content type, content id or None)
    attachments: dict[str, tuple[bytes, str, str | None]]
    headers: dict[str, str]


def _addresses(value: Any) -> list[str]:
    from email.utils import getaddresses  # noqa: PLC0415

    if not value:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for item in items:
        if isinstance(item, dict):
            out.append(item["email"])
        else:
            out += [addr for _, addr in getaddresses([item])]
    return out


def sent_mail(provider: str, req: Recorded) -> list[SentMail]:
    """One SentMail per copy the provider would send (SendGrid: per personalization)."""
    body = req.json
    if provider == "sendgrid":
        atts = {
            a["filename"]: (base64.b64decode(a["content"]), a.get("type", ""), a.get("content_id"))
            for a in body.get("attachments", [])
        }
        texts = {c["type"]: c["value"] for c in body["content"]}
        return [
            SentMail(
                sender=body["from"]["email"],
                to=_addresses(p.get("to")),
                cc=_addresses(p.get("cc")),
                bcc=_addresses(p.get("bcc")),
                subject=body.get("subject"),
                text=texts.get("text/plain"),
                html=texts.get("text/html"),
                attachments=atts,
                headers=body.get("headers", {}),
            )
            for p in body["personalizations"]
        ]
    if provider == "postmark":
        atts = {
            a["Name"]: (
                base64.b64decode(a["Content"]),
                a.get("ContentType", ""),
                a["ContentID"].removeprefix("cid:") if a.get("ContentID") else None,
            )
            for a in body.get("Attachments", [])
        }
        return [
            SentMail(
                sender=_addresses(body["From"])[0],
                to=_addresses(body.get("To")),
                cc=_addresses(body.get("Cc")),
                bcc=_addresses(body.get("Bcc")),
                subject=body.get("Subject"),
                text=body.get("TextBody"),
                html=body.get("HtmlBody"),
                attachments=atts,
                headers={h["Name"]: h["Value"] for h in body.get("Headers", [])},
            )
        ]
    if provider == "resend":
        atts = {
            a["filename"]: (
                base64.b64decode(a["content"]),
                a.get("content_type", ""),
                a.get("content_id"),
            )
            for a in body.get("attachments", [])
        }
        return [
            SentMail(
                sender=_addresses(body["from"])[0],
                to=_addresses(body.get("to")),
                cc=_addresses(body.get("cc")),
                bcc=_addresses(body.get("bcc")),
                subject=body.get("subject"),
                text=body.get("text"),
                html=body.get("html"),
                attachments=atts,
                headers=body.get("headers", {}),
            )
        ]
    raise ValueError(f"{provider} is not a JSON provider")


def raw_sent(provider: str, req: Recorded) -> tuple[bytes, list[str]]:
    """(exact message bytes, envelope recipients) of a raw provider's request."""
    if provider == "mailgun":
        return req.files["message"], req.form["to"]
    if provider == "ses":
        return req.files["raw"], req.json["Destination"]["ToAddresses"]
    if provider == "sparkpost":
        return (
            req.json["content"]["email_rfc822"].encode("utf-8"),
            [r["address"]["email"] for r in req.json["recipients"]],
        )
    if provider == "webhook":
        return req.body, req.json["recipients"]
    raise ValueError(f"{provider} is not a raw provider")
