"""The emulator's context caching: ``cachedContents`` create/get/list/patch/delete, and
generate requests that name one (``"cachedContent": "cachedContents/<id>"``), in the real API's
shapes and with its messages.

A cache holds a model, contents and a system instruction (tools and toolConfig are accepted and
kept out of the count). Its ``usageMetadata.totalTokenCount`` is counted as a prompt is; under
the model's minimum (``min_tokens``: 4,096 for Pro models, 1,024 for the others, as the API's
documented minimums; one figure for all models when set) it is the API's 400 "Cached content is
too small. total_token_count=N, min_total_token_count=M". It expires ``ttl`` after creation (1 h
by default, as the API) or at ``expireTime``; PATCH moves only that; an expired cache is gone
(the API's 403 "CachedContent not found (or permission denied)").

A request naming a cache is answered as if the cache's system instruction and contents came
first: ``promptTokenCount`` includes them, ``cachedContentTokenCount`` and
``cacheTokensDetails`` report them. It may not set its own systemInstruction, tools or
toolConfig, and its model must be the cache's, as the API requires.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .answers import prompt_tokens
from .files import _page_size, _page_start, _token
from .timefmt import parse_duration, parse_timestamp, rfc3339
from .validation import (
    Config,
    ErrorAnswer,
    GenRequest,
    Turn,
    _bad_value,
    _fields,
    _invalid,
    parse_turns,
)

DEFAULT_TTL = 3600.0
PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
# Live caches at once, and the request bytes they were made from (each may be a 20 MiB body
# of inline images, kept): past either, creating one more is a 429 until some expire.
MAX_CACHES = 1000
CACHES_TOTAL_BYTES = 256 * 1024 * 1024
CACHE_FIELDS = frozenset(
    {
        "model",
        "contents",
        "system_instruction",
        "tools",
        "tool_config",
        "ttl",
        "expire_time",
        "display_name",
    }
)
UPDATE_FIELDS = frozenset({"name", "ttl", "expire_time"})
NOT_FOUND = "CachedContent not found (or permission denied)"
CONFLICT = (
    "CachedContent can not be used with GenerateContent request setting system_instruction, "
    "tools or tool_config.\n\nProposed fix: move those values to CachedContent from "
    "GenerateContent request."
)


def min_cache_tokens(model: str) -> int:
    """The API's documented minimum of a cache: 4,096 tokens for Pro models, 1,024 otherwise."""
    return 4096 if "-pro" in model.removeprefix("models/") else 1024


@dataclass
class StoredCache:
    name: str
    model: str  # models/<id>
    display_name: str
    system: Turn | None
    turns: tuple[Turn, ...]
    tokens: dict[str, int]  # by modality
    size: int  # bytes of the request body it was made from
    created: float
    updated: float
    expires: float


