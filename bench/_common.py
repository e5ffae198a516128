"""Shared helpers for the benchmarks: the bench server process, timing, peak RSS, results.

Nothing here touches the network beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from _forkhost import DEFAULT_PRELOAD, ForkHost, HostedProcess

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
MODEL = "gemini-bench"
API_KEY = "bench"

# Quick mode (`run_all.py --quick`) forks every python process from one pre-imported host
# (bench/_forkhost.py) instead of starting fresh interpreters; None otherwise.
_HOST: ForkHost | None = None


@contextlib.contextmanager
def forked_processes(preload: tuple[str, ...] = DEFAULT_PRELOAD) -> Iterator[None]:
    """While active, `popen` and `run_worker` fork python processes from one host that
    imported ``preload`` once (quick mode: imports were most of a smoke run's CPU)."""
    global _HOST
    host = ForkHost(preload)
    _HOST = host
    try:
        yield
    finally:
        _HOST = None
        host.close()


def popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes] | HostedProcess:
    """`subprocess.Popen(cmd, **kwargs)`; a python command is forked from the host instead
    while `forked_processes` is active (``stdout``/``stderr`` PIPE or DEVNULL, ``env`` kept)."""
    if _HOST is not None and cmd[0] == PYTHON:
        return _HOST.spawn(cmd[1:], kwargs.get("env"), kwargs.get("stdout"), kwargs.get("stderr"))
    return subprocess.Popen(cmd, **kwargs)


# --------------------------------------------------------------------------- the server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchServer:
    """`bench/server.py` under uvicorn in its own process, on a free loopback port.

    Use as a context manager; ``url`` is the base URL to give gemframe (``base_url=``).
    """

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | HostedProcess | None = None

    def command(self) -> list[str]:
        """The server process's command line."""
        return [PYTHON, str(BENCH / "server.py"), "--port", str(self.port), "--latency", str(self.latency)]

    def __enter__(self) -> BenchServer:
        self.proc = popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.stats()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    self.__exit__()
                    raise RuntimeError(f"bench server did not start: {err}") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _call(self, path: str, method: str = "GET") -> dict[str, Any]:
        request = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def stats(self) -> dict[str, Any]:
        """``requests``, ``bytes_in``, ``max_inflight``, ``cpu_s`` (the server's CPU so far)."""
        return self._call("/stats")

    def reset(self) -> None:
        self._call("/reset", "POST")

    def set_latency(self, seconds: float) -> None:
        self.latency = seconds
        self._call(f"/latency?s={seconds}", "POST")


# --------------------------------------------------------------------------- subprocess workers


def run_worker(script: str, args: list[str], timeout: float = 900) -> dict[str, Any]:
    """Run ``bench/<script> args...`` in a fresh interpreter; it prints one JSON line last.

    The worker's peak RSS (``VmHWM``, which the worker reads from /proc/self/status just before
    it prints) is in its own result when it reports one. In quick mode the process is forked
    from the host of `forked_processes`.
    """
    cmd = [PYTHON, str(BENCH / script), *args]
    env = {**os.environ, "PYTHONPATH": str(BENCH) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if _HOST is not None:
        hosted = popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            out, err = hosted.communicate(timeout)
        finally:
            if hosted.poll() is None:
                hosted.kill()
                hosted.wait()
        proc = subprocess.CompletedProcess(cmd, hosted.returncode, out.decode(), err.decode())
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{script} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def emit(result: dict[str, Any]) -> None:
    """A worker's result: one JSON line on stdout, with the worker's peak RSS added."""
    result.setdefault("peak_rss_mb", peak_rss_mb())
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- memory


def _status_kb(pid: int | str, field_name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb(pid: int | str = "self") -> float:
    """The process's high-water resident set size (VmHWM), in MiB."""
    kb = _status_kb(pid, "VmHWM")
    return round((kb or 0) / 1024, 1)


@dataclass
class Measured:
    """A finished child process: exit code, wall time, peak RSS, its output.

    ``peak_anon_mb`` / ``peak_file_mb``: the largest anonymous (heap) and file-backed (mapped
    files: shared libraries) parts of RSS seen while polling."""

    returncode: int
    wall_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str
    peak_anon_mb: float = 0.0
    peak_file_mb: float = 0.0


def run_measured(cmd: list[str], timeout: float = 3600, env: dict[str, str] | None = None) -> Measured:
    """Run a command, polling its VmHWM every 20 ms (the child's own mm only, so a vfork-ed
    parent's size never leaks in as ``ru_maxrss`` can); the last reading is the peak up to
    ~20 ms before exit."""
    start = time.perf_counter()
    with open(os.devnull, "rb") as devnull:
        proc = popen(cmd, stdin=devnull, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = {"VmHWM": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for name in peak:
                kb = _status_kb(proc.pid, name)
                if kb:
                    peak[name] = max(peak[name], kb / 1024)
            done.wait(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        done.set()
        watcher.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Measured(
        proc.returncode,
        time.perf_counter() - start,
        round(peak["VmHWM"], 1),
        out.decode(),
        err.decode(),
        round(peak["RssAnon"], 1),
        round(peak["RssFile"], 1),
    )


# --------------------------------------------------------------------------- timing


@contextlib.contextmanager
def timed() -> Iterator[dict[str, float]]:
    """``with timed() as t:`` then ``t["wall_s"]`` and ``t["cpu_s"]`` (whole process, all threads)."""
    t: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield t
    finally:
        t["wall_s"] = time.perf_counter() - wall
        t["cpu_s"] = time.process_time() - cpu


def prompts(n: int, tag: str = "p") -> list[str]:
    """Short, distinct prompts (no characters that JSON would escape)."""
    return [f"benchmark prompt {tag} number {i}" for i in range(n)]


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of a results table."""

    metric: str
    value: float | str
    baseline: float | str | None = None  # the value of the baseline measured in the same run
    baseline_name: str = ""
    unit: str = ""
    goal: str = ""  # e.g. "<= 1.5x", ">= 90% of ideal"
    met: bool | None = None
    ratio: float | None = None  # value / baseline unless given
    note: str = ""

    def __post_init__(self) -> None:
        if (
            self.ratio is None
            and isinstance(self.value, (int, float))
            and isinstance(self.baseline, (int, float))
            and self.baseline
        ):
            self.ratio = self.value / self.baseline


@dataclass
class Section:
    """One benchmark's results."""

    key: str
    title: str
    setup: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    versions = {}
    for name in (
        "gemframe",
        "polars",
        "pyarrow",
        "httpx",
        "httpx-aiohttp",
        "aiohttp",
        "diskcache",
        "uvicorn",
        "h11",
        "pillow",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    mem = _status_kb_meminfo()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{mem / 1024 / 1024:.1f} GiB" if mem else "?",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


def _status_kb_meminfo() -> int:
    with contextlib.suppress(OSError, StopIteration, ValueError):
        return int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
    return 0


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)
