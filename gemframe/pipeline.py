"""Parquet to parquet in bounded memory: read record batches, answer them, write them, repeat.

The output is written to ``OUT.partial`` and renamed into place only when complete, so a killed
job never leaves a half-written file; rerunning it resends nothing that was answered (the
answers are in the cache). A run manifest (what produced the file, counts, tokens, time) is
stored in the parquet key-value metadata under ``gemframe``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from .batch import BatchJobs
from .client import Client
from .errors import APIError, InputError
from .expr import default_client, generate
from .payload import RequestBuilder
from .progress import Progress
from .response import reply_dtype

MANIFEST_KEY = b"gemframe"
MANIFEST_FORMAT = 1


def _fingerprint(path: str) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


class _Tally:
    """Counts for the manifest, from the reply column of each batch."""

    def __init__(self) -> None:
        self.rows = self.skipped = self.cached = self.sent = 0
        self.prompt_tokens = self.candidates_tokens = 0
        self.errors: Counter[str] = Counter()

    def add(self, replies: pl.Series) -> None:
        self.rows += len(replies)
        self.skipped += replies.null_count()
        fields = replies.struct
        cached = fields.field("cached").fill_null(False)
        error = fields.field("error").struct.field("status")
        self.cached += int(cached.sum())
        self.sent += int((~cached & (fields.field("attempts").fill_null(0) > 0)).sum())
        fresh = ~cached
        self.prompt_tokens += int(fields.field("prompt_tokens").filter(fresh).sum() or 0)
        self.candidates_tokens += int(fields.field("candidates_tokens").filter(fresh).sum() or 0)
        self.errors.update(s for s in error.to_list() if s is not None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "rows_without_prompt": self.skipped,
            "cache_hits": self.cached,
            "requests_sent": self.sent,
            "errors": dict(self.errors),
            "prompt_tokens_paid": self.prompt_tokens,
            "candidates_tokens_paid": self.candidates_tokens,
        }


def read_manifest(path: str) -> dict[str, Any] | None:
    """The run manifest stored in a gemframe output parquet, or None."""
    metadata = pq.read_metadata(path).metadata or {}
    raw = metadata.get(MANIFEST_KEY)
    return json.loads(raw) if raw else None


def run(
    input: str,
    output: str,
    *,
    prompt: str = "prompt",
    images: str | None = None,
    system: str | None = None,
    model: str | None = None,
    config: Mapping[str, Any] | None = None,
    safety: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
    client: Client | None = None,
    cache: str | None = None,
    image_dir: str | None = None,
    batch_rows: int = 10_000,
    progress: bool = True,
    mode: str = "live",
    poll_interval: float = 30.0,
) -> dict[str, Any]:
    """Answer every row of ``input`` and write ``output`` (input columns + reply fields).

    ``mode="batch"`` submits every miss as provider batch jobs (recorded in
    ``OUT.batch.json``, so a rerun resumes them), waits for all of them, then writes the output.
    Returns the run manifest, which is also stored in the output's metadata.
    """
    client = client or default_client()
    model = model or client.model
    builder = RequestBuilder(system, config, safety)  # a bad config fails before reading anything
    source = pq.ParquetFile(input)
    columns = source.schema_arrow.names
    for role, name in (("prompt", prompt), ("images", images)):
        if name is not None and name not in columns:
            raise InputError(f"{input}: no {role} column {name!r}; columns are {columns}")
    clash = sorted(set(columns) & set(reply_dtype().to_schema()))
    if clash:
        raise InputError(
            f"{input}: columns {clash} would collide with the reply fields; rename them first"
        )
    started = time.time()
    bar = Progress(source.metadata.num_rows, progress, model)
    tally = _Tally()
    batch: dict[str, Any] = {}
    if mode == "batch":
        batch = {"mode": "batch", "batch_state": f"{output}.batch.json", "poll_interval": poll_interval}
    request = dict(prompt=prompt, images=images, system=system, model=model, config=config,
                   safety=safety, client=client, cache=cache, image_dir=image_dir, **batch)
    expr = generate(**request, progress=bar)
    if batch:  # submit the misses of every batch, wait once for all jobs, then write as usual
        submit = generate(**request, progress=False, wait=False)
        for record_batch in source.iter_batches(batch_size=batch_rows):
            pl.from_arrow(record_batch).select(submit)
        BatchJobs(client, model, batch["batch_state"], poll_interval, bar).resolve({}, wait=True)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    partial = f"{output}.partial"
    writer: pq.ParquetWriter | None = None
    try:
        batches = source.iter_batches(batch_size=batch_rows) if source.metadata.num_rows else [
            source.schema_arrow.empty_table()
        ]
        for batch in batches:
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            answered = frame.with_columns(expr)
            tally.add(answered["reply"])
            table = answered.unnest("reply").to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(partial, table.schema)
            writer.write_table(table)
        manifest = {
            "format": MANIFEST_FORMAT,
            "gemframe": _version(),
            "provider": client.provider.name,
            "base_url": client.provider.base_url,
            "model": model,
            "system": system,
            "config": builder.config,
            "safety": builder.safety,
            "prompt_column": prompt,
            "images_column": images,
            "input": _fingerprint(input),
            "output": os.path.abspath(output),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_seconds": round(time.time() - started, 3),
            **tally.as_dict(),
        }
        assert writer is not None
        writer.add_key_value_metadata({MANIFEST_KEY: json.dumps(manifest).encode()})
        writer.close()
        writer = None
        os.replace(partial, output)
    except APIError as exc:  # say what was saved, so nobody fears a rerun
        raise type(exc)(
            f"{exc}\n{bar.rows} of {source.metadata.num_rows} rows were answered before this "
            f"({bar.cached} from the cache); every answer is cached, so rerunning the same command "
            "after the fix resends none of them. No output file was written."
        ) from exc
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return manifest


def _version() -> str:
    from . import __version__

    return __version__
