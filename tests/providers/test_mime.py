"""MIME to provider fields: pure conversion, checked against messages built with `email`."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.relay.upstreams.providers.mime import (
    Mailbox,
    UnrepresentableMessage,
    ascii_address,
    parse_message,
    plan_batches,
    split_recipients,
)
from tests.providers.messages import (
    BINARY_ATTACHMENT,
    FILENAME,
    HTML_BODY,
    INLINE_IMAGE,
    SUBJECT,
    TEXT_BODY,
    plain_message,
    rich_message,
)


def test_rich_message_fields() -> None:
    parsed = parse_message(rich_message())
    assert parsed.sender == Mailbox("ann@example.com", "Ann Sender")
    assert parsed.reply_to == (Mailbox("replies@example.com"),)
    assert parsed.subject == SUBJECT
    assert parsed.text == TEXT_BODY
    assert parsed.html == HTML_BODY
    assert [m.address for m in parsed.header_to] == ["bob@example.org"]
    assert [m.address for m in parsed.header_cc] == ["carol@example.net"]


def test_attachments_are_byte_exact_with_names_and_inline_ids() -> None:
    parsed = parse_message(rich_message())
    by_name = {a.filename: a for a in parsed.attachments}
    assert set(by_name) == {"logo.png", FILENAME}
    logo = by_name["logo.png"]
    assert (logo.content, logo.content_type, logo.content_id, logo.inline) == (
        INLINE_IMAGE,
        "image/png",
        "logo@example.com",
        True,
    )
    report = by_name[FILENAME]
    assert (report.content, report.content_type, report.inline) == (
        BINARY_ATTACHMENT,
        "application/pdf",
        False,
    )


def test_custom_headers_kept_structural_ones_dropped() -> None:
    long_value = " ".join(f"word{i}" for i in range(40))
    parsed = parse_message(
        rich_message(extra_headers={"Bcc": "hidden@example.com", "X-Entity-Ref": long_value})
    )
    names = [name.lower() for name, _ in parsed.headers]
    assert "x-campaign" in names and "message-id" in names and "x-entity-ref" in names
    for dropped in ("bcc", "to", "cc", "from", "subject", "date", "content-type", "mime-version"):
        assert dropped not in names
    assert dict(parsed.headers)["X-Entity-Ref"] == long_value  # folded in the MIME, unfolded


def test_envelope_decides_recipients_and_bcc_stays_out_of_headers() -> None:
    parsed = parse_message(rich_message(extra_headers={"Bcc": "hidden@example.com"}))
    envelope = ["bob@example.org", "CAROL@example.net", "hidden@example.com", "dave@example.com"]
    to, cc, bcc = split_recipients(parsed, envelope)
    assert [(m.address, m.name) for m in to] == [("bob@example.org", "Bob")]
    assert [m.original for m in cc] == ["CAROL@example.net"]
    assert [m.address for m in bcc] == ["hidden@example.com", "dave@example.com"]
    # Nobody outside the envelope is ever a recipient, even if the headers name them.
    to, cc, bcc = split_recipients(parsed, ["dave@example.com"])
    assert (to, cc) == ((), ())


def test_batches_keep_a_to_and_respect_the_limit() -> None:
    to = tuple(Mailbox(f"t{i}@x.test") for i in range(3))
    bcc = tuple(Mailbox(f"b{i}@x.test") for i in range(4))
    batches = plan_batches(to, (), bcc, 5)
    # The To recipients are spread so that every request has one.
    assert [len(b.recipients) for b in batches] == [5, 2]
    assert all(b.to for b in batches)
    everyone = [r for b in batches for r in b.recipients]
    assert sorted(everyone) == sorted(m.address for m in (*to, *bcc))
    assert len(plan_batches(to, (), bcc, None)) == 1
    # One To for two requests: the second has none, so its Bcc recipients go one by one.
    more_bcc = (*bcc, Mailbox("b4@x.test"), Mailbox("b5@x.test"))
    batches = plan_batches(to[:1], (), more_bcc, 5)
    assert [len(b.recipients) for b in batches] == [5, 1, 1]
    assert [b.to[0].address for b in batches[1:]] == ["b4@x.test", "b5@x.test"]


def test_only_bcc_recipients_get_one_request_each() -> None:
    bcc = (Mailbox("a@x.test"), Mailbox("b@x.test"))
    batches = plan_batches((), (), bcc, 50)
    assert [(b.to, b.cc, b.bcc) for b in batches] == [((bcc[0],), (), ()), ((bcc[1],), (), ())]


def test_formatted_mailbox_quotes_specials_and_keeps_unicode() -> None:
    assert Mailbox("a@x.test", "Zoë").formatted() == "Zoë <a@x.test>"
    assert Mailbox("a@x.test", "Doe, Jane").formatted() == '"Doe, Jane" <a@x.test>'
    assert Mailbox("a@x.test").formatted() == "a@x.test"


def test_idna_domain_converted_non_ascii_mailbox_refused() -> None:
    assert ascii_address("user@bücher.example") == "user@xn--bcher-kva.example"
    with pytest.raises(UnrepresentableMessage, match="SMTPUTF8"):
        ascii_address("jürgen@example.com")


def test_missing_from_falls_back_to_envelope_sender_or_refuses() -> None:
    message = b"To: bob@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    assert parse_message(message, envelope_sender="ann@example.com").sender.address == (
        "ann@example.com"
    )
    with pytest.raises(UnrepresentableMessage, match="no From"):
        parse_message(message, envelope_sender="")


def test_several_from_mailboxes_refused() -> None:
    message = plain_message(sender="a@example.com, b@example.com")
    with pytest.raises(UnrepresentableMessage, match="several"):
        parse_message(message)


def test_plain_message_has_no_attachments() -> None:
    parsed = parse_message(plain_message())
    assert parsed.text == "Just text.\n" and parsed.html is None and parsed.attachments == ()


_FILENAME_CHARS = st.characters(
    blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters='"\\/'
)


@settings(max_examples=60, deadline=None)
@given(
    content=st.binary(max_size=3000),
    filename=st.text(_FILENAME_CHARS, min_size=1, max_size=40).filter(lambda s: s.strip() == s),
    subject=st.text(_FILENAME_CHARS, min_size=1, max_size=60).filter(lambda s: s.strip() == s),
)
def test_any_attachment_and_subject_survive_conversion(
    content: bytes, filename: str, subject: str
) -> None:
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"], msg["To"], msg["Subject"] = "a@example.com", "b@example.org", subject
    msg.set_content("body\n")
    msg.add_attachment(content, maintype="application", subtype="octet-stream", filename=filename)
    parsed = parse_message(msg.as_bytes())
    assert parsed.subject == subject
    (attachment,) = parsed.attachments
    assert (attachment.filename, attachment.content) == (filename, content)
