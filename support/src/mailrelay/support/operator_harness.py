"""Test harness: the operator as a real process, least-privilege credentials, waiting helpers.

``OperatorProcess`` runs ``python -m mailrelay.operator`` against the local API server with a
kubeconfig of a client-certificate user bound only to ``operator/rbac.py``'s ClusterRole, so
a missing rule fails a test. Its metrics endpoint is how tests count what it did.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mailrelay.operator import rbac
from mailrelay.support.localkube import REPO_ROOT, LocalKube
from mailrelay.support.ports import free_port

T = TypeVar("T")
CRDS = sorted((REPO_ROOT / "crds").glob("*.yaml"))
OPERATOR_USER = "mailrelay-operator-test"


def bind_operator_role(kube: LocalKube, user: str = OPERATOR_USER) -> Path:
    """Install the operator's ClusterRole, bind it to ``user``, return that user's kubeconfig."""
    role = rbac.cluster_role()
    binding = rbac.cluster_role_binding(
        subject={"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"},
        name=f"{rbac.CLUSTER_ROLE_NAME}-{user}",
    )
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([role, binding]))
    return kube.kubeconfig_for(user)


def wait_for(
    probe: Callable[[], T | None], *, timeout: float = 30.0, interval: float = 0.2, what: str = ""
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"Timed out after {timeout:.0f}s waiting for {what or probe}: {last!r}")


def get(kube: LocalKube, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    """The object as a dict, or None when it does not exist."""
    result = kube.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        if "NotFound" in result.stderr:
            return None
        raise AssertionError(result.stderr)
    obj: dict[str, Any] = json.loads(result.stdout)
    return obj


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    """A status condition of ``obj`` by type."""
    for entry in ((obj or {}).get("status") or {}).get("conditions") or []:
        if entry.get("type") == type_:
            return dict(entry)
    return None


def apply(kube: LocalKube, namespace: str, *objects: dict[str, Any]) -> None:
    """kubectl apply the given manifests into ``namespace`` (as the admin, like a user)."""
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(list(objects)))


class OperatorProcess:
    """One operator process; ``metrics()`` parses its Prometheus text."""

    def __init__(
        self,
        kube: LocalKube,
        kubeconfig: Path,
        *args: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.log_path = log_path
        env = {**kube.env(kubeconfig), **(env or {})}
        env["MAILRELAY_OPERATOR_METRICS_PORT"] = str(self.metrics_port)
        env["MAILRELAY_OPERATOR_LIVENESS_PORT"] = str(self.liveness_port)
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mailrelay.operator", *args],
            env=env,
            cwd=str(REPO_ROOT),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_live(self, timeout: float = 30.0) -> None:
        """Wait until the liveness endpoint answers 200 (the operator started and is live)."""

        def live() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"The operator exited:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{self.liveness_port}/healthz"
                with urllib.request.urlopen(url, timeout=1) as response:
                    return bool(response.status == 200)
            return False

        wait_for(live, timeout=timeout, what="the operator's liveness endpoint")

    def health(self) -> dict[str, Any]:
        """The JSON of ``/healthz``, whatever its status code (200 live, 503 not)."""
        url = f"http://127.0.0.1:{self.liveness_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = json.loads(error.read())
            body["status"] = error.code
            return body
        body["status"] = 200
        return body

    def metrics(self) -> dict[str, float]:
        """Samples by ``name{labels}`` (labels sorted as exposed)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def total(self, prefix: str) -> float:
        """Sum of the samples whose name starts with ``prefix``."""
        return sum(v for k, v in self.metrics().items() if k.startswith(prefix))

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        self._log.close()


@contextlib.contextmanager
def running_operator(
    kube: LocalKube,
    kubeconfig: Path,
    *args: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
) -> Iterator[OperatorProcess]:
    """An operator process for the duration of the block; its log is printed on failure."""
    operator = OperatorProcess(kube, kubeconfig, *args, log_path=log_path, env=env)
    try:
        operator.wait_live()
        yield operator
    except BaseException:
        print(f"--- operator log ({log_path}) ---\n{operator.log_tail(200)}")
        raise
    finally:
        operator.stop()
