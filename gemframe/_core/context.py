"""Context caching: a long shared prefix sent once, as an explicit ``cachedContents`` resource.

A `RequestSpec`'s system instruction and ``context`` (shared leading material: a document, a
PDF, reference images) start every row's request. With ``gf.Client(cache_context=True)`` (or a
TTL: ``"2h"``, seconds) the client puts that prefix into one ``cachedContents`` resource per
(model, prefix) on first need, and sends each row with ``"cachedContent": <name>`` and without
the prefix: the API bills the prefix's tokens at the cached-input rate, plus storage per hour.

- *One per job.* A `ContextCaches` belongs to a `Client` and keeps each cache while the client
  lives: polars' streaming engine calls `Client.send` once per morsel, and a cache per call
  would pay the prefix's creation each time. The client deletes its caches when it closes
  (``Client.close``, ``with``) and at process exit (``atexit``), unless
  ``keep_context_cache=True`` leaves them to expire at their TTL.
- *The answer cache does not see it.* A row's key is its logical request, the prefix inline
  (`RequestBuilder.build` puts it there); only the bytes sent differ (`RunContext.outgoing`),
  so turning caching on or off reruns from the cache.
- *Too small is not an error.* Under the model's minimum the API refuses the create call (400
  "Cached content is too small. total_token_count=N, min_total_token_count=M"): one warning,
  and the prefix goes inline with every row. Any other refusal that is not fatal for the whole
  run does the same; a fatal one (a bad key) raises as a row request would.
- *Gone mid-job.* A row whose cache expired or was deleted is answered 403 "CachedContent not
  found" (`providers.CACHE_GONE`): the client recreates the cache once and sends that row again.
- *Paid for.* Each cache is recorded (`CacheRecord`: name, model, tokens, created, deleted or
  expiry) so the manifest prices its creation (its tokens once, at the input rate) and its
  storage (tokens x hours alive x the ``cache_storage`` rate) beside the rows' own cost.

Providers declare the ``context_cache`` capability (`providers.CAPABILITIES`); a client asked
to cache on one without it (Segmind) is a `ConfigError` when it is made.
"""

from __future__ import annotations

import atexit
import hashlib
import re
import threading
import time
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import orjson

from .._errors import ConfigError, RowError, clip
from .executor import FOREVER, _json_object
from .http import TransportFailure
from .providers import CACHE_GONE, ContextCacheCapable, Provider

if TYPE_CHECKING:
    from .executor import Executor
    from .payload import RequestBuilder

DEFAULT_TTL = 3600.0  # the API's default, and what ``cache_context=True`` asks for
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$", re.IGNORECASE)
_NAME = re.compile(r"^cachedContents/[A-Za-z0-9_-]{1,128}$")
_TOO_SMALL = re.compile(r"total_token_count=(\d+), min_total_token_count=(\d+)")


def min_cache_tokens(model: str) -> int:
    """The smallest prefix the API caches, as documented: 4,096 tokens for Pro models, 1,024
    for the others (the estimate's guess; the create call's answer is what counts)."""
    return 4096 if "-pro" in model.removeprefix("models/") else 1024


def prefix_body(builder: RequestBuilder) -> dict[str, Any] | None:
    """A body of just a builder's prefix (system instruction and context), None without one:
    what a context cache holds, for counting its tokens."""
    system, turn = _prefix_of(builder)
    if system is None and turn is None:
        return None
    body: dict[str, Any] = {"contents": [turn] if turn is not None else []}
    if system is not None:
        body["systemInstruction"] = system
    return body


def context_ttl(value: Any, where: str = "cache_context") -> float | None:
    """Seconds a context cache lives, from the option: False/None (off), True (one hour), a
    number of seconds, or a string such as ``"90s"``, ``"30m"``, ``"2h"``, ``"1d"``."""
    if value is None or value is False:
        return None
    if value is True:
        return DEFAULT_TTL
    seconds: float | None = None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (found := _TTL.match(value)):
        seconds = float(found.group(1)) * _UNITS[found.group(2).lower()]
    if seconds is None or not seconds > 0 or seconds == float("inf"):
        raise ConfigError(
            f"{where} must be True (a one-hour cache), False, a TTL in seconds or a string "
            f"such as '30m' or '2h', not {value!r}"
        )
    return seconds


