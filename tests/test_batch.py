"""Batch Mode end to end on the emulator: cache hits served locally, misses in one job,
answers shared with live runs, jobs resumed (never resubmitted) after a stop or a kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

import gemframe as gf
from gemframe.emulator import Emulator


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
    command = [sys.executable, "-m", "gemframe", "run", str(src), str(dst), "--provider", "google",
               "--base-url", server.url, "--cache-dir", str(tmp_path / "cache"), "--no-progress",
               "--batch", "--poll-interval", "0.05", "--batch-rows", "64"]
    env = {**os.environ, "GEMINI_API_KEY": "k"}
    job = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    jobs = server.emulator.batches.jobs
    while not (sum(len(j.requests) for j in jobs.values()) == 200 and max(j.polls for j in jobs.values()) >= 6) and time.monotonic() < deadline:
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
