"""The progress bar (total known up front, hits, errors and tokens that fit 80 columns, one bar
per job, no notebook warning) and the one warning that ends a call in which rows failed."""

import json
import os
import re
import subprocess
import sys
import threading
import warnings

import polars as pl
import pytest

import gemframe as gf
from gemframe._core.progress import end_resting_jobs

from .conftest import gemframe_cli

FAILED_4 = (
    "4 of 4 rows failed: INVALID_INPUT x4; row 0: cannot read image file 'images/house.jpg': "
    "No such file or directory; see the reply's `error` field"
)


def _last_bar(err: str) -> str:
    return err.strip().splitlines()[-1].split("\r")[-1]


def test_bar_shows_total_hits_errors_and_tokens(emulator, cache_dir, capsys):
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=True) as client:
        frame = pl.DataFrame({"prompt": [f"p{i}" for i in range(20)] + ["[emulator:status=400] bad", None]})
        frame.head(10).with_columns(reply=gf.generate("prompt", client=client, progress=False))
        with pytest.warns(gf.RowsFailedWarning, match="1 of 21 rows failed: INVALID_ARGUMENT x1"):
            replies = frame.with_columns(reply=gf.generate("prompt", client=client))
    bar = _last_bar(capsys.readouterr().err)
    tokens = replies["reply"].struct.field("total_tokens").filter(~replies["reply"].struct.field("cached")).sum()
    assert "21/21" in bar  # the null row is not counted: it sends nothing
    assert "hits 10, err 1, " in bar and f"tok {tokens:,}]" in bar and tokens > 0


def test_progress_false_prints_nothing(client, capsys):
    pl.DataFrame({"prompt": ["quiet"]}).with_columns(reply=gf.generate("prompt", client=client, progress=False))
    assert capsys.readouterr().err == ""


def test_failed_rows_end_the_call_with_one_warning(client, emulator, tmp_path, monkeypatch):
    """progress=False: the warning is the only thing that tells the user."""
    monkeypatch.chdir(tmp_path)  # images/house.jpg does not exist here
    frame = pl.DataFrame({"prompt": ["describe it"] * 4, "image": ["images/house.jpg"] * 4})
    with pytest.warns(gf.RowsFailedWarning) as caught:
        out = frame.with_columns(reply=gf.generate("prompt", images="image", client=client, progress=False))
    assert [str(w.message) for w in caught if issubclass(w.category, gf.RowsFailedWarning)] == [FAILED_4]
    assert out["reply"].struct.field("error").struct.field("status").to_list() == ["INVALID_INPUT"] * 4
    # A second job failing the same way is news too (Python's once-per-message rule would hide it).
    with pytest.warns(gf.RowsFailedWarning, match=re.escape(FAILED_4)):
        frame.with_columns(reply=gf.generate("prompt", images="image", client=client, progress=False))
    assert emulator.stats.requests == 0


def test_a_successful_call_warns_nothing(client):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pl.DataFrame({"prompt": ["fine", "also fine"]}).with_columns(reply=gf.generate("prompt", client=client))
    assert out["reply"].struct.field("error").is_null().all()


def test_client_send_warns_once(client):
    with pytest.warns(gf.RowsFailedWarning) as caught:
        client.send([{"contents": [{"parts": [{"text": "[emulator:status=400] no"}]}]}] * 3, total=3)
    failed = [str(w.message) for w in caught if issubclass(w.category, gf.RowsFailedWarning)]
    assert len(failed) == 1 and failed[0].startswith("3 of 3 rows failed: INVALID_ARGUMENT x3; row 0: ")


def _gemframe(*args, cwd):
    return gemframe_cli(*args, cwd=cwd)


