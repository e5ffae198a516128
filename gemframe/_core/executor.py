"""The async engine: one background event-loop thread per process, one shared HTTP client per
`Executor`, a concurrency limit, timeouts and retries with jittered exponential back-off.

Running the loop on its own thread is what lets a synchronous polars expression use asyncio the
same way from a script, from Jupyter (whose loop is already running) and from polars' streaming
worker threads (which call the expression concurrently). Callers submit a batch of requests
with one wake-up of the loop and read finished ones from their own queue; `Executor.cancel`
stops what is left (Ctrl-C, a whole-run error).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import queue
import random
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from .._errors import RowError, exception_text
from .http import AiohttpSession, HttpxSession, Reply, TransportFailure, redact_url
from .limits import RateLimiter, Window
from .payload import Fetched, UrlFetcher
from .providers import RETRYABLE_STATUS, Failure, Provider
from .tokens import count_tokens

T = TypeVar("T")
# How long a caller waits for what the loop finishes: in effect forever, but given as a timeout
# because only a timed wait is interrupted by Ctrl-C (SIGINT); `SimpleQueue.get()` without one
# sleeps through it until the next answer arrives, which may be a minute away.
FOREVER = threading.TIMEOUT_MAX


def take_all(finished: queue.SimpleQueue[T], block: bool) -> list[T]:
    """Everything on a queue the loop fills (finished requests, downloads, uploads): at least
    one item when ``block``, else what is there now; taken at once, so one wake-up handles a
    burst."""
    try:
        items = [finished.get(block=block, timeout=FOREVER)]
    except queue.Empty:
        return []
    while True:
        try:
            items.append(finished.get_nowait())
        except queue.Empty:
            return items


logger = logging.getLogger("gemframe")

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid: int | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    """The process-wide event loop thread, started on first use (and again after a fork)."""
    global _loop, _loop_pid
    with _loop_lock:
        if _loop is None or _loop_pid != os.getpid():
            _loop = asyncio.new_event_loop()
            _loop_pid = os.getpid()
            threading.Thread(target=_loop.run_forever, name="gemframe-loop", daemon=True).start()
        return _loop


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except ValueError:  # truncated, HTML, empty...
        return None
    return parsed if isinstance(parsed, dict) else None


@dataclass
class Outcome:
    """The end of one request after all its attempts."""

    response: dict[str, Any] | None  # parsed JSON of a 200 answer
    raw: bytes | None  # the same answer's bytes, for the cache
    error: RowError | None
    failure: Failure | None  # the last non-200 answer, if any (carries `fatal`)
    attempts: int
    latency_ms: float


@dataclass
class RetryPolicy:
    """How hard to try: a per-row deadline (seconds), back-off base and cap, and optionally a cap
    on attempts per row.

    Transient faults are retried until the deadline, not a fixed small count: at 20-25% mixed
    faults a cap of 5 lost about one row in a thousand (0.25**5). The back-off is capped, so a
    row keeps trying within its deadline; ``max_attempts`` (None: no cap) is for those who want
    a row to give up sooner."""

    max_attempts: int | None = None
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    max_retry_after: float = 300.0
    deadline: float = 900.0  # seconds from a row's first attempt after which it stops retrying

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Full-jitter exponential back-off, or the server's own wait (plus a little jitter)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after) + random.uniform(0, self.backoff_base)
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** min(attempt - 1, 60)))

    def out_of_attempts(self, attempt: int) -> bool:
        return self.max_attempts is not None and attempt >= self.max_attempts


# Attempts of a control call (batch create/poll, countTokens, a Files API upload) when the client
# sets no cap: it fails in seconds, not at the row deadline.
_CALL_ATTEMPTS = 5


def _finished(waiting: dict[str, Any], done: queue.SimpleQueue[Any], key: str, task: asyncio.Task[Outcome]) -> None:
    waiting.pop(key, None)
    done.put((key, task))


@dataclass
class _Shared:
    """One request in flight and how many callers wait for it."""

    task: asyncio.Future[Outcome]
    waiters: int = 0


class Executor:
    """Sends request bodies to one provider with bounded concurrency and retries."""

    def __init__(
        self,
        provider: Provider,
        *,
        concurrency: int = 16,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        limiter: RateLimiter | None = None,
        download_concurrency: int = 32,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if download_concurrency < 1:
            raise ValueError("download_concurrency must be >= 1")
        self.download_concurrency = download_concurrency
        self._fetchers: dict[bool, UrlFetcher] = {}  # by allow_private_urls; on the loop
        self.provider = provider
        self.concurrency = concurrency
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.limiter = limiter or RateLimiter()
        self.tripped: Failure | None = None  # a whole-run failure: stops all sending until reset
        self._http: AiohttpSession | HttpxSession | None = None
        self._slots: Window | None = None  # requests allowed in flight: slow start up to the concurrency
        self._inflight: dict[str, _Shared] = {}
        self._waiting: dict[int, dict[str, _Shared]] = {}  # by id of a caller's done queue: its unfinished keys
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closer: weakref.finalize[..., None] | None = None  # closes the session if self is dropped open

    def __repr__(self) -> str:
        return f"Executor({self.provider!r}, concurrency={self.concurrency})"

    def submit_many(
        self, items: list[tuple[str, str, bytes]], done: queue.SimpleQueue[tuple[str, asyncio.Task[Outcome]]]
    ) -> None:
        """Send (key, url, body) requests from any thread, waking the loop once for all of them;
        each finished one is put on ``done`` as (key, task). Identical keys in flight share one
        request. `cancel` stops the ones still running."""
        self._use_loop().call_soon_threadsafe(self._start_many, items, done)

    def cancel(self, done: queue.SimpleQueue[Any]) -> None:
        """Cancel the requests submitted with this ``done`` queue that have not finished."""
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._cancel_all, id(done))

    def _start_many(self, items: list[tuple[str, str, bytes]], done: queue.SimpleQueue[Any]) -> None:
        waiting = self._waiting.setdefault(id(done), {})
        for key, url, content in items:
            shared = self._inflight.get(key)
            if shared is None:  # one task per distinct request, whoever asks for it
                task = asyncio.ensure_future(self._send_guarded(url, content))
                shared = self._inflight[key] = _Shared(task)
                task.add_done_callback(functools.partial(self._forget, key, shared))
            if key not in waiting:
                shared.waiters += 1
                waiting[key] = shared
                shared.task.add_done_callback(functools.partial(_finished, waiting, done, key))

    def _forget(self, key: str, shared: _Shared, _task: asyncio.Task[Outcome]) -> None:
        if self._inflight.get(key) is shared:
            del self._inflight[key]

    def _cancel_all(self, queue_id: int) -> None:
        """A caller gives up: requests nobody else waits for are cancelled."""
        for shared in self._waiting.pop(queue_id, {}).values():
            shared.waiters -= 1
            if shared.waiters == 0:
                shared.task.cancel()

    def _use_loop(self) -> asyncio.AbstractEventLoop:
        loop = background_loop()
        if loop is not self._loop:  # first use, or a fork made a new loop
            if self._closer is not None:  # a session of the parent's loop: nothing to close here
                self._closer.detach()
            self._loop, self._http, self._slots, self._inflight, self._waiting = loop, None, None, {}, {}
            self._fetchers = {}
        return loop

    def _client(self) -> AiohttpSession | HttpxSession:
        if self._http is None:
            self._slots = Window(self.concurrency)
            transport = self.provider.transport()
            headers = self.provider.headers()
            if transport is None:  # the real network: say so if the key would travel in clear text
                self.provider.warn_if_plaintext()
                self._http = AiohttpSession(headers, self.concurrency, self.timeout)
            else:
                self._http = HttpxSession(transport, headers, self.timeout)
            # A Client dropped without close() (or alive at exit) must still close its session:
            # aiohttp warns "Unclosed client session" from the session's __del__ otherwise. The
            # finalizer holds the loop and the session, not the executor.
            self._closer = weakref.finalize(self, _close_session, self._loop, self._http)  # type: ignore[arg-type]  # _use_loop set _loop first
        return self._http

    async def _send_guarded(self, url: str, content: bytes) -> Outcome:
        """`_send`, with any exception it raises (an in-process app that crashed, a transport's
        unexpected error) turned into that request's row error: one request's fault must not
        escape the task and end the caller's whole call, losing the answers around it. Not
        retried: such an error is not a server saying "try again". Cancelling still works
        (CancelledError is not an Exception)."""
        start = time.perf_counter()
        try:
            return await self._send(url, content)
        except Exception as exc:
            error = RowError(None, "CLIENT_ERROR", redact_url(f"sending the request raised {exception_text(exc)}"))
            logger.debug("%s", error.message)
            return Outcome(None, None, error, None, 1, (time.perf_counter() - start) * 1000)

    async def _send(self, url: str, content: bytes) -> Outcome:
        client = self._client()
        assert self._slots is not None
        start = time.perf_counter()
        estimate = count_tokens(content) if self.limiter.tokens is not None else 0  # only TPM needs it
        failure: Failure | None = None
        error: RowError | None = None
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            async with self._slots:
                # Paced inside the window, so a rate set while requests queue paces them too
                # (they used to wait for a slot having already passed the pacing: a burst).
                await self.limiter.acquire(estimate)
                if self.tripped is not None:  # the API refused the run: send nothing more
                    return Outcome(None, None, error, self.tripped, attempt - 1, 0.0)
                sent = time.monotonic()
                try:
                    response: Reply | None = await client.request("POST", url, content)
                except TransportFailure as exc:
                    error, response = RowError(None, exc.status, exc.message), None
            if response is None:
                pass
            elif response.status_code == 200:
                body = response.content
                parsed = _json_object(body)
                if parsed is not None:
                    self._slots.grow()
                    usage = parsed.get("usageMetadata") or {}
                    self.limiter.on_answer(sent, estimate, usage.get("totalTokenCount"))
                    return Outcome(parsed, body, None, None, attempt, (time.perf_counter() - start) * 1000)
                error = RowError(200, "MALFORMED_RESPONSE", f"answer is not a JSON object: {body[:80]!r}")
            else:
                failure = self.provider.failure(response)
                error = RowError(failure.code, failure.status, failure.message)
                if failure.fatal:
                    self.tripped = failure
                    break
                if not failure.retryable:
                    break
                if response.status_code == 429:
                    self.limiter.on_throttle(sent)
                retry_after = failure.retry_after
            if self.retry.out_of_attempts(attempt):
                break
            delay = self.retry.delay(attempt, retry_after)
            assert error is not None  # every way here set it: a transport failure or a non-200 answer
            if time.perf_counter() - start + delay > self.retry.deadline:
                error = RowError(
                    error.code, error.status, f"{error.message} (gave up: retry deadline {self.retry.deadline:g}s)"
                )
                break
            logger.debug(
                "retrying %s after %s %s (attempt %d) in %.2fs",
                redact_url(url),
                error.code or "",
                error.status,
                attempt,
                delay,
            )
            await asyncio.sleep(delay)
        return Outcome(None, None, error, failure, attempt, (time.perf_counter() - start) * 1000)

    def download_many(
        self,
        items: list[tuple[str, str | None, str | None]],
        allow_private_urls: bool,
        then: Any,
        done: queue.SimpleQueue[tuple[str, asyncio.Task[Any]]],
    ) -> None:
        """Fetch image URLs (url, etag, last_modified) on the loop, from any thread, waking it
        once: at most ``download_concurrency`` at a time beside the generation requests, over
        pooled keep-alive connections, retried on transient faults (`UrlFetcher`, which keeps
        the safety rules of image URLs). Each fetched one is handed to ``then(url, Fetched)``
        on a worker thread (which stores it: the loop never waits on a disk), and put on
        ``done`` as (url, task) holding ``then``'s result or the fetch's InputError. `cancel`
        with the same ``done`` stops what is left."""
        self._use_loop().call_soon_threadsafe(self._start_downloads, items, allow_private_urls, then, done)

    def _start_downloads(
        self,
        items: list[tuple[str, str | None, str | None]],
        allow_private_urls: bool,
        then: Any,
        done: queue.SimpleQueue[Any],
    ) -> None:
        waiting = self._waiting.setdefault(id(done), {})
        for url, etag, last_modified in items:
            task = asyncio.ensure_future(self._download(url, etag, last_modified, allow_private_urls, then))
            waiting[url] = _Shared(task, waiters=1)
            task.add_done_callback(functools.partial(_finished, waiting, done, url))

    async def _download(
        self, url: str, etag: str | None, last_modified: str | None, allow_private_urls: bool, then: Any
    ) -> Any:
        fetcher = self._fetchers.get(allow_private_urls)
        if fetcher is None:
            fetcher = self._fetchers[allow_private_urls] = UrlFetcher(
                allow_private_urls,
                concurrency=self.download_concurrency,
                attempts=self.retry.max_attempts or _CALL_ATTEMPTS,
                delay=self.retry.delay,  # a bounded count, as control calls
            )
            weakref.finalize(self, _close_session, self._loop, fetcher)  # type: ignore[arg-type]  # _use_loop set _loop first
        fetched: Fetched = await fetcher.fetch(url, etag, last_modified)
        return await asyncio.get_running_loop().run_in_executor(None, then, url, fetched)

    def run_many(self, jobs: list[tuple[str, Any]], done: queue.SimpleQueue[tuple[str, asyncio.Task[Any]]]) -> None:
        """Run (name, job) on the loop, from any thread, waking it once: each ``job(session)``
        is a coroutine given this executor's pooled HTTP session (its headers carry the key, so
        a job sends only to the provider's origin: see `uploads`); each finished one is put on
        ``done`` as (name, task). `cancel` with the same ``done`` stops what is left."""
        self._use_loop().call_soon_threadsafe(self._start_jobs, jobs, done)

    def _start_jobs(self, jobs: list[tuple[str, Any]], done: queue.SimpleQueue[Any]) -> None:
        waiting = self._waiting.setdefault(id(done), {})
        for name, job in jobs:
            task = asyncio.ensure_future(job(self._client()))
            waiting[name] = _Shared(task, waiters=1)
            task.add_done_callback(functools.partial(_finished, waiting, done, name))

    def call(self, method: str, url: str, content: bytes | None = None) -> concurrent.futures.Future[Reply]:
        """One control call (batch create/poll) from any thread, retried on transient failures;
        the future holds the last answer."""
        return asyncio.run_coroutine_threadsafe(self._call(method, url, content), self._use_loop())

    async def _call(self, method: str, url: str, content: bytes | None) -> Reply:
        client = self._client()
        attempts = self.retry.max_attempts or _CALL_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                response = await client.request(method, url, content)
            except TransportFailure:
                if attempt == attempts:
                    raise
            else:
                if response.status_code not in RETRYABLE_STATUS or attempt == attempts:
                    return response
            await asyncio.sleep(self.retry.delay(attempt, None))
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the HTTP client (the executor reopens one if used again)."""
        http, self._http = self._http, None
        if self._closer is not None:
            self._closer.detach()
        if http is not None and self._loop is not None:
            _close_session(self._loop, http)
        fetchers, self._fetchers = self._fetchers, {}
        for fetcher in fetchers.values():
            if self._loop is not None:
                _close_session(self._loop, fetcher)


def _close_session(loop: asyncio.AbstractEventLoop, http: AiohttpSession | HttpxSession | UrlFetcher) -> None:
    """Close a session on the loop it was opened on. Called by `Executor.close`, and by an
    executor's finalizer: when the executor is garbage collected (a Client dropped unclosed) or
    at interpreter exit (``weakref.finalize`` runs then, while the loop thread still runs)."""
    if not loop.is_running():
        return
    future = asyncio.run_coroutine_threadsafe(http.aclose(), loop)
    try:
        on_loop = asyncio.get_running_loop() is loop
    except RuntimeError:
        on_loop = False
    if on_loop:  # dropped by a callback on the loop itself: waiting would deadlock; it runs next
        return
    try:
        future.result(timeout=5)
    except (concurrent.futures.TimeoutError, RuntimeError):
        pass
