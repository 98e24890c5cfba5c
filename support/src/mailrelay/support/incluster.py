"""The user's path on a real cluster, shared by `make demo` and the tests in tests/cluster.

- `install_operator`: `helm install` of charts/mailrelay with the locally built image.
- `upstream_manifests`: the in-cluster upstreams (image mailrelay-peers, see hack/peers.py):
  an SMTP server with STARTTLS and AUTH, and the Mailgun-compatible API, with Services.
- `relay_manifests`: Secrets (TLS, users, upstream credentials), a MailRelay with STARTTLS on
  587, implicit TLS on 465 and AUTH, and one MailRoute per upstream.
- `send_from_pod`: a client pod that sends mail over STARTTLS and AUTH to the relay Service
  by its DNS name, the way an app in the cluster does.
- `received`: what an upstream pod accepted (its `/_received` endpoint, read from the node);
  `received_ids`: the Message-IDs the SMTP upstream accepted (duplicates kept);
  `set_upstream`: stop or start the SMTP upstream's listener (an upstream that is down).
- `send_to_pod`: many messages in one session from the node straight to one relay pod, to put
  mail on a chosen pod's spool.

Manifest builders are pure; the rest runs kubectl/helm through `LocalNode`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import smtplib
import ssl
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import bcrypt
import trustme
import yaml

from mailrelay.operator.settings import WATCH_LABEL
from mailrelay.support.localkube import REPO_ROOT
from mailrelay.support.localnode import CLUSTER_DOMAIN, LocalNode

CHART = REPO_ROOT / "charts" / "mailrelay"
OPERATOR_NAMESPACE = "mailrelay-system"
RELEASE = "mailrelay"
RELAY = "outbound"
CLIENT_USER = "app"
CLIENT_PASSWORD = "demo-password-123"
UPSTREAM_USER = "relay"
UPSTREAM_PASSWORD = "upstream-password-456"
MAILGUN_API_KEY = "test-key-0123456789"  # tests/providers/servers.py API_KEY
MAILGUN_DOMAIN = "mg.example.com"  # tests/providers/servers.py MAILGUN_DOMAIN
SMTP_PORT, CONTROL_PORT, HTTP_PORT = 2525, 8025, 8080


def service_host(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _secret(name: str, data: dict[str, str], type_: str = "Opaque") -> dict[str, Any]:
    """A Secret the operator sees: it watches only Secrets carrying its watch label."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": {WATCH_LABEL: "true"}},
        "type": type_,
        "data": {k: b64(v) for k, v in data.items()},
    }


def _tls_secret(name: str, cert: trustme.LeafCert) -> dict[str, Any]:
    return _secret(
        name,
        {
            "tls.crt": cert.cert_chain_pems[0].bytes().decode(),
            "tls.key": cert.private_key_pem.bytes().decode(),
        },
        "kubernetes.io/tls",
    )


POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def _upstream(name: str, mode: str, image: str, ports: dict[str, int]) -> list[dict[str, Any]]:
    labels = {"app": name}
    env = [
        {"name": "SMTP_USERNAME", "value": UPSTREAM_USER},
        {"name": "SMTP_PASSWORD", "value": UPSTREAM_PASSWORD},
        {"name": "TLS_CERT", "value": "/tls/tls.crt"},
        {"name": "TLS_KEY", "value": "/tls/tls.key"},
    ]
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": [mode],
        "env": env,
        "ports": [{"name": k, "containerPort": v} for k, v in ports.items()],
        "readinessProbe": {"tcpSocket": {"port": CONTROL_PORT}, "periodSeconds": 1},
        "securityContext": CONTAINER_SECURITY,
    }
    pod: dict[str, Any] = {
        "securityContext": POD_SECURITY,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "containers": [container],
    }
    if mode == "smtp":
        container["volumeMounts"] = [{"name": "tls", "mountPath": "/tls", "readOnly": True}]
        pod["volumes"] = [{"name": "tls", "secret": {"secretName": f"{name}-tls"}}]
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": pod},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "selector": labels,
                "ipFamilyPolicy": "PreferDualStack",
                "ports": [{"name": k, "port": v, "targetPort": k} for k, v in ports.items()],
            },
        },
    ]


def upstream_manifests(ca: trustme.CA, namespace: str, image: str) -> list[dict[str, Any]]:
    """The SMTP upstream (STARTTLS + AUTH, its certificate from `ca`) and the Mailgun API."""
    smtp_cert = ca.issue_cert(service_host("smtp-upstream", namespace))
    return [
        _tls_secret("smtp-upstream-tls", smtp_cert),
        *_upstream("smtp-upstream", "smtp", image, {"smtp": SMTP_PORT, "control": CONTROL_PORT}),
        *_upstream("mailgun", "mailgun", image, {"http": HTTP_PORT, "control": CONTROL_PORT}),
    ]


