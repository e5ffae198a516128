"""One of each, checked from the code itself: small copies drift (five hand-rolled atomic
writes, four clips and three token rules once did), so each helper has one home and nothing
else in the client re-implements it. The emulator keeps its own on purpose: a test oracle
shares nothing with the client."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gemframe"


def _client_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if not name.startswith("emulator/"):
            yield name, ast.parse(path.read_text(), name)


def _where(found):
    return ", ".join(f"{name}:{node.lineno}" for name, node in found)


def test_one_atomic_write_helper():
    # Replacing a file goes through gemframe/_files.py (exclusive temp file, fsync, rename).
    # The cache's _create_database only links a new, empty database into place (never over one).
    allowed = {"_files.py", "_core/cache/disk.py"}
    found = [
        (name, node)
        for name, tree in _client_modules()
        if name not in allowed
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr in ("replace", "rename", "mkstemp", "NamedTemporaryFile")
        and isinstance(node.value, ast.Name)
        and node.value.id in ("os", "tempfile")
    ]
    assert not found, f"write files with gemframe._files.atomic_write / AtomicFile: {_where(found)}"


def test_one_clip():
    found = [
        (name, node)
        for name, tree in _client_modules()
        if name != "_errors.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in ("clip", "truncate", "shorten")
    ]
    assert not found, f"shorten text for messages with gemframe._errors.clip: {_where(found)}"


def test_one_token_rule():
    # 258 tokens per image or page is the token rule's (gemframe/_core/tokens.py).
    allowed = {"_core/tokens.py"}
    found = [
        (name, node)
        for name, tree in _client_modules()
        if name not in allowed
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value == 258
    ]
    assert not found, f"count tokens with gemframe._core.tokens: {_where(found)}"


def test_executor_calls_are_caught_by_its_own_error():
    # Executor.call raises TransportFailure; an httpx.HTTPError never reaches its callers. Only
    # payload.py downloads image URLs with httpx itself (not through the executor).
    found = [
        (name, node)
        for name, tree in _client_modules()
        if name != "_core/payload.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "HTTPError"
    ]
    assert not found, f"catch gemframe._core.http.TransportFailure: {_where(found)}"
