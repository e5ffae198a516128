"""A zygote for the tests' ``gemframe`` runs (`tests.conftest.gemframe_cli`): one helper process
per test process that has imported ``gemframe._cli`` (polars, pyarrow, aiohttp...) once, and that
forks a fresh child for each call. A real ``python -m gemframe`` spends ~0.6 CPU-s importing before
a few milliseconds of work; a fork of the zygote starts with all of that done.

Why a small fork server of our own rather than `multiprocessing`'s forkserver: its children are
meant to run a pickled Python target, not to become a fresh ``python -m gemframe``. They take the
parent's ``sys.argv``, re-import the parent's ``__main__``, exit through multiprocessing's own
bootstrap (which prints an uncaught exception under a "Process-1" header and sets exit codes its
way), inherit the server's stdout/stderr (passing ours means its fd-passing internals), and the
forkserver brings a resource-tracker process along. Here each call is one message over a Unix
socket (the arguments, environment, cwd and umask, plus the two capture files as descriptors) and
one answer (the wait status), and every step of becoming a fresh process is in plain sight
(`_become`).

A child is a fresh ``python -m gemframe`` in every respect the command can see:

- fds 0, 1, 2 are /dev/null and two temp files of the caller (so what C code or a subprocess
  writes is captured too; none is a tty; regular files where subprocess gives pipes, which
  nothing here tells apart and which never block a child that writes much), ``sys.std*`` are
  the interpreter's own objects on them;
- its cwd, umask and environment (``os.environ`` and the C environment) are the caller's at call
  time plus the call's variables; ``sys.path[0]`` is the cwd, as ``-m`` puts it there;
- ``__main__`` is run by `runpy._run_module_as_main`, the function ``python -m`` calls, in a new
  ``__main__`` module: ``sys.argv[0]`` is ``gemframe/__main__.py``, ``sys.orig_argv`` the command
  line; an exception or ``SystemExit`` leaves the child the way it leaves any interpreter (the
  traceback printed by ``sys.excepthook``, exit status 1 or the exit code; a traceback has one
  more frame at its top, this file's call of runpy);
- SIGINT is handled as at interpreter start (KeyboardInterrupt), whatever the zygote does with it;
- warnings: the zygote never touches the filters, and the warnings its imports showed are shown
  again in each child, as a fresh interpreter's imports would show them;
- nothing from earlier calls: each call is a new fork of the zygote, which never runs gemframe;
- a child ends as any interpreter does: non-daemon threads joined, atexit handlers run, modules
  torn down (``__del__`` methods...), buffers flushed. The objects the zygote's imports made are
  frozen out of the cyclic collector (`gc.freeze`), so the child's collections skip them.

A shell script can run ``python -m MODULE`` on a zygote too (`Relay`: what the README's shell
blocks run as ``gemframe``): its shim hands the call its own stdout and stderr, and exits as the
call did.

A call may also be ``[sys.executable, "-c", CODE, *args]``, a test's script that imports gemframe
and runs to its end (`python_c`): the child is then a fresh ``python -c`` as above, but for what
``-c`` does differently from ``-m``: ``sys.argv`` is
``["-c", *args]``, ``sys.path[0]`` is ``''``, and ``__main__`` is the bare module the interpreter
makes (``__loader__`` BuiltinImporter, no ``__spec__`` nor ``__file__``) in which CODE, compiled as
``"<string>"``, is executed; its exceptions and exit as above. A script that must see its own
imports happen (what importing gemframe does when IPython is there, which modules it loads) or
changes a start-up variable needs a real interpreter: the first is the caller's to know, the
second falls back by itself.

What is drawn at random once per process is drawn once per zygote: the str hash seed, and values
made at import (gemframe's splice mark in ``_core/payload.py``, numpy's legacy global seed). Each
child's is as unpredictable as a fresh process's; they are only equal across the calls of one
zygote. (`random` is reseeded in every child by the standard library.)

What the zygote cannot give a child is what an interpreter reads when it starts or imports: the
``PYTHON*`` variables, the locale, ``HOME`` (user site), ``SSL_CERT_FILE`` (aiohttp's context at
import), the allocators' and BLAS's variables... So a call goes to the zygote only when its
environment differs from the zygote's in `CALL_TIME` variables alone: the ones gemframe reads
when it is used (none at import: the zygote checks that, see `_preload`). Any other difference
(a test that changes PYTHONPATH or HOME) makes the call a real ``python -m gemframe``, and so does
a call made while another is running on the same zygote.

Fork safety: forking a process whose polars or pyarrow thread pools have started deadlocks the
child; importing them starts no pool, and the zygote does nothing but import (`_preload` checks
that no pool thread exists). The library threads that importing starts (jemalloc's background
threads, OpenBLAS's, polars' idle spill cleaner) are not carried into a child, as with any fork;
jemalloc and OpenBLAS take their locks across a fork (pthread_atfork) and start them again.
"""