class CacheStore:
    """Cached contents of one emulator, on an injectable clock (``clock()`` -> epoch seconds)."""

    def __init__(self, clock: Callable[[], float], min_tokens: int | None = None) -> None:
        self.clock = clock
        self.min_tokens = min_tokens  # None: the API's per-model minimum (`min_cache_tokens`)
        self.caches: dict[str, StoredCache] = {}
        self.created = 0  # part of new ids, so ids never repeat
        self.lock = threading.RLock()  # batch jobs read caches from worker threads

    def create(
        self,
        body: dict[str, Any],
        size: int,
        check_model: Callable[[str], None],
        resolve: Callable[[GenRequest], GenRequest],
    ) -> dict[str, Any]:
        """A new cache from a CachedContent body of ``size`` bytes; ``check_model`` raises for
        an unknown model, ``resolve`` gives fileData parts their uploaded files."""
        fields = _fields(body, CACHE_FIELDS, "cached_content")
        model = fields.get("model")
        if not model or not isinstance(model, str):
            raise _invalid("* CachedContent.model: model is not specified\n")
        model = model if model.startswith("models/") else f"models/{model}"
        check_model(model.removeprefix("models/"))
        system, turns = parse_turns(fields)
        if system is None and not turns:
            raise _invalid("* CachedContent: contents or system_instruction must be set.\n")
        for key in ("tools", "tool_config"):
            value = fields.get(key)
            if value is not None and not isinstance(value, (list if key == "tools" else dict)):
                raise _bad_value(key, value, "list expected" if key == "tools" else "object expected")
        resolved = resolve(GenRequest(system, turns, Config()))
        counts = prompt_tokens(resolved)
        total, minimum = sum(counts.values()), self.min_tokens or min_cache_tokens(model)
        if total < minimum:
            raise _invalid(f"Cached content is too small. total_token_count={total}, min_total_token_count={minimum}")
        now = self.clock()
        expires = self._expiry(fields, now, default=DEFAULT_TTL)
        with self.lock:
            self._purge()
            held = sum(c.size for c in self.caches.values())
            if len(self.caches) >= MAX_CACHES or held + size > CACHES_TOTAL_BYTES:
                raise ErrorAnswer(
                    429,
                    (
                        f"Quota exceeded: at most {MAX_CACHES} cached contents of "
                        f"{CACHES_TOTAL_BYTES} request bytes in all at once; delete caches or let "
                        "them expire."
                    ),
                )
            self.created += 1
            digest = hashlib.sha256(f"{now}|{total}|{self.created}".encode()).hexdigest()
            name = f"cachedContents/{digest[:10]}{self.created:04d}"
            stored = StoredCache(
                name,
                model,
                str(fields.get("display_name") or ""),
                resolved.system,
                resolved.turns,
                counts,
                size,
                now,
                now,
                expires,
            )
            self.caches[name] = stored
            return self.resource(stored)

    def get(self, cache_id: str) -> dict[str, Any]:
        with self.lock:
            return self.resource(self._live(cache_id))

    def update(self, cache_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """PATCH: only the expiration (ttl or expireTime) of a cache can change."""
        fields = _fields(body, UPDATE_FIELDS | CACHE_FIELDS, "cached_content")
        others = sorted(set(fields) - UPDATE_FIELDS)
        if others:
            raise _invalid(
                f"Only the expiration (ttl or expire_time) of a CachedContent can be updated, not {others[0]}."
            )
        now = self.clock()
        expires = self._expiry(fields, now, default=None)
        with self.lock:
            stored = self._live(cache_id)
            stored.expires, stored.updated = expires, now
            return self.resource(stored)

    def delete(self, cache_id: str) -> dict[str, Any]:
        with self.lock:
            self.caches.pop(self._live(cache_id).name)
            return {}

    def list(self, page_size: str | None, page_token: str | None) -> dict[str, Any]:
        size = _page_size(page_size, PAGE_SIZE, MAX_PAGE_SIZE)
        with self.lock:
            self._purge()
            names = list(self.caches)
            start = _page_start(names, page_token)
            page = names[start : start + size]
            answer: dict[str, Any] = {"cachedContents": [self.resource(self.caches[n]) for n in page]}
            if start + size < len(names):
                answer["nextPageToken"] = _token(page[-1])
            return answer

    def resource(self, stored: StoredCache) -> dict[str, Any]:
        """The CachedContent resource (its contents are input only: never answered back)."""
        out: dict[str, Any] = {"name": stored.name, "model": stored.model}
        if stored.display_name:
            out["displayName"] = stored.display_name
        out.update(
            {
                "createTime": rfc3339(stored.created),
                "updateTime": rfc3339(stored.updated),
                "expireTime": rfc3339(stored.expires),
                "usageMetadata": {"totalTokenCount": sum(stored.tokens.values())},
            }
        )
        return out

    def apply(self, req: GenRequest, body: dict[str, Any], model: str) -> GenRequest:
        """A generate request naming a cache, with the cache's turns first and its tokens
        marked as cached; a request naming none unchanged."""
        name = body.get("cachedContent", body.get("cached_content"))
        if name is None:
            return req
        if not isinstance(name, str):
            raise _bad_value("cached_content", name, "TYPE_STRING")
        keys = ("systemInstruction", "system_instruction", "tools", "toolConfig", "tool_config")
        if any(body.get(key) is not None for key in keys):
            raise _invalid(CONFLICT)
        with self.lock:
            stored = self._live(name)
        if stored.model != f"models/{model}":
            raise _invalid(
                f"Model used by GenerateContent request (models/{model}) and CachedContent "
                f"({stored.model}) has to be the same."
            )
        return replace(
            req,
            system=stored.system,
            turns=stored.turns + req.turns,
            cached=tuple(stored.tokens.items()),
        )

    def _expiry(self, fields: dict[str, Any], now: float, default: float | None) -> float:
        ttl, expire = fields.get("ttl"), fields.get("expire_time")
        if ttl is not None and expire is not None:
            raise _invalid("* CachedContent.expiration: only one of ttl and expire_time may be set.\n")
        if ttl is not None:
            seconds = parse_duration(ttl, "cached_content.ttl")
            if seconds <= 0:
                raise _bad_value("cached_content.ttl", ttl, "a positive duration expected")
            return now + seconds
        if expire is not None:
            moment = parse_timestamp(expire, "cached_content.expire_time")
            if moment <= now:
                raise _invalid("* CachedContent.expire_time: expire_time must be in the future.\n")
            return moment
        if default is None:
            raise _invalid("* CachedContent.expiration: ttl or expire_time must be set.\n")
        return now + default

    def _live(self, name: str) -> StoredCache:
        self._purge()
        stored = self.caches.get(f"cachedContents/{name.removeprefix('cachedContents/')}")
        if stored is None:
            raise ErrorAnswer(403, NOT_FOUND)
        return stored

    def _purge(self) -> None:
        """Forget caches past their expireTime, as the API deletes them."""
        now = self.clock()
        for name in [n for n, c in self.caches.items() if now >= c.expires]:
            del self.caches[name]
