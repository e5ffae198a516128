"""Rows to Gemini ``generateContent`` request bodies. Pure functions, no I/O but reading images.

A body is plain JSON-able data, exactly what the API receives::

    {"contents": [{"role": "user", "parts": [{"text": ...}, {"inlineData": {"mimeType", "data"}}]}],
     "systemInstruction": {"parts": [{"text": ...}]},
     "generationConfig": {...}, "safetySettings": [...]}

A row's ``history`` (earlier turns, see `gemframe._polars.conversation`) goes first in ``contents``;
model turns keep the ``thoughtSignature`` of each part exactly where the model put it.

Images may be a file path, an http(s) URL, raw bytes, a ``{"mime_type", "data"}`` dict (so a
reply's generated images can be fed back), or a list of those, all read by `read_image`; the same
"images" take PDFs, videos and audio files (`_SIGNATURES` lists the kinds). The MIME
type is sniffed from the bytes, never guessed from a file name. Reading and base64-encoding a file happens once per
distinct (path, size, mtime), so a thousand rows sharing one reference image cost one read.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import ipaddress
import os
import re
import socket
import stat
import uuid
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

from .._errors import ConfigError, InputError
from .cache.key import KnownDigest

if TYPE_CHECKING:
    from .schema import ResponseSchema

# The generationConfig fields of the v1beta API, camelCase.
GENERATION_CONFIG_KEYS = frozenset(
    {
        "stopSequences",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "responseModalities",
        "candidateCount",
        "maxOutputTokens",
        "temperature",
        "topP",
        "topK",
        "seed",
        "presencePenalty",
        "frequencyPenalty",
        "responseLogprobs",
        "logprobs",
        "thinkingConfig",
        "imageConfig",
        "mediaResolution",
        "speechConfig",
    }
)
# generationConfig.responseModalities values (the API's Modality enum, less UNSPECIFIED).
RESPONSE_MODALITIES = frozenset({"TEXT", "IMAGE", "AUDIO"})
# Sub-configs whose own keys are API field names (responseSchema's keys are user data: untouched).
_NESTED_CONFIGS = frozenset({"thinkingConfig", "imageConfig", "speechConfig"})

HARM_CATEGORIES = frozenset(
    {
        "HARM_CATEGORY_HARASSMENT",
        "HARM_CATEGORY_HATE_SPEECH",
        "HARM_CATEGORY_SEXUALLY_EXPLICIT",
        "HARM_CATEGORY_DANGEROUS_CONTENT",
        "HARM_CATEGORY_CIVIC_INTEGRITY",
    }
)
HARM_THRESHOLDS = frozenset(
    {
        "HARM_BLOCK_THRESHOLD_UNSPECIFIED",
        "BLOCK_LOW_AND_ABOVE",
        "BLOCK_MEDIUM_AND_ABOVE",
        "BLOCK_ONLY_HIGH",
        "BLOCK_NONE",
        "OFF",
    }
)

SUPPORTED_MIME = (
    "PNG, JPEG, WEBP, GIF, HEIC/HEIF, PDF, video (MP4, MOV, 3GP, AVI, WEBM, MPEG, FLV, WMV) "
    "or audio (WAV, MP3, AIFF, AAC, OGG, FLAC)"
)
_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"}
_HEIF_BRANDS = {b"mif1", b"msf1", b"heif"}
# ISO BMFF major brands of MP4 video (QuickTime is "qt  ", 3GPP "3g.."; M4A audio is not here:
# the API lists no audio/mp4).
_MP4_BRANDS = {b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"M4V ", b"mmp4"}
_MP4_BRANDS |= {b"dash", b"MSNV", b"XAVC", b"f4v "}
_ASF = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")  # the ASF header object's GUID (WMV)


def _mp3_frame(h: bytes) -> bool:
    """An MPEG audio layer III frame header: 11 sync bits, a version that exists, layer III, and a
    bitrate and sample rate that are not the reserved values."""
    return (
        len(h) >= 3
        and h[0] == 0xFF
        and h[1] & 0xE0 == 0xE0
        and (h[1] >> 3) & 3 != 1
        and (h[1] >> 1) & 3 == 1
        and h[2] >> 4 != 15
        and (h[2] >> 2) & 3 != 3
    )


# (MIME type, test of the file's first 64 bytes), first match wins: every kind the Gemini API
# documents for image, document, video and audio input, under the MIME names its docs give
# (https://ai.google.dev/gemini-api/docs/video, /audio, /image-understanding, /document-processing).
# A file is what its bytes say, never what its name says.
_SIGNATURES: tuple[tuple[str, Any], ...] = (
    ("image/png", lambda h: h.startswith(b"\x89PNG\r\n\x1a\n")),
    ("image/jpeg", lambda h: h.startswith(b"\xff\xd8\xff")),
    ("image/gif", lambda h: h.startswith((b"GIF87a", b"GIF89a"))),
    ("image/webp", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP"),
    ("image/heic", lambda h: h[4:8] == b"ftyp" and h[8:12] in _HEIC_BRANDS),
    ("image/heif", lambda h: h[4:8] == b"ftyp" and h[8:12] in _HEIF_BRANDS),
    ("application/pdf", lambda h: h.startswith(b"%PDF-")),
    ("video/mp4", lambda h: h[4:8] == b"ftyp" and h[8:12] in _MP4_BRANDS),
    ("video/mov", lambda h: h[4:8] == b"ftyp" and h[8:12] == b"qt  "),
    ("video/3gpp", lambda h: h[4:8] == b"ftyp" and h[8:10] == b"3g"),
    ("video/avi", lambda h: h[:4] == b"RIFF" and h[8:12] == b"AVI "),
    ("video/webm", lambda h: h.startswith(b"\x1a\x45\xdf\xa3") and b"\x42\x82\x84webm" in h),  # EBML, DocType webm
    ("video/mpeg", lambda h: h[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")),  # program stream, sequence
    ("video/x-flv", lambda h: h.startswith(b"FLV\x01")),
    ("video/wmv", lambda h: h.startswith(_ASF)),
    ("audio/wav", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WAVE"),
    ("audio/mp3", lambda h: h.startswith(b"ID3") or _mp3_frame(h)),
    ("audio/aiff", lambda h: h[:4] == b"FORM" and h[8:12] in (b"AIFF", b"AIFC")),
    ("audio/aac", lambda h: len(h) >= 2 and h[0] == 0xFF and h[1] & 0xF6 == 0xF0),  # ADTS: sync, layer 0
    ("audio/ogg", lambda h: h.startswith(b"OggS")),
    ("audio/flac", lambda h: h.startswith(b"fLaC")),
)


def sniff_mime(data: bytes) -> str | None:
    """The MIME type of image, PDF, video or audio bytes from their magic number (see
    `_SIGNATURES`), or None if they are none of the kinds the API takes."""
    head = bytes(data[:64])
    return next((mime for mime, test in _SIGNATURES if test(head)), None)


def _camel(key: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key)


def normalize_config(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A generationConfig with camelCase keys, validated; snake_case keys are accepted."""
    if not config:
        return None
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = _camel(str(key))
        if name not in GENERATION_CONFIG_KEYS:
            close = difflib.get_close_matches(name, sorted(GENERATION_CONFIG_KEYS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown generation config key {key!r}.{hint} Valid keys: {', '.join(sorted(GENERATION_CONFIG_KEYS))}."
            )
        if value is None:
            continue
        if name in _NESTED_CONFIGS and isinstance(value, Mapping):
            value = {_camel(str(k)): v for k, v in value.items()}
        elif name == "responseModalities":
            value = _modalities(key, value)
        elif name == "stopSequences" and isinstance(value, str):
            value = [value]
        out[name] = value
    return out or None


def _modalities(key: Any, value: Any) -> list[str]:
    """responseModalities upper-cased and checked: a wrong one (``["IMAGES"]``) would be a 400
    on every row, so it is one `ConfigError` before anything is sent."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{key} must be a list such as ['TEXT', 'IMAGE'], not {value!r}")
    out = []
    for item in items:
        name = str(item).upper()
        if name not in RESPONSE_MODALITIES:
            close = difflib.get_close_matches(name, sorted(RESPONSE_MODALITIES), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown response modality {item!r} in {key}.{hint} "
                f"Valid values: {', '.join(sorted(RESPONSE_MODALITIES))}."
            )
        out.append(name)
    return out


def _harm_name(value: str, prefix: str, allowed: frozenset[str], what: str) -> str:
    name = str(value).upper()
    if name not in allowed and prefix + name in allowed:
        name = prefix + name
    if name not in allowed:
        raise ConfigError(f"unknown safety {what} {value!r}; use one of {', '.join(sorted(allowed))}")
    return name


def normalize_safety(
    safety: Mapping[str, str] | Sequence[Mapping[str, str]] | None,
) -> list[dict[str, str]] | None:
    """safetySettings from ``{category: threshold}`` or a list of ``{category, threshold}``.

    Short names are accepted: ``{"harassment": "block_none"}``.
    """
    if not safety:
        return None
    pairs: Iterable[tuple[str, str]]
    if isinstance(safety, Mapping):
        pairs = safety.items()
    else:
        try:
            pairs = [(s["category"], s["threshold"]) for s in safety]
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                "safety settings must be {category: threshold} or a list of {'category': ..., 'threshold': ...} dicts"
            ) from exc
    return [
        {
            "category": _harm_name(c, "HARM_CATEGORY_", HARM_CATEGORIES, "category"),
            "threshold": _harm_name(t, "", HARM_THRESHOLDS, "threshold"),
        }
        for c, t in pairs
    ]


INLINE_LIMIT = 20 * 2**20
"""The API's limit on one request's inline data, in bytes; also the most gemframe reads into
memory of one image file or URL (a local file over it goes by the Files API: `LocalFile`)."""
FILES_LIMIT = 2 * 2**30
"""The Files API's limit per file, in bytes: "Files can be up to 2 GB each" (and 20 GB per
project, kept 48 hours), https://ai.google.dev/gemini-api/docs/files. The most a `LocalFile` may be."""
# Local files over this many bytes are not read into memory but streamed (`LocalFile`); a module
# constant so a test can send a small file down that path.
STREAM_ABOVE = INLINE_LIMIT
_DIGEST_CHUNK = 3 * 2**20  # a multiple of 3: the base64 of such chunks joins into the whole's
_MAX_REDIRECTS = 5
_URL_TIMEOUT = 30.0  # seconds to connect, and between two reads of a download
# Seconds one attempt at a URL may take in all. The read timeout above restarts with every byte,
# so a server sending one byte every 29 s would hold a row (or `gf.show`) for days; 20 MB in
# 120 s is 170 kB/s. Not tried again: a server that slow is not having a moment.
_URL_DEADLINE = 120.0
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Cloud metadata services hand out credentials: never fetched unless private URLs are allowed.
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_ALLOW_HINT = "gf.Client(..., allow_private_urls=True)"


