"""`ResponseCache`: the store a call reads and writes (batched lookups, one transaction per
batch of answers), safe to share between threads and processes. Management (stats, clear,
export, import) is inherited from `CacheManagement`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

from .disk import (
    _cache_method,
    open_store,
    read_entries,
    warn_refused,
)
from .entry import header_problem, pack, unpack
from .key import default_cache_dir
from .manage import CacheManagement


class ResponseCache(CacheManagement):
    """A diskcache store of raw responses, safe to share between threads and processes."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = os.fspath(directory) if directory else default_cache_dir()
        # No size limit and no eviction: entries are answers someone paid for. No memory map of
        # the database: it added up to 64 MiB to every long job's RSS for no measurable speed
        # (bench 4 and 5), reads go through SQLite's bounded page cache instead. Every setting
        # is pinned (see _SETTINGS) and values are raw bytes only (see _AnswerDisk).
        self._store = open_store(self.directory)

    def __repr__(self) -> str:
        return f"ResponseCache({self.directory!r})"

    @_cache_method
    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Raw responses of the keys that are stored: one SQL query per 500 keys, not one per
        key (diskcache's ``get`` costs ~2x the lookup itself). Entries diskcache keeps in files
        (large answers, e.g. images) are read from inside the directory only. A row gemframe
        did not write as it writes answers (a pickle, a planted file, a newer entry format) is a
        miss, with one warning per call."""
        entries, refused = read_entries(self._store, keys)
        found: dict[str, bytes] = {}
        for key, entry in entries.items():
            raw = unpack(entry)
            if raw is None:
                refused[header_problem(entry)] += 1
            else:
                found[key] = raw
        warn_refused(self.directory, refused)
        return found

    @_cache_method
    def set_many(self, entries: Iterable[tuple[str, str, bytes]], prompts: Mapping[str, str] | None = None) -> None:
        """Store (key, model, raw response) triples in one transaction; ``prompts`` (key -> the
        prompt asked, see `prompt_text`) go into the entries' headers, for exports."""
        created = int(time.time())
        prompts = prompts or {}
        with self._store.transact():
            for key, model, raw in entries:
                self._store.set(key, pack(model, created, raw, prompts.get(key)), tag=model)

    @_cache_method
    def __len__(self) -> int:
        return len(self._store)

    @_cache_method
    def contains_many(self, keys: Iterable[str]) -> set[str]:
        """The keys that are stored, without reading their answers (one transaction)."""
        with self._store.transact():
            return {key for key in keys if key in self._store}

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
