"""The type hints hold: mypy accepts the package under the project's own ``[tool.mypy]`` config
(which is ``strict``), and a user's script that calls the public API is checked against them
(gemframe ships ``py.typed``), so a wrong argument is caught by the checker, not at run time.

One mypy run checks all of it: most of a run is reading polars' and gemframe's hints (the
optional extras' packages are read as Any, see ``[tool.mypy]``), and two runs with different
options cannot share a cache (two cost ~16 CPU-s, one ~6)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # mypy checks the whole package: ~6-20 s

# A user's script using the public API: it type-checks.
GOOD = """
    import polars as pl
    import gemframe as gf

    client = gf.Client("emulator", concurrency=4, timeout=30.0)
    frame = pl.DataFrame({"prompt": ["Say hi"]})
    out: pl.DataFrame = frame.with_columns(reply=gf.generate(pl.col("prompt"), client=client, cache="off"))
    error: gf.RowError | None = None
    cache = gf.ResponseCache(str(gf.default_cache_dir()))
"""

# The same calls with a wrong type: errors naming gemframe's parameters, so the hints are
# really read (not an untyped Any).
BAD = """
    import polars as pl
    import gemframe as gf

    client = gf.Client("emulator", concurrency="four")
    reply = gf.generate(pl.col("prompt"), client="emulator")
"""


def test_package_and_a_users_scripts_type_check(tmp_path: Path) -> None:
    """``mypy --strict`` over the package and a user's two scripts, once, with the project's
    config (its Python version, missing imports ignored, ``strict = true``): a user running
    ``mypy --strict`` is the case served (e.g. only gemframe's explicit re-exports import).
    Paths on the command line replace the config's ``files``. The package is this checkout's
    (a source file is found before an installed package); the scripts are in ``tmp_path``, as
    is the cache, so every run checks from scratch, as CI does."""
    (tmp_path / "good.py").write_text(textwrap.dedent(GOOD))
    (tmp_path / "bad.py").write_text(textwrap.dedent(BAD))
    # ``--strict`` as the user types it (the config says so too: for the package it changes
    # nothing, for the scripts it holds even if the config's strictness were loosened).
    mypy = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--strict"]
    checked = subprocess.run(
        [*mypy, "--cache-dir", str(tmp_path / "cache"), str(ROOT / "gemframe"), "good.py", "bad.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = checked.stdout + checked.stderr
    errors = [line for line in checked.stdout.splitlines() if ": error:" in line]
    script = {name: [line for line in errors if line.startswith(f"{name}:")] for name in ("good.py", "bad.py")}
    package = [line for line in errors if not line.startswith(("good.py:", "bad.py:"))]
    assert package == [], output  # the package is clean under its strict config
    assert script["good.py"] == [], output
    assert len(script["bad.py"]) == 2, output
    assert '"concurrency" to "Client" has incompatible type "str"' in script["bad.py"][0], output
    assert '"client" to "generate" has incompatible type "str"' in script["bad.py"][1], output
    assert checked.returncode == 1, output  # errors found (2 would be a crash or a usage error)
    # Every module of the package and both scripts, each once (so not the config's ``files``).
    modules = sum(1 for _ in (ROOT / "gemframe").rglob("*.py"))
    assert f"Found 2 errors in 1 file (checked {modules + 2} source files)" in checked.stdout, output
