"""Batch Mode end to end on the emulator: cache hits served locally, misses in one job,
answers shared with live runs, jobs resumed (never resubmitted) after a stop or a kill -9."""

import json
import os
import signal
import subprocess
import time

import polars as pl
import pytest

import gemframe as gf
from gemframe.emulator import Emulator

from ._zygote import python_c
from .conftest import gemframe_cli, gemframe_command, gemframe_run_args


def _client(emulator, cache_dir):
    return gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(cache_dir), progress=False)


def _batch(frame, client, **options):
    options = {"mode": "batch", "poll_interval": 0.01, **options}
    return frame.with_columns(reply=gf.generate("prompt", client=client, **options)).unnest("reply")


FRAME = pl.DataFrame({"prompt": [f"batch row {i}" for i in range(30)] + ["batch row 0", None]})


def test_batch_answers_like_live_and_shares_the_cache(cache_dir):
    emulator = Emulator(batch_polls=3)
    with _client(emulator, cache_dir) as client:
        out = _batch(FRAME, client)
        assert emulator.batches.creates == 1 and emulator.stats.requests == 0  # no live calls
        assert out["error"].is_null().all() and out["text"][30] == out["text"][0]
        live = FRAME.with_columns(reply=gf.generate("prompt", client=client)).unnest("reply")
        assert live["cached"].drop_nulls().all() and emulator.stats.requests == 0  # shared answers
        assert live["text"].to_list() == out["text"].to_list()
    with _client(Emulator(), cache_dir / "fresh") as client:
        direct = FRAME.with_columns(reply=gf.generate("prompt", client=client)).unnest("reply")
    assert direct["text"].to_list() == out["text"].to_list()  # the same answers as live mode


def test_cache_hits_stay_local_and_only_misses_are_submitted(cache_dir):
    emulator = Emulator()
    with _client(emulator, cache_dir) as client:
        FRAME.head(10).with_columns(reply=gf.generate("prompt", client=client))
        out = _batch(FRAME, client)
        job = next(iter(emulator.batches.jobs.values()))
    assert len(job.requests) == 20 and int(out["cached"].sum()) == 11  # row 30 repeats row 0


def test_per_row_failures_become_row_errors_and_are_not_resubmitted(cache_dir):
    emulator = Emulator(batch_fail_every=5)
    with _client(emulator, cache_dir) as client:
        out = _batch(FRAME, client)
        again = _batch(FRAME, client)
    assert (out["error"].struct.field("status") == "INTERNAL").sum() == 6
    assert again["error"].struct.field("status").to_list() == out["error"].struct.field("status").to_list()
    assert emulator.batches.creates == 1


@pytest.mark.parametrize("outcome", ["BATCH_STATE_EXPIRED", "BATCH_STATE_FAILED"])
def test_a_failed_job_fails_its_rows(cache_dir, outcome):
    with _client(Emulator(batch_outcome=outcome), cache_dir) as client:
        out = _batch(FRAME, client)
    status = "BATCH_" + outcome.removeprefix("BATCH_STATE_")
    assert (out["error"].struct.field("status").drop_nulls() == status).all() and out["text"].is_null().all()


def test_submit_now_collect_later_and_adopt_a_job_created_before_a_crash(cache_dir, tmp_path):
    emulator = Emulator(batch_polls=1000)
    state = str(tmp_path / "jobs.json")
    with _client(emulator, cache_dir) as client:
        pending = _batch(FRAME, client, batch_state=state, wait=False)
        assert (pending["error"].struct.field("status").drop_nulls() == "BATCH_PENDING").all()
        saved = json.load(open(state))
        saved["jobs"][0]["name"] = None  # as if killed between the create call and the save
        json.dump(saved, open(state, "w"))
        emulator.batches.polls = 2
        done = _batch(FRAME, client, batch_state=state)
    assert done["error"].is_null().all() and emulator.batches.creates == 1


def test_segmind_has_no_batch_mode(cache_dir):
    with gf.Client("segmind", api_key="k", cache_dir=str(cache_dir), progress=False) as client:
        with pytest.raises(gf.ConfigError, match="batch mode needs"):
            _batch(FRAME, client)


