"""Endpoint dialects: where a request goes, how it is authenticated and wrapped, and what an
error answer means. One small class per dialect; everything else in gemframe is dialect-free.

- `GoogleAI`: ``POST {base}/v1beta/models/{model}:generateContent``, key in ``x-goog-api-key``.
- `Segmind`: ``POST {base}/v1/{slug}``, body nested under ``messages``, key in ``x-api-key``.
- ``"emulator"``: `gemframe.emulator.provider.EmulatorProvider`, the Google dialect answered
  in-process by the offline emulator. It registers itself (``import gemframe`` imports it), so
  this module, like the rest of the core, never imports the emulator.

Adding a provider
-----------------
A new provider is one module: subclass, declare capabilities, register::

    from gemframe._core.providers import Failure, Provider, register_provider

    @register_provider
    class Gateway(Provider):
        name = "gateway"                     # gf.Client("gateway"), --provider gateway
        default_base_url = "https://gateway.example"
        key_env = ("GATEWAY_API_KEY",)
        capabilities = frozenset()           # or {"batch", "count_tokens", "files"}, see CAPABILITIES

        def url(self, model): ...            # where a generate request goes
        def headers(self): ...               # auth and content type
        def failure(self, response): ...     # what a non-200 answer means (a `Failure`)
        # wrap(body) and transport() have defaults: the body unchanged, the real network.

`resolve_provider` looks names up in `PROVIDERS`; with no name it takes the first registered
provider whose key is set in the environment (Google, then Segmind), else the emulator.

`Provider` is an ABC rather than a `typing.Protocol` because a dialect inherits most of what it
does (the key from the environment, `check_key`, the plain-http warning, redirect handling, a
repr without the key): a Protocol would only describe the contract and leave every dialect to
re-implement those. Its abstract methods make a dialect missing ``url``, ``headers`` or
``failure`` fail when it is registered or built, not on its first request.

Capabilities are declared, never detected: batch mode, ``estimate(exact=True)`` and uploads look at
``provider.capabilities``, and `register_provider` checks that a class declaring one has the
methods it needs (`CAPABILITIES`), so a provider that inherits Google's URLs can still say it
has no Batch Mode.
"""

from __future__ import annotations

import difflib
import email.utils
import inspect
import ipaddress
import json
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

import httpx

from .._errors import (
    APIError,
    AuthenticationError,
    InsufficientCreditsError,
    NotFoundError,
    PermissionDeniedError,
    clip,
)
from .http import redact_url

DEFAULT_MODEL = "gemini-2.0-flash-preview-image-generation"

# Gemini model ids, for the "did you mean" of a 404 (the API's own message names no alternative).
# Not a gate: any id is sent as given, so a model released after this list works.
KNOWN_MODELS = (
    "gemini-3-pro-preview",
    "gemini-3-pro-image-preview",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "gemini-2.5-flash-lite",
    "gemini-2.5-flash-image",
    "gemini-2.5-flash-image-preview",
    "gemini-flash-latest",
    "gemini-flash-lite-latest",
    "gemini-pro-latest",
    "gemini-2.0-flash",
    "gemini-2.0-flash-lite",
    "gemini-2.0-flash-preview-image-generation",
    "gemini-2.0-flash-exp-image-generation",
    "gemini-1.5-pro",
    "gemini-1.5-flash",
    "gemini-1.5-flash-8b",
)
_NOT_FOUND_MODEL = re.compile(r"models/([\w.-]+) is not found")


def did_you_mean(message: str) -> str:
    """``Did you mean 'gemini-2.5-flash'? `` for a 404 naming a model close to a known one."""
    found = _NOT_FOUND_MODEL.search(message)
    if found is None:
        return ""
    close = difflib.get_close_matches(found.group(1), KNOWN_MODELS, n=1, cutoff=0.8)
    return f"Did you mean {close[0]!r}? " if close and close[0] != found.group(1) else ""


# Statuses worth another attempt: rate limits, timeouts and server-side trouble.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})

_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    410: "GONE",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "BAD_GATEWAY",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