def test_cli_ends_with_the_failure_summary_and_exit_0(tmp_path):
    pl.DataFrame({"prompt": ["describe it"] * 4, "image": ["images/house.jpg"] * 4}).write_parquet(
        tmp_path / "in.parquet"
    )
    done = _gemframe(
        "run",
        "in.parquet",
        "out.parquet",
        "--images",
        "image",
        "--emulator",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
        cwd=tmp_path,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 0, done.stderr
    assert lines[-1] == f"gemframe: warning: {FAILED_4}"
    assert lines[-2].startswith("wrote out.parquet: ")
    assert "RowsFailedWarning" not in done.stderr  # one line, no Python warning format


def _on_terminal(args, cwd, columns=80):
    """Run ``gemframe ARGS`` with stderr on a pseudo-terminal ``columns`` wide, as a user's
    terminal; its output with each carriage-return redraw on its own line."""
    fcntl, pty, struct, termios = (pytest.importorskip(m) for m in ("fcntl", "pty", "struct", "termios"))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gemframe", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    out = b""
    while True:  # until the child closes the terminal (EIO on Linux)
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0
    return [line for line in re.split(r"\r\n|\r|\n", out.decode()) if line.strip()]


def test_cli_bar_at_80_columns_keeps_the_figures_and_counts_only_rows_sent(tmp_path):
    prompts = [f"Describe item number {i} in a few sentences" for i in range(400)] + [None]
    pl.DataFrame({"prompt": prompts}).write_parquet(tmp_path / "in.parquet")
    lines = _on_terminal(
        [
            "run",
            "in.parquet",
            "out.parquet",
            "--emulator",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--manifest",
            "m.json",
            "--batch-rows",
            "100",
        ],
        tmp_path,
    )
    bars = [line for line in lines if line.startswith("gemframe") and re.search(r"\d+/\d+", line)]
    last = bars[-1]
    manifest = gf.read_manifest(str(tmp_path / "out.parquet"))
    tokens = manifest["tokens"]["input_paid"] + manifest["tokens"]["output_paid"]
    assert len(last) <= 80
    assert re.search(r"^gemframe: 400/400 \[\d\d:\d\d<00:00, [\d.,]+k? rows/s, hits 0, err 0, tok ([\d,]+)\]", last), (
        last
    )
    assert f"tok {tokens:,}]" in last and tokens > 10_000  # the true total, not cut off
    assert all("/400 " in bar for bar in bars)  # the null-prompt row is not in the total (was 401)


def test_one_bar_for_a_lazy_job_in_several_morsels(emulator, cache_dir, capsys):
    """The streaming engine calls the expression once per morsel, on several threads: one
    bar for the job (its total growing as morsels arrive), not one 0/500 bar per morsel."""
    if pl.thread_pool_size() < 2:
        pytest.skip("needs two polars threads to run two morsels at once")
    calls = threading.Barrier(2, timeout=60)  # two morsels in flight at once, whatever the timing
    frame = pl.LazyFrame({"prompt": [f"lazy {i}" for i in range(1000)]})
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=True) as client:
        send, seen, lock = client.send, [], threading.Lock()

        def send_together(*args, **kwargs):  # the first two calls start only when both are in
            with lock:
                seen.append(len(seen))
                first_two = len(seen) <= 2
            if first_two:
                calls.wait()
            return send(*args, **kwargs)

        client.send = send_together
        frame.with_columns(reply=gf.generate("prompt", client=client)).sink_parquet(cache_dir.parent / "out.parquet")
    err = capsys.readouterr().err
    finished = [(n, total) for n, total in re.findall(r"(\d+)/(\d+) \[", err) if n == total]
    assert len(seen) >= 2 and set(finished) == {("1000", "1000")}, err  # was two 500/500 bars


def test_two_generate_calls_draw_two_labelled_bars(emulator, cache_dir, capsys):
    frame = pl.DataFrame({"a": [f"a{i}" for i in range(50)], "b": [f"b{i}" for i in range(50)]})
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=True) as client:
        frame.with_columns(x=gf.generate("a", client=client), y=gf.generate("b", client=client))
    err = capsys.readouterr().err
    assert "gemframe a: 50/50" in err and "gemframe b: 50/50" in err


def test_no_tqdm_warning_in_a_notebook_without_ipywidgets(tmp_path):
    """A Jupyter kernel without ipywidgets: tqdm.auto warned (TqdmWarning: IProgress not
    found) on import; now the text bar is drawn, silently."""
    probe = """
import sys, types, warnings
warnings.simplefilter("error")
class Shell:
    config = {"IPKernelApp": {}}
sys.modules["IPython"] = types.SimpleNamespace(get_ipython=lambda: Shell())
sys.modules["ipywidgets"] = None  # not installed
import polars as pl, gemframe as gf
with gf.Client("emulator", cache_dir=sys.argv[1], progress=True) as client:
    pl.DataFrame({"prompt": ["hi"]}).with_columns(reply=gf.generate("prompt", client=client))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "cache")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "gemframe prompt: 1/1" in done.stderr


@pytest.fixture(autouse=True)
def _end_resting_jobs():
    """A lazy job's bar rests after its last call (see progress.job); end it within its test,
    not in the next one's output."""
    yield
    end_resting_jobs()


# A lazy job in several morsels (row groups of 30 rows), run by one polars thread: the morsels'
# calls follow one another. One row in ten fails (status 400), in every morsel.
_SINK_JOB = """
import json, sys
import polars as pl
import gemframe as gf
prompts = [f"[emulator:status=400] row {i}" if i % 10 == 3 else f"row {i}" for i in range(120)]
pl.DataFrame({"prompt": prompts}).write_parquet("in.parquet", row_group_size=30)
client = gf.Client("emulator", progress=sys.argv[1] == "bar")
calls, send = [], client.send
def counted(rows, **kwargs):
    calls.append(kwargs["total"])
    return send(rows, **kwargs)
client.send = counted
pl.scan_parquet("in.parquet").with_columns(reply=gf.generate("prompt", client=client)).sink_parquet("out.parquet")
print(json.dumps(calls))
"""


