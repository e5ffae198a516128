"""Raw Gemini response JSON to one flat reply record; the reply's Arrow schema lives here, once.

``text`` joins the non-thought text parts of the first candidate, as the official SDK's
``.text`` does; thought summaries go to ``thoughts``; ``images`` skips thought images.
``parts`` records the layout of those non-thought parts — kind, length of a text part, and the
``thoughtSignature`` the model put on it — so a conversation can send the model's turn back
exactly as the API requires (see `gemframe.conversation`) without storing any payload twice.
An answer with no usable content (prompt blocked, SAFETY/RECITATION finish, no candidates) is
still an answer, and says why in ``error`` as well as ``finish_reason``/``block_reason``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import polars as pl

from .errors import RowError

ERROR_DTYPE = pl.Struct({"code": pl.Int32, "status": pl.String, "message": pl.String})
_IMAGE_BYTES = pl.Struct({"mime_type": pl.String, "data": pl.Binary})
_IMAGE_FILE = pl.Struct({"mime_type": pl.String, "path": pl.String})
PART_DTYPE = pl.Struct({"kind": pl.String, "length": pl.Int32, "thought_signature": pl.String})
"""One non-thought part of the answer, without its payload: ``kind`` is ``"text"`` (its
``length`` characters are the next ones of ``text``) or ``"image"`` (the next of ``images``)."""

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
_OK_FINISH = {None, "STOP", "MAX_TOKENS", "FINISH_REASON_UNSPECIFIED"}


def reply_dtype(
    *, image_files: bool = False, raw: bool = False, parsed: pl.DataType | None = None
) -> pl.Struct:
    """The reply struct. ``image_files``: images as file paths, not bytes; ``raw``: keep JSON;
    ``parsed``: the dtype of the structured-output value (a ``parsed`` field after ``text``)."""
    fields: dict[str, pl.DataType] = {"text": pl.String()}
    if parsed is not None:
        fields["parsed"] = parsed
    fields |= {
        "thoughts": pl.String(),
        "finish_reason": pl.String(),
        "prompt_tokens": pl.Int64(),
        "candidates_tokens": pl.Int64(),
        "total_tokens": pl.Int64(),
        "thoughts_tokens": pl.Int64(),
        "images": pl.List(_IMAGE_FILE if image_files else _IMAGE_BYTES),
        "parts": pl.List(PART_DTYPE),
        "block_reason": pl.String(),
        "model_version": pl.String(),
        "response_id": pl.String(),
        "error": ERROR_DTYPE,
        "cached": pl.Boolean(),
        "attempts": pl.Int32(),
        "latency_ms": pl.Float64(),
    }
    if raw:
        fields["raw"] = pl.String()
    return pl.Struct(fields)


REPLY_DTYPE = reply_dtype()


def save_image(data: bytes, mime: str, image_dir: str) -> str:
    """Write an image named by its content hash (idempotent) and return its path."""
    name = f"{hashlib.sha256(data).hexdigest()[:32]}.{_EXTENSIONS.get(mime, 'bin')}"
    path = os.path.join(image_dir, name)
    if not os.path.exists(path):
        os.makedirs(image_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


def decode(
    response: dict[str, Any],
    *,
    cached: bool,
    attempts: int,
    latency_ms: float,
    image_dir: str | None = None,
) -> dict[str, Any]:
    """One reply record from a successful (HTTP 200) generateContent response."""
    candidates = response.get("candidates") or []
    first = candidates[0] if candidates else {}
    texts: list[str] = []
    thoughts: list[str] = []
    images: list[dict[str, Any]] = []
    layout: list[dict[str, Any]] = []
    for part in (first.get("content") or {}).get("parts") or []:
        signature = part.get("thoughtSignature") or part.get("thought_signature")
        if "text" in part:
            if part.get("thought"):
                thoughts.append(part["text"])
            else:
                texts.append(part["text"])
                layout.append({"kind": "text", "length": len(part["text"]), "thought_signature": signature})
        elif not part.get("thought"):
            inline = part.get("inlineData") or part.get("inline_data")
            if inline:
                mime = inline.get("mimeType") or inline.get("mime_type") or ""
                data = base64.b64decode(inline.get("data") or "")
                if image_dir is None:
                    images.append({"mime_type": mime, "data": data})
                else:
                    images.append({"mime_type": mime, "path": save_image(data, mime, image_dir)})
                layout.append({"kind": "image", "length": None, "thought_signature": signature})
    usage = response.get("usageMetadata") or {}
    block_reason = (response.get("promptFeedback") or {}).get("blockReason")
    finish_reason = first.get("finishReason")
    text = "".join(texts) if texts else None
    error = None
    if block_reason:
        error = RowError(None, "BLOCKED", f"prompt blocked: blockReason {block_reason}")
    elif not candidates:
        error = RowError(None, "NO_CANDIDATES", "the model returned no candidates")
    elif text is None and not images and finish_reason not in _OK_FINISH:
        error = RowError(None, finish_reason, f"no content: finishReason {finish_reason}")
    return {
        "text": text,
        "thoughts": "".join(thoughts) if thoughts else None,
        "finish_reason": finish_reason,
        "prompt_tokens": usage.get("promptTokenCount"),
        "candidates_tokens": usage.get("candidatesTokenCount"),
        "total_tokens": usage.get("totalTokenCount"),
        "thoughts_tokens": usage.get("thoughtsTokenCount"),
        "images": images,
        "parts": layout,
        "block_reason": block_reason,
        "model_version": response.get("modelVersion"),
        "response_id": response.get("responseId"),
        "error": error.as_dict() if error else None,
        "cached": cached,
        "attempts": attempts,
        "latency_ms": latency_ms,
    }


def failed(error: RowError, *, attempts: int = 0, latency_ms: float | None = None) -> dict[str, Any]:
    """The reply record of a row that got no answer."""
    return {
        "images": [],
        "parts": [],
        "error": error.as_dict(),
        "cached": False,
        "attempts": attempts,
        "latency_ms": latency_ms,
    }


def to_series(name: str, records: list[dict[str, Any] | None], dtype: pl.Struct) -> pl.Series:
    """The reply column; None records (rows with nothing to send) become null structs."""
    return pl.Series(name, records, dtype=dtype)
