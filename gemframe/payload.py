"""Rows to Gemini ``generateContent`` request bodies. Pure functions, no I/O but reading images.

A body is plain JSON-able data, exactly what the API receives::

    {"contents": [{"role": "user", "parts": [{"text": ...}, {"inlineData": {"mimeType", "data"}}]}],
     "systemInstruction": {"parts": [{"text": ...}]},
     "generationConfig": {...}, "safetySettings": [...]}

A row's ``history`` (earlier turns, see `gemframe.conversation`) goes first in ``contents``;
model turns keep the ``thoughtSignature`` of each part exactly where the model put it.

Images may be a file path, an http(s) URL, raw bytes, a ``{"mime_type", "data"}`` dict (so a
reply's generated images can be fed back), or a list of those. The MIME type is sniffed from the
bytes, never guessed from a file name. Reading and base64-encoding a file happens once per
distinct (path, size, mtime), so a thousand rows sharing one reference image cost one read.
"""

from __future__ import annotations

import base64
import difflib
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import orjson

from .errors import ConfigError, InputError

# The generationConfig fields of the v1beta API, camelCase.
GENERATION_CONFIG_KEYS = frozenset(
    {
        "stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema",
        "responseModalities", "candidateCount", "maxOutputTokens", "temperature", "topP", "topK",
        "seed", "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs",
        "thinkingConfig", "imageConfig", "mediaResolution", "speechConfig",
    }
)
# Sub-configs whose own keys are API field names (responseSchema's keys are user data: untouched).
_NESTED_CONFIGS = frozenset({"thinkingConfig", "imageConfig", "speechConfig"})

HARM_CATEGORIES = frozenset(
    {
        "HARM_CATEGORY_HARASSMENT", "HARM_CATEGORY_HATE_SPEECH",
        "HARM_CATEGORY_SEXUALLY_EXPLICIT", "HARM_CATEGORY_DANGEROUS_CONTENT",
        "HARM_CATEGORY_CIVIC_INTEGRITY",
    }
)
HARM_THRESHOLDS = frozenset(
    {
        "HARM_BLOCK_THRESHOLD_UNSPECIFIED", "BLOCK_LOW_AND_ABOVE", "BLOCK_MEDIUM_AND_ABOVE",
        "BLOCK_ONLY_HIGH", "BLOCK_NONE", "OFF",
    }
)

SUPPORTED_MIME = "PNG, JPEG, WEBP, GIF, HEIC/HEIF or PDF"
_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"}
_HEIF_BRANDS = {b"mif1", b"msf1", b"heif"}


def sniff_mime(data: bytes) -> str | None:
    """The MIME type of image/document bytes from their magic number, or None if unsupported."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        if head[8:12] in _HEIC_BRANDS:
            return "image/heic"
        if head[8:12] in _HEIF_BRANDS:
            return "image/heif"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    return None


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
                f"unknown generation config key {key!r}.{hint} "
                f"Valid keys: {', '.join(sorted(GENERATION_CONFIG_KEYS))}."
            )
        if value is None:
            continue
        if name in _NESTED_CONFIGS and isinstance(value, Mapping):
            value = {_camel(str(k)): v for k, v in value.items()}
        elif name == "responseModalities":
            value = [str(m).upper() for m in ([value] if isinstance(value, str) else value)]
        elif name == "stopSequences" and isinstance(value, str):
            value = [value]
        out[name] = value
    return out or None


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
                "safety settings must be {category: threshold} or a list of "
                "{'category': ..., 'threshold': ...} dicts"
            ) from exc
    return [
        {
            "category": _harm_name(c, "HARM_CATEGORY_", HARM_CATEGORIES, "category"),
            "threshold": _harm_name(t, "", HARM_THRESHOLDS, "threshold"),
        }
        for c, t in pairs
    ]


def _inline(data: bytes, origin: str) -> dict[str, str]:
    mime = sniff_mime(data)
    if mime is None:
        raise InputError(
            f"{origin} is not a {SUPPORTED_MIME} file (starts with {data[:8]!r}); "
            "pass image bytes or a path to an image"
        )
    return {"mimeType": mime, "data": base64.b64encode(data).decode("ascii")}


@lru_cache(maxsize=32)
def _inline_file(path: str, size: int, mtime_ns: int) -> dict[str, str]:
    """Read and encode a file once per (path, size, mtime): edits re-read, repeats do not."""
    with open(path, "rb") as f:
        return _inline(f.read(), f"image file {path!r}")


@lru_cache(maxsize=32)
def _inline_url(url: str) -> dict[str, str]:
    import httpx

    try:
        response = httpx.get(url, follow_redirects=True, timeout=30.0)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise InputError(f"could not download image {url!r}: {exc}") from None
    return _inline(response.content, f"image URL {url!r}")


def inline_data(image: Any) -> dict[str, str]:
    """One image value (path, URL, bytes or {mime_type, data} dict) as an ``inlineData`` dict."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _inline(bytes(image), "image bytes")
    if isinstance(image, Mapping):  # a reply image: {"mime_type", "data"} or {"path"}
        data = image.get("data")
        if isinstance(data, str):
            data = base64.b64decode(data)
        return inline_data(data if data is not None else image.get("path"))
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if text.startswith(("http://", "https://")):
            return _inline_url(text)
        try:
            stat = os.stat(text)
        except OSError as exc:
            raise InputError(f"cannot read image file {text!r}: {exc.strerror}") from None
        return _inline_file(os.path.abspath(text), stat.st_size, stat.st_mtime_ns)
    raise InputError(
        f"unsupported image value of type {type(image).__name__}; "
        "use a path, URL, bytes, or a list of them"
    )