def _duration(seconds: float) -> str:
    """A google.protobuf.Duration in JSON: ``"3600s"``, ``"1.5s"``."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass
class CacheRecord:
    """One ``cachedContents`` resource a client created: what its cost is computed from."""

    name: str
    model: str
    tokens: int  # the cache's usageMetadata.totalTokenCount
    created: float  # epoch seconds
    expires: float  # created + TTL
    deleted: float | None = None  # when it was deleted, or found gone; None: alive, or left to expire

    @property
    def hours(self) -> float:
        """Hours it is stored: until deleted, else until it expires (what a kept cache costs)."""
        end = self.expires if self.deleted is None else min(self.deleted, self.expires)
        return round(max(0.0, end - self.created) / 3600, 6)  # as the manifest shows it: costs reproduce

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "tokens": self.tokens,
            "created": _stamp(self.created),
            "expires": _stamp(self.expires),
            "deleted": None if self.deleted is None else _stamp(self.deleted),
            "storage_hours": self.hours,
        }


class _Prefix:
    """One prefix of one model: its cache (or why it goes inline) and every cache made for it."""

    def __init__(self, model: str, system: dict[str, Any] | None, turn: dict[str, Any] | None) -> None:
        self.model = model
        self.system = system
        self.turn = turn
        self.lock = threading.Lock()  # one create at a time, whichever thread needs it first
        self.name: str | None = None
        self.inline = False  # the cache cannot be made: the prefix goes with every row
        self.records: list[CacheRecord] = []


def _prefix_of(builder: RequestBuilder) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(systemInstruction, context turn) of a builder's bodies, either may be None."""
    return builder._shared.get("systemInstruction"), builder.context


class ContextCaches:
    """The context caches of one `Client` (see the module docstring)."""

    def __init__(self, provider: Provider, executor: Executor, ttl: float | None, keep: bool) -> None:
        if ttl is not None:
            check_capable(provider)
        self.provider = provider
        self.executor = executor
        self.ttl = ttl
        self.keep = keep
        self.lock = threading.Lock()
        self.prefixes: dict[tuple[str, str], _Prefix] = {}
        self.digests: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self.at_exit = False

    def run(self, builder: RequestBuilder | None, model: str, ttl: float | None) -> RunContext | None:
        """What a `Client.send` call needs to send its rows' prefix by cache, or None when it
        sends everything inline (caching off, or a spec without a prefix)."""
        if ttl is None or builder is None:
            return None
        system, turn = _prefix_of(builder)
        if system is None and turn is None:
            return None
        key = (model.removeprefix("models/"), self._digest(builder, system, turn))
        with self.lock:
            prefix = self.prefixes.get(key)
            if prefix is None:
                prefix = self.prefixes[key] = _Prefix(key[0], system, turn)
        return RunContext(self, prefix, ttl)

    def _digest(self, builder: RequestBuilder, system: Any, turn: Any) -> str:
        """The prefix's digest, once per builder (a context may be megabytes)."""
        digest = self.digests.get(builder)
        if digest is None:
            digest = hashlib.sha256(orjson.dumps([system, turn])).hexdigest()
            self.digests[builder] = digest
        return digest

    def records(self, model: str, builder: RequestBuilder) -> list[CacheRecord]:
        """The caches made for a spec's prefix and model (recreated ones too), oldest first."""
        system, turn = _prefix_of(builder)
        if system is None and turn is None:
            return []
        prefix = self.prefixes.get((model.removeprefix("models/"), self._digest(builder, system, turn)))
        return list(prefix.records) if prefix is not None else []

    # --- on the sending thread ---------------------------------------------------------------

    def name(self, prefix: _Prefix, ttl: float, gone: str | None = None) -> str | None:
        """The cache of a prefix, created on first need; None when the prefix goes inline.
        ``gone``: the name a request was answered "not found" for: made anew (once: a thread
        finding it already replaced uses the new one)."""
        with prefix.lock:
            if gone is not None and prefix.name == gone:
                prefix.records[-1].deleted = time.time()
                prefix.name = None
            if prefix.name is None and not prefix.inline:
                prefix.name = self._create(prefix, ttl)
                prefix.inline = prefix.name is None
            return prefix.name

    def _create(self, prefix: _Prefix, ttl: float) -> str | None:
        body: dict[str, Any] = {"model": f"models/{prefix.model}", "ttl": _duration(ttl), "displayName": "gemframe"}
        if prefix.turn is not None:
            body["contents"] = [prefix.turn]
        if prefix.system is not None:
            body["systemInstruction"] = prefix.system
        url = cast(ContextCacheCapable, self.provider).cached_contents_url()
        try:
            response = self.executor.call("POST", url, orjson.dumps(body)).result(FOREVER)
        except TransportFailure as exc:
            return self._inline(prefix, f"the create call failed: {exc.status}: {exc.message}")
        if response.status_code != 200:
            failure = self.provider.failure(response)
            if failure.fatal is not None:  # a bad key, an unknown model: every row would fail so
                raise failure.as_api_error()
            small = _TOO_SMALL.search(failure.message)
            if small is not None:
                return self._inline(
                    prefix,
                    f"the prefix (system instruction and context) is {int(small.group(1)):,} tokens, under "
                    f"the {int(small.group(2)):,} tokens {prefix.model} caches at least",
                )
            return self._inline(prefix, f"the API refused it: {failure.code} {failure.status}: {failure.message}")
        answer = _json_object(response.content) or {}
        name, usage = answer.get("name"), answer.get("usageMetadata") or {}
        tokens = usage.get("totalTokenCount", 0) if isinstance(usage, dict) else None
        if not isinstance(name, str) or not _NAME.match(name) or type(tokens) is not int or tokens < 0:
            return self._inline(prefix, f"its answer is not a cachedContents resource: {clip(response.content, 200)}")
        now = time.time()
        prefix.records.append(CacheRecord(name, prefix.model, tokens, now, now + ttl))
        with self.lock:
            if not self.at_exit:  # a client never closed still deletes its caches
                atexit.register(self.close)
                self.at_exit = True
        return name

    @staticmethod
    def _inline(prefix: _Prefix, why: str) -> None:
        warnings.warn(
            f"context cache skipped for {prefix.model}: {why}; the prefix is sent inline with each row",
            UserWarning,
            stacklevel=2,
        )
        return None

    def close(self) -> None:
        """Delete the caches still alive (unless kept: they expire at their TTL); their records
        stay, for the manifest. A later call makes new ones. Safe to call twice; called at exit
        for a client never closed."""
        with self.lock:
            prefixes = list(self.prefixes.values())
            if self.at_exit:
                atexit.unregister(self.close)
                self.at_exit = False
        for prefix in prefixes:
            with prefix.lock:
                name, prefix.name = prefix.name, None
            if name is None or self.keep:
                continue
            url = cast(ContextCacheCapable, self.provider).cached_content_url(name)
            try:
                response = self.executor.call("DELETE", url).result(30)
            except Exception as exc:  # no answer: it expires at its TTL, as a kept one would
                warnings.warn(f"could not delete context cache {name} ({exc}); it expires at its TTL", stacklevel=2)
                continue
            gone = response.status_code != 200 and self.provider.failure(response).status == CACHE_GONE
            if response.status_code == 200 or gone:
                prefix.records[-1].deleted = time.time()
            else:
                warnings.warn(
                    f"could not delete context cache {name} ({response.status_code}); it expires at its TTL",
                    stacklevel=2,
                )


