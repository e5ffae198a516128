"""gemframe run (the parquet-to-parquet job), through the CLI and the Python API."""

import os
import subprocess
import sys

import polars as pl
import pytest

import gemframe as gf
from gemframe.cli import main
from gemframe.emulator import Emulator
from gemframe.pipeline import read_manifest, run


def test_run_writes_inputs_plus_reply_fields_and_manifest(client, emulator, sample_input, tmp_path):
    out = tmp_path / "sub" / "out.parquet"
    manifest = run(str(sample_input), str(out), images="image_path", client=client, progress=False, batch_rows=5)
    frame = pl.read_parquet(out)
    source = pl.read_parquet(sample_input)
    assert frame.columns[: len(source.columns)] == source.columns
    assert {"text", "finish_reason", "total_tokens", "images", "error", "cached"} <= set(frame.columns)
    assert frame["id"].to_list() == source["id"].to_list()
    answered = source["prompt"].is_not_null() | source["image_path"].is_not_null()
    assert frame["text"].is_not_null().to_list() == answered.to_list()
    assert emulator.stats.requests == int(answered.sum())
    assert manifest == read_manifest(str(out))
    assert manifest["rows"] == source.height and manifest["requests_sent"] == emulator.stats.requests
    assert manifest["provider"] == "emulator" and manifest["input"]["sha256"]
    assert not os.path.exists(f"{out}.partial")


def test_rerun_sends_nothing(client, emulator, sample_input, tmp_path):
    run(str(sample_input), str(tmp_path / "a.parquet"), images="image_path", client=client, progress=False)
    sent = emulator.stats.requests
    manifest = run(str(sample_input), str(tmp_path / "b.parquet"), images="image_path", client=client, progress=False)
    assert emulator.stats.requests == sent and manifest["requests_sent"] == 0
    assert manifest["cache_hits"] == sent
    a, b = pl.read_parquet(tmp_path / "a.parquet"), pl.read_parquet(tmp_path / "b.parquet")
    assert a["text"].to_list() == b["text"].to_list()


def test_missing_column_fails_before_sending(client, emulator, sample_input, tmp_path):
    with pytest.raises(gf.InputError, match="no images column 'picture'"):
        run(str(sample_input), str(tmp_path / "o.parquet"), images="picture", client=client, progress=False)
    assert emulator.stats.requests == 0 and not (tmp_path / "o.parquet").exists()


def test_fatal_error_leaves_no_output(cache_dir, sample_input, tmp_path):
    guarded = Emulator(api_key="right")
    with gf.Client("emulator", app=guarded, api_key="wrong", cache_dir=str(cache_dir), progress=False) as c:
        with pytest.raises(gf.AuthenticationError, match="rerunning the same command"):
            run(str(sample_input), str(tmp_path / "o.parquet"), client=c, progress=False)
    assert not (tmp_path / "o.parquet").exists()


def test_cli_run_end_to_end(sample_input, tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    code = main([
        "run", str(sample_input), str(out), "--prompt", "prompt", "--images", "image_path",
        "--emulator", "--concurrency", "4", "--cache-dir", str(tmp_path / "c"), "--no-progress",
        "--config", '{"temperature": 0}',
    ])
    assert code == 0 and "wrote" in capsys.readouterr().err
    frame = pl.read_parquet(out)
    assert frame.height == 12 and frame["model_version"].drop_nulls().str.starts_with("emulator").all()
    assert read_manifest(str(out))["config"] == {"temperature": 0}


def test_cli_reports_errors_without_traceback(sample_input, tmp_path, capsys):
    code = main(["run", str(sample_input), str(tmp_path / "o.parquet"), "--emulator", "--config", '{"temprature": 1}', "--no-progress"])
    assert code == 2 and "Did you mean 'temperature'" in capsys.readouterr().err


def test_cli_help_and_console_script(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gemframe", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "run" in result.stdout and "emulator" in result.stdout
    result = subprocess.run([sys.executable, "-m", "gemframe", "run", "--help"], capture_output=True, text=True)
    assert "--images" in result.stdout and "--cache" in result.stdout


def test_cli_cache_stats_and_clear(client, sample_input, tmp_path, capsys, cache_dir):
    run(str(sample_input), str(tmp_path / "o.parquet"), client=client, progress=False)
    client.close()
    assert main(["cache", "stats", "--cache-dir", str(cache_dir)]) == 0
    assert "\"entries\": 11" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(cache_dir)]) == 0
    assert "removed 11" in capsys.readouterr().out