@pytest.mark.parametrize("bar", ["bar", "no-bar"])
def test_a_lazy_job_in_sequential_morsels_draws_one_bar_and_warns_once(bar, tmp_path):
    """POLARS_MAX_THREADS=1: the streaming engine calls the expression once per morsel, one
    call after another. Each call drew its own bar ("gemframe prompt: 30/30" four times) and
    warned about its own failures (four RowsFailedWarnings); now the job's bar continues from
    call to call and ends with one warning for the job."""
    done = subprocess.run(
        [sys.executable, "-c", _SINK_JOB, bar],
        cwd=tmp_path,
        env={**os.environ, "POLARS_MAX_THREADS": "1"},
        capture_output=True,  # bytes: text mode would turn each redraw's \r into a new line
        timeout=120,
    )
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert json.loads(done.stdout) == [30, 30, 30, 30]  # four calls, so four bars before
    bars = [line for line in err.split("\n") if "gemframe prompt" in line]
    if bar == "bar":
        assert len(bars) == 1, err  # one line, redrawn (\r) as the job goes on
        assert bars[0].split("\r")[-1].startswith("gemframe prompt: 120/120 "), err
    else:
        assert bars == []
    assert err.count("RowsFailedWarning") == 1, err
    assert "RowsFailedWarning: 12 of 120 rows failed: INVALID_ARGUMENT x12; row " in err
    assert pl.read_parquet(tmp_path / "out.parquet")["reply"].struct.field("error").is_not_null().sum() == 12


# An eager frame read from a file of four row groups: four chunks, so polars calls the
# expression four times, on its own thread (one call after another). The idle grace is made
# an hour: only the end of with_columns can end the job before the script gives up waiting.
_CHUNKED_FRAME = """
import json, time, warnings
import polars as pl
import gemframe as gf
from gemframe._core import progress
progress.IDLE_RESTART = 3600.0
prompts = [f"[emulator:status=400] {i}" if i % 25 == 7 else f"chunk {i}" for i in range(100)]
pl.DataFrame({"prompt": prompts}).write_parquet("in.parquet", row_group_size=25)
frame = pl.read_parquet("in.parquet")
client = gf.Client("emulator", progress=False)
calls, send = [], client.send
client.send = lambda rows, **kwargs: calls.append(kwargs["total"]) or send(rows, **kwargs)
with warnings.catch_warnings(record=True) as caught:
    frame.with_columns(reply=gf.generate("prompt", client=client))
    deadline = time.monotonic() + 60  # a condition, not a fixed time: the job's warning
    while not caught and time.monotonic() < deadline:
        time.sleep(0.005)
print(json.dumps({"chunks": frame.n_chunks(), "calls": calls, "warnings": [str(w.message) for w in caught]}))
"""


def test_an_eager_frame_in_chunks_is_one_job_that_ends_when_with_columns_returns(tmp_path):
    """Each of the four calls warned about its own rows (``1 of 25 rows failed`` four times);
    now they are one job, which ends as soon as the ``with_columns`` that ran them returns
    (its threads are watched), not after the idle grace nor at exit."""
    done = subprocess.run(
        [sys.executable, "-c", _CHUNKED_FRAME],
        cwd=tmp_path,
        env={**os.environ, "POLARS_MAX_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["chunks"] == 4 and seen["calls"] == [25] * 4  # four calls, so four warnings before
    assert [w.split(";")[0] for w in seen["warnings"]] == ["4 of 100 rows failed: INVALID_ARGUMENT x4"]
    assert "RowsFailedWarning" not in done.stderr  # and none left for exit


def test_a_lazy_job_ends_before_the_next_call_draws_its_bar(emulator, cache_dir, tmp_path, capsys):
    """The next call's bar comes after the lazy job's finished bar and its warning, and is not
    labelled ``#2`` (the lazy job is over); an eager call's bar and warning are done when
    ``with_columns`` returns."""
    prompts = [f"[emulator:status=400] {i}" if i % 25 == 0 else f"lazy {i}" for i in range(100)]
    pl.DataFrame({"prompt": prompts}).write_parquet(tmp_path / "in.parquet", row_group_size=25)
    with gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=True) as client:
        with pytest.warns(gf.RowsFailedWarning) as caught:
            lazy = pl.scan_parquet(tmp_path / "in.parquet").with_columns(reply=gf.generate("prompt", client=client))
            lazy.sink_parquet(tmp_path / "out.parquet")
            eager = pl.DataFrame({"prompt": ["[emulator:status=400] eager"]})
            eager.with_columns(reply=gf.generate("prompt", client=client))
            failed = [str(w.message).split(";")[0] for w in caught if issubclass(w.category, gf.RowsFailedWarning)]
            assert failed == ["4 of 100 rows failed: INVALID_ARGUMENT x4", "1 of 1 rows failed: INVALID_ARGUMENT x1"]
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1] for line in err.split("\n") if "gemframe prompt" in line]
    assert [line.split(" [")[0] for line in lines] == ["gemframe prompt: 100/100", "gemframe prompt: 1/1"], err
