"""Safe storage under the cache: diskcache, reduced to raw bytes in a directory treated as
hostile ground (it may be shared, copied or written by someone else).

gemframe stores and reads answers only as raw bytes through `_AnswerDisk`, so no reading path
ever unpickles; any other row is a miss with one warning (`read_entries`, `warn_refused`).
Answer files are opened only under the names diskcache gives them, inside the directory, never
through a symbolic link; a planted ``filename`` is never deleted. Every diskcache setting is
pinned (`_Store`). A new cache directory is private (0700, files 0600). A corrupt database is a
`CacheCorruptError` naming the file and what to do.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import stat
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from functools import wraps
from typing import Any, Concatenate, ParamSpec, TypeVar

import diskcache
from diskcache.core import DEFAULT_SETTINGS, ENOVAL, METADATA, MODE_BINARY, MODE_RAW, UNKNOWN

from ..._errors import GemframeError, clip

MAX_ANSWER_BYTES = 2**28  # 256 MiB: no generateContent answer comes near; a bigger file is planted
# The only answer-file names gemframe reads or deletes: the ones diskcache's Disk.filename makes
# (two levels of two hex digits, 28 hex digits + ".val"). Anything else in a row is planted.
_VALUE_FILE = re.compile(r"([0-9a-f]{2})[/\\]([0-9a-f]{2})[/\\]([0-9a-f]{28}\.val)")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_OPEN_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_AT_SUPPORTED = os.open in os.supports_dir_fd and os.unlink in os.supports_dir_fd  # POSIX
# Every diskcache setting, pinned: a value planted in the database's Settings table never applies.
_SETTINGS = {
    **DEFAULT_SETTINGS,
    "size_limit": 2**62,
    "eviction_policy": "none",
    "cull_limit": 0,
    "statistics": 0,
    "tag_index": 0,
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


class _AnswerDisk(diskcache.Disk):  # type: ignore[misc]  # diskcache has no type hints: its classes are Any
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
            self._at(os.unlink, parts[2], leaf)
            with suppress(OSError):
                self._at(os.rmdir, parts[1], top)
                self._at(os.rmdir, parts[0], root)

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
    def _open_dirs(self, names: tuple[str, str], *, create: bool) -> Iterator[tuple[Any, ...]]:
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
    def _at(remove: Any, name: str, where: Any) -> None:
        """``os.unlink`` or ``os.rmdir`` of ``name`` inside ``where`` (a directory descriptor
        from `_open_dirs`, or its path where there is no dir_fd)."""
        if _AT_SUPPORTED:
            remove(name, dir_fd=where)
        else:
            remove(os.path.join(where, name))


def _value_parts(filename: Any) -> tuple[str, str, str] | None:
    match = _VALUE_FILE.fullmatch(filename) if type(filename) is str else None
    return match.groups() if match else None  # type: ignore[return-value]


class _Store(diskcache.Cache):  # type: ignore[misc]  # diskcache has no type hints: its classes are Any
    """diskcache's Cache, except that a setting planted in the database's Settings table never
    becomes an attribute of the cache or its Disk, nor a PRAGMA (diskcache applies every row
    of that table by ``setattr``: a row ``disk__directory`` would move where files are deleted)."""

    _txn_id: int | None  # diskcache's: the thread whose transaction is open, if any

    def reset(self, key: str, value: Any = ENOVAL, update: bool = True) -> Any:
        if key not in _KNOWN_SETTINGS:
            return None
        return super().reset(key, value, update)

    def settle(self) -> None:
        """Roll back a transaction that an interrupt left open on this thread's connection.

        Ctrl-C raises KeyboardInterrupt between any two bytecodes, also between diskcache's
        ``BEGIN IMMEDIATE`` and the bookkeeping that ends it (its ``_txn_id``, the ``try`` that
        commits or rolls back). The connection is then left in a transaction that holds the
        database's write lock: the next ``BEGIN`` on it fails (diskcache raises ``Timeout``, and
        the answers the call was storing on its way out were lost), or, when diskcache had
        already marked the transaction as this thread's, later writes join it and are never
        committed. Called where this thread has no transaction of its own (at the start of
        every public cache method, see `_cache_method`), so an open one was left behind:
        what it wrote was never committed, and its writer stores it again."""
        con: sqlite3.Connection = self._con
        if con.in_transaction:
            if self._txn_id == threading.get_ident():
                self._txn_id = None
            con.execute("ROLLBACK")

    def check_intact(self) -> None:
        """Refuse a database with damaged pages before anything deletes from it: a clear
        removes rows in batches, each its own transaction, and one that met a damaged page
        halfway would leave the cache half cleared and still damaged (100 of 400 answers gone,
        then the error). ``PRAGMA quick_check`` reads every page once: seconds for a big
        cache, on a command that is rare."""
        problems = self._sql("PRAGMA quick_check").fetchall()  # raises itself on some damage
        if problems != [("ok",)]:
            # Its text can name tables and indexes, chosen by whoever wrote the file: clipped.
            raise _corrupt(self.directory, f"quick_check: {clip(problems[0][0], 200)}")


def _is_corruption(exc: BaseException) -> bool:
    """Whether an sqlite3 error means the file is damaged (not busy, locked or read-only)."""
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, sqlite3.OperationalError):
        return False
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+
    if name is not None:
        return name in ("SQLITE_CORRUPT", "SQLITE_NOTADB")
    text = str(exc)
    return "not a database" in text or "malformed" in text


def _corrupt(directory: str, exc: BaseException | str) -> CacheCorruptError:
    db = os.path.join(directory, diskcache.core.DBNAME)
    return CacheCorruptError(
        f"the cache database {db} is corrupt ({exc}): its answers cannot be read. Move it aside "
        f"(mv {db} {db}.corrupt) to start an empty cache there, or use another cache directory "
        f"(cache_dir= / --cache-dir), or cache='off'"
    )


@contextmanager
def reporting_corruption(directory: str) -> Iterator[None]:
    """Turn a damaged database under the block into a `CacheCorruptError` naming the file (a
    busy, locked or read-only one is raised as it is)."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if _is_corruption(exc):
            raise _corrupt(directory, exc) from None
        raise


