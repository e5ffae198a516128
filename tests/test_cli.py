"""The ``gemframe`` command and the installed package, driven the way a new user meets them:
``pip install -e .`` in a fresh virtual environment, then the command in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import venv
from pathlib import Path

import httpx
import polars as pl
import pytest

from gemframe.emulator import Emulator

from .conftest import ROOT, ServedEmulator, gemframe_cli

VENV_TIMEOUT = 180  # pip builds the editable wheel from pyproject.toml: a few seconds here


def _without_pythonpath() -> dict[str, str]:
    """The environment of a user's shell: the tests' PYTHONPATH would put the worktree on
    sys.path and hide what the install itself does."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A new virtual environment with ``pip install -e <repo>``, as the README says. It sees the
    test environment's packages (``--system-site-packages``) and installs nothing else, so no
    network is needed; hatchling, the build backend, comes with the test extra."""
    home = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(home)
    python = home / "bin" / "python"
    command = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-input",
        "-e",
        str(ROOT),
    ]
    done = subprocess.run(
        command, env=_without_pythonpath(), capture_output=True, text=True, timeout=VENV_TIMEOUT, check=False
    )
    assert done.returncode == 0, done.stderr
    return home


def _installed_python(installed: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -c CODE`` in the virtual environment, from a user's shell (no PYTHONPATH)."""
    return subprocess.run(
        [str(installed / "bin" / "python"), "-c", code],
        cwd=cwd,
        env=_without_pythonpath(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.xdist_group("installed")  # one worker builds the module's virtual environment, once
def test_editable_install_wins_over_the_folder_holding_the_clone(installed, tmp_path):
    """``git clone`` makes ``parent/gemframe/`` (no ``__init__.py``): Python started in
    ``parent`` must import the installed package, not that folder as a namespace package."""
    parent = tmp_path / "parent"
    (parent / "gemframe").mkdir(parents=True)
    (parent / "gemframe" / "README.md").write_text("a clone of the repository\n")
    probe = "import gemframe; print(gemframe.__file__); print(gemframe.Client.__name__)"
    done = _installed_python(installed, probe, cwd=parent)
    assert done.returncode == 0, done.stderr
    where, name = done.stdout.split()
    assert Path(where) == ROOT / "gemframe" / "__init__.py" and name == "Client"


@pytest.mark.xdist_group("installed")
def test_install_brings_the_emulator_server(installed):
    """``pip install .`` installs what ``Requires-Dist`` names: uvicorn, which ``gemframe
    emulator`` serves with, must be among them without an extra. Then the installed command
    serves the emulator."""
    probe = "import importlib.metadata as m; print('\\n'.join(m.requires('gemframe')))"
    done = _installed_python(installed, probe, cwd=installed)
    assert done.returncode == 0, done.stderr
    unconditional = [r for r in done.stdout.splitlines() if ";" not in r]
    assert any(re.match(r"uvicorn\b", r) for r in unconditional), unconditional

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [str(installed / "bin" / "gemframe"), "emulator", "--port", str(port)],
        env=_without_pythonpath(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1beta/models/gemini-2.5-flash:generateContent"
        body = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
        deadline = time.monotonic() + 60
        while True:  # wait for the server to listen (or to die)
            assert server.poll() is None, server.stderr.read()
            try:
                answer = httpx.post(url, json=body, headers={"x-goog-api-key": "k"}, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "gemframe emulator never listened"
                time.sleep(0.05)
        assert answer.status_code == 200, answer.text
        assert "hello" in answer.json()["candidates"][0]["content"]["parts"][0]["text"]
    finally:
        server.terminate()
        server.wait(10)


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemframe: error: "), done.stderr
    return lines[0]


def test_version():
    import gemframe

    done = gemframe_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"gemframe {gemframe.__version__}"


def test_missing_or_foreign_input_is_one_line_not_a_traceback(tmp_path):
    plain = tmp_path / "plain.parquet"
    pl.DataFrame({"a": [1, 2]}).write_parquet(plain)
    text = tmp_path / "notes.parquet"
    text.write_text("not parquet\n")
    missing = str(tmp_path / "missing.parquet")
    out = str(tmp_path / "out.parquet")

    for args in (
        ("run", missing, out, "--emulator"),
        ("run", missing, out, "--emulator", "--dry-run"),
        ("report", missing),
        ("manifest", missing),
    ):
        assert "missing.parquet: no such file" in _one_line_error(gemframe_cli(*args))
    assert "no reply fields" in _one_line_error(gemframe_cli("report", str(plain)))
    assert "has no gemframe manifest" in _one_line_error(gemframe_cli("manifest", str(plain)))
    assert "not a readable parquet file" in _one_line_error(gemframe_cli("report", str(text)))
    assert "is a directory" in _one_line_error(gemframe_cli("run", str(tmp_path), out, "--emulator"))
    assert not os.path.exists(out)


class _Arrivals:
    """The emulator, noting when each generate request arrives."""

    def __init__(self) -> None:
        self.app = Emulator()
        self.times: list[float] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].endswith(":generateContent"):
            self.times.append(time.monotonic())
        await self.app(scope, receive, send)


def test_rpm_paces_the_run_at_the_server(tmp_path):
    rows, rpm = 21, 1200  # 20 requests/s, evenly spaced: 20 gaps take at least a second
    source = tmp_path / "in.parquet"
    pl.DataFrame({"prompt": [f"paced {i}" for i in range(rows)]}).write_parquet(source)
    app = _Arrivals()
    served = ServedEmulator(app)
    try:
        done = gemframe_cli(
            "run",
            str(source),
            str(tmp_path / "out.parquet"),
            "--provider",
            "google",
            "--base-url",
            served.url,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--rpm",
            str(rpm),
            "--tpm",
            "4000000",
            "--no-progress",
            "--concurrency",
            "16",
            GEMINI_API_KEY="test-key",
        )
    finally:
        served.stop()
    assert done.returncode == 0, done.stderr
    assert len(app.times) == rows
    span = max(app.times) - min(app.times)
    assert span >= (rows - 1) / (rpm / 60) * 0.95, f"{rows} requests arrived within {span:.2f} s"
