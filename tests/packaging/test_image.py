"""The container image's contents and commands, without a container engine.

There is no Docker engine here, so the Dockerfile is linted with hadolint and the image's
install step is replayed: build the wheels, install them into a fresh virtual environment, and
run the two commands the image runs from there.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailrelay.support.localkube import REPO_ROOT

pytestmark = pytest.mark.slow


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), str(REPO_ROOT / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_keeps_the_runtime_stage_lean_and_unprivileged() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    final_stage = text.rsplit("\nFROM ", 1)[1]
    assert "USER 65532:65532" in final_stage
    assert "PYTHONDONTWRITEBYTECODE=1" in final_stage
    assert "org.opencontainers.image.title" in final_stage
    assert "pip wheel" not in final_stage
    assert "apt-get" not in final_stage  # no build tools in the final stage


SHIPPED = ("relay", "operator")  # the folders the image installs; support/ is dev-only


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The wheels the Dockerfile builds: one per shipped folder."""
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out)]
        + [f"./{folder}" for folder in SHIPPED],
        cwd=REPO_ROOT,
        check=True,
    )
    built = sorted(out.glob("mailrelay_*.whl"))
    assert [w.name.split("-")[0] for w in built] == ["mailrelay_operator", "mailrelay_relay"]
    return built


def test_wheels_hold_every_package_under_the_mailrelay_namespace(wheels: list[Path]) -> None:
    names = {name for wheel in wheels for name in zipfile.ZipFile(wheel).namelist()}
    source_packages = {
        init.relative_to(REPO_ROOT / folder / "src").as_posix()
        for folder in SHIPPED
        for init in (REPO_ROOT / folder / "src").rglob("__init__.py")
    }
    assert source_packages, "no package found under relay/src or operator/src"
    assert source_packages <= names, sorted(source_packages - names)
    # `mailrelay` stays a namespace package (no __init__.py), so the packages can be split.
    assert "mailrelay/__init__.py" not in names
    assert not [n for n in names if n.startswith(("mailrelay/support/", "tests/", "src/"))]


@pytest.fixture(scope="module")
def fresh_venv(wheels: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new venv with only the wheels installed; dependencies come from the test venv's
    site-packages on PYTHONPATH (no network), whose editable mailrelay paths stay inactive
    because .pth files on PYTHONPATH are not processed."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd=venv)
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            *map(str, wheels),
        ],
        check=True,
        cwd=venv,
    )
    yield venv


def _run_in(venv: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": str(tmp_path),
    }
    return subprocess.run(
        [str(venv / "bin" / "python"), *args],
        cwd=tmp_path,  # like the image's WORKDIR: nothing of the repo on sys.path
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_installed_operator_command_runs(fresh_venv: Path, tmp_path: Path) -> None:
    located = _run_in(
        fresh_venv, tmp_path, "-c", "import mailrelay.operator as m; print(m.__file__)"
    )
    assert located.stdout.startswith(str(fresh_venv)), located.stdout + located.stderr
    result = _run_in(fresh_venv, tmp_path, "-m", "mailrelay.operator", "--help")
    assert result.returncode == 0, result.stderr
    assert "MailRelay" in result.stdout


def test_installed_relay_checks_a_config(fresh_venv: Path, tmp_path: Path) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            hostname: relay.example.test
            auth: {{required: false}}
            allowed_networks: [10.0.0.0/8]
            spool: {{directory: {tmp_path / "spool"}}}
            routes:
              - name: everything
                upstream: {{type: smtp, name: smarthost, host: smtp.example.test, port: 587}}
            """
        )
    )
    good = _run_in(
        fresh_venv, tmp_path, "-m", "mailrelay.relay", "--config", str(config), "--check-config"
    )
    assert good.returncode == 0, good.stdout + good.stderr

    config.write_text(config.read_text().replace("port: 587", "port: 70000"))
    bad = _run_in(
        fresh_venv, tmp_path, "-m", "mailrelay.relay", "--config", str(config), "--check-config"
    )
    assert bad.returncode != 0
    assert "port" in (bad.stdout + bad.stderr)