def users_yaml(domains: list[str]) -> str:
    password_hash = bcrypt.hashpw(CLIENT_PASSWORD.encode(), bcrypt.gensalt(rounds=6)).decode()
    return yaml.safe_dump(
        {
            "users": [
                {
                    "username": CLIENT_USER,
                    "password_hash": password_hash,
                    "allowed_sender_domains": domains,
                }
            ]
        }
    )


def relay_manifests(
    ca: trustme.CA, namespace: str, *, replicas: int = 1, name: str = RELAY
) -> list[dict[str, Any]]:
    """Secrets, a MailRelay (STARTTLS 587, implicit TLS 465, AUTH), a route per upstream."""
    relay_cert = ca.issue_cert(service_host(name, namespace), f"{name}.example.test")
    return [
        _tls_secret(f"{name}-tls", relay_cert),
        _secret(
            f"{name}-users", {"users.yaml": users_yaml(["billing.demo.test", "news.demo.test"])}
        ),
        _secret("smarthost", {"username": UPSTREAM_USER, "password": UPSTREAM_PASSWORD}),
        _secret("smarthost-ca", {"ca.crt": ca.cert_pem.bytes().decode()}),
        _secret("mailgun", {"apiKey": MAILGUN_API_KEY}),
        {
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": "MailRelay",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "listener": {
                    "port": 587,
                    "implicitTlsPort": 465,
                    "tls": {"secretName": f"{name}-tls"},
                },
                "auth": {
                    "required": True,
                    "usersSecretRef": {"name": f"{name}-users", "key": "users.yaml"},
                },
                "queue": {
                    "size": "100Mi",
                    "retry": {"initialBackoff": "1s", "maxBackoff": "5s", "maxAge": "1h"},
                },
                "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
            },
        },
        {
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": "MailRoute",
            "metadata": {"name": f"{name}-billing-smtp"},
            "spec": {
                "relayRef": {"name": name},
                "priority": 200,
                "match": {"senderDomains": ["billing.demo.test"]},
                "upstream": {
                    "smtp": {
                        "host": service_host("smtp-upstream", namespace),
                        "port": SMTP_PORT,
                        "tls": "starttls",
                        "credentialsSecretRef": {"name": "smarthost"},
                        "caSecretRef": {"name": "smarthost-ca"},
                    }
                },
            },
        },
        {
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": "MailRoute",
            "metadata": {"name": f"{name}-news-mailgun"},
            "spec": {
                "relayRef": {"name": name},
                "priority": 150,
                "match": {"senderDomains": ["news.demo.test"]},
                "upstream": {
                    "api": {
                        "provider": "mailgun",
                        "domain": MAILGUN_DOMAIN,
                        "endpoint": f"http://{service_host('mailgun', namespace)}:{HTTP_PORT}",
                        "credentialsSecretRef": {"name": "mailgun"},
                    }
                },
            },
        },
    ]


