"""The upload store: media gemframe has uploaded through the Files API, so a rerun (or another
call sharing the image) references the file instead of uploading it again.

It lives in the cache directory (``<cache>/files``), a store of its own through the same hardened
diskcache as the answers (`disk`: raw bytes only, never unpickled, no link followed, 0700/0600):

    ``file:<origin> <key fingerprint> <digest>`` -> a JSON record: the file's name and URI, MIME
    type, size, when it was uploaded and when it expires.

A file belongs to a project (an API key) at one server, so records are kept apart by the base
URL's origin and a fingerprint of the key (a hash: the key itself is never written): a cache
directory shared by a team with different keys never references another project's file. The
digest is the one cache keys use for inline data (`urls.data_digest`). A record is trusted only
until its expiry minus `EXPIRY_MARGIN`; a file deleted or expired earlier than that is noticed
by the generate call naming it (`uploads`), which forgets the record. The bytes are not kept
here: they come from the rows (or the URL store) when a file must be uploaded again.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from .disk import _cache_method, open_store, read_entries

_RECORD = "file:"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_NAME = re.compile(r"files/[a-z0-9-]{1,40}")
FILE_TTL = 48 * 3600  # the Files API keeps a file 48 hours after its upload
# A record is used only while it has this long left: a call that starts just before a file
# expires would otherwise send rows naming it, see them fail, and upload it again anyway.
EXPIRY_MARGIN = 3600.0


def now() -> float:
    """The clock records are judged by (a function, so a test can move it)."""
    return time.time()


def scope_of(origin: str, api_key: str | None) -> str:
    """Where a file lives: the server's origin and a fingerprint of the key (sha256, never the
    key). No key (the emulator): ``-``."""
    fingerprint = hashlib.sha256(b"gemframe-files\0" + api_key.encode()).hexdigest()[:32] if api_key else "-"
    return f"{origin} {fingerprint}"


@dataclass(frozen=True)
class FileRecord:
    """An uploaded file, as the store remembers it."""

    name: str  # files/<id>
    uri: str  # what a fileData part names
    mime: str
    size: int  # bytes
    uploaded_at: float  # epoch seconds (this machine's clock)
    expires: float  # epoch seconds (this machine's clock: uploaded_at + the TTL the server gave)

    def live(self) -> bool:
        """Whether the file may still be named: before its expiry, less the margin."""
        return self.expires - EXPIRY_MARGIN > now()


def _record(raw: bytes) -> FileRecord | None:
    """A stored record, or None if it is not one gemframe wrote (hostile ground)."""
    try:
        fields = orjson.loads(raw)
        record = FileRecord(**{k: fields[k] for k in ("name", "uri", "mime", "size", "uploaded_at", "expires")})
    except (ValueError, TypeError, KeyError):
        return None
    ok = (
        type(record.name) is str
        and _NAME.fullmatch(record.name) is not None
        and type(record.uri) is str
        and type(record.mime) is str
        and type(record.size) is int
        and all(isinstance(v, (int, float)) for v in (record.uploaded_at, record.expires))
    )
    return record if ok else None


_URI_PATH = re.compile(r"/(?:v1|v1beta|v1alpha)/(files/[a-z0-9-]{1,40})")


def _names_its_file(record: FileRecord, origin: str) -> bool:
    """Whether a record's URI is its own file on this server. The store is hostile ground: a
    record planted in a shared cache directory could name any URI (a video of someone else's
    choosing, or a file of another row), and the answer to a request naming it would be cached
    as the answer for this row's media."""
    parts = urlsplit(record.uri)
    path = _URI_PATH.fullmatch(parts.path)
    return (
        path is not None
        and path.group(1) == record.name
        and not (parts.query or parts.fragment or parts.username or parts.password)
        and origin_of(record.uri) == origin
    )


def origin_of(url: str) -> str:
    """``scheme://host:port`` of a URL (the default port spelled out; ``port -1`` when it is
    not a number): where a file lives, and where the key may go."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:  # a port that is not a number
        port = -1
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


class UploadStore:
    """(scope, digest) -> the file uploaded for it, in a directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        self._store = open_store(self.directory)

    def __repr__(self) -> str:
        return f"UploadStore({self.directory!r})"

    @staticmethod
    def _key(scope: str, digest: str) -> str:
        return f"{_RECORD}{scope} {digest}"

    @_cache_method
    def lookup(self, scope: str, digests: Iterable[str]) -> dict[str, FileRecord]:
        """The live files of these digests (`FileRecord.live`) that name a file of the scope's
        server (`_names_its_file`), one query per 500."""
        origin = scope.rsplit(" ", 1)[0]
        wanted = {self._key(scope, d): d for d in digests if _DIGEST.fullmatch(d)}
        entries, _ = read_entries(self._store, wanted)
        found = {}
        for key, raw in entries.items():
            record = _record(raw)
            if record is not None and record.live() and _names_its_file(record, origin):
                found[wanted[key]] = record
        return found

    @_cache_method
    def put(self, scope: str, digest: str, record: FileRecord) -> None:
        self._store.set(self._key(scope, digest), orjson.dumps(asdict(record)))

    @_cache_method
    def forget(self, scope: str, digest: str, name: str) -> None:
        """Forget a digest's file, if it is still this one (another process may have stored a
        fresh upload meanwhile)."""
        key = self._key(scope, digest)
        with self._store.transact():
            entries, _ = read_entries(self._store, [key])
            record = _record(entries[key]) if key in entries else None
            if record is None or record.name == name:
                self._store.delete(key)

    # -- management: gemframe cache stats / clear -------------------------------------------

    @_cache_method
    def stats(self) -> dict[str, Any]:
        """Files remembered, those still live, and their bytes."""
        files = live = size = 0
        keys = [k for (k,) in self._store._sql("SELECT key FROM Cache WHERE key LIKE 'file:%'").fetchall()]
        for start in range(0, len(keys), 500):
            entries, _ = read_entries(self._store, keys[start : start + 500])
            for raw in entries.values():
                record = _record(raw)
                if record is not None:
                    files += 1
                    if record.live():
                        live, size = live + 1, size + record.size
        return {"directory": self.directory, "files": files, "live": live, "live_bytes": size}

    @_cache_method
    def clear(self) -> int:
        """Forget every uploaded file (they stay on the server until they expire); returns how
        many records were forgotten."""
        self._store.check_intact()
        count = self._store._sql("SELECT COUNT(*) FROM Cache WHERE key LIKE 'file:%'").fetchone()[0]
        self._store.clear()
        return int(count)

    def close(self) -> None:
        self._store.close()
