"""The source layout as tools see it: editors, mypy and `python -m` follow the files.

Each of relay/, operator/ and support/ is a plain src layout, so an editable install is one
static path entry per package (no import hook that an editor's static analysis cannot run).
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import jedi
import pytest

from mailrelay.support.localkube import REPO_ROOT

PACKAGES = {
    "mailrelay.relay.spool": REPO_ROOT / "relay/src/mailrelay/relay/spool.py",
    "mailrelay.operator.relays": REPO_ROOT / "operator/src/mailrelay/operator/relays.py",
    "mailrelay.support.localkube": REPO_ROOT / "support/src/mailrelay/support/localkube.py",
}


@pytest.mark.parametrize("module", sorted(PACKAGES))
def test_go_to_definition_finds_the_source_file(module: str) -> None:
    """jedi (the engine behind most Python editors) resolves the import statically."""
    package, _, name = module.rpartition(".")
    code = f"from {package} import {name}\n"
    script = jedi.Script(
        code,
        path=str(REPO_ROOT / "tests" / "scratch.py"),
        project=jedi.Project(str(REPO_ROOT)),
        environment=jedi.create_environment(sys.prefix, safe=False),
    )
    found = script.goto(1, len(code) - 2, follow_imports=True)
    assert [d.module_path for d in found] == [PACKAGES[module]]


def test_editable_installs_are_static_paths_not_import_hooks() -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    entries = {}
    for pth in site.glob("__editable__*mailrelay*.pth"):
        lines = [line for line in pth.read_text().splitlines() if line.strip()]
        assert not [line for line in lines if line.startswith("import ")], pth
        entries[pth.name] = lines
    roots = {Path(line) for lines in entries.values() for line in lines}
    assert roots == {REPO_ROOT / folder / "src" for folder in ("relay", "operator", "support")}


def test_repo_root_on_the_path_shadows_nothing() -> None:
    """`operator/` at the top is no package: the standard library's operator still wins."""
    assert not (REPO_ROOT / "operator" / "__init__.py").exists()
    assert not (REPO_ROOT / "relay" / "__init__.py").exists()
    import operator  # noqa: PLC0415

    assert Path(operator.__file__).parent == Path(sysconfig.get_paths()["stdlib"])


def test_the_upstream_pods_image_holds_every_support_module_its_program_imports() -> None:
    """The peers image copies a few files of mailrelay.support, not the package: each
    `mailrelay.support` module they import must be among them (else the pod crash-loops)."""
    import ast  # noqa: PLC0415

    from mailrelay.support import nodeimages  # noqa: PLC0415

    copied = {name.removesuffix(".py") for name in nodeimages.PEERS_FILES}
    needed = set()
    for source in nodeimages.PEERS_INPUTS:
        for node in ast.walk(ast.parse((REPO_ROOT / source).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mailrelay.support":
                needed |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "mailrelay.support."
            ):
                needed.add((node.module or "").split(".")[2])
    assert needed, "the check found no support import at all"
    assert needed <= copied, sorted(needed - copied)
