"""The tests' zygote (tests/_zygote.py): a call through it must be the fresh ``python -m MODULE``
a real subprocess is, seen from inside the command. A probe module reports what a command can
see of its process, once from a real subprocess and twice from the zygote.

What these tests pay for is interpreter starts (a real ``python -m`` that imports gemframe costs
~0.6 CPU-s, and so does starting a gemframe zygote): the full report, which imports gemframe, is
run by one real subprocess; the other cases (an exception, ``sys.exit``, a hang, a fallback) run
the probe bare, without gemframe, which a real interpreter starts in a few milliseconds. The tests
that call through this process's zygote share it (it is the one `gemframe_cli` uses); those that
kill or replace it get their own, cheap one (`own_zygote`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from . import _zygote

PROBE = textwrap.dedent(
    """
    import json, os, signal, sys, threading, warnings

    # With no arguments the probe imports what `python -m gemframe` imports; with any it is bare (a
    # real run of it starts in milliseconds, and a fork of the zygote has imported gemframe all the
    # same): its filters, which numpy's import adds to, are then not reported.
    full = not sys.argv[1:]
    noted = None
    if full:
        import gemframe._cli

        noted = getattr(gemframe._cli, "_noted_by_the_probe", None)
        gemframe._cli._noted_by_the_probe = "an earlier call"  # a later call must not see it
    print(json.dumps({
        "argv": sys.argv, "orig_argv": sys.orig_argv, "path0": sys.path[0], "cwd": os.getcwd(),
        "umask": os.umask(0o022), "noted": noted,
        "environ": os.environ.get("GEMFRAME_PROBE"), "c_environ": os.popen("echo $GEMFRAME_PROBE").read(),
        "ttys": [os.isatty(fd) for fd in (0, 1, 2)], "stdin": sys.stdin.read(),
        "sigint": repr(signal.getsignal(signal.SIGINT)), "sigpipe": repr(signal.getsignal(signal.SIGPIPE)),
        "flags": repr(sys.flags), "filters": repr(warnings.filters) if full else None,
        "name": __name__, "spec": getattr(__spec__, "name", None), "file": globals().get("__file__"),
        "loader": getattr(__loader__, "__name__", type(__loader__).__name__),  # -c: the class
        "main": sorted(set(vars(sys.modules["__main__"])) - {"__warningregistry__"}),  # made by any warning
        "threads": threading.active_count(),
        "stdout": [sys.stdout.encoding, sys.stdout.errors, sys.stdout.line_buffering],
        "stderr": [sys.stderr.encoding, sys.stderr.errors, sys.stderr.line_buffering],
    }))
    sys.stdout.flush()

    class TornDown:  # dropped when __main__ is torn down, which in a fresh process comes before
        def __del__(self):  # the other modules' (aiohttp's "Unclosed client session" relies on it)
            print("torn down with colorsys whole:", colorsys.hls_to_rgb(0.5, 0.5, 0.5), file=sys.stderr)

    import colorsys  # imported by the probe alone: not by the zygote nor gemframe
    torn_down = TornDown()
    os.system("echo written by a subprocess; echo to stderr by a subprocess >&2")
    warnings.warn("shown in __main__ only", DeprecationWarning)
    print("crlf\\r\\nand cr\\rend")
    if sys.argv[1:] == ["raise"]:
        raise ValueError("uncaught")
    if sys.argv[1:] == ["exit"]:
        sys.exit("an exit message")
    if sys.argv[1:] == ["hang"]:
        open("hung.pid", "w").write(str(os.getpid()))
        signal.pause()
    """
)


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """``probe(*args, how)``: run the probe module by a real subprocess or the zygote, from
    ``tmp_path`` (where ``-m`` finds it), under umask 027 (or ``umask``) and a variable set after
    the zygote started; as ``python -c PROBE`` if ``option`` is ``-c``."""
    (tmp_path / "gemframe_probe.py").write_text(PROBE)
    monkeypatch.setenv("GEMFRAME_PROBE", "the caller's, at call time")

    def run(*args, how, timeout=120, umask=0o027, option="-m"):
        command = [sys.executable, option, "gemframe_probe" if option == "-m" else PROBE, *args]
        env = {**os.environ}
        old = os.umask(umask)
        try:
            if how == "subprocess":
                return subprocess.run(
                    command,
                    env=env,
                    cwd=tmp_path,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                )
            return _zygote.run(command, env=env, cwd=tmp_path, timeout=timeout)
        finally:
            os.umask(old)

    run.path = tmp_path / "gemframe_probe.py"
    return run


@pytest.fixture
def own_zygote(monkeypatch):
    """For a test that kills, replaces or fails to start the zygote: this process's zygote (the
    one `gemframe_cli` uses) is set aside and given back after, so the test costs the session no
    new gemframe zygote; the test's own preloads a cheap module (``json``) unless it says
    otherwise, and ends with the test."""
    saved, _zygote._zygote = _zygote._zygote, None
    monkeypatch.setattr(_zygote, "PRELOAD", "json")
    yield
    _zygote.shutdown()
    _zygote._zygote = saved


@pytest.mark.parametrize("option", ["-m", "-c"])
def test_a_call_is_the_same_fresh_process_as_a_real_one(probe, option):
    """One real run of the full probe against two calls (the second must not see the first), and
    the ways a command ends (an uncaught exception, ``sys.exit``) by the bare probe; as
    ``python -m gemframe_probe`` and as ``python -c PROBE`` (what `_zygote.python_c` runs)."""
    # The zygote runs, started (if it was not) under another umask than the calls'.
    assert probe("bare", how="zygote", umask=0o022).returncode == 0
    before = dict(_zygote.calls)
    # The full probe once, as -m: what it shows beyond the bare one (the warning filters gemframe's
    # imports make, no carry-over of gemframe's state) does not depend on how __main__ is run.
    full = () if option == "-m" else ("bare",)
    ends = {
        full: (0, "shown in __main__ only"),
        ("raise",): (1, "ValueError: uncaught"),
        ("exit",): (1, "an exit message"),
    }
    for args, calls in [(full, 2), (("raise",), 1), (("exit",), 1)]:
        real = probe(*args, how="subprocess", option=option)
        done = [probe(*args, how="zygote", option=option) for _ in range(calls)]
        seen = json.loads(real.stdout.splitlines()[0])
        assert seen["environ"] == "the caller's, at call time" and seen["c_environ"] == seen["environ"] + "\n"
        assert seen["umask"] == 0o027 and seen["ttys"] == [False] * 3 and seen["noted"] is None
        assert (seen["argv"][0], seen["path0"] == "") == (("-c", True) if option == "-c" else (str(probe.path), False))
        code, last = ends[args]
        *_, end, torn = real.stderr.splitlines()
        assert real.returncode == code and last in end and torn.startswith("torn down with colorsys whole: (0.25, ")
        assert (
            "DeprecationWarning: shown in __main__ only" in real.stderr and "to stderr by a subprocess" in real.stderr
        )
        for call in done:
            assert call.returncode == real.returncode
            assert json.loads(call.stdout.splitlines()[0]) == seen
            assert call.stdout == real.stdout  # the subprocess's output, the \r\n and \r translated
            assert "written by a subprocess\n" in call.stdout and "crlf\nand cr\nend\n" in call.stdout
            assert call.args == real.args
            # The same stderr (warnings, the traceback or exit message, a subprocess's lines), but
            # for the first frame of a traceback: the zygote's call of runpy.
            assert _without_the_zygote_frame(call.stderr) == real.stderr
    assert _zygote.calls["zygote"] == before["zygote"] + 4  # none fell back to a subprocess


def _without_the_zygote_frame(stderr: str) -> str:
    """``stderr`` without the traceback entry of tests/_zygote.py: its ``File`` line and the
    indented source (and ``^^^``) lines under it."""
    lines = stderr.splitlines(True)
    frame = f'  File "{_zygote.__file__}"'
    for at, line in enumerate(lines):
        if line.startswith(frame):
            end = at + 1
            while end < len(lines) and lines[end].startswith("    "):
                end += 1
            del lines[at:end]
            break
    return "".join(lines)


def test_a_hung_call_is_killed_at_its_timeout_and_the_zygote_serves_on(probe, tmp_path):
    """The timeout turns a hang into a failure, as subprocess.run's does: the child is killed
    (and reaped) before TimeoutExpired is raised, with what the child wrote so far."""
    with pytest.raises(subprocess.TimeoutExpired) as hung:
        probe("hang", how="zygote", timeout=3)  # it waits for a signal that never comes
    assert b"written by a subprocess" in hung.value.output
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "hung.pid").read_text()), 0)
    assert probe(how="zygote").returncode == 0


def test_a_dead_zygote_is_replaced_by_the_next_call(probe, own_zygote):
    assert probe("bare", how="zygote").returncode == 0
    dead = _zygote._zygote
    dead.process.kill()
    dead.process.wait()
    before = dict(_zygote.calls)
    assert probe("bare", how="zygote").returncode == 0
    assert _zygote._zygote is not dead and _zygote.calls["zygote"] == before["zygote"] + 1


def test_a_variable_read_at_start_makes_the_call_a_real_subprocess(probe, monkeypatch):
    """PYTHONPATH, HOME (user site), a locale... are read when an interpreter starts or imports,
    before the zygote forks: a call that changes one runs in a real subprocess."""
    assert probe("bare", how="zygote").returncode == 0
    before = dict(_zygote.calls)
    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    done = probe("bare", how="zygote")
    assert _zygote.calls["subprocess"] == before["subprocess"] + 1
    assert done.returncode == 1 and "DeprecationWarning: shown in __main__ only" in done.stderr


def test_a_zygote_that_cannot_start_leaves_the_calls_to_real_subprocesses(probe, own_zygote, monkeypatch):
    """If the zygote cannot import the command's modules (gemframe broken mid-edit, say), a call
    runs as a real subprocess, which shows the command's own error, and a warning says why."""
    monkeypatch.setattr(_zygote, "PRELOAD", "gemframe_not_a_module")
    before = dict(_zygote.calls)
    with pytest.warns(RuntimeWarning, match=r"(?s)did not start cleanly.*No module named 'gemframe_not_a_module'"):
        done = probe("bare", how="zygote")
    assert done.returncode == 0 and "crlf\nand cr\nend\n" in done.stdout
    assert _zygote.calls["subprocess"] == before["subprocess"] + 1 and _zygote._zygote is None