def read_image(image: Any, *, allow_private_urls: bool = False) -> tuple[bytes, str]:
    """The bytes and sniffed MIME type of one image value: a file path, an http(s) URL, bytes,
    or a ``{"mime_type", "data"}`` / ``{"path"}`` struct (a reply's image).

    Every image gemframe reads comes through here (request parts, history parts, `gf.show`,
    `gf.save_images`, report thumbnails), so the checks live in one place: only regular files
    are opened (a directory, FIFO or device such as ``/dev/zero`` is refused before opening);
    at most `INLINE_LIMIT` bytes are read from a file or URL; URLs are fetched as `_download`
    says; the bytes must sniff as a supported type. Every problem is an `InputError` naming the
    value and what to do, and never quotes the bytes read.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _sniffed(bytes(image), "image bytes")
    if isinstance(image, Mapping):  # a reply image: {"mime_type", "data"} or {"path"}
        data = image.get("data")
        if data is None:
            if image.get("path") is None:
                raise InputError("image struct has neither data nor path; give one of them")
            return read_image(image["path"], allow_private_urls=allow_private_urls)
        if isinstance(data, str):
            data = _base64(data)
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            raise InputError(f"image struct data must be bytes or base64 text, not {type(data).__name__}")
        return _sniffed(bytes(data), "image struct data")
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if _URL_SCHEME.match(text):  # any scheme: _download refuses all but http(s)
            return _sniffed(_download(text, allow_private_urls), f"image URL {text!r}")
        return _sniffed(_read_file(text), f"image file {text!r}")
    raise InputError(
        f"unsupported image value of type {type(image).__name__}; use a path, URL, bytes, or a list of them"
    )


def _sniffed(data: bytes, origin: str) -> tuple[bytes, str]:
    mime = sniff_mime(data)
    if mime is None:  # say what it is not; its bytes may be anything (a key file): never quoted
        raise InputError(
            f"{origin} is not a {SUPPORTED_MIME} file ({len(data)} bytes); pass the bytes, path or URL of an image, "
            "a PDF, a video or an audio file"
        )
    return data, mime


def _base64(text: str) -> bytes:
    try:  # line breaks are common in base64 text; anything else outside the alphabet is an error
        return base64.b64decode("".join(text.split()), validate=True)
    except ValueError:
        raise InputError("image struct data is text but not valid base64; pass the image bytes") from None


def _read_file(path: str) -> bytes:
    """A regular file's bytes (`open_regular`), at most `INLINE_LIMIT` of them."""
    try:
        f, info = open_regular(path)
        with f:
            _check_size(info.st_size, f"image file {path!r}")
            data = f.read(INLINE_LIMIT + 1)
    except OSError as exc:
        raise InputError(f"cannot read image file {path!r}: {exc.strerror}") from None
    _check_size(len(data), f"image file {path!r}")
    return data


