"""The type hints hold: mypy accepts the package under the project's own ``[tool.mypy]`` config,
and a user's script that calls the public API is checked against them (gemframe ships
``py.typed``), so a wrong argument is caught by the checker, not at run time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # mypy checks the whole package: ~15-30 s


def _mypy(*args: str, cwd: Path, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    # A cache of its own under tmp_path: every run checks from scratch, as CI does. This
    # checkout's gemframe first on the path, found as an installed package is (an editable
    # install may name another clone).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cache_dir), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_package_type_checks_clean(tmp_path: Path) -> None:
    """``mypy`` in the project root (files, strictness and Python version from pyproject.toml)."""
    result = _mypy("--config-file", str(ROOT / "pyproject.toml"), cwd=ROOT, cache_dir=tmp_path / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_public_api_hints_reach_a_users_script(tmp_path: Path) -> None:
    """A script using the public API type-checks; the same calls with a wrong type are errors
    naming gemframe's parameters, so the hints are really read (not an untyped Any). Both
    scripts in one ``mypy --strict`` run (each run reads gemframe's and polars' hints anew, most
    of its time): every error it reports must be in the wrong script."""
    good = tmp_path / "good.py"
    good.write_text(
        textwrap.dedent("""
        import polars as pl
        import gemframe as gf

        client = gf.Client("emulator", concurrency=4, timeout=30.0)
        frame = pl.DataFrame({"prompt": ["Say hi"]})
        out: pl.DataFrame = frame.with_columns(reply=gf.generate(pl.col("prompt"), client=client, cache="off"))
        error: gf.RowError | None = None
        cache = gf.ResponseCache(str(gf.default_cache_dir()))
    """)
    )
    bad = tmp_path / "bad.py"
    bad.write_text(
        textwrap.dedent("""
        import polars as pl
        import gemframe as gf

        client = gf.Client("emulator", concurrency="four")
        reply = gf.generate(pl.col("prompt"), client="emulator")
    """)
    )
    checked = _mypy("--strict", "--no-incremental", good.name, bad.name, cwd=tmp_path, cache_dir=tmp_path / "cache")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    errors = [line for line in checked.stdout.splitlines() if ": error:" in line]
    assert errors and all(line.startswith("bad.py:") for line in errors), checked.stdout  # good.py is clean
    assert '"concurrency" to "Client" has incompatible type "str"' in checked.stdout
    assert '"client" to "generate" has incompatible type "str"' in checked.stdout
    assert "(checked 2 source files)" in checked.stdout