@dataclass(frozen=True)
class Failure:
    """What a non-200 answer means for the row and for the run."""

    code: int
    status: str
    message: str
    retryable: bool = False
    retry_after: float | None = None  # seconds the server asked us to wait
    fatal: type[APIError] | None = None  # set when every row would fail the same way
    hint: str = ""

    def as_api_error(self) -> APIError:
        return (self.fatal or APIError).from_answer(self.code, self.status, self.message, self.hint)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _parse_reset_at(value: str | None, now: float | None = None) -> float | None:
    """Seconds until Segmind's ``x-rate-limit-reset-at-utc`` (ISO-8601 or epoch seconds)."""
    if not value:
        return None
    now = time.time() if now is None else now
    try:
        stamp = float(value)
        return max(0.0, (stamp / 1000 if stamp > 1e11 else stamp) - now)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def _google_retry_delay(details: Any) -> float | None:
    """``google.rpc.RetryInfo.retryDelay`` ("17s", "1.5s") from an error's details, in seconds."""
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("RetryInfo"):
            delay = str(detail.get("retryDelay", "")).rstrip("s")
            try:
                return float(delay)
            except ValueError:
                return None
    return None


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None


def _snippet(content: bytes) -> str:
    return clip(content, 200) or "(empty body)"


def _error_body(content: bytes) -> tuple[dict[str, Any], str]:
    """An error answer's ``error`` object ({} when it has none) and its message: the object's
    ``message``, else a plain ``{"error": "..."}`` string, else the start of the body."""
    data = _json_or_none(content)
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return error, str(error.get("message") or "")
    return {}, str(error) if error else _snippet(content)


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) and localhost: traffic that never leaves the machine."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


# What a provider may declare in ``capabilities``, and the methods each one needs.
CAPABILITIES: dict[str, tuple[str, ...]] = {
    # Batch Mode: create a job of inlined requests, poll it as an operation, list the jobs.
    "batch": ("batch_url", "operation_url", "batches_url"),
    # ``countTokens``: exact input tokens for ``estimate(exact=True)``.
    "count_tokens": ("count_tokens_url",),
    # Context caching: ``cachedContents`` create and delete, for ``gf.Client(cache_context=...)``.
    "context_cache": ("cached_contents_url", "cached_content_url"),
    # The Files API: media uploaded once (resumable upload) and sent as ``fileData`` (`uploads`).
    "files": ("upload_url", "file_url"),
}

# The status a row gets when the API answers that the ``cachedContent`` its request names is gone
# (expired, or deleted): gemframe's own name, so the client can tell it from a real permission
# problem (the API says 403 PERMISSION_DENIED for both) and recreate the cache.
CACHE_GONE = "CACHED_CONTENT_NOT_FOUND"
_CACHE_GONE_MESSAGE = re.compile(r"cached ?content\b.*not found", re.IGNORECASE)


class BatchCapable(Protocol):
    """The methods of a provider declaring "batch" (`register_provider` checked it has them): what
    `batch.BatchJobs` casts a provider to once it has checked ``provider.capabilities``."""

    def batch_url(self, model: str) -> str: ...
    def operation_url(self, name: str) -> str: ...
    def batches_url(self) -> str: ...


class CountTokensCapable(Protocol):
    """The method of a provider declaring "count_tokens", as `BatchCapable` for "batch"."""

    def count_tokens_url(self, model: str) -> str: ...


class ContextCacheCapable(Protocol):
    """The methods of a provider declaring "context_cache", as `BatchCapable` for "batch"."""

    def cached_contents_url(self) -> str: ...
    def cached_content_url(self, name: str) -> str: ...


class FilesCapable(Protocol):
    """The methods of a provider declaring "files", as `BatchCapable` for "batch"."""

    def upload_url(self) -> str: ...
    def file_url(self, name: str) -> str: ...


# The API's answer to a request naming a file that is gone (deleted, expired) or another
# project's: a 403 like a key's, but about that file only, so that row's (`uploads` uploads it
# again), never the run's.
MISSING_FILE = re.compile(r"access the File ([a-z0-9-]+) or it may not exist")