_BIG_FILE_HINT = (
    "gf.generate uploads a local file of up to 2 GB through the Files API "
    "(the Google provider, gf.Client(upload='auto'))"
)


_FILE_FIX = f"pass a smaller file, or pass its path to gf.generate: {_BIG_FILE_HINT}"
# A URL is never downloaded past the inline limit: a big one would be held in memory (and in
# the URL store) whole; a local copy is streamed to the Files API instead.
_URL_FIX = f"download it and pass the local file's path instead: {_BIG_FILE_HINT}"


def _check_size(size: int, origin: str, fix: str = _FILE_FIX) -> None:
    if size > INLINE_LIMIT:
        raise InputError(
            f"{origin} is larger than {INLINE_LIMIT // 2**20} MB, the most the API takes inline per request; {fix}"
        )


def _refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not fetched without ``allow_private_urls``, or None if it is public."""
    if address in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if not address.is_global:  # private, shared (CGNAT), reserved, unspecified, documentation
        return "a private or reserved address"
    return None


def _address_problem(host: str, addresses: Iterable[str], allow_private_urls: bool) -> str | None:
    """Why ``host`` (whose addresses these are) is not fetched, or None: every address must be
    public unless private URLs are allowed."""
    if allow_private_urls:
        return None
    for text in addresses:
        reason = _refusal(ipaddress.ip_address(text.split("%")[0]))
        if reason is not None:
            return (
                f"{host} {'is' if host == text else f'resolves to {text},'} {reason}; gemframe fetches only public "
                f"addresses unless the client allows private ones: {_ALLOW_HINT}"
            )
    return None


class _Unfetchable(OSError):
    """A host refused by `_CheckedResolver` (or one that does not resolve). An OSError, so aiohttp
    hands it back inside its connection error (``os_error``) and no connection is made; the
    text names the host and why, and `UrlFetcher` adds which URL."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _CheckedResolver:
    """aiohttp's resolver for image URLs: resolves a name once and returns exactly the addresses
    it checked, so the connection goes to a checked address (a DNS answer that changes between
    check and connect, DNS rebinding, cannot point it elsewhere). Refuses the name unless every
    address is public (or private URLs are allowed). aiohttp's DNS cache holds only what this
    returned. (IP literals skip resolvers: `UrlFetcher._check_hop` checks those.)"""

    def __init__(self, allow_private_urls: bool) -> None:
        self.allow_private_urls = allow_private_urls

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[dict[str, Any]]:
        import asyncio

        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise _Unfetchable(f"cannot resolve host {host!r}: {exc}") from None
        problem = _address_problem(host, dict.fromkeys(str(info[4][0]) for info in infos), self.allow_private_urls)
        if problem is not None:
            raise _Unfetchable(problem)
        numeric = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        return [
            {"hostname": host, "host": str(sockaddr[0]), "port": port, "family": fam, "proto": proto, "flags": numeric}
            for fam, _, proto, _, sockaddr in infos
        ]

    async def close(self) -> None:
        pass


