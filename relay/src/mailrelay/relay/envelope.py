"""The mail envelope, the one type every stage after the SMTP front passes around.

The front collects a transaction in aiosmtpd's own envelope (`server.RelayEnvelope`, the
framework's type); from the moment the message is handed to the spool, the envelope is
this: the spool's intake (`spool.Arrival`) carries one, a queued message gives one per
delivery attempt (`spool.QueueEntry.envelope`), and every transport receives one
(`transport.Transport.deliver`). It imports nothing of the relay.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Envelope"]


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who from, who to, which extensions: what the message is sent with besides its bytes.

    `mail_from` is "" for the null sender; `smtputf8` and `body_8bitmime` are the
    client's MAIL parameters, kept so an upstream is asked for the same extensions.
    """

    queue_id: str
    mail_from: str
    recipients: tuple[str, ...]
    smtputf8: bool
    body_8bitmime: bool