from __future__ import annotations

import builtins
import gc
import importlib.machinery
import json
import os
import re
import runpy
import select
import signal
import socket
import sys
import threading
import types
import warnings

CALL_TIME = re.compile(r"GEMFRAME_\w+|GEMINI_API_KEY|GOOGLE_API_KEY|SEGMIND_API_KEY|XDG_CACHE_HOME|PYTEST_CURRENT_TEST")
"""Variables a call may set or change and still run on the zygote: gemframe's own, which it reads
when used (the cache directory, provider, prices, keys) and pytest's note of the running test."""

SHELL_OWN = frozenset({"PWD", "OLDPWD", "SHLVL", "_"})
"""Variables a shell sets for every command it runs, which no interpreter reads as it starts."""

PRELOAD = "gemframe._cli"
LINUX = sys.platform.startswith("linux")  # os.pidfd_open, SOCK_SEQPACKET: elsewhere, real subprocesses
_MESSAGE = 1 << 20  # the largest message: an environment is a few kB
_KILL_WAIT = 30.0  # how long a child killed at the timeout may take to be reaped


class Unavailable(Exception):
    """The zygote did not start (gemframe does not import, say): calls run as real subprocesses,
    which show the command's own error."""


calls = {"zygote": 0, "subprocess": 0}
"""How many calls each way went, in this process (for a reviewer's curiosity; nothing reads it)."""


# -- the caller's side: in the test process ------------------------------------------------------


class Zygote:
    """The helper process and the socket to it. Started by `run`; `close` ends it."""

    def __init__(self, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        """A zygote started in ``env`` (default: this process's environment) and ``cwd``."""
        import subprocess
        import tempfile

        self.environ = dict(os.environ if env is None else env)  # what its interpreter and imports saw
        self.lock = threading.Lock()
        self.log = tempfile.TemporaryFile()  # the zygote's own stdout and stderr: empty unless it fails
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, __file__, str(theirs.fileno()), PRELOAD],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=self.log,
                stderr=self.log,
                env=self.environ,
                cwd=cwd,
            )
        self.sock = ours
        try:
            ready = self._answer(120.0)
        except TimeoutError:
            ready = None
        if not ready or self._output():  # it died, or an import printed what a child would not
            output = self._output()
            self.close()
            raise Unavailable(f"the gemframe zygote did not start cleanly:\n{output}")
        read = [name for name in ready["read_at_import"] if CALL_TIME.fullmatch(name)]
        if read:  # then a call that changes one would not be a fresh process's
            self.close()
            raise RuntimeError(
                f"importing {PRELOAD} read {', '.join(read)}: gemframe must read its environment "
                "when it is used, not at import (a program may set it after importing gemframe)"
            )

    def serves(self, env: dict[str, str]) -> bool:
        """Whether a call with this environment can run here: only CALL_TIME variables differ
        (and SHELL_OWN ones, for a call from a shell through `Relay`)."""
        changed = {k for k in self.environ.keys() | env.keys() if self.environ.get(k) != env.get(k)}
        return all(CALL_TIME.fullmatch(k) or k in SHELL_OWN for k in changed) and self.process.poll() is None

    def run(self, command: list[str], env: dict[str, str], cwd: str, timeout: float, *, umask=None, fds=None):
        """One call: fork a child for ``command``, wait for it (killing it at ``timeout``). Its
        stdout and stderr are captured, or are the descriptors ``fds`` (then not captured:
        stdout and stderr, or stdin, stdout and stderr); its umask is this process's, or
        ``umask``."""
        import subprocess
        import tempfile

        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            captured = fds is None
            request = {"orig_argv": command, "env": env, "cwd": cwd, "umask": _umask() if umask is None else umask}
            targets = [out.fileno(), err.fileno()] if captured else list(fds)
            socket.send_fds(self.sock, [json.dumps(request).encode()], targets)
            try:
                answer = self._answer(timeout)
            except TimeoutError:
                self.sock.send(b"kill")
                answer = self._answer(_KILL_WAIT)
                if answer is not None:
                    raise subprocess.TimeoutExpired(
                        command,
                        timeout,
                        output=_read(out) if captured else None,
                        stderr=_read(err) if captured else None,
                    ) from None
            if answer is None:
                raise RuntimeError(f"the gemframe zygote died during {command[3:]}:\n{self._output()}")
            stdout, stderr = (_text(_read(out)), _text(_read(err))) if captured else (None, None)
        return subprocess.CompletedProcess(command, os.waitstatus_to_exitcode(answer["status"]), stdout, stderr)

    def call(self, command: list[str], env: dict[str, str], cwd: str, timeout: float, **how):
        """`run` (``how``: its keywords) if this zygote can take the call now: it `serves` the
        environment and runs no other call. None if not: the caller runs the real command."""
        if not self.serves(env) or not self.lock.acquire(blocking=False):
            return None
        try:
            return self.run(command, env, cwd, timeout, **how)
        finally:
            self.lock.release()

    def _answer(self, timeout: float) -> dict | None:
        """The zygote's next message, or None if it has gone."""
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(_MESSAGE)
        except TimeoutError:
            raise
        except OSError:  # ConnectionResetError...
            return None
        return json.loads(message) if message else None

    def _output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def close(self) -> None:
        """End the zygote: at the end of the socket it kills a child still running, and exits."""
        self.sock.close()
        try:
            self.process.wait(10)
        except Exception:
            self.process.kill()
            self.process.wait()
        self.log.close()


