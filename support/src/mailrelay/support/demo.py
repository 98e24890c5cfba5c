"""The operator on a bare control plane, and `make demo`'s entry point.

`make demo` runs the real single-node cluster flow of clusterdemo.py (`main` below).
`run_demo` is the older, faster flow without a node, kept as an end-to-end test of the
operator against a bare API server:

1. Start a real local control plane (etcd + kube-apiserver) and install the CRDs.
2. Run the operator (`python -m mailrelay.operator`) as a user that holds exactly the RBAC
   rules of `operator/rbac.py`, with kopf peering.
3. Start local upstreams on 127.0.0.1: an aiosmtpd SMTP server (STARTTLS + AUTH) and the
   Mailgun-compatible server from the providers tests (`mailrelay.support.provider_servers`).
4. Apply a MailRelay with TLS and AUTH and one MailRoute per upstream, plus their Secrets.
5. Run the relay as its pod would: a local process reading exactly the ConfigMap and Secrets
   the operator's StatefulSet mounts, written in kubelet's layout (`..data` symlinks). The
   only change: the absolute mount paths are placed under a temporary root, and listeners
   bind 127.0.0.1 instead of 0.0.0.0.
6. Send real mail over STARTTLS with AUTH, show where each message arrived,
   `kubectl get mailrelays,mailroutes`, the relay's key metrics; clean up.

`run_demo` is also the end-to-end test (`tests/operator/test_demo_e2e.py`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import bcrypt
import trustme
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailrelay.operator.settings import WATCH_LABEL
from mailrelay.support import provider_servers
from mailrelay.support.incluster import metric_samples
from mailrelay.support.localkube import REPO_ROOT, LocalKube
from mailrelay.support.ports import free_port

CRD_DIR = REPO_ROOT / "crds"
DEMO_NAMESPACE = "mail"
RELAY = "outbound"
DEMO_USER = "app"
DEMO_PASSWORD = "demo-password-123"
UPSTREAM_USER = "relay"
UPSTREAM_PASSWORD = "upstream-password-456"
MOUNT_ROOTS = ("/etc/mailrelay", "/var/spool/mailrelay")
OPERATOR_USER = "mailrelay-operator"


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def show(text: str) -> None:
    print(text.rstrip(), flush=True)


# --- local upstreams -------------------------------------------------------------------------


@dataclass
class Arrival:
    """One message as an upstream received it."""

    upstream: str
    sender: str
    recipients: list[str]
    subject: str


@dataclass
class SmtpUpstream:
    """An aiosmtpd server with STARTTLS and AUTH that records what it accepts."""

    ca: trustme.CA
    port: int = field(default_factory=free_port)
    arrivals: list[Arrival] = field(default_factory=list)
    controller: Controller | None = None

    def start(self) -> None:
        cert = self.ca.issue_cert("127.0.0.1")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        upstream = self

        class Handler:
            async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
                content = envelope.original_content or b""
                subject = ""
                for line in content.decode(errors="replace").splitlines():
                    if line.lower().startswith("subject:"):
                        subject = line.split(":", 1)[1].strip()
                        break
                upstream.arrivals.append(
                    Arrival(
                        "smtp",
                        str(envelope.mail_from),
                        list(envelope.rcpt_tos),
                        subject,
                    )
                )
                return "250 2.0.0 Accepted by the demo SMTP upstream"

        def authenticator(
            server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
        ) -> AuthResult:
            ok = isinstance(data, LoginPassword) and (
                data.login.decode(),
                data.password.decode(),
            ) == (UPSTREAM_USER, UPSTREAM_PASSWORD)
            return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

        class TlsController(Controller):
            def factory(self) -> SMTP:
                return SMTP(
                    self.handler,
                    hostname="upstream.demo.test",
                    tls_context=context,
                    require_starttls=True,
                    auth_required=True,
                    auth_require_tls=True,
                    authenticator=authenticator,
                )

        self.controller = TlsController(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()


async def start_mailgun() -> Any:
    """The Mailgun stand-in the providers tests use (support package)."""
    return await provider_servers.start_provider_server("mailgun")


def _header(raw: str, name: str) -> str:
    prefix = f"{name.lower()}:"
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in raw.splitlines()
            if line.lower().startswith(prefix)
        ),
        "",
    )


def mailgun_arrivals(server: Any) -> list[Arrival]:
    """What the Mailgun stand-in accepted, read back from the MIME it was given."""
    arrivals = []
    for request in server.sent:
        raw = request.files.get("message", b"").decode(errors="replace")
        arrivals.append(
            Arrival(
                "mailgun",
                _header(raw, "From"),
                list(request.form.get("to", [])),
                _header(raw, "Subject"),
            )
        )
    return arrivals


# --- manifests -------------------------------------------------------------------------------


def _secret(name: str, data: dict[str, str], type_: str = "Opaque") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        # The operator watches only Secrets with this label (docs/operator.md).
        "metadata": {"name": name, "labels": {WATCH_LABEL: "true"}},
        "type": type_,
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


@dataclass
class DemoPorts:
    submission: int = field(default_factory=free_port)
    metrics: int = field(default_factory=free_port)


def manifests(
    ca: trustme.CA,
    ports: DemoPorts,
    smtp: SmtpUpstream,
    mailgun: Any,
) -> list[dict[str, Any]]:
    """Secrets, the MailRelay (TLS + AUTH) and one MailRoute per upstream."""
    relay_cert = ca.issue_cert("relay.demo.test", "127.0.0.1")
    password_hash = bcrypt.hashpw(DEMO_PASSWORD.encode(), bcrypt.gensalt(rounds=6)).decode()
    users = yaml.safe_dump(
        {
            "users": [
                {
                    "username": DEMO_USER,
                    "password_hash": password_hash,
                    "allowed_sender_domains": ["billing.demo.test", "news.demo.test"],
                }
            ]
        }
    )
    objects = [
        _secret(
            "relay-tls",
            {
                "tls.crt": relay_cert.cert_chain_pems[0].bytes().decode(),
                "tls.key": relay_cert.private_key_pem.bytes().decode(),
            },
            "kubernetes.io/tls",
        ),
        _secret("relay-users", {"users.yaml": users}),
        _secret("smarthost", {"username": UPSTREAM_USER, "password": UPSTREAM_PASSWORD}),
        _secret("smarthost-ca", {"ca.crt": ca.cert_pem.bytes().decode()}),
        {
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": "MailRelay",
            "metadata": {"name": RELAY},
            "spec": {
                "replicas": 1,
                "listener": {
                    "port": ports.submission,
                    "hostname": "relay.demo.test",
                    "tls": {"secretName": "relay-tls"},
                },
                "auth": {
                    "required": True,
                    "usersSecretRef": {"name": "relay-users", "key": "users.yaml"},
                },
                "metrics": {"port": ports.metrics},
                "queue": {"retry": {"initialBackoff": "1s", "maxBackoff": "5s", "maxAge": "1h"}},
            },
        },
        {
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": "MailRoute",
            "metadata": {"name": "billing-smtp"},
            "spec": {
                "relayRef": {"name": RELAY},
                "priority": 200,
                "match": {"senderDomains": ["billing.demo.test"]},
                "upstream": {
                    "smtp": {
                        "host": "127.0.0.1",
                        "port": smtp.port,
                        "tls": "starttls",
                        "credentialsSecretRef": {"name": "smarthost"},
                        "caSecretRef": {"name": "smarthost-ca"},
                    }
                },
            },
        },
    ]
    if mailgun is not None:
        objects.insert(0, _secret("mailgun", {"apiKey": provider_servers.API_KEY}))
        objects.append(
            {
                "apiVersion": "mailrelay.dev/v1alpha1",
                "kind": "MailRoute",
                "metadata": {"name": "news-mailgun"},
                "spec": {
                    "relayRef": {"name": RELAY},
                    "priority": 150,
                    "match": {"senderDomains": ["news.demo.test"]},
                    "upstream": {
                        "api": {
                            "provider": "mailgun",
                            "domain": provider_servers.MAILGUN_DOMAIN,
                            "endpoint": mailgun.base_url,
                            # The stand-in listens on loopback, which the relay refuses
                            # for HTTP upstreams unless told otherwise.
                            "insecureAllowLocalEndpoint": True,
                            "credentialsSecretRef": {"name": "mailgun"},
                        }
                    },
                },
            }
        )
    return objects


# --- the relay "pod": kubelet's volume layout ------------------------------------------------


def write_atomic_volume(directory: Path, files: dict[str, bytes], mode: int = 0o644) -> None:
    """Lay files out as kubelet's AtomicWriter does: `..<ts>/` dir, `..data` link, file links."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.") + str(time.monotonic_ns() % 10**9)
    payload = directory / stamp
    for path, content in files.items():
        target = payload / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)
    (directory / "..data").symlink_to(stamp)
    for top in {path.split("/", 1)[0] for path in files}:
        (directory / top).symlink_to(f"..data/{top}")


