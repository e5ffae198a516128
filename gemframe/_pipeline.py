"""Parquet to parquet in bounded memory: read record batches, answer them, write them, repeat.

The output is written to a new temp file beside it and renamed into place only when complete, so a killed
job never leaves a half-written file; rerunning it resends nothing that was answered (the
answers are in the cache). A run manifest (what produced the file, counts, tokens, time) is
stored in the parquet key-value metadata under ``gemframe`` (and, with ``manifest_path``, in a
JSON sidecar); see `gemframe._accounting.manifest`. ``samples=N`` answers every row N times (sample indices
0..N-1, each its own cache entry) and writes N rows per input row with a ``sample`` column.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from ._accounting.manifest import (
    MANIFEST_KEY,
    Tally,
    describe,
    fingerprint,
    read_manifest,
    with_context_caches,
    write_manifest,
)
from ._accounting.pricing import Prices
from ._core.batch import BatchJobs
from ._core.cache import CacheMode
from ._core.client import Client, default_client
from ._core.progress import Progress
from ._core.response import reply_dtype
from ._core.spec import Ask, RequestSpec, Unpack, asks, request_spec
from ._errors import APIError, ConfigError, InputError
from ._files import AtomicFile
from ._polars.expr import generate, reply_columns

__all__ = ["MANIFEST_KEY", "read_manifest", "run"]


@asks
def run(
    input: str,
    output: str,
    *,
    prompt: str = "prompt",
    images: str | None = None,
    spec: RequestSpec | None = None,
    client: Client | None = None,
    cache: str | None = None,
    image_dir: str | None = None,
    batch_rows: int = 10_000,
    progress: bool = True,
    mode: str = "live",
    poll_interval: float = 30.0,
    samples: int = 1,
    prefix: str | None = None,
    manifest_path: str | None = None,
    prices: Prices | None = None,
    **ask: Unpack[Ask],
) -> dict[str, Any]:
    """Answer every row of ``input`` and write ``output`` (input columns + reply fields).

    What to ask is a `gemframe.RequestSpec` (``spec=``) or its keywords (``model``, ``system``,
    ``config``, ``safety``, ``response_schema``, ``sample``), checked before anything is read.
    ``mode="batch"`` submits every miss as provider batch jobs (recorded in
    ``OUT.batch.json``, so a rerun resumes them), waits for all of them, then writes the output.
    Returns the run manifest, which is also stored in the output's metadata (and written to
    ``manifest_path`` as JSON when given). ``samples=N`` (N > 1) writes N rows per input row,
    sample indices ``sample`` .. ``sample + N - 1`` in a ``sample`` column; ``prices`` overrides
    the price table used for the manifest's cost (see `gemframe._accounting.pricing`).

    A reply field named like an input column (``text``, ``images``, ``error``, ...) is written
    as ``reply_{field}``, with a warning naming it; ``prefix="r_"`` prefixes every reply field
    instead. The manifest's ``reply_columns`` records the renamed ones.
    """
    spec = request_spec(spec, ask, "run")  # a bad config fails before reading anything
    client = client or default_client()
    model = spec.model_for(client.model)
    if mode == "batch" and (CacheMode(cache) if cache else client.cache_mode) is CacheMode.OFF:
        # The output is written from the cache once every job is collected: without it the
        # answers would be paid for and lost (every row BATCH_LOST). Refused before any job.
        raise ConfigError(
            "batch mode needs the cache (cache 'off' / --cache off): the jobs' answers are kept "
            "there until the output is written. Use cache 'use' (a separate cache_dir= / "
            "--cache-dir keeps them apart from other answers)"
        )
    source = pq.ParquetFile(input)
    columns = source.schema_arrow.names
    for role, name in (("prompt", prompt), ("images", images)):
        if name is not None and name not in columns:
            raise InputError(f"{input}: no {role} column {name!r}; columns are {columns}")
    if samples < 1:
        raise InputError("samples must be >= 1")
    if samples > 1 and "sample" in columns:
        raise InputError(f"{input}: a column 'sample' would collide with the sample index column; rename it first")
    schema = spec.schema
    fields = list(reply_dtype(image_files=image_dir is not None, parsed=schema.dtype if schema else None).to_schema())
    renamed = reply_columns(fields, columns, prefix)
    started = time.time()
    bar = Progress(_rows_to_answer(input, prompt, images) * samples, progress, model)
    paid: Counter[str] = Counter()  # Batch Mode: response id -> requests this run's jobs answered with it
    batch: dict[str, Any] = {}
    if mode == "batch":
        batch = {"mode": "batch", "batch_state": f"{output}.batch.json", "poll_interval": poll_interval}
    request = dict(prompt=prompt, images=images, client=client, cache=cache, image_dir=image_dir, **batch)
    specs = [spec.with_sample(spec.sample + k) for k in range(samples)]
    exprs = [generate(**request, spec=s, progress=bar) for s in specs]
    if batch:  # submit the misses of every batch, wait once for all jobs, then write as usual
        for record_batch in source.iter_batches(batch_size=batch_rows):
            frame = pl.from_arrow(record_batch)
            assert isinstance(frame, pl.DataFrame)
            for s in specs:  # one at a time: each call updates the one state file
                frame.select(generate(**request, spec=s, progress=False, wait=False))
        store = client.cache if client.cache_mode is not CacheMode.OFF else None
        BatchJobs(client.provider, client.executor, store, model, batch["batch_state"], poll_interval, bar).wait()
        if client.cache_mode is not CacheMode.OFF:  # answers the jobs stored: paid in this run
            paid.update(
                json.loads(e["response"]).get("responseId") for e in client.cache.entries(model=model, after=started)
            )
    tally = Tally(paid)  # counts each request once per run, however many record batches it is in
    partial = AtomicFile(output)  # an exclusive temp file, renamed when complete (see _files)
    writer: pq.ParquetWriter | None = None
    try:
        batches = (
            source.iter_batches(batch_size=batch_rows)
            if source.metadata.num_rows
            else [source.schema_arrow.empty_table()]
        )
        for batch in batches:
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            answered = _answer(frame, exprs, tally, spec.sample)
            if renamed:
                answered = answered.with_columns(
                    pl.col("reply").struct.rename_fields([renamed.get(f, f) for f in fields])
                )
            table = answered.unnest("reply").to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(partial.file, table.schema)
            writer.write_table(table)
        finished = time.time()
        manifest = {
            **describe(
                client=client,
                spec=spec,
                prompt=prompt,
                images=images,
                samples=samples,
                cache_mode=(cache or client.cache_mode.value),
            ),
            **({"reply_columns": renamed} if renamed else {}),
            "mode": mode,
            "input": fingerprint(input),
            "output": os.path.abspath(output),
            "started": _stamp(started),
            "finished": _stamp(finished),
            "wall_seconds": round(finished - started, 3),
            **tally.as_dict(model, prices, batch=mode == "batch"),
        }
        manifest = with_context_caches(manifest, client, spec, prices)
        assert writer is not None
        writer.add_key_value_metadata({MANIFEST_KEY: json.dumps(manifest).encode()})
        writer.close()
        writer = None
        partial.commit()
        bar.close()  # the job is done: one RowsFailedWarning if rows failed
        if manifest_path:
            write_manifest(manifest, manifest_path)
    except APIError as exc:  # say what was saved, so nobody fears a rerun
        raise type(exc)(
            f"{exc}\n{bar.rows} of {source.metadata.num_rows} rows were answered before this "
            f"({bar.cached} from the cache); every answer is cached, so rerunning the same command "
            "after the fix resends none of them. No output file was written."
        ) from exc
    finally:
        bar.close(warn=False)  # after an exception: that says it all
        if writer is not None:
            writer.close()
        partial.discard()  # after an error: no temp file left behind
    return manifest


def _answer(frame: pl.DataFrame, exprs: list[pl.Expr], tally: Tally, first: int = 0) -> pl.DataFrame:
    """The batch with its reply column; with several samples, one row per (input row, sample),
    the samples numbered from ``first``."""
    if len(exprs) == 1:
        answered = frame.with_columns(exprs[0])
        tally.add(answered["reply"])
        return answered
    parts = []
    for k, expr in enumerate(exprs, first):
        part = frame.with_row_index("__gemframe_row").with_columns(pl.lit(k, pl.Int32).alias("sample"), expr)
        tally.add(part["reply"])
        parts.append(part)
    return pl.concat(parts).sort("__gemframe_row", "sample", maintain_order=True).drop("__gemframe_row")


def _rows_to_answer(path: str, prompt: str, images: str | None) -> int:
    """The rows the bar counts: those with a prompt or images (the others send nothing and
    get a null reply, as `generate` does). Reads only those columns, streaming."""
    asked = pl.col(prompt).is_not_null()
    if images is not None:
        asked = asked | pl.col(images).is_not_null()
    return int(pl.scan_parquet(path).select(asked.sum()).collect(engine="streaming").item() or 0)


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
