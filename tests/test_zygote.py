"""The tests' zygote (tests/_zygote.py): a call through it must be the fresh ``python -m MODULE``
a real subprocess is, seen from inside the command. A probe module reports what a command can
see of its process, once from a real subprocess and twice from the zygote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from . import _zygote

PROBE = textwrap.dedent(
    """
    import json, os, signal, sys, threading, warnings
    import gemframe._cli  # what `python -m gemframe` imports (numpy adds warning filters)

    noted = getattr(gemframe._cli, "_noted_by_the_probe", None)
    gemframe._cli._noted_by_the_probe = "an earlier call"  # a later call must not see it
    print(json.dumps({
        "argv": sys.argv, "orig_argv": sys.orig_argv, "path0": sys.path[0], "cwd": os.getcwd(),
        "umask": os.umask(0o022), "noted": noted,
        "environ": os.environ.get("GEMFRAME_PROBE"), "c_environ": os.popen("echo $GEMFRAME_PROBE").read(),
        "ttys": [os.isatty(fd) for fd in (0, 1, 2)], "stdin": sys.stdin.read(),
        "sigint": repr(signal.getsignal(signal.SIGINT)), "sigpipe": repr(signal.getsignal(signal.SIGPIPE)),
        "flags": repr(sys.flags), "filters": repr(warnings.filters), "name": __name__, "spec": __spec__.name,
        "main": sorted(set(vars(sys.modules["__main__"])) - {"__warningregistry__"}),  # made by any warning
        "threads": threading.active_count(),
        "stdout": [sys.stdout.encoding, sys.stdout.errors, sys.stdout.line_buffering],
        "stderr": [sys.stderr.encoding, sys.stderr.errors, sys.stderr.line_buffering],
    }))
    sys.stdout.flush()
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
    ``tmp_path`` (where ``-m`` finds it), under umask 027 and a variable set after the zygote
    started."""
    (tmp_path / "gemframe_probe.py").write_text(PROBE)
    monkeypatch.setenv("GEMFRAME_PROBE", "the caller's, at call time")

    def run(*args, how, timeout=120):
        command = [sys.executable, "-m", "gemframe_probe", *args]
        env = {**os.environ}
        old = os.umask(0o027)
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

    return run


@pytest.mark.parametrize("args", [(), ("raise",), ("exit",)])
def test_a_call_is_the_same_fresh_process_as_a_real_one(probe, args):
    before = dict(_zygote.calls)
    real = probe(*args, how="subprocess")
    first, second = probe(*args, how="zygote"), probe(*args, how="zygote")
    assert _zygote.calls["zygote"] == before["zygote"] + 2  # neither fell back to a subprocess
    seen = json.loads(real.stdout.splitlines()[0])
    assert seen["environ"] == "the caller's, at call time" and seen["c_environ"] == seen["environ"] + "\n"
    assert seen["umask"] == 0o027 and seen["ttys"] == [False] * 3 and seen["noted"] is None
    for done in (first, second):
        assert done.returncode == real.returncode
        assert json.loads(done.stdout.splitlines()[0]) == seen
        assert done.stdout == real.stdout  # the subprocess's output, the \r\n and \r translated
        assert "written by a subprocess\n" in done.stdout and "crlf\nand cr\nend\n" in done.stdout
        assert done.args == real.args
    # The same stderr (warnings, the traceback or exit message, a subprocess's lines), but for
    # the first frame of a traceback: the zygote's call of runpy.
    assert _without_the_zygote_frame(first.stderr) == real.stderr
    assert "DeprecationWarning: shown in __main__ only" in real.stderr and "to stderr by a subprocess" in real.stderr


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


def test_a_dead_zygote_is_replaced_by_the_next_call(probe):
    assert probe(how="zygote").returncode == 0
    dead = _zygote._zygote
    dead.process.kill()
    dead.process.wait()
    before = dict(_zygote.calls)
    assert probe(how="zygote").returncode == 0
    assert _zygote._zygote is not dead and _zygote.calls["zygote"] == before["zygote"] + 1


def test_a_variable_read_at_start_makes_the_call_a_real_subprocess(probe, monkeypatch):
    """PYTHONPATH, HOME (user site), a locale... are read when an interpreter starts or imports,
    before the zygote forks: a call that changes one runs in a real subprocess."""
    assert probe(how="zygote").returncode == 0
    before = dict(_zygote.calls)
    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    done = probe(how="zygote")
    assert _zygote.calls["subprocess"] == before["subprocess"] + 1
    assert done.returncode == 1 and "DeprecationWarning: shown in __main__ only" in done.stderr


def test_a_zygote_that_cannot_start_leaves_the_calls_to_real_subprocesses(probe, monkeypatch):
    """If the zygote cannot import the command's modules (gemframe broken mid-edit, say), a call
    runs as a real subprocess, which shows the command's own error, and a warning says why."""
    _zygote.shutdown()
    monkeypatch.setattr(_zygote, "PRELOAD", "gemframe._not_a_module")
    before = dict(_zygote.calls)
    try:
        with pytest.warns(RuntimeWarning, match=r"(?s)did not start cleanly.*No module named 'gemframe._not_a_module'"):
            done = probe(how="zygote")
    finally:
        monkeypatch.undo()
        _zygote.shutdown()
    assert done.returncode == 0 and json.loads(done.stdout.splitlines()[0])["noted"] is None
    assert _zygote.calls["subprocess"] == before["subprocess"] + 1 and _zygote._zygote is None


def test_a_warning_shown_at_import_is_shown_by_every_call(tmp_path, monkeypatch):
    """A fresh interpreter shows its imports' warnings each time it starts; the zygote imported
    once, so it shows them again in each child."""
    (tmp_path / "noisy_import.py").write_text(
        "import warnings\nimport gemframe._cli\nwarnings.warn('said at import')\n"
    )
    (tmp_path / "noisy.py").write_text("import noisy_import\nprint('ran')\n")
    command = [sys.executable, "-m", "noisy"]
    monkeypatch.chdir(tmp_path)  # where the zygote (and -m) find the modules
    _zygote.shutdown()
    monkeypatch.setattr(_zygote, "PRELOAD", "noisy_import")
    try:
        real = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        first, second = (_zygote.run(command, env=dict(os.environ), cwd=None, timeout=120) for _ in range(2))
        assert _zygote._zygote is not None  # the calls did run on the zygote
    finally:
        monkeypatch.undo()
        _zygote.shutdown()
    assert "UserWarning: said at import" in real.stderr and real.stdout == "ran\n"
    assert (first.stdout, first.stderr) == (second.stdout, second.stderr) == (real.stdout, real.stderr)