def yaml_stream(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


# --- operations on a running node --------------------------------------------------------------


def install_operator(node: LocalNode, *, extra: tuple[str, ...] = ()) -> str:
    """`helm install` the chart with the locally built image; returns helm's output."""
    assert node.images is not None
    repository, tag = node.images.project.rsplit(":", 1)
    result = node.helm(
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        "--set",
        f"image.repository={repository}",
        "--set",
        f"image.tag={tag}",
        "--set",
        "operator.resyncSeconds=5",
        "--wait",
        "--timeout=180s",
        *extra,
    )
    return result.stdout


@dataclass
class SendResult:
    """The client pod's log: one line per message with the relay's reply."""

    log: str
    ok: bool


CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, base64, json, os, ssl, sys
    from email.message import EmailMessage
    import aiosmtplib

    async def main():
        context = ssl.create_default_context(cafile="/ca/ca.crt")
        plan = json.loads(os.environ["MESSAGES"])
        port = int(os.environ.get("PORT", "587"))
        implicit = port == int(os.environ.get("IMPLICIT_PORT", "465"))
        ok = True
        for item in plan:
            try:
                async with aiosmtplib.SMTP(
                    hostname=os.environ["RELAY_HOST"], port=port, use_tls=implicit,
                    start_tls=not implicit, tls_context=context, timeout=30,
                ) as client:
                    await client.login(os.environ["SMTP_USER"], os.environ["SMTP_PASSWORD"])
                    if "raw" in item:  # exact bytes, for byte-exact checks
                        errors, reply = await client.sendmail(
                            item["from"], [item["to"]], base64.b64decode(item["raw"])
                        )
                    else:
                        message = EmailMessage()
                        message["From"] = item["from"]
                        message["To"] = item["to"]
                        message["Subject"] = item["subject"]
                        message["Message-ID"] = item["message_id"]
                        message.set_content(item.get("body", "Hello from a pod\\n"))
                        errors, reply = await client.send_message(message)
                print(f"sent {item['subject']!r}: {reply}", flush=True)
            except Exception as error:
                ok = False
                print(f"FAILED {item['subject']!r}: {error!r}", flush=True)
        sys.exit(0 if ok else 1)

    asyncio.run(main())
    """
)


LOAD_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, ssl, time
    from email.message import EmailMessage
    import aiosmtplib

    async def main():
        context = ssl.create_default_context(cafile="/ca/ca.crt")
        count, sender = int(os.environ["COUNT"]), os.environ["SENDER"]
        interval = float(os.environ.get("INTERVAL", "0.2"))
        sent = 0
        while sent < count:
            message = EmailMessage()
            message["From"] = sender
            message["To"] = "load@example.org"
            message["Subject"] = f"load {sent}"
            message["Message-ID"] = f"<load-{sent}@{sender.split('@')[1]}>"
            message.set_content(f"load message {sent}\\n")
            try:
                async with aiosmtplib.SMTP(
                    hostname=os.environ["RELAY_HOST"], port=587, start_tls=True,
                    tls_context=context, timeout=10,
                ) as client:
                    await client.login(os.environ["SMTP_USER"], os.environ["SMTP_PASSWORD"])
                    await client.send_message(message)
                print(f"OK {message['Message-ID']}", flush=True)
                sent += 1
            except Exception as error:
                print(f"RETRY {message['Message-ID']}: {error!r}", flush=True)
                await asyncio.sleep(0.5)
            await asyncio.sleep(interval)
        print("DONE", flush=True)

    asyncio.run(main())
    """
)


def load_pod(
    name: str, image: str, relay_host: str, *, count: int, sender: str, interval: float = 0.2
) -> list[dict[str, Any]]:
    """A pod that sends `count` numbered messages, retrying until each gets a 250; it prints
    `OK <Message-ID>` for every 250."""
    objects = client_pod(name, image, relay_host, [])
    objects[0]["data"] = {"send.py": LOAD_SCRIPT}
    env = objects[1]["spec"]["containers"][0]["env"]
    env += [
        {"name": "COUNT", "value": str(count)},
        {"name": "SENDER", "value": sender},
        {"name": "INTERVAL", "value": str(interval)},
    ]
    return objects


def accepted_ids(log: str) -> list[str]:
    """Message-IDs the relay answered 250 for, from a load pod's log."""
    return [line.split(" ", 1)[1] for line in log.splitlines() if line.startswith("OK ")]


