"""The emulator's Files API: resumable uploads to ``upload/v1beta/files``, ``files/{id}``
get/list/delete, expiry 48 hours after upload, and the ``fileData`` parts of a request resolved
against the stored files, in the real API's shapes (those the official ``google-genai`` SDK's
``client.files.upload/get/list/delete`` send and read).

Upload (the resumable protocol the SDK speaks)::

    POST /upload/v1beta/files            X-Goog-Upload-Protocol: resumable
                                         X-Goog-Upload-Command: start
                                         X-Goog-Upload-Header-Content-Length: <size>
                                         X-Goog-Upload-Header-Content-Type: <mime>
        {"file": {"displayName": ...}}   -> 200, X-Goog-Upload-URL: <session url>
    POST <session url>                   X-Goog-Upload-Command: upload[, finalize] (or query)
                                         X-Goog-Upload-Offset: <bytes sent so far>
        <bytes>                          -> X-Goog-Upload-Status: active (more to come)
                                            or final with {"file": {...}}

Every answer to a session URL carries ``X-Goog-Upload-Status`` (the SDK retries an answer
without one); an error ends the session (``final``) and frees its bytes.

Only what an answer needs is kept: a file's derived `Media` (the image's bytes for images, which
image replies edit; the token count for PDFs, text and the rest), not its bytes. Sizes count
against ``max_bytes`` (a file) and ``total_bytes`` (stored files plus sessions in progress), and
no read ever buffers past them: see ``room``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .timefmt import rfc3339
from .validation import (
    IMAGE_INPUT_TOKENS,
    UNPROCESSABLE_IMAGE,
    ErrorAnswer,
    GenRequest,
    Media,
    Turn,
    _fields,
    _invalid,
    av_media,
    media_of,
    tokens,
)

FILE_TTL = 48 * 3600  # the API deletes a file 48 hours after its upload
FILE_MAX_BYTES = 2 * 1024**3  # the API's limit per file
# The API allows 20 GB a project; the emulator holds what it keeps in memory, so less by default.
FILES_TOTAL_BYTES = 2 * 1024**3
MAX_SESSIONS = 100  # open upload sessions; starting one more drops the oldest
CHUNK_GRANULARITY = 8 * 1024 * 1024
PAGE_SIZE, MAX_PAGE_SIZE = 10, 100  # files.list: the API's default and maximum pageSize
STATES = ("ACTIVE", "FAILED")  # what a file ends in after PROCESSING (the ``file_outcome`` knob)

FILE_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")  # the API's rule for a file id
FILE_URI = re.compile(r"(?:^|/)files/([a-z0-9-]+)$")  # a fileUri naming a Files API file
FILE_FIELDS = frozenset({"name", "display_name", "mime_type", "size_bytes"})


def missing(file_id: str) -> ErrorAnswer:
    """The API's answer for a file that does not exist (any more), or is not the caller's."""
    return ErrorAnswer(403, f"You do not have permission to access the File {file_id} or it may not exist.")


def not_active(file_id: str) -> ErrorAnswer:
    return ErrorAnswer(
        400,
        f"The File {file_id} is not in an ACTIVE state and usage is not allowed.",
        status="FAILED_PRECONDITION",
    )


def file_too_large(limit: int) -> ErrorAnswer:
    return ErrorAnswer(413, f"File size exceeds the limit: {limit} bytes.")


def storage_full(limit: int) -> ErrorAnswer:
    return ErrorAnswer(
        413,
        f"Files storage limit exceeded: at most {limit} bytes of files may be stored at "
        "once. Delete files (or let them expire) and upload again.",
    )


def file_media(data: bytes, mime: str) -> Media | None:
    """What a fileData part naming this file counts and shows, by the inline-data rule (video
    and audio by `av_media`); text counts its characters; the rest 258 tokens. None: an image,
    PDF, video or audio file the emulator cannot read, which a request then fails on as it
    fails on such inline data."""
    media = media_of(data)
    if media is not None:
        return media
    family = mime.split("/")[0].lower()
    if family in ("audio", "video"):
        return av_media(data, mime)
    if family == "image" or mime == "application/pdf":
        return None
    if family == "text" or mime in ("application/json", "application/xml"):
        text = data.decode("utf-8", "replace")
        return Media("File", f"{mime}, {len(data)} bytes", tokens(text), "TEXT")
    return Media("File", f"{mime}, {len(data)} bytes", IMAGE_INPUT_TOKENS, "DOCUMENT")


@dataclass
class StoredFile:
    name: str  # files/<id>
    display_name: str
    mime: str
    size: int
    sha256: str  # hex
    created: float
    uri: str
    media: Media | None
    gets: int = 0  # files.get calls so far: PROCESSING until ``polls`` of them


@dataclass
class Session:
    """An upload in progress: the bytes so far, held until finalize."""

    name: str | None  # the file name asked for, if any
    display_name: str
    mime: str
    declared: int | None  # X-Goog-Upload-Header-Content-Length
    chunks: list[bytes] = field(default_factory=list)
    received: int = 0


class FileStore:
    """Uploaded files of one emulator, on an injectable clock (``clock()`` -> epoch seconds)."""

    def __init__(
        self,
        clock: Callable[[], float],
        max_bytes: int = FILE_MAX_BYTES,
        total_bytes: int = FILES_TOTAL_BYTES,
        polls: int = 0,
        outcome: str = "ACTIVE",
    ) -> None:
        self.clock = clock
        self.max_bytes = max_bytes
        self.total_bytes = total_bytes
        if outcome not in STATES:
            raise ValueError(f"file_outcome must be one of {STATES}, not {outcome!r}")
        self.polls = polls  # gets a new file answers PROCESSING to (0: ACTIVE at once)
        self.outcome = outcome  # ACTIVE, or FAILED to test that path
        self.files: dict[str, StoredFile] = {}
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.uploads = 0  # files created so far: part of new ids, so ids never repeat
        # Calls come from the event loop and (batch jobs resolving fileData) worker threads.
        self.lock = threading.RLock()

    # --- upload -------------------------------------------------------------------------

    def start(self, body: dict[str, Any], length: str | None, mime: str | None) -> str:
        """Open an upload session for ``{"file": {...}}`` and the X-Goog-Upload-Header-*
        values; return its id. A declared size over a limit is refused here, before any byte."""
        meta = body.get("file") if body else {}
        unknown = [key for key in body if key != "file"]
        if unknown:
            raise _invalid(f'Invalid JSON payload received. Unknown name "{unknown[0]}": Cannot find field.')
        meta = _fields(meta or {}, FILE_FIELDS, "file")
        name = meta.get("name") or None
        if name is not None:
            file_id = str(name).removeprefix("files/")
            if not isinstance(name, str) or not FILE_ID.fullmatch(file_id):
                raise _invalid(
                    f"Invalid file name {name!r}: the id after 'files/' is up to 40 lowercase "
                    "letters, digits or dashes, and does not start or end with a dash."
                )
            name = f"files/{file_id}"
        declared = None
        if length is not None:
            if not length.strip().isdigit():
                raise _invalid(f"Invalid X-Goog-Upload-Header-Content-Length: {length!r}.")
            declared = int(length)
        mime = (mime or meta.get("mime_type") or "").strip()
        if not mime:
            raise _invalid("* File.mime_type: mime_type is not specified\n")
        with self.lock:
            self._purge()
            if name is not None and name in self.files:
                raise ErrorAnswer(409, f"File {name} already exists.")
            if declared is not None:
                if declared > self.max_bytes:
                    raise file_too_large(self.max_bytes)
                if declared > self.total_bytes - self._used():
                    raise storage_full(self.total_bytes)
            session_id = secrets.token_urlsafe(24)  # the session URL is its own credential
            self.sessions[session_id] = Session(name, str(meta.get("display_name") or ""), mime, declared)
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
            return session_id

    def session(self, session_id: str) -> Session:
        with self.lock:
            if session_id not in self.sessions:
                raise ErrorAnswer(404, "Upload session not found (unknown, finished or abandoned).")
            return self.sessions[session_id]

    def drop(self, session_id: str) -> None:
        with self.lock:
            self.sessions.pop(session_id, None)

    def room(self, session: Session) -> tuple[int, ErrorAnswer]:
        """How many more bytes this session may take, and the error for going past that: the
        nearest of the declared size, the per-file limit and what the total leaves free."""
        with self.lock:
            self._purge()
            limits = [
                (self.max_bytes - session.received, file_too_large(self.max_bytes)),
                (self.total_bytes - self._used(), storage_full(self.total_bytes)),
            ]
            if session.declared is not None:
                limits.append(
                    (
                        session.declared - session.received,
                        _invalid(
                            f"Upload exceeds the declared X-Goog-Upload-Header-Content-Length of "
                            f"{session.declared} bytes."
                        ),
                    )
                )
            space, error = min(limits, key=lambda item: item[0])
            return max(space, 0), error

    def append(self, session: Session, data: bytes) -> None:
        with self.lock:
            session.chunks.append(data)
            session.received += len(data)

    def finish(self, session_id: str, session: Session, base_url: str) -> dict[str, Any]:
        """Finalize: the bytes become a file (its media derived, its bytes dropped), its uri
        ``<base_url>files/<id>`` (base_url ends with the API version and a slash)."""
        with self.lock:
            self.sessions.pop(session_id, None)
            if session.declared is not None and session.received != session.declared:
                raise _invalid(
                    f"Upload finalized after {session.received} bytes, but "
                    f"X-Goog-Upload-Header-Content-Length declared {session.declared}."
                )
            data = b"".join(session.chunks)
            session.chunks.clear()
            digest = hashlib.sha256(data).hexdigest()
            name = session.name
            if name is None or name in self.files:
                if name is not None:
                    raise ErrorAnswer(409, f"File {name} already exists.")
                name = self._new_name(digest)
            self.uploads += 1
            stored = StoredFile(
                name,
                session.display_name,
                session.mime,
                len(data),
                digest,
                self.clock(),
                f"{base_url}{name}",
                file_media(data, session.mime),
            )
            self.files[name] = stored
            return self.resource(stored)

    def _new_name(self, digest: str) -> str:
        while True:
            name = f"files/{digest[:8]}{self.uploads:04d}"
            if name not in self.files:
                return name
            self.uploads += 1

    # --- files/{id} ----------------------------------------------------------------------

    def get(self, file_id: str) -> dict[str, Any]:
        with self.lock:
            stored = self._live(file_id)
            stored.gets += 1
            return self.resource(stored)

    def delete(self, file_id: str) -> dict[str, Any]:
        with self.lock:
            self.files.pop(self._live(file_id).name)
            return {}

    def list(self, page_size: str | None, page_token: str | None) -> dict[str, Any]:
        """A page of the live files, oldest first; the token names the last file shown."""
        size = _page_size(page_size, PAGE_SIZE, MAX_PAGE_SIZE)
        with self.lock:
            self._purge()
            names = list(self.files)
            start = _page_start(names, page_token)
            page = names[start : start + size]
            answer: dict[str, Any] = {"files": [self.resource(self.files[n]) for n in page]}
            if start + size < len(names):
                answer["nextPageToken"] = _token(page[-1])
            return answer

    def resource(self, stored: StoredFile) -> dict[str, Any]:
        """The File resource, as the API answers it (sizeBytes is an int64: a JSON string;
        sha256Hash is bytes holding the hex digest: base64 of it)."""
        out: dict[str, Any] = {"name": stored.name}
        if stored.display_name:
            out["displayName"] = stored.display_name
        created = rfc3339(stored.created)
        out.update(
            {
                "mimeType": stored.mime,
                "sizeBytes": str(stored.size),
                "createTime": created,
                "updateTime": created,
                "expirationTime": rfc3339(stored.created + FILE_TTL),
                "sha256Hash": base64.b64encode(stored.sha256.encode()).decode(),
                "uri": stored.uri,
                "state": self.state(stored),
                "source": "UPLOADED",
            }
        )
        if out["state"] == "FAILED":
            out["error"] = {"code": 400, "message": "The file could not be processed."}
        return out

    def state(self, stored: StoredFile) -> str:
        return "PROCESSING" if stored.gets < self.polls else self.outcome

    # --- requests ------------------------------------------------------------------------

    def resolve(self, req: GenRequest) -> GenRequest:
        """Each fileData part naming an uploaded file (``files/<id>``, or a URI ending so)
        takes that file's media; a missing or expired file is the API's 403, one not ACTIVE
        its 400 FAILED_PRECONDITION. Other URIs (a YouTube link) keep their flat count."""
        if not any(p.media and p.media.uri for t in _all_turns(req) for p in t.parts):
            return req
        with self.lock:
            system = self._resolve_turn(req.system) if req.system else None
            turns = tuple(self._resolve_turn(t) for t in req.turns)
        return replace(req, system=system, turns=turns)

    def _resolve_turn(self, turn: Turn) -> Turn:
        parts = []
        for part in turn.parts:
            match = FILE_URI.search(part.media.uri) if part.media and part.media.uri else None
            if match:
                stored = self._live(match.group(1))
                if self.state(stored) != "ACTIVE":
                    raise not_active(match.group(1))
                if stored.media is None:
                    raise _invalid(UNPROCESSABLE_IMAGE)
                part = replace(part, media=stored.media)
            parts.append(part)
        return replace(turn, parts=tuple(parts))

    # --- bookkeeping ---------------------------------------------------------------------

    def _live(self, file_id: str) -> StoredFile:
        self._purge()
        stored = self.files.get(f"files/{file_id.removeprefix('files/')}")
        if stored is None:
            raise missing(file_id.removeprefix("files/"))
        return stored

    def _purge(self) -> None:
        """Forget files past their expiration time, as the API deletes them."""
        now = self.clock()
        for name in [n for n, f in self.files.items() if now >= f.created + FILE_TTL]:
            del self.files[name]

    def _used(self) -> int:
        return sum(f.size for f in self.files.values()) + sum(s.received for s in self.sessions.values())


def _all_turns(req: GenRequest) -> tuple[Turn, ...]:
    return ((req.system,) if req.system else ()) + req.turns


def _page_size(value: str | None, default: int, maximum: int) -> int:
    """pageSize: absent or 0 is the default; over the maximum is the maximum (as the API)."""
    if value is None or value == "":
        return default
    if not value.isdigit():
        raise _invalid(f"Invalid value at 'page_size' (TYPE_INT32), \"{value[:20]}\"")
    return min(int(value), maximum) or default


def _token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _page_start(names: list[str], token: str | None) -> int:
    """The index after the item a page token names (a token whose item is gone since is a 400:
    the listing cannot know where it stood)."""
    if not token:
        return 0
    try:
        last = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise _invalid("Invalid page token.") from None
    if last in names:
        return names.index(last) + 1
    raise _invalid("Invalid page token: the item it continues after no longer exists.")
