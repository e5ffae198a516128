"""What a job will cost before it is paid: `estimate` (``gemframe run --dry-run``).

`estimate` builds every row's request exactly as `gemframe.generate` would, keys it as the cache
does, and counts rows, distinct requests, cache hits and what would be sent, with the input
tokens of what would be sent: a local estimate (`gemframe._core.tokens`, Gemini's documented
rates: ``ceil(len/4)`` tokens per text part, 258 per image and per PDF page, 263 a second of
video and 32 of audio, the length a stand-in from the size) or, with
``exact=True``, the API's own ``countTokens`` endpoint (Google and the emulator; Segmind has
none, so it is counted locally; a request countTokens gives no usable answer for is counted
locally too, said in a note). Nothing is sent to ``generateContent``. Output tokens are an assumption, said as such: the
``output_tokens`` argument, else the mean of up to 200 answers of this job already in the cache
(the "try 100 rows first" case: their thinking tokens and images too), else the config's
``maxOutputTokens`` (an upper bound), else `DEFAULT_OUTPUT_TOKENS`.

The tokens are priced by `gemframe._accounting.pricing` (the price table, ``prices=``,
``$GEMFRAME_PRICES``), the rule the run manifest uses; ``mode="batch"`` at the Batch Mode rate.
Implicit cache reads cannot be known before the answers, so every input token is priced as
uncached input (an upper bound when implicit caching will hit). With a context cache
(``gf.Client(cache_context=...)`` or ``cache_context=`` here) and a prefix (``system``,
``context``) of at least the model's documented minimum, the prefix's tokens of each request to
send are priced at the cached-input rate, plus the cache: its tokens once at the input rate and
its storage for the whole TTL (``context_cache_*`` fields, and in ``cost``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import polars as pl

from .._core.cache import CacheMode, cache_key
from .._core.client import Client, default_client
from .._core.context import context_ttl, min_cache_tokens, prefix_body
from .._core.http import TransportFailure
from .._core.payload import LocalFile, inline_data, with_url_images
from .._core.providers import CountTokensCapable
from .._core.spec import Ask, RequestSpec, Unpack, asks, request_spec
from .._core.tokens import count_tokens
from .._core.uploads import uploads_media
from .._errors import InputError, clip
from .pricing import BATCH_DISCOUNT, IMAGE_OUTPUT_TOKENS, PRICES_AS_OF, PRICES_ENV, Prices, context_cache_cost, cost

DEFAULT_OUTPUT_TOKENS = 400  # per request, when nothing better is known
_OBSERVE = 200  # cached answers read to learn the typical output of a job
_CHUNK = 1024  # rows built and keyed at a time


def _answer_output(raw: bytes) -> tuple[int, int, int]:
    """(text output tokens, thinking tokens, generated images) of one cached answer, by the
    pricing rule (`gemframe._accounting.pricing.usage_exprs`): images are 1290 tokens each."""
    response = json.loads(raw)
    usage = response.get("usageMetadata") or {}
    candidates = response.get("candidates") or []
    parts = ((candidates[0] if candidates else {}).get("content") or {}).get("parts") or []
    images = sum(1 for p in parts if (p.get("inlineData") or p.get("inline_data")) and not p.get("thought"))
    text = max(0, (usage.get("candidatesTokenCount") or 0) - images * IMAGE_OUTPUT_TOKENS)
    return text, usage.get("thoughtsTokenCount") or 0, images


@dataclass
class Estimate:
    """What a job would send and cost. ``str()`` is a readable summary; `as_dict` is JSON-able."""

    model: str
    provider: str
    cache_mode: str
    samples: int
    rows: int = 0
    rows_without_prompt: int = 0
    invalid_rows: int = 0
    requests: int = 0  # rows x samples with something to send
    distinct_requests: int = 0
    cache_hits: int = 0  # distinct requests already answered in the cache
    to_send: int = 0  # distinct requests that would be sent
    cache_misses: int = 0  # in cache mode 'read': distinct requests that would be CACHE_MISS errors
    input_tokens: int = 0  # of the requests to send
    token_method: str = "local"
    output_tokens_per_request: float = 0.0  # text and thinking
    thoughts_per_request: float = 0.0  # the thinking part of it
    images_per_request: float = 0.0
    output_basis: str = ""
    output_tokens: int = 0  # text and thinking
    thoughts_tokens: int = 0  # the thinking part of it
    images: int = 0
    batch: bool = False  # priced at the Batch Mode rate
    context_cache_tokens: int = 0  # the prefix, cached once (0: no context cache)
    context_cache_hours: float = 0.0  # its TTL, priced whole
    cached_input_tokens: int = 0  # of input_tokens: the prefix of each request to send, read from it
    cost: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        tokens = {
            "local": "local estimate: ~4 characters a token, 258 per image or PDF page, 263/s of video, 32/s of audio",
            "countTokens": "exact, from the API's countTokens",
        }.get(self.token_method, self.token_method)
        lines = [
            f"gemframe estimate: {self.model} on {self.provider} (cache: {self.cache_mode}"
            + (f", {self.samples} samples per row" if self.samples > 1 else "")
            + ")",
            f"  rows            {self.rows:>12,}  ({self.rows_without_prompt:,} without prompt or images, {self.invalid_rows:,} invalid)",
            f"  requests        {self.requests:>12,}  ({self.distinct_requests:,} distinct)",
            f"  cache hits      {self.cache_hits:>12,}",
            f"  to send         {self.to_send:>12,}",
        ]
        if self.cache_mode == CacheMode.READ.value:
            lines.append(f"  cache misses    {self.cache_misses:>12,}  (cache 'read': these become CACHE_MISS errors)")
        lines += [
            f"  input tokens    {self.input_tokens:>12,}  ({tokens})",
            f"  output tokens   {self.output_tokens:>12,}  ({self.output_tokens_per_request:,.0f} a request: {self.output_basis})",
        ]
        if self.thoughts_tokens:
            lines.append(
                f"    of which thinking {self.thoughts_tokens:>8,}  ({self.thoughts_per_request:,.0f} a request)"
            )
        if self.images:
            lines.append(f"  images out      {self.images:>12,}  ({self.images_per_request:g} a request)")
        if self.context_cache_tokens:
            lines.append(
                f"  context cache   {self.context_cache_tokens:>12,}  (tokens, kept {self.context_cache_hours:g} h; "
                f"{self.cached_input_tokens:,} of the input tokens read from it)"
            )
        if self.cost is None:
            lines.append(f"  est. cost       {'?':>12}  (no price for {self.model}: pass prices= or set ${PRICES_ENV})")
        else:
            c = self.cost
            parts = f"input ${c['input_usd']:,.4f}"
            if c["cached_input_usd"]:
                parts += f" + cached input ${c['cached_input_usd']:,.4f}"
            parts += f" + output ${c['output_usd']:,.4f}"
            if c["thinking_usd"]:
                parts += f" + thinking ${c['thinking_usd']:,.4f}"
            if c["images_usd"]:
                parts += f" + images ${c['images_usd']:,.4f}"
            if c.get("context_cache_usd"):
                parts += f" + context cache ${c['context_cache_usd']:,.4f}"
            if self.batch:
                parts += ", Batch Mode rate"
            lines.append(
                f"  est. cost       {'$' + format(c['usd'], ',.4f'):>12}  ({parts}; {c['priced_as']} list prices as of {PRICES_AS_OF})"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _expr(value: str | bytes | bytearray | memoryview | os.PathLike[str] | pl.Expr) -> pl.Expr:
    if isinstance(value, str):
        return pl.col(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return pl.lit(bytes(value), dtype=pl.Binary)
    if isinstance(value, os.PathLike):
        return pl.lit(os.fspath(value), dtype=pl.String)
    return value


def _columns(data: Any, prompt: Any, images: Any, history: Any) -> pl.DataFrame:
    if isinstance(data, (str, os.PathLike)):
        data = pl.scan_parquet(os.fspath(data))
    if not isinstance(data, (pl.DataFrame, pl.LazyFrame)):
        raise InputError(f"estimate() takes a DataFrame, a LazyFrame or a parquet path, not {type(data).__name__}")
    exprs = [_expr(prompt).alias("prompt")]
    if images is not None:
        exprs.append(_expr(images).alias("images"))
    if history is not None:
        exprs.append(_expr(history).alias("history"))
    try:
        selected = data.select(exprs)
        frame = selected.collect() if isinstance(selected, pl.LazyFrame) else selected
    except pl.exceptions.ColumnNotFoundError as exc:
        raise InputError(f"estimate: {exc}") from None
    if frame["prompt"].dtype not in (pl.String, pl.Null):
        raise InputError(f"prompt column has dtype {frame['prompt'].dtype}; it must hold strings")
    return frame


class _Counter:
    """countTokens through the client's provider, concurrently, one chunk at a time."""

    def __init__(self, client: Client, model: str) -> None:
        self.client = client
        # made only for a provider declaring "count_tokens", so it has the URL (register_provider)
        self.url = cast(CountTokensCapable, client.provider).count_tokens_url(model)
        self.model = model.removeprefix("models/")
        self.failed = 0
        self.last_error = ""
        self.big = 0  # requests with a file over the inline limit: counted locally

    def count(self, bodies: list[dict[str, Any]]) -> list[int]:
        futures: list[Any] = []  # None: counted locally
        for body in bodies:
            if _has_local_file(body):  # countTokens takes media inline: such a body is too big for it
                futures.append(None)
                continue
            request = {"generateContentRequest": {"model": f"models/{self.model}", **body}}
            content = json.dumps(request, separators=(",", ":")).encode()
            futures.append(self.client.executor.call("POST", self.url, content))
        counts = []
        for body, future in zip(bodies, futures):
            if future is None:
                self.big += 1
                counts.append(count_tokens(body))
                continue
            total = self._answer(future)
            if total is None:  # no usable answer: count this one locally (said in a note)
                self.failed += 1
                total = count_tokens(body)
            counts.append(total)
        return counts

    def _answer(self, future: Any) -> int | None:
        """The API's count of one request, or None (why: in ``last_error``). An answer that
        refuses the whole run (a bad key) raises its `APIError`; nothing else escapes."""
        try:
            response = future.result()
        except TransportFailure as exc:  # no answer, even after the executor's retries
            self.last_error = f"{exc.status}: {exc.message}"
            return None
        if response.status_code != 200:
            failure = self.client.provider.failure(response)
            if failure.fatal is not None:
                raise failure.as_api_error()
            self.last_error = f"{failure.code} {failure.status}: {failure.message}"
            return None
        try:
            total = json.loads(response.content).get("totalTokens", 0)
        except (ValueError, UnicodeDecodeError, AttributeError):
            total = None
        if type(total) is not int or total < 0:
            self.last_error = f"a countTokens answer without a token count: {clip(response.content, 200)}"
            return None
        return total


