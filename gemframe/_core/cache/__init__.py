"""The on-disk answer cache: a rerun, a restarted notebook or a killed job never pays twice.

One concept a module, each importing only those above it in this list:

- `key`: the cache key of a request (canonical JSON), `CacheMode`, `default_cache_dir`.
- `entry`: what one stored entry is (a versioned header, with the prompt asked, + the raw
  answer) and what a stored answer must look like (`answer_problem`).
- `disk`: safe storage: diskcache reduced to raw bytes in a directory treated as hostile
  (no pickles, no links followed, settings pinned), corruption reported as `CacheCorruptError`.
- `manage`: management apart from the store: stats, clear, entries, export, import, `parse_when`.
- `store`: `ResponseCache`, the store a call uses (batched lookups and writes), inheriting
  the management methods.
- `urls`: `UrlStore`, the image URLs fetched (URL -> digest, validators; bytes once per digest).
"""

from .disk import MAX_ANSWER_BYTES, CacheCorruptError, CacheWarning, UnsafeCacheEntry
from .entry import answer_problem, prompt_text
from .key import ENTRY_FORMAT, CacheMode, KnownDigest, cache_key, default_cache_dir
from .manage import EXPORT_COLUMNS, NOT_AN_ANSWER, CacheManagement, parse_when
from .store import ResponseCache
from .urls import URL_EXPORT_COLUMNS, UrlRecord, UrlStore

__all__ = [
    "ENTRY_FORMAT",
    "EXPORT_COLUMNS",
    "MAX_ANSWER_BYTES",
    "NOT_AN_ANSWER",
    "URL_EXPORT_COLUMNS",
    "CacheCorruptError",
    "CacheManagement",
    "CacheMode",
    "CacheWarning",
    "KnownDigest",
    "ResponseCache",
    "UnsafeCacheEntry",
    "UrlRecord",
    "UrlStore",
    "answer_problem",
    "cache_key",
    "default_cache_dir",
    "parse_when",
    "prompt_text",
]