def _projected(data: dict[str, bytes], items: list[dict[str, str]] | None) -> dict[str, bytes]:
    if not items:
        return dict(data)
    return {item["path"]: data[item["key"]] for item in items}


def materialize_pod(kube: LocalKube, namespace: str, root: Path) -> Path:
    """Write every volume the StatefulSet mounts into the relay container under `root`."""
    sts = json.loads(
        kube.kubectl("get", "statefulset", RELAY, "-n", namespace, "-o", "json").stdout
    )
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {c["metadata"]["name"] for c in sts["spec"].get("volumeClaimTemplates", [])}
    for mount in container["volumeMounts"]:
        target = root / mount["mountPath"].lstrip("/")
        volume = volumes.get(mount["name"])
        if volume is None or "emptyDir" in volume:
            assert volume is not None or mount["name"] in claims
            target.mkdir(parents=True, exist_ok=True)
            continue
        if "configMap" in volume:
            source = volume["configMap"]
            obj = json.loads(
                kube.kubectl(
                    "get", "configmap", source["name"], "-n", namespace, "-o", "json"
                ).stdout
            )
            data = {k: v.encode() for k, v in obj.get("data", {}).items()}
            write_atomic_volume(target, _projected(data, source.get("items")))
        elif "secret" in volume:
            source = volume["secret"]
            obj = json.loads(
                kube.kubectl(
                    "get", "secret", source["secretName"], "-n", namespace, "-o", "json"
                ).stdout
            )
            data = {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}
            write_atomic_volume(target, _projected(data, source.get("items")), 0o440)
    config_path: Path = next(
        root / m["mountPath"].lstrip("/") / "relay.yaml"
        for m in container["volumeMounts"]
        if m["name"] == "config"
    )
    return config_path