@asks
def estimate(
    data: pl.DataFrame | pl.LazyFrame | str | os.PathLike[str],
    prompt: Any = "prompt",
    *,
    images: Any = None,
    history: Any = None,
    spec: RequestSpec | None = None,
    client: Client | None = None,
    cache: str | CacheMode | None = None,
    samples: int = 1,
    exact: bool = False,
    output_tokens: float | None = None,
    prices: Prices | None = None,
    batch: bool = False,
    mode: str = "live",
    cache_context: bool | float | str | None = None,
    **ask: Unpack[Ask],
) -> Estimate:
    """Count what ``gf.generate(prompt, images=..., ...)`` over ``data`` would send and cost,
    sending nothing to ``generateContent``.

    ``data`` is a DataFrame, a LazyFrame or a parquet path; the other arguments are those of
    `gemframe.generate`: what to ask is a `gemframe.RequestSpec` (``spec=``, the same one gives
    the same requests and cache keys) or its keywords (``model``, ``system``, ``config``,
    ``safety``, ``response_schema``, ``sample``); ``samples=N`` asks for sample indices
    ``sample`` .. ``sample + N - 1``, as ``gemframe run --samples N``.
    ``exact=True`` counts input tokens with the API's ``countTokens`` (free, but needs the key
    for Google); ``output_tokens`` is your assumption of output tokens per request;
    ``mode="batch"`` (as `gemframe.run` takes it; ``batch=True`` says the same) prices the
    requests at the Batch Mode rate. ``cache_context`` (None: the client's option) prices the
    prefix as one context cache (see the module docstring).
    """

    spec = request_spec(spec, ask, "estimate")  # a bad config fails here
    if mode not in ("live", "batch"):
        raise InputError(f"mode must be 'live' or 'batch', not {mode!r}")
    batch = batch or mode == "batch"
    if samples < 1:
        raise InputError("samples must be >= 1")
    client = client or default_client()
    model = spec.model_for(client.model)
    mode = CacheMode(cache) if cache is not None else client.cache_mode
    builder = spec.builder
    frame = _columns(data, prompt, images, history)
    result = Estimate(model=model, provider=client.provider.name, cache_mode=mode.value, samples=samples)
    looks_up = mode in (CacheMode.USE, CacheMode.READ)
    store = client.cache if looks_up else None
    counter = None
    if exact:
        if "count_tokens" in client.provider.capabilities:  # declared, see providers.py
            if mode is not CacheMode.READ:
                client.provider.check_key()
            counter = _Counter(client, model)
        else:
            result.notes.append(
                f"{client.provider.name} has no countTokens endpoint: input tokens are a local estimate"
            )
    # Built as the call would build them: a local file over the inline limit is digested
    # streaming (`payload.LocalFile`), as generate does for a call that uploads it; a call that
    # cannot upload it (no Files API, upload='never', Batch Mode) makes it the row's error.
    streams = not batch and uploads_media(client.provider, client.upload)

    def build(prompt: Any, images: Any, history: Any) -> dict[str, Any] | None:
        allow = client.allow_private_urls
        if not streams:
            return builder.build(prompt, images, history, allow_private_urls=allow)
        body = builder.build(prompt, images, history, allow_private_urls=allow, defer_urls=True)
        return body and with_url_images(body, lambda url: inline_data(url, allow_private_urls=allow))

    seen: set[bytes] = set()
    observed: list[tuple[int, int, int]] = []
    first_invalid = ""
    result.rows = frame.height
    for start in range(0, frame.height, _CHUNK):
        chunk = frame.slice(start, _CHUNK)
        prompts = chunk["prompt"].to_list()
        image_list = chunk["images"].to_list() if "images" in chunk.columns else [None] * chunk.height
        histories = chunk["history"].to_list() if "history" in chunk.columns else [None] * chunk.height
        fresh: dict[str, dict[str, Any]] = {}  # key -> body, new in this chunk
        for row, (p, i, h) in enumerate(zip(prompts, image_list, histories), start):
            try:
                body = build(p, i, h)
            except InputError as exc:
                result.invalid_rows += 1
                first_invalid = first_invalid or f"row {row}: {exc}"
                continue
            if body is None:
                result.rows_without_prompt += 1
                continue
            for k in range(spec.sample, spec.sample + samples):
                result.requests += 1
                key = cache_key(body, provider=client.provider.name, model=model, sample=k)
                digest = bytes.fromhex(key)
                if digest not in seen:
                    seen.add(digest)
                    fresh[key] = body
        result.distinct_requests += len(fresh)
        hits = store.contains_many(fresh) if store is not None else set()
        result.cache_hits += len(hits)
        if hits and store is not None and len(observed) < _OBSERVE:  # (hits come only from a store)
            wanted = list(hits)[: _OBSERVE - len(observed)]
            observed += [_answer_output(raw) for raw in store.get_many(wanted).values()]
        missing = {k: b for k, b in fresh.items() if k not in hits}
        if mode is CacheMode.READ:
            result.cache_misses += len(missing)
            continue
        result.to_send += len(missing)
        bodies: dict[int, tuple[dict[str, Any], int]] = {}  # one count per distinct body (samples share it)
        for body in missing.values():
            entry = bodies.setdefault(id(body), (body, 0))
            bodies[id(body)] = (body, entry[1] + 1)
        if counter is not None and bodies:
            counts = counter.count([b for b, _ in bodies.values()])
        else:
            counts = [count_tokens(b) for b, _ in bodies.values()]
        result.input_tokens += sum(n * times for n, (_, times) in zip(counts, bodies.values()))
    if counter is not None:
        result.token_method = "countTokens"
        if counter.big:
            result.token_method = "countTokens+local"
            result.notes.append(
                f"{counter.big} requests counted locally: they hold a file over the inline limit, which "
                "countTokens does not take"
            )
        if counter.failed:
            result.token_method = "countTokens+local"
            result.notes.append(f"{counter.failed} requests counted locally: countTokens failed ({counter.last_error})")
    if first_invalid:
        result.notes.append(f"{result.invalid_rows} rows cannot be sent (their error, e.g. {first_invalid})")
    _assume_output(result, builder.config or {}, observed, output_tokens)
    result.output_tokens = round(result.output_tokens_per_request * result.to_send)
    result.thoughts_tokens = round(result.thoughts_per_request * result.to_send)
    result.images = round(result.images_per_request * result.to_send)
    result.batch = batch
    ttl = client.context_caches.ttl if cache_context is None else context_ttl(cache_context)
    prefix = prefix_body(builder) if ttl is not None and not batch and result.to_send else None
    if prefix is not None:
        tokens = count_tokens(prefix)
        if tokens < min_cache_tokens(model):
            result.notes.append(
                f"context cache: the prefix is ~{tokens:,} tokens, under the {min_cache_tokens(model):,} "
                f"{model} caches at least: priced as sent inline with each row"
            )
        else:
            assert ttl is not None  # a prefix is counted only with a TTL
            result.context_cache_tokens, result.context_cache_hours = tokens, ttl / 3600
            result.cached_input_tokens = tokens * result.to_send
    result.cost = cost(
        model,
        input_tokens=result.input_tokens,
        cached_input_tokens=result.cached_input_tokens,
        output_tokens=result.output_tokens,
        thoughts_tokens=result.thoughts_tokens,
        images=result.images,
        prices=prices,
        batch=batch,
    )
    if result.cost is not None and result.context_cache_tokens:
        stored = context_cache_cost(model, result.context_cache_tokens, result.context_cache_hours, prices)
        assert stored is not None  # the model has a price: cost() found it
        result.cost["context_cache_usd"] = stored["usd"]
        result.cost["context_cache_split"] = stored
        result.cost["usd"] = round(result.cost["usd"] + stored["usd"], 9)
    if batch:
        result.notes.append(f"Batch Mode: priced at {BATCH_DISCOUNT:.0%} of the standard price")
    return result


