"""Hot reload: config and referenced files, Kubernetes `..data` swaps, invalid configs,
and reloads during traffic that drop neither sessions nor queued mail."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml

from mailrelay.relay.auth import hash_password
from mailrelay.support.smtp_peers import RecordingUpstream, TlsCerts
from tests.relay.conftest import USERS, RelayFactory, RelayHandle, smtp_route

ALICE = ("alice", USERS["alice"])


def dead_route(name: str, domains: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"recipient_domains": domains},
        "upstream": {"type": "smtp", "name": f"{name}-up", "host": "127.0.0.1", "port": 9},
    }


def msg(n: int) -> bytes:
    return b"Subject: %d\r\nMessage-ID: <reload-%d@example.com>\r\n\r\nbody\r\n" % (n, n)


async def wait_reloads(relay: RelayHandle, result: str, count: int) -> None:
    for _ in range(100):
        if relay.metric("mailrelay_config_reloads_total", {"result": result}) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {result} reload #{count}")


def current(relay: RelayHandle) -> dict[str, Any]:
    data = yaml.safe_load(relay.config_path.read_text())
    assert isinstance(data, dict)
    return data


async def rcpt_code(smtp: aiosmtplib.SMTP, rcpt: str) -> int:
    await smtp.execute_command(b"RSET")
    await smtp.execute_command(b"MAIL FROM:<a@example.com>")
    return (await smtp.execute_command(f"RCPT TO:<{rcpt}>".encode())).code


async def test_new_route_applies_to_an_open_session(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(routes=[dead_route("one", ["one.test"])], enable_delivery=False)
    async with relay.client(login=ALICE) as smtp:
        assert await rcpt_code(smtp, "x@two.test") == 550
        data = current(relay)
        data["routes"].append(dead_route("two", ["two.test"]))
        relay.write_config(data)
        await wait_reloads(relay, "success", 1)
        assert await rcpt_code(smtp, "x@two.test") == 250  # same session, new route
        assert await rcpt_code(smtp, "x@one.test") == 250


async def test_invalid_config_is_refused_and_the_old_one_stays(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(routes=[dead_route("one", ["one.test"])], enable_delivery=False)
    good = relay.config_path.read_text()
    relay.config_path.write_text(good + "limits: {max_recipients: -5}\n")
    await wait_reloads(relay, "failure", 1)
    assert relay.metric("mailrelay_config_last_reload_successful") == 0
    relay.config_path.write_text("routes: [unclosed\n")
    await wait_reloads(relay, "failure", 2)
    async with relay.client(login=ALICE) as smtp:
        assert await rcpt_code(smtp, "x@one.test") == 250
    # A users file that does not parse is refused as a whole too.
    data = yaml.safe_load(good)
    bad_users = relay.config_path.parent / "bad-users.yaml"
    bad_users.write_text("users: [{username: x, password_hash: plain}]\n")
    data["auth"]["users_file"] = str(bad_users)
    relay.write_config(data)
    await wait_reloads(relay, "failure", 3)
    async with relay.client(login=ALICE) as smtp:
        assert await rcpt_code(smtp, "x@one.test") == 250
    # Fixing the file is picked up.
    relay.config_path.write_text(good + "limits: {max_recipients: 1}\n")
    await wait_reloads(relay, "success", 1)
    assert relay.metric("mailrelay_config_last_reload_successful") == 1
    assert relay.app is not None and relay.app.config.limits.max_recipients == 1


def project(volume: Path, files: dict[str, bytes]) -> None:
    """Update a directory the way the kubelet updates a ConfigMap/Secret volume."""
    stamp = volume / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir(parents=True)
    for name, content in files.items():
        (stamp / name).write_bytes(content)
    link = volume / "..data_tmp"
    os.symlink(stamp.name, link)
    old = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    os.replace(link, volume / "..data")
    for name in files:
        if not (volume / name).is_symlink():
            os.symlink(f"..data/{name}", volume / name)
    if old is not None:
        for child in (volume / old).iterdir():
            child.unlink()
        (volume / old).rmdir()


async def test_kubernetes_symlink_swaps_reload_config_and_users(
    relay_factory: RelayFactory, tls_certs: TlsCerts, users_file: Path, tmp_path: Path
) -> None:
    relay = await relay_factory(
        routes=[dead_route("one", ["one.test"])], enable_delivery=False, start=False
    )
    config_volume, secret_volume = tmp_path / "config", tmp_path / "secret"
    data = current(relay)
    data["auth"]["users_file"] = str(secret_volume / "users.yaml")
    users_yaml = await asyncio.to_thread(users_file.read_bytes)
    project(secret_volume, {"users.yaml": users_yaml})
    project(config_volume, {"relay.yaml": yaml.safe_dump(data).encode()})
    relay = await relay_factory(
        routes=[dead_route("one", ["one.test"])],
        enable_delivery=False,
        start=False,
        spool_dir=str(relay.spool_dir),
    )
    # Run from the projected file, as the pod does.
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from mailrelay.relay.config import load_config  # noqa: PLC0415
    from mailrelay.relay.main import RelayApp  # noqa: PLC0415

    registry = CollectorRegistry()
    app = RelayApp(
        load_config(config_volume / "relay.yaml"),
        config_path=config_volume / "relay.yaml",
        registry=registry,
        enable_delivery=False,
        reload_interval=0.1,
    )
    await app.start()
    relay.app, relay.registry, relay.smtp_port = app, registry, app.smtp_port
    try:
        carol = ("carol", "carol-secret")
        async with relay.client() as smtp:
            failed = False
            try:
                await smtp.auth_plain(*carol)
            except aiosmtplib.SMTPAuthenticationError:
                failed = True
            assert failed
        users = yaml.safe_load(users_yaml)
        users["users"].append({"username": "carol", "password_hash": hash_password(carol[1])})
        project(secret_volume, {"users.yaml": yaml.safe_dump(users).encode()})
        await wait_reloads(relay, "success", 1)
        async with relay.client(login=carol) as smtp:
            assert await rcpt_code(smtp, "x@one.test") == 250
            assert await rcpt_code(smtp, "x@two.test") == 550
        data["routes"].append(dead_route("two", ["two.test"]))
        project(config_volume, {"relay.yaml": yaml.safe_dump(data).encode()})
        await wait_reloads(relay, "success", 2)
        async with relay.client(login=carol) as smtp:
            assert await rcpt_code(smtp, "x@two.test") == 250
    finally:
        await app.stop()
        relay.app = None


async def peer_certificate_serial(relay: RelayHandle, ca_file: Path) -> int:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_port, start_tls=False)
    await smtp.connect()
    try:
        await smtp.starttls(tls_context=ssl.create_default_context(cafile=str(ca_file)))
        ssl_object = smtp.get_transport_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
    finally:
        smtp.close()
    from cryptography import x509  # noqa: PLC0415

    return int(x509.load_der_x509_certificate(der).serial_number)


async def test_certificate_rotation_applies_to_new_sessions(
    relay_factory: RelayFactory, tls_certs: TlsCerts, tmp_path: Path
) -> None:
    cert, key = tls_certs.issue(tmp_path, "first")
    relay = await relay_factory(
        routes=[dead_route("one", ["one.test"])],
        enable_delivery=False,
        listener={"tls": {"cert_file": str(cert), "key_file": str(key)}, "implicit_tls_port": 0},
    )
    before = await peer_certificate_serial(relay, tls_certs.ca_file)
    async with relay.client(login=ALICE) as open_session:
        new_cert, new_key = tls_certs.issue(tmp_path, "second")
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        await wait_reloads(relay, "success", 1)
        assert await rcpt_code(open_session, "x@one.test") == 250  # the old session lives on
    after = await peer_certificate_serial(relay, tls_certs.ca_file)
    assert before != after
    async with relay.client(implicit=True, login=ALICE) as smtp:
        assert await rcpt_code(smtp, "x@one.test") == 250


async def test_reload_during_traffic_loses_nothing(
    relay_factory: RelayFactory, recording_upstream: Any, tls_certs: TlsCerts
) -> None:
    upstream: RecordingUpstream = recording_upstream(tls="starttls")
    routes = [smtp_route("out", upstream, tls_certs.ca_file)]
    relay = await relay_factory(routes=routes)
    sent: list[int] = []

    async def client(offset: int) -> None:
        async with relay.client(login=ALICE) as smtp:
            for n in range(offset, offset + 15):
                errors, reply = await smtp.sendmail("a@example.com", ["b@dest.test"], msg(n))
                assert errors == {} and "queued as" in reply
                sent.append(n)
                await asyncio.sleep(0.01)

    async def reloader() -> None:
        for i in range(5):
            data = current(relay)
            data["limits"] = {"max_recipients": 50 + i}
            data["routes"] = [*routes, dead_route(f"extra{i}", [f"extra{i}.test"])]
            relay.write_config(data)
            await wait_reloads(relay, "success", i + 1)

    await asyncio.gather(client(0), client(100), client(200), reloader())
    assert len(sent) == 45
    await upstream.wait_for(45)
    assert upstream.message_ids() == {f"<reload-{n}@example.com>" for n in sent}
    assert relay.metric("mailrelay_config_reloads_total", {"result": "success"}) == 5
