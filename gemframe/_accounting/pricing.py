"""What tokens cost: the price table, and the one rule that turns a reply's token counts into USD.

Every figure gemframe gives in dollars — `gemframe.estimate` / ``run --dry-run``, the run
manifest, the report, `gemframe.cost_expr` on your own frames — comes from `price_usage`, so a
manifest's cost is reproducible from the output's reply columns:

==================  =================================================  =======================
priced quantity     from the reply columns                             rate (table key)
==================  =================================================  =======================
input               ``prompt_tokens - cached_content_tokens``          ``input``
cached input        ``cached_content_tokens`` (context-cache reads,    ``cached_input`` (else
                    implicit caching included)                         ``input``)
output              ``candidates_tokens - images * 1290`` (text)       ``output``
thinking            ``thoughts_tokens`` (billed as output)             ``output``
images              ``len(images)`` generated images                   ``image`` USD per image
                                                                       (else 1290 output
                                                                       tokens each)
==================  =================================================  =======================

Batch Mode is billed at `BATCH_DISCOUNT` of every rate. Rates are USD per 1M tokens (per image
for ``image``); ``cache_storage`` is USD per 1M tokens per hour a context cache is kept, which
only an explicit ``cachedContents`` resource costs (``gf.Client(cache_context=...)``; implicit
caching stores nothing you pay for). No reply column carries it: `context_cache_cost` prices a
cache from the manifest's record of it (its tokens once at the ``input`` rate for its creation,
and tokens x hours kept at ``cache_storage``), beside the rows' cost.

Prices are Google's list prices (`PRICES_AS_OF`, standard paid tier, prompts up to 200k tokens;
longer prompts cost more on some models and are priced here at the short-prompt rates).
Override or extend them with ``prices=`` (a dict like `PRICES`, or a path to a JSON file of one)
or ``$GEMFRAME_PRICES`` (a JSON file); the argument wins over the file, the file over the
built-in table, key by key. A model is priced by its exact id, else by the longest id in the
table that it starts with (``gemini-2.5-flash-preview-05-20`` is priced as ``gemini-2.5-flash``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, Union

import polars as pl

from .._errors import InputError

PRICES_AS_OF = "2025-11"  # from https://ai.google.dev/gemini-api/docs/pricing
PRICES_ENV = "GEMFRAME_PRICES"

# USD per 1M input tokens, per 1M tokens read from a context cache ("cached_input"), per 1M
# output tokens (text; thinking tokens are billed as output: the page's "Output price
# (including thinking tokens)"), per generated image ("image": image models bill image output
# at $30 per 1M tokens and an image up to 1024x1024 is 1290 tokens, $0.039), and per 1M tokens
# per hour of context-cache storage ("cache_storage"). Standard paid tier, prompts up to
# 128k/200k tokens. Models without a cached rate had no context caching on the page. Cached
# input is a tenth of the input rate on the 2.5 models (a quarter on 2.0 and 1.5: the page
# lowered the 2.5 rates from a quarter in 2025; text/image/video rates, audio costs more).
PRICES: dict[str, dict[str, float]] = {
    "gemini-2.5-pro": {"input": 1.25, "cached_input": 0.125, "output": 10.00, "cache_storage": 4.50},
    "gemini-2.5-flash": {"input": 0.30, "cached_input": 0.03, "output": 2.50, "cache_storage": 1.00},
    "gemini-2.5-flash-lite": {"input": 0.10, "cached_input": 0.01, "output": 0.40, "cache_storage": 1.00},
    "gemini-2.5-flash-image": {"input": 0.30, "output": 2.50, "image": 0.039},
    "gemini-2.0-flash": {"input": 0.10, "cached_input": 0.025, "output": 0.40, "cache_storage": 1.00},
    "gemini-2.0-flash-lite": {"input": 0.075, "output": 0.30},
    "gemini-2.0-flash-preview-image-generation": {"input": 0.10, "output": 0.40, "image": 0.039},
    "gemini-2.0-flash-exp-image-generation": {"input": 0.10, "output": 0.40, "image": 0.039},
    "gemini-1.5-pro": {"input": 1.25, "cached_input": 0.3125, "output": 5.00, "cache_storage": 4.50},
    "gemini-1.5-flash": {"input": 0.075, "cached_input": 0.01875, "output": 0.30, "cache_storage": 1.00},
    "gemini-1.5-flash-8b": {"input": 0.0375, "cached_input": 0.01, "output": 0.15, "cache_storage": 0.25},
}
PRICE_KEYS = ("input", "cached_input", "output", "image", "cache_storage")

IMAGE_OUTPUT_TOKENS = 1290  # output tokens of one generated image (up to 1024x1024)
BATCH_DISCOUNT = 0.5  # Batch Mode is billed at half the standard price
PARTS = ("input", "cached_input", "output", "thinking", "images")  # the split of a cost
_DIGITS = 9  # USD rounded to a billionth: an emulator run's cost is a few millionths

Prices = Union[Mapping[str, Mapping[str, float]], str, os.PathLike[str]]
Amount = TypeVar("Amount", float, pl.Expr)


def _load(source: Prices) -> dict[str, dict[str, float]]:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            with open(path) as f:
                source = json.load(f)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read prices from {path!r}: {exc}") from None
    shape = "{'input': USD/1M, 'output': USD/1M[, 'cached_input': USD/1M, 'image': USD, 'cache_storage': USD/1M/hour]}"
    if not isinstance(source, Mapping):
        raise InputError(f"prices must map model ids to {shape}")
    table = {}
    for model, entry in source.items():
        if not isinstance(entry, Mapping) or not set(entry) <= set(PRICE_KEYS):
            raise InputError(f"price of {model!r} must be {shape}, got {entry!r}")
        try:
            table[str(model)] = {k: float(v) for k, v in entry.items()}
        except (TypeError, ValueError):
            raise InputError(f"price of {model!r} must hold numbers, got {entry!r}") from None
    return table


def price_table(prices: Prices | None = None) -> dict[str, dict[str, float]]:
    """The built-in table, updated from ``$GEMFRAME_PRICES`` (a JSON file) and then ``prices``."""
    table = {model: dict(entry) for model, entry in PRICES.items()}
    for source in (os.environ.get(PRICES_ENV) or None, prices):
        if source is not None:
            for model, entry in _load(source).items():
                table[model] = {**table.get(model, {}), **entry}
    return table


def model_price(model: str, prices: Prices | None = None) -> tuple[str, dict[str, float]] | None:
    """(the table entry's id, its prices) for a model, or None if it is not in the table."""
    table = price_table(prices)
    model = model.removeprefix("models/")
    if model in table:
        return model, table[model]
    matches = [m for m in table if model.startswith(m)]
    if not matches:
        return None
    best = max(matches, key=len)
    return best, table[best]


def usage_exprs(
    prompt: pl.Expr, cached: pl.Expr, candidates: pl.Expr, thoughts: pl.Expr, images: pl.Expr
) -> dict[str, pl.Expr]:
    """The priced quantities (`PARTS`) of each row, from its reply fields: ``prompt_tokens``,
    ``cached_content_tokens``, ``candidates_tokens``, ``thoughts_tokens`` and the number of
    generated images. A missing count is 0 (a row that got no answer costs nothing)."""
    prompt, cached, candidates, thoughts, images = (
        e.cast(pl.Int64).fill_null(0) for e in (prompt, cached, candidates, thoughts, images)
    )
    return {
        "input": prompt - cached,
        "cached_input": cached,
        # candidatesTokenCount includes the image tokens, which are priced per image
        "output": (candidates - images * IMAGE_OUTPUT_TOKENS).clip(lower_bound=0),
        "thinking": thoughts,
        "images": images,
    }


def _usd(price: Mapping[str, float], usage: Mapping[str, Amount], batch: bool) -> dict[str, Amount]:
    """USD of priced quantities: one rule, for numbers (sums) and polars expressions (rows)."""
    scale = BATCH_DISCOUNT if batch else 1.0

    def per_token(rate: float) -> float:
        return rate / 1e6 * scale

    output = per_token(price.get("output", 0.0))
    image = price.get("image")
    images = usage["images"]
    return {
        "input": usage["input"] * per_token(price.get("input", 0.0)),
        "cached_input": usage["cached_input"] * per_token(price.get("cached_input", price.get("input", 0.0))),
        # a model without a per-image price bills its images as the output tokens they are
        "output": (usage["output"] + (0 if image is not None else images * IMAGE_OUTPUT_TOKENS)) * output,
        "thinking": usage["thinking"] * output,
        "images": images * (image * scale if image is not None else 0.0),
    }


def price_usage(
    model: str, usage: Mapping[str, float], prices: Prices | None = None, batch: bool = False
) -> dict[str, Any] | None:
    """USD of summed priced quantities (`PARTS`, as `usage_exprs` gives them per row): the
    total (``usd``), each part (``input_usd``, ``cached_input_usd``, ``output_usd``,
    ``thinking_usd``, ``images_usd``), the table entry used and its prices. None when the
    model has no price."""
    found = model_price(model, prices)
    if found is None:
        return None
    entry, price = found
    parts = _usd(price, {k: float(usage.get(k, 0)) for k in PARTS}, batch)
    return {
        "usd": round(sum(parts.values()), _DIGITS),
        **{f"{k}_usd": round(v, _DIGITS) for k, v in parts.items()},
        "priced_as": entry,
        "prices": price,
        "batch": batch,
    }


def cost(
    model: str,
    *,
    input_tokens: float,
    output_tokens: float,
    images: float = 0,
    cached_input_tokens: float = 0,
    thoughts_tokens: float = 0,
    prices: Prices | None = None,
    batch: bool = False,
) -> dict[str, Any] | None:
    """Estimated USD for token counts: ``input_tokens`` are all prompt tokens, of which
    ``cached_input_tokens`` were read from a context cache; ``output_tokens`` are text and
    thinking tokens, of which ``thoughts_tokens`` thinking; ``images`` generated images;
    ``batch``: Batch Mode, billed at `BATCH_DISCOUNT` of the price. None when the model has no
    price. See `price_usage` for what it returns."""
    usage = {
        "input": input_tokens - cached_input_tokens,
        "cached_input": cached_input_tokens,
        "output": output_tokens - thoughts_tokens,
        "thinking": thoughts_tokens,
        "images": images,
    }
    return price_usage(model, usage, prices, batch)


def cost_expr(
    model: str,
    *,
    reply: str | None = None,
    prices: Prices | None = None,
    batch: bool = False,
    split: bool = False,
) -> pl.Expr:
    """Each row's USD, as a polars expression over its reply fields, by the rule the manifest
    uses (see the module's table). ``reply``: the name of a reply struct column; without it
    the fields are read as columns (``gemframe run``'s output). ``split=True`` gives a struct of
    the parts (input, cached_input, output, thinking, images) and ``usd``. Raises `InputError`
    for a model without a price. A row read from the cache (``cached``) is priced like the
    others: filter ``~cached`` for what a run paid::

        out = pl.read_parquet("out.parquet")
        out.filter(~pl.col("cached")).unique("response_id").select(gf.cost_expr(model).sum())
    """
    found = model_price(model, prices)
    if found is None:
        raise InputError(f"no price for model {model!r}: pass prices= or set ${PRICES_ENV}")
    field: Callable[[str], pl.Expr] = (lambda f: pl.col(reply).struct.field(f)) if reply else pl.col
    usage = usage_exprs(
        field("prompt_tokens"),
        field("cached_content_tokens"),
        field("candidates_tokens"),
        field("thoughts_tokens"),
        field("images").list.len(),
    )
    parts = _usd(found[1], usage, batch)
    total = pl.sum_horizontal(*parts.values())
    if split:
        return pl.struct([e.alias(k) for k, e in parts.items()] + [total.alias("usd")]).alias("cost")
    return total.alias("usd")


def context_cache_cost(
    model: str, tokens: float, hours: float, prices: Prices | None = None
) -> dict[str, float] | None:
    """USD of one context cache of ``tokens`` tokens kept ``hours`` hours: ``creation_usd``
    (its tokens once, at the ``input`` rate), ``storage_usd`` (`storage_cost`; 0 for a model
    without a storage rate) and their sum ``usd``. The reads of it are the rows' cached input.
    None when the model has no price."""
    found = model_price(model, prices)
    if found is None:
        return None
    creation = round(tokens / 1e6 * found[1].get("input", 0.0), _DIGITS)
    storage = storage_cost(model, tokens, hours, prices) or 0.0
    return {"creation_usd": creation, "storage_usd": storage, "usd": round(creation + storage, _DIGITS)}


def storage_cost(model: str, tokens: float, hours: float, prices: Prices | None = None) -> float | None:
    """USD of keeping a context cache of ``tokens`` tokens for ``hours`` hours (``cache_storage``
    rate); None when the model has no storage price."""
    found = model_price(model, prices)
    if found is None or "cache_storage" not in found[1]:
        return None
    return round(tokens / 1e6 * hours * found[1]["cache_storage"], _DIGITS)
