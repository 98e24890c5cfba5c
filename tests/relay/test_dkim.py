"""DKIM signing in the relay: keys, records, the config rules, and signed mail end to end.

The end-to-end tests submit over SMTP to an in-process relay whose route signs, and verify
the exact bytes the recording aiosmtpd upstream received with two independent verifiers
(dkimpy and OpenDKIM, both asking a real DNS server on loopback for the public key).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mailrelay.relay import dkim
from mailrelay.relay.config import ConfigError, parse_config
from mailrelay.relay.signing import RouteSigners, SignFailure, SigningPool
from mailrelay.relay.upstreams.transport import RecipientOutcome
from mailrelay.support.smtp_peers import RecordingUpstream, TlsCerts
from tests.dkimtools import (
    DkimEnv,
    assert_verifies,
    dkim_dns_server,
    pem_ed25519,
    pem_rsa,
    verify_dkimpy,
)
from tests.relay.conftest import USERS, RelayFactory, RelayHandle

ALICE = ("alice", USERS["alice"])
SENDER = "alice@example.com"

# -- keys ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> bytes:
    return pem_rsa()


def test_rsa_key_of_2048_bits_signs_with_rsa_sha256(rsa_key: bytes) -> None:
    key = dkim.parse_private_key(rsa_key)
    assert (key.algorithm, key.bits, key.key_type) == ("rsa-sha256", 2048, "rsa")
    assert dkim.txt_record(key).startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    assert "PRIVATE" not in repr(key)


@pytest.mark.parametrize("form", ["pem", "seed"])
def test_ed25519_key_as_pem_or_dkimpy_seed(form: str) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    if form == "pem":
        data = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    else:
        data = base64.b64encode(
            private.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )
    key = dkim.parse_private_key(data)
    raw_public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert key.algorithm == "ed25519-sha256"
    assert dkim.txt_record(key) == f"v=DKIM1; k=ed25519; p={base64.b64encode(raw_public).decode()}"


def _pem(key: Any, fmt: Any = serialization.PrivateFormat.PKCS8) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "is empty"),
        (b"   \n", "is empty"),
        (b"not a key at all", "neither a PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a readable PEM"),
        (
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "encrypted",
        ),
    ],
)
def test_unusable_key_material_is_named_not_quoted(data: bytes, words: str) -> None:
    with pytest.raises(dkim.KeyProblem, match=words) as caught:
        dkim.parse_private_key(data)
    assert "AAAA" not in str(caught.value)


def test_short_rsa_key_is_refused_with_its_size() -> None:
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(dkim.KeyProblem, match="1024 bits; DKIM keys must have at least 2048"):
        dkim.parse_private_key(_pem(short, serialization.PrivateFormat.TraditionalOpenSSL))


def test_ec_key_is_refused_as_the_wrong_kind() -> None:
    with pytest.raises(dkim.KeyProblem, match=r"RSA .* or Ed25519"):
        dkim.parse_private_key(_pem(ec.generate_private_key(ec.SECP256R1())))


# -- records ---------------------------------------------------------------------------


def test_published_record_matches_whatever_the_spacing(rsa_key: bytes) -> None:
    key = dkim.parse_private_key(rsa_key)
    spaced = " ".join(key.public[i : i + 60] for i in range(0, len(key.public), 60))
    assert dkim.record_matches(dkim.txt_record(key), key)
    assert dkim.record_matches(f"v=DKIM1;k=rsa; h=sha256; p={spaced}", key)
    assert dkim.record_matches(f"p={key.public}", key)  # v and k have defaults


def test_record_with_pkcs1_public_key_matches(rsa_key: bytes) -> None:
    key = dkim.parse_private_key(rsa_key)
    loaded = serialization.load_pem_private_key(rsa_key, password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey)
    pkcs1 = loaded.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    # RFC 6376's p= is SubjectPublicKeyInfo, but PKCS#1 is what some tools publish.
    assert dkim.record_matches(f"v=DKIM1; p={base64.b64encode(pkcs1).decode()}", key) is (
        _pkcs1_loads()
    )


def _pkcs1_loads() -> bool:
    """Whether cryptography reads a bare PKCS#1 public key as DER (it may not)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    try:
        serialization.load_der_public_key(der)
    except ValueError:
        return False
    return True


