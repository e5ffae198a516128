"""The emulator's HTTP side: `Emulator` (an ASGI app routing both dialects and Batch Mode),
its `Stats`, and `serve` over TCP. Routes, knobs and markers are documented in
`gemframe.emulator`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from .answers import build_reply, prompt_tokens
from .batch import BatchError, BatchStore
from .caches import CacheStore
from .files import CHUNK_GRANULARITY, FILE_MAX_BYTES, FILES_TOTAL_BYTES, FileStore
from .validation import (
    GEMINI_MODELS,
    INVALID_KEY,
    INVALID_KEY_DETAILS,
    MAX_BODY_BYTES,
    STATUS_NAMES,
    UNREGISTERED_CALLER,
    ErrorAnswer,
    GenRequest,
    _failure,
    _invalid,
    check_signatures,
    load_body,
    model_known,
    model_not_found,
    parse_count_tokens,
    parse_generate,
)

__all__ = ["Emulator", "Stats", "serve"]


@dataclass
class Stats:
    """Generate-call counters (both routes, failures included), plus the request body bytes
    received on every route and the Files API uploads finalized."""

    requests: int = 0
    by_body: Counter[str] = field(default_factory=Counter)  # sha256 hex of raw body -> count
    in_flight: int = 0
    max_in_flight: int = 0
    bytes_received: int = 0  # request bodies, every route (generate, uploads, ...)
    uploads: int = 0  # files created by an upload's finalize

    def as_json(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "distinct_bodies": len(self.by_body),
            "max_in_flight": self.max_in_flight,
            "in_flight": self.in_flight,
            "bytes_received": self.bytes_received,
            "uploads": self.uploads,
        }


def _json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Compact JSON, so identical answers are identical bytes."""
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _retry_headers(err: ErrorAnswer) -> dict[str, str]:
    return {} if err.retry_after is None else {"retry-after": f"{err.retry_after:g}"}


def _google_error(err: ErrorAnswer) -> Response:
    details = list(err.details)
    if err.code == 429 and err.retry_after is not None:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": f"{err.retry_after:g}s",
            }
        )
    status = err.status or STATUS_NAMES.get(err.code, "UNKNOWN")
    error: dict[str, Any] = {"code": err.code, "message": err.message, "status": status}
    if details:
        error["details"] = details
    return _json_response({"error": error}, err.code, _retry_headers(err))


def _segmind_error(err: ErrorAnswer) -> Response:
    headers = _retry_headers(err)
    if err.code == 429 and err.retry_after is not None:
        reset = datetime.now(timezone.utc) + timedelta(seconds=err.retry_after)
        headers["x-rate-limit-reset-at-utc"] = reset.isoformat(timespec="milliseconds")
    return _json_response({"error": err.message}, err.code, headers)


def _too_large() -> ErrorAnswer:
    return ErrorAnswer(413, f"Request payload size exceeds the limit: {MAX_BODY_BYTES} bytes.")


async def _read_body(request: Request, limit: int = MAX_BODY_BYTES, too_large: ErrorAnswer | None = None) -> bytes:
    """The request body, or a 413 (``too_large``) before more than ``limit`` bytes of it are held.

    A declared Content-Length over the limit is refused before a byte of the body is read; a
    body without one (chunked) is read as it streams in and refused the moment it passes the
    limit. So whatever a client sends, the emulator never buffers more than the limit (starlette's
    ``request.body()`` would buffer all of it first).
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large or _too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large or _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


API_VERSIONS = ("v1beta", "v1")


def _version(request: Request) -> str:
    """The API version a Google route was called under (``/upload/v1/files``: v1)."""
    parts = request.url.path.strip("/").split("/")
    return parts[1] if parts[0] == "upload" else parts[0]


def _upload_status(status: str, received: int) -> Response:
    """An upload session's answer between chunks: its status and the bytes it holds."""
    return Response(
        status_code=200,
        headers={
            "x-goog-upload-status": status,
            "x-goog-upload-size-received": str(received),
        },
    )