def local_config(config_path: Path, root: Path) -> Path:
    """The mounted config with mount paths under `root` and listeners on 127.0.0.1."""
    text = config_path.read_text()
    for prefix in MOUNT_ROOTS:
        text = text.replace(prefix, f"{root}{prefix}")
    data = yaml.safe_load(text)
    data["listener"]["host"] = "127.0.0.1"
    data["metrics"]["host"] = "127.0.0.1"
    local = root / "relay-local.yaml"
    local.write_text(yaml.safe_dump(data, sort_keys=False))
    return local


# --- processes -------------------------------------------------------------------------------


@contextlib.contextmanager
def process(argv: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in its own session, stopped with SIGTERM (then SIGKILL) on exit."""
    with log.open("ab") as output:
        child = subprocess.Popen(
            argv,
            env=env,
            cwd=str(REPO_ROOT),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield child
    finally:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=5)


def http_ok(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
        return bool(response.status == 200)
    return False


async def wait_until(what: str, probe: Any, within: float = 60.0, proc: Any = None) -> Any:
    """Poll `probe` in a thread until it returns something truthy."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        result = await asyncio.to_thread(probe)
        if result:
            return result
        await asyncio.sleep(0.25)
    raise TimeoutError(f"Timed out after {within:.0f}s waiting for {what}")


def condition_status(kube: LocalKube, namespace: str, kind: str, name: str, type_: str) -> str:
    obj = json.loads(kube.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)
    for entry in (obj.get("status") or {}).get("conditions", []):
        if entry["type"] == type_:
            return str(entry["status"])
    return ""


def bind_operator(kube: LocalKube) -> Path:
    """The operator's ClusterRole bound to a client-certificate user; its kubeconfig."""
    from mailrelay.operator import rbac  # noqa: PLC0415

    role = rbac.cluster_role()
    binding = rbac.cluster_role_binding(
        subject={"kind": "User", "name": OPERATOR_USER, "apiGroup": "rbac.authorization.k8s.io"},
        name=f"{rbac.CLUSTER_ROLE_NAME}-{OPERATOR_USER}",
    )
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([role, binding]))
    return kube.kubeconfig_for(OPERATOR_USER)


# --- sending ---------------------------------------------------------------------------------


