"""Quick mode's process launcher: every bench process forked from one pre-imported host.

At ``--quick`` sizes a benchmark's work is a few hundred requests, and most of its CPU went to
starting interpreters: each worker, server and CLI process paid ~0.7 CPU s to import polars and
gemframe before sending its first request. In quick mode `run_all.py` therefore imports those
modules once, before it runs anything, and forks a host (`ForkHost`) that forks every python
process the benchmarks ask for (see `_common.popen`). Each child is still its own process,
running the same script, ``-m`` module or ``-c`` code with the same arguments and environment
as it would after ``exec``, and exits the way a fresh interpreter does (non-daemon threads
joined, ``atexit`` run, exit code from ``SystemExit``); only the imports are already done.
Peak RSS figures of forked children include the host's pages: meaningless at quick sizes
anyway. The default and ``--full`` runs never use this (fresh interpreters, as measured).

The host reads one JSON request per line on a pipe and answers one JSON line on another:

- ``{"op": "spawn", "argv": [...], "env": {...} | null, "stdout": PATH | null, "stderr": PATH | null}``
  -> ``{"pid": N}`` (argv is what follows ``python``; a null stream is /dev/null);
- ``{"op": "wait", "pid": N, "timeout": S | null}`` -> ``{"returncode": RC | null}`` (null: still
  running after S seconds; RC is negative for a signal, as `subprocess` reports it).

At EOF it terminates and reaps whatever children are left, then exits. The host waits for
every child and the bench waits for the host, so the children's CPU is in the bench process's
``RUSAGE_CHILDREN`` as it was with fresh processes. ``GF_BENCH_HOST_TRACE=1`` makes the host
print each child's command line and CPU seconds on stderr (where a smoke run's CPU goes).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

PYTHON = sys.executable

# What the workers, servers and CLIs of most benchmarks import; a benchmark module's
# ``HOST_PRELOAD`` replaces it (~0.6 CPU s, nearly all polars + gemframe).
DEFAULT_PRELOAD = (
    "polars",
    "pyarrow.parquet",
    "gemframe",
    "gemframe._cli",
    "gemframe.emulator",
    "uvicorn",
    "aiohttp.web",
    "_common",
    "clients",
    "server",
)
# What a raw httpx client imports on top, at its first request (with trio: ~0.1 CPU s), for the
# benchmarks that run one.
HTTPX_PRELOAD = ("httpx", "httpcore", "anyio._backends._asyncio")


# --------------------------------------------------------------------------- the bench side


class ForkHost:
    """The host, seen from the bench: `spawn` returns a Popen-like `HostedProcess`.

    The preload is imported in the calling process, which then forks the host: the bench
    process has the modules too (its own polars/gemframe work costs no second import). Create
    it before the process runs anything else: a fork copies only the calling thread, so no
    other Python thread may be running, and polars must not have run a query yet (its thread
    pool would be copied mid-state into every child)."""

    def __init__(self, preload: tuple[str, ...] = DEFAULT_PRELOAD) -> None:
        import importlib

        for name in preload:
            try:
                importlib.import_module(name)
            except ImportError:
                pass  # a child that needs it fails on its own import, as a fresh interpreter would
        to_host, from_bench = os.pipe()
        from_host, to_bench = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the host
            os.close(from_bench)
            os.close(from_host)
            code = 1
            try:
                serve(os.fdopen(to_host, "rb"), os.fdopen(to_bench, "wb"))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)  # never back into the bench's own code
        os.close(to_host)
        os.close(to_bench)
        self.requests = os.fdopen(from_bench, "wb")
        self.replies = os.fdopen(from_host, "rb")
        self.tmp = tempfile.mkdtemp(prefix="gf-bench-host-")
        self.lock = threading.Lock()
        self.count = 0

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.requests.write(json.dumps(request).encode() + b"\n")
            self.requests.flush()
            line = self.replies.readline()
        if not line:
            raise RuntimeError(f"the bench fork host exited ({_wait(self.pid, None)}); its stderr is above")
        return json.loads(line)

    def spawn(self, argv: list[str], env: dict[str, str] | None, stdout: Any, stderr: Any) -> HostedProcess:
        """``python *argv`` as a child of the host; ``stdout``/``stderr``: `subprocess.PIPE`
        (captured to a file, read back by `HostedProcess`) or anything else for /dev/null."""
        self.count += 1
        paths = {}
        for name, mode in (("stdout", stdout), ("stderr", stderr)):
            if mode == subprocess.PIPE:
                paths[name] = os.path.join(self.tmp, f"{self.count}.{name}")
                open(paths[name], "wb").close()  # exists before the child writes, so it can be opened now
        pid = self._ask({"op": "spawn", "argv": argv, "env": env, **{k: paths.get(k) for k in ("stdout", "stderr")}})[
            "pid"
        ]
        return HostedProcess(self, pid, [PYTHON, *argv], paths)

    def wait(self, pid: int, timeout: float | None) -> int | None:
        return self._ask({"op": "wait", "pid": pid, "timeout": timeout})["returncode"]

    def close(self) -> None:
        """EOF to the host, which ends and reaps what is left; then reap it (its CPU is counted)."""
        self.requests.close()
        if _wait(self.pid, 30) is None:
            os.kill(self.pid, signal.SIGKILL)
            _wait(self.pid, None)
        self.replies.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class HostedProcess:
    """The part of `subprocess.Popen` the benchmarks use, for a child of the fork host.

    Captured streams are files: ``stdout``/``stderr`` are readable file objects on them and
    `communicate` returns their bytes once the child has exited."""

    def __init__(self, host: ForkHost, pid: int, args: list[str], paths: dict[str, str]) -> None:
        self.host, self.pid, self.args = host, pid, args
        self.returncode: int | None = None
        self.stdout = open(paths["stdout"], "rb") if "stdout" in paths else None
        self.stderr = open(paths["stderr"], "rb") if "stderr" in paths else None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.host.wait(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.host.wait(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        self.wait(timeout)
        out = []
        for stream in (self.stdout, self.stderr):
            out.append(stream.read() if stream is not None else b"")
            if stream is not None:
                stream.close()
        return out[0], out[1]

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # not reaped yet, so the pid cannot have been reused
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# --------------------------------------------------------------------------- the host side


def _child(request: dict[str, Any]) -> int:
    """In the forked child: set up the streams and environment, run argv as ``python`` would."""
    import runpy

    for fd, path, flags in (
        (0, None, os.O_RDONLY),
        (1, request.get("stdout"), os.O_WRONLY | os.O_TRUNC | os.O_CREAT),
        (2, request.get("stderr"), os.O_WRONLY | os.O_TRUNC | os.O_CREAT),
    ):
        source = os.open(path or os.devnull, flags, 0o600)
        os.dup2(source, fd)
        os.close(source)
    if request.get("env") is not None:
        os.environ.clear()
        os.environ.update(request["env"])
    argv = request["argv"]
    try:
        if argv[0] == "-m":
            sys.argv, sys.path[0] = [argv[1], *argv[2:]], os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv, sys.path[0] = ["-c", *argv[2:]], os.getcwd()
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as exc:  # as the interpreter reports it: None is 0, a message is printed and 1
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    # What a fresh interpreter does at exit: join non-daemon threads, run atexit, flush.
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        import atexit

        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    return code


def _wait(pid: int, timeout: float | None) -> int | None:
    """The child's return code (reaping it), or None if it is still running after ``timeout``."""
    try:
        fd = os.pidfd_open(pid)  # readable once the child has exited: no polling
    except (AttributeError, OSError):
        fd = None
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                if os.environ.get("GF_BENCH_HOST_TRACE"):  # where a smoke run's CPU goes
                    print(f"[host] pid {pid}: {usage.ru_utime + usage.ru_stime:.2f} CPU s", file=sys.stderr)
                return os.waitstatus_to_exitcode(status)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            if fd is not None:
                select.select([fd], [], [], left)
            else:
                time.sleep(0.01 if left is None else min(0.01, left))
    finally:
        if fd is not None:
            os.close(fd)


def serve(requests: Any, replies: Any) -> None:
    """The host's loop: a request per line, a reply per line, until EOF."""

    def reply(value: dict[str, Any]) -> None:
        replies.write(json.dumps(value).encode() + b"\n")
        replies.flush()

    children: set[int] = set()
    for line in requests:
        request = json.loads(line)
        if request["op"] == "spawn":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    requests.close()
                    replies.close()
                    code = _child(request)
                finally:
                    os._exit(code)  # whatever happens, never back into the host's loop
            children.add(pid)
            if os.environ.get("GF_BENCH_HOST_TRACE"):
                print(f"[host] pid {pid}: {' '.join(request['argv'])[:150]}", file=sys.stderr)
            reply({"pid": pid})
        elif request["op"] == "wait":
            code = _wait(request["pid"], request["timeout"])
            if code is not None:
                children.discard(request["pid"])
            reply({"returncode": code})
    for pid in children:  # the bench is gone: end what it left running
        os.kill(pid, signal.SIGTERM)
    for pid in children:
        if _wait(pid, 5) is None:
            os.kill(pid, signal.SIGKILL)
            _wait(pid, None)