def test_other_key_revoked_key_and_wrong_type_do_not_match(rsa_key: bytes) -> None:
    key = dkim.parse_private_key(rsa_key)
    other = dkim.parse_private_key(pem_rsa())
    assert not dkim.record_matches(dkim.txt_record(other), key)
    assert not dkim.record_matches("v=DKIM1; k=rsa; p=", key)
    assert not dkim.record_matches(f"v=DKIM1; k=ed25519; p={key.public}", key)
    assert not dkim.record_matches(f"v=DKIM2; k=rsa; p={key.public}", key)


# -- which domain signs -----------------------------------------------------------------


def _signers(*domains: str) -> list[dkim.Signer]:
    key = dkim.parse_private_key(pem_ed25519())
    return [dkim.Signer(domain, "s1", key, None) for domain in domains]


@pytest.mark.parametrize(
    ("from_header", "mail_from", "expected"),
    [
        (b"From: A <a@example.com>", "x@other.test", "example.com"),
        (b"From: a@news.example.com", "x@other.test", "example.com"),
        (b"From: a@news.example.com", "x@other.test", "news.example.com"),
        (b"From: a@example.org", "bounce@example.net", "example.net"),
        (b"From: a@unknown.test", "bounce@unknown.test", "example.com"),
        (b'From: "Q, R" <q@Example.NET>', "", "example.net"),
    ],
)
def test_signer_follows_the_from_domain(from_header: bytes, mail_from: str, expected: str) -> None:
    domains = ("example.com", "example.net")
    if expected == "news.example.com":
        domains = ("example.com", "news.example.com")
    message = from_header + b"\r\nSubject: x\r\n\r\nbody\r\n"
    assert dkim.signer_for(message, mail_from, _signers(*domains)).domain == expected


# -- the config rules -------------------------------------------------------------------


def _config(route: dict[str, Any]) -> str:
    import yaml  # noqa: PLC0415

    return yaml.safe_dump(
        {
            "hostname": "relay.test",
            "auth": {"required": False},
            "allowed_networks": ["10.0.0.0/8"],
            "spool": {"directory": "/tmp/spool"},
            "routes": [route],
        }
    )


SIGNING = {"domain": "example.com", "selector": "s1", "private_key_file": "/k/dkim.key"}


@pytest.mark.parametrize("provider", ["sendgrid", "postmark", "resend"])
def test_signing_route_with_a_json_provider_is_refused(provider: str) -> None:
    route = {
        "name": "out",
        "upstream": {"type": "api", "name": "api", "provider": provider, "credentials_dir": "/c"},
        "dkim": [SIGNING],
    }
    with pytest.raises(ConfigError, match="dkim cannot be used with providers sendgrid"):
        parse_config(_config(route))


def test_json_provider_as_fallback_is_refused_too() -> None:
    route = {
        "name": "out",
        "upstream": {"type": "smtp", "name": "smtp", "host": "mx.test"},
        "fallbacks": [{"type": "api", "name": "pm", "provider": "postmark"}],
        "dkim": [SIGNING],
    }
    with pytest.raises(ConfigError, match="they rebuild the message from JSON"):
        parse_config(_config(route))


