"""Imports inside the relay flow one way (STYLE.md 17).

Every module of `mailrelay.relay` is parsed with `ast`; every import statement counts,
wherever it sits: at the top, under `if TYPE_CHECKING:`, inside a function, or by name
through `importlib.import_module("...")` (a lazy import still ties the two modules
together, it only hides the cycle from the reader).
An import of `mailrelay.relay.a.b` is an edge to that module; `from mailrelay.relay.a
import b` is an edge to `a.b` when `b` is a module, else to `a`. The implicit import of
a module's parent packages is not an edge: `__init__` files stay import-free below.

A provider module is one that defines an `ApiTransport` subclass; it may import the
shared provider modules (`base`, `http`, `mime`, `limits`) but never another provider.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import mailrelay.relay

PACKAGE = "mailrelay.relay"
ROOT = Path(mailrelay.relay.__file__).parent


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every `.py` file under `root` (packages by `__init__`)."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name a (possibly relative) `from ... import` refers to."""
    if level == 0:
        return name or ""
    base = module.split(".")
    # A package's own name counts as level 1; a module's level 1 is its package.
    base = base if is_package else base[:-1]
    if level > 1:
        base = base[: -(level - 1)]
    return ".".join([*base, *([name] if name else [])])


def imported_modules(module: str, tree: ast.AST, known: Mapping[str, Path]) -> Iterator[str]:
    """The `known` modules that `tree` (the source of `module`) imports anywhere."""
    is_package = known[module].name == "__init__.py"
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            # importlib.import_module("mailrelay.relay.x"): an import by name is an import.
            targets = [node.args[0].value]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node.level, node.module)
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                for alias in node.names
            ]
        for target in targets:
            # `import a.b.c` binds `a` but loads `a.b.c`: the deepest known module counts.
            parts = target.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts and ".".join(parts) != module:
                yield ".".join(parts)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    known = module_files(root, package)
    return {
        name: set(imported_modules(name, ast.parse(path.read_text(), str(path)), known))
        for name, path in known.items()
    }


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_one_cycle(graph, component) for component in components]


