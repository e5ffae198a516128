"""Run manifests: what produced a result, in a small JSON-able dict.

`gemframe run` stores one in the output parquet's key-value metadata (key ``gemframe``) and, on
request, in a JSON sidecar; `read_manifest` reads it back (``gemframe manifest OUT.parquet``
prints it). For results made with expressions, `manifest` builds the same dict from a reply
column::

    out = df.with_columns(reply=gf.generate("prompt", config=cfg, client=client))
    m = gf.manifest(out, client=client, config=cfg)
    out.write_parquet("out.parquet", metadata={"gemframe": json.dumps(m)})   # gf.read_manifest reads it

Counts come from the reply fields: ``cached`` rows are cache hits, rows answered by a request
made in this run are cache misses; ``requests_sent`` counts distinct requests (identical rows
share one), ``tokens`` counts every answered row and, ``*_paid``, only this run's requests;
``cost`` prices both by `gemframe._accounting.pricing` (the same rule as `gemframe.cost_expr`,
so ``this_run`` is the sum of ``cost_expr`` over the rows of this run's distinct requests),
split into input, cached input, output, thinking and images. A client caching the shared
prefix (``gf.Client(cache_context=...)``) adds ``context_caches``: each ``cachedContents`` it
made for the job (name, model, tokens, created, deleted or expires, hours stored) with its
creation and storage cost (`pricing.context_cache_cost`), which ``this_run`` then includes
(``this_run_split["context_cache"]``); a cache still alive is priced until it expires.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any, cast

import polars as pl

from .._core.client import Client, default_client
from .._core.spec import Ask, RequestSpec, Unpack, asks, request_spec
from .._files import atomic_write
from .._version import __version__
from .pricing import PARTS, PRICES_AS_OF, PRICES_ENV, Prices, context_cache_cost, price_usage, usage_exprs

MANIFEST_KEY = b"gemframe"
MANIFEST_FORMAT = 2

TALLY_FIELDS = (
    "cached",
    "attempts",
    "error",
    "finish_reason",
    "prompt_tokens",
    "candidates_tokens",
    "thoughts_tokens",
    "cached_content_tokens",
    "images",
    "response_id",
    "latency_ms",
)


def fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Path, size and sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def reply_struct(data: pl.Series | pl.DataFrame, reply: str = "reply") -> pl.Series:
    """The reply struct column of a frame (a ``reply`` struct, or the reply fields unnested as
    ``gemframe run`` writes them), or the series itself."""
    if isinstance(data, pl.Series):
        return data
    if reply in data.columns and isinstance(data.schema[reply], pl.Struct):
        return data[reply]
    present = [c for c in TALLY_FIELDS if c in data.columns]
    if "cached" not in present or "error" not in present:
        raise ValueError(f"no reply column {reply!r} and no reply fields (cached, error, ...) in {data.columns}")
    # A row whose reply was null (nothing to send) has every reply field null.
    return data.select(
        pl.when(pl.any_horizontal(pl.col(present).is_not_null())).then(pl.struct(present)).alias(reply)
    ).to_series()


class Tally:
    """Counts for a manifest, added up over the reply column of each batch (or send call).

    ``paid``: answers received in this run although the output reads them from the cache
    (Batch Mode collects the jobs' answers into the cache before the output is written), as
    response id -> how many distinct requests (cache entries) this run got it for. Each such
    request counts as sent once per run, in the first send call that has it; rows with it in
    later calls are cache hits, as they are in a live run, where a record batch's duplicates of
    an earlier batch's rows are answered from the cache. (The jobs carried each distinct
    request once, however many record batches its rows fell in.)"""

    def __init__(self, paid: Mapping[str, int] | None = None) -> None:
        self.rows = self.skipped = self.hits = self.misses = self.sent = 0
        self.tokens = Counter[str]()
        self.priced = Counter[str]()  # priced quantities (`pricing.PARTS`), all rows and "_paid"
        self.errors: Counter[str] = Counter()
        self.finish: Counter[str] = Counter()
        # ``paid`` requests not yet counted: a response id may answer several distinct requests
        # (the emulator's ids derive from the body, which the sample index does not change)
        self.unclaimed = Counter({k: n for k, n in (paid or {}).items() if k is not None and n > 0})

    def add(self, replies: pl.Series) -> None:
        """One reply column; each call is one send call (identical requests share one record)."""
        self.rows += len(replies)
        self.skipped += replies.null_count()
        frame = replies.filter(replies.is_not_null()).struct.unnest()
        for name in TALLY_FIELDS:  # a user's reply struct may lack some (e.g. raw selections)
            if name not in frame.columns:
                frame = frame.with_columns(pl.lit(None).alias(name))
        frame = frame.with_columns(
            pl.col("cached").cast(pl.Boolean).fill_null(False),
            pl.col("attempts").cast(pl.Int64).fill_null(0),
            n_images=pl.col("images").list.len().fill_null(0) if frame.schema["images"] != pl.Null else pl.lit(0),
        )
        if self.unclaimed:  # this call's rows of requests answered by this run's jobs
            fetched = pl.col("response_id").is_in(list(self.unclaimed)).fill_null(False) & pl.col("cached")
            frame = frame.with_columns(fetched=fetched).with_columns(
                pl.col("cached") & ~pl.col("fetched"), pl.col("attempts") + pl.col("fetched").cast(pl.Int64)
            )
            self.unclaimed.subtract(frame.filter(pl.col("fetched"))["response_id"].unique().to_list())
            self.unclaimed = +self.unclaimed  # drop the ids with nothing left to claim
        hits = int(frame["cached"].sum())
        self.hits += hits
        self.misses += frame.height - hits
        errors = frame["error"].struct.field("status") if frame.schema["error"] != pl.Null else frame["error"]
        self.errors.update(s for s in errors.to_list() if s is not None)
        self.finish.update(s for s in frame["finish_reason"].to_list() if s is not None)
        # Rows sharing one request share its record: same response, attempts and latency.
        fresh = frame.filter(~pl.col("cached") & (pl.col("attempts") > 0)).unique(
            subset=["response_id", "attempts", "latency_ms"], keep="first", maintain_order=True
        )
        self.sent += fresh.height
        for suffix, part in (("", frame), ("_paid", fresh)):
            sums = part.select(
                pl.col("prompt_tokens", "candidates_tokens", "thoughts_tokens", "cached_content_tokens")
                .cast(pl.Int64)
                .sum(),
                **{f"priced_{k}": e.sum() for k, e in _usage().items()},
            ).row(0, named=True)
            prompt, candidates, thoughts, cached = (
                int(sums[k] or 0)
                for k in ("prompt_tokens", "candidates_tokens", "thoughts_tokens", "cached_content_tokens")
            )
            self.tokens[f"input{suffix}"] += prompt
            self.tokens[f"cached_input{suffix}"] += cached
            self.tokens[f"output{suffix}"] += candidates + thoughts
            self.tokens[f"thoughts{suffix}"] += thoughts
            self.tokens[f"images{suffix}"] += int(sums["priced_images"] or 0)
            for k in PARTS:  # what is priced, by `pricing`'s rule
                self.priced[f"{k}{suffix}"] += int(sums[f"priced_{k}"] or 0)

    def as_dict(self, model: str | None = None, prices: Prices | None = None, batch: bool = False) -> dict[str, Any]:
        """The counts; with a ``model``, their estimated ``cost`` too (``batch``: at the Batch
        Mode discount)."""
        t = self.tokens
        tokens = {
            k: int(t[k])
            for k in (
                "input",
                "cached_input",
                "output",
                "thoughts",
                "input_paid",
                "cached_input_paid",
                "output_paid",
                "thoughts_paid",
            )
        }
        out = {
            "rows": self.rows,
            "rows_without_prompt": self.skipped,
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "requests_sent": self.sent,
            "errors": dict(self.errors.most_common()),
            "finish_reasons": dict(self.finish.most_common()),
            "tokens": tokens,
            "images_generated": int(t["images"]),
            "images_generated_paid": int(t["images_paid"]),
        }
        if model is not None:
            out["cost"] = _cost(model, self.priced, prices, batch)
        return out


def _usage() -> dict[str, pl.Expr]:
    """The priced quantities of each row of a tally's frame (see `pricing.usage_exprs`)."""
    return usage_exprs(
        pl.col("prompt_tokens"),
        pl.col("cached_content_tokens"),
        pl.col("candidates_tokens"),
        pl.col("thoughts_tokens"),
        pl.col("n_images"),
    )


