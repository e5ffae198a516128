"""The two HTTP sessions under the executor, behind one tiny interface (`request` -> `Reply`).

Real traffic goes straight to aiohttp's connection pool: measured here, httpx's request/response
models cost ~3x raw aiohttp's CPU per request even over aiohttp's transport (bench/PROFILE.md).
httpx stays the seam for everything that is not the network: the in-process emulator
(``httpx.ASGITransport``) and test transports (``httpx.MockTransport``).
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx

# A request body: bytes, or chunks read as they are sent (a big file streamed to the Files API).
Body = bytes | AsyncIterator[bytes] | None


@dataclass
class Reply:
    """A fully read HTTP answer (duck-types the parts of ``httpx.Response`` providers read)."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


# The userinfo of every URL in a text: from "scheme://" to the authority's last "@" (where yarl
# and urllib split it too, so a password holding "@" is hidden whole).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def redact_url(text: str) -> str:
    """``text`` (a URL, or a message holding URLs) as it may be shown: credentials in a URL
    (``https://user:pass@host/``) become ``https://***@host/``. Requests keep the real URL; every
    repr, error, log line, manifest and report shows this form."""
    return _USERINFO.sub(r"\1***@", text)


class TransportFailure(Exception):
    """No HTTP answer: ``status`` is ``TIMEOUT`` or ``CONNECTION_ERROR``."""

    def __init__(self, status: str, message: str) -> None:
        message = redact_url(message)  # aiohttp's and yarl's messages may quote the whole URL
        super().__init__(message)
        self.status = status
        self.message = message


@contextmanager
def _failures(timeout: float, timeouts: type[BaseException], errors: type[BaseException]) -> Iterator[None]:
    """A session library's exceptions as `TransportFailure`s, said the same way for both
    sessions: ``timeouts`` as TIMEOUT, other ``errors`` as CONNECTION_ERROR."""
    try:
        yield
    except timeouts:
        raise TransportFailure("TIMEOUT", f"no answer within {timeout:g}s") from None
    except errors as exc:
        raise TransportFailure("CONNECTION_ERROR", f"{type(exc).__name__}: {exc}") from None


@lru_cache(maxsize=64)
def _proxy_for(scheme: str, host: str) -> str | None:
    """The proxy from HTTP(S)_PROXY / NO_PROXY for a host, looked up once, not per request."""
    # typeshed omits proxy_bypass_environment (undocumented, but in CPython since 3.x): mypy is wrong here
    if urllib.request.proxy_bypass_environment(host):  # type: ignore[attr-defined]
        return None
    return urllib.request.getproxies_environment().get(scheme)


class AiohttpSession:
    """aiohttp's pool, sized to the concurrency; honours proxy environment variables.

    Redirects are never followed: aiohttp would re-send the session's headers (the API key) and,
    for a 307/308, the body to whatever origin ``Location`` names. A 3xx comes back as an answer
    and the provider says what it means (`Provider.failure`).
    """

    def __init__(self, headers: dict[str, str], max_connections: int, timeout: float) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 30.0)),
            trust_env=False,  # its per-request netrc/proxy lookups cost ~0.4 ms: see _proxy_for
        )
        self.timeout = timeout  # seconds a request may take (`request`'s ``timeout`` replaces it for one)

    async def request(
        self,
        method: str,
        url: str,
        content: Body = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """One request; ``headers`` are added to the session's (a Files API upload's).
        ``content`` may stream (a big file's upload; give its Content-Length in ``headers``),
        and ``timeout`` then replaces the session's for it (seconds for the whole exchange)."""
        parts = urlsplit(url)
        proxy = _proxy_for(parts.scheme, parts.hostname or "")
        limit = self.timeout if timeout is None else timeout
        own = {} if timeout is None else {"timeout": aiohttp.ClientTimeout(total=limit, connect=min(limit, 30.0))}
        with _failures(limit, asyncio.TimeoutError, aiohttp.ClientError):
            async with self._session.request(
                method, url, data=content, headers=headers, proxy=proxy, allow_redirects=False, **own
            ) as response:
                return Reply(response.status, response.headers, await response.read())

    async def aclose(self) -> None:
        await self._session.close()


class HttpxSession:
    """An ``httpx.AsyncClient`` over a given transport (the emulator's ASGI app, a mock).

    Like `AiohttpSession`, it never follows a redirect (httpx's default, pinned here)."""

    def __init__(self, transport: httpx.AsyncBaseTransport, headers: dict[str, str], timeout: float) -> None:
        self._client = httpx.AsyncClient(
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            follow_redirects=False,
        )
        self.timeout = timeout  # seconds a request may take (`request`'s ``timeout`` replaces it for one)

    async def request(
        self,
        method: str,
        url: str,
        content: Body = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Reply:
        limit = self.timeout if timeout is None else timeout
        with _failures(limit, httpx.TimeoutException, httpx.TransportError):
            response = await self._client.request(
                method,
                url,
                content=content,
                headers=headers,
                timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else httpx.Timeout(limit, connect=min(limit, 30.0)),
            )
            return Reply(response.status_code, response.headers, await response.aread())

    async def aclose(self) -> None:
        await self._client.aclose()