def _one_cycle(graph: Mapping[str, set[str]], component: list[str]) -> list[str]:
    """A readable path a -> ... -> a inside one strongly connected component."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph[node] & members):
                if succ == start:
                    return [*paths[node], start]
                if succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    nxt.append(succ)
        frontier = nxt
    return component  # not reached: a component of two or more holds a cycle


def provider_modules(root: Path, package: str) -> set[str]:
    """Modules in a `providers` package that define a transport class (`ApiTransport` subclass)."""
    found = set()
    for name, path in module_files(root, package).items():
        if ".providers." not in name:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and any(
                (isinstance(b, ast.Name) and b.id == "ApiTransport")
                or (isinstance(b, ast.Attribute) and b.attr == "ApiTransport")
                for b in node.bases
            ):
                found.add(name)
    return found


def test_the_relay_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph(ROOT, PACKAGE))
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_provider_imports_another_provider() -> None:
    graph = import_graph(ROOT, PACKAGE)
    providers = provider_modules(ROOT, PACKAGE)
    assert len(providers) >= 7, providers  # the check below must see the providers
    crossing = sorted(
        f"{name} -> {target}" for name in providers for target in graph[name] & providers
    )
    assert crossing == []


def test_the_transport_types_import_no_implementation() -> None:
    """The interface module builds nothing: no transport, no provider, no factory."""
    graph = import_graph(ROOT, PACKAGE)
    reachable: set[str] = set()
    todo = [f"{PACKAGE}.upstreams.transport"]
    while todo:
        for target in graph[todo.pop()] - reachable:
            reachable.add(target)
            todo.append(target)
    implementations = {
        f"{PACKAGE}.upstreams.smtp",
        f"{PACKAGE}.upstreams.factory",
        f"{PACKAGE}.upstreams.providers.registry",
    }
    implementations |= provider_modules(ROOT, PACKAGE)
    assert reachable & implementations == set()


# The checker itself, on small packages written for the purpose.
@pytest.mark.parametrize(
    ("files", "cycles"),
    [
        pytest.param(
            {"a.py": "from pkg import b\n", "b.py": "def f():\n    import pkg.a\n"},
            [["pkg.a", "pkg.b", "pkg.a"]],
            id="lazy-import-in-a-function",
        ),
        pytest.param(
            {
                "a.py": (
                    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n"
                ),
                "b.py": "from pkg.c import Y\n",
                "c.py": "from . import a\n",
            },
            [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]],
            id="type-checking-and-relative",
        ),
        pytest.param(
            {
                "sub/__init__.py": "",
                "sub/x.py": "from ..a import thing\n",
                "a.py": "from pkg.sub import x\n",
            },
            [["pkg.a", "pkg.sub.x", "pkg.a"]],
            id="from-package-import-module",
        ),
        pytest.param(
            {"a.py": "import pkg.b\n", "b.py": "import os\nfrom pkg import c\n", "c.py": ""},
            [],
            id="one-way",
        ),
        pytest.param(
            {
                "a.py": "import importlib\nimportlib.import_module('pkg.b')\n",
                "b.py": "import pkg.a\n",
            },
            [["pkg.a", "pkg.b", "pkg.a"]],
            id="import-by-name",
        ),
    ],
)
def test_the_checker_finds_cycles(
    tmp_path: Path, files: dict[str, str], cycles: list[list[str]]
) -> None:
    (tmp_path / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert find_cycles(import_graph(tmp_path, "pkg")) == cycles


def test_the_checker_finds_a_provider_importing_another(tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "providers").mkdir()
    (tmp_path / "providers" / "__init__.py").write_text("")
    (tmp_path / "providers" / "base.py").write_text("class ApiTransport: ...\n")
    (tmp_path / "providers" / "one.py").write_text(
        "from pkg.providers.base import ApiTransport\nclass One(ApiTransport): ...\n"
    )
    (tmp_path / "providers" / "two.py").write_text(
        "from pkg.providers import base\nfrom pkg.providers.one import One\n"
        "class Two(base.ApiTransport): ...\n"
    )
    graph = import_graph(tmp_path, "pkg")
    assert provider_modules(tmp_path, "pkg") == {"pkg.providers.one", "pkg.providers.two"}
    assert graph["pkg.providers.two"] == {"pkg.providers.base", "pkg.providers.one"}


def envelope_classes(root: Path, package: str) -> set[str]:
    """Classes under `root` that declare both `mail_from` and `recipients` fields."""
    found = set()
    for name, path in module_files(root, package).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ClassDef):
                continue
            fields = {
                stmt.target.id
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
            if {"mail_from", "recipients"} <= fields:
                found.add(f"{name}.{node.name}")
    return found


def test_one_envelope_type_after_the_front() -> None:
    """From the spool's intake to the transports, a message travels with `Envelope`.

    The front's envelope is aiosmtpd's (`server.RelayEnvelope`, attributes set in
    `__init__`); the queue file's record (`spool_format.QueueEntry`, with each recipient's
    delivery state) hands out an `Envelope` per attempt. No third shape of the same data.
    """
    assert envelope_classes(ROOT, PACKAGE) == {
        f"{PACKAGE}.envelope.Envelope",
        f"{PACKAGE}.spool_format.QueueEntry",
    }


def test_no_relay_module_is_imported_by_name() -> None:
    """An import by name (`importlib.import_module("mailrelay.relay.x")`) hides the
    dependency from mypy and editors; relay modules import each other with statements."""
    by_name = []
    for name, path in module_files(ROOT, PACKAGE).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute | ast.Name)
                and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
                in ("import_module", "__import__")
            ):
                by_name.append(f"{name}:{node.lineno}")
    assert by_name == []


def test_the_smtp_path_does_not_load_aiohttp() -> None:
    """The SMTP path (server, delivery engine, SMTP transport with its OAuth2 support) does
    not import the HTTP stack: aiohttp costs about 0.4 s at start and 9 MB per process. It
    comes with what needs it: API or OAuth2 upstreams (preloaded in a thread) and the
    hand-off listener (`handoff.py`, which the operator configures on every relay)."""
    probe = (
        "import sys\n"
        "import mailrelay.relay.delivery, mailrelay.relay.server\n"
        "import mailrelay.relay.upstreams.factory, mailrelay.relay.upstreams.oauth2\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'botocore')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout
