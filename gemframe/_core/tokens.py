"""The one local token rule: a request's input tokens, counted without asking the API.

Gemini's documented rates (https://ai.google.dev/gemini-api/docs/tokens and the document,
video and audio understanding pages): a token is about 4 characters of text; an image is 258 tokens; a PDF is
258 tokens per page. So: ``ceil(len/4)`` (at least 1) per non-empty text part, thoughts
included; 258 per image and per `fileData` part; 258 per page of an inline PDF (pages counted
as the ``/Type /Page`` objects in it, at least one); a function call or response counts as the
text of its JSON. Images are not tiled: the API counts an image over 384 px as 258 per 768 px
tile, by a rule that changes with the model and ``media_resolution``; when that matters,
``gf.estimate(exact=True)`` asks the API's ``countTokens``.

Video is 263 tokens a second and audio 32 (the tokens page). Their length is not read from the
file (that would mean parsing every container, and an uploaded file's bytes are not at hand): it
is a stand-in from the size, at `VIDEO_BYTES_PER_SECOND` (1 Mbit/s) and `AUDIO_BYTES_PER_SECOND`
(128 kbit/s), low bitrates for compressed media, so the count errs high rather than low
(uncompressed WAV/AIFF count several times their length). A ``fileData`` part (a file already
uploaded: only its name is in the request) counts 258 whatever it holds.

Two callers, one rule: `gemframe.estimate` counts request bodies (dicts), and the executor's
TPM bucket counts the encoded request it is about to send (bytes, in whatever wrapping the
provider's dialect puts the body: the body is found where ``contents`` is). Both give the same
number for the same request. The emulator keeps its own rule on purpose: it is the test oracle
the estimate is checked against, and an oracle must not share the client's assumptions.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import orjson

CHARS_PER_TOKEN = 4
MEDIA_TOKENS = 258  # an image, a file part, a PDF page
VIDEO_TOKENS_PER_SECOND = 263
AUDIO_TOKENS_PER_SECOND = 32
VIDEO_BYTES_PER_SECOND = 1_000_000 // 8  # the stand-in bitrates (see above): 1 Mbit/s
AUDIO_BYTES_PER_SECOND = 128_000 // 8  # 128 kbit/s

_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")
_PDF_BASE64 = "JVBER"  # how base64 of "%PDF" starts: only these parts are decoded
_PART_META = ("thought", "thoughtSignature", "thought_signature")


def text_tokens(text: str) -> int:
    """About four characters a token; an empty text is no token."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN)) if text else 0


def count_tokens(request: Mapping[str, Any] | bytes) -> int:
    """The input tokens of one request by the rule above: the system instruction and every
    turn. ``request`` is a ``generateContent`` body, or the request's encoded bytes as sent
    (JSON, the body at the top or one level down, as a provider's ``wrap`` puts it); bytes that
    are not JSON count as their length / 4."""
    if isinstance(request, (bytes, bytearray, memoryview)):
        try:
            decoded = orjson.loads(request)
        except orjson.JSONDecodeError:
            return max(1, len(request) // CHARS_PER_TOKEN)
        request = _body_in(decoded)
    turns = list(request.get("contents") or ())
    system = request.get("systemInstruction") or request.get("system_instruction")
    if system:
        turns.append(system)
    total = 0
    for turn in turns:
        parts = (turn.get("parts") or ()) if isinstance(turn, Mapping) else ()
        if isinstance(parts, Mapping):  # one part (Segmind's system_instruction)
            parts = (parts,)
        total += sum(_part_tokens(part) for part in parts if isinstance(part, Mapping))
    return total


def _body_in(request: Any) -> Mapping[str, Any]:
    """The generateContent body inside a provider's wrapping (``{"messages": body}``...)."""
    if not isinstance(request, Mapping):
        return {}
    if "contents" in request:
        return request
    inner = (v for v in request.values() if isinstance(v, Mapping) and "contents" in v)
    return next(inner, request)


def _part_tokens(part: Mapping[str, Any]) -> int:
    text = part.get("text")
    if text is not None:
        return text_tokens(text) if isinstance(text, str) else 0
    inline = part.get("inlineData") or part.get("inline_data")
    if inline is not None:
        if not isinstance(inline, Mapping):
            return MEDIA_TOKENS
        data = inline.get("data")
        mime = str(inline.get("mimeType") or inline.get("mime_type") or "")
        if mime.startswith(("video/", "audio/")):
            # a `KnownDigest` (a big local file, a stored URL image) knows its size without data
            size = getattr(inline, "size", None)
            return media_tokens(mime, size if size is not None else len(data or "") * 3 // 4)
        return MEDIA_TOKENS * _pdf_pages(data) if isinstance(data, str) else MEDIA_TOKENS
    if "fileData" in part or "file_data" in part:
        return MEDIA_TOKENS
    payload = [value for key, value in part.items() if key not in _PART_META]
    return text_tokens(json.dumps(payload[0])) if payload else 0  # a function call or response, code


def media_tokens(mime: str, size: int) -> int:
    """The tokens of ``size`` bytes of video or audio (at least one second), by the stand-in
    length above; 258 for any other kind."""
    if mime.startswith("video/"):
        return VIDEO_TOKENS_PER_SECOND * max(1, math.ceil(size / VIDEO_BYTES_PER_SECOND))
    if mime.startswith("audio/"):
        return AUDIO_TOKENS_PER_SECOND * max(1, math.ceil(size / AUDIO_BYTES_PER_SECOND))
    return MEDIA_TOKENS


def _pdf_pages(data: str) -> int:
    """Pages of an inline PDF (base64); 1 for an image or anything else."""
    if not data.startswith(_PDF_BASE64):
        return 1
    try:
        raw = base64.b64decode(data.replace("-", "+").replace("_", "/") + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        return 1
    if not raw.startswith(b"%PDF"):
        return 1
    return max(1, len(_PDF_PAGE.findall(raw)))
