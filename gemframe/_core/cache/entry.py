"""What one stored entry is: the raw answer behind a one-line JSON header carrying the entry
format version (so later releases can read old caches), the model, when it was answered and
the prompt it answers (`prompt_text`: so an export says what each answer was for; entries
written before the prompt was kept have none); and what a stored answer must look like to be
read back (`answer_problem`).

Only HTTP 200 answers are stored: a transient failure is never replayed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .key import ENTRY_FORMAT

_CURRENT_HEADER = b'{"format": 1,'  # how `pack`'s json.dumps header starts
PROMPT_CHARS = 2000  # of a prompt kept in the header: enough to recognise it, small beside an answer


def pack(model: str, created: int, raw: bytes, prompt: str | None = None) -> bytes:
    """The stored form of an answer: its header line, then the raw response bytes. The header
    stays one line (json.dumps escapes newlines), so a longer header with the prompt costs a
    cache hit nothing but a longer scan for its end (`unpack` never parses it)."""
    meta: dict[str, Any] = {"format": ENTRY_FORMAT, "model": model, "created": created}
    if prompt is not None:
        meta["prompt"] = prompt[:PROMPT_CHARS]
    return json.dumps(meta).encode() + b"\n" + raw


def prompt_text(body: Mapping[str, Any]) -> str | None:
    """The prompt a request asks, for an entry's header: the text parts of its last user turn
    (the row's prompt; a conversation's history comes before it), joined by newlines, at most
    `PROMPT_CHARS`. None when that turn has no text (an image alone) or the body is not shaped
    like a ``generateContent`` request (`Client.send` takes any JSON body)."""
    contents = body.get("contents") if isinstance(body, Mapping) else None
    if type(contents) is not list:
        return None
    for content in reversed(contents):
        if type(content) is dict and content.get("role", "user") == "user":
            parts = content.get("parts")
            texts = (
                [p["text"] for p in parts if type(p) is dict and type(p.get("text")) is str]
                if type(parts) is list
                else []
            )
            return "\n".join(texts)[:PROMPT_CHARS] if texts else None
    return None


def unpack(entry: bytes) -> bytes | None:
    """The answer behind an entry's header; None if the header is not one this gemframe
    reads (see `header_problem`)."""
    header, _, raw = entry.partition(b"\n")
    if header.startswith(_CURRENT_HEADER):  # the common case, without parsing JSON
        return raw
    return raw if read_header(header).get("format") == ENTRY_FORMAT else None


def read_header(header: bytes) -> dict[str, Any]:
    """An entry's header line as a dict ({} when it is not a JSON object)."""
    try:
        meta = json.loads(header)
    except ValueError:
        return {}
    return meta if type(meta) is dict else {}


def header_problem(entry: bytes) -> str:
    """Why an entry is not read, said in a warning."""
    fmt = read_header(entry.partition(b"\n")[0]).get("format")
    if type(fmt) is int and fmt > ENTRY_FORMAT:
        return f"in entry format {fmt}, newer than this gemframe understands (upgrade gemframe)"
    return "without a gemframe entry header"


def answer_problem(response: Any) -> str | None:
    """Why a parsed answer is not shaped like a ``generateContent`` response (None when it is):
    the fields gemframe reads must have the types it reads them as. Cheap enough to run on every
    cached answer (a few type checks per part)."""
    if type(response) is not dict:
        return "not a JSON object"
    candidates = response.get("candidates")
    if candidates is None and "promptFeedback" not in response:
        return "neither candidates nor promptFeedback"
    if candidates is not None:
        if type(candidates) is not list:
            return "candidates is not a list"
        for candidate in candidates:
            if type(candidate) is not dict:
                return "a candidate is not an object"
            if not _optional_str(candidate.get("finishReason")):
                return "finishReason is not a string"
            content = candidate.get("content")
            if content is None:
                continue
            if type(content) is not dict:
                return "content is not an object"
            parts = content.get("parts")
            if parts is None:
                continue
            if type(parts) is not list:
                return "parts is not a list"
            for part in parts:
                problem = _part_problem(part)
                if problem:
                    return problem
    usage = response.get("usageMetadata")
    if usage is not None:
        if type(usage) is not dict:
            return "usageMetadata is not an object"
        for field in ("promptTokenCount", "candidatesTokenCount", "totalTokenCount", "thoughtsTokenCount"):
            count = usage.get(field)
            if count is not None and (type(count) is not int or not 0 <= count < 2**63):
                return f"usageMetadata.{field} is not a count"
    feedback = response.get("promptFeedback")
    if feedback is not None and (type(feedback) is not dict or not _optional_str(feedback.get("blockReason"))):
        return "promptFeedback is not an object with a string blockReason"
    if not (_optional_str(response.get("modelVersion")) and _optional_str(response.get("responseId"))):
        return "modelVersion or responseId is not a string"
    return None


def _optional_str(value: Any) -> bool:
    return value is None or type(value) is str


def _part_problem(part: Any) -> str | None:
    if type(part) is not dict:
        return "a part is not an object"
    if "text" in part and type(part["text"]) is not str:
        return "a part's text is not a string"
    if not _optional_str(part.get("thoughtSignature") or part.get("thought_signature")):
        return "a thoughtSignature is not a string"
    inline = part.get("inlineData") or part.get("inline_data")
    if inline:
        if type(inline) is not dict or not _optional_str(inline.get("data")):
            return "inlineData is not an object with string data"
        if not _optional_str(inline.get("mimeType") or inline.get("mime_type")):
            return "inlineData's mimeType is not a string"
    return None