class Provider(ABC):
    """One endpoint dialect. Subclasses set the class attributes, implement ``url``,
    ``headers`` and ``failure``, and override what else differs (see the module docstring)."""

    name: ClassVar[str]
    default_base_url: ClassVar[str]
    key_env: ClassVar[tuple[str, ...]] = ()
    key_required: ClassVar[bool] = True
    capabilities: ClassVar[frozenset[str]] = frozenset()  # names from CAPABILITIES

    def __init__(self, api_key: str | None = None, base_url: str | None = None) -> None:
        self._api_key = api_key if api_key is not None else self._key_from_env()
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self._warned_hosts: set[str] = set()

    def __repr__(self) -> str:  # never the key, nor credentials in the base URL
        return f"{type(self).__name__}(base_url={self.display_base_url!r})"

    @property
    def display_base_url(self) -> str:
        """``base_url`` as it may be shown (repr, errors, logs, manifest): ``user:pass@`` in it
        becomes ``***@``. Requests use the real one."""
        return redact_url(self.base_url)

    def plaintext_host(self) -> str | None:
        """The host when a secret (the key, or credentials in ``base_url``) would cross the
        network unencrypted: ``http://`` to a host that is not loopback; else None."""
        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        secret = self.has_key or parts.username is not None or parts.password is not None
        if not secret or parts.scheme.lower() != "http" or _is_loopback(host):
            return None
        return host

    def warn_if_plaintext(self) -> None:
        """Warn (once per host, on the "gemframe" logger like the project's other warnings) that
        the key is about to be sent in clear text. Called when a session is opened, so a
        cache-only run says nothing."""
        host = self.plaintext_host()
        if host is not None and host not in self._warned_hosts:
            self._warned_hosts.add(host)
            logging.getLogger("gemframe").warning(
                "sending the API key over plain http:// to %s: anyone on the network path can read "
                "it; use an https:// base_url (only loopback hosts are exempt)",
                host,
            )

    def _key_from_env(self) -> str | None:
        return next((os.environ[v] for v in self.key_env if os.environ.get(v)), None)

    @property
    def has_key(self) -> bool:
        return bool(self._api_key)

    @property
    def secret(self) -> str | None:
        """The API key, for redaction checks; never log or print it."""
        return self._api_key

    def check_key(self) -> None:
        """Fail before sending anything when a key is required and none is configured."""
        if self.key_required and not self._api_key:
            env = " or ".join(self.key_env)
            raise AuthenticationError.from_answer(
                None,
                "UNAUTHENTICATED",
                f"no API key for provider {self.name!r}",
                f"Set {env}, pass api_key= to gf.Client, or use provider='emulator' to run offline.",
            )

    @abstractmethod
    def url(self, model: str) -> str:
        """The generate URL for a model."""

    @abstractmethod
    def headers(self) -> dict[str, str]:
        """Request headers, the key among them."""

    def wrap(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body as this endpoint expects it (Google's format is sent unchanged)."""
        return body

    def transport(self) -> httpx.AsyncBaseTransport | None:
        """An httpx transport to answer in-process (the emulator, a test mock), or None for the
        real network through aiohttp's connection pool."""
        return None

    @abstractmethod
    def failure(self, response: Any) -> Failure:
        """What a non-200 answer (an httpx.Response or anything with status_code, headers,
        content) means."""

    def _key_hint(self) -> str:
        where = f"{' or '.join(self.key_env)} (or api_key=)" if self.key_env else "api_key="
        return f"Check the API key in {where}."

    def _redirect(self, response: Any) -> Failure:
        """A 3xx. The sessions never follow one (the key, and for a 307/308 the body, would go to
        whatever origin ``Location`` names, and its answer would be cached as the API's). Fatal,
        not a row error: every request goes to the same base URL, so every row would be
        redirected the same way; the fix is the base URL, and going on would only repeat it."""
        location = redact_url(str(response.headers.get("location") or "(no Location header)"))[:300]
        message = f"the API answered with a redirect to {location}; gemframe does not follow redirects"
        hint = (
            f"Check base_url ({self.display_base_url}): if {location} is the API's real address "
            "and you trust it, set base_url to it."
        )
        return Failure(response.status_code, "REDIRECT", message, fatal=APIError, hint=hint)


# name -> class, in registration order. GoogleAI and Segmind register below; EmulatorProvider
# registers itself under "emulator" in gemframe/emulator/provider.py.
PROVIDERS: dict[str, type[Provider]] = {}


def register_provider(cls: type[Provider]) -> type[Provider]:
    """Make a provider class reachable by its ``name`` (``gf.Client(name)``, ``--provider``);
    usable as a class decorator. Fails at once, not on the first request, when the class is
    abstract, declares an unknown capability, lacks a declared capability's methods, or takes
    a name another class holds."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(f"{cls.__qualname__}.name must be a non-empty lower-case string")
    if inspect.isabstract(cls):
        abstract = ", ".join(sorted(cls.__abstractmethods__))
        raise TypeError(f"provider {name!r} ({cls.__qualname__}) does not implement {abstract}")
    unknown = set(cls.capabilities) - set(CAPABILITIES)
    if unknown:
        raise ValueError(
            f"provider {name!r} declares unknown capabilities {sorted(unknown)}; known: {', '.join(CAPABILITIES)}"
        )
    for capability in sorted(cls.capabilities):
        missing = [m for m in CAPABILITIES[capability] if not callable(getattr(cls, m, None))]
        if missing:
            raise TypeError(f"provider {name!r} declares {capability!r} but has no {', '.join(missing)}")
    held = PROVIDERS.get(name)
    if held is not None and _qualified(held) != _qualified(cls):  # the same class re-imported is fine
        raise ValueError(f"provider name {name!r} is already registered by {_qualified(held)}")
    PROVIDERS[name] = cls
    return cls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def providers_with(capability: str) -> list[str]:
    """Names of the registered providers that declare a capability, for error messages."""
    return [name for name, cls in PROVIDERS.items() if capability in cls.capabilities]


@register_provider
class GoogleAI(Provider):
    """Google's Gemini API (AI Studio keys)."""

    name = "google"
    default_base_url = "https://generativelanguage.googleapis.com"
    key_env: ClassVar[tuple[str, ...]] = ("GEMINI_API_KEY", "GOOGLE_API_KEY")  # typed: subclasses may set other keys
    capabilities = frozenset({"batch", "count_tokens", "context_cache", "files"})

    def url(self, model: str) -> str:
        return f"{self.base_url}/v1beta/models/{model.removeprefix('models/')}:generateContent"

    def cached_contents_url(self) -> str:
        """Context caching: create a ``cachedContents`` resource (POST), list them (GET)."""
        return f"{self.base_url}/v1beta/cachedContents"

    def cached_content_url(self, name: str) -> str:
        """One ``cachedContents/...`` resource (GET, PATCH, DELETE)."""
        return f"{self.base_url}/v1beta/{name}"

    def headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self._api_key:
            headers["x-goog-api-key"] = self._api_key
        return headers

    def batch_url(self, model: str) -> str:
        """Batch Mode: create a job of inlined requests."""
        return f"{self.base_url}/v1beta/models/{model.removeprefix('models/')}:batchGenerateContent"

    def operation_url(self, name: str) -> str:
        """A batch job (``batches/...``) as a long-running operation."""
        return f"{self.base_url}/v1beta/{name}"

    def batches_url(self) -> str:
        return f"{self.base_url}/v1beta/batches"

    def count_tokens_url(self, model: str) -> str:
        """``countTokens``: a request's input tokens, free, without generating."""
        return f"{self.base_url}/v1beta/models/{model.removeprefix('models/')}:countTokens"

    def upload_url(self) -> str:
        """The Files API: start a resumable upload."""
        return f"{self.base_url}/upload/v1beta/files"

    def file_url(self, name: str) -> str:
        """The Files API: one file (``files/...``), to get or delete."""
        return f"{self.base_url}/v1beta/{name}"

    def failure(self, response: Any) -> Failure:
        code = response.status_code
        if 300 <= code < 400:
            return self._redirect(response)
        error, message = _error_body(response.content)
        status = str(error.get("status") or _GOOGLE_STATUS.get(code, "UNKNOWN"))
        details = error.get("details")
        retry_after = _google_retry_delay(details)
        if retry_after is None:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
        reasons = {d.get("reason") for d in details or [] if isinstance(d, dict)}
        fatal: type[APIError] | None = None
        hint = ""
        if code in (403, 404) and _CACHE_GONE_MESSAGE.search(message):
            # The cachedContent a request names expired or was deleted: that row's problem (the
            # client recreates the cache and sends it again), not a key that may use nothing.
            return Failure(code, CACHE_GONE, message)
        if code == 401 or "API_KEY_INVALID" in reasons or "API key not valid" in message:
            fatal, hint = AuthenticationError, self._key_hint()
        elif code == 403 and MISSING_FILE.search(message):
            pass  # one row's file is gone: that row's error (see MISSING_FILE)
        elif code == 403:
            if self._api_key:
                fatal, hint = PermissionDeniedError, "The key is not allowed to use this model."
            else:
                fatal, hint = AuthenticationError, self._key_hint()
        elif code in (404, 410):
            fatal, hint = (
                NotFoundError,
                f"{did_you_mean(message)}Check the model name and base URL ({self.display_base_url}).",
            )
        elif code == 405:
            fatal, hint = APIError, f"Check the base URL ({self.display_base_url})."
        return Failure(code, status, message, code in RETRYABLE_STATUS, retry_after, fatal, hint)


# Google model ids that Segmind serves under its own slug.
SEGMIND_SLUGS = {
    "gemini-2.0-flash-preview-image-generation": "gemini-2-flash-image-generation",
    "gemini-2.0-flash-exp-image-generation": "gemini-2-flash-image-generation",
}


@register_provider
class Segmind(Provider):
    """Segmind's gateway: the Gemini body under ``messages``, one URL per model slug.

    The gateway documents the key in ``x-api-key`` and refuses it as a bearer token, while the
    model page shows ``Authorization: Bearer``; ``auth_header="authorization"`` switches.
    """

    name = "segmind"
    default_base_url = "https://api.segmind.com"
    key_env = ("SEGMIND_API_KEY",)

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        auth_header: str = "x-api-key",
    ) -> None:
        super().__init__(api_key, base_url)
        if auth_header.lower() not in ("x-api-key", "authorization"):
            raise ValueError("auth_header must be 'x-api-key' or 'authorization'")
        self.auth_header = auth_header.lower()

    def url(self, model: str) -> str:
        return f"{self.base_url}/v1/{SEGMIND_SLUGS.get(model, model)}"

    def headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self._api_key:
            if self.auth_header == "authorization":
                headers["authorization"] = f"Bearer {self._api_key}"
            else:
                headers["x-api-key"] = self._api_key
        return headers

    def wrap(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = dict(body)
        system = messages.pop("systemInstruction", None)
        if system is not None:  # Segmind's page: system_instruction.parts is one object
            parts = system.get("parts") or [{}]
            messages = {"system_instruction": {"parts": parts[0]}, **messages}
        return {"messages": messages}

    def failure(self, response: Any) -> Failure:
        code = response.status_code
        if 300 <= code < 400:
            return self._redirect(response)
        _, message = _error_body(response.content)  # Segmind's own, or a Google-shaped body passed through
        status = _GOOGLE_STATUS.get(code, "UNKNOWN")
        retry_after = _parse_reset_at(response.headers.get("x-rate-limit-reset-at-utc"))
        if retry_after is None:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
        fatal: type[APIError] | None = None
        hint = ""
        lowered = message.lower()
        if code == 401:
            fatal, hint = AuthenticationError, self._key_hint()
        elif code == 403:
            fatal, hint = PermissionDeniedError, "Your Segmind account or team may not use this model."
        elif code in (404, 410):
            what = "retired" if code == 410 else "not found"
            fatal, hint = NotFoundError, f"Model {what}: check the model slug and base URL ({self.display_base_url})."
        elif code == 406 and "content-type" in lowered.replace(" ", "-"):
            fatal, hint = APIError, "The request lacked a JSON Content-Type (a proxy may strip it)."
        elif code == 406:
            status = "INSUFFICIENT_CREDITS"
            fatal, hint = InsufficientCreditsError, "Top up Segmind credits or raise the team spend limit."
        elif code == 405:
            fatal, hint = APIError, f"Check the base URL ({self.display_base_url})."
        return Failure(code, status, message, code in RETRYABLE_STATUS, retry_after, fatal, hint)


def __getattr__(name: str) -> Any:
    """``gemframe._core.providers.EmulatorProvider``, as before it moved to the emulator package:
    looked up in the registry, so this module still never imports the emulator."""
    if name == "EmulatorProvider" and "emulator" in PROVIDERS:
        return PROVIDERS["emulator"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_provider(provider: str | Provider | None, **options: Any) -> Provider:
    """A provider instance from a name, an instance, or the environment.

    With no name: ``GEMFRAME_PROVIDER``, else the first registered provider whose key is set
    (Google if a Gemini key is set, else Segmind if a Segmind key is set), else the offline
    emulator.
    """
    if isinstance(provider, Provider):
        return provider
    if provider is None:
        keyed = [p for p in PROVIDERS.values() if p.key_env]
        provider = os.environ.get("GEMFRAME_PROVIDER") or next(
            (p.name for p in keyed if any(os.environ.get(v) for v in p.key_env)),
            "emulator",
        )
        if provider == "emulator":
            *others, last = [v for p in keyed for v in p.key_env] or ["an API key"]
            names = f"{', '.join(others)} or {last}" if others else last
            logging.getLogger("gemframe").warning(
                "no %s set: answering with the offline emulator (its replies say model_version "
                "'emulator-...'); pass provider= to choose",
                names,
            )
    try:
        cls = PROVIDERS[provider.lower()]
    except KeyError:
        if str(provider).lower().startswith(("gemini", "models/")):  # a model id where the provider goes
            hint = f"; {provider!r} is a model id: pass it as model={provider!r} (to gf.Client or gf.generate)"
        else:
            close = difflib.get_close_matches(str(provider).lower(), list(PROVIDERS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}{hint}") from None
    return cls(**options)