def _cost(model: str, priced: Mapping[str, int], prices: Prices | None, batch: bool = False) -> dict[str, Any]:
    paid, everything = (
        price_usage(model, {k: priced[f"{k}{suffix}"] for k in PARTS}, prices, batch) for suffix in ("_paid", "")
    )
    if paid is None or everything is None:
        return {
            "currency": "USD",
            "this_run": None,
            "all_rows": None,
            "note": f"no price for model {model!r}: pass prices= or set ${PRICES_ENV}",
        }
    return {
        "currency": "USD",
        "this_run": paid["usd"],  # the answers received (paid for) in this run
        "all_rows": everything["usd"],  # every answer in the output, cached ones included
        "this_run_split": {k: paid[f"{k}_usd"] for k in PARTS},
        "all_rows_split": {k: everything[f"{k}_usd"] for k in PARTS},
        "priced_as": paid["priced_as"],
        "prices": paid["prices"],
        "batch_discount": batch,
        "basis": f"estimated from actual usageMetadata at list prices as of {PRICES_AS_OF} "
        "(USD per 1M input, cached input and output tokens, thinking billed as output, "
        "per generated image)",
    }


def with_context_caches(
    manifest: dict[str, Any], client: Client, spec: RequestSpec, prices: Prices | None = None
) -> dict[str, Any]:
    """A manifest with the context caches the client made for this spec's prefix and model, and
    their cost added to ``this_run``; unchanged when it made none. Reproducible: each cache's
    ``creation_usd`` is ``tokens`` at the input rate, ``storage_usd`` is ``tokens`` x
    ``storage_hours`` at the ``cache_storage`` rate."""
    model = spec.model_for(client.model)
    records = client.context_caches.records(model, spec.builder)
    if not records:
        return manifest
    caches = []
    for record in records:
        entry = record.as_dict()
        priced = context_cache_cost(record.model, record.tokens, record.hours, prices)
        if priced is not None:
            entry.update(creation_usd=priced["creation_usd"], storage_usd=priced["storage_usd"])
        caches.append(entry)
    out = {**manifest, "context_caches": caches}
    cost = manifest.get("cost")
    if isinstance(cost, dict) and cost.get("this_run") is not None:
        usd = round(sum(c.get("creation_usd", 0.0) + c.get("storage_usd", 0.0) for c in caches), 9)
        out["cost"] = {
            **cost,
            "this_run": round(cost["this_run"] + usd, 9),
            "this_run_split": {**cost["this_run_split"], "context_cache": usd},
            "basis": cost["basis"] + "; context caches: their tokens once at the input rate and "
            "tokens x hours stored (until deleted, else until they expire) at the storage rate",
        }
    return out


