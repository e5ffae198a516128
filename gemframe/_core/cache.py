"""The on-disk answer cache: a rerun, a restarted notebook or a killed job never pays twice.

Key: sha256 over the canonical request (sorted-key JSON) + provider + model + sample index.
Inline images enter the key by the digest of their data, so renaming a file still hits and
editing it misses. Values are the raw response bytes behind a one-line JSON header carrying the
entry format version, so later releases can read old caches. Only HTTP 200 answers are stored:
a transient failure is never replayed.

Management (``gemframe cache stats|clear|export|import``): `ResponseCache.stats` (entries, size,
by model, oldest/newest), `ResponseCache.clear` (all, one model, or older than a date), and
`ResponseCache.export` / `ResponseCache.import_` to a parquet file of (key, model, created,
format, response) rows, so a team can share answers or archive an experiment's exact answers
next to its results. Importing merges, and refuses rows that are not a digest key with a
``generateContent`` answer.

Everything read from the cache directory is treated as hostile (it may be shared, copied or
written by someone else): gemframe stores and reads answers only as raw bytes through
`_AnswerDisk`, so no reading path ever unpickles; any other row is a miss with one warning.
Answer files are opened only under the names diskcache gives them, inside the directory,
never through a symbolic link; a planted ``filename`` is never deleted. A new cache
directory is private (0700, files 0600). A corrupt database is a `CacheCorruptError` naming
the file and what to do.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sqlite3
import stat
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import date, datetime, timedelta, timezone
from enum import Enum
from functools import lru_cache, wraps
from typing import Any

import diskcache
import orjson
from diskcache.core import DEFAULT_SETTINGS, ENOVAL, METADATA, MODE_BINARY, MODE_RAW, UNKNOWN

from .._errors import GemframeError

ENTRY_FORMAT = 1
_CURRENT_HEADER = b'{"format": 1,'  # how set_many's json.dumps header starts
EXPORT_COLUMNS = ("key", "model", "created", "format", "response")
_SQL_BATCH = 500  # keys per SELECT ... IN (SQLite allows 999 parameters before 3.32)
_EXPORT_BATCH = 1000  # rows per transaction / record batch when exporting or importing


class CacheMode(str, Enum):
    """How a call uses the cache."""

    USE = "use"  # read hits, send misses, store answers
    READ = "read"  # replay only: a miss is a row error and nothing is sent
    REFRESH = "refresh"  # send everything, overwrite what is stored
    OFF = "off"  # neither read nor write


def default_cache_dir() -> str:
    """``$GEMFRAME_CACHE_DIR``, else ``$XDG_CACHE_HOME/gemframe``, else ``~/.cache/gemframe``."""
    if os.environ.get("GEMFRAME_CACHE_DIR"):
        return os.environ["GEMFRAME_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gemframe")


@lru_cache(maxsize=16)  # small: each entry keeps an encoded image alive
def _data_digest(data: str) -> str:
    # Python caches a str's hash, so the same encoded image shared by many rows hashes once.
    return "sha256:" + hashlib.sha256(data.encode("ascii")).hexdigest()


def _digest_part(part: dict[str, Any]) -> dict[str, Any]:
    inline = part.get("inlineData")
    if inline is None or "data" not in inline:
        return part
    return {**part, "inlineData": {**inline, "data": _data_digest(inline["data"])}}


def _keyable(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """The body with inline image data replaced by its digest (only copied if it has images)."""
    contents = body.get("contents") or []
    if not any("inlineData" in p for c in contents for p in c.get("parts") or ()):
        return body
    return {
        **body,
        "contents": [{**c, "parts": [_digest_part(p) for p in c.get("parts") or ()]} for c in contents],
    }


def _canonical_json(value: Any) -> bytes:
    """Sorted-key, compact, UTF-8 JSON, as ``json.dumps(sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` writes it. orjson does that ~3x faster and byte for byte the same,
    except floats Python spells with an exponent (``1e-05``, ``1e+16``; orjson: ``0.00001``,
    ``1e16``): a number token that may be one sends the value through json, so keys never
    depend on orjson's float spelling (tests/test_cache.py pins keys)."""
    try:
        fast = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # e.g. an int beyond 64 bits: json spells it exactly
        fast = None
    if fast is not None and not _MAYBE_EXPONENT_FLOAT.search(fast):
        return fast
    return _JSON_CANONICAL.encode(value).encode("utf-8")


_JSON_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# A number token (after ':', ',' or '[') written with an exponent or as 0.0000...; inside a
# string the same bytes are a harmless false alarm (json does the work).
_MAYBE_EXPONENT_FLOAT = re.compile(rb"[:,\[]-?(?:[0-9]+(?:\.[0-9]+)?[eE]|0\.0000)")


def cache_key(body: Mapping[str, Any], *, provider: str, model: str, sample: int = 0) -> str:
    """The cache key of one request: stable across runs, processes and machines."""
    canonical = _canonical_json([ENTRY_FORMAT, provider, model, sample, _keyable(body)])
    return hashlib.sha256(canonical).hexdigest()


# -- the cache directory is hostile ground -----------------------------------------------------

MAX_ANSWER_BYTES = 2**28  # 256 MiB: no generateContent answer comes near; a bigger file is planted
_DIGEST = re.compile(r"[0-9a-f]{64}")
# The only answer-file names gemframe reads or deletes: the ones diskcache's Disk.filename makes
# (two levels of two hex digits, 28 hex digits + ".val"). Anything else in a row is planted.
_VALUE_FILE = re.compile(r"([0-9a-f]{2})[/\\]([0-9a-f]{2})[/\\]([0-9a-f]{28}\.val)")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_OPEN_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_AT_SUPPORTED = os.open in os.supports_dir_fd and os.unlink in os.supports_dir_fd  # POSIX
# Every diskcache setting, pinned: a value planted in the database's Settings table never applies.
_SETTINGS = {
    **DEFAULT_SETTINGS,
    "size_limit": 2**62, "eviction_policy": "none", "cull_limit": 0, "statistics": 0, "tag_index": 0,
    "sqlite_mmap_size": 0,
}
_KNOWN_SETTINGS = frozenset(DEFAULT_SETTINGS) | frozenset(METADATA)


class CacheCorruptError(GemframeError):
    """The cache database cannot be read (not an SQLite file, or damaged pages)."""


class CacheWarning(UserWarning):
    """Something in the cache directory was not as gemframe leaves it (entries not read, an
    empty database); the call goes on."""


class UnsafeCacheEntry(OSError):
    """A row gemframe did not write the way it writes answers (a pickle, text, a planted file
    name or link). An OSError, so every diskcache reading path treats it as a miss."""


def _private_mode(fd: int, mode: int) -> None:
    """Set a mode on a file we just created, whatever the umask (which may only take bits away)."""
    if os.chmod in os.supports_fd:
        os.chmod(fd, mode)


class _AnswerDisk(diskcache.Disk):
    """diskcache's serializer, reduced to raw bytes: values are stored as bytes in the database
    (under ``disk_min_file_size``) or in a file, never pickled, and any row in another form is
    refused, so `diskcache.Cache.get`, ``delete``, ``clear`` and friends are as safe as
    gemframe's own SQL. Files are read, written and removed only under the names
    `Disk.filename` makes, one directory level at a time without following links."""

    def __init__(self, directory: str, min_file_size: int = 0, pickle_protocol: int = 0, **_planted: Any) -> None:
        super().__init__(directory, min_file_size, pickle_protocol)  # planted disk_* settings: ignored

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) is not str:
            raise TypeError(f"gemframe cache keys are str, not {type(key).__name__}")
        return key, True

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise UnsafeCacheEntry("a pickled key")
        return key

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[int, int, str | None, Any]:
        if read or type(value) is not bytes:
            raise TypeError("gemframe's cache stores raw bytes only (it never pickles)")
        if len(value) < self.min_file_size:
            return 0, MODE_RAW, None, sqlite3.Binary(value)
        filename, _ = self.filename(key, value)
        self._write_file(filename, value)
        return len(value), MODE_BINARY, filename, None

    def fetch(self, mode: int, filename: Any, value: Any, read: bool) -> bytes:
        if not read:
            if mode == MODE_RAW and type(value) is bytes:
                return value
            if mode == MODE_BINARY and value is None:
                return self.read_file(filename)
        raise UnsafeCacheEntry(f"stored as diskcache mode {mode}, not as raw bytes")

    def remove(self, file_path: Any) -> None:
        """Delete an answer file, and its two directories when empty. A name this class does
        not make is never deleted (a planted ``../../victim`` or absolute path), and the
        directories are entered without following links."""
        parts = _value_parts(file_path)
        if parts is None:
            return
        with suppress(OSError), self._open_dirs(parts[:2], create=False) as (root, top, leaf):
            self._unlink(parts[2], leaf)
            with suppress(OSError):
                self._rmdir(parts[1], top)
                self._rmdir(parts[0], root)

    def read_file(self, filename: Any) -> bytes:
        """The bytes of an answer file: a regular file of at most `MAX_ANSWER_BYTES` with one
        link, opened inside the directory without following links (else `UnsafeCacheEntry`)."""
        parts = _value_parts(filename)
        if parts is None:
            raise UnsafeCacheEntry(f"an answer file named {str(filename)[:80]!r}, not a name gemframe writes")
        with self._open_dirs(parts[:2], create=False) as (_, _, leaf):
            flags = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
            try:
                fd = self._open(parts[2], flags, leaf)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
                    raise UnsafeCacheEntry("an answer file that is a symbolic link") from None
                raise
            with open(fd, "rb") as reader:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                    raise UnsafeCacheEntry("an answer file that is not a plain file of its own")
                data = reader.read(MAX_ANSWER_BYTES + 1)
        if len(data) > MAX_ANSWER_BYTES:
            raise UnsafeCacheEntry(f"an answer file over {MAX_ANSWER_BYTES // 2**20} MiB")
        return data

    def _write_file(self, filename: str, value: bytes) -> None:
        parts = _value_parts(filename)
        assert parts is not None  # Disk.filename made it
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        for attempt in range(10):  # as diskcache: another process may remove an emptied directory meanwhile
            try:
                with self._open_dirs(parts[:2], create=True) as (_, _, leaf):
                    fd = self._open(parts[2], flags, leaf, 0o600)
                    with open(fd, "wb") as writer:
                        _private_mode(fd, 0o600)
                        writer.write(value)
                return
            except FileNotFoundError:
                if attempt == 9:
                    raise

    # Directory walking: with dir_fd (POSIX) each level is opened O_NOFOLLOW relative to the one
    # above, so no planted link is followed even if it appears meanwhile; elsewhere a level that
    # is a link is refused before use.

    @contextmanager
    def _open_dirs(self, names: tuple[str, str], *, create: bool) -> Iterator[tuple[Any, Any, Any]]:
        if not _AT_SUPPORTED:
            path = self._directory
            chain = [path]
            for name in names:
                path = os.path.join(path, name)
                if create and not os.path.lexists(path):
                    with suppress(FileExistsError):
                        os.mkdir(path, 0o700)
                if not os.path.lexists(path):
                    raise FileNotFoundError(errno.ENOENT, "removed meanwhile", path)
                if os.path.islink(path) or not os.path.isdir(path):
                    raise UnsafeCacheEntry(f"{path} is not a directory (a link?)")
                chain.append(path)
            yield tuple(chain)
            return
        fds = [os.open(self._directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))]
        try:
            for name in names:
                if create:
                    try:
                        os.mkdir(name, 0o700, dir_fd=fds[-1])
                        made = True
                    except FileExistsError:
                        made = False
                try:
                    fds.append(os.open(name, _OPEN_DIR, dir_fd=fds[-1]))
                except FileNotFoundError:
                    raise  # removed meanwhile: a plain miss
                except OSError as exc:
                    raise UnsafeCacheEntry(f"{name} in {self._directory} is not a directory (a link?)") from exc
                if create and made:
                    _private_mode(fds[-1], 0o700)
            yield tuple(fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _open(self, name: str, flags: int, where: Any, mode: int = 0o600) -> int:
        if _AT_SUPPORTED:
            return os.open(name, flags, mode, dir_fd=where)
        path = os.path.join(where, name)
        if os.path.islink(path):
            raise OSError(errno.ELOOP, "a symbolic link", path)
        return os.open(path, flags, mode)

    @staticmethod
    def _unlink(name: str, where: Any) -> None:
        if _AT_SUPPORTED:
            os.unlink(name, dir_fd=where)
        else:
            os.unlink(os.path.join(where, name))

    @staticmethod
    def _rmdir(name: str, where: Any) -> None:
        if _AT_SUPPORTED:
            os.rmdir(name, dir_fd=where)
        else:
            os.rmdir(os.path.join(where, name))


def _value_parts(filename: Any) -> tuple[str, str, str] | None:
    match = _VALUE_FILE.fullmatch(filename) if type(filename) is str else None
    return match.groups() if match else None  # type: ignore[return-value]


class _Store(diskcache.Cache):
    """diskcache's Cache, except that a setting planted in the database's Settings table never
    becomes an attribute of the cache or its Disk, nor a PRAGMA (diskcache applies every row
    of that table by ``setattr``: a row ``disk__directory`` would move where files are deleted)."""

    def reset(self, key: str, value: Any = ENOVAL, update: bool = True) -> Any:
        if key not in _KNOWN_SETTINGS:
            return None
        return super().reset(key, value, update)


def _is_corruption(exc: BaseException) -> bool:
    """Whether an sqlite3 error means the file is damaged (not busy, locked or read-only)."""
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, sqlite3.OperationalError):
        return False
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+
    if name is not None:
        return name in ("SQLITE_CORRUPT", "SQLITE_NOTADB")
    text = str(exc)
    return "not a database" in text or "malformed" in text


def _corrupt(directory: str, exc: BaseException) -> CacheCorruptError:
    db = os.path.join(directory, diskcache.core.DBNAME)
    return CacheCorruptError(
        f"the cache database {db} is corrupt ({exc}): its answers cannot be read. Move it aside "
        f"(mv {db} {db}.corrupt) to start an empty cache there, or use another cache directory "
        f"(cache_dir= / --cache-dir), or cache='off'"
    )


def _reports_corruption(method: Any) -> Any:
    """Turn a damaged database under a cache method into a `CacheCorruptError`."""

    @wraps(method)
    def wrapper(self: ResponseCache, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            if _is_corruption(exc):
                raise _corrupt(self.directory, exc) from None
            raise

    return wrapper


def _prepare_directory(directory: str) -> None:
    """Create a new cache directory private (0700) and its database 0600 (answers can hold
    private data; SQLite gives its -wal and -shm files the database's mode), whatever the
    umask. An existing directory and database keep their modes. Warn about a zero-byte
    database (SQLite would silently start it empty) and refuse a database that is a link."""
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, 0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(directory, 0o700)
    db = os.path.join(directory, diskcache.core.DBNAME)
    if os.path.islink(db):
        raise CacheCorruptError(
            f"{db} is a symbolic link; gemframe does not follow links in its cache directory: "
            "remove the link or use another cache directory"
        )
    try:
        size = os.stat(db).st_size
    except FileNotFoundError:
        _create_database(db)
        return
    if size == 0:
        warnings.warn(
            f"the cache database {db} is empty (0 bytes), so the cache starts empty: if it held "
            "answers they are lost (a full disk or an interrupted copy truncates it); restore it "
            "from a backup or `gemframe cache import` an export", CacheWarning, stacklevel=3,
        )


def _create_database(db: str) -> None:
    """Create the database 0600 and already initialized (never zero bytes, so a zero-byte
    database always means a truncated one): built under a temporary name and linked into place,
    so two processes opening a new cache at once never see each other's half-made file."""
    temporary = f"{db}.{os.getpid()}.{os.urandom(4).hex()}.new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    try:
        _private_mode(fd, 0o600)
    finally:
        os.close(fd)
    try:
        with sqlite3.connect(temporary) as con:
            con.execute(f"PRAGMA auto_vacuum = {_SETTINGS['sqlite_auto_vacuum']}")  # writes the header
        con.close()
        try:
            os.link(temporary, db)
        except FileExistsError:
            pass  # another process made it first
        except OSError:  # no hard links here: fall back to a rename when still absent
            if not os.path.exists(db):
                os.replace(temporary, db)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(temporary)


def answer_problem(response: Any) -> str | None:
    """Why a parsed answer is not shaped like a ``generateContent`` response (None when it is):
    the fields gemframe reads must have the types it reads them as. Cheap enough to run on every
    cached answer (a few type checks per part)."""
    if type(response) is not dict:
        return "not a JSON object"
    candidates = response.get("candidates")
    if candidates is None and "promptFeedback" not in response:
        return "neither candidates nor promptFeedback"
    if candidates is not None:
        if type(candidates) is not list:
            return "candidates is not a list"
        for candidate in candidates:
            if type(candidate) is not dict:
                return "a candidate is not an object"
            if not _optional_str(candidate.get("finishReason")):
                return "finishReason is not a string"
            content = candidate.get("content")
            if content is None:
                continue
            if type(content) is not dict:
                return "content is not an object"
            parts = content.get("parts")
            if parts is None:
                continue
            if type(parts) is not list:
                return "parts is not a list"
            for part in parts:
                problem = _part_problem(part)
                if problem:
                    return problem
    usage = response.get("usageMetadata")
    if usage is not None:
        if type(usage) is not dict:
            return "usageMetadata is not an object"
        for field in ("promptTokenCount", "candidatesTokenCount", "totalTokenCount", "thoughtsTokenCount"):
            count = usage.get(field)
            if count is not None and (type(count) is not int or not 0 <= count < 2**63):
                return f"usageMetadata.{field} is not a count"
    feedback = response.get("promptFeedback")
    if feedback is not None and (type(feedback) is not dict or not _optional_str(feedback.get("blockReason"))):
        return "promptFeedback is not an object with a string blockReason"
    if not (_optional_str(response.get("modelVersion")) and _optional_str(response.get("responseId"))):
        return "modelVersion or responseId is not a string"
    return None


def _optional_str(value: Any) -> bool:
    return value is None or type(value) is str


def _part_problem(part: Any) -> str | None:
    if type(part) is not dict:
        return "a part is not an object"
    if "text" in part and type(part["text"]) is not str:
        return "a part's text is not a string"
    if not _optional_str(part.get("thoughtSignature") or part.get("thought_signature")):
        return "a thoughtSignature is not a string"
    inline = part.get("inlineData") or part.get("inline_data")
    if inline:
        if type(inline) is not dict or not _optional_str(inline.get("data")):
            return "inlineData is not an object with string data"
        if not _optional_str(inline.get("mimeType") or inline.get("mime_type")):
            return "inlineData's mimeType is not a string"
    return None


class ResponseCache:
    """A diskcache store of raw responses, safe to share between threads and processes."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = os.fspath(directory) if directory else default_cache_dir()
        _prepare_directory(self.directory)
        # No size limit and no eviction: entries are answers someone paid for. No memory map of
        # the database: it added up to 64 MiB to every long job's RSS for no measurable speed
        # (bench 4 and 5), reads go through SQLite's bounded page cache instead. Every setting
        # is pinned (see _SETTINGS) and values are raw bytes only (see _AnswerDisk).
        try:
            self._store = _Store(self.directory, disk=_AnswerDisk, **_SETTINGS)
        except sqlite3.DatabaseError as exc:
            if _is_corruption(exc):
                raise _corrupt(self.directory, exc) from None
            raise

    def __repr__(self) -> str:
        return f"ResponseCache({self.directory!r})"

    @_reports_corruption
    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Raw responses of the keys that are stored: one SQL query per 500 keys, not one per
        key (diskcache's ``get`` costs ~2x the lookup itself). Entries diskcache keeps in files
        (large answers, e.g. images) are read from inside the directory only. A row gemframe
        did not write as it writes answers (a pickle, a planted file, a newer entry format) is a
        miss, with one warning per call."""
        entries, refused = self._read_entries(keys)
        found: dict[str, bytes] = {}
        for key, entry in entries.items():
            raw = self._unpack(entry)
            if raw is None:
                refused[self._header_problem(entry)] += 1
            else:
                found[key] = raw
        self._warn_refused(refused)
        return found

    def _read_entries(self, keys: Iterable[str]) -> tuple[dict[str, bytes], Counter[str]]:
        """The stored entries (header + answer) of these keys, and why other rows were refused:
        only raw bytes in the database or in a file named as `_AnswerDisk` names them."""
        keys = list(keys)
        found: dict[str, bytes] = {}
        refused: Counter[str] = Counter()
        disk: _AnswerDisk = self._store.disk
        for start in range(0, len(keys), _SQL_BATCH):
            chunk = keys[start:start + _SQL_BATCH]
            query = (
                "SELECT key, mode, filename, value FROM Cache WHERE raw = 1 AND key IN "
                f"({','.join('?' * len(chunk))})"
            )
            for key, mode, filename, value in self._store._sql(query, chunk).fetchall():
                if mode == MODE_RAW and type(value) is bytes:  # the common case: one cheap check
                    found[key] = value
                    continue
                try:
                    found[key] = disk.fetch(mode, filename, value, False)
                except UnsafeCacheEntry as exc:
                    refused[str(exc)] += 1
                except OSError:
                    pass  # the file was removed meanwhile: a miss
        return found, refused

    def _warn_refused(self, refused: Counter[str]) -> None:
        if not refused:
            return
        total = sum(refused.values())
        reasons = "; ".join(f"{n} {why}" for why, n in refused.most_common())
        warnings.warn(
            f"{total} cache entr{'y' if total == 1 else 'ies'} in {self.directory} not read (treated "
            f"as not cached): {reasons}. gemframe writes answers only as raw bytes behind its own "
            "header: unless a newer gemframe wrote them, check who can write to this directory",
            CacheWarning, stacklevel=4,
        )

    @_reports_corruption
    def set_many(self, entries: Iterable[tuple[str, str, bytes]]) -> None:
        """Store (key, model, raw response) triples in one transaction."""
        created = int(time.time())
        with self._store.transact():
            for key, model, raw in entries:
                header = json.dumps({"format": ENTRY_FORMAT, "model": model, "created": created})
                self._store.set(key, header.encode() + b"\n" + raw, tag=model)

    @staticmethod
    def _unpack(entry: bytes) -> bytes | None:
        """The answer behind an entry's header; None if the header is not one this gemframe
        reads (see `_header_problem`)."""
        header, _, raw = entry.partition(b"\n")
        if header.startswith(_CURRENT_HEADER):  # the common case, without parsing JSON
            return raw
        return raw if ResponseCache._header(header).get("format") == ENTRY_FORMAT else None

    @staticmethod
    def _header(header: bytes) -> dict[str, Any]:
        try:
            meta = json.loads(header)
        except ValueError:
            return {}
        return meta if type(meta) is dict else {}

    @staticmethod
    def _header_problem(entry: bytes) -> str:
        fmt = ResponseCache._header(entry.partition(b"\n")[0]).get("format")
        if type(fmt) is int and fmt > ENTRY_FORMAT:
            return f"in entry format {fmt}, newer than this gemframe understands (upgrade gemframe)"
        return "without a gemframe entry header"

    @_reports_corruption
    def __len__(self) -> int:
        return len(self._store)

    @_reports_corruption
    def contains_many(self, keys: Iterable[str]) -> set[str]:
        """The keys that are stored, without reading their answers (one transaction)."""
        with self._store.transact():
            return {key for key in keys if key in self._store}

    # -- management ---------------------------------------------------------------------------
    # diskcache keeps each entry's tag (our model), store time and size in its SQLite table
    # ``Cache``; reading those columns directly answers stats and filters without reading any
    # answer. ``store_time`` is kept equal to the entry's ``created`` (imports set it).

    @_reports_corruption
    def stats(self) -> dict[str, Any]:
        """Entries, bytes on disk, and per model: entries, bytes, oldest and newest answer."""
        rows = self._store._sql(
            "SELECT tag, COUNT(*), SUM(size + COALESCE(LENGTH(value), 0)), MIN(store_time), "
            "MAX(store_time) FROM Cache GROUP BY tag ORDER BY tag"
        ).fetchall()
        by_model = {
            str(tag): {"entries": n, "bytes": int(size or 0), "oldest": _iso(lo), "newest": _iso(hi)}
            for tag, n, size, lo, hi in rows
        }
        stamps = [(lo, hi) for *_, lo, hi in rows if lo is not None]
        return {
            "directory": self.directory,
            "entries": sum(m["entries"] for m in by_model.values()),
            "bytes_on_disk": self._store.volume(),
            "oldest": _iso(min(lo for lo, _ in stamps)) if stamps else None,
            "newest": _iso(max(hi for _, hi in stamps)) if stamps else None,
            "by_model": by_model,
        }

    def _keys(self, model: str | None = None, before: Any = None, after: Any = None) -> list[str]:
        where, args = ["raw = 1"], []
        if model is not None:
            where.append("tag = ?")
            args.append(model)
        if before is not None:
            where.append("store_time < ?")
            args.append(parse_when(before))
        if after is not None:
            where.append("store_time >= ?")
            args.append(parse_when(after))
        query = f"SELECT key FROM Cache WHERE {' AND '.join(where)} ORDER BY rowid"
        return [key for (key,) in self._store._sql(query, args).fetchall()]

    @_reports_corruption
    def clear(self, *, model: str | None = None, before: Any = None) -> int:
        """Remove entries: every one, or those of one ``model`` and/or answered ``before`` a
        time (a datetime, a date, an ISO string, epoch seconds, or an age like ``"30d"``,
        ``"12h"``). Returns how many were removed."""
        if model is None and before is None:
            return self._store.clear()
        keys = self._keys(model, before)
        for start in range(0, len(keys), _EXPORT_BATCH):
            with self._store.transact():
                for key in keys[start:start + _EXPORT_BATCH]:
                    self._store.delete(key)
        return len(keys)

    def entries(self, *, model: str | None = None, before: Any = None, after: Any = None) -> Iterator[dict[str, Any]]:
        """The stored entries (all, or one model's, stored before/after a time) as ``{key, model,
        created, format, response}`` (response bytes without the header; created in epoch
        seconds). Rows gemframe would not read as an answer are left out, with one warning."""
        try:
            keys = self._keys(model, before, after)
            for start in range(0, len(keys), _EXPORT_BATCH):
                with self._store.transact():
                    batch, refused = self._read_entries(keys[start:start + _EXPORT_BATCH])
                for key, entry in batch.items():
                    header, _, raw = entry.partition(b"\n")
                    meta = self._header(header)
                    if meta.get("format") != ENTRY_FORMAT:
                        refused[self._header_problem(entry)] += 1
                        continue
                    yield {
                        "key": key, "model": meta.get("model"), "created": meta.get("created"),
                        "format": meta.get("format"), "response": raw,
                    }
                self._warn_refused(refused)
        except sqlite3.DatabaseError as exc:
            if _is_corruption(exc):
                raise _corrupt(self.directory, exc) from None
            raise

    def export(self, path: str | os.PathLike[str], *, model: str | None = None, before: Any = None) -> int:
        """Write the entries (all, or one model's / older ones) to a parquet file; returns the
        count. The file is written next to ``path`` and renamed when complete."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([
            ("key", pa.string()), ("model", pa.string()), ("created", pa.timestamp("s", tz="UTC")),
            ("format", pa.int32()), ("response", pa.large_binary()),
        ])
        from .._files import atomic_write

        count = 0
        with atomic_write(path) as partial, pq.ParquetWriter(partial, schema) as writer:
            writer.add_key_value_metadata({b"gemframe_cache": json.dumps({"format": ENTRY_FORMAT}).encode()})
            rows: list[dict[str, Any]] = []
            for entry in self.entries(model=model, before=before):
                rows.append(entry)
                if len(rows) == _EXPORT_BATCH:
                    writer.write_table(pa.Table.from_pylist(rows, schema))
                    count += len(rows)
                    rows = []
            if rows or not count:
                writer.write_table(pa.Table.from_pylist(rows, schema))
                count += len(rows)
        return count

    @_reports_corruption
    def import_(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> dict[str, Any]:
        """Merge the entries of an exported parquet file into this cache. A key already stored
        is kept unless ``overwrite``. Every row is checked first: its key must be a cache key
        (a sha256 hex digest) and its response a JSON object shaped like a ``generateContent``
        answer (see `answer_problem`), else it is refused. Returns ``{"added", "replaced",
        "kept", "refused"}`` counts and ``"refused_reasons"``: ``{reason: count}``."""
        import pyarrow.parquet as pq

        source = pq.ParquetFile(os.fspath(path))
        missing = [c for c in EXPORT_COLUMNS if c not in source.schema_arrow.names]
        if missing:
            raise ValueError(f"{os.fspath(path)} is not a gemframe cache export: no columns {missing}")
        counts: dict[str, Any] = {"added": 0, "replaced": 0, "kept": 0, "refused": 0}
        refused: Counter[str] = Counter()
        for batch in source.iter_batches(batch_size=_EXPORT_BATCH, columns=list(EXPORT_COLUMNS)):
            rows = batch.to_pylist()
            for row in rows:
                if row["format"] != ENTRY_FORMAT:
                    raise ValueError(
                        f"{os.fspath(path)}: entry format {row['format']}; this gemframe reads format {ENTRY_FORMAT}"
                    )
            accepted = []
            for row in rows:
                problem = _import_problem(row)
                if problem is None:
                    accepted.append(row)
                else:
                    refused[problem] += 1
            with self._store.transact():
                for row in accepted:
                    key, created = row["key"], row["created"]
                    stamp = created.timestamp() if isinstance(created, datetime) else float(created or time.time())
                    present = key in self._store
                    if present and not overwrite:
                        counts["kept"] += 1
                        continue
                    counts["replaced" if present else "added"] += 1
                    header = json.dumps({"format": ENTRY_FORMAT, "model": row["model"], "created": int(stamp)})
                    self._store.set(key, header.encode() + b"\n" + row["response"], tag=row["model"])
                    self._store._sql("UPDATE Cache SET store_time = ? WHERE key = ? AND raw = 1", (stamp, key))
        counts["refused"] = sum(refused.values())
        counts["refused_reasons"] = dict(refused.most_common())
        return counts

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NOT_AN_ANSWER = "not a generateContent answer"


def _import_problem(row: dict[str, Any]) -> str | None:
    """Why an exported row may not enter the cache (None if it may)."""
    key, model, created, response = row["key"], row["model"], row["created"], row["response"]
    if type(key) is not str or not _DIGEST.fullmatch(key):
        return "key is not a sha256 digest"
    if type(model) is not str:
        return "no model"
    if created is not None and not isinstance(created, (datetime, int, float)):
        return "created is not a time"
    if type(response) is not bytes:
        return NOT_AN_ANSWER
    if len(response) > MAX_ANSWER_BYTES:
        return f"answer over {MAX_ANSWER_BYTES // 2**20} MiB"
    try:
        answer = orjson.loads(response)
    except orjson.JSONDecodeError:
        return NOT_AN_ANSWER
    return NOT_AN_ANSWER if answer_problem(answer) else None


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(value: Any, now: float | None = None) -> float:
    """Epoch seconds from a datetime, a date (midnight UTC), an ISO-8601 string (naive means
    UTC), epoch seconds, or an age before now: ``"30d"``, ``"12h"``, ``"2w"``."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc).timestamp()
    if isinstance(value, timedelta):
        return (time.time() if now is None else now) - value.total_seconds()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        age = _AGE.match(value)
        if age:
            return (time.time() if now is None else now) - float(age[1]) * _AGE_SECONDS[age[2]]
        try:
            return parse_when(datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
        except ValueError:
            pass
    raise ValueError(f"not a date, time or age: {value!r} (use e.g. 2025-01-31, 2025-01-31T12:00Z or 30d)")