def _has_local_file(body: Mapping[str, Any]) -> bool:
    return any(
        isinstance(part.get("inlineData"), LocalFile)
        for c in body.get("contents") or ()
        for part in c.get("parts") or ()
    )


def _assume_output(
    result: Estimate, config: Mapping[str, Any], observed: list[tuple[int, int, int]], given: float | None
) -> None:
    wants_image = "IMAGE" in [str(m).upper() for m in config.get("responseModalities") or ()]
    if given is not None:
        result.output_tokens_per_request, result.output_basis = float(given), "as given"
        result.images_per_request = 1.0 if wants_image else 0.0
    elif observed:
        result.output_tokens_per_request = sum(t + k for t, k, _ in observed) / len(observed)
        result.thoughts_per_request = sum(k for _, k, _ in observed) / len(observed)
        result.images_per_request = round(sum(i for _, _, i in observed) / len(observed), 3)
        result.output_basis = f"mean of {len(observed)} cached answers of this job"
    elif config.get("maxOutputTokens"):
        result.output_tokens_per_request = float(config["maxOutputTokens"])
        result.output_basis = "maxOutputTokens, an upper bound"
        result.images_per_request = 1.0 if wants_image else 0.0
    else:
        result.output_tokens_per_request = float(DEFAULT_OUTPUT_TOKENS)
        result.output_basis = "a default guess; pass output_tokens= (--output-tokens) or try a few rows first"
        result.images_per_request = 1.0 if wants_image else 0.0