_Self = TypeVar("_Self")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _cache_method(method: Callable[Concatenate[_Self, _P], _R]) -> Callable[Concatenate[_Self, _P], _R]:
    """A public method of a store (``self._store`` its `_Store`, ``self.directory`` its
    directory): it starts from a settled connection (`_Store.settle`: public methods never
    call each other inside a transaction, so none of this thread's is open), and a damaged
    database under it is reported (`reporting_corruption`). Typed through (ParamSpec), so
    callers see the method's own arguments and return type."""

    @wraps(method)
    def wrapper(self: Any, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with reporting_corruption(self.directory):
            self._store.settle()
            return method(self, *args, **kwargs)

    return wrapper


def open_store(directory: str) -> _Store:
    """The hardened diskcache store in ``directory`` (made private if new): every setting pinned
    (see `_SETTINGS`), values raw bytes only (see `_AnswerDisk`), a damaged database reported as
    `CacheCorruptError`. The answer store and the URL store both open theirs here."""
    _prepare_directory(directory)
    with reporting_corruption(directory):
        return _Store(directory, disk=_AnswerDisk, **_SETTINGS)


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
            "from a backup or `gemframe cache import` an export",
            CacheWarning,
            stacklevel=3,
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


_SQL_BATCH = 500  # keys per SELECT ... IN (SQLite allows 999 parameters before 3.32)


def read_entries(store: _Store, keys: Iterable[str]) -> tuple[dict[str, bytes], Counter[str]]:
    """The stored entries (header + answer) of these keys, and why other rows were refused:
    only raw bytes in the database or in a file named as `_AnswerDisk` names them. One SQL query
    per 500 keys, not one per key (diskcache's ``get`` costs ~2x the lookup itself)."""
    keys = list(keys)
    found: dict[str, bytes] = {}
    refused: Counter[str] = Counter()
    disk: _AnswerDisk = store.disk
    for start in range(0, len(keys), _SQL_BATCH):
        chunk = keys[start : start + _SQL_BATCH]
        query = f"SELECT key, mode, filename, value FROM Cache WHERE raw = 1 AND key IN ({','.join('?' * len(chunk))})"
        for key, mode, filename, value in store._sql(query, chunk).fetchall():
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


def warn_refused(directory: str, refused: Counter[str]) -> None:
    """One warning for the rows a call did not read, by reason."""
    if not refused:
        return
    total = sum(refused.values())
    reasons = "; ".join(f"{n} {why}" for why, n in refused.most_common())
    warnings.warn(
        f"{total} cache entr{'y' if total == 1 else 'ies'} in {directory} not read (treated "
        f"as not cached): {reasons}. gemframe writes answers only as raw bytes behind its own "
        "header: unless a newer gemframe wrote them, check who can write to this directory",
        CacheWarning,
        stacklevel=4,
    )