def _version() -> str:

    return __version__


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def describe(
    *,
    client: Client,
    spec: RequestSpec,
    prompt: Any,
    images: Any,
    samples: int,
    cache_mode: str,
) -> dict[str, Any]:
    """The "what produced it" part of a manifest: where it was asked, what (the spec's
    description: model, system, config, safety as sent) and of which columns."""

    def column(value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, (bytes, bytearray, memoryview)):
            return f"<{len(value)} bytes, sha256 {hashlib.sha256(value).hexdigest()[:16]}>"
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)

    return {
        "format": MANIFEST_FORMAT,
        "gemframe": _version(),
        "provider": client.provider.name,
        "base_url": client.provider.display_base_url,  # never credentials in it
        **spec.describe(client.model),
        "prompt_column": column(prompt),
        "images_column": column(images),
        "samples": samples,
        "cache_mode": cache_mode,
    }


@asks
def manifest(
    data: pl.Series | pl.DataFrame,
    reply: str = "reply",
    *,
    spec: RequestSpec | None = None,
    client: Client | None = None,
    prompt: Any = None,
    images: Any = None,
    input: str | os.PathLike[str] | None = None,
    samples: int = 1,
    cache: str | None = None,
    started: float | None = None,
    prices: Prices | None = None,
    **ask: Unpack[Ask],
) -> dict[str, Any]:
    """A run manifest for replies made with `gemframe.generate`: pass the frame (or the reply
    column) and what you passed to ``generate`` (client, and the `gemframe.RequestSpec` as
    ``spec=`` or its keywords: model, system, config, ...), so the manifest says what produced
    them. ``input``: a file to fingerprint; ``started``: the ``time.time()`` before the call,
    for the wall time."""

    spec = request_spec(spec, ask, "manifest")
    client = client or default_client()
    model = spec.model_for(client.model)
    tally = Tally()
    tally.add(reply_struct(data, reply))
    out = describe(
        client=client,
        spec=spec,
        prompt=prompt,
        images=images,
        samples=samples,
        cache_mode=cache or client.cache_mode.value,
    )
    if input is not None:
        out["input"] = fingerprint(input)
    now = time.time()
    if started is not None:
        out.update(started=_stamp(started), finished=_stamp(now), wall_seconds=round(now - started, 3))
    else:
        out["finished"] = _stamp(now)
    return with_context_caches({**out, **tally.as_dict(model, prices)}, client, spec, prices)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run manifest stored in a parquet file's metadata (or a JSON sidecar file), or None."""
    path = os.fspath(path)
    if path.endswith(".json"):
        with open(path) as f:
            return cast(dict[str, Any], json.load(f))  # the sidecar gemframe wrote: a JSON object
    import pyarrow.parquet as pq

    metadata = pq.read_metadata(path).metadata or {}
    raw = metadata.get(MANIFEST_KEY)
    return json.loads(raw) if raw else None


def write_manifest(manifest: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """A manifest as a pretty JSON sidecar file (written whole, then renamed)."""
    with atomic_write(path, "w", encoding="utf-8") as f:  # never through a planted symlink
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
