"""Offline, deterministic Gemini-compatible HTTP server: gemframe's default backend.

`Emulator` is an ASGI app. Use it in-process with ``httpx.ASGITransport(app=Emulator())`` (no
port, no network), or serve it over TCP with `serve` (uvicorn)::

    from gemframe.emulator import Emulator, serve
    serve(Emulator(latency=0.5, jitter=0.5, fail_first=1), port=8080)

Routes
------
``POST /v1beta/models/{model}:generateContent``
    Google AI dialect. Key in ``x-goog-api-key`` or ``?key=``. Models must start with ``gemini``
    or ``emulator``, else 404 NOT_FOUND. Errors use Google's envelope
    ``{"error": {"code", "message", "status"[, "details"]}}``.
``POST /v1beta/models/{model}:countTokens``
    ``{"contents": [...]}`` or ``{"generateContentRequest": {...}}`` -> ``{"totalTokens": N,
    "promptTokensDetails": [...]}``, counted exactly like ``usageMetadata.promptTokenCount``.
``POST /v1/{slug}``
    Segmind dialect: the Google body wrapped as ``{"messages": {...}}`` (its
    ``system_instruction.parts`` may be one object). Key in ``x-api-key`` or
    ``Authorization: Bearer``. Slugs must start with ``gemini`` (else 404). Needs
    ``Content-Type: application/json`` (else 406). Errors are plain ``{"error": "<message>"}``;
    successes are the same body as the Google route.
``POST /v1beta/models/{model}:batchGenerateContent``, ``GET /v1beta/batches/{id}``,
``POST /v1beta/batches/{id}:cancel``, ``GET /v1beta/batches``
    Batch Mode with inlined requests, as long-running operations (see ``_emulator_batch``).
    Knobs: ``batch_polls`` (polls until done), ``batch_outcome`` (final state),
    ``batch_fail_every`` (every k-th request gets a per-request error), ``batch_keep``
    (finished jobs kept, default 100; older ones are deleted and answer 404).
``GET /emulator/stats`` / ``POST /emulator/reset``
    Stats as ``{"requests", "distinct_bodies", "max_in_flight", "in_flight"}`` / reset them.

Knobs (constructor arguments, also plain attributes that may be changed between requests)
----------------------------------------------------------------------------------------
``latency``      seconds added to every generate call (both routes, failures included).
``jitter``       extra uniform delay in ``[0, jitter]`` from ``random.Random`` seeded by
                 ``(seed, sha256(body))``: the same body always waits the same.
``api_key``      None accepts any key or none. Otherwise Google answers 403 PERMISSION_DENIED
                 without a key and 400 API_KEY_INVALID for a wrong one; Segmind answers 401.
``fail_first``   the first K attempts of each distinct body answer ``fail_status`` (Google's
                 message for that status) before the body is answered normally. Counted per
                 raw body bytes, after auth and validation succeed (a real frontend rejects bad
                 requests before it looks at load).
``retry_after``  when not None, emulated failures (``fail_first`` and ``[emulator:status=N]``)
                 carry ``Retry-After: <retry_after>``; Google 429s also carry a
                 ``google.rpc.RetryInfo`` detail (``retryDelay``) and Segmind 429s an
                 ``x-rate-limit-reset-at-utc`` header, as the real services do.
``markers``      True (default) honours the test markers below; False treats them as plain
                 prompt text (``gemframe emulator --no-markers``), for a server other people's
                 prompts reach.

``emu.stats`` counts generate calls (``requests``, ``by_body`` keyed by sha256 hex of the raw
body, ``in_flight``, ``max_in_flight``; a body refused as too large counts in ``requests``
only). ``emu.reset_stats()`` zeroes the counters (and so restarts ``fail_first``);
``in_flight`` is left alone because those requests are still running.

Answers
-------
The reply text echoes the last user turn and describes its inline data::

    Emulated reply to: "<prompt>". Image 1: PNG 64x48. Document 1: PDF, 1234 bytes.

then `` (system: <first 40 chars>)`` with a system instruction and, when there is more than one
content, `` (turn N, previously: "<first 40 chars of the last model text>")`` with N the number
of user turns. Inline data must be an image Pillow can decode or a PDF (``%PDF``); anything else
is a 400. Generation config is honoured:

- ``maxOutputTokens=M``: a text longer than M tokens is cut to ``4*M`` characters and the
  candidate ends with ``MAX_TOKENS`` (JSON replies are cut too, as the real API does).
- ``stopSequences``: the text is cut before the first occurrence.
- ``responseMimeType: application/json``: ``{"reply": "<text>"}``, or with ``responseSchema``
  (OpenAPI subset; unknown schema fields are a 400, as in the real API) or
  ``responseJsonSchema`` (JSON Schema incl. ``$ref``/``anyOf``/type lists) a value that follows
  the schema: strings ``"<property>: <first words of the prompt>"``, integers in ``[1, 100]`` (or
  ``minimum``..``maximum``), numbers with two decimals, booleans, arrays of 2 items (clamped to
  ``minItems``/``maxItems``, at most 16); numbers, booleans and enum choices are hashes of
  (prompt, seed, candidate, path).
  ``text/x.enum`` with an enum schema answers one enum value.
- ``candidateCount=N``: N candidates; candidate i>0 has `` [candidate i]`` appended (inside the
  strings of a JSON reply) and its own hash-derived values and image.
- ``thinkingConfig.includeThoughts``: a first part ``{"text": "Thinking about: ...",
  "thought": true}`` and ``thoughtsTokenCount`` in usageMetadata.
- ``responseModalities`` with ``IMAGE``: an ``inlineData`` PNG part. Without input images, a
  256 px image (``imageConfig.aspectRatio`` honoured) of the prompt on a colour from
  (prompt, seed); with one, an edited copy of the first image of the last user turn (or, when
  that turn has none, of the latest image earlier in the conversation): fitted to 256 px,
  inverted, tinted and captioned. As Gemini's image models do, the first non-thought part of
  an image reply and every image part carry a ``thoughtSignature``. ``["IMAGE"]`` alone means
  no text part.

Multi-turn: the reply text notes the turn and the previous model answer (see above), and an
image reply with no image in the prompt turn edits the latest image of the conversation. A
``model`` turn's image part must be sent back with its ``thoughtSignature`` (every image the
emulator returns has one), else the request is a 400 INVALID_ARGUMENT "Image part is missing a
thought_signature ...", as the real API answers for its image models; a signature must be
base64, and the documented placeholder ``skip_thought_signature_validator`` is accepted.

Tokens: ``max(1, ceil(len(text)/4))`` per non-empty text part, 258 per input image, 258 per PDF
page, 258 per ``fileData`` part, 1290 per generated image. ``promptTokenCount`` covers the
system instruction and every content; ``totalTokenCount`` adds candidates and thoughts.
Zero counts are omitted, as in proto3 JSON.

Test markers (in the last user turn's text)
-------------------------------------------
These make the emulator fail on purpose, for tests. They are on by default; anyone who can
send a prompt can trigger them (``sleep`` holds a connection as long as asked), so turn them off
with ``Emulator(markers=False)`` or ``gemframe emulator --no-markers`` (its startup line says
so) when the server is not only for tests. Off, a marker is plain prompt text, answered
normally (echoed in the reply). They apply to generateContent (both routes); in a batch job
the answer-shaping ones (safety, block, recitation, empty) apply.

``[emulator:safety]``      one candidate, finishReason SAFETY, no content, one HIGH rating.
``[emulator:block]``       no candidates; ``promptFeedback.blockReason`` SAFETY.
``[emulator:recitation]``  one candidate, finishReason RECITATION, no content.
``[emulator:empty]``       ``"candidates": []`` with usageMetadata.
``[emulator:status=NNN]``  HTTP NNN (400-599) with the dialect's error body.
``[emulator:sleep=S]``     wait S more seconds before answering (for timeout tests).

Precedence: a body over 20 MiB is refused first (413, before it is read), then a request is
delayed (latency, jitter), then checked (auth, route, body), then ``fail_first`` applies,
then ``sleep``, then ``status``, then block > empty > safety > recitation.

Determinism: every answer is a pure function of the request (route, model, raw body; the
constructor's ``seed`` only moves the delay), so the same request gets byte-identical bodies
(only Segmind's ``x-rate-limit-reset-at-utc`` header depends on the clock). ``responseId`` is
the first 22 URL-safe base64 characters of sha256(body); ``thoughtSignature`` derives from it.
Responses are compact JSON with ``content-type: application/json``. Image replies are drawn in a
worker thread, so a slow one never holds up the answers to other requests.

Validation follows the real API: 400 INVALID_ARGUMENT for non-JSON bodies, unknown fields
(camelCase and snake_case both accepted), missing contents, bad roles, empty or data-less parts,
bad base64, unknown generationConfig keys, out-of-range candidateCount, unknown safety
categories or thresholds, unsupported response MIME types or modalities, a schema without a
JSON (or ``text/x.enum``) MIME type. A body over 20 MiB (``MAX_BODY_BYTES``) is answered 413 with
the real API's message (``Request payload size exceeds the limit: 20971520 bytes.``, status
INVALID_ARGUMENT) before it is buffered: a declared ``Content-Length`` over the limit is refused
unread, a chunked body as soon as it passes the limit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import render
from .batch import BatchError, BatchStore

__all__ = ["Emulator", "Stats", "serve"]

# ---------------------------------------------------------------------------------------------
# Constants: the real API's figures, field names and messages
# ---------------------------------------------------------------------------------------------

IMAGE_INPUT_TOKENS = 258
IMAGE_OUTPUT_TOKENS = 1290
MAX_CANDIDATES = 8
MAX_BODY_BYTES = 20 * 1024 * 1024
ECHO_CHARS = 20

STATUS_NAMES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
    501: "NOT_IMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
    # A body over the limit: the real API's message and canonical status for it, under HTTP's
    # 413 because the emulator refuses it unread (see _read_body).
    413: "INVALID_ARGUMENT",
}
FAILURE_MESSAGES = {
    400: "Request contains an invalid argument.",
    403: "The caller does not have permission",
    404: "Requested entity was not found.",
    429: "Resource has been exhausted (e.g. check quota).",
    500: "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
    504: "Deadline expired before operation could complete.",
}
UNREGISTERED_CALLER = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)
INVALID_KEY = "API key not valid. Please pass a valid API key."
INVALID_KEY_DETAILS = [{
    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
    "reason": "API_KEY_INVALID",
    "domain": "googleapis.com",
    "metadata": {"service": "generativelanguage.googleapis.com"},
}]
UNPROCESSABLE_IMAGE = (
    "Unable to process input image. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting"
)

REQUEST_FIELDS = frozenset({
    "contents", "system_instruction", "generation_config", "safety_settings", "tools",
    "tool_config", "cached_content",
})
COUNT_TOKENS_FIELDS = frozenset({"contents", "generate_content_request"})
CONTENT_FIELDS = frozenset({"role", "parts"})
DATA_FIELDS = frozenset({
    "text", "inline_data", "file_data", "function_call", "function_response",
    "executable_code", "code_execution_result",
})
PART_FIELDS = DATA_FIELDS | {"thought", "thought_signature", "video_metadata"}
BLOB_FIELDS = frozenset({"mime_type", "data"})
FILE_FIELDS = frozenset({"mime_type", "file_uri"})
CONFIG_FIELDS = frozenset({
    "stop_sequences", "response_mime_type", "response_schema", "response_json_schema",
    "response_modalities", "candidate_count", "max_output_tokens", "temperature", "top_p",
    "top_k", "seed", "presence_penalty", "frequency_penalty", "response_logprobs", "logprobs",
    "thinking_config", "image_config", "media_resolution", "speech_config",
})
INT_CONFIG = ("candidate_count", "max_output_tokens", "top_k", "seed", "logprobs")
FLOAT_CONFIG = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
THINKING_FIELDS = frozenset({"include_thoughts", "thinking_budget", "thinking_level"})
IMAGE_CONFIG_FIELDS = frozenset({"aspect_ratio", "image_size"})
ASPECT_RATIOS = frozenset({"1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"})
RESPONSE_MIME_TYPES = ("text/plain", "application/json", "text/x.enum")
MODALITIES = frozenset({"TEXT", "IMAGE", "AUDIO"})
SCHEMA_FIELDS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "max_items", "min_items",
    "properties", "required", "min_properties", "max_properties", "min_length", "max_length",
    "pattern", "example", "any_of", "property_ordering", "default", "items", "minimum", "maximum",
})
SCHEMA_TYPES = frozenset({
    "TYPE_UNSPECIFIED", "STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL",
})
SAFETY_FIELDS = frozenset({"category", "threshold"})
HARM_CATEGORIES = frozenset({
    "HARM_CATEGORY_HARASSMENT", "HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_SEXUALLY_EXPLICIT",
    "HARM_CATEGORY_DANGEROUS_CONTENT", "HARM_CATEGORY_CIVIC_INTEGRITY",
})
HARM_THRESHOLDS = frozenset({
    "HARM_BLOCK_THRESHOLD_UNSPECIFIED", "BLOCK_LOW_AND_ABOVE", "BLOCK_MEDIUM_AND_ABOVE",
    "BLOCK_ONLY_HIGH", "BLOCK_NONE", "OFF",
})
RATED_CATEGORIES = (
    "HARM_CATEGORY_SEXUALLY_EXPLICIT", "HARM_CATEGORY_HATE_SPEECH", "HARM_CATEGORY_HARASSMENT",
    "HARM_CATEGORY_DANGEROUS_CONTENT",
)
ENUM_PROTO = "type.googleapis.com/google.ai.generativelanguage.v1beta"

MARKER = re.compile(r"\[emulator:([a-z]+)(?:=(\d+(?:\.\d+)?))?\]")
PDF_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")
CAMEL_HUMP = re.compile(r"(?<!^)(?=[A-Z])")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class ErrorAnswer(Exception):
    """An error answer; each route renders it in its own dialect's envelope."""

    def __init__(
        self, code: int, message: str, details: list[dict] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or []
        self.retry_after = retry_after


def _invalid(message: str) -> ErrorAnswer:
    return ErrorAnswer(400, message)


def _echo(value: Any) -> str:
    """A value as the real API quotes it in messages, clipped so errors stay short."""
    if isinstance(value, str):
        return json.dumps(_clip(value, ECHO_CHARS))
    return _clip(json.dumps(value), ECHO_CHARS)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _member(value: Any, choices: Collection[str]) -> bool:
    """value is one of the string choices (JSON may hand us unhashable lists or objects)."""
    return isinstance(value, str) and value in choices


def _bad_value(where: str, value: Any, expected: str) -> ErrorAnswer:
    return _invalid(f"Invalid value at '{where}' ({expected}), {_echo(value)}")


def _failure(code: int, retry_after: float | None) -> ErrorAnswer:
    """An emulated server-side failure (fail_first or a status marker)."""
    message = FAILURE_MESSAGES.get(code, f"Emulated error {code}.")
    return ErrorAnswer(code, message, retry_after=retry_after)


# ---------------------------------------------------------------------------------------------
# Parsed request
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Media:
    """One non-text input part, as the reply describes and bills it."""

    kind: str  # "Image", "Document" or "File": the label's prefix in the reply text
    label: str  # e.g. "PNG 64x48"
    tokens: int
    modality: str  # usageMetadata modality: IMAGE, DOCUMENT, AUDIO, VIDEO
    data: bytes = b""  # decoded bytes of images, kept so they can be edited


@dataclass(frozen=True)
class Part:
    """One validated part: text (maybe a thought), media, or another billed payload."""

    text: str = ""
    thought: bool = False
    media: Media | None = None
    tokens: int = 0
    signature: bytes | None = None


@dataclass(frozen=True)
class Turn:
    """One content (or the system instruction)."""

    role: str
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        return " ".join(p.text for p in self.parts if p.text and not p.thought)

    @property
    def media(self) -> tuple[Media, ...]:
        return tuple(p.media for p in self.parts if p.media)


@dataclass(frozen=True)
class Config:
    """generationConfig, validated and reduced to what shapes the answer."""

    candidates: int = 1
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    mime: str = "text/plain"
    schema: dict | None = None
    text: bool = True
    image: bool = False
    thoughts: bool = False
    seed: int | None = None
    image_size: tuple[int, int] = (render.MAX_SIDE, render.MAX_SIDE)


@dataclass(frozen=True)
class GenRequest:
    """A validated generateContent request; the answer is derived from this alone."""

    system: Turn | None
    turns: tuple[Turn, ...]
    config: Config
    test_markers: bool = True  # False: ``[emulator:...]`` in a prompt is plain text

    @property
    def prompt_turn(self) -> Turn | None:
        return next((t for t in reversed(self.turns) if t.role == "user"), None)

    @property
    def prompt(self) -> str:
        return self.prompt_turn.text if self.prompt_turn else ""

    @property
    def markers(self) -> dict[str, str]:
        if not self.test_markers:
            return {}
        return {name: value for name, value in MARKER.findall(self.prompt)}

    @property
    def edit_source(self) -> Media | None:
        """The image an image reply edits: the prompt turn's first, else the latest before it."""
        current = self.prompt_turn.media if self.prompt_turn else ()
        images = [m for m in current if m.kind == "Image"]
        if images:
            return images[0]
        earlier = [m for t in self.turns for m in t.media if m.kind == "Image"]
        return earlier[-1] if earlier else None


def tokens(text: str) -> int:
    """Gemini-like token estimate: about four characters a token."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


def _snake(name: str) -> str:
    return CAMEL_HUMP.sub("_", name).lower()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


def _fields(value: Any, allowed: frozenset[str], where: str) -> dict[str, Any]:
    """A JSON object with snake_case keys; unknown names fail like the real proto parser."""
    if not isinstance(value, dict):
        raise _bad_value(where, value, "object expected")
    out = {}
    for key, item in value.items():
        name = _snake(key)
        if name not in allowed or key not in (name, _camel(name)):
            at = f" at '{where}'" if where else ""
            raise _invalid(
                f'Invalid JSON payload received. Unknown name "{key}"{at}: Cannot find field.'
            )
        out[name] = item
    return out


def load_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or the real API's 400."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:
        raise _invalid(f"Invalid JSON payload received. Unexpected token: {exc}.") from None
    if not isinstance(body, dict):
        raise _invalid(
            'Invalid JSON payload received. Unknown name "": Root element must be a message.'
        )
    return body


def _reject_constant(name: str) -> None:
    """NaN and Infinity are not JSON; Python's parser would otherwise accept them."""
    raise ValueError(f"{name} is not valid JSON")


def parse_generate(body: dict[str, Any], allowed: frozenset[str] = REQUEST_FIELDS) -> GenRequest:
    """Validate a generateContent body the way the real API does."""
    fields = _fields(body, allowed, "")
    contents = fields.get("contents")
    if not contents:
        raise _invalid("* GenerateContentRequest.contents: contents is not specified\n")
    if not isinstance(contents, list):
        raise _bad_value("contents", contents, "list expected")
    turns = tuple(_parse_turn(c, f"contents[{i}]") for i, c in enumerate(contents))
    system = fields.get("system_instruction")
    _check_safety(fields.get("safety_settings") or [])
    return GenRequest(
        system=_parse_turn(system, "system_instruction") if system is not None else None,
        turns=turns,
        config=_parse_config(fields.get("generation_config") or {}),
    )


def parse_count_tokens(body: dict[str, Any]) -> GenRequest:
    """countTokens takes bare contents or a whole generateContent request."""
    fields = _fields(body, COUNT_TOKENS_FIELDS, "")
    inner = fields.get("generate_content_request")
    if inner is not None:
        allowed = REQUEST_FIELDS | {"model"}
        return parse_generate(_fields(inner, allowed, "generate_content_request"), allowed)
    return parse_generate({"contents": fields.get("contents")})


def _parse_turn(value: Any, where: str) -> Turn:
    fields = _fields(value, CONTENT_FIELDS, where)
    role = fields.get("role") or "user"
    if where != "system_instruction" and role not in ("user", "model"):
        raise _invalid("Please use a valid role: user, model.")
    parts = fields.get("parts")
    if not parts:
        raise _invalid(
            f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty.\n"
        )
    if not isinstance(parts, list):
        raise _bad_value(f"{where}.parts", parts, "list expected")
    return Turn(role, tuple(_parse_part(p, f"{where}.parts[{i}]") for i, p in enumerate(parts)))


def _parse_part(value: Any, where: str) -> Part:
    fields = _fields(value, PART_FIELDS, where)
    data = [name for name in fields if name in DATA_FIELDS]
    if not data:
        raise _invalid(
            f"* GenerateContentRequest.{where}.data: required oneof field 'data' must have one "
            "initialized field\n"
        )
    if len(data) > 1:
        raise _invalid(
            f"Invalid JSON payload received. Oneof field 'data' at '{where}' is already set."
        )
    thought = fields.get("thought") is True
    signature = None
    if fields.get("thought_signature") is not None:
        signature = _b64decode(fields["thought_signature"], f"{where}.thought_signature")
    name, payload = data[0], fields[data[0]]
    if name == "text":
        if not isinstance(payload, str):
            raise _bad_value(f"{where}.text", payload, "TYPE_STRING")
        return Part(text=payload, thought=thought, tokens=tokens(payload), signature=signature)
    if name == "inline_data":
        media = _parse_blob(payload, f"{where}.inline_data")
        return Part(thought=thought, media=media, signature=signature)
    if name == "file_data":
        return Part(media=_parse_file(payload, f"{where}.file_data"), signature=signature)
    return Part(tokens=tokens(json.dumps(payload)), signature=signature)  # function calls, code

MISSING_SIGNATURE = (
    "Image part is missing a thought_signature in content position {content}, part position "
    "{part}. Please refer to https://ai.google.dev/gemini-api/docs/thought-signatures for more "
    "details."
)


def check_signatures(req: GenRequest) -> None:
    """Every image a model turn sends back must carry the thoughtSignature it came with."""
    for i, turn in enumerate(req.turns):
        if turn.role != "model":
            continue
        for j, part in enumerate(turn.parts):
            is_image = part.media is not None and part.media.kind == "Image"
            if is_image and not part.thought and not part.signature:
                raise _invalid(MISSING_SIGNATURE.format(content=i + 1, part=j + 1))


def _parse_blob(value: Any, where: str) -> Media:
    fields = _fields(value, BLOB_FIELDS, where)
    if not fields.get("mime_type"):
        raise _invalid(f"* GenerateContentRequest.{where}.mime_type: mime_type is not specified\n")
    data = _b64decode(fields.get("data", ""), f"{where}.data")
    image = render.inspect_image(data)
    if image:
        fmt, width, height = image
        return Media("Image", f"{fmt} {width}x{height}", IMAGE_INPUT_TOKENS, "IMAGE", data)
    if data.startswith(b"%PDF"):
        pages = max(1, len(PDF_PAGE.findall(data)))
        return Media("Document", f"PDF, {len(data)} bytes", IMAGE_INPUT_TOKENS * pages, "DOCUMENT")
    raise _invalid(UNPROCESSABLE_IMAGE)


def _b64decode(value: Any, where: str) -> bytes:
    """Standard or URL-safe base64, padding optional, as proto3 JSON accepts."""
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        text = value.replace("-", "+").replace("_", "/")
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(
            f"Invalid value at '{where}' (TYPE_BYTES), Base64 decoding failed for {_echo(value)}"
        ) from None


def _parse_file(value: Any, where: str) -> Media:
    fields = _fields(value, FILE_FIELDS, where)
    uri, mime = fields.get("file_uri"), str(fields.get("mime_type") or "")
    if not uri or not isinstance(uri, str):
        raise _invalid(f"* GenerateContentRequest.{where}.file_uri: file_uri is not specified\n")
    family = mime.split("/")[0].upper()
    modality = family if family in ("IMAGE", "AUDIO", "VIDEO") else "DOCUMENT"
    return Media("File", f"{mime or 'unknown type'} {uri}", IMAGE_INPUT_TOKENS, modality)


def _check_safety(settings: Any) -> None:
    if not isinstance(settings, list):
        raise _bad_value("safety_settings", settings, "list expected")
    for i, setting in enumerate(settings):
        where = f"safety_settings[{i}]"
        fields = _fields(setting, SAFETY_FIELDS, where)
        if not _member(fields.get("category"), HARM_CATEGORIES):
            category = fields.get("category")
            raise _bad_value(f"{where}.category", category, f"{ENUM_PROTO}.HarmCategory")
        if not _member(fields.get("threshold"), HARM_THRESHOLDS):
            raise _bad_value(
                f"{where}.threshold", fields.get("threshold"),
                f"{ENUM_PROTO}.SafetySetting.HarmBlockThreshold",
            )


def _parse_config(value: Any) -> Config:
    fields = _fields(value, CONFIG_FIELDS, "generation_config")
    numbers = _check_numbers(fields)
    count = numbers.get("candidate_count") or 1
    if not 1 <= count <= MAX_CANDIDATES:
        raise _invalid(
            "* GenerateContentRequest.generation_config.candidate_count: candidate_count must be "
            f"between 1 and {MAX_CANDIDATES}, got {count}.\n"
        )
    max_tokens = numbers.get("max_output_tokens") or None
    if max_tokens is not None and max_tokens < 0:
        raise _bad_value("generation_config.max_output_tokens", max_tokens, "TYPE_INT32")
    modalities = _parse_modalities(fields.get("response_modalities") or [])
    thinking = _fields(
        fields.get("thinking_config") or {}, THINKING_FIELDS, "generation_config.thinking_config"
    )
    mime, schema = _parse_response_format(fields)
    return Config(
        candidates=count,
        max_tokens=max_tokens,
        stop=_parse_stop(fields.get("stop_sequences") or []),
        mime=mime,
        schema=schema,
        text=not modalities or "TEXT" in modalities,
        image="IMAGE" in modalities,
        thoughts=thinking.get("include_thoughts") is True,
        seed=numbers.get("seed"),
        image_size=_parse_image_config(fields.get("image_config") or {}),
    )


def _check_numbers(fields: dict[str, Any]) -> dict[str, int]:
    """Type-check numeric config fields; return the integer ones."""
    for name in FLOAT_CONFIG:
        value = fields.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _bad_value(f"generation_config.{name}", value, "TYPE_FLOAT")
    ints = {}
    for name in INT_CONFIG:
        value = fields.get(name)
        if value is None:
            continue
        if not _is_integral(value):
            raise _bad_value(f"generation_config.{name}", value, "TYPE_INT32")
        ints[name] = int(value)
    return ints


def _is_integral(value: Any) -> bool:
    """An int32, or a float with no fraction (proto3 JSON accepts 5.0 for an int32)."""
    if isinstance(value, float) and not value.is_integer():
        return False
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return is_number and -(2**31) <= value < 2**31


def _parse_stop(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad_value("generation_config.stop_sequences", value, "list of strings expected")
    if len(value) > 5:
        raise _invalid(
            "* GenerateContentRequest.generation_config.stop_sequences: at most 5 stop sequences "
            "are allowed.\n"
        )
    return tuple(s for s in value if s)


def _parse_modalities(value: Any) -> set[str]:
    if not isinstance(value, list):
        raise _bad_value("generation_config.response_modalities", value, "list expected")
    modalities = set()
    for i, item in enumerate(value):
        name = item.upper() if isinstance(item, str) else item
        if not _member(name, MODALITIES):
            raise _bad_value(
                f"generation_config.response_modalities[{i}]", item,
                f"{ENUM_PROTO}.GenerationConfig.Modality",
            )
        modalities.add(name)
    if "AUDIO" in modalities:
        raise _invalid("Model does not support the requested response modalities: audio")
    return modalities


def _parse_response_format(fields: dict[str, Any]) -> tuple[str, dict | None]:
    """(response MIME type, schema) after the real API's consistency checks."""
    where = "* GenerateContentRequest.generation_config"
    mime = fields.get("response_mime_type") or "text/plain"
    if not _member(mime, RESPONSE_MIME_TYPES):
        raise _invalid(
            f"{where}.response_mime_type: allowed mimetypes are `text/plain`, `application/json` "
            "and `text/x.enum`.\n"
        )
    openapi, json_schema = fields.get("response_schema"), fields.get("response_json_schema")
    if openapi is not None and json_schema is not None:
        raise _invalid(f"{where}: response_schema and response_json_schema cannot both be set.\n")
    if openapi is not None:
        _check_openapi_schema(openapi, "generation_config.response_schema")
    elif json_schema is not None and not isinstance(json_schema, dict):
        raise _bad_value("generation_config.response_json_schema", json_schema, "object expected")
    schema = openapi if openapi is not None else json_schema
    if schema is not None and mime == "text/plain":
        raise _invalid(
            f"{where}.response_mime_type: response_mime_type must be application/json or "
            "text/x.enum when a response schema is set.\n"
        )
    if mime == "text/x.enum" and not (schema and schema.get("enum")):
        raise _invalid(f"{where}.response_schema: text/x.enum requires a schema with an enum.\n")
    return mime, schema


def _check_openapi_schema(schema: Any, where: str) -> None:
    """The OpenAPI subset Gemini accepts: unknown fields and types are 400s."""
    fields = _fields(schema, SCHEMA_FIELDS, where)
    kind = fields.get("type", "TYPE_UNSPECIFIED")
    if not isinstance(kind, str) or kind.upper() not in SCHEMA_TYPES:
        raise _bad_value(f"{where}.type", kind, f"{ENUM_PROTO}.Type")
    if kind.upper() == "OBJECT" and not fields.get("properties"):
        raise _invalid(
            f"* GenerateContentRequest.{where}.properties: should be non-empty for OBJECT type\n"
        )
    properties, any_of = fields.get("properties") or {}, fields.get("any_of") or []
    if not isinstance(properties, dict):
        raise _bad_value(f"{where}.properties", properties, "object expected")
    if not isinstance(any_of, list):
        raise _bad_value(f"{where}.any_of", any_of, "list expected")
    for name, sub in properties.items():
        _check_openapi_schema(sub, f"{where}.properties[{name}].value")
    if "items" in fields:
        _check_openapi_schema(fields["items"], f"{where}.items")
    for i, sub in enumerate(any_of):
        _check_openapi_schema(sub, f"{where}.any_of[{i}]")


def _parse_image_config(value: Any) -> tuple[int, int]:
    """Generated image size: 256 px on the long side, in the requested aspect ratio."""
    fields = _fields(value, IMAGE_CONFIG_FIELDS, "generation_config.image_config")
    ratio = fields.get("aspect_ratio") or "1:1"
    if not _member(ratio, ASPECT_RATIOS):
        raise _bad_value(
            "generation_config.image_config.aspect_ratio", ratio, "unsupported aspect ratio"
        )
    w, h = (int(x) for x in ratio.split(":"))
    side = render.MAX_SIDE
    return (side, round(side * h / w)) if w >= h else (round(side * w / h), side)


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """Candidate-side token counts, summed over candidates."""

    text: int = 0
    image: int = 0
    thoughts: int = 0


def prompt_tokens(req: GenRequest) -> dict[str, int]:
    """Prompt tokens by modality (TEXT first), zero entries dropped."""
    totals: dict[str, int] = {"TEXT": 0}
    for turn in ((req.system,) if req.system else ()) + req.turns:
        for part in turn.parts:
            totals["TEXT"] += part.tokens
            if part.media:
                totals[part.media.modality] = totals.get(part.media.modality, 0) + part.media.tokens
    return {modality: count for modality, count in totals.items() if count}


def build_reply(req: GenRequest, model: str, digest: str) -> dict[str, Any]:
    """The success body for a validated request: a pure function of its arguments."""
    markers = req.markers
    tally = _Tally()
    if "block" in markers:
        feedback = {"blockReason": "SAFETY", "safetyRatings": _ratings()}
        head: dict[str, Any] = {"promptFeedback": feedback}
    elif "empty" in markers:
        head = {"candidates": []}
    elif "safety" in markers:
        head = {"candidates": [
            {"finishReason": "SAFETY", "index": 0, "safetyRatings": _ratings()}
        ]}
    elif "recitation" in markers:
        head = {"candidates": [{"finishReason": "RECITATION", "index": 0, "safetyRatings": []}]}
    else:
        count = req.config.candidates
        head = {"candidates": [_candidate(req, i, digest, tally) for i in range(count)]}
    return {
        **head,
        "usageMetadata": _usage(prompt_tokens(req), tally),
        "modelVersion": f"emulator-{model}",
        "responseId": base64.urlsafe_b64encode(bytes.fromhex(digest)).decode()[:22],
    }


def _ratings() -> list[dict[str, Any]]:
    """Ratings of a blocked answer: dangerous content HIGH, the rest NEGLIGIBLE."""
    high, low = {"probability": "HIGH", "blocked": True}, {"probability": "NEGLIGIBLE"}
    return [
        {"category": c, **(high if c == "HARM_CATEGORY_DANGEROUS_CONTENT" else low)}
        for c in RATED_CATEGORIES
    ]


def _usage(prompt: dict[str, int], tally: _Tally) -> dict[str, Any]:
    prompt_total = sum(prompt.values())
    candidates = tally.text + tally.image
    usage: dict[str, Any] = {"promptTokenCount": prompt_total}
    if candidates:
        usage["candidatesTokenCount"] = candidates
    usage["totalTokenCount"] = prompt_total + candidates + tally.thoughts
    usage["promptTokensDetails"] = [{"modality": m, "tokenCount": n} for m, n in prompt.items()]
    if tally.image:
        split = (("TEXT", tally.text), ("IMAGE", tally.image))
        usage["candidatesTokensDetails"] = [{"modality": m, "tokenCount": n} for m, n in split if n]
    if tally.thoughts:
        usage["thoughtsTokenCount"] = tally.thoughts
    return usage


def _candidate(req: GenRequest, index: int, digest: str, tally: _Tally) -> dict[str, Any]:
    config = req.config
    parts: list[dict[str, Any]] = []
    if config.thoughts:
        thought = f'Thinking about: "{_clip(req.prompt, 60)}"'
        parts.append({"text": thought, "thought": True})
        tally.thoughts += tokens(thought)
    finish = "STOP"
    if config.text:
        text, finish = _limit(_reply_text(req, index), config)
        parts.append({"text": text})
        tally.text += tokens(text)
    if config.image:
        image = {"inlineData": {"mimeType": "image/png", "data": _image(req, index)}}
        parts.append({**image, "thoughtSignature": _signature(f"{digest}|{index}|image")})
        tally.image += IMAGE_OUTPUT_TOKENS
        signed = 1 if config.thoughts else 0
        if "thoughtSignature" not in parts[signed]:
            parts[signed] = {**parts[signed], "thoughtSignature": _signature(f"{digest}|{index}")}
    return {
        "content": {"parts": parts, "role": "model"},
        "finishReason": finish,
        "index": index,
        "safetyRatings": [],
    }


def _signature(key: str) -> str:
    """An opaque, deterministic thoughtSignature (base64, as the API sends them)."""
    return base64.b64encode(hashlib.sha256(f"thoughtSignature|{key}".encode()).digest()).decode()


def _limit(text: str, config: Config) -> tuple[str, str]:
    """Apply stop sequences, then maxOutputTokens; return (text, finishReason)."""
    cuts = [text.find(s) for s in config.stop if s in text]
    if cuts:
        text = text[: min(cuts)]
    if config.max_tokens is not None and tokens(text) > config.max_tokens:
        return text[: config.max_tokens * 4], "MAX_TOKENS"
    return text, "STOP"


def _reply_text(req: GenRequest, index: int) -> str:
    suffix = f" [candidate {index}]" if index else ""
    config = req.config
    if config.schema is None:
        text = describe(req) + suffix
        if config.mime == "application/json":
            return json.dumps({"reply": text}, ensure_ascii=False)
        return text
    value = _Faker(config.schema, req.prompt, f"{config.seed}|{index}", suffix).value(config.schema)
    return str(value) if config.mime == "text/x.enum" else json.dumps(value, ensure_ascii=False)


def describe(req: GenRequest) -> str:
    """The plain-text reply: echo the prompt, describe its inline data, note system and history."""
    pieces = [f'Emulated reply to: "{req.prompt}".']
    seen: Counter[str] = Counter()
    for media in req.prompt_turn.media if req.prompt_turn else ():
        seen[media.kind] += 1
        pieces.append(f"{media.kind} {seen[media.kind]}: {media.label}.")
    if req.system and req.system.text:
        pieces.append(f"(system: {req.system.text[:40]})")
    if len(req.turns) > 1:
        pieces.append(f"(turn {sum(t.role == 'user' for t in req.turns)}{_previously(req)})")
    return " ".join(pieces)


def _previously(req: GenRequest) -> str:
    """A short mention of the last model turn, so replies visibly depend on history."""
    model_turns = [t for t in req.turns if t.role == "model"]
    if not model_turns:
        return ""
    last = model_turns[-1]
    if last.text:
        return f', previously: "{_clip(last.text, 40)}"'
    return ", previously: an image" if last.media else ""


def _image(req: GenRequest, index: int) -> str:
    """Base64 PNG: an edit of the input image if there is one, else the prompt drawn."""
    key = f"{req.prompt}|{req.config.seed}|{index}"
    source = req.edit_source
    if source:
        png = render.edit_image(source.data, req.prompt, key)
    else:
        png = render.render_prompt(req.prompt or "(empty prompt)", key, req.config.image_size)
    return base64.b64encode(png).decode()


class _Faker:
    """Values that follow a response schema (OpenAPI subset or JSON Schema), deterministically.

    Numbers, booleans and enum choices are hashes of (prompt, seed, candidate, path); strings
    are the property name and the prompt's first words, so they are recognisable in tests.
    Malformed keywords are ignored rather than trusted: JSON Schema is not validated up front.
    """

    MAX_DEPTH = 8
    MAX_ITEMS = 16
    MAX_STEPS = 10**6

    def __init__(self, root: dict, prompt: str, key: str, suffix: str) -> None:
        self.root = root
        self.words = " ".join(prompt.split()[:6]) or "emulated"
        self.key = f"{prompt}|{key}"
        self.suffix = suffix

    def value(self, schema: Any, path: str = "$", label: str = "value", depth: int = 0) -> Any:
        schema = self._resolve(schema if isinstance(schema, dict) else {})
        branches = _keyword(schema, "any_of", list) or _keyword(schema, "one_of", list)
        if branches:
            return self.value(branches[0], path, label, depth)
        if "const" in schema:
            return schema["const"]
        choices = _keyword(schema, "enum", list)
        if choices:
            return choices[self._hash(path) % len(choices)]
        kind = _schema_kind(schema)
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, label, depth)
        if kind == "integer":
            return self._integer(schema, path)
        if kind == "number":
            return self._number(schema, path)
        if kind == "boolean":
            return self._hash(path) % 2 == 0
        if kind == "null":
            return None
        return self._string(schema, path, label)

    def _resolve(self, schema: dict) -> dict:
        """Follow local ``$ref``s (``#/$defs/X``, ``#/definitions/X``)."""
        for _ in range(self.MAX_DEPTH):
            ref = schema.get("$ref")
            if not isinstance(ref, str) or not ref.startswith("#/"):
                return schema
            target: Any = self.root
            for step in ref[2:].split("/"):
                target = target.get(step, {}) if isinstance(target, dict) else {}
            schema = target if isinstance(target, dict) else {}
        return schema

    def _hash(self, path: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.key}|{path}".encode()).digest()[:8], "big")

    def _object(self, schema: dict, path: str, depth: int) -> dict[str, Any]:
        properties = _keyword(schema, "properties", dict) or {}
        if depth >= self.MAX_DEPTH:
            return {}
        order = _keyword(schema, "property_ordering", list) or list(properties)
        return {
            name: self.value(properties[name], f"{path}.{name}", name, depth + 1)
            for name in order if isinstance(name, str) and name in properties
        }

    def _array(self, schema: dict, path: str, label: str, depth: int) -> list[Any]:
        if depth >= self.MAX_DEPTH:
            return []
        count = min(max(_keyword(schema, "min_items", int) or 0, 2), self.MAX_ITEMS)
        max_items = _keyword(schema, "max_items", int)
        if max_items is not None:
            count = min(count, max_items)
        items = _keyword(schema, "items", dict) or {}
        return [
            self.value(items, f"{path}[{i}]", f"{label} {i + 1}", depth + 1) for i in range(count)
        ]

    def _bounds(self, schema: dict) -> tuple[float, float]:
        low = _keyword(schema, "minimum", (int, float))
        high = _keyword(schema, "maximum", (int, float))
        if low is None:
            low = 1 if high is None else min(1, high)
        if high is None:
            high = low + 99
        return low, max(low, high)

    def _integer(self, schema: dict, path: str) -> int:
        low, high = self._bounds(schema)
        low, high = math.ceil(low), max(math.ceil(low), math.floor(high))
        return low + self._hash(path) % min(high - low + 1, self.MAX_STEPS)

    def _number(self, schema: dict, path: str) -> float:
        low, high = self._bounds(schema)
        steps = int(min((high - low) * 100, self.MAX_STEPS))
        return round(low + (self._hash(path) % (steps + 1)) / 100, 2)

    def _string(self, schema: dict, path: str, label: str) -> str:
        fmt = schema.get("format")
        day = 1 + self._hash(path) % 28
        if fmt == "date":
            return f"2024-01-{day:02d}"
        if fmt == "date-time":
            return f"2024-01-{day:02d}T12:00:00Z"
        text = f"{label}: {self.words}{self.suffix}"
        max_length = _keyword(schema, "max_length", int)
        return text[: max(max_length, 0)] if max_length is not None else text


def _keyword(schema: dict, snake: str, kind: type | tuple[type, ...]) -> Any:
    """A schema keyword in either spelling (JSON Schema camelCase, proto snake_case), or None
    when it is absent or not of the expected JSON type."""
    camel = _camel(snake)
    value = schema[camel] if camel in schema else schema.get(snake)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _schema_kind(schema: dict) -> str:
    """Lower-case type of a schema node; inferred when absent, first non-null of a type list."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if isinstance(k, str) and k.lower() != "null"), "null")
    if isinstance(kind, str) and kind.upper() != "TYPE_UNSPECIFIED":
        return kind.lower()
    if "properties" in schema:
        return "object"
    return "array" if "items" in schema else "string"


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """Generate-call counters (both routes, failures included)."""

    requests: int = 0
    by_body: Counter[str] = field(default_factory=Counter)  # sha256 hex of raw body -> count
    in_flight: int = 0
    max_in_flight: int = 0

    def as_json(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "distinct_bodies": len(self.by_body),
            "max_in_flight": self.max_in_flight,
            "in_flight": self.in_flight,
        }


def _json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """Compact JSON, so identical answers are identical bytes."""
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _retry_headers(err: ErrorAnswer) -> dict[str, str]:
    return {} if err.retry_after is None else {"retry-after": f"{err.retry_after:g}"}


def _google_error(err: ErrorAnswer) -> Response:
    details = list(err.details)
    if err.code == 429 and err.retry_after is not None:
        details.append({
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": f"{err.retry_after:g}s",
        })
    status = STATUS_NAMES.get(err.code, "UNKNOWN")
    error: dict[str, Any] = {"code": err.code, "message": err.message, "status": status}
    if details:
        error["details"] = details
    return _json_response({"error": error}, err.code, _retry_headers(err))


def _segmind_error(err: ErrorAnswer) -> Response:
    headers = _retry_headers(err)
    if err.code == 429 and err.retry_after is not None:
        reset = datetime.now(timezone.utc) + timedelta(seconds=err.retry_after)
        headers["x-rate-limit-reset-at-utc"] = reset.isoformat(timespec="milliseconds")
    return _json_response({"error": err.message}, err.code, headers)


def _too_large() -> ErrorAnswer:
    return ErrorAnswer(413, f"Request payload size exceeds the limit: {MAX_BODY_BYTES} bytes.")


async def _read_body(request: Request) -> bytes:
    """The request body, or a 413 before more than MAX_BODY_BYTES of it is held.

    A declared Content-Length over the limit is refused before a byte of the body is read; a
    body without one (chunked) is read as it streams in and refused the moment it passes the
    limit. So whatever a client sends, the emulator never buffers more than the limit (starlette's
    ``request.body()`` would buffer all of it first).
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    scheme, _, token = (value or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _unwrap_segmind(body: dict[str, Any]) -> dict[str, Any]:
    """Segmind's ``{"messages": {...}}`` as a Google body (system parts may be one object)."""
    unknown = [key for key in body if key != "messages"]
    if unknown:
        raise _invalid(f"Unsupported parameter: {unknown[0]}")
    messages = body.get("messages")
    if not isinstance(messages, dict):
        raise _invalid('"messages" must be an object with "contents"')
    inner = dict(messages)
    for key in ("system_instruction", "systemInstruction"):
        system = inner.get(key)
        if isinstance(system, dict) and isinstance(system.get("parts"), dict):
            inner[key] = {**system, "parts": [system["parts"]]}
    return inner


class Emulator:
    """An offline Gemini: an ASGI3 app answering generateContent deterministically.

    See the module docstring for routes, knobs, markers and determinism rules.
    """

    def __init__(
        self,
        latency: float = 0.0,
        jitter: float = 0.0,
        seed: int = 0,
        api_key: str | None = None,
        fail_first: int = 0,
        fail_status: int = 503,
        retry_after: float | None = None,
        batch_polls: int = 2,
        batch_outcome: str = "BATCH_STATE_SUCCEEDED",
        batch_fail_every: int = 0,
        batch_keep: int = 100,
        markers: bool = True,
    ) -> None:
        self.latency = latency
        self.jitter = jitter
        self.seed = seed
        self.api_key = api_key
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.retry_after = retry_after
        self.markers = markers
        self.stats = Stats()
        self.batches = BatchStore(self._answer_batched, keep=batch_keep)
        self.batches.polls, self.batches.outcome, self.batches.fail_every = batch_polls, batch_outcome, batch_fail_every
        self._app = Starlette(routes=[
            Route("/v1beta/models/{model_action:path}", self._google, methods=["POST"]),
            Route("/v1beta/batches", self._batch_list, methods=["GET"]),
            Route("/v1beta/batches/{batch_action:path}", self._batch, methods=["GET", "POST"]),
            Route("/v1/{slug}", self._segmind, methods=["POST"]),
            Route("/emulator/stats", self._stats, methods=["GET"]),
            Route("/emulator/reset", self._reset, methods=["POST"]),
        ])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    def reset_stats(self) -> None:
        """Zero the counters in place (restarting fail_first); in-flight requests stay counted."""
        self.stats.requests = 0
        self.stats.by_body.clear()
        self.stats.max_in_flight = self.stats.in_flight

    async def _google(self, request: Request) -> Response:
        model, _, action = request.path_params["model_action"].rpartition(":")
        if action == "generateContent":
            return await self._generate(request, model, segmind=False)
        if action == "countTokens":
            try:
                body = self._admit_google(request, await _read_body(request), model, action)
                counts = prompt_tokens(parse_count_tokens(body))
            except ErrorAnswer as err:
                return _google_error(err)
            details = [{"modality": m, "tokenCount": n} for m, n in counts.items()]
            total = sum(counts.values())
            return _json_response({"totalTokens": total, "promptTokensDetails": details})
        if action == "batchGenerateContent":
            try:
                body = self._admit_google(request, await _read_body(request), model, action)
                return await self._batch_call(self.batches.create, model, body)
            except ErrorAnswer as err:
                return _google_error(err)
            except BatchError as err:
                return _google_error(ErrorAnswer(err.code, err.message))
        return _google_error(ErrorAnswer(404, "Method not found."))

    def _answer_batched(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request of a batch job, answered as generateContent would answer it."""
        digest = hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()
        return build_reply(self._parse(body), model, digest)

    def _parse(self, body: dict[str, Any]) -> GenRequest:
        """A generate body validated, with the test markers switched off unless enabled."""
        req = parse_generate(body)
        check_signatures(req)
        return req if self.markers else replace(req, test_markers=False)

    async def _batch_call(self, method: Callable[..., Any], *args: Any) -> Response:
        """A batch-store call and its JSON, in a worker thread: the poll that finishes a job
        answers all its requests (drawing any images) and its answer may be megabytes of JSON,
        work that must not stall the event loop. The store's lock keeps calls one at a time."""

        def call() -> Response:
            with self.batches.lock:
                answer = method(*args)
            return _json_response(answer)

        return await run_in_threadpool(call)

    async def _batch(self, request: Request) -> Response:
        name, _, action = request.path_params["batch_action"].partition(":")
        try:
            self._check_key(request)
            if request.method == "GET" and not action:
                return await self._batch_call(self.batches.get, f"batches/{name}")
            if request.method == "POST" and action == "cancel":
                return await self._batch_call(self.batches.cancel, f"batches/{name}")
            raise BatchError(404, "Method not found.")
        except ErrorAnswer as err:
            return _google_error(err)
        except BatchError as err:
            return _google_error(ErrorAnswer(err.code, err.message))

    async def _batch_list(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except ErrorAnswer as err:
            return _google_error(err)
        return await self._batch_call(self.batches.list)

    async def _segmind(self, request: Request) -> Response:
        return await self._generate(request, request.path_params["slug"], segmind=True)

    async def _generate(self, request: Request, model: str, segmind: bool) -> Response:
        """One generate call: count it, delay it, then answer or fail as configured."""
        stats = self.stats
        try:
            raw = await _read_body(request)
        except ErrorAnswer as err:  # refused unread, as a frontend does: no body to count
            stats.requests += 1
            return _segmind_error(err) if segmind else _google_error(err)
        digest = hashlib.sha256(raw).hexdigest()
        stats.requests += 1
        stats.by_body[digest] += 1
        attempt = stats.by_body[digest]
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            await self._delay(digest)
            if segmind:
                body = self._admit_segmind(request, raw, model)
            else:
                body = self._admit_google(request, raw, model, "generateContent")
            req = self._parse(body)
            if attempt <= self.fail_first:
                raise _failure(self.fail_status, self.retry_after)
            markers = req.markers
            if "sleep" in markers:
                await asyncio.sleep(float(markers["sleep"]))
            status = markers.get("status", "")
            if status.isdigit() and 400 <= int(status) <= 599:
                raise _failure(int(status), self.retry_after)
            if req.config.image:
                # Drawing and encoding images is Pillow work of milliseconds to seconds: done on
                # the event loop it would stall every other request until it is finished.
                return _json_response(await run_in_threadpool(build_reply, req, model, digest))
            return _json_response(build_reply(req, model, digest))
        except ErrorAnswer as err:
            return _segmind_error(err) if segmind else _google_error(err)
        finally:
            stats.in_flight -= 1

    async def _delay(self, digest: str) -> None:
        """latency plus a per-body jitter: deterministic, so timing tests are repeatable."""
        delay = self.latency
        if self.jitter:
            delay += random.Random(f"{self.seed}:{digest}").uniform(0, self.jitter)
        if delay > 0:
            await asyncio.sleep(delay)

    def _admit_google(
        self, request: Request, raw: bytes, model: str, action: str
    ) -> dict[str, Any]:
        """Google's checks before the body: key, model; then the JSON object. (Size is checked
        while reading it: `_read_body`.)"""
        self._check_key(request)
        if not model.startswith(("gemini", "emulator")):
            raise ErrorAnswer(404, (
                f"models/{model} is not found for API version v1beta, or is not supported for "
                f"{action}. Call ListModels to see the list of available models and their "
                "supported methods."
            ))
        return load_body(raw)

    def _check_key(self, request: Request) -> None:
        if self.api_key is not None:
            key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
            if not key:
                raise ErrorAnswer(403, UNREGISTERED_CALLER)
            if key != self.api_key:
                raise ErrorAnswer(400, INVALID_KEY, INVALID_KEY_DETAILS)

    def _admit_segmind(self, request: Request, raw: bytes, slug: str) -> dict[str, Any]:
        """Segmind's gateway checks: key, slug, content type; then unwrap ``messages``."""
        if self.api_key is not None:
            key = request.headers.get("x-api-key") or _bearer(request.headers.get("authorization"))
            if not key:
                raise ErrorAnswer(401, "Missing Authorization or x-api-key in header")
            if key != self.api_key:
                raise ErrorAnswer(401, "Unauthorized. API key is invalid or may have expired.")
        if not slug.startswith("gemini"):
            raise ErrorAnswer(404, "Model not found")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ErrorAnswer(406, "Content-Type must be application/json")
        return _unwrap_segmind(load_body(raw))

    async def _stats(self, request: Request) -> Response:
        return _json_response(self.stats.as_json())

    async def _reset(self, request: Request) -> Response:
        self.reset_stats()
        return _json_response(self.stats.as_json())


def serve(emu: Emulator, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the emulator over TCP until interrupted (blocking)."""
    import uvicorn

    uvicorn.run(emu, host=host, port=port, access_log=False)
