"""gf.RequestSpec: what to ask, one validated object built once and handed down (generate,
request/send, estimate, manifest, run and the CLI ask with the same one)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping

import polars as pl
import pytest

import gemframe as gf
from gemframe._cli import main

SAFETY = {"harassment": "block_only_high"}


class ReadCounter(Mapping):
    """A generationConfig that counts how often it is read (items() or iteration)."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.reads = 0

    def __getitem__(self, key):
        return self.data[key]

    def __iter__(self) -> Iterator:
        self.reads += 1
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def items(self):
        self.reads += 1
        return self.data.items()


def test_a_bad_spec_fails_when_it_is_made_before_anything_is_read_or_sent(
    client, emulator, sample_input, tmp_path, capsys
):
    with pytest.raises(gf.ConfigError, match="Did you mean 'temperature'"):
        gf.RequestSpec(config={"temprature": 0})
    with pytest.raises(gf.ConfigError, match="sample must be an integer >= 0"):
        gf.RequestSpec(sample=-1)
    with pytest.raises(gf.ConfigError, match="give the schema once"):
        gf.RequestSpec(response_schema=pl.String, config={"response_schema": {"type": "STRING"}})
    with pytest.raises(gf.ConfigError, match="unknown safety category"):
        gf.RequestSpec(safety={"gossip": "block_none"})
    # The faces raise the same, when the expression or the call is made: not per batch.
    df = pl.DataFrame({"prompt": ["a", "b"]})
    with pytest.raises(gf.ConfigError, match="Did you mean 'temperature'"):
        gf.generate("prompt", config={"temprature": 0}, client=client)
    with pytest.raises(gf.ConfigError):
        pl.col("prompt").gemini.generate(safety={"gossip": "block_none"}, client=client)
    with pytest.raises(gf.ConfigError):
        df.lazy().gemini.generate("prompt", config={"temprature": 0}, client=client)
    with pytest.raises(gf.ConfigError):
        gf.estimate(df, config={"temprature": 0}, client=client)
    with pytest.raises(gf.ConfigError):
        gf.run(str(sample_input), str(tmp_path / "o.parquet"), config={"temprature": 0}, client=client, progress=False)
    with pytest.raises(ValueError, match="mode must be"):
        gf.generate("prompt", mode="bulk", client=client)  # how to run: also checked up front
    with pytest.raises(TypeError, match="did you mean 'system'"):
        gf.generate("prompt", sytem="x", client=client)
    assert (
        main(
            [
                "run",
                str(sample_input),
                str(tmp_path / "c.parquet"),
                "--emulator",
                "--no-progress",
                "--cache-dir",
                str(tmp_path / "c"),
                "--config",
                '{"temprature": 0}',
            ]
        )
        == 2
    )
    assert "Did you mean 'temperature'" in capsys.readouterr().err
    assert emulator.stats.requests == 0 and not (tmp_path / "o.parquet").exists()
    assert not (tmp_path / "c.parquet").exists()


def test_one_spec_asks_generate_request_estimate_manifest_and_run_the_same(client, emulator, sample_input, tmp_path):
    """The same spec gives every face the same requests, so the same cache keys: after
    generate, estimate counts every request cached and run, send and the keyword form send
    nothing."""
    spec = gf.RequestSpec(system="Be brief.", config={"temperature": 0}, safety=SAFETY, sample=2)
    df = pl.read_parquet(sample_input)
    before = gf.estimate(df, images="image_path", spec=spec, client=client)
    assert (before.distinct_requests, before.cache_hits, before.to_send) == (11, 0, 11)

    out = df.with_columns(reply=gf.generate("prompt", images="image_path", spec=spec, client=client))
    assert emulator.stats.requests == 11
    after = gf.estimate(df, images="image_path", spec=spec, client=client)
    assert (after.cache_hits, after.to_send) == (11, 0)

    # The keywords make an equal spec: the same requests, all cached.
    keywords = {"system": "Be brief.", "config": {"temperature": 0}, "safety": SAFETY, "sample": 2}
    assert gf.RequestSpec(**keywords) == spec
    again = df.with_columns(reply=gf.generate("prompt", images="image_path", client=client, **keywords))
    assert again["reply"].struct.field("cached").drop_nulls().all()
    # request + send with the spec: its body and its sample, so the same key.
    sent = df.with_columns(request=gf.request("prompt", images="image_path", spec=spec)).with_columns(
        reply=gf.send("request", spec=spec, client=client)
    )
    assert sent["reply"].struct.field("cached").drop_nulls().all()
    assert emulator.stats.requests == 11

    m = gf.manifest(out, spec=spec, client=client, images="image_path")
    manifest = gf.run(
        str(sample_input), str(tmp_path / "o.parquet"), images="image_path", spec=spec, client=client, progress=False
    )
    assert (manifest["cache_hits"], manifest["requests_sent"]) == (11, 0) and emulator.stats.requests == 11
    described = ("model", "system", "config", "safety", "sample")
    assert (
        {k: m[k] for k in described}
        == {k: manifest[k] for k in described}
        == {
            "model": gf.DEFAULT_MODEL,
            "system": "Be brief.",
            "config": {"temperature": 0},
            "safety": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}],
            "sample": 2,
        }
    )
    # Keywords with spec= replace its fields: another sample is another request.
    other = df.head(2).with_columns(reply=gf.generate("prompt", spec=spec, sample=3, client=client))
    assert not other["reply"].struct.field("cached").any() and emulator.stats.requests == 13


def test_the_options_are_read_and_checked_once_per_call(client, emulator, sample_input, tmp_path):
    """gf.run with 3 samples and a manifest: the config is read once (it was read by a
    builder, by each of the 3 expressions and by the manifest: 5 times)."""
    config = ReadCounter({"temperature": 0})
    manifest = gf.run(
        str(sample_input),
        str(tmp_path / "o.parquet"),
        images="image_path",
        config=config,
        samples=3,
        client=client,
        progress=False,
        manifest_path=str(tmp_path / "m.json"),
    )
    assert manifest["requests_sent"] == emulator.stats.requests == 33 and manifest["config"] == {"temperature": 0}
    assert config.reads == 1
    # An expression reads it when it is made, never per batch (here 4 streamed batches).
    config = ReadCounter({"temperature": 0})
    expr = gf.generate("prompt", config=config, client=client)
    assert config.reads == 1
    frames = [pl.DataFrame({"prompt": [f"q{i}-{j}" for j in range(5)]}) for i in range(4)]
    out = pl.concat(frames, rechunk=False).with_columns(reply=expr)
    assert out["reply"].struct.field("error").is_null().all() and config.reads == 1


def test_the_faces_show_and_type_the_options():
    """help()/inspect list the options (declared once, in RequestSpec) in every face."""
    options = ["model", "system", "config", "safety", "response_schema", "sample"]
    faces = [
        gf.generate,
        gf.request,
        gf.estimate,
        gf.manifest,
        gf.run,
        pl.col("p").gemini.generate,
        pl.DataFrame().gemini.generate,
        pl.LazyFrame().gemini.generate,
    ]
    for face in faces:
        params = inspect.signature(face).parameters
        assert all(name in params for name in options) and "spec" in params, face
    assert {"name", "unnest", "prefix", "client"} <= set(inspect.signature(pl.DataFrame().gemini.generate).parameters)
