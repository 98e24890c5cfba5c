"""Amazon SES v2: `SendEmail` with `Content.Raw`, signed with SigV4.

POST https://email.{region}.amazonaws.com/v2/email/outbound-emails with the message
base64-encoded in `Content.Raw.Data` and the envelope recipients as
`Destination.ToAddresses` (SES sends to the Destination, not to the headers), at most 50
per request. The request is signed with botocore's `SigV4Auth` (service `ses`); botocore
is used only for signing and credentials, the HTTP goes through our own client.

Credentials: the files `aws_access_key_id`, `aws_secret_access_key` and optionally
`aws_session_token` in `credentials_dir`; without them, the standard AWS chain of a
botocore session (environment, web identity token for IRSA, container and instance
roles). The chain can call STS or the metadata service, so it runs in a worker thread.

SES has its own error names: `AccountSuspendedException`, `SendingPausedException`,
`MailFromDomainNotVerifiedException` and `NotFoundException` (a missing configuration
set) are our configuration; `MessageRejected` and `BadRequestException` are permanent;
`TooManyRequestsException` and `LimitExceededException` pause the upstream.
"""

from __future__ import annotations

import asyncio
import base64
import threading

import botocore.session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials
from botocore.exceptions import BotoCoreError, ClientError

from mailrelay.relay.upstreams.providers.base import (
    ApiTransport,
    Call,
    CredentialError,
    Verdict,
    error_text,
    retry_after_seconds,
)
from mailrelay.relay.upstreams.providers.http import ApiRequest, ApiResponse
from mailrelay.relay.upstreams.transport import Envelope, RecipientOutcome

__all__ = ["SesTransport"]


def clean(value: object) -> str:
    """Text from STS fit for one line: printable ASCII, at most 200 characters."""
    text = " ".join("".join(c if " " <= c <= "~" else " " for c in str(value)).split())
    return text[:200]


_CONFIG_ERRORS = frozenset(
    {
        "AccountSuspendedException",
        "SendingPausedException",
        "MailFromDomainNotVerifiedException",
        "NotFoundException",
    }
)
_PERMANENT_ERRORS = frozenset({"MessageRejected", "BadRequestException"})
_THROTTLE_ERRORS = frozenset({"TooManyRequestsException", "LimitExceededException"})


def ses_error_type(response: ApiResponse) -> str:
    """The SES error name, from `x-amzn-ErrorType` or the JSON body's `__type`/`code`."""
    raw = str(response.headers.get("x-amzn-errortype", ""))
    if not raw:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            raw = str(body.get("__type") or body.get("code") or "")
    return raw.split(":", 1)[0].rsplit("#", 1)[-1]


class SesTransport(ApiTransport):
    """SES v2 raw sending."""

    provider = "ses"
    remote_id_field = "MessageId"  # answers {"MessageId": "..."}
    sends_raw_message = True

    _chain: Credentials | None = None
    _chain_lock = threading.Lock()

    def default_base_url(self) -> str:
        """The regional SES endpoint."""
        return f"https://email.{self.upstream.region}.amazonaws.com"

    async def _aws_credentials(self) -> ReadOnlyCredentials:
        key_id = await self.credentials.get_optional("aws_access_key_id")
        if key_id is not None:
            secret = await self.credentials.get("aws_secret_access_key")
            token = await self.credentials.get_optional("aws_session_token")
            return ReadOnlyCredentials(key_id, secret, token)
        return await asyncio.to_thread(self._chain_credentials)

    def _chain_credentials(self) -> ReadOnlyCredentials:
        """The standard AWS chain; botocore refreshes temporary credentials itself."""
        with self._chain_lock:
            if self._chain is None:
                self._chain = botocore.session.get_session().get_credentials()
            chain = self._chain
        if chain is None:
            raise CredentialError(
                f"upstream {self.name!r}: no AWS credentials: put aws_access_key_id and "
                "aws_secret_access_key in credentials_dir, or give the pod an AWS role"
            )
        try:
            return chain.get_frozen_credentials()
        except ClientError as error:
            # STS refused the pod's identity (AssumeRoleWithWebIdentity): its code and
            # message name the cause (InvalidIdentityToken: Incorrect token audience ...).
            details = error.response.get("Error", {})
            raise CredentialError(
                f"upstream {self.name!r}: STS refused the pod's AWS identity "
                f"({clean(details.get('Code', 'error'))}: {clean(details.get('Message', ''))}); "
                "check AWS_ROLE_ARN, the role's trust policy and the token's audience"
            ) from None
        except BotoCoreError as error:
            raise CredentialError(
                f"upstream {self.name!r}: could not get AWS credentials from the pod's "
                f"identity ({type(error).__name__}); check STS is reachable"
            ) from None

    async def prepare(self, envelope: Envelope, message: bytes) -> list[Call]:
        """One signed SendEmail per batch of up to 50 recipients."""
        credentials = await self._aws_credentials()
        return await self.offload(len(message), self._build, envelope, message, credentials)

    def _build(
        self, envelope: Envelope, message: bytes, credentials: ReadOnlyCredentials
    ) -> list[Call]:
        data = base64.b64encode(message).decode("ascii")
        calls = []
        for batch in self.batches(envelope.recipients):
            payload: dict[str, object] = {
                "Content": {"Raw": {"Data": data}},
                "Destination": {"ToAddresses": self.api_addresses(batch)},
            }
            if self.upstream.configuration_set:
                payload["ConfigurationSetName"] = self.upstream.configuration_set
            request = self.json_request("/v2/email/outbound-emails", payload, {}, check_size=False)
            calls.append(Call(recipients=batch, request=self._sign(request, credentials)))
        return calls

    def _sign(self, request: ApiRequest, credentials: ReadOnlyCredentials) -> ApiRequest:
        """SigV4 over exactly what is sent: method, URL, Host, content type and body; the
        Host header is set explicitly so the one signed is the one sent."""
        host = request.host
        aws_request = AWSRequest(
            method=request.method,
            url=request.url,
            data=request.body,
            headers={"Content-Type": request.headers["Content-Type"], "Host": host},
        )
        SigV4Auth(credentials, "ses", str(self.upstream.region)).add_auth(aws_request)
        signed = {"Host": host}
        for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
            value = aws_request.headers.get(name)
            if value is not None:
                signed[name] = str(value)
        return request.with_headers(signed)

    def classify_error(self, response: ApiResponse) -> Verdict:
        """SES error names first; the shared status rules for everything else."""
        kind = ses_error_type(response)
        detail = f"SES {kind or 'error'} (HTTP {response.status_code}): {error_text(response)}"
        if kind in _CONFIG_ERRORS:
            return Verdict(RecipientOutcome.CONFIG_ERROR, detail)
        if kind in _THROTTLE_ERRORS:
            retry_after = retry_after_seconds(response.headers, self._wall_clock())
            return Verdict(RecipientOutcome.TEMPORARY, detail, retry_after, throttle=True)
        if kind in _PERMANENT_ERRORS:
            return Verdict(RecipientOutcome.PERMANENT, detail)
        return super().classify_error(response)
