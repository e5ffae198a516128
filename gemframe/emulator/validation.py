"""What the emulator checks before it answers: the real API's figures, field names and
messages, its error answers, and the validated request an answer is derived from.

`parse_generate` / `parse_count_tokens` turn a JSON body into a `GenRequest` or raise
`ErrorAnswer` with the message the real API gives for the same mistake.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from . import render

# ---------------------------------------------------------------------------------------------
# Constants: the real API's figures, field names and messages
# ---------------------------------------------------------------------------------------------

IMAGE_INPUT_TOKENS = 258
IMAGE_OUTPUT_TOKENS = 1290
MAX_CANDIDATES = 8
MAX_BODY_BYTES = 20 * 1024 * 1024
ECHO_CHARS = 20

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
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
INVALID_KEY_DETAILS = [
    {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }
]
# The video and audio input the API documents (https://ai.google.dev/gemini-api/docs/video and
# /audio), by MIME type, each with where its container's signature sits: (offset, bytes), any
# of them. The emulator cannot decode media, so a signature is all it checks. (Its own list, on
# purpose: not gemframe's sniffer, which it is the oracle for.)
AV_SIGNATURES: dict[str, tuple[tuple[int, bytes], ...]] = {
    "video/mp4": ((4, b"ftyp"),),
    "video/mov": ((4, b"ftyp"), (4, b"moov"), (4, b"mdat")),
    "video/3gpp": ((4, b"ftyp"),),
    "video/avi": ((8, b"AVI "),),
    "video/webm": ((0, b"\x1a\x45\xdf\xa3"),),
    "video/mpeg": ((0, b"\x00\x00\x01"),),
    "video/mpg": ((0, b"\x00\x00\x01"),),
    "video/x-flv": ((0, b"FLV"),),
    "video/wmv": ((0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"),),
    "audio/wav": ((8, b"WAVE"),),
    "audio/mp3": ((0, b"ID3"), (0, b"\xff")),
    "audio/aiff": ((8, b"AIFF"), (8, b"AIFC")),
    "audio/aac": ((0, b"\xff"),),
    "audio/ogg": ((0, b"OggS"),),
    "audio/flac": ((0, b"fLaC"),),
}
# Tokens a second (https://ai.google.dev/gemini-api/docs/tokens: video 263, audio 32). The
# length is a stand-in from the size (the emulator reads no container): 1 Mbit/s of video,
# 128 kbit/s of audio, low bitrates for compressed media, so counts err high.
AV_TOKENS_PER_SECOND = {"video": 263, "audio": 32}
AV_BYTES_PER_SECOND = {"video": 125_000, "audio": 16_000}

UNPROCESSABLE_IMAGE = (
    "Unable to process input image. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting"
)

# The Gemini model families the API serves, each also under its version ids: ``-001``,
# ``-latest``, ``-preview...``, ``-exp...`` (``gemini-2.5-flash-preview-05-20``,
# ``gemini-2.0-flash-001``, ``gemini-exp-1206``). Any other name is a 404 NOT_FOUND, as a typo
# (``gemini-2.5-flsh``) is at the real API; ``emulator...`` names are the emulator's own.
GEMINI_MODELS = frozenset(
    {
        "gemini-3-pro",
        "gemini-3-pro-image",
        "gemini-2.5-pro",
        "gemini-2.5-flash",
        "gemini-2.5-flash-lite",
        "gemini-2.5-flash-image",
        "gemini-2.5-flash-native-audio",
        "gemini-2.5-computer-use",
        "gemini-live-2.5-flash",
        "gemini-2.0-flash",
        "gemini-2.0-flash-lite",
        "gemini-2.0-flash-live",
        "gemini-2.0-flash-thinking",
        "gemini-2.0-pro",
        "gemini-1.5-pro",
        "gemini-1.5-flash",
        "gemini-1.5-flash-8b",
        "gemini-1.0-pro",
        "gemini-pro",
        "gemini-pro-vision",
        "gemini-flash",
        "gemini-flash-lite",
        "gemini-exp",
    }
)
_MODEL_VERSION = r"(?:-(?:\d{3,4}|latest)|-(?:preview|exp)(?:-[\w.]+)*)?"


@lru_cache(maxsize=1024)  # bounded: names come from whoever reaches the server
def model_known(model: str, known: frozenset[str] = GEMINI_MODELS) -> bool:
    """Whether ``model`` is one of ``known`` (or a version of one), or an ``emulator`` name."""
    if model.startswith("emulator"):
        return True
    return any(re.fullmatch(re.escape(base) + _MODEL_VERSION, model) for base in known)


def model_not_found(model: str, action: str, version: str = "v1beta") -> str:
    """The real API's 404 message for a model it does not have (or that lacks the method)."""
    return (
        f"models/{model} is not found for API version {version}, or is not supported for "
        f"{action}. Call ListModels to see the list of available models and their supported "
        "methods."
    )