def client_pod(
    name: str, image: str, relay_host: str, messages: list[dict[str, str]], port: int = 587
) -> list[dict[str, Any]]:
    """A one-shot pod (and the CA it trusts) that sends `messages` through the relay."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-script"},
            "data": {"send.py": CLIENT_SCRIPT},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "mail-client"}},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": POD_SECURITY,
                "automountServiceAccountToken": False,
                "containers": [
                    {
                        "name": "client",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["python", "/script/send.py"],
                        "env": [
                            {"name": "RELAY_HOST", "value": relay_host},
                            {"name": "PORT", "value": str(port)},
                            {"name": "SMTP_USER", "value": CLIENT_USER},
                            {"name": "SMTP_PASSWORD", "value": CLIENT_PASSWORD},
                            {"name": "MESSAGES", "value": json.dumps(messages)},
                        ],
                        "securityContext": CONTAINER_SECURITY,
                        "volumeMounts": [
                            {"name": "script", "mountPath": "/script"},
                            {"name": "ca", "mountPath": "/ca"},
                        ],
                    }
                ],
                "volumes": [
                    {"name": "script", "configMap": {"name": f"{name}-script"}},
                    {"name": "ca", "secret": {"secretName": "smarthost-ca"}},
                ],
            },
        },
    ]


def send_from_pod(
    node: LocalNode,
    namespace: str,
    messages: list[dict[str, str]],
    *,
    name: str = "mail-client",
    relay: str = RELAY,
    port: int = 587,
    timeout: float = 120,
) -> SendResult:
    """Run a client pod to completion and return its log."""
    assert node.images is not None
    objects = client_pod(name, node.images.project, service_host(relay, namespace), messages, port)
    node.kubectl("apply", "-n", namespace, "-f", "-", input=yaml_stream(objects))
    deadline = time.monotonic() + timeout
    phase = ""
    while time.monotonic() < deadline:
        phase = node.kubectl(
            "get", "pod", name, "-n", namespace, "-o", "jsonpath={.status.phase}"
        ).stdout
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(0.5)
    log = node.kubectl("logs", name, "-n", namespace, check=False).stdout
    node.kubectl("delete", "pod", name, "-n", namespace, "--wait=false", check=False)
    return SendResult(log=log, ok=phase == "Succeeded")


def pod_ip(node: LocalNode, namespace: str, selector: str) -> str:
    return node.kubectl(
        "get", "pods", "-n", namespace, "-l", selector, "-o", "jsonpath={.items[0].status.podIP}"
    ).stdout.strip()


def received(node: LocalNode, namespace: str, upstream: str) -> list[dict[str, Any]]:
    """What the upstream pod accepted, read from its control port (the node reaches pods)."""
    ip = pod_ip(node, namespace, f"app={upstream}")
    host = f"[{ip}]" if ":" in ip else ip
    with urllib.request.urlopen(f"http://{host}:{CONTROL_PORT}/_received", timeout=5) as answer:
        data: list[dict[str, Any]] = json.loads(answer.read())
    return data


def _control_url(node: LocalNode, namespace: str, upstream: str, path: str) -> str:
    ip = pod_ip(node, namespace, f"app={upstream}")
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{CONTROL_PORT}{path}"


def received_ids(node: LocalNode, namespace: str, upstream: str = "smtp-upstream") -> list[str]:
    """The Message-ID of every message the SMTP upstream pod accepted, duplicates included."""
    url = _control_url(node, namespace, upstream, "/_ids")
    with urllib.request.urlopen(url, timeout=30) as answer:
        ids: list[str] = json.loads(answer.read())
    return ids


def set_upstream(
    node: LocalNode, namespace: str, *, up: bool, upstream: str = "smtp-upstream"
) -> None:
    """Open (`up`) or close the SMTP upstream's listener; what it received stays recorded."""
    url = _control_url(node, namespace, upstream, "/_up" if up else "/_down")
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        answer.read()


def message_bytes(message_id: str, sender: str, size: int) -> bytes:
    """A plain message of about `size` bytes with the given Message-ID."""
    head = (
        f"From: {sender}\r\nTo: load@example.org\r\nSubject: {message_id}\r\n"
        f"Message-ID: {message_id}\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines


def send_to_pod(
    address: str,
    ca_file: str,
    ids: list[str],
    *,
    sender: str = "billing@billing.demo.test",
    size: int = 512,
    timeout: float = 30,
) -> list[str]:
    """Send one message per id to the relay pod at `address` (port 587, STARTTLS + AUTH),
    reconnecting after a failure; return the ids the relay answered 250 for.

    Blocking (smtplib): for tests and bench scripts, never for the relay or the operator.
    """
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False  # the pod is dialled by address, the chain is verified
    accepted: list[str] = []
    pending = list(ids)
    client: smtplib.SMTP | None = None
    failures = 0
    while pending:
        try:
            if client is None:
                client = smtplib.SMTP(address, 587, timeout=timeout)
                client.starttls(context=context)
                client.login(CLIENT_USER, CLIENT_PASSWORD)
            client.sendmail(sender, ["load@example.org"], message_bytes(pending[0], sender, size))
        except (OSError, smtplib.SMTPException) as error:
            failures += 1
            if failures > 20:
                raise RuntimeError(f"could not send to {address}: {error!r}") from error
            if client is not None:
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    client.close()
            client = None
            time.sleep(0.5)
            continue
        accepted.append(pending.pop(0))
    if client is not None:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            client.quit()
    return accepted


def metric_samples(url: str) -> dict[str, float]:
    """A Prometheus text page as `{'name{labels}': value}`."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def metric_value(address: str, name: str, port: int = 9090, **labels: str) -> float:
    """The sum of the samples of `name` on a pod's metrics page whose labels include `labels`:
    0 when there is none, NaN when the page cannot be read (the pod is gone)."""
    host = f"[{address}]" if ":" in address else address
    try:
        samples = metric_samples(f"http://{host}:{port}/metrics")
    except OSError:
        return float("nan")
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def relay_metrics(node: LocalNode, namespace: str, relay: str = RELAY) -> dict[str, float]:
    ip = pod_ip(node, namespace, f"app.kubernetes.io/instance={relay}")
    return metric_samples(f"http://{ip}:9090/metrics")


def wait_rollout(node: LocalNode, namespace: str, kind_name: str, timeout: int = 180) -> None:
    node.kubectl("rollout", "status", "-n", namespace, kind_name, f"--timeout={timeout}s")
