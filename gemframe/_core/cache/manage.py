"""Cache management (``gemframe cache stats|clear|export|import``), apart from the store's
hot path: `CacheManagement` is the half of `ResponseCache` a person uses, not a call.

`stats` (entries, size, by model, oldest/newest), `clear` (all, one model, or older than a date),
and `export` / `import_` to a parquet file of (key, model, created, format, response, prompt)
rows (all, one model's, older or newer than a time), so a team can share answers or archive an
experiment's exact answers next to its results. ``prompt`` is the prompt each answer was for
(from the entry's header; null for entries stored before gemframe kept it, and in exports made
before it did). Importing merges, and refuses rows that are not a digest key with a
``generateContent`` answer.

diskcache keeps each entry's tag (our model), store time and size in its SQLite table ``Cache``;
reading those columns directly answers stats and filters without reading any answer.
``store_time`` is kept equal to the entry's ``created`` (imports set it).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from typing import Any, cast

import orjson

from ..._files import atomic_write
from .disk import MAX_ANSWER_BYTES, _cache_method, _Store, read_entries, reporting_corruption, warn_refused
from .entry import answer_problem, header_problem, pack, read_header
from .key import ENTRY_FORMAT

EXPORT_COLUMNS = ("key", "model", "created", "format", "response")  # what an import needs
PROMPT_COLUMN = "prompt"  # exported too; optional on import (older exports have none)
_EXPORT_BATCH = 1000  # rows per transaction / record batch when exporting or importing
_DIGEST = re.compile(r"[0-9a-f]{64}")


class CacheManagement:
    """Stats, clear, entries, export and import over a cache's store. A mixin: `ResponseCache`
    inherits it and provides ``directory`` and ``_store`` (this module never imports the store
    module, so management can change without touching the hot path)."""

    directory: str
    _store: _Store

    @_cache_method
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
        where: list[str] = ["raw = 1"]
        args: list[Any] = []  # the model's name, then timestamps
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

    @_cache_method
    def clear(self, *, model: str | None = None, before: Any = None) -> int:
        """Remove entries: every one, or those of one ``model`` and/or answered ``before`` a
        time (a datetime, a date, an ISO string, epoch seconds, or an age like ``"30d"``,
        ``"12h"``). Returns how many were removed."""
        self._store.check_intact()
        if model is None and before is None:
            return cast(int, self._store.clear())  # the count removed; diskcache has no type hints
        keys = self._keys(model, before)
        for start in range(0, len(keys), _EXPORT_BATCH):
            with self._store.transact():
                for key in keys[start : start + _EXPORT_BATCH]:
                    self._store.delete(key)
        return len(keys)

    def entries(self, *, model: str | None = None, before: Any = None, after: Any = None) -> Iterator[dict[str, Any]]:
        """The stored entries (all, or one model's, stored before/after a time) as ``{key, model,
        created, format, response, prompt}`` (response bytes without the header; created in
        epoch seconds; prompt None when the entry has none). Rows gemframe would not read as an
        answer are left out, with one warning."""
        with reporting_corruption(self.directory):  # a generator: the decorator would not see its body
            keys = self._keys(model, before, after)
            for start in range(0, len(keys), _EXPORT_BATCH):
                with self._store.transact():
                    batch, refused = read_entries(self._store, keys[start : start + _EXPORT_BATCH])
                for key, entry in batch.items():
                    header, _, raw = entry.partition(b"\n")
                    meta = read_header(header)
                    if meta.get("format") != ENTRY_FORMAT:
                        refused[header_problem(entry)] += 1
                        continue
                    prompt = meta.get("prompt")
                    yield {
                        "key": key,
                        "model": meta.get("model"),
                        "created": meta.get("created"),
                        "format": meta.get("format"),
                        "response": raw,
                        "prompt": prompt if type(prompt) is str else None,  # a planted header may hold anything
                    }
                warn_refused(self.directory, refused)

    def export(
        self,
        path: str | os.PathLike[str],
        *,
        model: str | None = None,
        before: Any = None,
        after: Any = None,
    ) -> int:
        """Write the entries to a parquet file; returns the count. All of them, or those of one
        ``model`` and/or stored ``before`` / ``after`` a time (as for `clear`: a date, an ISO
        string, epoch seconds, or an age: ``after="7d"`` is the last week's answers). Each row
        carries its ``prompt`` (null for entries stored without one). The file is written next
        to ``path`` and renamed when complete."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                ("key", pa.string()),
                ("model", pa.string()),
                ("created", pa.timestamp("s", tz="UTC")),
                ("format", pa.int32()),
                ("response", pa.large_binary()),
                (PROMPT_COLUMN, pa.string()),
            ]
        )

        count = 0
        with atomic_write(path) as partial, pq.ParquetWriter(partial, schema) as writer:
            writer.add_key_value_metadata({b"gemframe_cache": json.dumps({"format": ENTRY_FORMAT}).encode()})
            rows: list[dict[str, Any]] = []
            for entry in self.entries(model=model, before=before, after=after):
                rows.append(entry)
                if len(rows) == _EXPORT_BATCH:
                    writer.write_table(pa.Table.from_pylist(rows, schema))
                    count += len(rows)
                    rows = []
            if rows or not count:
                writer.write_table(pa.Table.from_pylist(rows, schema))
                count += len(rows)
        return count

    @_cache_method
    def import_(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> dict[str, Any]:
        """Merge the entries of an exported parquet file into this cache. A key already stored
        is kept unless ``overwrite``. Every row is checked first: its key must be a cache key
        (a sha256 hex digest) and its response a JSON object shaped like a ``generateContent``
        answer (see `answer_problem`), else it is refused. A ``prompt`` column (exports since
        gemframe kept prompts) is stored with each answer, so a re-export carries it again.
        Returns ``{"added", "replaced", "kept", "refused"}`` counts and ``"refused_reasons"``:
        ``{reason: count}``."""
        import pyarrow.parquet as pq

        source = pq.ParquetFile(os.fspath(path))
        missing = [c for c in EXPORT_COLUMNS if c not in source.schema_arrow.names]
        if missing:
            raise ValueError(f"{os.fspath(path)} is not a gemframe cache export: no columns {missing}")
        columns = list(EXPORT_COLUMNS) + [PROMPT_COLUMN] * (PROMPT_COLUMN in source.schema_arrow.names)
        counts: dict[str, Any] = {"added": 0, "replaced": 0, "kept": 0, "refused": 0}
        refused: Counter[str] = Counter()
        for batch in source.iter_batches(batch_size=_EXPORT_BATCH, columns=columns):
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
                    entry = pack(row["model"], int(stamp), row["response"], row.get(PROMPT_COLUMN))
                    self._store.set(key, entry, tag=row["model"])
                    self._store._sql("UPDATE Cache SET store_time = ? WHERE key = ? AND raw = 1", (stamp, key))
        counts["refused"] = sum(refused.values())
        counts["refused_reasons"] = dict(refused.most_common())
        return counts


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
    if row.get(PROMPT_COLUMN) is not None and type(row[PROMPT_COLUMN]) is not str:
        return "prompt is not text"
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