REQUEST_FIELDS = frozenset(
    {
        "contents",
        "system_instruction",
        "generation_config",
        "safety_settings",
        "tools",
        "tool_config",
        "cached_content",
    }
)
COUNT_TOKENS_FIELDS = frozenset({"contents", "generate_content_request"})
CONTENT_FIELDS = frozenset({"role", "parts"})
DATA_FIELDS = frozenset(
    {
        "text",
        "inline_data",
        "file_data",
        "function_call",
        "function_response",
        "executable_code",
        "code_execution_result",
    }
)
PART_FIELDS = DATA_FIELDS | {"thought", "thought_signature", "video_metadata"}
BLOB_FIELDS = frozenset({"mime_type", "data"})
FILE_FIELDS = frozenset({"mime_type", "file_uri"})
CONFIG_FIELDS = frozenset(
    {
        "stop_sequences",
        "response_mime_type",
        "response_schema",
        "response_json_schema",
        "response_modalities",
        "candidate_count",
        "max_output_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "response_logprobs",
        "logprobs",
        "thinking_config",
        "image_config",
        "media_resolution",
        "speech_config",
    }
)
INT_CONFIG = ("candidate_count", "max_output_tokens", "top_k", "seed", "logprobs")
FLOAT_CONFIG = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
THINKING_FIELDS = frozenset({"include_thoughts", "thinking_budget", "thinking_level"})
IMAGE_CONFIG_FIELDS = frozenset({"aspect_ratio", "image_size"})
ASPECT_RATIOS = frozenset({"1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"})
RESPONSE_MIME_TYPES = ("text/plain", "application/json", "text/x.enum")
MODALITIES = frozenset({"TEXT", "IMAGE", "AUDIO"})
SCHEMA_FIELDS = frozenset(
    {
        "type",
        "format",
        "title",
        "description",
        "nullable",
        "enum",
        "max_items",
        "min_items",
        "properties",
        "required",
        "min_properties",
        "max_properties",
        "min_length",
        "max_length",
        "pattern",
        "example",
        "any_of",
        "property_ordering",
        "default",
        "items",
        "minimum",
        "maximum",
    }
)
SCHEMA_TYPES = frozenset(
    {
        "TYPE_UNSPECIFIED",
        "STRING",
        "NUMBER",
        "INTEGER",
        "BOOLEAN",
        "ARRAY",
        "OBJECT",
        "NULL",
    }
)
SAFETY_FIELDS = frozenset({"category", "threshold"})
# The API's own lists, kept here apart from gemframe/_core/payload.py's on purpose: the emulator is
# a test oracle and shares nothing with the client, so a wrong list on one side shows up in tests.
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
RATED_CATEGORIES = (
    "HARM_CATEGORY_SEXUALLY_EXPLICIT",
    "HARM_CATEGORY_HATE_SPEECH",
    "HARM_CATEGORY_HARASSMENT",
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
        self,
        code: int,
        message: str,
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
        status: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or []
        self.retry_after = retry_after
        self.status = status  # the canonical status when not the code's usual one (FAILED_PRECONDITION)


def _invalid(message: str) -> ErrorAnswer:
    return ErrorAnswer(400, message)


def _echo(value: Any) -> str:
    """A value as the real API quotes it in messages, clipped so errors stay short."""
    if isinstance(value, str):
        return json.dumps(_clip(value, ECHO_CHARS))
    return _clip(json.dumps(value), ECHO_CHARS)


def _clip(text: str, limit: int) -> str:
    # Not gemframe._errors.clip: the emulator keeps its own, a test oracle shares nothing with the client.
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

    kind: str  # "Image", "Document", "Video", "Audio" or "File": the label's prefix in the reply text
    label: str  # e.g. "PNG 64x48"
    tokens: int
    modality: str  # usageMetadata modality: IMAGE, DOCUMENT, AUDIO, VIDEO (TEXT: a text file)
    data: bytes = b""  # decoded bytes of images, kept so they can be edited
    uri: str = ""  # a fileData part's fileUri, resolved against the Files API store (files.py)


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
    schema: dict[str, Any] | None = None
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
    # Prompt tokens by modality that came from a cachedContent (its turns are already in
    # ``system``/``turns``): reported as usageMetadata.cachedContentTokenCount.
    cached: tuple[tuple[str, int], ...] = ()

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
    """Gemini-like token estimate: about four characters a token. (Not gemframe._core.tokens:
    the emulator keeps its own rule, a test oracle must not share the client's assumptions.)"""
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
            raise _invalid(f'Invalid JSON payload received. Unknown name "{key}"{at}: Cannot find field.')
        out[name] = item
    return out


def load_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or the real API's 400."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:
        raise _invalid(f"Invalid JSON payload received. Unexpected token: {exc}.") from None
    if not isinstance(body, dict):
        raise _invalid('Invalid JSON payload received. Unknown name "": Root element must be a message.')
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
        raise _invalid(f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty.\n")
    if not isinstance(parts, list):
        raise _bad_value(f"{where}.parts", parts, "list expected")
    return Turn(role, tuple(_parse_part(p, f"{where}.parts[{i}]") for i, p in enumerate(parts)))


def _parse_part(value: Any, where: str) -> Part:
    fields = _fields(value, PART_FIELDS, where)
    data = [name for name in fields if name in DATA_FIELDS]
    if not data:
        raise _invalid(
            f"* GenerateContentRequest.{where}.data: required oneof field 'data' must have one initialized field\n"
        )
    if len(data) > 1:
        raise _invalid(f"Invalid JSON payload received. Oneof field 'data' at '{where}' is already set.")
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
    if str(fields["mime_type"]).lower() in AV_SIGNATURES:
        av = av_media(data, str(fields["mime_type"]))
        if av is None:  # not the container it claims to be: the API cannot decode it
            raise _invalid(FAILURE_MESSAGES[400])
        return av
    media = media_of(data)
    if media is None:
        raise _invalid(UNPROCESSABLE_IMAGE)
    return media


def media_of(data: bytes) -> Media | None:
    """An image Pillow can read or a PDF, as the reply describes and bills it; else None.
    One rule for inline data and uploaded files, so both count the same tokens."""
    image = render.inspect_image(data)
    if image:
        fmt, width, height = image
        return Media("Image", f"{fmt} {width}x{height}", IMAGE_INPUT_TOKENS, "IMAGE", data)
    if data.startswith(b"%PDF"):
        pages = max(1, len(PDF_PAGE.findall(data)))
        return Media("Document", f"PDF, {len(data)} bytes", IMAGE_INPUT_TOKENS * pages, "DOCUMENT")
    return None


def av_media(data: bytes, mime: str) -> Media | None:
    """Video or audio, as the reply describes and bills it: 263 tokens a second of video, 32 of
    audio, its length the stand-in `AV_BYTES_PER_SECOND` gives (at least a second). None: a
    documented type whose bytes do not start as that type does (`AV_SIGNATURES`)."""
    family = mime.split("/")[0].lower()
    signatures = AV_SIGNATURES.get(mime.lower())
    if signatures is not None and not any(data[at : at + len(sign)] == sign for at, sign in signatures):
        return None
    seconds = max(1, math.ceil(len(data) / AV_BYTES_PER_SECOND[family]))
    return Media(family.title(), f"{mime}, {len(data)} bytes", AV_TOKENS_PER_SECOND[family] * seconds, family.upper())


def _b64decode(value: Any, where: str) -> bytes:
    """Standard or URL-safe base64, padding optional, as proto3 JSON accepts."""
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        text = value.replace("-", "+").replace("_", "/")
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"Invalid value at '{where}' (TYPE_BYTES), Base64 decoding failed for {_echo(value)}") from None


def _parse_file(value: Any, where: str) -> Media:
    fields = _fields(value, FILE_FIELDS, where)
    uri, mime = fields.get("file_uri"), str(fields.get("mime_type") or "")
    if not uri or not isinstance(uri, str):
        raise _invalid(f"* GenerateContentRequest.{where}.file_uri: file_uri is not specified\n")
    family = mime.split("/")[0].upper()
    modality = family if family in ("IMAGE", "AUDIO", "VIDEO") else "DOCUMENT"
    return Media("File", f"{mime or 'unknown type'} {uri}", IMAGE_INPUT_TOKENS, modality, uri=uri)


def parse_turns(fields: dict[str, Any]) -> tuple[Turn | None, tuple[Turn, ...]]:
    """(system instruction, contents) of a snake_case body such as a cachedContent, which
    (unlike a generate request) may hold a system instruction and no contents."""
    contents = fields.get("contents") or []
    if not isinstance(contents, list):
        raise _bad_value("contents", contents, "list expected")
    turns = tuple(_parse_turn(c, f"contents[{i}]") for i, c in enumerate(contents))
    system = fields.get("system_instruction")
    return (_parse_turn(system, "system_instruction") if system is not None else None), turns


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
                f"{where}.threshold",
                fields.get("threshold"),
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
    thinking = _fields(fields.get("thinking_config") or {}, THINKING_FIELDS, "generation_config.thinking_config")
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
            "* GenerateContentRequest.generation_config.stop_sequences: at most 5 stop sequences are allowed.\n"
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
                f"generation_config.response_modalities[{i}]",
                item,
                f"{ENUM_PROTO}.GenerationConfig.Modality",
            )
        modalities.add(name)
    if "AUDIO" in modalities:
        raise _invalid("Model does not support the requested response modalities: audio")
    return modalities


def _parse_response_format(fields: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(response MIME type, schema) after the real API's consistency checks."""
    where = "* GenerateContentRequest.generation_config"
    mime = fields.get("response_mime_type") or "text/plain"
    if not _member(mime, RESPONSE_MIME_TYPES):
        raise _invalid(
            f"{where}.response_mime_type: allowed mimetypes are `text/plain`, `application/json` and `text/x.enum`.\n"
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
        raise _invalid(f"* GenerateContentRequest.{where}.properties: should be non-empty for OBJECT type\n")
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
        raise _bad_value("generation_config.image_config.aspect_ratio", ratio, "unsupported aspect ratio")
    w, h = (int(x) for x in ratio.split(":"))
    side = render.MAX_SIDE
    return (side, round(side * h / w)) if w >= h else (round(side * w / h), side)