async def send(ports: DemoPorts, ca: trustme.CA, sender: str, recipient: str, subject: str) -> None:
    """One message through the relay: STARTTLS, AUTH PLAIN, then MAIL/RCPT/DATA."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message.set_content(f"Hello from the mailrelay demo: {subject}\n")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=ports.submission,
        start_tls=True,
        tls_context=context,
        timeout=30,
    ) as client:
        await client.login(DEMO_USER, DEMO_PASSWORD)
        await client.send_message(message)


# --- the demo --------------------------------------------------------------------------------


@dataclass
class DemoResult:
    """What happened, for the end-to-end test."""

    arrivals: list[Arrival]
    expected: dict[str, str]  # subject -> upstream it should reach
    relay_ready: bool
    relay_metrics: dict[str, float]
    get_output: str


def _metrics(port: int) -> dict[str, float]:
    return metric_samples(f"http://127.0.0.1:{port}/metrics")


KEY_METRICS = (
    "mailrelay_smtp_tls_sessions",
    "mailrelay_smtp_auth_attempts",
    "mailrelay_messages_accepted",
    "mailrelay_delivery_attempts",
    "mailrelay_queue_depth",
)


async def run_demo(
    kube: LocalKube, namespace: str = DEMO_NAMESPACE, workdir: Path | None = None
) -> DemoResult:
    """The whole flow on `kube`; the operator watches only `namespace`."""
    work = workdir or Path(tempfile.mkdtemp(prefix="mailrelay-demo-"))
    step(f"Local control plane: kube-apiserver {kube.k8s_version} at {kube.server}")
    step("Installing the MailRelay, MailRoute and kopf peering CRDs")
    await asyncio.to_thread(kube.install_crds, sorted(CRD_DIR.glob("*.yaml")))
    show(kube.kubectl("get", "crds", "-l", "app.kubernetes.io/part-of=mailrelay").stdout)
    kube.create_namespace(namespace)
    kube.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input="apiVersion: kopf.dev/v1\nkind: KopfPeering\nmetadata:\n  name: mailrelay\n",
    )

    step(f"Running the operator as user {OPERATOR_USER}, bound only to operator/rbac.py's rules")
    kubeconfig = await asyncio.to_thread(bind_operator, kube)
    env = kube.env(kubeconfig)
    liveness_port, operator_metrics_port = free_port(), free_port()
    operator_log = work / "operator.log"
    operator_argv = [
        sys.executable,
        "-m",
        "mailrelay.operator",
        "--namespace",
        namespace,
        "--liveness-port",
        str(liveness_port),
        "--metrics-port",
        str(operator_metrics_port),
        "--resync-seconds",
        "5",
    ]
    ca = trustme.CA()
    smtp = SmtpUpstream(ca)
    ports = DemoPorts()
    mailgun = None
    with process(operator_argv, operator_log, env) as operator:
        await wait_until(
            "the operator's liveness endpoint",
            lambda: http_ok(f"http://127.0.0.1:{liveness_port}/healthz"),
            proc=operator,
        )
        print(f"operator pid {operator.pid}, log {operator_log}")
        try:
            step("Starting local upstreams on 127.0.0.1")
            smtp.start()
            print(f"SMTP upstream (STARTTLS + AUTH): 127.0.0.1:{smtp.port}")
            mailgun = await start_mailgun()
            print(f"Mailgun-compatible API: {mailgun.base_url}")

            step(f"Applying Secrets, a MailRelay with TLS and AUTH, and routes in {namespace}")
            objects = manifests(ca, ports, smtp, mailgun)
            show(
                kube.kubectl(
                    "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objects)
                ).stdout
            )
            expected_routes = sum(1 for o in objects if o["kind"] == "MailRoute")

            def rendered() -> bool:
                obj = json.loads(
                    kube.kubectl("get", "mailrelay", RELAY, "-n", namespace, "-o", "json").stdout
                )
                return (obj.get("status") or {}).get("routes") == expected_routes and bool(
                    kube.kubectl(
                        "get", "statefulset", RELAY, "-n", namespace, check=False
                    ).returncode
                    == 0
                )

            await wait_until("the operator to render the relay", rendered, proc=operator)
            show(
                kube.kubectl(
                    "get", "configmaps,services,statefulsets,poddisruptionbudgets", "-n", namespace
                ).stdout
            )

            step("Laying out the ConfigMap and Secrets as kubelet mounts them; running the relay")
            root = work / "pod"
            config_path = await asyncio.to_thread(materialize_pod, kube, namespace, root)
            local = local_config(config_path, root)
            data_link = os.readlink(config_path.parent / "..data")
            print(f"mounted config: {config_path} (..data -> {data_link})")
            relay_env = dict(os.environ)
            relay_log = work / "relay.log"
            relay_argv = [sys.executable, "-m", "mailrelay.relay", "--config", str(local)]
            with process(relay_argv, relay_log, relay_env) as relay:
                await wait_until(
                    "the relay's /readyz",
                    lambda: http_ok(f"http://127.0.0.1:{ports.metrics}/readyz"),
                    proc=relay,
                )
                print(
                    f"relay pid {relay.pid} ready on 127.0.0.1:{ports.submission}, log {relay_log}"
                )
                # No kubelet here: report the pod's readiness as the StatefulSet controller would.
                sts = json.loads(
                    kube.kubectl("get", "statefulset", RELAY, "-n", namespace, "-o", "json").stdout
                )
                status = {
                    "observedGeneration": sts["metadata"]["generation"],
                    "replicas": 1,
                    "readyReplicas": 1,
                    "updatedReplicas": 1,
                    "availableReplicas": 1,
                }
                kube.kubectl(
                    "patch",
                    "statefulset",
                    RELAY,
                    "-n",
                    namespace,
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    json.dumps({"status": status}),
                )
                ready = await wait_until(
                    "the MailRelay to turn Ready",
                    lambda: (
                        condition_status(kube, namespace, "mailrelay", RELAY, "Ready") == "True"
                    ),
                )

                step("Sending mail through the relay (STARTTLS, AUTH PLAIN)")
                expected = {"Invoice 42": "smtp"}
                await send(
                    ports, ca, "billing@billing.demo.test", "customer@example.org", "Invoice 42"
                )
                print("sent 'Invoice 42' from billing@billing.demo.test")
                if mailgun is not None:
                    expected["Newsletter 7"] = "mailgun"
                    await send(
                        ports, ca, "hello@news.demo.test", "reader@example.org", "Newsletter 7"
                    )
                    print("sent 'Newsletter 7' from hello@news.demo.test")

                def arrived() -> list[Arrival] | None:
                    found = list(smtp.arrivals) + (mailgun_arrivals(mailgun) if mailgun else [])
                    return found if len(found) >= len(expected) else None

                try:
                    arrivals = await wait_until("delivery to the upstreams", arrived, within=60)
                except TimeoutError:
                    arrivals = list(smtp.arrivals) + (mailgun_arrivals(mailgun) if mailgun else [])
                    print("Not every message arrived; the relay log says:")
                    show("\n".join(relay_log.read_text(errors="replace").splitlines()[-20:]))

                step("Where each message arrived")
                for arrival in arrivals:
                    print(
                        f"{arrival.subject!r}: {arrival.upstream} upstream, from {arrival.sender} "
                        f"to {', '.join(arrival.recipients)}"
                    )
                step(f"kubectl get mailrelays,mailroutes -n {namespace}")
                get_output = kube.kubectl("get", "mailrelays,mailroutes", "-n", namespace).stdout
                show(get_output)
                step("The relay's key metrics")
                relay_metrics = await asyncio.to_thread(_metrics, ports.metrics)
                for key, value in sorted(relay_metrics.items()):
                    if key.startswith(KEY_METRICS) and "_created" not in key:
                        print(f"{key} {value:g}")
                step("The operator's metrics")
                for key, value in sorted(
                    (await asyncio.to_thread(_metrics, operator_metrics_port)).items()
                ):
                    if key.startswith(
                        ("mailrelay_operator_reconciles_total", "mailrelay_operator_children_total")
                    ):
                        print(f"{key} {value:g}")
                return DemoResult(arrivals, expected, bool(ready), relay_metrics, get_output)
        finally:
            smtp.stop()
            if mailgun is not None:
                await mailgun.stop()
            if workdir is None:
                shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    """`make demo`: the real single-node cluster (clusterdemo.py)."""
    from mailrelay.support import clusterdemo  # noqa: PLC0415
    from mailrelay.support.localnode import running_node  # noqa: PLC0415

    began = time.monotonic()
    step(
        "Building or reusing the node binaries and images, starting a single-node cluster "
        "(cold: about 15-25 minutes of builds on 2 cores; warm: about 30-60 s)"
    )
    with running_node() as node:
        print(
            f"Cluster up: kube-apiserver {node.k8s_version} at {node.server}; node timings "
            + ", ".join(f"{k} {v:.1f}s" for k, v in node.timings.items() if k != "network")
        )
        result = clusterdemo.run_cluster_demo(node)
        clusterdemo.cleanup(node)
        step("Stopping the cluster (processes, mounts, bridge, iptables rules)")
    print(f"Demo took {time.monotonic() - began:.0f}s in all")
    print(
        "Demo OK: every message reached the upstream pod its route names."
        if result.ok
        else "Demo FAILED"
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
