"""Raw Gemini response JSON to one flat reply record; the reply's Arrow schema lives here, once.

``text`` joins the non-thought text parts of the first candidate, as the official SDK's
``.text`` does; thought summaries go to ``thoughts``; ``images`` skips thought images.
``parts`` records the layout of those non-thought parts — kind, length of a text part, and the
``thoughtSignature`` the model put on it — so a conversation can send the model's turn back
exactly as the API requires (see `gemframe._polars.conversation`) without storing any payload twice.
An answer with no usable content (prompt blocked, SAFETY/RECITATION finish, no candidates) is
still an answer, and says why in ``error`` as well as ``finish_reason``/``block_reason``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from array import array
from typing import Any, cast

import polars as pl

from .._errors import RowError
from .._files import atomic_write
from .schema import ResponseSchema, SchemaMismatch

ERROR_DTYPE = pl.Struct({"code": pl.Int32, "status": pl.String, "message": pl.String})
_IMAGE_BYTES = pl.Struct({"mime_type": pl.String, "data": pl.Binary})
_IMAGE_FILE = pl.Struct({"mime_type": pl.String, "path": pl.String})
PART_DTYPE = pl.Struct({"kind": pl.String, "length": pl.Int32, "thought_signature": pl.String})
"""One non-thought part of the answer, without its payload: ``kind`` is ``"text"`` (its
``length`` characters are the next ones of ``text``) or ``"image"`` (the next of ``images``)."""

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
_OK_FINISH = {None, "STOP", "MAX_TOKENS", "FINISH_REASON_UNSPECIFIED"}


def reply_dtype(*, image_files: bool = False, raw: bool = False, parsed: pl.DataType | None = None) -> pl.Struct:
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
        "cached_content_tokens": pl.Int64(),
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
        with atomic_write(path) as f:  # whole, never through a planted symlink
            f.write(data)
    return path


def decode(
    response: dict[str, Any],
    *,
    cached: bool,
    attempts: int,
    latency_ms: float | None,  # None: no latency of its own (a batch job's answer)
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
    elif text is None and not images and finish_reason is not None and finish_reason not in _OK_FINISH:  # (None is OK)
        error = RowError(None, finish_reason, f"no content: finishReason {finish_reason}")
    return {
        "text": text,
        "thoughts": "".join(thoughts) if thoughts else None,
        "finish_reason": finish_reason,
        "prompt_tokens": usage.get("promptTokenCount"),
        "candidates_tokens": usage.get("candidatesTokenCount"),
        "total_tokens": usage.get("totalTokenCount"),
        "thoughts_tokens": usage.get("thoughtsTokenCount"),
        # the part of prompt_tokens read from a context cache (implicit caching reports it too)
        "cached_content_tokens": usage.get("cachedContentTokenCount"),
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


class ReplyColumn:
    """The reply column of one call, built while answers arrive.

    Each distinct answer's record is added once and rows point at it (identical rows share an
    answer). Records are turned into Arrow every `CHUNK` answers and dropped, so a call holds
    Arrow data, not a Python dict per row: less memory, and no long-lived dicts for the cyclic
    GC to walk over and over (with 100,000 kept records that walking was a third of a cached
    rerun's time). ``schema`` fills ``parsed`` from each answer's text, once per answer.
    """

    CHUNK = 256
    ARROW_AFTER = 32  # chunks built by polars before pyarrow takes over (8,192 answers)

    def __init__(self, dtype: pl.Struct, schema: ResponseSchema | None = None) -> None:
        self.dtype = dtype
        self.schema = schema
        self._row_answer = array("q")  # per row: index of its answer, -1 for a null reply
        self._pending: list[dict[str, Any]] = []  # answers not yet in Arrow
        self._chunks: list[pl.Series] = []
        self._arrow_type = pl.Series("reply", [], dtype=dtype).to_arrow().type if schema is None else None
        self.answers = 0

    def __len__(self) -> int:
        return len(self._row_answer)

    def add_rows(self, count: int) -> None:
        """Room for ``count`` more rows, null until answered."""
        self._row_answer.extend(array("q", [-1]) * count)

    def add_answer(self, record: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Keep a record (parsed if there is a schema); returns its index and the final record."""
        if self.schema is not None and record.get("error") is None:
            record = _parse(record, self.schema)
        self._pending.append(record)
        if len(self._pending) >= self.CHUNK:
            self._flush()
        self.answers += 1
        return self.answers - 1, record

    def point(self, row: int, answer: int) -> None:
        self._row_answer[row] = answer

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._arrow_type is not None and len(self._chunks) >= self.ARROW_AFTER:
            # pyarrow builds the plain reply from dicts ~2x faster than polars, but its converter
            # loads pandas when installed (~50 MiB, 0.15 s once): worth it for long calls only
            import pyarrow as pa

            # an array converts to a Series; pyarrow has no type hints, so mypy cannot pick that overload
            chunk = cast(pl.Series, pl.from_arrow(pa.array(self._pending, type=self._arrow_type)))
            if chunk.dtype != self.dtype:
                chunk = chunk.cast(self.dtype)
        else:  # a parsed dtype may hold enums, which polars cannot import from pyarrow when null
            chunk = pl.Series("reply", self._pending, dtype=self.dtype)
        self._chunks.append(chunk)
        self._pending = []

    def finish(self, name: str = "reply") -> pl.Series:
        """The column, rows in order."""
        self._flush()
        answers = pl.concat(self._chunks) if self._chunks else pl.Series("reply", [], dtype=self.dtype)
        index = pl.Series("index", self._row_answer, dtype=pl.Int64)
        out = answers.gather(index.set(index < 0, None))  # null index: null reply
        # polars says rechunk returns typing.Self, which mypy only knows from Python 3.11
        return cast(pl.Series, out.alias(name).rechunk())


def _parse(record: dict[str, Any], schema: ResponseSchema) -> dict[str, Any]:
    """A record with ``parsed`` filled from its text; a reply that does not fit the schema gets
    a ``PARSE_ERROR``."""
    try:
        return {**record, "parsed": schema.parse(record.get("text"))}
    except SchemaMismatch as exc:
        cut = " (the answer was cut at maxOutputTokens)" if record.get("finish_reason") == "MAX_TOKENS" else ""
        error = RowError(None, "PARSE_ERROR", f"reply does not fit the response schema{cut}: {exc}")
        return {**record, "parsed": None, "error": error.as_dict()}