class Fetched:
    """What fetching an image URL gave: its bytes and validators, or ``data`` None when a
    conditional request answered 304 Not Modified (the stored bytes still stand)."""

    __slots__ = ("data", "etag", "last_modified")

    def __init__(self, data: bytes | None, etag: str | None, last_modified: str | None) -> None:
        self.data, self.etag, self.last_modified = data, etag, last_modified


class _Transient(Exception):
    """A fault worth another attempt (a 429/5xx answer, a dropped connection, a timeout)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CHUNK = 2**16


class UrlFetcher:
    """Fetches image URLs on an event loop, defensively (the URL comes from data, maybe hostile):
    http(s) only; every address of the host (and of each redirect, followed by hand, at most
    `_MAX_REDIRECTS`, each checked again) must be public unless ``allow_private_urls``; the
    connection goes to a checked address (`_CheckedResolver`); at most `INLINE_LIMIT` bytes are
    read, counted while streaming; errors never quote the bytes read. Connections are pooled and
    kept alive, at most ``concurrency`` downloads run at once, and transient faults (429/5xx,
    dropped connections, timeouts) are tried again up to ``attempts`` times, ``delay(attempt,
    retry_after)`` seconds apart; one attempt may take ``deadline`` seconds in all (`_URL_DEADLINE`).
    Never sends the API key: its sessions are its own.
    Through a proxy (HTTP(S)_PROXY), which resolves names itself, the host's addresses are
    checked before the request; that check is all that can be done there."""

    def __init__(
        self,
        allow_private_urls: bool = False,
        *,
        concurrency: int = 32,
        attempts: int = 3,
        delay: Any = None,
        timeout: float = _URL_TIMEOUT,
        deadline: float | None = None,
    ) -> None:
        self.allow_private_urls = allow_private_urls
        self.deadline = _URL_DEADLINE if deadline is None else deadline
        self.concurrency = concurrency
        self.attempts = max(1, attempts)
        self.delay = delay or (
            lambda attempt, retry_after: retry_after if retry_after is not None else 0.25 * 2 ** (attempt - 1)
        )
        self.timeout = timeout
        self._sessions: dict[bool, Any] = {}  # proxied? -> aiohttp session, opened on the loop on first use
        self._slots: Any = None

    def _session(self, proxied: bool) -> Any:
        import aiohttp

        session = self._sessions.get(proxied)
        if session is None:
            connector = aiohttp.TCPConnector(
                limit=self.concurrency,
                resolver=None if proxied else _CheckedResolver(self.allow_private_urls),  # type: ignore[arg-type]
            )
            session = self._sessions[proxied] = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=self.timeout),
            )
        return session

    async def fetch(self, url: str, etag: str | None = None, last_modified: str | None = None) -> Fetched:
        """The URL's bytes (`Fetched`), or `InputError` saying why not. With ``etag`` /
        ``last_modified`` (from an earlier fetch) the request is conditional: unchanged, the
        answer is a `Fetched` without data."""
        import asyncio

        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        attempt = 0
        while True:
            attempt += 1
            async with self._slots:  # not held while waiting to try again
                try:
                    return await asyncio.wait_for(self._fetch_once(url, etag, last_modified), self.deadline)
                except _Transient as exc:
                    fault = exc
                except asyncio.TimeoutError:
                    raise InputError(
                        f"could not download image URL {url!r}: not fetched within {self.deadline:g} s (the server "
                        "sends too slowly); download it and pass the local file's path"
                    ) from None
            if attempt >= self.attempts:
                raise InputError(f"{fault.message} (tried {attempt} times)")
            await asyncio.sleep(self.delay(attempt, fault.retry_after))

    def _check_hop(self, target: Any, where: str) -> None:
        """What can be refused before connecting: the scheme, a metadata host name, an IP
        literal (which no resolver sees)."""
        if target.scheme not in ("http", "https"):
            raise InputError(f"{where}: only http and https URLs are fetched, not {target.scheme}:")
        host = target.raw_host or ""
        if not host:
            raise InputError(f"{where}: the URL has no host")
        if not self.allow_private_urls and host.lower().rstrip(".") in _METADATA_HOSTS:
            raise InputError(
                f"{where}: {host} is a cloud metadata host; gemframe does not fetch it unless the "
                f"client allows private URLs: {_ALLOW_HINT}"
            )
        try:
            ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return  # a name: `_CheckedResolver` checks its addresses
        problem = _address_problem(host, [host], self.allow_private_urls)
        if problem is not None:
            raise InputError(f"{where}: {problem}")

    async def _fetch_once(self, url: str, etag: str | None, last_modified: str | None) -> Fetched:
        import asyncio

        import aiohttp
        from yarl import URL

        from .http import _proxy_for

        headers = {}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        current = url
        for _ in range(_MAX_REDIRECTS + 1):
            where = f"image URL {url!r}" + (f" (redirected to {current!r})" if current != url else "")
            try:
                target = URL(current)
                self._check_hop(target, where)
                proxy = _proxy_for(target.scheme, target.raw_host or "")  # HTTP(S)_PROXY / NO_PROXY
                if proxy is not None:
                    await _CheckedResolver(self.allow_private_urls).resolve(target.raw_host or "", target.port or 0)
                async with self._session(proxy is not None).get(
                    target,
                    headers=headers,
                    proxy=proxy,
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    if status in _REDIRECTS and "Location" in response.headers:
                        current = str(target.join(URL(response.headers["Location"])))
                        continue
                    if status == 304 and headers:
                        return Fetched(None, etag, last_modified)
                    if status in _TRANSIENT_STATUS:
                        wait = response.headers.get("Retry-After", "")
                        raise _Transient(
                            f"could not download {where}: HTTP {status}", float(wait) if wait.isdigit() else None
                        )
                    if status >= 400:
                        raise InputError(f"could not download {where}: HTTP {status}")
                    if response.content_length is not None:
                        _check_size(response.content_length, where, _URL_FIX)
                    chunks, size = [], 0
                    async for chunk in response.content.iter_chunked(_CHUNK):
                        size += len(chunk)
                        if size > INLINE_LIMIT:
                            response.close()  # hang up: the rest is never read
                        _check_size(size, where, _URL_FIX)  # stops reading past the limit
                        chunks.append(chunk)
                    return Fetched(
                        b"".join(chunks), response.headers.get("ETag"), response.headers.get("Last-Modified")
                    )
            except (InputError, _Transient):
                raise
            except _Unfetchable as exc:  # through a proxy: checked above
                raise InputError(f"{where}: {exc.reason}") from None
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, _Unfetchable):
                    raise InputError(f"{where}: {exc.os_error.reason}") from None
                raise _Transient(f"could not download {where}: {type(exc).__name__}: {exc}") from None
            except (aiohttp.InvalidURL, ValueError) as exc:  # a bad URL or Location
                raise InputError(f"could not download {where}: not a valid URL ({exc})") from None
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise _Transient(f"could not download {where}: {type(exc).__name__} {exc}".rstrip()) from None
        raise InputError(f"image URL {url!r} redirected more than {_MAX_REDIRECTS} times; pass the final URL")

    async def aclose(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()


def _download(url: str, allow_private_urls: bool) -> bytes:
    """An image URL's bytes, fetched by a `UrlFetcher` of its own (see there for the rules).
    Synchronous, for readers outside a `Client` call (`gf.request`, `gf.estimate`, `gf.show`):
    the fetch runs on a private event loop in a helper thread, so it works from any thread,
    Jupyter's included. `Client` calls fetch through the executor's loop instead, concurrently."""
    import asyncio
    import concurrent.futures

    async def fetch() -> bytes:
        fetcher = UrlFetcher(allow_private_urls, concurrency=1)
        try:
            data = (await fetcher.fetch(url)).data
        finally:
            await fetcher.aclose()
        assert data is not None  # an unconditional request
        return data

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gemframe-url") as pool:
        return pool.submit(asyncio.run, fetch()).result()


def _inline(data: bytes, mime: str) -> dict[str, str]:
    return {"mimeType": mime, "data": base64.b64encode(data).decode("ascii")}


@lru_cache(maxsize=32)
def _inline_file(path: str, size: int, mtime_ns: int) -> dict[str, str]:
    """Read and encode a file once per (path, size, mtime): edits re-read, repeats do not."""
    return _inline(*read_image(path))


class LocalFile(KnownDigest):
    """The ``inlineData`` of a local file over `STREAM_ABOVE` bytes, as `Client.send` takes it
    (``RequestBuilder.build(..., defer_urls=True)``): its MIME type, and the digest its base64
    text would have inline (`KnownDigest`), so its cache key is the one it would have inline and
    a cached rerun reads nothing more. Its bytes are never held in memory: a call that uploads
    media streams the file to the Files API (`uploads`); one that cannot (no Files API,
    ``upload='never'``, Batch Mode) makes it that row's error. ``path``, ``mtime_ns`` and
    ``ino`` say which file was read: the upload checks it is still that file."""

    __slots__ = ("ino", "mtime_ns", "path")
    path: str
    mtime_ns: int
    ino: int

    def changed(self, info: os.stat_result) -> bool:
        """Whether ``info`` (a stat of the open file) says it is no longer the file read."""
        return (info.st_size, info.st_mtime_ns, info.st_ino) != (self.size, self.mtime_ns, self.ino)

    def where(self) -> str:
        return f"image file {self.path!r} ({self.size / 2**20:.1f} MB)"


def open_regular(path: str, what: str = "image file") -> tuple[BinaryIO, os.stat_result]:
    """A regular file, opened for reading, and its stat. Anything else is refused before it is
    opened (opening a FIFO blocks, reading /dev/zero never ends), and checked again once open:
    the path may have been swapped meanwhile. Raises `InputError` naming the path, or OSError."""
    info = os.stat(path)
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{what} {path!r} is a directory; pass the path of an image file")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(
            f"{what} {path!r} is not a regular file (a FIFO, device or socket); pass the path of an image file"
        )
    # Non-blocking (a FIFO swapped in after the stat does not hang the open), then checked again.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    f = open(fd, "rb")
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        f.close()
        raise InputError(f"{what} {path!r} is not a regular file; pass the path of an image file")
    return f, info


@lru_cache(maxsize=256)  # small entries (no bytes): a rerun in this process reads nothing
def _local_file(path: str, size: int, mtime_ns: int, ino: int) -> LocalFile:
    """A big local file as a `LocalFile`: its MIME type sniffed and its inline digest computed
    while streaming it (base64 of `_DIGEST_CHUNK`-byte chunks, a multiple of 3, concatenates to
    the base64 of the whole, so hashing those pieces gives `cache.key._data_digest` of the whole
    text without holding it), at most one chunk in memory. A file that changes while it is read
    is refused (its digest would name no version of it)."""
    where = f"image file {path!r}"
    if size > FILES_LIMIT:
        raise InputError(
            f"{where} is {size / 2**30:.2f} GB, over the {FILES_LIMIT // 2**30} GB the Files API takes per file; "
            "pass a smaller file"
        )
    hasher = hashlib.sha256()
    mime = None
    read = 0
    try:
        f, info = open_regular(path)
        with f:
            if (info.st_size, info.st_mtime_ns, info.st_ino) != (size, mtime_ns, ino):
                raise InputError(f"{where} changed while gemframe read it; run again once it is written")
            while chunk := f.read(_DIGEST_CHUNK):
                if mime is None:
                    mime = sniff_mime(chunk)
                    if mime is None:  # never quoted: its bytes may be anything
                        raise InputError(
                            f"{where} is not a {SUPPORTED_MIME} file ({size} bytes); "
                            "pass the path of an image, a PDF, a video or an audio file"
                        )
                read += len(chunk)
                if len(chunk) % 3 and read < size:  # a short read mid-file would break the joined base64
                    raise InputError(f"{where} changed while gemframe read it; run again once it is written")
                hasher.update(base64.b64encode(chunk))
            after = os.fstat(f.fileno())
    except OSError as exc:
        raise InputError(f"cannot read {where}: {exc.strerror}") from None
    if read != size or (after.st_size, after.st_mtime_ns) != (size, mtime_ns):
        raise InputError(f"{where} changed while gemframe read it; run again once it is written")
    inline = LocalFile(mimeType=mime)
    inline.digest, inline.size = "sha256:" + hasher.hexdigest(), size
    inline.path, inline.mtime_ns, inline.ino = path, mtime_ns, ino
    return inline


@lru_cache(maxsize=32)
def _inline_url(url: str, allow_private_urls: bool) -> dict[str, str]:
    return _inline(*read_image(url, allow_private_urls=allow_private_urls))


class UrlImage:
    """An image URL in a request body, not fetched yet (``RequestBuilder.build(...,
    defer_urls=True)``): `Client.send` fetches the URLs of many rows at once, through the URL
    store, and puts each one's ``inlineData`` in its place (`url_images`, `with_url_images`).
    Not JSON data, so a body still holding one can be neither sent nor shown by mistake."""

    __slots__ = ("url",)

    def __init__(self, url: str) -> None:
        self.url = url

    def __repr__(self) -> str:
        return f"UrlImage({self.url!r})"


def url_images(body: Mapping[str, Any]) -> list[str]:
    """The URLs of the `UrlImage` placeholders in a body, in order (repeats included)."""
    return [
        part["inlineData"].url
        for content in body.get("contents") or ()
        for part in content.get("parts") or ()
        if isinstance(part.get("inlineData"), UrlImage)
    ]


def with_url_images(body: dict[str, Any], inline_for: Any) -> dict[str, Any]:
    """The body with each `UrlImage` replaced by ``inline_for(url)`` (which raises InputError
    for a URL that could not be read); only what changes is copied."""
    contents = []
    for content in body["contents"]:
        parts = content.get("parts") or ()
        if any(isinstance(part.get("inlineData"), UrlImage) for part in parts):
            content = {
                **content,
                "parts": [
                    {**part, "inlineData": inline_for(part["inlineData"].url)}
                    if isinstance(part.get("inlineData"), UrlImage)
                    else part
                    for part in parts
                ],
            }
        contents.append(content)
    return {**body, "contents": contents}


def inline_data(image: Any, *, allow_private_urls: bool = False, defer_urls: bool = False) -> dict[str, str] | UrlImage:
    """One image value (path, URL, bytes or {mime_type, data} dict) as an ``inlineData`` dict
    (read by `read_image`). ``allow_private_urls`` lets URLs reach private, loopback,
    link-local and metadata addresses (`Client`'s option of that name). ``defer_urls`` (the
    body goes to `Client.send`): a URL is not fetched here but left as a `UrlImage` for
    `Client.send` to fetch, and a local file over the inline limit (up to `FILES_LIMIT`) is a
    `LocalFile` (digest, not bytes) for it to upload."""
    if isinstance(image, Mapping) and image.get("data") is None and image.get("path") is not None:
        image = image["path"]  # a reply image saved to a file: read (and cached) as a file
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if _URL_SCHEME.match(text):
            if defer_urls:
                return UrlImage(text)
            return _inline_url(text, allow_private_urls)
        try:
            info = os.stat(text)
        except OSError:
            info = None  # read_image says why
        if info is not None and stat.S_ISREG(info.st_mode):
            if defer_urls and info.st_size > STREAM_ABOVE:  # for Client.send: streamed, by file
                return _local_file(os.path.abspath(text), info.st_size, info.st_mtime_ns, info.st_ino)
            return _inline_file(os.path.abspath(text), info.st_size, info.st_mtime_ns)
    return _inline(*read_image(image, allow_private_urls=allow_private_urls))


_TURN_ROLES = ("user", "model")


def _history_part(
    part: Mapping[str, Any], where: str, allow_private_urls: bool = False, defer_urls: bool = False
) -> dict[str, Any] | None:
    """One history part (``text`` or an image as ``data``/``path``, maybe a signature)."""
    text, data, path = part.get("text"), part.get("data"), part.get("path")
    signature = part.get("thought_signature", part.get("thoughtSignature"))
    if sum(v is not None for v in (text, data, path)) > 1:
        raise InputError(f"{where} holds more than one of text, data and path; a part is one of them")
    out: dict[str, Any]
    if text is not None:
        if not isinstance(text, str):
            raise InputError(f"{where}: text must be a string, got {type(text).__name__}")
        out = {"text": text}
    elif data is not None or path is not None:
        out = {
            "inlineData": inline_data(
                data if data is not None else path, allow_private_urls=allow_private_urls, defer_urls=defer_urls
            )
        }
    elif signature is not None:
        out = {"text": ""}  # a signature-only part, as Gemini sometimes ends a turn
    else:
        return None
    if signature is not None:
        out["thoughtSignature"] = signature
    return out


def history_contents(
    history: Any, *, allow_private_urls: bool = False, defer_urls: bool = False
) -> list[dict[str, Any]]:
    """``contents`` entries for a row's history: a list of turns, each ``{"role", "parts"}``
    (parts as in `gemframe._polars.conversation.HISTORY_DTYPE`) or ``{"role", "text", "images"}``."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise InputError(f"history must be a list of turns, got {type(history).__name__}")
    contents = []
    for i, turn in enumerate(history):
        where = f"history turn {i + 1}"
        if turn is None:
            continue
        if not isinstance(turn, Mapping):
            raise InputError(f"{where} must be a struct/dict with role and parts, got {type(turn).__name__}")
        role = turn.get("role") or "user"
        if role not in _TURN_ROLES:
            raise InputError(f"{where} has role {role!r}; use 'user' or 'model'")
        parts: list[dict[str, Any]] = []
        if turn.get("parts") is not None:
            for j, part in enumerate(turn["parts"]):
                if part is not None:
                    built = _history_part(part, f"{where} part {j + 1}", allow_private_urls, defer_urls)
                    if built is not None:
                        parts.append(built)
        else:
            if turn.get("text") is not None:
                parts.append({"text": turn["text"]})
            parts.extend(image_parts(turn.get("images"), allow_private_urls=allow_private_urls, defer_urls=defer_urls))
        if not parts:
            hint = " (the reply it came from failed or was empty)" if role == "model" else ""
            raise InputError(f"{where} ({role}) has no parts{hint}")
        contents.append({"role": role, "parts": parts})
    return contents