@pytest.mark.slow
def test_cli_batch_killed_mid_poll_resumes_without_resubmitting(served_emulator, tmp_path):
    server = served_emulator(batch_polls=10_000)
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pl.DataFrame({"id": range(200), "prompt": [f"cli batch {i}" for i in range(200)]}).write_parquet(src)
    command = gemframe_command(
        *gemframe_run_args(src, dst, provider="google", base_url=server.url, cache_dir=tmp_path / "cache"),
        "--batch",
        "--poll-interval",
        "0.05",
        "--batch-rows",
        "64",
    )
    env = {**os.environ, "GEMINI_API_KEY": "k"}
    job = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    jobs = server.emulator.batches.jobs
    while (
        not (sum(len(j.requests) for j in jobs.values()) == 200 and max(j.polls for j in jobs.values()) >= 6)
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)  # killed while polling
    job.wait()
    batches = server.emulator.batches
    submitted = sum(len(j.requests) for j in batches.jobs.values())
    assert not dst.exists() and submitted == 200  # one job per record batch, every row once
    creates = batches.creates
    server.emulator.batches.polls = 0  # the job finishes at the next poll
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    out = pl.read_parquet(dst)
    assert out["id"].to_list() == list(range(200)) and out["error"].is_null().all()
    assert batches.creates == creates and server.emulator.stats.requests == 0  # resumed, not resubmitted


def test_a_cancelled_job_fails_its_rows(cache_dir, tmp_path):
    emulator = Emulator(batch_polls=1000)
    state = str(tmp_path / "jobs.json")
    with _client(emulator, cache_dir) as client:
        _batch(FRAME, client, batch_state=state, wait=False)
        name = json.load(open(state))["jobs"][0]["name"]
        answer = client.executor.call("POST", client.provider.operation_url(name) + ":cancel").result()
        assert answer.status_code == 200
        out = _batch(FRAME, client, batch_state=state)
    assert (out["error"].struct.field("status").drop_nulls() == "BATCH_CANCELLED").all()
    assert emulator.batches.creates == 1


# -- Batch Mode keeps what it paid for (cache='off', collecting from another process) ---------


def test_batch_with_cache_off_returns_the_answers_it_waited_for(tmp_path):
    """cache='off' in batch mode: the call that waits returns the collected answers (kept in
    memory), writes none to the cache, and a job is never submitted for rows it answered."""
    emulator = Emulator()
    client = gf.Client(gf.EmulatorProvider(app=emulator), cache="off", cache_dir=str(tmp_path / "c"), progress=False)
    with client:
        out = _batch(FRAME, client)
        assert emulator.batches.creates == 1 and emulator.stats.requests == 0
        assert out["error"].is_null().all() and out["text"][5] == 'Emulated reply to: "batch row 5".'
        assert client.cache.stats()["entries"] == 0  # cache='off': nothing written


def test_batch_with_cache_off_and_wait_false_is_refused_before_any_job(tmp_path):
    emulator = Emulator()
    client = gf.Client(gf.EmulatorProvider(app=emulator), cache_dir=str(tmp_path / "c"), progress=False)
    with client, pytest.raises(gf.ConfigError, match=r"wait=False needs the cache.*cache='use'"):
        _batch(FRAME, client, cache="off", wait=False)
    assert emulator.batches.creates == 0


def test_cli_batch_with_cache_off_exits_nonzero_before_any_job(served_emulator, tmp_path):
    server = served_emulator()
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pl.DataFrame({"prompt": ["a", "b"]}).write_parquet(src)
    done = gemframe_cli(
        *gemframe_run_args(src, dst, provider="emulator", base_url=server.url, cache_dir=tmp_path / "cache"),
        "--batch",
        "--cache",
        "off",
        "--poll-interval",
        "0.01",
    )
    assert done.returncode == 2 and not dst.exists()
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gemframe: error: batch mode needs the cache")
    assert server.emulator.batches.creates == 0


# A user's script: submit (wait=False) in one process, collect in another.
_SUBMIT = """
import sys, polars as pl, gemframe as gf
base_url, cache_dir, state, wait = sys.argv[1] or None, sys.argv[2], sys.argv[3], sys.argv[4] == "wait"
client = gf.Client("emulator", base_url=base_url, cache_dir=cache_dir, progress=False)
frame = pl.DataFrame({"prompt": [f"later {i}" for i in range(5)]})
out = frame.select(gf.generate("prompt", client=client, mode="batch", batch_state=state, wait=wait,
                               poll_interval=0.01)).unnest("reply")
print(out["error"].struct.field("status").to_list())
print(out["text"].to_list())
"""