@pytest.mark.parametrize("provider", ["mailgun", "ses", "sparkpost", "webhook"])
def test_signing_route_with_a_raw_provider_is_fine(provider: str) -> None:
    upstream: dict[str, Any] = {"type": "api", "name": "api", "provider": provider}
    upstream.update(
        {
            "mailgun": {"domain": "mg.example.com"},
            "ses": {"region": "eu-west-1"},
            "webhook": {"endpoint": "https://hooks.example.com/mail"},
        }.get(provider, {})
    )
    config = parse_config(_config({"name": "out", "upstream": upstream, "dkim": [SIGNING]}))
    assert config.routes[0].dkim[0].canonicalization == "relaxed/relaxed"
    assert Path("/k/dkim.key") in config.referenced_files()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"headers": ["To", "Subject"]}, "headers must include From"),
        ({"selector": "Bad_Selector"}, "selector"),
        ({"canonicalization": "relaxed"}, "canonicalization"),
        ({"domain": "not a domain"}, "is not a domain name"),
    ],
)
def test_bad_signing_fields_are_refused(change: dict[str, Any], words: str) -> None:
    route = {
        "name": "out",
        "upstream": {"type": "smtp", "name": "smtp", "host": "mx.test"},
        "dkim": [{**SIGNING, **change}],
    }
    with pytest.raises(ConfigError, match=words):
        parse_config(_config(route))


def test_a_domain_listed_twice_is_refused() -> None:
    route = {
        "name": "out",
        "upstream": {"type": "smtp", "name": "smtp", "host": "mx.test"},
        "dkim": [SIGNING, {**SIGNING, "selector": "s2"}],
    }
    with pytest.raises(ConfigError, match="dkim lists a domain twice"):
        parse_config(_config(route))


# -- end to end -------------------------------------------------------------------------


def eight_bit() -> bytes:
    return (
        "From: Alice <alice@example.com>\r\n"
        "To: bob@dest.test\r\n"
        "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
        "Message-ID: <8bit@example.com>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Grüße aus Köln, 東京からこんにちは.\r\n"
        "Trailing spaces   \r\n"
        "\r\n"
        "\r\n"
    ).encode()


def multipart() -> bytes:
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = "Alice <alice@example.com>"
    msg["To"] = "bob@dest.test"
    msg["Subject"] = "Report attached"
    msg["Message-ID"] = "<multi@example.com>"
    msg.set_content("See the attachment.\n")
    msg.add_alternative("<p>See the <b>attachment</b>.</p>\n", subtype="html")
    msg.add_attachment(bytes(range(256)) * 64, maintype="application", subtype="octet-stream")
    return msg.as_bytes()


def long_headers() -> bytes:
    references = "\r\n ".join(f"<ref{i}.{'x' * 40}@example.com>" for i in range(60))
    subject = "S" + "ubject words " * 70  # one 900-odd byte line, no fold point used
    return (
        "From: Alice <alice@example.com>\r\n"
        "To: bob@dest.test\r\n"
        f"Subject: {subject.strip()}\r\n"
        f"References: {references}\r\n"
        "Message-ID: <long@example.com>\r\n"
        "\r\n"
        "Body.\r\n"
    ).encode()


def dot_lines() -> bytes:
    return (
        b"From: Alice <alice@example.com>\r\n"
        b"To: bob@dest.test\r\n"
        b"Subject: dots\r\n"
        b"Message-ID: <dots@example.com>\r\n"
        b"\r\n"
        b".\r\n"
        b"..\r\n"
        b".hidden line\r\n"
        b"middle\r\n"
        b". \r\n"
        b"...end\r\n"
    )


MESSAGES: dict[str, Callable[[], bytes]] = {
    "8bit": eight_bit,
    "multipart": multipart,
    "long-header": long_headers,
    "dot-leading": dot_lines,
}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[DkimEnv]:
    with dkim_dns_server() as server:
        yield DkimEnv(server, tmp_path)


def _signing_route(
    upstream: RecordingUpstream, ca_file: Path, signing: list[dict[str, Any]]
) -> dict[str, Any]:
    return {"name": "signed", "upstream": upstream.smtp_upstream("up", ca_file), "dkim": signing}


async def _send(relay: RelayHandle, data: bytes, *, eight_bit_mime: bool = False) -> None:
    options = ["BODY=8BITMIME"] if eight_bit_mime else []
    async with relay.client(login=ALICE) as smtp:
        errors, _ = await smtp.sendmail(SENDER, ["bob@dest.test"], data, mail_options=options)
    assert dict(errors) == {}


