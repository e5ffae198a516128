"""The on-disk answer cache: a rerun, a restarted notebook or a killed job never pays twice.

Key: sha256 over the canonical request (sorted-key JSON) + provider + model + sample index.
Inline images enter the key by the digest of their data, so renaming a file still hits and
editing it misses. Values are the raw response bytes behind a one-line JSON header carrying the
entry format version, so later releases can read old caches. Only HTTP 200 answers are stored:
a transient failure is never replayed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from enum import Enum
from functools import lru_cache
from typing import Any

import diskcache

ENTRY_FORMAT = 1


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


@lru_cache(maxsize=256)
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


def cache_key(body: Mapping[str, Any], *, provider: str, model: str, sample: int = 0) -> str:
    """The cache key of one request: stable across runs, processes and machines."""
    canonical = json.dumps(
        [ENTRY_FORMAT, provider, model, sample, _keyable(body)],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """A diskcache store of raw responses, safe to share between threads and processes."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = os.fspath(directory) if directory else default_cache_dir()
        # No size limit and no eviction: entries are answers someone paid for.
        self._store = diskcache.Cache(
            self.directory, size_limit=2**62, eviction_policy="none", cull_limit=0
        )

    def __repr__(self) -> str:
        return f"ResponseCache({self.directory!r})"

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Raw responses of the keys that are stored, in one SQLite transaction."""
        found: dict[str, bytes] = {}
        with self._store.transact():
            for key in keys:
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
        fmt = json.loads(header).get("format")
        if fmt != ENTRY_FORMAT:
            raise ValueError(f"cache entry format {fmt} is newer than this gemframe understands")
        return raw

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> int:
        """Remove every entry; returns how many were removed."""
        return self._store.clear()

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
