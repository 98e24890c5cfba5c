"""Container images for the local node, built without any registry.

- `localhost/mailrelay-base`: Debian bookworm made with `debootstrap --variant=minbase`,
  python3 with a venv on PATH (`/opt/venv`), standing in for the slim Python image. Its
  root file system is cached as a tarball under ~/.cache/mailrelay/images.
- `localhost/mailrelay`: the project image, built from the repo's Dockerfile with
  `--build-arg PYTHON_IMAGE=localhost/mailrelay-base:...`; the tag is a hash of everything
  the Dockerfile copies, so an unchanged tree reuses the image.
- `localhost/mailrelay-peers`: the project image plus the test upstreams (an SMTP server with
  STARTTLS and AUTH, the Mailgun-compatible API of tests/providers/servers.py), for the demo
  and the cluster tests.
- `localhost/pause`, `localhost/coredns`, `localhost/local-path-provisioner`: scratch images
  holding one static binary each, from `hack/build-node.sh`.

Builds use podman with a containers.conf of our own (`CONTAINERS_CONF`): runc, and ulimits
within the hard limits root has here. pip inside a build reaches PyPI through the host's CA
bundle and pip config, mounted into that build only; nothing of them lands in an image.
Images reach containerd with `podman save` + `ctr -n k8s.io images import`.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mailrelay.support.localkube import REPO_ROOT

CACHE_ROOT = Path(
    os.environ.get("MAILRELAY_CACHE_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mailrelay"
)
IMAGE_CACHE = CACHE_ROOT / "images"
SUITE = "bookworm"
BASE_REVISION = "1"  # bump when the base recipe changes
BASE_IMAGE = f"localhost/mailrelay-base:{SUITE}-r{BASE_REVISION}"
VENV_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the Dockerfile copies: the project image is rebuilt when any of it changes.
PROJECT_INPUTS = ("Dockerfile", "relay", "operator")
# The upstream pods run this package's peers.py, provider_servers.py and what they import.
PEERS_FILES = ("peers.py", "provider_servers.py", "asgi.py")
PEERS_INPUTS = tuple(f"support/src/mailrelay/support/{name}" for name in PEERS_FILES)
PEERS_PACKAGES = ("starlette>=0.37", "uvicorn>=0.30", "python-multipart>=0.0.9", "trustme>=1.1")


class ImageError(RuntimeError):
    """An image could not be built or imported."""


def log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def _containers_conf() -> Path:
    _, hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, hard_nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    nofile = hard_nofile if hard_nofile != resource.RLIM_INFINITY else 1048576
    nproc = min(hard_nproc, 32768) if hard_nproc != resource.RLIM_INFINITY else 32768
    path = IMAGE_CACHE / "containers.conf"
    text = (
        "# Written by hack/nodeimages.py: root here lacks CAP_SYS_RESOURCE, so containers get\n"
        "# limits it may set (runc fails with nproc above 32768 here).\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
    )
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def podman(*args: str, capture: bool = True) -> str:
    env = dict(os.environ, CONTAINERS_CONF=str(_containers_conf()))
    result = subprocess.run(
        ["podman", *args],
        env=env,
        stdout=subprocess.PIPE if capture else sys.stderr,
        stderr=subprocess.PIPE if capture else sys.stderr,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stderr or "")[-3000:] if capture else "(see above)"
        raise ImageError(f"podman {' '.join(args[:3])} ... failed ({result.returncode}): {detail}")
    return result.stdout or ""


def image_exists(name: str) -> bool:
    env = dict(os.environ, CONTAINERS_CONF=str(_containers_conf()))
    return (
        subprocess.run(
            ["podman", "image", "exists", name], env=env, check=False, capture_output=True
        ).returncode
        == 0
    )


def tree_hash(paths: tuple[str, ...], *extra: str) -> str:
    """A hash of the files under `paths` (names and contents), skipping caches."""
    digest = hashlib.sha256()
    for item in extra:
        digest.update(item.encode() + b"\0")
    for top in paths:
        root = REPO_ROOT / top
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            # What .dockerignore leaves out of the build context.
            if file.suffix == ".pyc" or any(
                part in ("__pycache__", "build") or part.endswith(".egg-info")
                for part in file.parts
            ):
                continue
            digest.update(file.relative_to(REPO_ROOT).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    return "http://deb.debian.org/debian"


def ensure_base() -> str:
    """The minbase Python image; its rootfs tarball is cached, the import takes seconds."""
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    tarball = IMAGE_CACHE / f"base-{SUITE}-r{BASE_REVISION}.tar"
    if not tarball.exists():
        started = time.monotonic()
        log("Building the base image's root file system with debootstrap (about 1-2 minutes)...")
        with tempfile.TemporaryDirectory(prefix="mailrelay-rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--include=python3,python3-venv",
                    SUITE,
                    str(rootfs),
                    _debian_mirror(),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            subprocess.run(
                ["chroot", str(rootfs), "python3", "-m", "venv", "/opt/venv"], check=True
            )
            # Smaller and deterministic enough: no apt lists, caches or logs.
            for junk in ("var/lib/apt/lists", "var/cache/apt", "var/log"):
                shutil.rmtree(rootfs / junk, ignore_errors=True)
                (rootfs / junk).mkdir(parents=True, exist_ok=True)
            partial = tarball.with_suffix(".partial")
            subprocess.run(
                ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
                check=True,
            )
            partial.rename(tarball)
        log(f"Built the base root file system in {time.monotonic() - started:.0f}s")
    podman(
        "import",
        "--change",
        f"ENV PATH={VENV_PATH}",
        "--change",
        "ENV LANG=C.UTF-8",
        "--change",
        'CMD ["python3"]',
        str(tarball),
        BASE_IMAGE,
    )
    return BASE_IMAGE


def scratch_image(name: str, binary: Path, entrypoint: list[str]) -> str:
    """One static binary at /<file name> in an otherwise empty image."""
    tag = f"localhost/{name}:{hashlib.sha256(binary.read_bytes()).hexdigest()[:12]}"
    if image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="mailrelay-scratch-") as tmp:
        archive = Path(tmp) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            for folder in ("tmp", "etc"):
                info = tarfile.TarInfo(folder)
                info.type = tarfile.DIRTYPE
                info.mode = 0o1777 if folder == "tmp" else 0o755
                tar.addfile(info)
            tar.add(binary, arcname=binary.name)
        entry = ", ".join(f'"{part}"' for part in entrypoint)
        podman("import", "--change", f"ENTRYPOINT [{entry}]", str(archive), tag)
    return tag


def _build_mounts(tmp: Path) -> list[str]:
    """The host's CA bundle and a pip config pointing at it, for one build's RUN steps."""
    bundle = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    if not bundle.exists():
        return []
    pip_conf = tmp / "pip.conf"
    pip_conf.write_text("[global]\ncert = /etc/mailrelay-build/ca.crt\n")
    return [
        "-v",
        f"{bundle}:/etc/mailrelay-build/ca.crt:ro",
        "-v",
        f"{pip_conf}:/etc/pip.conf:ro",
    ]


def ensure_project_image(base: str) -> str:
    """The Dockerfile's image on the local base, tagged by the hash of its inputs."""
    tag = f"localhost/mailrelay:dev-{tree_hash(PROJECT_INPUTS, base)}"
    if image_exists(tag):
        return tag
    started = time.monotonic()
    log(f"Building {tag} from the Dockerfile (about 1 minute)...")
    with tempfile.TemporaryDirectory(prefix="mailrelay-build-") as tmp:
        podman(
            "build",
            "--quiet",
            "--build-arg",
            f"PYTHON_IMAGE={base}",
            *_build_mounts(Path(tmp)),
            "-t",
            tag,
            "-f",
            str(REPO_ROOT / "Dockerfile"),
            str(REPO_ROOT),
        )
    log(f"Built {tag} in {time.monotonic() - started:.0f}s")
    return tag


