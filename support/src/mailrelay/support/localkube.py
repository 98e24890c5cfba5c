"""A real local Kubernetes control plane (etcd + kube-apiserver) on 127.0.0.1.

The shape follows controller-runtime's envtest: no kubelet, no controller
manager, just the API server with RBAC on and a client-certificate admin. The
binaries come from `hack/build-control-plane.sh` (built once from the Go
module proxy, cached under ~/.cache/mailrelay).

`LocalKube` owns one cluster: certificates, free ports, processes, a work
directory and a kubeconfig. Tests use it through the session fixture in
`tests/conftest.py`; people use it through the CLI at the bottom (`python -m
mailrelay.support.localkube up|down`), which keeps its state in `.localkube/` so
`down` can find what `up` started.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailrelay.support.ports import free_port

# support/src/mailrelay/support/localkube.py: the checkout this package is installed from
# (editable; it is a dev-tools package, never shipped).
REPO_ROOT = Path(__file__).resolve().parents[4]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-control-plane.sh"
CLI_STATE_DIR = REPO_ROOT / ".localkube"
PR_SET_PDEATHSIG = 1


class ControlPlaneError(RuntimeError):
    """The local control plane could not be built or started."""


def ensure_binaries() -> Path:
    """Build (or reuse the cached) control-plane binaries and return their directory."""
    result = subprocess.run(
        [str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=None, text=True, check=False
    )
    if result.returncode != 0:
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed with exit code {result.returncode}")
    return Path(result.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM private key."""

    cert_pem: bytes
    key_pem: bytes


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


