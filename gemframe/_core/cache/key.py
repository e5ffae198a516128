"""The cache key of a request, how a call uses the cache, and where the cache lives.

Key: sha256 over the canonical request (sorted-key JSON) + provider + model + sample index.
Inline images enter the key by the digest of their data, so renaming a file still hits and
editing it misses. Keys are pinned in tests/test_cache.py: they must not change between
releases, or every stored answer would be paid for again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from enum import Enum
from functools import lru_cache
from typing import Any

import orjson

ENTRY_FORMAT = 1  # the entry format version: part of every key and of every stored entry's header


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


class KnownDigest(dict[str, Any]):
    """An ``inlineData`` dict whose data's digest is known before its data is read (an image URL
    found in the URL store, `urls.UrlRecord.digest`): keyed by ``digest`` exactly as its data
    would be, so a cached rerun needs neither the image nor the network. Only a `Client.send`
    call makes one (JSON from users is plain dicts); it fills ``data`` in before sending."""

    __slots__ = ("digest", "size")
    digest: str  # declared for type checkers: __slots__ alone does not say the attribute's type
    size: int  # the image's bytes (`uploads` decides from it whether to upload the image)


def _digest_part(part: dict[str, Any]) -> dict[str, Any]:
    inline = part.get("inlineData")
    if isinstance(inline, KnownDigest):
        return {**part, "inlineData": {**inline, "data": inline.digest}}
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