def test_a_warning_shown_at_import_is_shown_by_every_call(tmp_path, own_zygote, monkeypatch):
    """A fresh interpreter shows its imports' warnings each time it starts; the zygote imported
    once, so it shows them again in each child."""
    (tmp_path / "noisy_import.py").write_text("import warnings\nwarnings.warn('said at import')\n")
    (tmp_path / "noisy.py").write_text("import noisy_import\nprint('ran')\n")
    command = [sys.executable, "-m", "noisy"]
    monkeypatch.chdir(tmp_path)  # where the zygote (and -m) find the modules
    monkeypatch.setattr(_zygote, "PRELOAD", "noisy_import")
    real = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    before = dict(_zygote.calls)
    first, second = (_zygote.run(command, env=dict(os.environ), cwd=None, timeout=120) for _ in range(2))
    assert _zygote.calls["zygote"] == before["zygote"] + 2  # the calls did run on the zygote
    assert "UserWarning: said at import" in real.stderr and real.stdout == "ran\n"
    assert (first.stdout, first.stderr) == (second.stdout, second.stderr) == (real.stdout, real.stderr)


def test_a_shim_in_a_shell_script_is_the_real_command(probe, tmp_path, monkeypatch):
    """`Relay`: a shell script's ``python -m MODULE`` as a fork of a zygote (the ``gemframe``
    that the README's shell blocks run, tests/test_readme.py). The shell sees what the real
    command gives it (output, exit status, a traceback but for the zygote's frame) and the command
    sees what the real one does (its argv, cwd, umask, environment, streams); a call with a
    start-up variable changed runs as the real command."""
    monkeypatch.setattr(_zygote, "PRELOAD", "json")  # a cheap zygote: the probe runs bare
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}  # the scripts'
    zygote = _zygote.Zygote(env=env, cwd=str(tmp_path))
    relay = _zygote.Relay(zygote, "gemframe_probe", tmp_path / "probe.sock", timeout=60)
    try:
        (bin_dir / "real").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m gemframe_probe "$@"\n')
        (bin_dir / "relayed").write_text(relay.shim())
        for shim in bin_dir.iterdir():
            shim.chmod(0o755)
        script = """
            umask 027
            COMMAND bare; echo "exit $?"
            COMMAND exit; echo "exit $?"
            COMMAND raise; echo "exit $?"
            echo "piped in" | COMMAND bare; echo "exit $?"
            PYTHONWARNINGS=error::DeprecationWarning COMMAND bare; echo "exit $?"
        """

        def shell(command: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["bash", "-uc", script.replace("COMMAND", command)],
                cwd=tmp_path,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
            )

        real, relayed = shell("real"), shell("relayed")
        # It runs its one command: any other that reaches its socket is refused, not run.
        other = {"orig_argv": [sys.executable, "-c", "open('ran', 'w')"], "env": env, "cwd": str(tmp_path), "umask": 18}
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(str(tmp_path / "probe.sock"))
            socket.send_fds(sock, [json.dumps(other).encode()], [1, 2])
            refused = json.loads(sock.recv(1 << 16))
    finally:
        relay.close()
        zygote.close()
    exits = [line for line in real.stdout.splitlines() if line.startswith("exit ")]
    assert exits == ["exit 0", "exit 1", "exit 1", "exit 0", "exit 1"] and real.stdout.count('"umask": 23,') == 5  # 027
    assert real.stdout.count('"stdin": "piped in\\n"') == 1  # the shell's stdin, as the real command's
    assert "ValueError: uncaught" in real.stderr and "an exit message" in real.stderr
    assert relayed.stdout == real.stdout
    assert _without_the_zygote_frame(relayed.stderr) == real.stderr
    assert relay.served == 4  # the fifth changed PYTHONWARNINGS: it ran as the real command
    assert "runs `python -m gemframe_probe` only" in refused["error"] and not (tmp_path / "ran").exists()