_TURN_ROLES = ("user", "model")


def _history_part(part: Mapping[str, Any], where: str) -> dict[str, Any] | None:
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
        out = {"inlineData": inline_data(data if data is not None else path)}
    elif signature is not None:
        out = {"text": ""}  # a signature-only part, as Gemini sometimes ends a turn
    else:
        return None
    if signature is not None:
        out["thoughtSignature"] = signature
    return out


def history_contents(history: Any) -> list[dict[str, Any]]:
    """``contents`` entries for a row's history: a list of turns, each ``{"role", "parts"}``
    (parts as in `gemframe.conversation.HISTORY_DTYPE`) or ``{"role", "text", "images"}``."""
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
                    built = _history_part(part, f"{where} part {j + 1}")
                    if built is not None:
                        parts.append(built)
        else:
            if turn.get("text") is not None:
                parts.append({"text": turn["text"]})
            parts.extend(image_parts(turn.get("images")))
        if not parts:
            hint = " (the reply it came from failed or was empty)" if role == "model" else ""
            raise InputError(f"{where} ({role}) has no parts{hint}")
        contents.append({"role": role, "parts": parts})
    return contents


def image_parts(images: Any) -> list[dict[str, Any]]:
    """Parts for a row's images value: None, one image, or a list of images (nulls skipped)."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [{"inlineData": inline_data(img)} for img in images if img is not None]
    return [{"inlineData": inline_data(images)}]


class RequestBuilder:
    """Builds request bodies for many rows sharing one system instruction, config and safety.

    The shared parts are validated and normalised once, at construction, so a bad config fails
    before any row is read.
    """

    def __init__(
        self,
        system: str | None = None,
        config: Mapping[str, Any] | None = None,
        safety: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
        response_schema: Any = None,
    ) -> None:
        self.system = system
        self.config = normalize_config(config)
        self.safety = normalize_safety(safety)
        self.schema = None
        if response_schema is not None:
            from .schema import response_schema as translate

            self.schema = translate(response_schema)
            self.config = _with_schema(self.config, self.schema.config)
        shared: dict[str, Any] = {}
        if system:
            shared["systemInstruction"] = {"parts": [{"text": system}]}
        if self.config:
            shared["generationConfig"] = self.config
        if self.safety:
            shared["safetySettings"] = self.safety
        self._shared = shared

    def build(self, prompt: str | None, images: Any = None, history: Any = None) -> dict[str, Any] | None:
        """The request body for one row (its history first), or None for a row with neither
        prompt nor images."""
        parts: list[dict[str, Any]] = []
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
            parts.append({"text": prompt})
        parts.extend(image_parts(images))
        if not parts:
            return None
        contents = [*history_contents(history), {"role": "user", "parts": parts}]
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