def _bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    scheme, _, token = (value or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _unwrap_segmind(body: dict[str, Any]) -> dict[str, Any]:
    """Segmind's ``{"messages": {...}}`` as a Google body (system parts may be one object)."""
    unknown = [key for key in body if key != "messages"]
    if unknown:
        raise _invalid(f"Unsupported parameter: {unknown[0]}")
    messages = body.get("messages")
    if not isinstance(messages, dict):
        raise _invalid('"messages" must be an object with "contents"')
    inner = dict(messages)
    for key in ("system_instruction", "systemInstruction"):
        system = inner.get(key)
        if isinstance(system, dict) and isinstance(system.get("parts"), dict):
            inner[key] = {**system, "parts": [system["parts"]]}
    return inner


class Emulator:
    """An offline Gemini: an ASGI3 app answering generateContent deterministically.

    See `gemframe.emulator`'s docstring for routes, knobs, markers and determinism rules.
    """

    def __init__(
        self,
        latency: float = 0.0,
        jitter: float = 0.0,
        seed: int = 0,
        api_key: str | None = None,
        fail_first: int = 0,
        fail_status: int = 503,
        retry_after: float | None = None,
        batch_polls: int = 2,
        batch_outcome: str = "BATCH_STATE_SUCCEEDED",
        batch_fail_every: int = 0,
        batch_keep: int = 100,
        markers: bool = True,
        models: Collection[str] | None = GEMINI_MODELS,
        clock: Callable[[], float] = time.time,
        file_polls: int = 0,
        file_outcome: str = "ACTIVE",
        file_max_bytes: int = FILE_MAX_BYTES,
        files_total_bytes: int = FILES_TOTAL_BYTES,
        cache_min_tokens: int | None = None,
    ) -> None:
        self.latency = latency
        self.jitter = jitter
        self.seed = seed
        self.api_key = api_key
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.retry_after = retry_after
        self.markers = markers
        self.models = None if models is None else frozenset(models)
        self.clock = clock
        self.stats = Stats()
        # The stores read the clock through the emulator, so a test may swap ``emu.clock``.
        self.files = FileStore(lambda: self.clock(), file_max_bytes, files_total_bytes, file_polls, file_outcome)
        self.caches = CacheStore(lambda: self.clock(), cache_min_tokens)
        self.batches = BatchStore(self._answer_batched, keep=batch_keep)
        self.batches.polls, self.batches.outcome, self.batches.fail_every = batch_polls, batch_outcome, batch_fail_every
        # The Google routes under both API versions: gemframe speaks v1beta, the google-genai SDK
        # (3.x) v1. Before Segmind's /v1/{slug}, whose slugs never collide (they start "gemini").
        google = [
            route
            for v in API_VERSIONS
            for route in (
                Route(f"/{v}/models/{{model_action:path}}", self._google, methods=["POST"]),
                Route(f"/{v}/batches", self._batch_list, methods=["GET"]),
                Route(f"/{v}/batches/{{batch_action:path}}", self._batch, methods=["GET", "POST"]),
                Route(f"/upload/{v}/files", self._upload, methods=["POST"]),
                Route(f"/{v}/files", self._file_list, methods=["GET"]),
                Route(f"/{v}/files/{{file_id}}", self._file, methods=["GET", "DELETE"]),
                Route(f"/{v}/cachedContents", self._caches, methods=["GET", "POST"]),
                Route(
                    f"/{v}/cachedContents/{{cache_id}}",
                    self._cache,
                    methods=["GET", "PATCH", "DELETE"],
                ),
            )
        ]
        self._app = Starlette(
            routes=[
                *google,
                Route("/v1/{slug}", self._segmind, methods=["POST"]),
                Route("/emulator/stats", self._stats, methods=["GET"]),
                Route("/emulator/reset", self._reset, methods=["POST"]),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stats = self.stats

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                stats.bytes_received += len(message.get("body", b""))
            return message

        await self._app(scope, counted, send)

    def reset_stats(self) -> None:
        """Zero the counters in place (restarting fail_first); in-flight requests stay counted."""
        self.stats.requests = self.stats.bytes_received = self.stats.uploads = 0
        self.stats.by_body.clear()
        self.stats.max_in_flight = self.stats.in_flight

    async def _google(self, request: Request) -> Response:
        model, _, action = request.path_params["model_action"].rpartition(":")
        if action == "generateContent":
            return await self._generate(request, model, segmind=False)
        if action == "countTokens":
            try:
                body = self._admit_google(request, await _read_body(request), model, action)
                req = self.files.resolve(parse_count_tokens(body))
                inner = body.get("generateContentRequest", body.get("generate_content_request"))
                if isinstance(inner, dict):
                    req = self.caches.apply(req, inner, model)
                counts = prompt_tokens(req)
            except ErrorAnswer as err:
                return _google_error(err)
            details = [{"modality": m, "tokenCount": n} for m, n in counts.items()]
            answer: dict[str, Any] = {"totalTokens": sum(counts.values())}
            if req.cached:
                answer["cachedContentTokenCount"] = sum(n for _, n in req.cached)
            answer["promptTokensDetails"] = details
            return _json_response(answer)
        if action == "batchGenerateContent":
            try:
                body = self._admit_google(request, await _read_body(request), model, action)
                return await self._batch_call(self.batches.create, model, body)
            except ErrorAnswer as err:
                return _google_error(err)
            except BatchError as err:
                return _google_error(ErrorAnswer(err.code, err.message))
        return _google_error(ErrorAnswer(404, "Method not found."))

    def _answer_batched(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request of a batch job, answered as generateContent would answer it."""
        digest = hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()
        return build_reply(self._parse(body, model), model, digest)

    def _parse(self, body: dict[str, Any], model: str) -> GenRequest:
        """A generate body validated, its uploaded files and cached content looked up, with
        the test markers switched off unless enabled."""
        req = self.caches.apply(self.files.resolve(parse_generate(body)), body, model)
        check_signatures(req)
        return req if self.markers else replace(req, test_markers=False)

    async def _batch_call(self, method: Callable[..., Any], *args: Any) -> Response:
        """A batch-store call and its JSON, in a worker thread: the poll that finishes a job
        answers all its requests (drawing any images) and its answer may be megabytes of JSON,
        work that must not stall the event loop. The store's lock keeps calls one at a time."""

        def call() -> Response:
            with self.batches.lock:
                answer = method(*args)
            return _json_response(answer)

        return await run_in_threadpool(call)

    async def _batch(self, request: Request) -> Response:
        name, _, action = request.path_params["batch_action"].partition(":")
        try:
            self._check_key(request)
            if request.method == "GET" and not action:
                return await self._batch_call(self.batches.get, f"batches/{name}")
            if request.method == "POST" and action == "cancel":
                return await self._batch_call(self.batches.cancel, f"batches/{name}")
            raise BatchError(404, "Method not found.")
        except ErrorAnswer as err:
            return _google_error(err)
        except BatchError as err:
            return _google_error(ErrorAnswer(err.code, err.message))

    async def _batch_list(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except ErrorAnswer as err:
            return _google_error(err)
        return await self._batch_call(self.batches.list)

    # --- Files API (see gemframe.emulator.files) -------------------------------------------

    async def _upload(self, request: Request) -> Response:
        """Start a resumable upload; a POST to the session URL (``?upload_id=``) carries bytes."""
        if "upload_id" in request.query_params:
            return await self._upload_chunk(request, request.query_params["upload_id"])
        try:
            self._check_key(request)
            protocol = request.headers.get("x-goog-upload-protocol", "").strip().lower()
            command = request.headers.get("x-goog-upload-command", "").strip().lower()
            if protocol != "resumable" or command != "start":
                raise _invalid(
                    "The emulator takes resumable uploads: send X-Goog-Upload-Protocol: resumable "
                    "and X-Goog-Upload-Command: start, then the bytes to the X-Goog-Upload-URL "
                    "answered."
                )
            raw = await _read_body(request)
            session_id = self.files.start(
                load_body(raw) if raw.strip() else {},
                request.headers.get("x-goog-upload-header-content-length"),
                request.headers.get("x-goog-upload-header-content-type"),
            )
        except ErrorAnswer as err:
            return _google_error(err)
        url = f"{request.base_url}upload/{_version(request)}/files?upload_id={session_id}&upload_protocol=resumable"
        return Response(
            status_code=200,
            headers={
                "x-goog-upload-url": url,
                "x-goog-upload-control-url": url,
                "x-goog-upload-status": "active",
                "x-goog-upload-chunk-granularity": str(CHUNK_GRANULARITY),
            },
        )

    async def _upload_chunk(self, request: Request, session_id: str) -> Response:
        """``upload`` (bytes at ``X-Goog-Upload-Offset``), ``finalize`` or ``query``. Every
        answer says ``X-Goog-Upload-Status``; an error is ``final`` and ends the session."""
        commands = {c.strip() for c in request.headers.get("x-goog-upload-command", "").lower().split(",")} - {""}
        try:
            session = self.files.session(session_id)
            if commands == {"query"}:
                return _upload_status("active", session.received)
            if not commands or not commands <= {"upload", "finalize"}:
                raise _invalid("X-Goog-Upload-Command must be upload, finalize, 'upload, finalize' or query.")
            if "upload" in commands:
                offset = request.headers.get("x-goog-upload-offset", "").strip()
                if offset != str(session.received):
                    raise _invalid(
                        f"Invalid X-Goog-Upload-Offset {offset!r}: the session has received {session.received} bytes."
                    )
                space, too_much = self.files.room(session)
                self.files.append(session, await _read_body(request, space, too_much))
            if "finalize" not in commands:
                return _upload_status("active", session.received)
            # Deriving the media reads the whole file (Pillow, the PDF's pages): not on the loop.
            file = await run_in_threadpool(
                self.files.finish, session_id, session, f"{request.base_url}{_version(request)}/"
            )
            self.stats.uploads += 1
        except ErrorAnswer as err:
            self.files.drop(session_id)
            response = _google_error(err)
            response.headers["x-goog-upload-status"] = "final"
            return response
        return _json_response({"file": file}, headers={"x-goog-upload-status": "final"})

    async def _file(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        try:
            self._check_key(request)
            if ":" in file_id:  # files/{id}:download serves generated files only
                raise ErrorAnswer(404, "Method not found.")
            if request.method == "GET":
                return _json_response(self.files.get(file_id))
            return _json_response(self.files.delete(file_id))
        except ErrorAnswer as err:
            return _google_error(err)

    async def _file_list(self, request: Request) -> Response:
        try:
            self._check_key(request)
            query = request.query_params
            return _json_response(self.files.list(query.get("pageSize"), query.get("pageToken")))
        except ErrorAnswer as err:
            return _google_error(err)

    # --- context caching (see gemframe.emulator.caches) -----------------------------------

    async def _caches(self, request: Request) -> Response:
        try:
            self._check_key(request)
            if request.method == "GET":
                query = request.query_params
                return _json_response(self.caches.list(query.get("pageSize"), query.get("pageToken")))
            raw = await _read_body(request)
            version = _version(request)

            def check_model(model: str) -> None:
                if self.models is not None and not model_known(model, self.models):
                    raise ErrorAnswer(404, model_not_found(model, "createCachedContent", version))

            cache = self.caches.create(load_body(raw), len(raw), check_model, self.files.resolve)
            return _json_response(cache)
        except ErrorAnswer as err:
            return _google_error(err)

    async def _cache(self, request: Request) -> Response:
        cache_id = request.path_params["cache_id"]
        try:
            self._check_key(request)
            if request.method == "GET":
                return _json_response(self.caches.get(cache_id))
            if request.method == "PATCH":
                body = load_body(await _read_body(request))
                return _json_response(self.caches.update(cache_id, body))
            return _json_response(self.caches.delete(cache_id))
        except ErrorAnswer as err:
            return _google_error(err)

    async def _segmind(self, request: Request) -> Response:
        return await self._generate(request, request.path_params["slug"], segmind=True)

    async def _generate(self, request: Request, model: str, segmind: bool) -> Response:
        """One generate call: count it, delay it, then answer or fail as configured."""
        stats = self.stats
        try:
            raw = await _read_body(request)
        except ErrorAnswer as err:  # refused unread, as a frontend does: no body to count
            stats.requests += 1
            return _segmind_error(err) if segmind else _google_error(err)
        digest = hashlib.sha256(raw).hexdigest()
        stats.requests += 1
        stats.by_body[digest] += 1
        attempt = stats.by_body[digest]
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            await self._delay(digest)
            if segmind:
                body = self._admit_segmind(request, raw, model)
            else:
                body = self._admit_google(request, raw, model, "generateContent")
            req = self._parse(body, model)
            if attempt <= self.fail_first:
                raise _failure(self.fail_status, self.retry_after)
            markers = req.markers
            if "sleep" in markers:
                await asyncio.sleep(float(markers["sleep"]))
            status = markers.get("status", "")
            if status.isdigit() and 400 <= int(status) <= 599:
                raise _failure(int(status), self.retry_after)
            if req.config.image:
                # Drawing and encoding images is Pillow work of milliseconds to seconds: done on
                # the event loop it would stall every other request until it is finished.
                return _json_response(await run_in_threadpool(build_reply, req, model, digest))
            return _json_response(build_reply(req, model, digest))
        except ErrorAnswer as err:
            return _segmind_error(err) if segmind else _google_error(err)
        finally:
            stats.in_flight -= 1

    async def _delay(self, digest: str) -> None:
        """latency plus a per-body jitter: deterministic, so timing tests are repeatable."""
        delay = self.latency
        if self.jitter:
            delay += random.Random(f"{self.seed}:{digest}").uniform(0, self.jitter)
        if delay > 0:
            await asyncio.sleep(delay)

    def _admit_google(self, request: Request, raw: bytes, model: str, action: str) -> dict[str, Any]:
        """Google's checks before the body: key, model; then the JSON object. (Size is checked
        while reading it: `_read_body`.)"""
        self._check_key(request)
        if self.models is not None and not model_known(model, self.models):
            raise ErrorAnswer(404, model_not_found(model, action, _version(request)))
        return load_body(raw)

    def _check_key(self, request: Request) -> None:
        if self.api_key is not None:
            key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
            if not key:
                raise ErrorAnswer(403, UNREGISTERED_CALLER)
            if key != self.api_key:
                raise ErrorAnswer(400, INVALID_KEY, INVALID_KEY_DETAILS)

    def _admit_segmind(self, request: Request, raw: bytes, slug: str) -> dict[str, Any]:
        """Segmind's gateway checks: key, slug, content type; then unwrap ``messages``."""
        if self.api_key is not None:
            key = request.headers.get("x-api-key") or _bearer(request.headers.get("authorization"))
            if not key:
                raise ErrorAnswer(401, "Missing Authorization or x-api-key in header")
            if key != self.api_key:
                raise ErrorAnswer(401, "Unauthorized. API key is invalid or may have expired.")
        if not slug.startswith("gemini"):
            raise ErrorAnswer(404, "Model not found")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ErrorAnswer(406, "Content-Type must be application/json")
        return _unwrap_segmind(load_body(raw))

    async def _stats(self, request: Request) -> Response:
        return _json_response(self.stats.as_json())

    async def _reset(self, request: Request) -> Response:
        self.reset_stats()
        return _json_response(self.stats.as_json())


def serve(emu: Emulator, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the emulator over TCP until interrupted (blocking)."""
    import uvicorn

    uvicorn.run(emu, host=host, port=port, access_log=False)