def ensure_peers_image(project: str) -> str:
    """The project image plus the test upstreams and their web stack."""
    tag = f"localhost/mailrelay-peers:dev-{tree_hash(PEERS_INPUTS, project, *PEERS_PACKAGES)}"
    if image_exists(tag):
        return tag
    started = time.monotonic()
    log(f"Building {tag} (the demo's upstreams; about 1 minute)...")
    with tempfile.TemporaryDirectory(prefix="mailrelay-build-") as tmp:
        context = Path(tmp) / "context"
        context.mkdir()
        package = context / "mailrelay" / "support"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        for name, source in zip(PEERS_FILES, PEERS_INPUTS, strict=True):
            shutil.copy(REPO_ROOT / source, package / name)
        packages = " ".join(f"'{p}'" for p in PEERS_PACKAGES)
        (context / "Containerfile").write_text(
            f"FROM {project}\n"
            "USER 0:0\n"
            f"RUN pip install {packages}\n"
            # mailrelay is a namespace package: /opt/peers adds mailrelay.support beside the
            # image's mailrelay.relay and mailrelay.operator.
            "COPY mailrelay /opt/peers/mailrelay\n"
            "ENV PYTHONPATH=/opt/peers\n"
            "USER 65532:65532\n"
            'ENTRYPOINT ["python", "-m", "mailrelay.support.peers"]\n'
        )
        podman("build", "--quiet", *_build_mounts(Path(tmp)), "-t", tag, str(context))
    log(f"Built {tag} in {time.monotonic() - started:.0f}s")
    return tag


