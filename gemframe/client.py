"""`Client`: a provider, an executor and a cache, and the loop that turns request bodies into
the reply column: look up the cache in batches, send only the misses (each distinct request once),
store answers as they arrive, decode, report progress. Memory stays bounded because bodies are
consumed lazily and at most a window of requests is in flight.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import polars as pl

from .cache import CacheMode, ResponseCache, cache_key
from .errors import RowError
from .executor import Executor, Outcome, RetryPolicy
from .limits import RateLimiter
from .payload import request_json
from .progress import Progress
from .providers import DEFAULT_MODEL, Provider, resolve_provider
from .response import ReplyColumn, decode, failed, reply_dtype
from .schema import ResponseSchema

# A row to answer: a request body, a RowError found while building it, or None (nothing to send).
Row = dict[str, Any] | RowError | None

_LOOKUP_BATCH = 256  # rows per batched cache lookup...
_LOOKUP_BYTES = 16 * 2**20  # ...or fewer, when their inline images add up to this
_QUEUED_BYTES = 16 * 2**20  # encoded request bodies held beyond one per concurrency slot
INLINE_LIMIT = 20 * 2**20  # the API's limit on one request's inline data, in bytes


def _inline_bytes(row: Row) -> int:
    size = 0
    if isinstance(row, dict):
        for content in row.get("contents") or ():
            for part in content.get("parts") or ():
                inline = part.get("inlineData")
                if inline is not None:
                    size += len(inline.get("data", ""))
    return size


def _batches(rows: Iterable[Row]) -> Iterator[list[tuple[Row, int]]]:
    """(row, its inline image bytes) in lookup batches, bounded by count and by image bytes
    (memory stays bounded)."""
    batch: list[tuple[Row, int]] = []
    total = 0
    for row in rows:
        size = _inline_bytes(row)
        batch.append((row, size))
        total += size
        if len(batch) >= _LOOKUP_BATCH or total >= _LOOKUP_BYTES:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


class Client:
    """Where requests go and how: provider and key, concurrency, retries, timeouts, rate
    limits, cache.

    ``provider`` is ``"google"``, ``"segmind"``, ``"emulator"`` or None to pick from the
    environment (a Gemini key, else a Segmind key, else the offline emulator). The key comes from
    ``api_key`` or the provider's environment variables and is never shown in repr or errors.

    Transient faults (429, 5xx, resets, timeouts, truncated bodies) are retried until the row's
    ``deadline`` (seconds from its first attempt, default 900); ``max_attempts`` (default None:
    no cap) makes a row give up sooner. ``backoff`` is the base of their jittered exponential
    back-off (capped at 30 s). ``rpm``/``tpm`` cap requests/tokens per minute. A job starts with
    one request in flight and opens up to ``concurrency`` as answers succeed (slow start), so a
    wrong key costs one request. ``adaptive`` (default on) slows down when 429s show a rate
    limit and speeds back up, settling under the server's limit when none is configured; a cut
    that does not lower the 429 share (a shared quota, an overload) is undone.
    """

    def __init__(
        self,
        provider: str | Provider | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        model: str = DEFAULT_MODEL,
        concurrency: int = 16,
        timeout: float = 120.0,
        max_attempts: int | None = None,
        deadline: float = 900.0,
        backoff: float = 0.5,
        rpm: float | None = None,
        tpm: float | None = None,
        adaptive: bool = True,
        cache: str | CacheMode = CacheMode.USE,
        cache_dir: str | None = None,
        progress: bool = True,
        **provider_options: Any,
    ) -> None:
        if isinstance(provider, Provider):
            self.provider = provider
        else:
            self.provider = resolve_provider(
                provider, api_key=api_key, base_url=base_url, **provider_options
            )
        self.model = model
        self.cache_mode = CacheMode(cache)
        self.progress = progress
        self.executor = Executor(
            self.provider,
            concurrency=concurrency,
            timeout=timeout,
            retry=RetryPolicy(max_attempts=max_attempts, deadline=deadline, backoff_base=backoff),
            limiter=RateLimiter(rpm=rpm, tpm=tpm, adaptive=adaptive),
        )
        self._cache_dir = cache_dir
        self._cache: ResponseCache | None = None

    def __repr__(self) -> str:
        return (
            f"Client(provider={self.provider.name!r}, base_url={self.provider.base_url!r}, "
            f"model={self.model!r}, concurrency={self.executor.concurrency}, "
            f"cache={self.cache_mode.value!r})"
        )

    @property
    def cache(self) -> ResponseCache:
        """The on-disk cache, opened on first use."""
        if self._cache is None:
            self._cache = ResponseCache(self._cache_dir)
        return self._cache

    def close(self) -> None:
        """Release the HTTP connections and the cache handle."""
        self.executor.close()
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self,
        rows: Iterable[Row],
        *,
        total: int | None = None,
        model: str | None = None,
        cache: str | CacheMode | None = None,
        sample: int = 0,
        progress: bool | Progress | None = None,
        image_dir: str | None = None,
        raw: bool = False,
        response_schema: ResponseSchema | None = None,
        mode: str = "live",
        batch_state: str | None = None,
        poll_interval: float = 30.0,
        wait: bool = True,
    ) -> pl.Series:
        """The reply column (`reply_dtype`) for request bodies, in order; a null reply for rows
        with nothing to send. ``response_schema`` fills the ``parsed`` field.

        ``mode="batch"`` sends the misses as provider batch jobs (half price, answered within a
        day) recorded in ``batch_state`` (default: a file in the cache directory named by the
        requests), polling every ``poll_interval`` seconds; ``wait=False`` submits and returns,
        with ``BATCH_PENDING`` row errors until a later call collects the answers.

        Raises `APIError` when the API refuses the whole run (answers already received are in
        the cache by then); every other problem becomes that row's ``error``. ``progress`` may
        be a `Progress` shared by several calls (a batch job's single bar).
        """
        model = model or self.model
        if not isinstance(progress, Progress):
            enabled = self.progress if progress is None else progress
            progress = Progress(total, enabled, model, owned=True)
        dtype = reply_dtype(
            image_files=image_dir is not None, raw=raw,
            parsed=response_schema.dtype if response_schema is not None else None,
        )
        run = _Run(
            self,
            model,
            CacheMode(cache) if cache is not None else self.cache_mode,
            sample,
            image_dir,
            raw,
            progress,
            ReplyColumn(dtype, response_schema),
        )
        if mode == "batch":
            run.batch_options = (batch_state, poll_interval, wait)
        elif mode != "live":
            raise ValueError(f"mode must be 'live' or 'batch', not {mode!r}")
        try:
            return run.execute(rows)
        finally:
            run.finish()


class _Run:
    """The state of one `Client.send` call."""

    def __init__(
        self,
        client: Client,
        model: str,
        mode: CacheMode,
        sample: int,
        image_dir: str | None,
        raw: bool,
        progress: Progress,
        column: ReplyColumn,
    ) -> None:
        self.client = client
        self.provider = client.provider
        self.model = model
        self.mode = mode
        self.sample = sample
        self.image_dir = image_dir
        self.raw = raw
        self.progress = progress
        self.cache = client.cache if mode is not CacheMode.OFF else None
        self.url = self.provider.url(model)
        self.column = column
        self.waiting: dict[str, list[int]] = {}  # key -> rows waiting for its answer
        self.done: dict[str, tuple[int, bool, bool]] = {}  # key answered in this call -> (answer, cached, failed)
        self.in_flight: set[str] = set()  # keys submitted and not yet collected
        self.batch_options: tuple[str | None, float, bool] | None = None  # set in batch mode
        self.batch_bodies: dict[str, bytes] = {}  # batch mode: the misses' request JSON
        self.unstored: list[tuple[str, str, bytes]] = []  # answers not yet in the cache
        self.finished: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.window = max(64, client.executor.concurrency * 4)
        self.concurrency = client.executor.concurrency
        self.inflight_bytes = 0  # encoded bodies waiting or in flight: see _full
        self.sizes: dict[str, int] = {}

    def execute(self, rows: Iterable[Row]) -> pl.Series:
        if self.mode is not CacheMode.READ:
            self.provider.check_key()
        self.client.executor.tripped = None  # each call tries again (the key may be fixed)
        for batch in _batches(rows):
            self._admit(batch)
        while self.in_flight:
            self._collect(block=True)
        if self.batch_bodies:
            self._resolve_batch()
        return self.column.finish()

    def _resolve_batch(self) -> None:
        from .batch import BatchJobs, default_state_path

        path, poll_interval, wait = self.batch_options
        every_key = [*self.done, *self.batch_bodies]  # the whole call, hits included
        path = path or default_state_path(self.client.cache.directory, self.model, every_key)
        jobs = BatchJobs(self.client, self.model, path, poll_interval, self.progress)
        for key, answer in jobs.resolve(self.batch_bodies, wait).items():
            if isinstance(answer, RowError):
                self._answer(key, failed(answer))
            else:
                self._answer(key, self._decode(orjson.loads(answer), answer, False, 1, None))

    def _admit(self, batch: list[tuple[Row, int]]) -> None:
        """Give cached answers to a batch of rows and send its misses."""
        start = len(self.column)
        self.column.add_rows(len(batch))
        fresh: dict[str, tuple[dict[str, Any], int]] = {}  # key -> (body, image bytes), first row of each new key
        for row, (item, size) in enumerate(batch, start):
            if item is None:
                continue
            if isinstance(item, RowError):
                answer, record = self.column.add_answer(failed(item))
                self._answer_row(row, answer, record)
                continue
            key = cache_key(item, provider=self.provider.name, model=self.model, sample=self.sample)
            if key in self.done:
                answer, cached, failure = self.done[key]
                self._answer_row(row, answer, {"cached": cached, "error": failure or None})
            elif key in self.waiting:
                self.waiting[key].append(row)
            else:
                self.waiting[key] = [row]
                fresh[key] = (item, size)
        if self.cache is not None and self.mode in (CacheMode.USE, CacheMode.READ) and fresh:
            for key, raw in self.cache.get_many(fresh).items():
                del fresh[key]
                self._answer(key, self._decode(orjson.loads(raw), raw, True, 0, 0.0))
        outgoing: list[tuple[str, str, bytes]] = []  # submitted together: one loop wake-up
        for key, (body, size) in fresh.items():
            if self.mode is CacheMode.READ:
                self._answer(key, failed(RowError(
                    None, "CACHE_MISS",
                    "not in the cache and cache='read' sends nothing; use cache='use' to fetch it",
                )))
                continue
            encode = request_json if size else orjson.dumps  # images: spliced in (see request_json)
            content = encode(self.provider.wrap(body))
            if len(content) > INLINE_LIMIT:
                self._answer(key, failed(RowError(
                    None, "INVALID_INPUT",
                    f"row {self.waiting[key][0]}: the request is {len(content) / 2**20:.1f} MB; the API takes "
                    f"about {INLINE_LIMIT // 2**20} MB inline per request: send smaller or fewer images",
                )))
                continue
            if self.batch_options is not None:
                self.batch_bodies[key] = content
                continue
            outgoing.append((key, self.url, content))
            self.in_flight.add(key)
            self.inflight_bytes += len(content)
            self.sizes[key] = len(content)
            if self._full():
                self.client.executor.submit_many(outgoing, self.finished)
                outgoing = []
                while self._full():
                    self._collect(block=True)
        if outgoing:
            self.client.executor.submit_many(outgoing, self.finished)
        self._collect(block=False)

    def _full(self) -> bool:
        """Whether to wait before sending more: a window of requests is out, or every
        concurrency slot is busy and the bodies queued behind them (big images) add up."""
        in_flight = len(self.in_flight)
        return in_flight >= self.window or (in_flight >= self.concurrency and self.inflight_bytes > _QUEUED_BYTES)

    def _collect(self, block: bool) -> None:
        """Handle finished requests (waiting for one if asked): answers are stored in the cache
        in one transaction as soon as they arrive, so a crash right after loses none of them."""
        try:
            done = [self.finished.get(block=block)]
        except queue.Empty:
            return
        while True:
            try:
                done.append(self.finished.get_nowait())
            except queue.Empty:
                break
        outcomes = [(key, task.result()) for key, task in done]
        for key, _ in done:
            self.in_flight.discard(key)
            self.inflight_bytes -= self.sizes.pop(key)
        if self.cache is not None:
            self.unstored = [(k, self.model, o.raw) for k, o in outcomes if o.raw is not None]
            self.cache.set_many(self.unstored)
            self.unstored = []
        for key, outcome in outcomes:
            self._handle(key, outcome)

    def _handle(self, key: str, outcome: Outcome) -> None:
        if outcome.failure is not None and outcome.failure.fatal is not None:
            raise outcome.failure.as_api_error()
        if outcome.response is None:
            assert outcome.error is not None
            self._answer(key, failed(outcome.error, attempts=outcome.attempts, latency_ms=outcome.latency_ms))
        else:
            self._answer(key, self._decode(outcome.response, outcome.raw, False, outcome.attempts, outcome.latency_ms))

    def _decode(self, response: dict[str, Any], raw: bytes | None, cached: bool, attempts: int, latency_ms: float) -> dict[str, Any]:
        record = decode(response, cached=cached, attempts=attempts, latency_ms=latency_ms, image_dir=self.image_dir)
        if self.raw:
            record["raw"] = raw.decode("utf-8") if raw is not None else json.dumps(response)
        return record

    def _answer(self, key: str, record: dict[str, Any]) -> None:
        answer, record = self.column.add_answer(record)
        self.done[key] = (answer, record["cached"], record.get("error") is not None)
        for row in self.waiting.pop(key):
            self._answer_row(row, answer, record)

    def _answer_row(self, row: int, answer: int, record: dict[str, Any]) -> None:
        self.column.point(row, answer)
        self.progress.advance(record)

    def finish(self) -> None:
        """Cancel what is still in flight (after an error or Ctrl-C) and keep what was answered."""
        self.client.executor.cancel(self.finished)
        self.in_flight.clear()
        if self.unstored and self.cache is not None:  # a Ctrl-C hit the cache write: redo it
            self.cache.set_many(self.unstored)
        if self.progress.owned:
            self.progress.close()

