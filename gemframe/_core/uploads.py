"""Media through the Files API: uploaded once, named by ``fileData`` in every row that uses it.

A reference image shared by 1,000 rows is sent inline 1,000 times (a 5 MB PNG: ~6.7 GB of base64
request bodies); uploaded once and named by its ``fileUri``, it is ~5 MB plus 1,000 small
bodies. `Client(upload=...)` says when:

- ``"auto"`` (default): media shared by two or more requests of a call (the same bytes, by
  digest) of at least `SHARED_MIN_BYTES`; media already uploaded (a live file of an earlier
  call, remembered in the upload store) of that size; and whatever media would push a request
  over the inline limit (`payload.INLINE_LIMIT`), biggest first.
- ``"always"``: every media part of every request sent.
- ``"never"``: everything inline, as before (a request over the limit is its row's error).

A local file over the inline limit (up to the Files API's 2 GB, `payload.FILES_LIMIT`) is never
read into memory: the row carries a `payload.LocalFile` (its MIME type and the digest its base64
would have inline, computed streaming), and it is uploaded from disk a chunk at a time
(`_FileBody`), after checking it is still the file that was read. It always goes by file; a call
that cannot upload (no Files API, ``"never"``, Batch Mode) makes it the row's error.

Only providers declaring the ``"files"`` capability (Google, the emulator) upload; the others
(Segmind) send media inline whatever the option says. Batch Mode sends media inline too: its
requests are read up to a day later, when a file that went missing could not be sent again.

The cache key of a row is unchanged: it is computed from the request with its media inline (by
the data's digest) before any part is swapped for a file, so an answer cached inline is a hit
when the media would go by file, and the other way round.

How (`CallFiles`, one per `Client.send` call): the uploads a batch of rows needs start on the
executor's loop over its pooled session (`Executor.run_many`), at most `_CONCURRENCY` at a
time, and the batch is admitted when they are done (answers arriving meanwhile are stored).
Each upload is the resumable protocol the API documents (``start``, then ``upload, finalize``),
tried again from the start on a transient fault, then polled while the file is ``PROCESSING``
(bounded by the row deadline); ``FAILED`` is the error of the rows that use the file. The
session URL the server answers must be on the base URL's origin: the key travels only there.
Uploaded files are remembered in the upload store (`cache.files`: by origin, key fingerprint and
digest, until 48 h less a margin); a generate answer saying a file does not exist (deleted,
expired early) makes the call forget it, upload it again and send that row again, once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import functools
import os
import queue
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import orjson

from .._errors import AuthenticationError, InputError, RowError, exception_text
from .cache import files as file_store
from .cache.files import FILE_TTL, FileRecord, UploadStore, origin_of, scope_of
from .cache.key import KnownDigest, _data_digest
from .executor import _CALL_ATTEMPTS, _json_object, take_all
from .http import AiohttpSession, Body, HttpxSession, Reply, TransportFailure, redact_url
from .payload import INLINE_LIMIT, LocalFile, open_regular
from .providers import MISSING_FILE, Failure, FilesCapable, Provider

UPLOAD_MODES = ("auto", "always", "never")
# Shared media smaller than this stays inline under "auto". An upload costs two round trips
# (three with a poll) once and leaves state on the server (a file that expires, per key); inline
# costs the bytes on every row. At 256 kB a shared image adds ~340 kB of base64 per row, ~0.03 s
# at 100 Mbit/s beside answers that take seconds: below that, inline is as fast and simpler.
SHARED_MIN_BYTES = 256 * 1024
# Inline media that leaves this much room under the limit for the rest of the request (text,
# history, JSON) is not moved to a file for size alone.
_INLINE_ROOM = INLINE_LIMIT - 2**16
_CONCURRENCY = 4  # uploads at once per call: each is megabytes, beside the generate requests
_POLL_CAP = 10.0  # seconds between polls of a PROCESSING file, at most
_NAME = re.compile(r"files/[a-z0-9-]{1,40}")
# A local file over the inline limit (`payload.LocalFile`) is streamed from disk in chunks of
# this size, each read on a worker thread: memory stays at a few chunks whatever the file's size.
_FILE_CHUNK = 2**20
# Its upload may take longer than the client's timeout (2 GB at 100 Mbit/s: ~3 minutes): it gets
# the timeout plus its size at this rate (an upload slower than 512 kB/s times out).
_SLOWEST = 2**19
_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.\d+)?Z")


def check_mode(upload: str) -> str:
    if upload not in UPLOAD_MODES:
        raise ValueError(f"upload must be one of {', '.join(map(repr, UPLOAD_MODES))}, not {upload!r}")
    return upload


def uploads_media(provider: Provider, upload: str) -> bool:
    """Whether a call with this provider and option may upload media (Batch Mode aside)."""
    return upload != "never" and "files" in provider.capabilities


@dataclass
class _Media:
    """One media part of a request: its MIME type, size in bytes, and base64 text (None for an
    image URL's stored image, whose bytes are in the URL store, and for a local file over the
    inline limit, ``file``, uploaded from disk)."""

    mime: str
    size: int
    data: str | None
    file: LocalFile | None = None


def _encoded_size(size: int) -> int:
    return 4 * ((size + 2) // 3)


def _media(body: Mapping[str, Any], min_size: int) -> dict[str, _Media]:
    """The media of a request of at least ``min_size`` bytes (and its local files over the
    inline limit, whatever their size), by digest (the cache key's)."""
    found: dict[str, _Media] = {}
    for content in body.get("contents") or ():
        for part in content.get("parts") or ():
            inline = part.get("inlineData")
            if not isinstance(inline, dict) or not isinstance(inline.get("mimeType"), str):
                continue
            if isinstance(inline, KnownDigest):
                file = inline if isinstance(inline, LocalFile) else None
                if inline.size >= min_size or file is not None:  # a LocalFile can only go by file
                    found.setdefault(inline.digest, _Media(inline["mimeType"], inline.size, None, file))
                continue
            data = inline.get("data")
            if isinstance(data, str) and len(data) * 3 // 4 >= min_size:
                found.setdefault(_data_digest(data), _Media(inline["mimeType"], len(data) * 3 // 4, data))
    return found


def with_files(body: dict[str, Any], files: Mapping[str, FileRecord]) -> dict[str, Any]:
    """The body with each media part that has a file in ``files`` (by digest) named by it
    (``fileData``) instead of carried inline; only what changes is copied."""
    lengths = {_encoded_size(r.size) for r in files.values()}  # cheap test before hashing

    def as_file(part: dict[str, Any]) -> dict[str, Any]:
        inline = part.get("inlineData")
        if not isinstance(inline, dict):
            return part
        if isinstance(inline, KnownDigest):
            digest: str | None = inline.digest
        else:
            data = inline.get("data")
            digest = _data_digest(data) if isinstance(data, str) and len(data) in lengths else None
        record = files.get(digest) if digest is not None else None
        if record is None:
            return part
        rest = {k: v for k, v in part.items() if k != "inlineData"}  # a thoughtSignature stays
        return {**rest, "fileData": {"mimeType": inline.get("mimeType") or record.mime, "fileUri": record.uri}}

    contents = []
    for content in body["contents"]:
        parts = content.get("parts") or ()
        new = [as_file(part) for part in parts]
        changed = any(a is not b for a, b in zip(new, parts))
        contents.append({**content, "parts": new} if changed else content)
    return {**body, "contents": contents}


# --------------------------------------------------------------------------- the upload itself


class UploadFailed(Exception):
    """An upload that did not give an ACTIVE file: the message for the rows that need it, and
    the failure when the API refused the key (which ends the call, as a generate answer would)."""

    def __init__(self, message: str, fatal: Failure | None = None) -> None:
        super().__init__(message)
        self.message, self.fatal = message, fatal


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


def _refused(provider: Provider, reply: Reply, doing: str) -> Exception:
    """A non-200 answer as the exception to raise: transient ones are tried again."""
    failure = provider.failure(reply)
    message = f"{doing}: HTTP {failure.code} {failure.status}: {failure.message}".rstrip(": ")
    if failure.retryable:
        return _Transient(message, failure.retry_after)
    fatal = failure if failure.fatal is AuthenticationError else None  # a refused key: every request would be
    return UploadFailed(message, fatal)


async def _request(
    session: AiohttpSession | HttpxSession,
    method: str,
    url: str,
    content: Body = None,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> Reply:
    try:
        return await session.request(method, url, content, headers, timeout)
    except TransportFailure as exc:
        raise _Transient(f"the Files API did not answer ({exc.status}: {exc.message})") from None


def _size(data: bytes | LocalFile) -> int:
    return data.size if isinstance(data, LocalFile) else len(data)


class _FileBody:
    """A `LocalFile` as an upload body: opened (a regular file, as `payload.open_regular` says)
    and checked to be the file that was read (size, mtime, inode), then read a chunk at a time
    on a worker thread as the body is sent. A file changed since its digest was computed is
    refused before a byte is sent; one that changes while it is sent stops before its last
    chunk (so no file is created from it): ``problem`` says so."""

    def __init__(self, file: LocalFile) -> None:
        self.file = file
        self.problem: str | None = None
        try:
            self.f, info = open_regular(file.path)
        except (OSError, InputError) as exc:
            raise UploadFailed(f"{file.where()} cannot be read to upload it: {exception_text(exc)}") from None
        if file.changed(info):
            self.f.close()
            raise UploadFailed(self._changed())

    def _changed(self) -> str:
        return (
            f"{self.file.where()} changed after gemframe read it (its size, time or inode differ), so its "
            "digest no longer names it and nothing was sent; run again to read it again"
        )

    async def chunks(self) -> AsyncIterator[bytes]:
        left = self.file.size
        while left:
            chunk = await asyncio.to_thread(self.read, min(_FILE_CHUNK, left))
            left -= len(chunk)
            if not chunk or (not left and self.file.changed(os.fstat(self.f.fileno()))):
                self.problem = self._changed()
                raise UploadFailed(self.problem)  # the body ends short: the server makes no file of it
            yield chunk

    def read(self, size: int) -> bytes:
        """The next chunk (on a worker thread: the loop never waits on a disk)."""
        return self.f.read(size)

    def close(self) -> None:
        self.f.close()


async def _upload_once(
    session: AiohttpSession | HttpxSession, provider: Provider, data: bytes | LocalFile, mime: str, display: str
) -> dict[str, Any]:
    """One resumable upload, start to finalize: the File resource answered. A `LocalFile` is
    streamed from disk (`_FileBody`), never held whole."""
    files = cast(FilesCapable, provider)
    body = _FileBody(data) if isinstance(data, LocalFile) else None
    try:
        return await _start_and_send(session, provider, files, data, body, mime, display)
    except Exception:
        if body is not None and body.problem is not None:  # however the session library reported it
            raise UploadFailed(body.problem) from None
        raise
    finally:
        if body is not None:
            body.close()


async def _start_and_send(
    session: AiohttpSession | HttpxSession,
    provider: Provider,
    files: FilesCapable,
    data: bytes | LocalFile,
    body: _FileBody | None,
    mime: str,
    display: str,
) -> dict[str, Any]:
    size = _size(data)
    start = await _request(
        session,
        "POST",
        files.upload_url(),
        orjson.dumps({"file": {"displayName": display}}),
        {
            "X-Goog-Upload-Protocol": "resumable",
            "X-Goog-Upload-Command": "start",
            "X-Goog-Upload-Header-Content-Length": str(size),
            "X-Goog-Upload-Header-Content-Type": mime,
        },
    )
    if start.status_code != 200:
        raise _refused(provider, start, "starting the upload")
    url = start.headers.get("x-goog-upload-url")
    if not url:
        raise UploadFailed("the Files API answered the start of an upload without an X-Goog-Upload-URL")
    if origin_of(url) != origin_of(provider.base_url):
        raise UploadFailed(
            f"the Files API answered an upload URL on another origin ({redact_url(origin_of(url))[:200]}) "
            f"than base_url ({provider.display_base_url}); gemframe sends the key only to base_url's "
            "origin, so nothing was sent there. Check base_url (a proxy in front of the API must "
            "answer upload URLs on its own origin), or use upload='never' to send media inline"
        )
    headers = {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0", "Content-Type": mime}
    if body is not None:  # streamed: its length said (not chunked), and time to send it
        headers["Content-Length"] = str(size)
        done = await _request(session, "POST", url, body.chunks(), headers, session.timeout + size / _SLOWEST)
    else:
        done = await _request(session, "POST", url, cast(bytes, data), headers)
    if done.status_code != 200:
        raise _refused(provider, done, "uploading")
    answer = _json_object(done.content) or {}
    file = answer.get("file")
    if not isinstance(file, dict) or not _NAME.fullmatch(str(file.get("name"))) or not isinstance(file.get("uri"), str):
        raise UploadFailed(f"the Files API's answer to an upload is not a file: {done.content[:120]!r}")
    return file


async def _active(
    session: AiohttpSession | HttpxSession, provider: Provider, file: dict[str, Any], delay: float, until: float
) -> dict[str, Any]:
    """The file once it has left PROCESSING (polled with a doubling wait, until ``until`` on the
    monotonic clock); FAILED, or still processing then, raises."""
    name = file["name"]
    while file.get("state") == "PROCESSING":
        if time.monotonic() + delay > until:
            raise UploadFailed(f"the Files API was still processing the uploaded file {name} at the row deadline")
        await asyncio.sleep(delay)
        delay = min(delay * 2, _POLL_CAP)
        try:
            reply = await _request(session, "GET", cast(FilesCapable, provider).file_url(name))
        except _Transient:
            continue
        if reply.status_code != 200:
            refused = _refused(provider, reply, f"polling the uploaded file {name}")
            if isinstance(refused, _Transient):
                continue
            raise refused
        polled = _json_object(reply.content)
        if polled is None or polled.get("name") != name:
            raise UploadFailed(f"the Files API's answer for {name} is not that file: {reply.content[:120]!r}")
        file = {**polled, "uri": file["uri"]} if not isinstance(polled.get("uri"), str) else polled
    state = file.get("state") or "ACTIVE"
    if state == "FAILED":
        error = file.get("error")
        why = str(error.get("message") or "") if isinstance(error, dict) else ""
        raise UploadFailed(f"the Files API could not process the uploaded file {name}: {why or 'state FAILED'}")
    if state != "ACTIVE":
        raise UploadFailed(f"the uploaded file {name} is in state {str(state)[:40]}, not ACTIVE")
    return file


def _epoch(text: Any) -> float | None:
    """Epoch seconds of an RFC 3339 UTC time as the API writes them, or None."""
    found = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    return float(calendar.timegm(tuple(map(int, found.groups())))) if found else None


async def upload_file(
    session: AiohttpSession | HttpxSession,
    *,
    provider: Provider,
    data: bytes | LocalFile,
    mime: str,
    display: str,
    retry: Any,
    slots: Callable[[], asyncio.Semaphore],
) -> FileRecord:
    """Upload ``data`` (bytes, or a `LocalFile` streamed from disk) and wait until the file is
    ACTIVE: its record. Transient faults (429,
    5xx, a dropped connection, a timeout) start the upload again, within ``retry``'s attempts
    and deadline; anything else raises `UploadFailed`."""
    started, wall = time.monotonic(), file_store.now()
    attempts = retry.max_attempts or _CALL_ATTEMPTS
    attempt = 0
    while True:
        attempt += 1
        try:
            async with slots():
                file = await _upload_once(session, provider, data, mime, display)
            break
        except _Transient as exc:
            delay = retry.delay(attempt, exc.retry_after)
            if attempt >= attempts or time.monotonic() - started + delay > retry.deadline:
                raise UploadFailed(f"{exc.message} (tried {attempt} times)") from None
            await asyncio.sleep(delay)
    file = await _active(session, provider, file, max(retry.backoff_base, 0.01), started + retry.deadline)
    # The TTL the server gives (expiration - creation), counted on this machine's clock from
    # before the upload started: right whatever the two clocks say, and never late.
    created, expires = _epoch(file.get("createTime")), _epoch(file.get("expirationTime"))
    ttl = min(max(expires - created, 0.0), FILE_TTL) if created is not None and expires is not None else FILE_TTL
    return FileRecord(file["name"], file["uri"], mime, _size(data), wall, wall + ttl)


# --------------------------------------------------------------------------- one call's files


class CallFiles:
    """The Files API side of one `Client.send` call (see the module docstring).

    ``store()`` opens the upload store on first need; None (``cache="off"``): the call keeps its
    files in a scratch store of its own, removed by `close`. ``encoded_image(digest)``: the base64 text of an image URL's stored
    image (the URL store), for uploading one."""

    def __init__(
        self,
        executor: Any,
        provider: Provider,
        store: Callable[[], UploadStore] | None,
        mode: str,
        encoded_image: Callable[[str], str | None],
    ) -> None:
        self.executor, self.provider, self.mode = executor, provider, mode
        self._open_store = store
        self._store: UploadStore | None = None
        self.scope = scope_of(origin_of(provider.base_url), provider.secret)
        self.encoded_image = encoded_image
        self.users: Counter[str] = Counter()  # digest -> distinct requests of the call carrying it
        self.ready: dict[str, FileRecord] = {}  # digest -> its live file
        self.failed: dict[str, str] = {}  # digest -> why it could not be uploaded
        self.uploading: set[str] = set()
        self.done: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.sent: dict[str, tuple[dict[str, Any], dict[str, FileRecord]]] = {}  # key in flight -> (body, files)
        self.resent: set[str] = set()  # keys sent again after a file went missing (once each)
        self.uploads = 0  # files this call uploaded
        self._slots: asyncio.Semaphore | None = None

    @property
    def store(self) -> UploadStore:
        if self._store is None:
            opened = self._open_store
            self._store = opened() if opened is not None else UploadStore(tempfile.mkdtemp(prefix="gemframe-files-"))
        return self._store

    def _semaphore(self) -> asyncio.Semaphore:  # made on the loop, on first use
        if self._slots is None:
            self._slots = asyncio.Semaphore(_CONCURRENCY)
        return self._slots

    def prepare(
        self, fresh: Mapping[str, tuple[dict[str, Any], int]], collect: Callable[..., None]
    ) -> dict[str, dict[str, FileRecord] | str]:
        """The files each request about to be sent names (key -> digest -> file), or why they
        could not be uploaded; requests sent fully inline are left out. Starts the uploads
        needed and waits for them, collecting answers (``collect(block=False)``) meanwhile."""
        plans: dict[str, dict[str, _Media]] = {}
        for key, (body, size) in fresh.items():
            if not size:
                continue
            small = 0 if self.mode == "always" or size > _INLINE_ROOM else SHARED_MIN_BYTES
            media = _media(body, small)
            if media:
                self.users.update(media.keys())
                plans[key] = media
        if not plans:
            return {}
        for digest, record in list(self.ready.items()):
            if not record.live():
                del self.ready[digest]
        unknown = {d for media in plans.values() for d in media} - self.ready.keys() - self.failed.keys()
        if unknown - self.uploading:  # files of earlier calls
            self.ready.update(self.store.lookup(self.scope, unknown - self.uploading))
        chosen = {key: pick for key, media in plans.items() if (pick := self._choose(media))}
        needed = {d: m for pick in chosen.values() for d, m in pick.items()}
        self._start(needed)
        while self.uploading & needed.keys():
            self._take(block=True)
            collect(block=False)  # answers that arrived meanwhile: stored as they come
        return {key: self._files(pick) for key, pick in chosen.items()}

    def _choose(self, media: dict[str, _Media]) -> dict[str, _Media]:
        """Which media of one request go by file (its `LocalFile`s always: they are never read
        into memory)."""
        if self.mode == "always":
            return media
        pick = {
            d: m
            for d, m in media.items()
            if m.file is not None or (m.size >= SHARED_MIN_BYTES and (self.users[d] >= 2 or d in self.ready))
        }
        inline = sorted(((m.size, d) for d, m in media.items() if d not in pick), reverse=True)
        total = sum(_encoded_size(size) for size, _ in inline)
        for size, digest in inline:  # over the limit: the biggest go by file until it fits
            if total <= _INLINE_ROOM:
                break
            pick[digest] = media[digest]
            total -= _encoded_size(size)
        return pick

    def _files(self, pick: Mapping[str, _Media]) -> dict[str, FileRecord] | str:
        problem = next((self.failed[d] for d in pick if d in self.failed), None)
        return problem if problem is not None else {d: self.ready[d] for d in pick}

    def _start(self, media: Mapping[str, _Media]) -> None:
        """Start uploading the media that have no file, are not being uploaded, and have not
        failed in this call."""
        jobs = []
        for digest, item in media.items():
            if digest in self.ready or digest in self.uploading or digest in self.failed:
                continue
            data: bytes | LocalFile
            if item.file is not None:  # streamed from disk by the upload
                data = item.file
            else:
                encoded = item.data if item.data is not None else self.encoded_image(digest)
                try:
                    if encoded is None:
                        raise ValueError(
                            "the stored image is missing or damaged; cache='refresh' fetches the URL again"
                        )
                    data = base64.b64decode(encoded, validate=True)
                except (ValueError, binascii.Error) as exc:
                    self.failed[digest] = f"its {item.mime} media could not be read for upload: {exception_text(exc)}"
                    continue
            self.uploading.add(digest)
            job = functools.partial(
                upload_file,
                provider=self.provider,
                data=data,
                mime=item.mime,
                display=f"gemframe {digest[7:23]}",
                retry=self.executor.retry,
                slots=self._semaphore,
            )
            jobs.append((digest, job))
        if jobs:
            self.executor.run_many(jobs, self.done)

    def _take(self, block: bool) -> None:
        """Note finished uploads (waiting for one if asked): each file is remembered in the
        store; a refused key ends the call (`UploadFailed.fatal`)."""
        finished = take_all(self.done, block)
        fatal: Failure | None = None
        for digest, task in finished:
            self.uploading.discard(digest)
            exc = None if task.cancelled() else task.exception()
            if task.cancelled():
                self.failed[digest] = "its upload to the Files API was cancelled"
            elif isinstance(exc, UploadFailed):
                self.failed[digest] = f"uploading its media to the Files API failed: {exc.message}"
                fatal = fatal or exc.fatal
            elif exc is not None:
                self.failed[digest] = f"uploading its media to the Files API raised {exception_text(exc)}"
            else:
                record: FileRecord = task.result()
                self.ready[digest] = record
                self.uploads += 1
                self.store.put(self.scope, digest, record)
        if fatal is not None:
            raise fatal.as_api_error()

    def note_sent(self, key: str, body: dict[str, Any], files: dict[str, FileRecord]) -> None:
        """A request naming ``files`` was sent for ``key`` (``body``: with its media inline)."""
        self.sent[key] = (body, files)

    def named(self, key: str) -> dict[str, FileRecord] | None:
        """The files the request in flight for ``key`` names, if any."""
        entry = self.sent.get(key)
        return entry[1] if entry is not None else None

    def finished(self, key: str, error: RowError | None) -> tuple[dict[str, Any], dict[str, FileRecord]] | str | None:
        """What to do with a finished request: None (nothing: answer it as it is), the body and
        files to send again (the API said a file it names does not exist: forgotten, uploaded
        again; once per row), or the row's error when that upload failed."""
        entry = self.sent.pop(key, None)
        if entry is None or error is None or error.code != 403 or key in self.resent:
            return None
        found = MISSING_FILE.search(error.message)
        body, files = entry
        gone = {d for d, r in files.items() if found is not None and r.name == f"files/{found.group(1)}"}
        if not gone:
            return None
        self.resent.add(key)
        for digest in gone:
            current = self.ready.get(digest)
            if current is not None and current.name == files[digest].name:  # not replaced yet
                del self.ready[digest]
                self.store.forget(self.scope, digest, current.name)
        media = _media(body, 0)
        self._start({d: media[d] for d in files if d in media})
        while self.uploading & files.keys():
            self._take(block=True)
        again = self._files({d: media[d] for d in files if d in media})
        return again if isinstance(again, str) else (body, again)

    def close(self) -> None:
        """Cancel uploads still running; a scratch store is removed."""
        self.executor.cancel(self.done)
        if self._open_store is None and self._store is not None:
            self._store.close()
            shutil.rmtree(self._store.directory, ignore_errors=True)