@dataclass(frozen=True)
class NodeImages:
    """The image references pods use (all local, pulled never)."""

    pause: str
    coredns: str
    provisioner: str
    base: str
    project: str
    peers: str

    def all(self) -> list[str]:
        return [self.pause, self.coredns, self.provisioner, self.base, self.project, self.peers]


def build_all(node_bin: Path) -> NodeImages:
    base = ensure_base()
    project = ensure_project_image(base)
    images = NodeImages(
        pause=scratch_image("pause", node_bin / "pause", ["/pause"]),
        coredns=scratch_image("coredns", node_bin / "coredns", ["/coredns"]),
        provisioner=scratch_image(
            "local-path-provisioner",
            node_bin / "local-path-provisioner",
            ["/local-path-provisioner"],
        ),
        base=base,
        project=project,
        peers=ensure_peers_image(project),
    )
    prune_podman(images.all())
    return images


def _stale(listed: list[str], wanted: list[str]) -> list[str]:
    """Earlier builds of our content-hashed images (`...:dev-<hash>`) that `wanted` replaced."""
    repositories = {image.rsplit(":", 1)[0] for image in wanted if ":dev-" in image}
    return [
        image
        for image in listed
        if ":dev-" in image and image.rsplit(":", 1)[0] in repositories and image not in wanted
    ]


def prune_podman(wanted: list[str]) -> None:
    """Drop earlier `dev-` builds from podman's storage so it does not grow without bound."""
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}").split()
    stale = _stale(listed, wanted)
    if stale:
        podman("rmi", "--force", *stale)
        log(f"Removed {len(stale)} earlier image build(s) from podman")


def import_into_containerd(images: list[str], ctr: Path, address: Path) -> None:
    """Import each image containerd's k8s.io namespace lacks (podman save -> ctr import),
    and remove earlier builds of the same images."""
    base = [str(ctr), "--address", str(address), "--namespace", "k8s.io"]
    listed = subprocess.run(
        [*base, "images", "list", "--quiet"], capture_output=True, text=True, check=True
    ).stdout.split()
    stale = _stale(listed, images)
    if stale:
        subprocess.run([*base, "images", "rm", *stale], capture_output=True, check=False)
    wanted = [image for image in images if image not in listed]
    if not wanted:
        return
    started = time.monotonic()
    log(f"Importing {len(wanted)} image(s) into containerd (about 20-60 s)...")
    with tempfile.TemporaryDirectory(prefix="mailrelay-import-") as tmp:
        for image in wanted:
            archive = Path(tmp) / "image.tar"
            podman("save", "--format", "docker-archive", "-o", str(archive), image)
            result = subprocess.run(
                [*base, "images", "import", str(archive)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise ImageError(f"ctr images import {image} failed: {result.stderr[-2000:]}")
            archive.unlink()
    log(f"Imported {len(wanted)} image(s) into containerd in {time.monotonic() - started:.0f}s")
