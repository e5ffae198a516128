"""Conversations as data: a ``history`` column of earlier turns, and `turns` to extend one.

A history is a list of turns, each ``{"role": "user" | "model", "parts": [...]}`` with parts
``{"text", "mime_type", "data", "path", "thought_signature"}`` — one of ``text``, ``data``
(image bytes) or ``path`` (an image file or URL) set per part — the polars dtype
`HISTORY_DTYPE`. ``gf.generate(prompt, history=...)`` sends these turns before the row's
prompt. `turns` builds the next history from a history, the prompt (and images) that were sent
and the reply that came back, so a refinement loop is a few lines::

    kw = dict(config={"response_modalities": ["TEXT", "IMAGE"]}, client=client)
    h1 = gf.turns("p1", "r1", images="photo")          # the first exchange, as history
    h2 = gf.turns("p2", "r2", history=h1)              # ... and the second
    out = (df.with_columns(r1=gf.generate("p1", images="photo", **kw))
             .with_columns(r2=gf.generate("p2", history=h1, **kw))
             .with_columns(r3=gf.generate("p3", history=h2, **kw)))

The model's turn is rebuilt from the reply's ``parts`` layout: its text parts and images in the
order the model sent them, each with the ``thoughtSignature`` the model attached, as the API
requires. Each turn is an ordinary request, so it is cached: the same history and prompt is a
cache hit. A reply that failed gives a model turn with no parts, which makes the next turn of
that row an ``INVALID_INPUT`` row error (never a silent restart of the conversation); a row
whose prompt and images are null keeps its history unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Union

import polars as pl

from .._core.payload import sniff_mime
from .._errors import InputError
from .expr import _image_expr

PART_DTYPE = pl.Struct(
    {
        "text": pl.String,
        "mime_type": pl.String,
        "data": pl.Binary,
        "path": pl.String,
        "thought_signature": pl.String,
    }
)
TURN_DTYPE = pl.Struct({"role": pl.String, "parts": pl.List(PART_DTYPE)})
HISTORY_DTYPE = pl.List(TURN_DTYPE)
"""``list<struct<role: str, parts: list<struct<text, mime_type, data: binary, path, thought_signature>>>>``."""

IntoExpr = Union[str, pl.Expr]


def _part(
    text: str | None = None,
    *,
    mime_type: str | None = None,
    data: bytes | None = None,
    path: str | None = None,
    thought_signature: str | None = None,
) -> dict[str, Any]:
    return {"text": text, "mime_type": mime_type, "data": data, "path": path, "thought_signature": thought_signature}


def _image_part(image: Any, signature: str | None = None) -> dict[str, Any]:
    """A history part for an image value: bytes, a path/URL, or a reply image struct."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return _part(mime_type=sniff_mime(data), data=data, thought_signature=signature)
    if isinstance(image, Mapping):
        if image.get("data") is not None:
            data = bytes(image["data"])
            return _part(mime_type=image.get("mime_type") or sniff_mime(data), data=data, thought_signature=signature)
        return _part(mime_type=image.get("mime_type"), path=image.get("path"), thought_signature=signature)
    return _part(path=str(image), thought_signature=signature)


def user_turn(prompt: str | None, images: Any = None) -> dict[str, Any] | None:
    """The user turn that `gemframe._core.payload.RequestBuilder` sent: the prompt, then the images."""
    parts = [] if prompt is None else [_part(prompt)]
    if isinstance(images, (list, tuple)):
        parts += [_image_part(i) for i in images if i is not None]
    elif images is not None:
        parts.append(_image_part(images))
    return {"role": "user", "parts": parts} if parts else None


def model_turn(reply: Mapping[str, Any] | None) -> dict[str, Any]:
    """The model's turn rebuilt from a reply struct, exactly as the model sent it.

    A failed or missing reply has no content and gives a turn with no parts (the next request
    of that row becomes a row error saying so). A reply that answered but did not fit a
    response schema keeps its content: the model did say it.
    """
    if reply is None:
        return {"role": "model", "parts": []}
    text = reply.get("text") or ""
    images = list(reply.get("images") or [])
    layout = reply.get("parts")
    if layout is None:  # a reply without the layout (older data): text first, then images
        layout = [{"kind": "text", "length": len(text)}] if reply.get("text") is not None else []
        layout += [{"kind": "image"}] * len(images)
    parts, offset, image = [], 0, 0
    for item in layout:
        signature = item.get("thought_signature")
        if item.get("kind") == "image":
            if image < len(images):
                parts.append(_image_part(images[image], signature))
            image += 1
        else:
            length = item.get("length") or 0
            parts.append(_part(text[offset : offset + length], thought_signature=signature))
            offset += length
    return {"role": "model", "parts": parts}


def _canonical(turn: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A history turn in the `TURN_DTYPE` shape (``{"role", "text", "images"}`` turns converted)."""
    if turn is None or turn.get("parts") is not None:
        return turn  # type: ignore[return-value]
    parts = user_turn(turn.get("text"), turn.get("images"))
    return {"role": turn.get("role"), "parts": parts["parts"] if parts else []}


def _to_expr(value: IntoExpr) -> pl.Expr:
    return pl.col(value) if isinstance(value, str) else value


def _broadcast(series: pl.Series, height: int) -> pl.Series:
    return series.new_from_index(0, height) if len(series) == 1 and height != 1 else series


def turns(
    prompt: IntoExpr,
    reply: IntoExpr,
    *,
    images: IntoExpr | bytes | os.PathLike[str] | None = None,
    history: IntoExpr | None = None,
) -> pl.Expr:
    """The conversation so far, as a history column: ``history`` (if any), then the user turn
    (``prompt`` and ``images`` as they were sent) and the model turn from ``reply``.

    Pass the result as ``history=`` to `gemframe.generate` to continue the conversation, or as
    ``history=`` to another `turns` to extend it. Returns `HISTORY_DTYPE`.
    """
    exprs = [_to_expr(prompt), _to_expr(reply)]
    if images is not None:
        exprs.append(_image_expr(images))
    if history is not None:
        exprs.append(_to_expr(history))

    def run(batch: Sequence[pl.Series]) -> pl.Series:
        height = max((len(c) for c in batch if len(c) != 1), default=1)
        columns = [_broadcast(c, height) for c in batch]
        if not (isinstance(columns[1].dtype, pl.Struct) or columns[1].dtype == pl.Null):
            raise InputError(
                f"reply column {columns[1].name!r} has dtype {columns[1].dtype}; pass the reply "
                "struct column that gf.generate made"
            )
        prompts, replies = columns[0].to_list(), columns[1].to_list()
        image_col = columns[2].to_list() if images is not None else [None] * height
        past = columns[-1].to_list() if history is not None else [None] * height
        out = []
        for p, r, i, h in zip(prompts, replies, image_col, past):
            asked = user_turn(p, i)
            if asked is None:  # nothing was asked in this row: the conversation is unchanged
                out.append(None if h is None else [_canonical(t) for t in h])
                continue
            out.append([*(_canonical(t) for t in h or []), asked, model_turn(r)])
        return pl.Series("history", out, dtype=HISTORY_DTYPE)

    return pl.map_batches(exprs, run, return_dtype=HISTORY_DTYPE, is_elementwise=True).alias("history")
