"""Where a message lives is the storage's business alone (STYLE.md 16).

The SMTP front (`server.py`) and the delivery engine (`delivery.py`) hold an accepted or
claimed message through its `MessageLease` (`complete`, `defer`, `dead_letter`, `release`,
`read`); they never ask whether it sits in the journal or in a locked queue file, and never
touch a claim or the journal's bookkeeping themselves. Checked on the source with `ast`:
every attribute access and every name counts, wherever it sits.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mailrelay.relay

ROOT = Path(mailrelay.relay.__file__).parent

# The store's internals about where a message lives and how it is held.
STORAGE_INTERNALS = frozenset(
    {
        "Claim",
        "HeldMessage",
        "claim",
        "claim_and_load",
        "claim_entry",
        "finish_journaled",
        "is_journaled",
        "journaled_count",
        "read_claimed",
        "remove",
        "remove_and_release",
        "save",
        "try_claim",
        "_journal",
        "_journaled",
    }
)

HOLDERS = ("server.py", "delivery.py")


def storage_references(source: str, filename: str) -> list[str]:
    """`line: name` for each attribute or name in `source` that is a storage internal."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        name = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.alias):
            name = node.asname or node.name.rsplit(".", 1)[-1]
        if name in STORAGE_INTERNALS:
            found.append(f"{getattr(node, 'lineno', '?')}: {name}")
    return found


@pytest.mark.parametrize("module", HOLDERS)
def test_the_front_and_the_engine_hold_messages_only_through_leases(module: str) -> None:
    path = ROOT / module
    assert storage_references(path.read_text(), str(path)) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("if held.claim is None:\n    pass\n", ["1: claim"]),
        ("spool.is_journaled(qid)\n", ["1: is_journaled"]),
        ("await self._spool.save(entry)\n", ["1: save"]),
        ("from mailrelay.relay.spool import Claim\n", ["1: Claim"]),
        ("x = finish_journaled\n", ["1: finish_journaled"]),
        ("await lease.complete()\nawait lease.release()\n", []),
    ],
)
def test_the_check_sees_storage_internals(source: str, expected: list[str]) -> None:
    assert storage_references(source, "<test>") == expected
