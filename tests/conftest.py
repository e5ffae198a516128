"""Shared fixtures: an in-process emulator (counting requests at the server), a client wired
to it with a private cache directory, and small images.

The suite runs on pytest-xdist worker processes (``addopts`` in pyproject.toml), so every
fixture here is per process: ports are bound to 0 and kept, caches live under ``tmp_path``,
environment variables are set with ``monkeypatch``. Tests that must not overlap carry
``@pytest.mark.xdist_group(NAME)`` and run on one worker, one after another:

- ``"ray"``: tests/test_ray.py, whose module fixture starts a local Ray of two CPUs (the
  README's Ray part runs in it too): one worker starts it, once, and never two Rays share the
  machine.
- ``"installed"``: the tests of tests/test_cli.py that share a module-scoped virtual
  environment (built once, by one worker).

Tests never race the clock: they wait for a condition (`wait_for`) with a timeout that only
a hang reaches.

Tests marked ``slow`` are handed out first (`pytest_collection_modifyitems`): most of the
suite's time is in a few long tests, and one handed out last sets how long the whole run takes.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

import gemframe as gf
from gemframe.emulator import Emulator

from . import _zygote

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"


# The files of the longest slow tests (20-60 s each on an idle 2-CPU machine, mostly CPU: a
# Ray runtime in a subprocess, mypy, the benchmarks' processes), handed out before the others.
LONGEST_FIRST = ("test_readme.py", "test_typing.py", "test_bench_smoke.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first, the files in LONGEST_FIRST first among them. pytest-xdist hands tests
    to the workers in this order (after the ``xdist_group`` groups, largest first), so the long
    tests start at once, side by side, and the many short ones fill in around them: handed out
    in file order, the README and mypy tests started last and ran alone at the end of the run."""

    def rank(item: pytest.Item) -> tuple[bool, int]:
        name = item.path.name
        first = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        return item.get_closest_marker("slow") is None, first

    items.sort(key=rank)  # a stable sort: each part keeps its order


def wait_for(condition, *, timeout: float = 60.0, what: str = "a condition") -> None:
    """Poll ``condition()`` until it holds. Tests wait for a condition (a server started,
    requests seen), never for a fixed time; ``timeout`` only turns a hang into a failure, so it
    is generous: a loaded machine may be many times slower than an idle one."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.005)


def gemframe_command(*args) -> list[str]:
    """The command line of ``gemframe ARGS`` as a user's shell runs it, with this interpreter
    (so this checkout's package, through the PYTHONPATH the tests run with)."""
    return [sys.executable, "-m", "gemframe", *map(str, args)]


def gemframe_run_args(src, dst, *, provider: str, base_url: str, cache_dir) -> list:
    """The arguments of ``gemframe run SRC DST`` against a loopback server, with a cache of its
    own and no progress bar; a test adds its own options after them."""
    return ["run", src, dst, "--provider", provider, "--base-url", base_url, "--cache-dir", cache_dir, "--no-progress"]


def gemframe_cli(*args, cwd=None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``gemframe ARGS`` to its end (``env``: variables added to this environment; stdin
    /dev/null); its output as text. The timeout only turns a hang into a failure.

    It runs as a fork of this process's zygote (tests/_zygote.py), which has imported the
    command's modules once: the same fresh ``python -m gemframe`` for the command, without
    ~0.6 CPU-s of imports per call. Tests of how the command starts (the console script, Ctrl-C,
    kill -9) run `gemframe_command` in a real subprocess instead."""
    return _zygote.run(gemframe_command(*args), env={**os.environ, **env}, cwd=cwd, timeout=120)


def pytest_sessionfinish(session) -> None:
    """This process's gemframe zygote ends with the session (each pytest-xdist worker has its own)."""
    _zygote.shutdown()


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path):
    """No real keys and no shared cache leak into a test."""
    for var in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "SEGMIND_API_KEY", "GEMFRAME_PROVIDER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GEMFRAME_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.fixture
def emulator() -> Emulator:
    return Emulator()


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def client(emulator, cache_dir):
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False) as c:
        yield c


def _image_bytes(fmt: str = "PNG", size=(32, 24), color="navy") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def image_bytes():
    """``image_bytes(fmt, size, color)`` makes a small image's bytes."""
    return _image_bytes


@pytest.fixture
def png_path(tmp_path) -> Path:
    path = tmp_path / "square.png"
    path.write_bytes(_image_bytes("PNG", (40, 30)))
    return path


@pytest.fixture
def sample_input(tmp_path):
    """sample_data/prompts.parquet with absolute image paths (tests run from any directory)."""
    frame = pl.read_parquet(SAMPLE / "prompts.parquet").with_columns(
        pl.col("image_path").map_elements(lambda p: str(SAMPLE.parent / p), return_dtype=pl.String)
    )
    path = tmp_path / "prompts.parquet"
    frame.write_parquet(path)
    return path


@pytest.fixture
def repo_root() -> Path:
    return ROOT


class ServedEmulator:
    """An emulator served over TCP on 127.0.0.1 by uvicorn in a background thread.

    The listening socket is bound here (port 0) and handed to uvicorn still open: picking a
    free port, closing it and letting uvicorn bind it again races with every other process
    on the machine (the other pytest-xdist worker included) that may take the port meanwhile.
    """

    def __init__(self, emulator: Emulator) -> None:
        import socket
        import threading

        import uvicorn

        self.emulator = emulator
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(emulator, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), what="the served emulator to start")
        assert self.server.started, f"uvicorn did not start on {self.url}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def served_emulator():
    """``served_emulator(**knobs)`` starts an emulator on a free loopback port."""
    servers: list[ServedEmulator] = []

    def start(**knobs) -> ServedEmulator:
        servers.append(ServedEmulator(Emulator(**knobs)))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def fault_server():
    """``fault_server(**knobs)`` starts a misbehaving server on a free loopback port."""
    from .fault_server import FaultServer

    servers = []

    def start(**knobs):
        servers.append(FaultServer(**knobs).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


# -- a loopback server of image URLs (test_payload, test_display) ------------------------------


class ImageServer:
    """A loopback HTTP server for image URLs: ``routes`` maps a path to (status, headers,
    body); a body may be an int N (N bytes of a PNG-looking stream, sent chunked unless the
    headers give its Content-Length). It records
    each path requested and how many body bytes it managed to send."""

    def __init__(self, routes):
        import http.server
        import threading

        self.routes, self.requested, self.hosts, self.sent, self.done = routes, [], [], {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                server.requested.append(self.path)
                server.hosts.append(self.headers.get("Host"))
                status, headers, body = server.routes[self.path]
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if isinstance(body, int):
                    chunked = "Content-Length" not in headers
                    if chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        self._stream(body, chunked)
                    finally:
                        server.done.append(self.path)
                else:
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def _stream(self, total, chunked):
                chunk = b"\x89PNG\r\n\x1a\n" + bytes(2**20 - 8)
                sent = server.sent[self.path] = 0
                try:
                    while sent < total:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                        sent += len(chunk)
                        server.sent[self.path] = sent
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                except OSError:  # the client stopped reading and hung up
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def wait_done(self, *paths):
        """Wait until the streams to ``paths`` have ended (sent whole, or the client hung up)."""
        import time

        deadline = time.monotonic() + 30
        while not set(paths) <= set(self.done) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert set(paths) <= set(self.done)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_server():
    servers = []

    def start(routes):
        servers.append(ImageServer(routes))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
