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
next to its results. Importing merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import date, datetime, timedelta, timezone
from enum import Enum
from functools import lru_cache
from typing import Any

import diskcache
import orjson

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


class ResponseCache:
    """A diskcache store of raw responses, safe to share between threads and processes."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = os.fspath(directory) if directory else default_cache_dir()
        # No size limit and no eviction: entries are answers someone paid for. No memory map of
        # the database: it added up to 64 MiB to every long job's RSS for no measurable speed
        # (bench 4 and 5), reads go through SQLite's bounded page cache instead.
        self._store = diskcache.Cache(
            self.directory, size_limit=2**62, eviction_policy="none", cull_limit=0, sqlite_mmap_size=0,
        )

    def __repr__(self) -> str:
        return f"ResponseCache({self.directory!r})"

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Raw responses of the keys that are stored: one SQL query per 500 keys, not one per
        key (diskcache's ``get`` costs ~2x the lookup itself). Entries diskcache keeps in files
        (large answers, e.g. images) are read through diskcache."""
        keys = list(keys)
        found: dict[str, bytes] = {}
        in_files: list[str] = []
        for start in range(0, len(keys), _SQL_BATCH):
            chunk = keys[start:start + _SQL_BATCH]
            query = (
                "SELECT key, mode, value FROM Cache WHERE raw = 1 AND key IN "
                f"({','.join('?' * len(chunk))})"
            )
            for key, mode, value in self._store._sql(query, chunk).fetchall():
                if mode == diskcache.core.MODE_RAW and value is not None:
                    found[key] = self._unpack(bytes(value))
                else:
                    in_files.append(key)
        if in_files:
            with self._store.transact():
                for key in in_files:
                    entry = self._store.get(key)
                    if entry is not None:
                        found[key] = self._unpack(entry)
        return found

    def set_many(self, entries: Iterable[tuple[str, str, bytes]]) -> None:
        """Store (key, model, raw response) triples in one transaction."""
        created = int(time.time())
        with self._store.transact():
            for key, model, raw in entries:
                header = json.dumps({"format": ENTRY_FORMAT, "model": model, "created": created})
                self._store.set(key, header.encode() + b"\n" + raw, tag=model)

    @staticmethod
    def _unpack(entry: bytes) -> bytes:
        header, _, raw = entry.partition(b"\n")
        if header.startswith(_CURRENT_HEADER):  # the common case, without parsing JSON
            return raw
        fmt = json.loads(header).get("format")
        if fmt != ENTRY_FORMAT:
            raise ValueError(f"cache entry format {fmt} is newer than this gemframe understands")
        return raw

    def __len__(self) -> int:
        return len(self._store)

    def contains_many(self, keys: Iterable[str]) -> set[str]:
        """The keys that are stored, without reading their answers (one transaction)."""
        with self._store.transact():
            return {key for key in keys if key in self._store}

    # -- management ---------------------------------------------------------------------------
    # diskcache keeps each entry's tag (our model), store time and size in its SQLite table
    # ``Cache``; reading those columns directly answers stats and filters without reading any
    # answer. ``store_time`` is kept equal to the entry's ``created`` (imports set it).

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
        seconds)."""
        keys = self._keys(model, before, after)
        for start in range(0, len(keys), _EXPORT_BATCH):
            with self._store.transact():
                batch = [(key, self._store.get(key)) for key in keys[start:start + _EXPORT_BATCH]]
            for key, entry in batch:
                if entry is None:  # removed by another process meanwhile
                    continue
                header, _, raw = entry.partition(b"\n")
                meta = json.loads(header)
                yield {
                    "key": key, "model": meta.get("model"), "created": meta.get("created"),
                    "format": meta.get("format"), "response": raw,
                }

    def export(self, path: str | os.PathLike[str], *, model: str | None = None, before: Any = None) -> int:
        """Write the entries (all, or one model's / older ones) to a parquet file; returns the
        count. The file is written next to ``path`` and renamed when complete."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([
            ("key", pa.string()), ("model", pa.string()), ("created", pa.timestamp("s", tz="UTC")),
            ("format", pa.int32()), ("response", pa.large_binary()),
        ])
        from ._files import atomic_write

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

    def import_(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> dict[str, int]:
        """Merge the entries of an exported parquet file into this cache. A key already stored
        is kept unless ``overwrite``. Returns ``{"added", "replaced", "kept"}`` counts."""
        import pyarrow.parquet as pq

        source = pq.ParquetFile(os.fspath(path))
        missing = [c for c in EXPORT_COLUMNS if c not in source.schema_arrow.names]
        if missing:
            raise ValueError(f"{os.fspath(path)} is not a gemframe cache export: no columns {missing}")
        counts = {"added": 0, "replaced": 0, "kept": 0}
        for batch in source.iter_batches(batch_size=_EXPORT_BATCH, columns=list(EXPORT_COLUMNS)):
            rows = batch.to_pylist()
            for row in rows:
                if row["format"] != ENTRY_FORMAT:
                    raise ValueError(
                        f"{os.fspath(path)}: entry format {row['format']}; this gemframe reads format {ENTRY_FORMAT}"
                    )
            with self._store.transact():
                for row in rows:
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
        return counts

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