class Relay:
    """``python -m MODULE`` for shell scripts, on a zygote: a Unix socket at ``path`` where a
    `shim` asks ``zygote`` for a call, with the shim's own stdin, stdout and stderr, environment,
    cwd and umask, and exits as the call did. A call the zygote cannot serve is told so, and the
    shim becomes the real command: one that changes a start-up variable (`Zygote.serves`), or
    comes while another runs (``gemframe emulator &`` then a client). Each connection has a
    thread of this process. What a shim cannot pass on: a signal sent to the shim does not reach
    the call (the zygote's child), which a README block never sends."""

    def __init__(self, zygote: Zygote, module: str, path, timeout: float) -> None:
        self.zygote, self.module, self.timeout = zygote, module, timeout
        self.served = 0  # calls run on the zygote (the others ran as real commands)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.sock.bind(os.fspath(path))  # OSError for a path over 107 bytes
            self.sock.listen()
        except OSError:
            self.sock.close()
            raise
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def shim(self) -> str:
        """A ``/bin/sh`` script that runs ``python -m MODULE "$@"`` through this relay. The
        client is this file, run by an interpreter without its site (``-I -S``): ~20 ms."""
        address = self.sock.getsockname()
        return f'#!/bin/sh\nexec "{sys.executable}" -I -S "{__file__}" --call "{address}" {self.module} "$@"\n'

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        """One shim's call. Whatever goes wrong (a shim gone, a bad request, a dead zygote) ends
        this connection only; the shim then fails, or runs the real command if nothing ran."""
        fds: list[int] = []
        try:
            with conn:
                message, fds, _, _ = socket.recv_fds(conn, _MESSAGE, 3)
                request = json.loads(message)
                answer: dict = {}
                if request["orig_argv"][:3] != [sys.executable, "-m", self.module]:  # its command only
                    answer = {"error": f"this relay runs `python -m {self.module}` only"}
                elif len(fds) == 3:
                    try:
                        done = self.zygote.call(
                            request["orig_argv"],
                            request["env"],
                            request["cwd"],
                            self.timeout,
                            umask=request["umask"],
                            fds=fds,
                        )
                    except Exception as exc:  # a hang killed at the timeout, a dead zygote
                        answer = {"error": f"{type(exc).__name__}: {exc}"}
                    else:
                        if done is not None:
                            answer = {"returncode": done.returncode}
                            self.served += 1
                conn.send(json.dumps(answer).encode())
        except Exception:  # the shim went away (BrokenPipeError), or sent what is not a call
            pass
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.sock.close()
        self.thread.join(10)


def _call(address: str, module: str, args: list[str]) -> None:
    """A shim's side of `Relay`: run ``python -m MODULE ARGS`` there, and exit as it did."""
    command = [sys.executable, "-m", module, *args]
    request = {"orig_argv": command, "env": dict(os.environ), "cwd": os.getcwd(), "umask": _umask()}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(address)
            socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
            answer = json.loads(sock.recv(_MESSAGE) or b'{"error": "the relay closed the connection"}')
    except OSError as exc:  # no relay there (any more): nothing ran
        answer = {"unreachable": str(exc)}
    if "error" in answer:
        sys.exit(f"gemframe zygote relay: {command[2:]} failed: {answer['error']}")
    if "returncode" not in answer:  # not for the zygote: the real command, in this process
        os.execv(sys.executable, command)
    code = answer["returncode"]
    if code < 0:  # killed by a signal: so is this process, as a shell sees it (128 + N)
        if -code != signal.SIGKILL:  # which cannot be caught, nor set to its default
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


