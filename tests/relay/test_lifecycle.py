"""The relay as a whole: end-to-end bytes, startup resume, health endpoints, SIGTERM drain,
and the command line parser."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailrelay.relay.main import parse_args
from mailrelay.relay.spool import Spool
from mailrelay.relay.spool_admin import SpoolAdmin
from mailrelay.support.smtp_peers import RecordingUpstream, TlsCerts
from tests.relay.conftest import UPSTREAM_USER, USERS, RelayFactory, http_get, smtp_route

ALICE = ("alice", USERS["alice"])


def credentials(directory: Path) -> dict[str, str]:
    """Upstream AUTH credentials as files, the way Kubernetes mounts a Secret."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "username").write_text(UPSTREAM_USER[0])
    (directory / "password").write_text(UPSTREAM_USER[1] + "\n")
    return {
        "username_file": str(directory / "username"),
        "password_file": str(directory / "password"),
    }


def message(n: int, body: bytes = b"Body line.\r\n") -> bytes:
    return (
        b"From: a@example.com\r\nTo: b@dest.test\r\nSubject: test %d\r\n"
        b"Message-ID: <msg-%d@example.com>\r\n\r\n" % (n, n)
    ) + body


async def test_end_to_end_exact_bytes_over_starttls_and_auth(
    relay_factory: RelayFactory,
    recording_upstream: Any,
    tls_certs: TlsCerts,
    tmp_path: Path,
) -> None:
    upstream: RecordingUpstream = recording_upstream(tls="starttls", auth=UPSTREAM_USER)
    route = smtp_route("out", upstream, tls_certs.ca_file)
    route["upstream"].update(credentials(tmp_path / "creds"))
    relay = await relay_factory(routes=[route])
    raw = message(1, body="Grüße, 8 bit\r\n.leading dot\r\n".encode())
    async with relay.client(login=ALICE) as smtp:
        errors, reply = await smtp.sendmail(
            "a@example.com", ["b@dest.test", "c@dest.test"], raw, mail_options=["BODY=8BITMIME"]
        )
    assert errors == {}
    queue_id = reply.split()[-1]
    [got] = await upstream.wait_for(1)
    assert got.mail_from == "a@example.com"
    assert got.rcpt_tos == ("b@dest.test", "c@dest.test")
    assert got.tls and got.auth_user == UPSTREAM_USER[0]
    received, _, rest = got.data.partition(b"\r\nFrom: ")
    assert rest and got.data.endswith(raw)
    assert got.data == received + b"\r\n" + raw  # the original plus exactly one header
    assert received.count(b"Received: ") == 1 and queue_id.encode() in received
    for _ in range(100):  # the spool forgets delivered mail
        if not SpoolAdmin(relay.spool_dir).list_queue():
            break
        await asyncio.sleep(0.05)
    assert SpoolAdmin(relay.spool_dir).list_queue() == []


async def test_startup_resumes_the_spool(
    relay_factory: RelayFactory, recording_upstream: Any, tls_certs: TlsCerts
) -> None:
    upstream: RecordingUpstream = recording_upstream(tls="starttls")
    relay = await relay_factory(
        routes=[smtp_route("out", upstream, tls_certs.ca_file)], start=False
    )
    spool = Spool(relay.spool_dir)
    await spool.start()
    for n in range(3):
        await spool.enqueue(
            "a@example.com",
            [("b@dest.test", "out")],
            message(n),
            smtputf8=False,
            body_8bitmime=False,
            client_address="127.0.0.1",
            authenticated_user=None,
        )
    relay = await relay_factory(
        routes=[smtp_route("out", upstream, tls_certs.ca_file)], spool_dir=str(relay.spool_dir)
    )
    await upstream.wait_for(3)
    assert upstream.message_ids() == {f"<msg-{n}@example.com>" for n in range(3)}