def check_capable(provider: Provider) -> None:
    """A `ConfigError` up front for a provider without ``cachedContents``."""
    if "context_cache" not in provider.capabilities:
        from .providers import providers_with

        raise ConfigError(
            f"provider {provider.name!r} has no context caching (cachedContents): drop cache_context= "
            "(the system instruction and context are then sent inline with every row) or use one of "
            f"{', '.join(providers_with('context_cache'))}"
        )


class RunContext:
    """One `Client.send` call's side of a prefix: strips it from outgoing bodies, names the
    cache instead, and sends a row again when its cache was gone."""

    def __init__(self, caches: ContextCaches, prefix: _Prefix, ttl: float) -> None:
        self.caches = caches
        self.prefix = prefix
        self.ttl = ttl
        self.sent: dict[str, tuple[dict[str, Any], str]] = {}  # key in flight -> (logical body, cache name)
        self.resent: set[str] = set()

    def _ours(self, body: Mapping[str, Any]) -> bool:
        """Whether a body starts with this prefix (and may name a cache: no tools of its own)."""
        if any(k in body for k in ("cachedContent", "tools", "toolConfig")):
            return False
        if body.get("systemInstruction") != self.prefix.system:
            return False
        turn = self.prefix.turn
        if turn is None:
            return True
        contents = body.get("contents")
        return isinstance(contents, list) and len(contents) > 1 and (contents[0] is turn or contents[0] == turn)

    def outgoing(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        """The body to send for a row: without the prefix and naming the cache, or as it is
        (inline) when the body is not this prefix's or the cache cannot be made."""
        if not self._ours(body):
            return body
        name = self.caches.name(self.prefix, self.ttl)
        if name is None:
            return body
        self.sent[key] = (body, name)
        return self._strip(body, name)

    def _strip(self, body: dict[str, Any], name: str) -> dict[str, Any]:
        out = {k: v for k, v in body.items() if k != "systemInstruction"}
        if self.prefix.turn is not None:
            out["contents"] = body["contents"][1:]
        out["cachedContent"] = name
        return out

    def retry(self, key: str, error: RowError | None) -> dict[str, Any] | None:
        """The body to send again for a row whose answer said its cache is gone (the cache
        made anew, once per row), or None: the answer stands."""
        held = self.sent.pop(key, None)
        if held is None or error is None or error.status != CACHE_GONE or key in self.resent:
            return None
        self.resent.add(key)
        body, name = held
        fresh = self.caches.name(self.prefix, self.ttl, gone=name)
        if fresh is None:
            return body
        self.sent[key] = (body, fresh)
        return self._strip(body, fresh)

    def forget(self, key: str) -> None:
        self.sent.pop(key, None)