def _message_id(data: bytes) -> bytes:
    start = data.index(b"\r\nMessage-ID: ") + 14
    return data[start : data.index(b"\r\n", start)]


def _split_signature(data: bytes) -> tuple[bytes, bytes]:
    """(the DKIM-Signature field, the rest), asserting the signature is on top."""
    assert data.startswith(b"DKIM-Signature: "), data[:200]
    end = data.index(b"\r\nReceived: ")
    return data[: end + 2], data[end + 2 :]


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
async def test_messages_arrive_signed_and_verify_independently(
    algorithm: str,
    env: DkimEnv,
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    relay_factory: RelayFactory,
) -> None:
    pem = pem_rsa() if algorithm == "rsa-sha256" else pem_ed25519()
    key = dkim.parse_private_key(pem)
    env.dns.publish("mail2026._domainkey.example.com", dkim.txt_record(key))
    upstream = recording_upstream(tls="starttls")
    signing = {
        "domain": "example.com",
        "selector": "mail2026",
        "private_key_file": str(env.key_file("dkim.key", pem)),
    }
    relay = await relay_factory(routes=[_signing_route(upstream, tls_certs.ca_file, [signing])])
    built = {name: build() for name, build in MESSAGES.items()}
    for name, data in built.items():
        await _send(relay, data, eight_bit_mime=name == "8bit")
    got = await upstream.wait_for(len(MESSAGES))
    by_id = {_message_id(m.data): m for m in got}
    for name, data in built.items():
        received = by_id[_message_id(data)]
        signature, rest = _split_signature(received.data)
        assert rest.endswith(data), name  # the message itself is unchanged
        assert f"a={algorithm};".encode() in signature
        assert b"d=example.com;" in signature and b"s=mail2026;" in signature
        assert b"c=relaxed/relaxed;" in signature
        verdict = assert_verifies(received.data, env.dns)
        print(f"{name} ({algorithm}): {verdict}")
        # Tampering after signing is caught, so the verifiers are really checking.
        assert not verify_dkimpy(received.data.replace(b"alice@", b"mallory@", 1), env.dns)
    assert relay.metric(
        "mailrelay_dkim_signatures_total", {"route": "signed", "result": "signed"}
    ) == len(MESSAGES)


async def test_header_list_and_canonicalization_are_taken_from_the_route(
    env: DkimEnv,
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    relay_factory: RelayFactory,
) -> None:
    pem = pem_rsa()
    env.dns.publish("s1._domainkey.example.com", dkim.txt_record(dkim.parse_private_key(pem)))
    upstream = recording_upstream(tls="starttls")
    signing = {
        "domain": "example.com",
        "selector": "s1",
        "private_key_file": str(env.key_file("k", pem)),
        "headers": ["From", "Subject", "Message-ID"],
        "canonicalization": "simple/simple",
    }
    relay = await relay_factory(routes=[_signing_route(upstream, tls_certs.ca_file, [signing])])
    await _send(relay, dot_lines())
    [got] = await upstream.wait_for(1)
    signature, _ = _split_signature(got.data)
    unfolded = signature.replace(b"\r\n", b"").replace(b" ", b"")
    assert b"c=simple/simple;" in unfolded
    assert b"h=from:subject:message-id;" in unfolded
    assert_verifies(got.data, env.dns)