async def test_health_endpoints(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(
        routes=[
            {"name": "r", "upstream": {"type": "smtp", "name": "u", "host": "127.0.0.1", "port": 9}}
        ],
        enable_delivery=False,
    )
    assert await http_get("127.0.0.1", relay.health_port, "/healthz") == (200, b"ok\n")
    assert await http_get("127.0.0.1", relay.health_port, "/readyz") == (200, b"ready\n")
    status, body = await http_get("127.0.0.1", relay.health_port, "/metrics")
    assert status == 200
    assert b'mailrelay_messages_rejected_total{reason="no_route"} 0.0' in body
    assert b"mailrelay_queue_depth" in body
    assert (await http_get("127.0.0.1", relay.health_port, "/nope"))[0] == 404
    # A spool that cannot take files makes the relay unready, not dead.
    tmp = relay.spool_dir / "tmp"
    tmp.rename(relay.spool_dir / "tmp.away")
    tmp.write_text("blocked")
    assert (await http_get("127.0.0.1", relay.health_port, "/readyz"))[0] == 503
    assert (await http_get("127.0.0.1", relay.health_port, "/healthz"))[0] == 200


async def test_queue_gauges(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(
        routes=[
            {"name": "r", "upstream": {"type": "smtp", "name": "u", "host": "127.0.0.1", "port": 9}}
        ],
        enable_delivery=False,
        allowed_networks=["127.0.0.0/8"],
    )
    async with relay.client(starttls=False) as smtp:
        for n in range(3):
            await smtp.sendmail("a@example.com", ["b@d.test"], message(n))
    for _ in range(60):
        if relay.metric("mailrelay_queue_depth") == 3:
            break
        await asyncio.sleep(0.1)
    assert relay.metric("mailrelay_queue_depth") == 3
    assert 0 <= relay.metric("mailrelay_queue_oldest_message_age_seconds") < 30


@pytest.mark.slow
async def test_sigterm_drains_sessions_and_exits_zero(
    relay_factory: RelayFactory, recording_upstream: Any, tls_certs: TlsCerts
) -> None:
    upstream: RecordingUpstream = recording_upstream(tls="starttls")
    relay = await relay_factory(
        routes=[smtp_route("out", upstream, tls_certs.ca_file)],
        subprocess=True,
        allowed_networks=["127.0.0.0/8"],
    )
    assert relay.process is not None
    # A session in the middle of DATA when SIGTERM arrives ...
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    await reader.readline()
    writer.write(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
    await reader.readuntil(b"354 ")
    await reader.readline()
    writer.write(message(1)[:40])
    await writer.drain()
    # ... and an idle one.
    idle = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_port, start_tls=False)
    await idle.connect()
    relay.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    # A new session is told to go away.
    r2, w2 = await asyncio.open_connection("127.0.0.1", relay.smtp_port)
    assert (await asyncio.wait_for(r2.readline(), 5)).startswith(b"421 ")
    w2.close()
    # The idle session was closed with 421.
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await idle.noop()
    # The transaction in flight completes and is accepted.
    writer.write(message(1)[40:] + b".\r\nQUIT\r\n")
    rest = await asyncio.wait_for(reader.read(), 10)
    assert b"250 2.0.0 Ok: queued as" in rest
    writer.close()
    assert await asyncio.to_thread(relay.process.wait, 20) == 0
    # Delivered within the grace period, or still spooled: never lost.
    delivered = upstream.message_ids()
    spooled = {e.message_id for e in SpoolAdmin(relay.spool_dir).list_queue()}
    assert "<msg-1@example.com>" in delivered | spooled
    assert "Stopped the relay" in relay.log()


@pytest.mark.parametrize(
    ("argv", "action", "extra"),
    [
        (["--config", "r.yaml"], "run", {}),
        (["--config", "r.yaml", "--check-config"], "check-config", {}),
        (["--config", "r.yaml", "queue", "list"], "queue", {"queue_action": "list"}),
        (["queue", "--spool-dir", "/s", "show", "ABC"], "queue", {"queue_id": "ABC"}),
        (["queue", "--spool-dir", "/s", "retry", "--all"], "queue", {"all": True}),
        (["queue", "--spool-dir", "/s", "delete", "A", "B"], "queue", {"queue_ids": ["A", "B"]}),
        (["queue", "--spool-dir", "/s", "dead", "retry", "A"], "queue", {"dead_action": "retry"}),
    ],
)
def test_parse_args(argv: list[str], action: str, extra: dict[str, Any]) -> None:
    command = parse_args(argv)
    assert command.action == action
    for key, value in extra.items():
        assert getattr(command.queue, key) == value


@pytest.mark.parametrize(
    "argv", [[], ["--check-config"], ["queue", "list"], ["queue", "--spool-dir", "/s"], ["bogus"]]
)
def test_parse_args_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2


@pytest.mark.slow
async def test_worker_processes_share_port_and_spool(
    relay_factory: RelayFactory, recording_upstream: Any, tls_certs: TlsCerts
) -> None:
    upstream: RecordingUpstream = recording_upstream(tls="starttls")
    relay = await relay_factory(
        routes=[smtp_route("out", upstream, tls_certs.ca_file)],
        subprocess=True,
        allowed_networks=["127.0.0.0/8"],
        listener={"workers": 2},
    )
    assert relay.process is not None
    for port in (relay.health_port, relay.health_port + 1):  # worker N: metrics.port + N
        for _ in range(100):
            try:
                if (await http_get("127.0.0.1", port, "/readyz"))[0] == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"worker on metrics port {port} never became ready")

    async def one(n: int) -> None:
        async with relay.client(starttls=False) as smtp:
            await smtp.sendmail("a@example.com", ["b@dest.test"], message(n))

    await asyncio.gather(*(one(n) for n in range(30)))
    await upstream.wait_for(30)
    assert upstream.message_ids() == {f"<msg-{n}@example.com>" for n in range(30)}
    accepted = []
    for port in (relay.health_port, relay.health_port + 1):
        _, body = await http_get("127.0.0.1", port, "/metrics")
        line = next(
            x for x in body.splitlines() if x.startswith(b"mailrelay_messages_accepted_total")
        )
        accepted.append(float(line.split()[1]))
    assert sum(accepted) == 30
    relay.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(relay.process.wait, 30) == 0


def test_json_log_lines_carry_structured_fields() -> None:
    import json  # noqa: PLC0415
    import logging  # noqa: PLC0415

    from mailrelay.relay.logging import JsonFormatter  # noqa: PLC0415

    record = logging.LogRecord(
        "mailrelay.relay.server", logging.INFO, __file__, 1, "Accepted message %s", ("Q1",), None
    )
    record.queue_id = "Q1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "Accepted message Q1"
    assert line["queue_id"] == "Q1"
    assert line["level"] == "info" and line["logger"] == "mailrelay.relay.server"


def _children(pid: int) -> list[int]:
    raw = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in raw.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
async def test_workers_live_and_die_together(relay_factory: RelayFactory) -> None:
    route = {"name": "r", "upstream": {"type": "smtp", "name": "u", "host": "127.0.0.1", "port": 9}}
    relay = await relay_factory(
        routes=[route], subprocess=True, allowed_networks=["127.0.0.0/8"], listener={"workers": 2}
    )
    assert relay.process is not None
    [worker] = _children(relay.process.pid)
    os.kill(worker, signal.SIGKILL)  # a worker crashes: worker 0 stops and reports it
    assert await asyncio.to_thread(relay.process.wait, 30) == 1
    assert "exited unexpectedly" in relay.log()
    # And when worker 0 is killed outright, its workers do not linger on the port.
    relay2 = await relay_factory(
        routes=[route], subprocess=True, allowed_networks=["127.0.0.0/8"], listener={"workers": 2}
    )
    assert relay2.process is not None
    [worker] = _children(relay2.process.pid)
    relay2.kill()
    for _ in range(100):
        if not _alive(worker):
            break
        await asyncio.sleep(0.1)
    assert not _alive(worker), relay2.log()