_zygote: Zygote | None = None
_starting = threading.Lock()


def run(command: list[str], *, env: dict[str, str], cwd, timeout: float):
    """``subprocess.run(command, env=env, cwd=cwd, stdin=DEVNULL, capture_output=True, text=True,
    timeout=timeout)`` for ``command`` = ``[sys.executable, "-m", MODULE, *args]`` (``gemframe``,
    or a test's probe) or ``[sys.executable, "-c", CODE, *args]`` (a test's script), through the
    zygote when it can serve the call (see the module docstring), else as that real subprocess."""
    import subprocess

    if command[:2] not in ([sys.executable, "-m"], [sys.executable, "-c"]) or len(command) < 3:
        raise ValueError(f"not a `python -m MODULE` or `python -c CODE` command line: {command}")

    global _zygote
    env = {k: os.fsdecode(v) for k, v in env.items()}
    cwd = os.path.abspath(cwd) if cwd is not None else os.getcwd()
    if not os.path.isdir(cwd):  # where subprocess would fail, before the command runs
        raise NotADirectoryError(f"cwd is not a directory: {cwd!r}")
    with _starting:
        if _zygote is not None and _zygote.process.poll() is not None:
            _zygote.close()  # it died: the next call starts a new one (this one)
            _zygote = None
        if _zygote is None and LINUX:
            try:
                _zygote = Zygote()
            except Unavailable as exc:
                warnings.warn(
                    f"{exc}\n(running `python {command[1]} {command[2][:60]}` in a subprocess)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        zygote = _zygote
    if zygote is not None:
        try:
            done = zygote.call(command, env, cwd, timeout)
        except BaseException as exc:
            if not isinstance(exc, subprocess.TimeoutExpired):
                shutdown()  # where the protocol stands is unknown: start afresh next time
            raise
        if done is not None:
            calls["zygote"] += 1
            return done
    calls["subprocess"] += 1
    return subprocess.run(
        command,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def python_c(code: str, *args, cwd=None, timeout: float = 120, **env: str):
    """Run ``python -c CODE ARGS`` to its end (``env``: variables added to this environment; stdin
    /dev/null); its output as text. Through the zygote when it can (see `run`): a script that
    imports gemframe then costs a fork, not ~0.6 CPU-s of imports. A test that signals or kills
    its script, or must see gemframe being imported, runs a real subprocess instead."""
    return run([sys.executable, "-c", code, *map(str, args)], env={**os.environ, **env}, cwd=cwd, timeout=timeout)


def shutdown() -> None:
    """End this process's zygote, if any (at the end of the session)."""
    global _zygote
    with _starting:
        if _zygote is not None:
            _zygote.close()
            _zygote = None


def _umask() -> int:
    """This process's umask, read without setting it (Linux), else by setting it back at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _read(file) -> bytes:
    file.seek(0)
    return file.read()


def _text(data: bytes) -> str:
    """Bytes as ``subprocess.run(text=True)`` decodes them: the locale's encoding (UTF-8 in UTF-8
    mode), universal newlines."""
    import locale

    encoding = "utf-8" if sys.flags.utf8_mode else locale.getencoding()
    return data.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")


# -- the zygote's side: ``python tests/_zygote.py FD`` ---------------------------------------------


def _preload(module: str) -> dict:
    """Import the command's modules as ``python -m gemframe`` would (``sys.path[0]`` the cwd,
    ``sys.argv`` ``["-m"]``), noting the variables they read and the warnings they showed."""
    if not sys.flags.safe_path:
        sys.path[0] = os.getcwd()  # not this script's directory
    sys.argv = ["-m"]
    read: set[str] = set()
    shown: list[tuple] = []

    class Traced(type(os.environ)):  # type: ignore[misc]
        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

    environ_class, showwarning = type(os.environ), warnings.showwarning
    os.environ.__class__ = Traced
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: shown.append(
        (message, category, filename, lineno, line)
    )
    try:
        __import__(module)
    finally:
        os.environ.__class__ = environ_class
        warnings.showwarning = showwarning
    pools = [name for name in _thread_names() if re.fullmatch(r"polars-\d+|tokio-rt-worker", name)]
    if threading.active_count() != 1 or pools:
        raise RuntimeError(f"the zygote has threads before forking: {threading.enumerate()} {pools}")
    return {"read": read, "shown": shown}


def _thread_names() -> list[str]:
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:
            pass
    return names


def _serve(sock: socket.socket) -> dict:
    """Answer calls until the caller closes the socket (then exit). Returns only in a forked
    child, with its request."""
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, _MESSAGE, 3)
        except ConnectionError:
            message, fds = b"", []
        if not message:
            sys.exit(0)
        if message == b"kill":  # too late: the child it meant had ended (and been answered for)
            continue
        pid = os.fork()
        if pid == 0:
            sock.close()
            return {**json.loads(message), "fds": fds}
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps({"status": _wait(sock, pid)}).encode())


def _wait(sock: socket.socket, pid: int) -> int:
    """The child's wait status; kill it if the caller says so (its timeout) or goes away."""
    pidfd = os.pidfd_open(pid)
    try:
        while True:
            ready, _, _ = select.select([sock, pidfd], [], [])
            if pidfd in ready:
                return os.waitpid(pid, 0)[1]
            try:
                said = sock.recv(_MESSAGE)
            except ConnectionError:
                said = b""
            os.kill(pid, signal.SIGKILL)
            if said != b"kill":  # the caller is gone: nobody will ever ask for this child
                os.waitpid(pid, 0)
                sys.exit(0)
    finally:
        os.close(pidfd)


