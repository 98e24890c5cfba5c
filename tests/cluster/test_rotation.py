"""Secret changes reach the running relay pod without a restart (kubelet updates the mounted
files, the relay's hot reload picks them up)."""

from __future__ import annotations

import json
import smtplib
import ssl
import time
from collections.abc import Callable
from typing import Any

import bcrypt
import pytest
import trustme
import yaml
from cryptography import x509

from mailrelay.support import incluster
from mailrelay.support.localnode import NODE_IP, LocalNode
from tests.cluster.conftest import apply_relay

pytestmark = [pytest.mark.node, pytest.mark.slow]

NEW_PASSWORD = "rotated-password-789"


def _pod(node: LocalNode, namespace: str) -> dict[str, Any]:
    pod: dict[str, Any] = json.loads(
        node.kubectl("get", "pod", f"{incluster.RELAY}-0", "-n", namespace, "-o", "json").stdout
    )
    return pod


def _session(address: str) -> tuple[smtplib.SMTP, bytes]:
    """STARTTLS to the pod; the certificate is returned, not verified (it is being rotated)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client = smtplib.SMTP(address, 587, timeout=10)
    client.starttls(context=context)
    assert isinstance(client.sock, ssl.SSLSocket)
    return client, client.sock.getpeercert(binary_form=True) or b""


def _login_works(address: str, password: str) -> bool:
    client, _ = _session(address)
    try:
        client.login(incluster.CLIENT_USER, password)
    except smtplib.SMTPAuthenticationError:
        return False
    finally:
        client.close()
    return True


def _issuer(address: str) -> str:
    client, der = _session(address)
    client.close()
    return x509.load_der_x509_certificate(der).issuer.rfc4514_string()


def _wait(what: str, probe: Callable[[], bool], within: float = 150) -> float:
    began = time.monotonic()
    while time.monotonic() - began < within:
        if probe():
            return time.monotonic() - began
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {within:.0f}s")


def test_users_and_tls_secret_changes_reach_the_pod_without_a_restart(
    node: LocalNode, operator_release: str, node_namespace: str, upstreams: trustme.CA
) -> None:
    # The probes below try the new password until it works: from the node's address (where
    # the test connects from) those failures would reach the per-client AUTH limit.
    apply_relay(node, node_namespace, upstreams, exempt_networks=[f"{NODE_IP}/32"])
    before = _pod(node, node_namespace)
    address = before["status"]["podIP"]
    assert _login_works(address, incluster.CLIENT_PASSWORD)

    data = yaml.safe_load(incluster.users_yaml(["billing.demo.test", "news.demo.test"]))
    data["users"][0]["password_hash"] = bcrypt.hashpw(
        NEW_PASSWORD.encode(), bcrypt.gensalt(rounds=6)
    ).decode()
    patch = {"data": {"users.yaml": incluster.b64(yaml.safe_dump(data))}}
    node.kubectl(
        "patch", "secret", f"{incluster.RELAY}-users", "-n", node_namespace, "--type=merge",
        "-p", json.dumps(patch),
    )  # fmt: skip
    users_seconds = _wait("the new password", lambda: _login_works(address, NEW_PASSWORD))
    assert not _login_works(address, incluster.CLIENT_PASSWORD)

    new_ca = trustme.CA()
    old_issuer = _issuer(address)
    cert = new_ca.issue_cert(incluster.service_host(incluster.RELAY, node_namespace))
    tls = {
        "tls.crt": incluster.b64(cert.cert_chain_pems[0].bytes().decode()),
        "tls.key": incluster.b64(cert.private_key_pem.bytes().decode()),
    }
    node.kubectl(
        "patch", "secret", f"{incluster.RELAY}-tls", "-n", node_namespace, "--type=merge",
        "-p", json.dumps({"data": tls}),
    )  # fmt: skip
    tls_seconds = _wait("the new certificate", lambda: _issuer(address) != old_issuer)

    after = _pod(node, node_namespace)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    restarts = after["status"]["containerStatuses"][0]["restartCount"]
    assert restarts == 0
    print(f"users Secret -> in force: {users_seconds:.1f}s; TLS Secret: {tls_seconds:.1f}s")