def image_parts(images: Any, *, allow_private_urls: bool = False, defer_urls: bool = False) -> list[dict[str, Any]]:
    """Parts for a row's images value: None, one image, or a list of images (nulls skipped)."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [
            {"inlineData": inline_data(img, allow_private_urls=allow_private_urls, defer_urls=defer_urls)}
            for img in images
            if img is not None
        ]
    return [{"inlineData": inline_data(images, allow_private_urls=allow_private_urls, defer_urls=defer_urls)}]


def context_content(context: Any) -> dict[str, Any] | None:
    """The user turn of a `RequestSpec`'s ``context``: shared leading material sent before every
    row's own turns. Text (a ``str``) and files: a ``pathlib.Path`` (an image, PDF, video or audio file), bytes,
    or an image struct, alone or in a list. Files are read and checked here, once, and each
    problem is a `ConfigError` naming the item and the fix. A ``str`` is always text, never a
    path or a URL: an image URL is not fetched here (pass its bytes or a downloaded file), so
    the context reads nothing from the network and needs no ``allow_private_urls``."""
    if context is None:
        return None
    items = list(context) if isinstance(context, (list, tuple)) else [context]
    parts: list[dict[str, Any]] = []
    for n, item in enumerate(items):
        where = f"context item {n}" if len(items) > 1 else "context"
        if item is None:
            continue
        if isinstance(item, str):
            if item:
                parts.append({"text": item})
            continue
        if not isinstance(item, (bytes, bytearray, memoryview, os.PathLike, Mapping)):
            raise ConfigError(
                f"{where} is of type {type(item).__name__}; give text (str), a file as pathlib.Path, "
                "bytes or an image struct, or a list of them"
            )
        path = item.get("path") if isinstance(item, Mapping) and item.get("data") is None else None
        big = _size_of(item if isinstance(item, os.PathLike) else path)
        if big > INLINE_LIMIT:  # the context goes inline (or into a context cache), never by file
            raise ConfigError(
                f"{where} is a file of {big / 2**20:.1f} MB, over the {INLINE_LIMIT // 2**20} MB the API takes "
                "inline; pass it to gf.generate as images instead (images=pathlib.Path(...) sends it with every "
                f"row, uploaded once through the Files API: files of up to {FILES_LIMIT // 2**30} GB)"
            )
        if isinstance(path, str) and _URL_SCHEME.match(path):
            raise ConfigError(f"{where} is an image URL ({path!r}); the context fetches nothing: pass its bytes")
        try:
            parts.append({"inlineData": inline_data(item)})
        except InputError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if not parts:
        raise ConfigError("context is empty; give text or files, or leave context=None")
    return {"role": "user", "parts": parts}


def _size_of(path: Any) -> int:
    """The size of a local file (0 for anything else, or one that cannot be seen: its reader
    says why)."""
    if not isinstance(path, (str, os.PathLike)) or (isinstance(path, str) and _URL_SCHEME.match(path)):
        return 0
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


class RequestBuilder:
    """Builds request bodies for many rows sharing one system instruction, config and safety.

    The shared parts are validated and normalised once, at construction, so a bad config fails
    before any row is read. (`gemframe._core.spec.RequestSpec` makes its builder with
    `normalized`, from the parts it has already checked.)
    """

    def __init__(
        self,
        system: str | None = None,
        config: Mapping[str, Any] | None = None,
        safety: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
        response_schema: Any = None,
    ) -> None:
        schema = None
        if response_schema is not None:
            from .schema import response_schema as translate

            schema = translate(response_schema)
        self._share(system, normalize_config(config), normalize_safety(safety), schema)

    @classmethod
    def normalized(
        cls,
        system: str | None,
        config: dict[str, Any] | None,
        safety: list[dict[str, str]] | None,
        schema: ResponseSchema | None,
        context: dict[str, Any] | None = None,
    ) -> RequestBuilder:
        """A builder from parts already normalized (`normalize_config`, `normalize_safety`,
        a translated schema, `context_content`): they are not checked again."""
        builder = cls.__new__(cls)
        builder._share(system, config, safety, schema, context)
        return builder

    def _share(
        self,
        system: str | None,
        config: dict[str, Any] | None,
        safety: list[dict[str, str]] | None,
        schema: ResponseSchema | None,
        context: dict[str, Any] | None = None,
    ) -> None:
        self.system = system
        # One object, the first content of every body: a client caching it recognizes it by
        # identity (`gemframe._core.context`), and a row costs no copy of it.
        self.context = context
        self.config = config
        self.safety = safety
        self.schema = schema
        if schema is not None:
            self.config = _with_schema(config, schema.config)
        shared: dict[str, Any] = {}
        if system:
            shared["systemInstruction"] = {"parts": [{"text": system}]}
        if self.config:
            shared["generationConfig"] = self.config
        if self.safety:
            shared["safetySettings"] = self.safety
        self._shared = shared

    def build(
        self,
        prompt: str | None,
        images: Any = None,
        history: Any = None,
        *,
        allow_private_urls: bool = False,
        defer_urls: bool = False,
    ) -> dict[str, Any] | None:
        """The request body for one row (the shared context first, then its history), or None for a row with neither
        prompt nor images. ``allow_private_urls``: the `Client` option of that name (image URLs
        may reach private, loopback, link-local and metadata addresses). ``defer_urls``: image
        URLs are left as `UrlImage` placeholders, for `Client.send` to fetch (concurrently,
        remembered in the URL store) instead of being downloaded here, one at a time."""
        parts: list[dict[str, Any]] = []
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
            parts.append({"text": prompt})
        parts.extend(image_parts(images, allow_private_urls=allow_private_urls, defer_urls=defer_urls))
        if not parts:
            return None
        contents = [
            *((self.context,) if self.context is not None else ()),
            *history_contents(history, allow_private_urls=allow_private_urls, defer_urls=defer_urls),
            {"role": "user", "parts": parts},
        ]
        return {"contents": contents, **self._shared}


def _with_schema(config: dict[str, Any] | None, schema_config: dict[str, Any]) -> dict[str, Any]:
    """generationConfig plus a translated response schema; the schema may be given only once."""
    config = dict(config or {})
    for key in ("responseSchema", "responseJsonSchema"):
        if key in config:
            raise ConfigError(f"give the schema once: response_schema= or config[{key!r}], not both")
    mime = config.get("responseMimeType")
    if mime not in (None, "application/json"):
        raise ConfigError(f"response_schema= answers application/json, but config sets responseMimeType {mime!r}")
    return {**config, **schema_config}


def build_request(
    prompt: str | None,
    images: Any = None,
    *,
    history: Any = None,
    system: str | None = None,
    config: Mapping[str, Any] | None = None,
    safety: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
    response_schema: Any = None,
) -> dict[str, Any] | None:
    """The ``generateContent`` body for a single prompt (and images, after a history); None if
    prompt and images are both empty."""
    return RequestBuilder(system, config, safety, response_schema).build(prompt, images, history)


_SPLICE_MIN = 64 * 1024  # strings this long (inline images) are encoded apart, then joined in
_SPLICE_MARK = f"gemframe-splice-{uuid.uuid4().hex}"


def request_json(body: Any) -> bytes:
    """A request body as compact JSON bytes (what is sent, and what Batch Mode stores).

    Long strings (inline base64 images) are encoded on their own and joined into the encoding
    of the rest: encoding the whole body at once grows orjson's buffer by doubling through
    megabytes per request, which fragmented glibc's heap (bench 6, 200 distinct 2 MB images:
    386 vs 304 MiB peak RSS); a join allocates the result once, at its exact size."""
    long: list[str] = []
    skeleton = _set_aside(body, long)
    if not long:
        return orjson.dumps(body)
    head, *rest = orjson.dumps(skeleton).split(f'"{_SPLICE_MARK}"'.encode())
    pieces = [head]
    for text, tail in zip(long, rest):
        pieces += (orjson.dumps(text), tail)
    return b"".join(pieces)


def _set_aside(value: Any, long: list[str]) -> Any:
    """``value`` with each long string replaced by a marker (appended to ``long`` in document
    order); the same object when there is none."""
    if isinstance(value, str):
        if len(value) >= _SPLICE_MIN:
            long.append(value)
            return _SPLICE_MARK
        return value
    if isinstance(value, (dict, list)):
        copy = None  # made only when something changes: a text-only body allocates nothing
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            new = _set_aside(item, long)
            if new is not item:
                if copy is None:
                    copy = value.copy()
                copy[key] = new
        return value if copy is None else copy
    return value