def _become(request: dict, startup: dict, sigint) -> None:
    """Make this forked child the fresh ``python -m MODULE`` or ``python -c CODE`` the request
    describes."""
    fds = request["fds"]  # stdout and stderr; or stdin too (`Relay`)
    for fd, target in zip(fds if len(fds) == 3 else [os.open(os.devnull, os.O_RDONLY), *fds], (0, 1, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()  # os.environ's methods set the C environment too (putenv, unsetenv)
    os.environ.update(request["env"])
    option = request["orig_argv"][1]
    if not sys.flags.safe_path:
        sys.path[0] = os.getcwd() if option == "-m" else ""  # as -m and -c put it
    sys.argv = [option, *request["orig_argv"][3:]]  # runpy puts the module's path in sys.argv[0]
    sys.orig_argv = request["orig_argv"]
    main = sys.modules["__main__"] = types.ModuleType("__main__")  # runpy fills it in for -m
    main.__annotations__ = {}  # as the interpreter makes it (add_main_module)
    if option == "-c":  # the rest of what add_main_module makes, which -c runs in as it is
        main.__loader__ = importlib.machinery.BuiltinImporter
        main.__builtins__ = builtins
    signal.signal(signal.SIGINT, sigint)
    for message, category, filename, lineno, line in startup["shown"]:
        warnings.showwarning(message, category, filename, lineno, None, line)


if __name__ == "__main__" and sys.argv[1] == "--call":  # a `Relay.shim`
    _call(sys.argv[2], sys.argv[3], sys.argv[4:])
elif __name__ == "__main__":
    _control = socket.socket(fileno=int(sys.argv[1]))
    _startup = _preload(sys.argv[2])
    # The imported modules' objects go to the collector's permanent generation: a child's
    # collections, and its interpreter's final one, then never touch them, which halves what a
    # call costs (its pages stay shared instead of being copied to write the collector's marks).
    # This is the use gc.freeze is documented for; a child can only tell by gc.get_freeze_count().
    gc.freeze()
    _sigint = signal.getsignal(signal.SIGINT)  # what a fresh interpreter has (the caller's Ctrl-C...)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ... is the child's to handle, never the zygote's
    _control.send(json.dumps({"read_at_import": sorted(_startup["read"])}).encode())
    _request = _serve(_control)
    _become(_request, _startup, _sigint)
    # No name here may hold the new __main__: the interpreter's teardown must find it referenced
    # by sys.modules alone, as in a fresh process, or its objects outlive the modules their
    # __del__ methods use (aiohttp's "Unclosed client session" becomes a TypeError).
    if _request["orig_argv"][1] == "-m":
        runpy._run_module_as_main(_request["orig_argv"][2])  # what `python -m gemframe` runs
    else:  # what `python -c CODE` runs (PyRun_SimpleString)
        exec(compile(_request["orig_argv"][2], "<string>", "exec"), sys.modules["__main__"].__dict__)
