"""`Client`: a provider, an executor and a cache, and the loop that turns request bodies into
the reply column: look up the cache in batches, send only the misses (each distinct request once),
store answers as they arrive, decode, report progress. Memory stays bounded because bodies are
consumed lazily and at most a window of requests is in flight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import os
import queue
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, cast

import orjson
import polars as pl

from .._errors import ConfigError, InputError, RowError, exception_text
from .batch import BatchJobs, default_state_path
from .cache import CacheMode, KnownDigest, ResponseCache, UrlRecord, UrlStore, answer_problem, cache_key, prompt_text
from .cache.files import FileRecord, UploadStore
from .context import ContextCaches, RunContext, check_capable, context_ttl
from .executor import Executor, Outcome, RetryPolicy, background_loop, take_all
from .limits import RateLimiter
from .payload import (
    FILES_LIMIT,
    INLINE_LIMIT,
    Fetched,
    LocalFile,
    _sniffed,
    request_json,
    url_images,
    with_url_images,
)
from .progress import Progress
from .providers import DEFAULT_MODEL, Provider, resolve_provider
from .response import ReplyColumn, decode, failed, reply_dtype
from .schema import ResponseSchema
from .spec import RequestSpec
from .uploads import CallFiles, check_mode, uploads_media, with_files

# A row to answer: a request body, a RowError found while building it, or None (nothing to send).
Row = dict[str, Any] | RowError | None

_LOOKUP_BATCH = 256  # rows per batched cache lookup...
_LOOKUP_BYTES = 16 * 2**20  # ...or fewer, when their inline images add up to this
_QUEUED_BYTES = 16 * 2**20  # encoded request bodies held beyond one per concurrency slot
# Rows admitted at a time when their images come by URL: each chunk waits only for its own
# downloads (started in row order for the whole batch), so sending starts after the first few.
_URL_CHUNK = 32


def _inline_bytes(row: Row, held: bool = False) -> int:
    """The base64 bytes of a row's inline media (what decides whether its media may go by file);
    ``held``: only those in memory (a `LocalFile` stays on disk until it is uploaded)."""
    size = 0
    if isinstance(row, dict):
        for content in row.get("contents") or ():
            for part in content.get("parts") or ():
                inline = part.get("inlineData")
                if isinstance(inline, LocalFile):
                    size += 0 if held else 4 * ((inline.size + 2) // 3)
                elif isinstance(inline, dict):  # not a UrlImage: its size is known once fetched
                    size += len(inline.get("data", ""))
    return size


def _local_files(body: dict[str, Any]) -> Iterator[LocalFile]:
    """The local files over the inline limit a body still carries (not named by file)."""
    for content in body["contents"]:
        for part in content.get("parts") or ():
            if isinstance(part.get("inlineData"), LocalFile):
                yield part["inlineData"]


def _batches(rows: Iterable[Row]) -> Iterator[list[tuple[Row, int]]]:
    """(row, its inline image bytes) in lookup batches, bounded by count and by the image bytes
    they hold (memory stays bounded)."""
    batch: list[tuple[Row, int]] = []
    total = 0
    for row in rows:
        size = _inline_bytes(row)
        batch.append((row, size))
        total += _inline_bytes(row, held=True) if size else 0
        if len(batch) >= _LOOKUP_BATCH or total >= _LOOKUP_BYTES:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def _check_batch_cache(mode: CacheMode, wait: bool) -> None:
    """Batch Mode without the cache, refused before any job is submitted when nothing would keep
    the answers. The jobs answer after the call that submits them (``wait=False``), perhaps in
    another process, and only the cache carries answers from one call to the next: they would be
    paid for and lost, and every rerun would submit (and pay for) new jobs. A call that waits
    keeps the answers it collects in memory, so ``cache='off'`` with ``wait=True`` works."""
    if mode is CacheMode.OFF and not wait:
        raise ConfigError(
            "mode='batch' with wait=False needs the cache: the answers arrive after this call "
            "returns and only the cache keeps them for the call that collects them. Use "
            "cache='use' (gf.Client(cache_dir=...) keeps them apart from other answers) or wait=True"
        )


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

    Image URLs in the data are fetched only from public addresses: a URL whose host resolves to
    a private, loopback, link-local or cloud-metadata address (or redirects to one) is that
    row's error. ``allow_private_urls=True`` lifts this, for images served on your own network.

    Image URLs of a `gemframe.generate` call are fetched concurrently with the generation
    requests (at most ``download_concurrency`` at a time, retried like them) and remembered
    in the URL store of the cache directory (URL -> digest, ETag/Last-Modified, the bytes once
    per digest): a rerun fetches none of them, and ``cache="read"`` replays a URL dataset with
    the network off. ``revalidate_urls=True`` (and ``cache="refresh"``) asks the servers
    whether each remembered image changed (a conditional request: an unchanged one is not
    downloaded again). With ``cache="off"`` the images are kept in a temporary directory for
    the call only.

    ``cache_context`` (True: a one-hour TTL, or a TTL as seconds or ``"30m"``/``"2h"``) puts the
    prefix every row of a call shares (the `RequestSpec`'s system instruction and ``context``)
    into one ``cachedContents`` resource per model and prefix, made on first need and reused
    by every call while the client lives; rows name it instead of carrying the prefix, whose
    tokens are then billed at the cached-input rate (plus storage per hour, in the manifest).
    The client deletes its caches when it closes and at process exit, unless
    ``keep_context_cache=True`` leaves them to expire at their TTL. A prefix under the model's
    minimum cacheable size is sent inline with one warning. Answers are cached under the same
    keys either way. See `gemframe._core.context`.

    ``upload`` says when media goes through the Files API (uploaded once, then named by
    ``fileData`` in every row that uses it) instead of inline in each request: ``"auto"``
    (default) for media shared by two or more requests of a call (256 kB or more), media
    uploaded by an earlier call and still live, and media that would push a request over the
    20 MB inline limit; ``"always"`` for all media; ``"never"`` sends everything inline.
    Uploaded files are remembered in the cache directory (``files``) per server and key, and
    reused until they expire (48 hours after upload, less a margin); a file deleted meanwhile is
    uploaded again. Providers without a Files API (Segmind) and Batch Mode send media inline.
    A local file over the inline limit (up to the Files API's 2 GB) is never read into memory:
    hashed and uploaded streaming from disk; where nothing can upload it (no Files API,
    ``"never"``, Batch Mode) it is that row's error. Answers are cached under the same key
    either way. See `gemframe._core.uploads`.
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
        allow_private_urls: bool = False,
        download_concurrency: int = 32,
        revalidate_urls: bool = False,
        cache_context: bool | float | str = False,
        keep_context_cache: bool = False,
        upload: str = "auto",
        **provider_options: Any,
    ) -> None:
        if isinstance(provider, Provider):
            self.provider = provider
        else:
            self.provider = resolve_provider(provider, api_key=api_key, base_url=base_url, **provider_options)
        self.model = model
        self.cache_mode = CacheMode(cache)
        self.progress = progress
        self.allow_private_urls = allow_private_urls  # read by the request builders (expr, estimate)
        self.revalidate_urls = revalidate_urls
        self.upload = check_mode(upload)
        self.executor = Executor(
            self.provider,
            concurrency=concurrency,
            timeout=timeout,
            retry=RetryPolicy(max_attempts=max_attempts, deadline=deadline, backoff_base=backoff),
            limiter=RateLimiter(rpm=rpm, tpm=tpm, adaptive=adaptive),
            download_concurrency=download_concurrency,
        )
        self.context_caches = ContextCaches(
            self.provider, self.executor, context_ttl(cache_context), keep_context_cache
        )
        self._cache_dir = cache_dir
        self._cache: ResponseCache | None = None
        self._urls: UrlStore | None = None
        self._uploads: UploadStore | None = None

    def __repr__(self) -> str:
        return (
            f"Client(provider={self.provider.name!r}, base_url={self.provider.display_base_url!r}, "
            f"model={self.model!r}, concurrency={self.executor.concurrency}, "
            f"cache={self.cache_mode.value!r})"
        )

    @property
    def cache(self) -> ResponseCache:
        """The on-disk cache, opened on first use."""
        if self._cache is None:
            self._cache = ResponseCache(self._cache_dir)
        return self._cache

    @property
    def url_store(self) -> UrlStore:
        """The image URLs fetched so far (``urls`` in the cache directory), opened on first use."""
        if self._urls is None:
            self._urls = UrlStore(os.path.join(self.cache.directory, "urls"))
        return self._urls

    @property
    def upload_store(self) -> UploadStore:
        """The files uploaded so far (``files`` in the cache directory), opened on first use."""
        if self._uploads is None:
            self._uploads = UploadStore(os.path.join(self.cache.directory, "files"))
        return self._uploads

    def close(self) -> None:
        """Delete the context caches (unless kept), release the HTTP connections and the cache
        handle."""
        self.context_caches.close()
        self.executor.close()
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self._urls is not None:
            self._urls.close()
            self._urls = None
        if self._uploads is not None:
            self._uploads.close()
            self._uploads = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self,
        rows: Iterable[Row],
        *,
        total: int | None = None,
        spec: RequestSpec | None = None,
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
        cache_context: bool | float | str | None = None,
    ) -> pl.Series:
        """The reply column (`reply_dtype`) for request bodies, in order; a null reply for rows
        with nothing to send. ``spec`` (a `RequestSpec`, what the rows were built from) gives the
        model, the sample index and the response schema that fills the ``parsed`` field; without
        one, ``model``, ``sample`` and ``response_schema`` (translated) give them.

        ``mode="batch"`` sends the misses as provider batch jobs (half price, answered within a
        day) recorded in ``batch_state`` (default: a file in the cache directory named by the
        requests), polling every ``poll_interval`` seconds; ``wait=False`` submits and returns,
        with ``BATCH_PENDING`` row errors until a later call collects the answers. Without the
        cache (``cache='off'``) a batch call must wait: it returns the answers it collected and
        keeps none (`ConfigError` with ``wait=False``, before any job is submitted).

        ``cache_context`` overrides the client's option of that name for this call (None: the
        client's). Batch Mode sends the prefix inline: with caching asked for, a batch call is
        a `ConfigError` (a job may outlive the cache's TTL).

        Raises `APIError` when the API refuses the whole run (answers already received are in
        the cache by then); every other problem becomes that row's ``error``. ``progress`` may
        be a `Progress` shared by several calls (a batch job's single bar).
        """
        if spec is not None:  # what to ask comes from the spec alone: one place, checked once
            if model is not None or sample or response_schema is not None:
                raise ValueError("Client.send: give spec= or model/sample/response_schema, not both")
            model, sample, response_schema = spec.model, spec.sample, spec.schema
        model = model or self.model
        ttl = self.context_caches.ttl if cache_context is None else context_ttl(cache_context)
        if ttl is not None and cache_context is not None:
            check_capable(self.provider)
        context = self.context_caches.run(spec.builder if spec is not None else None, model, ttl)
        if mode == "batch":
            _check_batch_cache(CacheMode(cache) if cache is not None else self.cache_mode, wait)
            if context is not None:
                raise ConfigError(
                    "mode='batch' cannot use a context cache: a batch job may run for up to a day, "
                    "past the cache's TTL. Pass cache_context=False for this call (Batch Mode "
                    "already halves the price of the prefix sent inline), or use mode='live'"
                )
        if not isinstance(progress, Progress):
            enabled = self.progress if progress is None else progress
            progress = Progress(total, enabled, model, owned=True)
        dtype = reply_dtype(
            image_files=image_dir is not None,
            raw=raw,
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
        run.context = context
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
        # key answered in this call -> (answer, cached, error)
        self.done: dict[str, tuple[int, bool, dict[str, Any] | None]] = {}
        self.in_flight: set[str] = set()  # keys submitted and not yet collected
        self.batch_options: tuple[str | None, float, bool] | None = None  # set in batch mode
        self.context: RunContext | None = None  # set when the prefix goes by context cache
        self.batch_bodies: dict[str, bytes] = {}  # batch mode: the misses' request JSON
        self.taken: list[tuple[str, Any]] = []  # finished requests taken off `finished`, not yet cached
        self.prompts: dict[str, str] = {}  # key in flight -> its prompt, for the cache entry's header
        self.finished: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.window = max(64, client.executor.concurrency * 4)
        self.concurrency = client.executor.concurrency
        self.inflight_bytes = 0  # encoded bodies waiting or in flight: see _full
        self.sizes: dict[str, int] = {}
        self.completed = False
        # Image URLs (see _start_images): what each is (its record, or why it failed), the ones
        # being fetched, and how many admitted-to-be batches use each (forgotten at zero).
        self.images: dict[str, UrlRecord | tuple[str, str]] = {}
        self.fetching: set[str] = set()
        self.image_users: Counter[str] = Counter()
        self.fetched: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.scratch: UrlStore | None = None  # cache='off': the call's own URL store
        self.files: CallFiles | None = None  # the Files API side, made when media may be uploaded

    def execute(self, rows: Iterable[Row]) -> pl.Series:
        if self.mode is not CacheMode.READ:
            self.provider.check_key()
        self.client.executor.tripped = None  # each call tries again (the key may be fixed)
        ahead: tuple[list[tuple[Row, int]], list[str]] | None = None
        for batch in _batches(rows):
            # A batch with image URLs starts fetching them now and is admitted after the next
            # batch starts its own: downloads overlap the sending of the batch before.
            urls = self._start_images(batch)
            if ahead is not None:
                self._admit(*ahead)
                ahead = None
            if urls:
                ahead = (batch, urls)
            else:
                self._admit(batch)
        if ahead is not None:
            self._admit(*ahead)
        while self.in_flight:
            self._collect(block=True)
        if self.batch_bodies:
            self._resolve_batch()
        column = self.column.finish()
        self.completed = True  # `finish` warns about failed rows only after a complete call
        return column

    def _resolve_batch(self) -> None:
        assert self.batch_options is not None  # batch_bodies fill only in batch mode, which sets it
        path, poll_interval, wait = self.batch_options
        every_key = [*self.done, *self.batch_bodies]  # the whole call, hits included
        path = path or default_state_path(self.client.cache.directory, self.model, every_key)
        jobs = BatchJobs(
            self.provider, self.client.executor, self.cache, self.model, path, poll_interval, self.progress
        )
        for key, answer in jobs.resolve(self.batch_bodies, wait).items():
            if isinstance(answer, RowError):
                self._answer(key, failed(answer))
            else:
                self._answer(key, self._decode(orjson.loads(answer), answer, False, 1, None))

    def _url_store(self) -> UrlStore:
        if self.mode is not CacheMode.OFF:
            return self.client.url_store
        if self.scratch is None:
            self.scratch = UrlStore(tempfile.mkdtemp(prefix="gemframe-urls-"))
        return self.scratch

    def _start_images(self, batch: list[tuple[Row, int]]) -> list[str]:
        """The distinct image URLs of a batch (`payload.UrlImage`s); those not known yet are
        looked up in the URL store, and the rest start downloading on the executor's loop. A
        stored one is fetched again only to revalidate it (``cache='refresh'``,
        ``revalidate_urls``), never with ``cache='read'``."""
        urls = _distinct_urls(batch)
        new = [url for url in urls if url not in self.images and url not in self.fetching]
        for start in range(0, len(batch), _URL_CHUNK):  # each chunk lets go of its URLs when admitted
            self.image_users.update(_distinct_urls(batch[start : start + _URL_CHUNK]))
        if not new:
            return urls
        store = self._url_store()
        known = store.lookup(new)
        revalidate = self.mode is not CacheMode.READ and (self.mode is CacheMode.REFRESH or self.client.revalidate_urls)
        fetch = []
        for url in new:
            record = known.get(url)
            if record is not None and not revalidate:
                self.images[url] = record
            elif self.mode is CacheMode.READ:
                self.images[url] = (
                    "CACHE_MISS",
                    f"image URL {url!r} is not in the URL store and cache='read' "
                    "fetches nothing; use cache='use' to fetch it",
                )
            else:
                fetch.append((url, record.etag if record else None, record.last_modified if record else None))
        if fetch:
            self.fetching.update(url for url, _, _ in fetch)
            keep = functools.partial(_keep_image, store, known)
            self.client.executor.download_many(fetch, self.client.allow_private_urls, keep, self.fetched)
        return urls

    def _take_downloads(self, block: bool) -> None:
        """Note the finished downloads (waiting for one if asked)."""
        done = take_all(self.fetched, block)
        for url, task in done:
            self.fetching.discard(url)
            exc = None if task.cancelled() else task.exception()
            if task.cancelled():
                self.images[url] = ("CLIENT_ERROR", f"the download of image URL {url!r} was cancelled")
            elif isinstance(exc, InputError):
                self.images[url] = ("INVALID_INPUT", str(exc))
            elif exc is not None:  # storing it failed (a full disk...): that row's error too
                self.images[url] = ("CLIENT_ERROR", f"image URL {url!r}: {exception_text(exc)}")
            else:
                self.images[url] = task.result()

    def _with_images(self, batch: list[tuple[Row, int]], start: int) -> list[tuple[Row, int]]:
        """A chunk of rows with its image URLs in place: each as the stored image's MIME type and
        digest (`KnownDigest`: enough for the cache key; the bytes are read only for a request
        that is sent); a row whose image could not be read gets that as its error."""
        urls = _distinct_urls(batch)
        while any(url in self.fetching for url in urls):
            self._take_downloads(block=True)
            self._collect(block=False)  # answers that arrived meanwhile: stored as they come
        inlines: dict[str, KnownDigest] = {}
        for url in urls:
            image = self.images[url]
            if isinstance(image, UrlRecord):
                inline = inlines[url] = KnownDigest(mimeType=image.mime)
                inline.digest, inline.size = image.digest, image.size

        def inline_for(url: str) -> KnownDigest:
            image = self.images[url]
            if not isinstance(image, UrlRecord):  # (status, message): the URL could not be read
                raise _ImageFailed(*image)
            return inlines[url]

        rebuilt: list[tuple[Row, int]] = []
        for row, (item, size) in enumerate(batch, start):
            if isinstance(item, dict) and (found := url_images(item)):
                try:
                    item = with_url_images(item, inline_for)
                    # every URL was read (inline_for raised otherwise): each is a UrlRecord
                    size += sum(4 * ((cast(UrlRecord, self.images[url]).size + 2) // 3) for url in found)
                except _ImageFailed as failure:
                    item = RowError(None, failure.status, f"row {row}: {failure.message}")
            rebuilt.append((item, size))
        for url in urls:  # forget what no batch still to be admitted uses
            self.image_users[url] -= 1
            if not self.image_users[url]:
                del self.image_users[url], self.images[url]
        return rebuilt

    def _media_files(self, fresh: dict[str, tuple[dict[str, Any], int]]) -> dict[str, dict[str, FileRecord] | str]:
        """The files the misses of a batch name instead of inline media (`uploads`), uploaded
        first; empty when this call sends media inline (the option, the provider, Batch Mode,
        cache='read')."""
        if self.batch_options is not None or self.mode is CacheMode.READ:
            return {}
        if not uploads_media(self.provider, self.client.upload) or not any(size for _, size in fresh.values()):
            return {}
        if self.files is None:
            self.files = CallFiles(
                self.client.executor,
                self.provider,
                (lambda: self.client.upload_store) if self.mode is not CacheMode.OFF else None,
                self.client.upload,
                lambda digest: self._url_store().encoded(digest),
            )
        return self.files.prepare(fresh, self._collect)

    def _too_big(self, file: LocalFile) -> str:
        """Why a local file over the inline limit cannot be sent by this call, and the fix."""
        why = f"{file.where()} is over the {INLINE_LIMIT // 2**20} MB the API takes inline per request"
        if self.batch_options is not None:
            return f"{why}, and Batch Mode sends media inline; send it with mode='live', which uploads it through the Files API"
        if "files" not in self.provider.capabilities:
            return (
                f"{why}, and provider {self.provider.name!r} has no Files API to upload it to; pass a file of at "
                f"most {INLINE_LIMIT // 2**20} MB, or use the Google provider (gf.Client('google'), upload='auto'), "
                f"which uploads files of up to {FILES_LIMIT // 2**30} GB"
            )
        return (
            f"{why}; gf.Client(upload='auto') (or 'always') uploads it through the Files API (files of up to "
            f"{FILES_LIMIT // 2**30} GB), or pass a file of at most {INLINE_LIMIT // 2**20} MB"
        )

    def _resend_files(self, key: str, body: dict[str, Any], files: dict[str, Any]) -> None:
        """Send a request again naming new files (its old ones were gone)."""
        assert self.files is not None
        self.files.note_sent(key, body, files)
        sent = body if self.context is None else self.context.outgoing(key, body)
        self._resend(key, with_files(sent, files))

    def _fill_images(self, body: dict[str, Any]) -> str | None:
        """Put the bytes of its stored images into a body about to be sent; what went wrong, if
        something did."""
        for content in body["contents"]:
            for part in content.get("parts") or ():
                inline = part.get("inlineData")
                if isinstance(inline, KnownDigest) and "data" not in inline:
                    encoded = self._url_store().encoded(inline.digest)
                    if encoded is None:
                        return (
                            f"the stored image {inline.digest} is missing or damaged in "
                            f"{self._url_store().directory}; cache='refresh' fetches the URL again"
                        )
                    inline["data"] = encoded
        return None

    def _admit(self, batch: list[tuple[Row, int]], urls: list[str] | None = None) -> None:
        """Give cached answers to a batch of rows and send its misses (a batch with image URLs
        `_URL_CHUNK` rows at a time, as their images arrive)."""
        if urls:
            for i in range(0, len(batch), _URL_CHUNK):
                self._admit(self._with_images(batch[i : i + _URL_CHUNK], len(self.column)))
            return
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
            try:
                key = cache_key(item, provider=self.provider.name, model=self.model, sample=self.sample)
            except Exception as exc:  # a body `Client.send` was given that is not JSON data
                answer, record = self.column.add_answer(
                    failed(
                        RowError(
                            None, "INVALID_INPUT", f"row {row}: the request is not JSON data: {exception_text(exc)}"
                        )
                    )
                )
                self._answer_row(row, answer, record)
                continue
            if key in self.done:
                answer, cached, error = self.done[key]
                self._answer_row(row, answer, {"cached": cached, "error": error}, tokens=False)
            elif key in self.waiting:
                self.waiting[key].append(row)
            else:
                self.waiting[key] = [row]
                fresh[key] = (item, size)
        if self.cache is not None and self.mode in (CacheMode.USE, CacheMode.READ) and fresh:
            for key, raw in self.cache.get_many(fresh).items():
                del fresh[key]
                self._answer(key, self._cached_record(key, raw))
        outgoing: list[tuple[str, str, bytes]] = []  # submitted together: one loop wake-up
        files = self._media_files(fresh)  # key -> the files its request names, or why it cannot
        for key, (body, size) in fresh.items():
            if self.mode is CacheMode.READ:
                self._fail(
                    key, "CACHE_MISS", "not in the cache and cache='read' sends nothing; use cache='use' to fetch it"
                )
                continue
            named = files.get(key)
            if isinstance(named, str):  # its media could not be uploaded
                self._fail(key, "UPLOAD_FAILED", named, row=True)
                continue
            # The request as sent (the key stays the body's): the shared prefix named by its
            # context cache first (`RunContext` knows the prefix by its inline turn), then its
            # shared or big media named by file.
            sent = body if self.context is None else self.context.outgoing(key, body)
            if named is not None:
                sent = with_files(sent, named)
            big = next(_local_files(sent), None) if size else None
            if big is not None:  # too big for inline, and this call does not upload
                self._fail(key, "INVALID_INPUT", self._too_big(big), row=True)
                continue
            problem = self._fill_images(sent) if size else None
            if problem is not None:
                self._fail(key, "CACHE_CORRUPT", problem, row=True)
                continue
            encode = request_json if size else orjson.dumps  # images: spliced in (see request_json)
            try:
                content = encode(self.provider.wrap(sent))
            except Exception as exc:  # e.g. gf.send with an integer beyond 64 bits: no JSON encoder here writes it
                self._fail(key, "INVALID_INPUT", f"the request cannot be encoded: {exception_text(exc)}", row=True)
                continue
            if len(content) > INLINE_LIMIT:
                self._fail(
                    key,
                    "INVALID_INPUT",
                    f"the request is {len(content) / 2**20:.1f} MB; the API takes about {INLINE_LIMIT // 2**20} MB "
                    f"inline per request: send smaller or fewer images{_upload_hint(self.client)}",
                    row=True,
                )
                continue
            if self.batch_options is not None:
                self.batch_bodies[key] = content
                continue
            outgoing.append((key, self.url, content))
            if self.files is not None and named is not None:  # in ``files``, and not a str
                self.files.note_sent(key, body, named)
            self._track(key, body, content)
            if self._full():
                self.client.executor.submit_many(outgoing, self.finished)
                outgoing = []
                while self._full():
                    self._collect(block=True)
        if outgoing:
            self.client.executor.submit_many(outgoing, self.finished)
        self._collect(block=False)

    def _resend(self, key: str, body: dict[str, Any]) -> None:
        """Send a row's request again (an outgoing body: `RunContext.retry` made it)."""
        encode = request_json if _inline_bytes(body) else orjson.dumps
        content = encode(self.provider.wrap(body))
        self._track(key, body, content)  # its prompt: the row's own turn, with or without the prefix
        self.client.executor.submit_many([(key, self.url, content)], self.finished)

    def _track(self, key: str, body: dict[str, Any], content: bytes) -> None:
        """Note a request about to be sent: in flight, its size (see `_full`), and its prompt
        for the cache entry's header."""
        self.in_flight.add(key)
        if self.cache is not None and (prompt := prompt_text(body)) is not None:
            self.prompts[key] = prompt
        self.inflight_bytes += len(content)
        self.sizes[key] = len(content)

    def _fail(self, key: str, status: str, message: str, row: bool = False) -> None:
        """Answer a request that will not be sent with an error (``row``: naming its first row)."""
        if row:
            message = f"row {self.waiting[key][0]}: {message}"
        self._answer(key, failed(RowError(None, status, message)))

    def _cached_record(self, key: str, raw: bytes) -> dict[str, Any]:
        """The reply of a cached answer; one that is not a generateContent answer (a damaged or
        planted row) is that row's error, never an exception that ends the call."""
        try:
            response = orjson.loads(raw)
            problem = answer_problem(response)
            if problem is None:
                return self._record(response, raw, True, 0, 0.0)
        except (ValueError, TypeError) as exc:  # not JSON, bad base64 image data
            problem = str(exc)
        except Exception as exc:  # not the answer's fault (image_dir not writable): as for a fresh one
            return self._unreadable(exc, 0, 0.0)
        return failed(
            RowError(
                None,
                "CACHE_CORRUPT",
                f"row {self.waiting[key][0]}: the cached answer (key {key}) is not a generateContent "
                f"answer ({problem}); cache='refresh' fetches it again and replaces it",
            )
        )

    def _full(self) -> bool:
        """Whether to wait before sending more: a window of requests is out, or every
        concurrency slot is busy and the bodies queued behind them (big images) add up."""
        in_flight = len(self.in_flight)
        return in_flight >= self.window or (in_flight >= self.concurrency and self.inflight_bytes > _QUEUED_BYTES)

    def _collect(self, block: bool) -> None:
        """Handle finished requests (waiting for one if asked): answers are stored in the cache
        in one transaction as soon as they arrive, so a crash right after loses none of them.
        They are stored before any is handled: a fatal error raised for one of them leaves the
        others' answers in the cache. Until stored they stay in ``taken``, which `finish`
        stores if the call ends in between (Ctrl-C)."""
        new = take_all(self.finished, block)
        if not new:
            return
        done = self.taken
        done += new
        outcomes = [(key, task.result()) for key, task in done]
        for key, _ in done:
            self.in_flight.discard(key)
            self.inflight_bytes -= self.sizes.pop(key)
        if self.cache is not None:
            self.cache.set_many([(k, self.model, o.raw) for k, o in outcomes if o.raw is not None], self.prompts)
        for key, _ in done:
            self.prompts.pop(key, None)
        self.taken = []
        for key, outcome in outcomes:
            self._handle(key, outcome)

    def _handle(self, key: str, outcome: Outcome) -> None:
        if outcome.failure is not None and outcome.failure.fatal is not None:
            raise outcome.failure.as_api_error()
        if self.context is not None:
            again = self.context.retry(key, outcome.error) if outcome.response is None else None
            if again is not None:  # its context cache was gone: made anew, the row sent again
                if self.files is not None and (named := self.files.named(key)):
                    again = with_files(again, named)  # still naming the files it named
                self._resend(key, again)
                return
            self.context.forget(key)
        refiled = self.files.finished(key, outcome.error) if self.files is not None else None
        if isinstance(refiled, tuple):  # a file it named was gone: uploaded again, sent again
            self._resend_files(key, *refiled)
            return
        if refiled is not None:
            error = RowError(None, "UPLOAD_FAILED", f"row {self.waiting[key][0]}: {refiled}")
            outcome = Outcome(None, None, error, None, outcome.attempts, outcome.latency_ms)
        if outcome.response is None:
            assert outcome.error is not None
            self._answer(key, failed(outcome.error, attempts=outcome.attempts, latency_ms=outcome.latency_ms))
        else:
            self._answer(key, self._decode(outcome.response, outcome.raw, False, outcome.attempts, outcome.latency_ms))

    def _decode(
        self, response: dict[str, Any], raw: bytes | None, cached: bool, attempts: int, latency_ms: float | None
    ) -> dict[str, Any]:
        """The reply of an answer, or its row's error when it cannot be read."""
        try:
            return self._record(response, raw, cached, attempts, latency_ms)
        except Exception as exc:  # one answer we cannot read (bad image data, image_dir not writable)
            return self._unreadable(exc, attempts, latency_ms)

    def _record(
        self, response: dict[str, Any], raw: bytes | None, cached: bool, attempts: int, latency_ms: float | None
    ) -> dict[str, Any]:
        record = decode(response, cached=cached, attempts=attempts, latency_ms=latency_ms, image_dir=self.image_dir)
        if self.raw:
            record["raw"] = raw.decode("utf-8") if raw is not None else json.dumps(response)
        return record

    @staticmethod
    def _unreadable(exc: Exception, attempts: int, latency_ms: float | None) -> dict[str, Any]:
        return failed(
            RowError(200, "MALFORMED_RESPONSE", f"could not read the answer: {exception_text(exc)}"),
            attempts=attempts,
            latency_ms=latency_ms,
        )

    def _answer(self, key: str, record: dict[str, Any]) -> None:
        answer, record = self.column.add_answer(record)
        self.done[key] = (answer, record["cached"], record.get("error"))
        for n, row in enumerate(self.waiting.pop(key)):
            self._answer_row(row, answer, record, tokens=n == 0)  # one request: its tokens once

    def _answer_row(self, row: int, answer: int, record: dict[str, Any], tokens: bool = True) -> None:
        self.column.point(row, answer)
        self.progress.advance(record, row, tokens)

    def finish(self) -> None:
        """End the call. When it ends early (an exception, Ctrl-C, a fatal API error), every
        answer that had arrived is stored in the cache first, collected or not: paid for, it must
        not be asked for again. What is still in flight is cancelled, not waited for."""
        executor = self.client.executor
        executor.cancel(self.finished)
        executor.cancel(self.fetched)  # image downloads still running
        if self.files is not None:
            self.files.close()  # uploads still running
        if self.scratch is not None:
            self.scratch.close()
            shutil.rmtree(self.scratch.directory, ignore_errors=True)
        if self.in_flight:  # let the loop put on `finished` what finished before the cancel
            _loop_settled()
        self.in_flight.clear()
        arrived = self.taken  # taken off the queue but not stored: the end came in between
        while True:
            try:
                arrived.append(self.finished.get_nowait())
            except queue.Empty:
                break
        self.taken = []
        if arrived and self.cache is not None:
            answers = [(key, self.model, raw) for key, raw in _answers(arrived)]
            if answers:
                self.cache.set_many(answers, self.prompts)
        self.prompts.clear()
        if self.progress.owned:  # one RowsFailedWarning when rows failed (see Progress.close)
            self.progress.close(warn=self.completed)


def _upload_hint(client: Client) -> str:
    """How to send a request over the inline limit anyway, if the provider can."""
    if "files" not in client.provider.capabilities:
        return f" (provider {client.provider.name!r} has no Files API to upload them to)"
    return "; gf.Client(upload='auto') uploads big media through the Files API" if client.upload == "never" else ""


def _distinct_urls(rows: list[tuple[Row, int]]) -> list[str]:
    """The image URLs of some rows (`payload.UrlImage`s), each once."""
    return list(dict.fromkeys(url for item, _ in rows if isinstance(item, dict) for url in url_images(item)))


class _ImageFailed(Exception):
    """An image URL of a row could not be read: the row's error status and message."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _keep_image(store: UrlStore, known: dict[str, UrlRecord], url: str, fetched: Fetched) -> UrlRecord:
    """Store a fetched image (on a worker thread: the loop never waits on a disk) and return
    its record. Bytes that are not a supported image are an InputError, never stored; a 304
    to a revalidation keeps the stored image."""
    if fetched.data is None:
        return store.touch(known[url])
    data, mime = _sniffed(fetched.data, f"image URL {url!r}")
    return store.put(url, data, mime, fetched.etag, fetched.last_modified)


def _answers(finished: list[tuple[str, Any]]) -> Iterator[tuple[str, bytes]]:
    """(key, raw answer) of the finished requests that got one (not cancelled, no error)."""
    for key, task in finished:
        if not task.cancelled() and task.exception() is None:
            raw = task.result().raw
            if raw is not None:
                yield key, raw


def _loop_settled(timeout: float = 10.0) -> None:
    """Return once the executor's loop has run what was already due: the cancel just asked for
    and the done-callbacks of every request that finished before it, which put them on their
    callers' queues. A request finishing schedules those callbacks for the loop's next turn,
    and this coroutine's first step comes after them. It returns as soon as the loop gets to it;
    the bound is generous because on a loaded machine the loop thread may take seconds to get
    there, and giving up early loses answers that had arrived. Requests still in flight are not
    waited for."""

    async def settled() -> None:
        await asyncio.sleep(0)

    try:
        asyncio.run_coroutine_threadsafe(settled(), background_loop()).result(timeout)
    except concurrent.futures.TimeoutError:
        pass


_default_client: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The client used when none is passed: provider and key from the environment."""
    global _default_client
    with _default_lock:
        if _default_client is None:
            _default_client = Client()
        return _default_client


_named_clients: dict[str, Client] = {}


def named_client(client: Client | str | None) -> Client | None:
    """A ``client=`` argument as a `Client`: a Client (or None) as given, a provider name
    (``client="emulator"``) as the process's one client for that provider with the default
    options, built on first use like `default_client` (one per call would open a connection
    pool per call). Anything else is a TypeError naming ``gf.Client(...)``, at once rather
    than when the frame is collected."""
    if client is None or isinstance(client, Client):
        return client
    if isinstance(client, str):
        with _default_lock:
            if client not in _named_clients:
                _named_clients[client] = Client(client)  # an unknown name: resolve_provider's ValueError
            return _named_clients[client]
    raise TypeError(
        f"client must be a gf.Client or a provider name, not {type(client).__name__}; "
        "build one with gf.Client(...), e.g. gf.Client('emulator') or gf.Client(provider, model=..., cache_dir=...)"
    )