def _script(*args):
    return python_c(_SUBMIT, *args)  # through the zygote: a fresh `python -c`, without its imports


def test_submit_in_one_process_and_collect_in_another_over_tcp(served_emulator, tmp_path):
    server = served_emulator(batch_polls=3)
    state, cache = tmp_path / "jobs.json", tmp_path / "cache"
    first = _script(server.url, cache, state, "nowait")
    assert first.returncode == 0, first.stderr
    assert "['BATCH_PENDING', 'BATCH_PENDING', 'BATCH_PENDING', 'BATCH_PENDING', 'BATCH_PENDING']" in first.stdout
    second = _script(server.url, cache, state, "wait")
    assert second.returncode == 0, second.stderr
    assert "[None, None, None, None, None]" in second.stdout  # no row error
    assert 'Emulated reply to: "later 4".' in second.stdout and server.emulator.batches.creates == 1


def test_a_job_the_server_no_longer_has_names_the_state_file_to_delete(tmp_path):
    """Submitted by another process's in-process emulator: this process cannot find the job.
    Every rerun says so (no exception, no wrong hint) and names the file; deleting it resubmits."""
    state, cache = tmp_path / "jobs.json", tmp_path / "cache"
    first = _script("", cache, state, "nowait")  # gf.Client("emulator"): in-process, in that process
    assert first.returncode == 0 and "BATCH_PENDING" in first.stdout, first.stderr
    frame = pl.DataFrame({"prompt": [f"later {i}" for i in range(5)]})
    emulator = Emulator()
    with _client(emulator, cache) as client:
        for _ in range(2):  # the rerun does not poll again: the job is recorded as gone
            out = frame.select(
                gf.generate("prompt", client=client, mode="batch", batch_state=str(state), poll_interval=0.01)
            ).unnest("reply")
            errors = out["error"]
            assert (errors.struct.field("status") == "BATCH_GONE").all()
            message = errors.struct.field("message")[0]
            assert f"Delete {state} to submit these rows again" in message
            assert "not found" in message and "in-process emulator end with the process" in message
        assert emulator.batches.creates == 0
        state.unlink()
        again = frame.select(
            gf.generate("prompt", client=client, mode="batch", batch_state=str(state), poll_interval=0.01)
        ).unnest("reply")
    assert again["error"].is_null().all() and emulator.batches.creates == 1


def test_a_job_deleted_on_the_server_is_a_row_error_naming_the_state_file(served_emulator, tmp_path):
    server = served_emulator(batch_polls=1000, batch_keep=0)  # a finished job is deleted at once
    state = tmp_path / "jobs.json"
    with gf.Client("emulator", base_url=server.url, cache_dir=str(tmp_path / "c"), progress=False) as client:
        _batch(FRAME, client, batch_state=str(state), wait=False)
        name = json.load(open(state))["jobs"][0]["name"]
        assert client.executor.call("POST", client.provider.operation_url(name) + ":cancel").result().status_code == 200
        out = _batch(FRAME, client, batch_state=str(state))
    message = out["error"].struct.field("message")[0]
    assert out["error"].struct.field("status")[0] == "BATCH_GONE" and f"Delete {state}" in message
    assert f"Batch {name} not found" in message and "in-process" not in message  # served: not the reason


def test_an_unreadable_state_file_is_named(cache_dir, tmp_path):
    state = tmp_path / "jobs.json"
    state.write_text("{not json")
    with (
        _client(Emulator(), cache_dir) as client,
        pytest.raises(gf.ConfigError, match=rf"{state} is not a readable batch state file.*delete it"),
    ):
        _batch(FRAME, client, batch_state=str(state))


def test_a_misspelt_model_in_batch_mode_is_refused_before_any_job(cache_dir):
    emulator = Emulator()
    with (
        _client(emulator, cache_dir) as client,
        pytest.raises(gf.NotFoundError, match="Did you mean 'gemini-2.5-flash'"),
    ):
        _batch(FRAME, client, model="gemini-2.5-flsh")
    assert emulator.batches.creates == 0