async def test_rotation_signs_with_the_new_selector_after_the_switch(
    env: DkimEnv,
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    relay_factory: RelayFactory,
) -> None:
    old_pem, new_pem = pem_rsa(), pem_ed25519()
    for selector, pem in (("old", old_pem), ("new", new_pem)):
        record = dkim.txt_record(dkim.parse_private_key(pem))
        env.dns.publish(f"{selector}._domainkey.example.com", record)
    old_file = env.key_file("old.key", old_pem)
    new_file = env.key_file("new.key", new_pem)
    upstream = recording_upstream(tls="starttls")
    signing = {"domain": "example.com", "selector": "old", "private_key_file": str(old_file)}
    route = _signing_route(upstream, tls_certs.ca_file, [signing])
    relay = await relay_factory(routes=[route])
    await _send(relay, dot_lines())
    [first] = await upstream.wait_for(1)
    assert b"s=old;" in first.data
    assert_verifies(first.data, env.dns)

    config = relay.config.model_dump(mode="json")
    config["routes"][0]["dkim"][0].update(selector="new", private_key_file=str(new_file))
    relay.write_config(config)
    deadline = time.monotonic() + 10
    while relay.config.routes[0].dkim[0].selector != "new" or _reloads(relay) < 1:
        assert time.monotonic() < deadline, "the relay did not reload"
        await asyncio.sleep(0.05)
    await _send(relay, eight_bit(), eight_bit_mime=True)
    got = await upstream.wait_for(2)
    assert b"s=new;" in got[1].data and b"a=ed25519-sha256;" in got[1].data
    assert_verifies(got[1].data, env.dns)


def _reloads(relay: RelayHandle) -> float:
    return relay.metric("mailrelay_config_reloads_total", {"result": "success"})


