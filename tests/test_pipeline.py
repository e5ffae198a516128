"""gemframe run (the parquet-to-parquet job), through the CLI and the Python API."""

import json
import os
import time

import polars as pl
import pytest

import gemframe as gf
from gemframe._accounting.pricing import cost
from gemframe._cli import main
from gemframe._pipeline import read_manifest, run
from gemframe.emulator import Emulator

from .conftest import gemframe_cli


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


def test_a_row_that_cannot_be_built_is_its_error_in_the_output(client, emulator, tmp_path):
    """An image path no reader expects (a NUL byte in it: ValueError from os.stat): that row's
    error in the written file, every other row answered (it used to end the job, writing nothing)."""
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    images = [None] * 30
    images[17] = str(tmp_path / "a\x00b.png")
    pl.DataFrame({"id": range(30), "prompt": [f"q{i}" for i in range(30)], "image": images}).write_parquet(src)
    manifest = run(str(src), str(dst), images="image", client=client, progress=False, batch_rows=10)
    out = pl.read_parquet(dst)
    assert out["id"].to_list() == list(range(30))
    assert out["error"].struct.field("status").to_list() == [None] * 17 + ["INVALID_INPUT"] + [None] * 12
    assert out["error"][17]["message"].startswith("row ")
    assert emulator.stats.requests == 29 and manifest["requests_sent"] == 29