@dataclass(frozen=True)
class CertificateAuthority:
    """A throwaway CA that signs the serving certificate and client certificates."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, common_name: str = "mailrelay-localkube-ca") -> CertificateAuthority:
        key = _new_key()
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, cert=cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        server_names: Sequence[str] = (),
    ) -> KeyPair:
        """Sign a client certificate, or a serving one when `server_names` is given."""
        key = _new_key()
        now = dt.datetime.now(dt.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organizations))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server_names:
            alt_names: list[x509.GeneralName] = []
            for server_name in server_names:
                try:
                    alt_names.append(x509.IPAddress(ipaddress.ip_address(server_name)))
                except ValueError:
                    alt_names.append(x509.DNSName(server_name))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this child when the test process dies, so nothing leaks."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class LocalKube:
    """One local control plane: etcd and kube-apiserver with RBAC on, on free loopback ports."""

    bin_dir: Path
    workdir: Path
    die_with_parent: bool = True
    k8s_version: str = ""
    etcd_port: int = 0
    etcd_peer_port: int = 0
    apiserver_port: int = 0
    ca: CertificateAuthority = field(default_factory=CertificateAuthority.create)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def host(self) -> str:
        """The address the API server binds and serves on."""
        return "127.0.0.1"

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.apiserver_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    def kubeconfig_for(self, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig for a client-certificate user (RBAC tests bind roles to it)."""
        pair = self.ca.issue(user, organizations=groups)
        path = self.workdir / f"kubeconfig-{user.replace(':', '_')}"
        self._write_kubeconfig(path, user, pair)
        return path

    def kubeconfig_with_token(self, name: str, token: str) -> Path:
        """A kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount's)."""
        path = self.workdir / f"kubeconfig-token-{name}"
        config = self._kubeconfig_base(name)
        config["users"] = [{"name": name, "user": {"token": token}}]
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        """The environment a subprocess needs to reach this cluster with kubectl/helm/kopf."""
        environment = dict(os.environ)
        environment["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        environment["PATH"] = f"{self.bin_dir}{os.pathsep}{environment.get('PATH', '')}"
        return environment

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl against this cluster; raise with its output when `check` fails."""
        command = [
            str(self.bin_dir / "kubectl"),
            "--kubeconfig",
            str(kubeconfig or self.kubeconfig),
        ]
        result = subprocess.run(
            [*command, *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the real helm against this cluster, with its caches inside the work directory."""
        environment = self.env()
        for variable, sub in (
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ):
            environment[variable] = str(self.workdir / "helm" / sub)
        result = subprocess.run(
            [str(self.bin_dir / "helm"), *args],
            capture_output=True,
            text=True,
            check=False,
            env=environment,
            timeout=300,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(
                f"helm {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def install_crds(self, paths: Sequence[Path]) -> None:
        """Apply CRD manifests and wait until the API server serves them."""
        names: list[str] = []
        for path in paths:
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
            result = self.kubectl("get", "-f", str(path), "-o", "name")
            names.extend(result.stdout.split())
        if names:
            self.kubectl("wait", "--for", "condition=Established", "--timeout=60s", *names)

    def create_namespace(self, name: str) -> str:
        self.kubectl("create", "namespace", name)
        return name

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, *, attempts: int = 3) -> None:
        """Start etcd and kube-apiserver on fresh ports, retrying if a port was taken meanwhile."""
        last_error: Exception | None = None
        for _ in range(attempts):
            try:
                self._start_once()
                return
            except ControlPlaneError as error:
                last_error = error
                self.stop_processes()
        raise ControlPlaneError(f"Local control plane did not start: {last_error}")

    def _start_once(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        self.etcd_port, self.etcd_peer_port, self.apiserver_port = (
            free_port(),
            free_port(),
            free_port(),
        )
        self._write_pki()
        self._start_etcd()
        self._start_apiserver()
        admin = self.ca.issue("mailrelay-admin", organizations=["system:masters"])
        self._write_kubeconfig(self.kubeconfig, "mailrelay-admin", admin)
        self._wait_until_ready()

    def _prepare(self) -> None:
        """Hook for subclasses: set up what the API server needs before it starts."""

    def _write_pki(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        serving = self.ca.issue("kube-apiserver", server_names=self.serving_names())
        service_account_key = _new_key()
        files = {
            "ca.crt": self.ca.cert_pem,
            "apiserver.crt": serving.cert_pem,
            "apiserver.key": serving.key_pem,
            "sa.key": _key_pem(service_account_key),
            "sa.pub": service_account_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        }
        for name, content in files.items():
            (pki / name).write_bytes(content)
            (pki / name).chmod(0o600)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # Only prctl() runs between fork and exec, which is safe with threads.
            preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
        )
        log.close()

    def _start_etcd(self) -> None:
        data_dir = self.workdir / "etcd"
        client_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{self.etcd_peer_port}"
        self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=localkube",
                f"--data-dir={data_dir}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=localkube={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )

    def serving_names(self) -> list[str]:
        """Names and addresses in the API server's serving certificate."""
        return [
            "localhost",
            "127.0.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "10.0.0.1",
        ]

    def _start_apiserver(self) -> None:
        self._spawn(
            "kube-apiserver", [str(self.bin_dir / "kube-apiserver"), *self.apiserver_args()]
        )

    def apiserver_args(self) -> list[str]:
        """envtest's shape: no ServiceAccount admission, loopback only."""
        pki = self.workdir / "pki"
        return [
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.apiserver_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            "--disable-admission-plugins=ServiceAccount",
            f"--service-account-issuer=https://127.0.0.1:{self.apiserver_port}/",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--cert-dir={pki}",
            "--advertise-address=127.0.0.1",
            "--v=0",
        ]

    def _wait_until_ready(self, timeout: float = 90.0) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise ControlPlaneError(
                        f"{name} exited with {process.returncode}; its log:\n{self.log_tail(name)}"
                    )
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"{self.server}/readyz", context=context, timeout=2):
                    pass
                if self.kubectl("get", "namespace", "default", check=False).returncode == 0:
                    self.k8s_version = self._server_version()
                    return
            time.sleep(0.25)
        raise ControlPlaneError(
            f"kube-apiserver was not ready after {timeout:.0f}s; its log:\n"
            f"{self.log_tail('kube-apiserver')}"
        )

    def _server_version(self) -> str:
        output = self.kubectl("version", "-o", "json").stdout
        version: str = json.loads(output)["serverVersion"]["gitVersion"]
        return version

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _kubeconfig_base(self, user: str) -> dict[str, object]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "localkube",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": _b64(self.ca.cert_pem),
                    },
                }
            ],
            "contexts": [{"name": "localkube", "context": {"cluster": "localkube", "user": user}}],
            "current-context": "localkube",
            "preferences": {},
        }

    def _write_kubeconfig(self, path: Path, user: str, pair: KeyPair) -> None:
        config = self._kubeconfig_base(user)
        config["users"] = [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(pair.cert_pem),
                    "client-key-data": _b64(pair.key_pem),
                },
            }
        ]
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)

    def stop_processes(self) -> None:
        """Stop the apiserver first, then etcd; SIGKILL whatever does not exit in time."""
        for name in self.stop_order():
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    def stop_apiserver(self) -> None:
        """Kill only kube-apiserver, as a crash would (an API outage); etcd keeps the data."""
        process = self.processes.pop("kube-apiserver", None)
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

    def start_apiserver(self) -> None:
        """Start kube-apiserver again on its port, and wait until it is ready."""
        self._start_apiserver()
        self._wait_until_ready()

    def stop_order(self) -> list[str]:
        return ["kube-apiserver", "etcd"]

    def stop(self) -> None:
        """Stop everything and remove the work directory."""
        self.stop_processes()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(workdir: Path | None = None) -> Iterator[LocalKube]:
    """Build if needed, start a cluster in a private directory, and always clean it up."""
    bin_dir = ensure_binaries()
    directory = workdir or Path(tempfile.mkdtemp(prefix="mailrelay-localkube-"))
    cluster = LocalKube(bin_dir=bin_dir, workdir=directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# --- CLI: make cluster-up / cluster-down -----------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether `pid` still runs; a zombie counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def stop_process_group(pid: int) -> None:
    """SIGTERM the process group `pid` leads, then SIGKILL it if still there after 10 s."""
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    for _ in range(40):
        if not pid_alive(pid):
            return
        time.sleep(0.25)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def cli_up() -> int:
    """Start a cluster that outlives this command and print how to use it."""
    state_file = CLI_STATE_DIR / "state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if all(pid_alive(pid) for pid in state["pids"].values()):
            print(f"A local cluster is already running: export KUBECONFIG={state['kubeconfig']}")
            return 0
        cli_down()
    cluster = LocalKube(
        bin_dir=ensure_binaries(), workdir=CLI_STATE_DIR / "cluster", die_with_parent=False
    )
    cluster.start()
    state = {
        "kubeconfig": str(cluster.kubeconfig),
        "server": cluster.server,
        "pids": {name: process.pid for name, process in cluster.processes.items()},
        "bin_dir": str(cluster.bin_dir),
    }
    state_file.write_text(json.dumps(state, indent=2))
    print(f"Started kube-apiserver {cluster.k8s_version} at {cluster.server}")
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    print(f"export PATH={cluster.bin_dir}:$PATH")
    return 0


def cli_down() -> int:
    """Stop the cluster `cli_up` started and remove its files."""
    state_file = CLI_STATE_DIR / "state.json"
    if not state_file.exists():
        print("No local cluster is running.")
        return 0
    state = json.loads(state_file.read_text())
    for name in ("kube-apiserver", "etcd"):
        if pid := state["pids"].get(name):
            stop_process_group(pid)
    shutil.rmtree(CLI_STATE_DIR, ignore_errors=True)
    print("Stopped the local cluster.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local kube-apiserver + etcd on 127.0.0.1.")
    parser.add_argument("command", choices=["up", "down", "build"])
    args = parser.parse_args(argv)
    if args.command == "up":
        return cli_up()
    if args.command == "down":
        return cli_down()
    print(ensure_binaries())
    return 0


if __name__ == "__main__":
    sys.exit(main())