async def test_bad_key_keeps_mail_queued_unsigned_never_sent_then_a_good_key_sends_it(
    env: DkimEnv,
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    relay_factory: RelayFactory,
) -> None:
    pem = pem_rsa()
    env.dns.publish("s1._domainkey.example.com", dkim.txt_record(dkim.parse_private_key(pem)))
    key_file = env.key_file("dkim.key", b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    upstream = recording_upstream(tls="starttls")
    signing = {"domain": "example.com", "selector": "s1", "private_key_file": str(key_file)}
    other = {"name": "plain", "match": {"sender_domains": ["other.test"]}}
    other["upstream"] = upstream.smtp_upstream("plain-up", tls_certs.ca_file)
    relay = await relay_factory(
        routes=[
            {**_signing_route(upstream, tls_certs.ca_file, [signing]), "priority": 0},
            {**other, "priority": 10},
        ]
    )
    await _send(relay, dot_lines())
    # The other route keeps serving meanwhile.
    async with relay.client(login=ALICE) as smtp:
        errors, _ = await smtp.sendmail(
            "alice@other.test", ["bob@dest.test"], b"Subject: x\r\n\r\nx\r\n"
        )
    assert dict(errors) == {}
    await upstream.wait_for(1)
    labels = {"route": "signed", "result": "key_error"}
    deadline = time.monotonic() + 10
    while relay.metric("mailrelay_dkim_signatures_total", labels) < 2:
        assert time.monotonic() < deadline, "no signing attempt seen"
        await asyncio.sleep(0.05)
    assert len(upstream.snapshot()) == 1  # only the unsigned route's message went out
    assert any(relay.spool_dir.joinpath("queue").iterdir())

    key_file.write_bytes(pem)  # the Secret fixed: a file change means a reload
    got = await upstream.wait_for(2, within=20)
    signed = [m for m in got if m.data.startswith(b"DKIM-Signature:")]
    assert len(signed) == 1
    assert_verifies(signed[0].data, env.dns)


async def test_message_without_from_cannot_be_signed_and_bounces(
    env: DkimEnv,
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    relay_factory: RelayFactory,
) -> None:
    pem = pem_ed25519()
    upstream = recording_upstream(tls="starttls")
    signing = {
        "domain": "example.com",
        "selector": "s1",
        "private_key_file": str(env.key_file("k", pem)),
    }
    route = _signing_route(upstream, tls_certs.ca_file, [signing])
    relay = await relay_factory(routes=[route])
    await _send(relay, b"To: bob@dest.test\r\nSubject: no from\r\n\r\nbody\r\n")
    # The bounce goes back to alice@example.com through the same route: signed, with From.
    [bounce] = await upstream.wait_for(1)
    assert bounce.mail_from in ("", "<>")
    assert b"cannot be DKIM-signed" in bounce.data
    assert bounce.data.startswith(b"DKIM-Signature:")
    labels = {"route": "signed", "result": "message_error"}
    assert relay.metric("mailrelay_dkim_signatures_total", labels) == 1


async def test_held_route_refuses_new_mail_and_keeps_queued_mail_from_every_other_route(
    env: DkimEnv,
    recording_upstream: Callable[..., RecordingUpstream],
    tls_certs: TlsCerts,
    relay_factory: RelayFactory,
) -> None:
    pem = pem_ed25519()
    env.dns.publish("s1._domainkey.example.com", dkim.txt_record(dkim.parse_private_key(pem)))
    signing_upstream = recording_upstream(tls="starttls")
    catch_all = recording_upstream(tls="starttls")
    signing_upstream.data_reply = lambda _: "451 4.3.0 try later"  # queue one first
    signing = {"domain": "example.com", "selector": "s1"}
    signing["private_key_file"] = str(env.key_file("k", pem))
    route = {
        **_signing_route(signing_upstream, tls_certs.ca_file, [signing]),
        "priority": 10,
        "match": {"sender_domains": ["example.com"]},
    }
    plain = {"name": "plain", "upstream": catch_all.smtp_upstream("plain-up", tls_certs.ca_file)}
    relay = await relay_factory(routes=[route, plain])
    await _send(relay, dot_lines())
    labels = {"route": "signed", "upstream": "up", "result": "temporary"}
    deadline = time.monotonic() + 10
    while relay.metric("mailrelay_delivery_attempts_total", labels) < 1:
        assert time.monotonic() < deadline, "no first attempt"
        await asyncio.sleep(0.05)

    # The operator holds the route (its key's DNS record went missing, say).
    config = relay.config.model_dump(mode="json", exclude_none=True)
    held_text = "DKIM signing for example.com is not ready; try again later"
    config["routes"][0].update(held=held_text, dkim=[])
    config["routes"][0]["upstream"]["ca_file"] = str(tls_certs.ca_file)
    relay.write_config(config)
    while relay.config.routes[0].held is None or _reloads(relay) < 1:
        assert time.monotonic() < deadline + 10, "the relay did not reload"
        await asyncio.sleep(0.05)
    signing_upstream.data_reply = None
    async with relay.client(login=ALICE) as smtp:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await smtp.sendmail(SENDER, ["bob@dest.test"], dot_lines())
    [(code, text)] = [(r.code, r.message) for r in refused.value.recipients]
    assert code == 451 and text == f"4.7.5 {held_text}"
    await asyncio.sleep(2)  # several retry periods (backoff 0.2 s to 1 s)
    assert signing_upstream.snapshot() == [] and catch_all.snapshot() == []
    assert any(relay.spool_dir.joinpath("queue").iterdir())

    # Released with its key: the queued message goes out, signed, the way it was meant to.
    config["routes"][0].pop("held")
    config["routes"][0]["dkim"] = [signing]
    relay.write_config(config)
    [got] = await signing_upstream.wait_for(1, within=20)
    assert_verifies(got.data, env.dns)
    assert catch_all.snapshot() == []


class _KillsTheWorker:
    """Unpickled in the signing process, it ends that process (a crash mid-signing)."""

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return (os._exit, (1,))


async def test_a_dead_signing_process_keeps_the_message_for_later_and_is_replaced() -> None:
    pool = SigningPool(processes=1)
    key = dkim.parse_private_key(pem_ed25519())
    message = dot_lines()
    crashing = dkim.Signer("example.com", "s1", key, _KillsTheWorker())  # type: ignore[arg-type]
    try:
        failure = await RouteSigners({"r": (crashing,)}).sign("r", SENDER, message, pool)
        assert isinstance(failure, SignFailure)
        assert failure.outcome is RecipientOutcome.TEMPORARY  # retried, never bounced
        good = dkim.Signer("example.com", "s1", key, None)
        signed = await RouteSigners({"r": (good,)}).sign("r", SENDER, message, pool)
        assert isinstance(signed, bytes) and signed.startswith(b"DKIM-Signature: ")
        assert signed.endswith(message)
    finally:
        await pool.close()