def test_cli_run_end_to_end(sample_input, tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    code = main(
        [
            "run",
            str(sample_input),
            str(out),
            "--prompt",
            "prompt",
            "--images",
            "image_path",
            "--emulator",
            "--concurrency",
            "4",
            "--cache-dir",
            str(tmp_path / "c"),
            "--no-progress",
            "--config",
            '{"temperature": 0}',
        ]
    )
    assert code == 0 and "wrote" in capsys.readouterr().err
    frame = pl.read_parquet(out)
    assert frame.height == 12 and frame["model_version"].drop_nulls().str.starts_with("emulator").all()
    assert read_manifest(str(out))["config"] == {"temperature": 0}


def test_cli_reports_errors_without_traceback(sample_input, tmp_path, capsys):
    code = main(
        [
            "run",
            str(sample_input),
            str(tmp_path / "o.parquet"),
            "--emulator",
            "--config",
            '{"temprature": 1}',
            "--no-progress",
        ]
    )
    assert code == 2 and "Did you mean 'temperature'" in capsys.readouterr().err


def test_cli_help_and_console_script(tmp_path):
    result = gemframe_cli("--help")
    assert result.returncode == 0 and "run" in result.stdout and "emulator" in result.stdout
    result = gemframe_cli("run", "--help")
    assert "--images" in result.stdout and "--cache" in result.stdout


def test_cli_cache_stats_and_clear(client, sample_input, tmp_path, capsys, cache_dir):
    run(str(sample_input), str(tmp_path / "o.parquet"), client=client, progress=False)
    client.close()
    assert main(["cache", "stats", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "11 entries" in out and gf.DEFAULT_MODEL in out
    assert main(["cache", "stats", "--json", "--cache-dir", str(cache_dir)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["entries"] == 11 and stats["by_model"][gf.DEFAULT_MODEL]["entries"] == 11
    assert main(["cache", "clear", "--model", "other-model", "--cache-dir", str(cache_dir)]) == 0
    assert "removed 0" in capsys.readouterr().out
    assert main(["cache", "clear", "--older-than", "30d", "--cache-dir", str(cache_dir)]) == 0
    assert "removed 0" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(cache_dir)]) == 0
    assert "removed 11" in capsys.readouterr().out
    assert main(["cache", "clear", "--older-than", "someday", "--cache-dir", str(cache_dir)]) == 2
    assert "not a date" in capsys.readouterr().err


def test_input_columns_named_like_reply_fields_get_prefixed_reply_columns(client, emulator, tmp_path, capsys):
    """Input columns text, images and error used to make gemframe run refuse the file ("would
    collide with the reply fields; rename them first"): the reply's become reply_text, ... with
    a warning, or every reply field gets --prefix."""
    src = tmp_path / "in.parquet"
    source = pl.DataFrame(
        {"prompt": ["one", "two"], "text": ["t1", "t2"], "images": [None, "x.png"], "error": ["e", None]}
    )
    source.write_parquet(src)
    cache = str(tmp_path / "c")
    assert (
        main(["run", str(src), str(tmp_path / "a.parquet"), "--emulator", "--cache-dir", cache, "--no-progress"]) == 0
    )
    err = capsys.readouterr().err
    assert "gemframe: warning: input columns ['error', 'images', 'text'] have the names of reply fields" in err
    assert "['reply_error', 'reply_images', 'reply_text']" in err and "--prefix" in err
    a = pl.read_parquet(tmp_path / "a.parquet")
    assert a.select(source.columns).equals(source)  # the input columns as they were
    assert a["reply_text"].to_list() == ['Emulated reply to: "one".', 'Emulated reply to: "two".']
    assert {"reply_images", "reply_error", "finish_reason", "cached"} <= set(a.columns)
    manifest = read_manifest(str(tmp_path / "a.parquet"))
    assert manifest["reply_columns"] == {"error": "reply_error", "images": "reply_images", "text": "reply_text"}
    assert manifest["requests_sent"] == 2 and manifest["errors"] == {}  # counted from the reply, not the input's error
    assert main(["report", str(tmp_path / "a.parquet")]) == 0  # the report reads the renamed reply fields
    assert "2 answered · 0 errors" in capsys.readouterr().out
    # --prefix names every reply field; no warning.
    assert (
        main(
            [
                "run",
                str(src),
                str(tmp_path / "b.parquet"),
                "--emulator",
                "--cache-dir",
                cache,
                "--no-progress",
                "--prefix",
                "gemini_",
            ]
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().err
    b = pl.read_parquet(tmp_path / "b.parquet")
    assert b.columns == [*source.columns, *(f"gemini_{f}" for f in gf.REPLY_DTYPE.to_schema())]
    assert b["gemini_text"].to_list() == a["reply_text"].to_list() and b["gemini_cached"].all()
    # The Python API warns the same way; a prefix that still collides is refused before sending.
    with pytest.warns(UserWarning, match="reply_text"):
        run(str(src), str(tmp_path / "c.parquet"), client=client, progress=False)
    with pytest.raises(gf.InputError, match=r"\['error', 'images', 'text'\] are both input columns"):
        run(str(src), str(tmp_path / "d.parquet"), client=client, progress=False, prefix="")
    assert not (tmp_path / "d.parquet").exists() and emulator.stats.requests == 2


# -- manifests ----------------------------------------------------------------------------------


def test_manifest_records_tokens_cache_and_cost_and_round_trips(client, emulator, sample_input, tmp_path, capsys):
    out, sidecar = tmp_path / "o.parquet", tmp_path / "o.manifest.json"
    config = {"temperature": 0, "response_modalities": ["TEXT", "IMAGE"]}
    first = run(
        str(sample_input),
        str(out),
        images="image_path",
        system="Be brief.",
        config=config,
        client=client,
        progress=False,
        manifest_path=str(sidecar),
    )
    assert first == read_manifest(str(out)) == json.loads(sidecar.read_text()) == gf.read_manifest(sidecar)
    frame = pl.read_parquet(out)
    assert first["gemframe"] == gf.__version__ and first["system"] == "Be brief."
    assert first["config"] == {"temperature": 0, "responseModalities": ["TEXT", "IMAGE"]}
    assert (first["cache_hits"], first["cache_misses"], first["requests_sent"]) == (0, 11, 11)
    tokens = first["tokens"]
    assert tokens["input"] == tokens["input_paid"] == frame["prompt_tokens"].sum()
    assert tokens["output"] == tokens["output_paid"] == frame["candidates_tokens"].sum()
    assert first["images_generated"] == frame["images"].list.len().sum() == 11
    assert first["finish_reasons"] == {"STOP": 11} and first["errors"] == {}
    images = first["images_generated"]
    expected = cost(
        gf.DEFAULT_MODEL, input_tokens=tokens["input"], output_tokens=tokens["output"] - 1290 * images, images=images
    )["usd"]
    assert first["cost"]["this_run"] == first["cost"]["all_rows"] == expected > 0
    # A rerun pays nothing: the tokens are all still there, none of them paid.
    second = run(
        str(sample_input),
        str(tmp_path / "b.parquet"),
        images="image_path",
        system="Be brief.",
        config=config,
        client=client,
        progress=False,
    )
    assert (second["cache_hits"], second["cache_misses"], second["requests_sent"]) == (11, 0, 0)
    assert second["tokens"]["input"] == tokens["input"] and second["tokens"]["input_paid"] == 0
    assert second["cost"]["this_run"] == 0 and second["cost"]["all_rows"] == expected
    assert main(["manifest", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == first
    plain = tmp_path / "plain.parquet"
    pl.DataFrame({"a": [1]}).write_parquet(plain)
    assert main(["manifest", str(plain)]) == 2 and "no gemframe manifest" in capsys.readouterr().err


def test_duplicate_rows_count_one_request(client, emulator, tmp_path):
    src = tmp_path / "dup.parquet"
    pl.DataFrame({"prompt": ["same", "same", "same", "other"]}).write_parquet(src)
    manifest = run(str(src), str(tmp_path / "o.parquet"), client=client, progress=False)
    assert manifest["requests_sent"] == emulator.stats.requests == 2
    assert manifest["cache_misses"] == 4
    one = pl.read_parquet(tmp_path / "o.parquet")["prompt_tokens"]
    assert manifest["tokens"]["input_paid"] == one[0] + one[3] and manifest["tokens"]["input"] == one.sum()


def test_manifest_for_expressions(client, emulator, sample_input):
    started = time.time()
    kw = dict(system="Be brief.", config={"temperature": 0}, client=client)
    out = pl.read_parquet(sample_input).with_columns(reply=gf.generate("prompt", images="image_path", **kw))
    m = gf.manifest(out, images="image_path", prompt="prompt", input=sample_input, started=started, **kw)
    assert m["provider"] == "emulator" and m["model"] == gf.DEFAULT_MODEL and m["system"] == "Be brief."
    assert m["config"] == {"temperature": 0} and m["input"]["sha256"] and m["wall_seconds"] >= 0
    assert (m["rows"], m["rows_without_prompt"], m["requests_sent"]) == (12, 1, emulator.stats.requests)
    assert m["tokens"]["input"] == out["reply"].struct.field("prompt_tokens").sum()
    assert gf.manifest(out["reply"], client=client)["cache_misses"] == 11  # a reply column works too
    unnested = gf.manifest(out.unnest("reply"), client=client)  # and so do the unnested fields
    assert {k: unnested[k] for k in ("rows", "rows_without_prompt", "tokens")} == {
        k: m[k] for k in ("rows", "rows_without_prompt", "tokens")
    }
    # Stored the way the docs say, it reads back like a gemframe run's.
    path = sample_input.parent / "expr.parquet"
    out.write_parquet(path, metadata={"gemframe": json.dumps(m)})
    assert gf.read_manifest(path) == m


# -- replay: byte-identical output from the cache, no key, no network -----------------------------

REPLY_RUN_FIELDS = ["cached", "attempts", "latency_ms"]  # how this run got each answer


def test_cli_replay_reproduces_the_output_without_key_or_network(
    served_emulator, sample_input, tmp_path, monkeypatch, capsys
):
    server = served_emulator()
    cache = str(tmp_path / "cache")
    common = [
        "--images",
        "image_path",
        "--provider",
        "google",
        "--cache-dir",
        cache,
        "--no-progress",
        "--config",
        '{"response_modalities": ["TEXT", "IMAGE"], "seed": 3}',
    ]
    monkeypatch.setenv("GEMINI_API_KEY", "a-key")
    first, cached, replay = (tmp_path / f"{n}.parquet" for n in ("first", "cached", "replay"))
    assert main(["run", str(sample_input), str(first), "--base-url", server.url, *common]) == 0
    assert main(["run", str(sample_input), str(cached), "--base-url", server.url, *common]) == 0
    sent = server.emulator.stats.requests
    assert sent == 11
    monkeypatch.delenv("GEMINI_API_KEY")  # no key, and nothing listens at the base URL
    assert (
        main(
            [
                "run",
                str(sample_input),
                str(replay),
                "--base-url",
                "http://127.0.0.1:9",
                "--cache",
                "read",
                "--manifest",
                str(tmp_path / "replay.json"),
                *common,
            ]
        )
        == 0
    )
    assert server.emulator.stats.requests == sent
    a, b, c = (pl.read_parquet(p) for p in (first, cached, replay))
    assert c.equals(b)  # every column, images included, identical to the earlier cached run
    assert c.drop(REPLY_RUN_FIELDS).equals(a.drop(REPLY_RUN_FIELDS))  # and the answers to the first run's
    assert c["images"].list.len().sum() == 11
    ma, mc = read_manifest(str(first)), read_manifest(str(replay))
    differ = {
        "started",
        "finished",
        "wall_seconds",
        "output",
        "base_url",
        "cache_mode",
        "cache_hits",
        "cache_misses",
        "requests_sent",
        "tokens",
        "images_generated_paid",
        "cost",
    }
    assert {k: v for k, v in ma.items() if k not in differ} == {k: v for k, v in mc.items() if k not in differ}
    assert (mc["cache_hits"], mc["requests_sent"], mc["cache_mode"]) == (11, 0, "read")
    assert mc["tokens"]["input"] == ma["tokens"]["input"] and mc["cost"]["all_rows"] == ma["cost"]["this_run"]
    # A row that was never answered is a clear per-row error; the others still replay.
    extra = tmp_path / "extra.parquet"
    pl.concat(
        [
            pl.read_parquet(sample_input),
            pl.DataFrame({"id": [99], "task": ["new"], "prompt": ["A new question"], "image_path": [None]}),
        ]
    ).write_parquet(extra)
    assert (
        main(
            [
                "run",
                str(extra),
                str(tmp_path / "extra_out.parquet"),
                "--base-url",
                "http://127.0.0.1:9",
                "--cache",
                "read",
                *common,
            ]
        )
        == 0
    )
    d = pl.read_parquet(tmp_path / "extra_out.parquet")
    assert d.head(12).drop("id").equals(b.drop("id"))
    error = d["error"][12]
    assert error["status"] == "CACHE_MISS" and "not in the cache" in error["message"]
    assert read_manifest(str(tmp_path / "extra_out.parquet"))["errors"] == {"CACHE_MISS": 1}
    assert server.emulator.stats.requests == sent


def test_cli_export_clear_import_replay_sends_nothing(served_emulator, sample_input, tmp_path, capsys):
    server = served_emulator()
    cache = str(tmp_path / "cache")
    common = ["--images", "image_path", "--emulator", "--base-url", server.url, "--cache-dir", cache, "--no-progress"]
    assert main(["run", str(sample_input), str(tmp_path / "a.parquet"), *common]) == 0
    sent = server.emulator.stats.requests
    archive = tmp_path / "team" / "answers.parquet"
    assert main(["cache", "export", str(archive), "--cache-dir", cache]) == 0
    assert "exported 11 entries" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", cache]) == 0
    assert main(["cache", "import", str(archive), "--cache-dir", cache]) == 0
    assert "11 added" in capsys.readouterr().out
    assert main(["run", str(sample_input), str(tmp_path / "b.parquet"), *common, "--cache", "read"]) == 0
    assert main(["run", str(sample_input), str(tmp_path / "c.parquet"), *common]) == 0  # cache 'use' too
    assert server.emulator.stats.requests == sent
    assert read_manifest(str(tmp_path / "c.parquet"))["requests_sent"] == 0
    a, b = pl.read_parquet(tmp_path / "a.parquet"), pl.read_parquet(tmp_path / "b.parquet")
    assert b.drop(REPLY_RUN_FIELDS).equals(a.drop(REPLY_RUN_FIELDS))
    # The Python API: a fresh cache gets the archive and replays it.
    with gf.Client(
        "emulator", base_url=server.url, cache_dir=str(tmp_path / "fresh"), cache="read", progress=False
    ) as c:
        c.cache.import_(archive)
        replayed = gf.run(str(sample_input), str(tmp_path / "d.parquet"), images="image_path", client=c, progress=False)
    assert replayed["cache_hits"] == 11 and server.emulator.stats.requests == sent


# -- samples ------------------------------------------------------------------------------------


def test_cli_samples_writes_n_rows_per_input_and_reruns_from_cache(client, emulator, sample_input, tmp_path, cache_dir):
    out = tmp_path / "s.parquet"
    manifest = run(str(sample_input), str(out), images="image_path", client=client, progress=False, samples=3)
    frame = pl.read_parquet(out)
    assert frame.height == 36 and frame["sample"].to_list()[:6] == [0, 1, 2, 0, 1, 2]
    assert frame["id"].to_list()[:6] == [0, 0, 0, 1, 1, 1]
    assert manifest["samples"] == 3 and manifest["requests_sent"] == emulator.stats.requests == 33
    assert len(client.cache) == 33  # one cache entry per (row, sample)
    client.close()
    code = main(
        [
            "run",
            str(sample_input),
            str(tmp_path / "s2.parquet"),
            "--images",
            "image_path",
            "--emulator",
            "--cache-dir",
            str(cache_dir),
            "--samples",
            "3",
            "--no-progress",
            "--cache",
            "read",
        ]
    )
    again = pl.read_parquet(tmp_path / "s2.parquet")
    assert code == 0 and again.drop(REPLY_RUN_FIELDS).equals(frame.drop(REPLY_RUN_FIELDS))
    assert again["cached"].drop_nulls().all() and read_manifest(str(tmp_path / "s2.parquet"))["cache_hits"] == 33


def test_samples_refuses_a_sample_column(client, tmp_path):
    src = tmp_path / "in.parquet"
    pl.DataFrame({"prompt": ["a"], "sample": [1]}).write_parquet(src)
    with pytest.raises(gf.InputError, match="sample"):
        run(str(src), str(tmp_path / "o.parquet"), client=client, progress=False, samples=2)


def test_batch_mode_manifest_counts_the_jobs_answers_as_paid(sample_input, tmp_path):
    """Batch answers are collected into the cache before the output is written from it; the
    manifest still counts them as this run's requests, priced at the Batch Mode discount."""
    emulator = Emulator(batch_polls=1)
    with gf.Client("emulator", app=emulator, cache_dir=str(tmp_path / "c"), progress=False) as c:
        first, again = [
            run(
                str(sample_input),
                str(tmp_path / output),
                images="image_path",
                client=c,
                progress=False,
                mode="batch",
                poll_interval=0.01,
                samples=2,
            )
            for output in ("a.parquet", "b.parquet")
        ]
    assert emulator.stats.requests == 0  # nothing went to generateContent
    assert (first["cache_hits"], first["requests_sent"], first["errors"]) == (0, 22, {})
    assert first["tokens"]["input_paid"] == first["tokens"]["input"] > 0
    assert first["cost"]["batch_discount"] and first["cost"]["this_run"] > 0
    assert (again["cache_hits"], again["requests_sent"], again["cost"]["this_run"]) == (22, 0, 0)


def test_batch_mode_counts_each_distinct_request_once_per_run(served_emulator, tmp_path):
    """``gemframe run --batch`` with identical rows spread over record batches: the jobs carry
    each distinct request once, and the manifest counts and prices each once, as a live run of
    the same input does (its later duplicates are cache hits)."""
    import random

    server = served_emulator(batch_polls=1)
    prompts = [f"question {i % 50}" for i in range(100)]  # 50 distinct prompts, each twice
    random.Random(0).shuffle(prompts)  # duplicates in the same record batch and in others
    src = tmp_path / "dup.parquet"
    pl.DataFrame({"prompt": prompts}).write_parquet(src)
    common = ["--emulator", "--base-url", server.url, "--no-progress", "--batch-rows", "10"]
    batch_out, live_out = tmp_path / "batch.parquet", tmp_path / "live.parquet"
    assert (
        main(
            [
                "run",
                str(src),
                str(batch_out),
                *common,
                "--cache-dir",
                str(tmp_path / "c1"),
                "--batch",
                "--poll-interval",
                "0.01",
            ]
        )
        == 0
    )
    in_jobs = sum(len(job.requests) for job in server.emulator.batches.jobs.values())
    assert (in_jobs, server.emulator.stats.requests) == (50, 0)
    assert main(["run", str(src), str(live_out), *common, "--cache-dir", str(tmp_path / "c2")]) == 0
    assert server.emulator.stats.requests == 50
    batch, live = read_manifest(str(batch_out)), read_manifest(str(live_out))
    assert batch["requests_sent"] == live["requests_sent"] == 50
    assert (batch["cache_hits"], batch["cache_misses"]) == (live["cache_hits"], live["cache_misses"])
    assert batch["tokens"] == live["tokens"]
    once = pl.read_parquet(batch_out).unique("response_id")  # one row per request the jobs carried
    assert batch["tokens"]["input_paid"] == once["prompt_tokens"].sum() < batch["tokens"]["input"]
    assert batch["cost"]["this_run"] == pytest.approx(live["cost"]["this_run"] / 2)


# -- temp files are never followed -------------------------------------------------------------


def _plant(link, victim):
    """A symlink at a name gemframe used to write to, pointing at a file it must not touch."""
    os.symlink(victim, link)
    return link


def test_planted_symlinks_at_temp_names_are_not_followed(sample_input, tmp_path):
    """``gemframe run`` (live and batch mode) with a manifest, and ``cache export``: a symlink
    planted at each fixed temp name the writers used (``OUT.parquet.partial``,
    ``manifest.json.partial``, ``OUT.parquet.batch.json.tmp``, ``F.parquet.partial``) never
    makes gemframe write through it; the outputs are complete."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out, sidecar, batch_out = tmp_path / "out.parquet", tmp_path / "manifest.json", tmp_path / "b.parquet"
    export = tmp_path / "answers.parquet"
    links = [
        _plant(f"{p}{suffix}", victim)
        for p, suffix in [
            (out, ".partial"),
            (sidecar, ".partial"),
            (batch_out, ".batch.json.tmp"),
            (export, ".partial"),
        ]
    ]
    cache = str(tmp_path / "cache")
    common = ["--images", "image_path", "--emulator", "--cache-dir", cache, "--no-progress"]
    assert main(["run", str(sample_input), str(out), *common, "--manifest", str(sidecar)]) == 0
    with gf.Client("emulator", app=Emulator(batch_polls=1), cache_dir=str(tmp_path / "c2"), progress=False) as c:
        run(
            str(sample_input),
            str(batch_out),
            images="image_path",
            client=c,
            progress=False,
            mode="batch",
            poll_interval=0.01,
        )
    assert main(["cache", "export", str(export), "--cache-dir", cache]) == 0
    assert victim.read_bytes() == b"precious"
    assert all(os.path.islink(link) for link in links)  # left alone, not written through
    assert pl.read_parquet(out)["text"].is_not_null().sum() == 11
    assert pl.read_parquet(batch_out)["text"].is_not_null().sum() == 11
    assert json.loads(sidecar.read_text())["rows"] == 12
    assert json.loads((tmp_path / "b.parquet.batch.json").read_text())["jobs"]
    assert pl.read_parquet(export).height == 11
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial") and not p.is_symlink()]
    assert leftovers == []
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # what open() would have given


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_outputs_take_the_umask_the_program_has_when_they_are_written(client, tmp_path):
    """A program that sets its umask after importing gemframe gets its outputs (the parquet, the
    manifest, the HTML report) under that umask, as open() would give them: gemframe read the
    umask once, at import, and widened every output to what that old umask allowed. Two masks,
    so at least one differs from the one this process imported gemframe under."""
    src = tmp_path / "in.parquet"
    pl.DataFrame({"prompt": ["private"]}).write_parquet(src)
    modes = {}
    for mask in (0o077, 0o002):
        out = tmp_path / f"out-{mask:03o}.parquet"
        old = os.umask(mask)
        try:
            run(str(src), str(out), client=client, progress=False, manifest_path=f"{out}.json")
            gf.report(str(out), html=f"{out}.html")
        finally:
            os.umask(old)
        modes[mask] = [oct(os.stat(p).st_mode & 0o777) for p in (out, f"{out}.json", f"{out}.html")]
    assert modes == {0o077: [oct(0o600)] * 3, 0o002: [oct(0o664)] * 3}


def test_a_failed_run_leaves_no_temp_file(cache_dir, sample_input, tmp_path):
    guarded = Emulator(api_key="right")
    with gf.Client("emulator", app=guarded, api_key="wrong", cache_dir=str(cache_dir), progress=False) as c:
        with pytest.raises(gf.AuthenticationError):
            run(str(sample_input), str(tmp_path / "out" / "o.parquet"), client=c, progress=False)
    assert os.listdir(tmp_path / "out") == []
