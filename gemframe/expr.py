"""The polars expressions: `generate`, `request` and `send`.

Each is a thin `pl.map_batches` over the prompt/image (or request) columns that declares the
reply struct as ``return_dtype`` and is elementwise, so lazy frames know the schema before
running and the streaming engine can feed it morsel by morsel.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import polars as pl

from .cache import CacheMode
from .client import Client, Row
from .errors import InputError, RowError
from .payload import RequestBuilder
from .progress import Progress
from .response import reply_dtype, to_series

IntoExpr = Union[str, pl.Expr]
"""A column name or an expression, as polars functions accept."""

_default_client: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The client used when none is passed: provider and key from the environment."""
    global _default_client
    with _default_lock:
        if _default_client is None:
            _default_client = Client()
        return _default_client


def _to_expr(value: IntoExpr) -> pl.Expr:
    return pl.col(value) if isinstance(value, str) else value


def _is_text(dtype: pl.DataType) -> bool:
    return dtype in (pl.String, pl.Null, pl.Categorical) or isinstance(dtype, (pl.Categorical, pl.Enum))


def _is_image(dtype: pl.DataType) -> bool:
    if isinstance(dtype, (pl.List, pl.Array)):
        dtype = dtype.inner
    return dtype in (pl.String, pl.Binary, pl.Null) or isinstance(dtype, pl.Struct)


def _check_columns(prompts: pl.Series, images: pl.Series | None) -> None:
    if not _is_text(prompts.dtype):
        raise InputError(
            f"prompt column {prompts.name!r} has dtype {prompts.dtype}; it must hold strings. "
            f"Cast it: pl.col({prompts.name!r}).cast(pl.String)"
        )
    if images is not None and not _is_image(images.dtype):
        raise InputError(
            f"images column {images.name!r} has dtype {images.dtype}; it must hold paths/URLs "
            "(String), bytes (Binary), or a List of either"
        )


def _rows(builder: RequestBuilder, prompts: list[Any], images: list[Any]) -> Iterator[Row]:
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        try:
            yield builder.build(prompt, image)
        except InputError as exc:
            yield RowError(None, "INVALID_INPUT", f"row {row}: {exc}")


def generate(
    prompt: IntoExpr,
    *,
    images: IntoExpr | None = None,
    system: str | None = None,
    model: str | None = None,
    config: Mapping[str, Any] | None = None,
    safety: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
    client: Client | None = None,
    cache: str | CacheMode | None = None,
    sample: int = 0,
    progress: bool | Progress | None = None,
    image_dir: str | None = None,
    raw: bool = False,
) -> pl.Expr:
    """Ask Gemini once per row; returns the reply struct column (named ``reply``).

    ``images`` holds a path, URL, bytes, or a list of them per row (nulls allowed); ``config``
    is a generationConfig (snake_case or camelCase keys); ``safety`` maps harm categories to
    thresholds. A row with a null prompt and no images gets a null reply and sends nothing.
    ``image_dir`` writes generated images there (named by content hash) and returns their paths.
    ``sample`` picks a distinct cached answer for the same request (for N samples per prompt).
    """
    builder = RequestBuilder(system, config, safety)  # a bad config fails here, not mid-run
    dtype = reply_dtype(image_files=image_dir is not None, raw=raw)
    exprs = [_to_expr(prompt)] + ([_to_expr(images)] if images is not None else [])

    def run(columns: list[pl.Series]) -> pl.Series:
        prompts, image_col = columns[0], (columns[1] if len(columns) > 1 else None)
        _check_columns(prompts, image_col)
        if image_col is None:
            image_list: list[Any] = [None] * len(prompts)
            total = len(prompts) - prompts.null_count()
        else:
            image_list = image_col.to_list()
            total = int((prompts.is_not_null() | image_col.is_not_null()).sum())
        records = (client or default_client()).send(
            _rows(builder, prompts.to_list(), image_list),
            total=total, model=model, cache=cache, sample=sample,
            progress=progress, image_dir=image_dir, raw=raw,
        )
        return to_series("reply", records, dtype)

    return pl.map_batches(exprs, run, return_dtype=dtype, is_elementwise=True).alias("reply")


def request(
    prompt: IntoExpr,
    *,
    images: IntoExpr | None = None,
    system: str | None = None,
    config: Mapping[str, Any] | None = None,
    safety: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
) -> pl.Expr:
    """The exact ``generateContent`` JSON body per row, as a String column (``request``),
    without sending anything: to look at, save, diff, or send later with `send`."""
    builder = RequestBuilder(system, config, safety)
    exprs = [_to_expr(prompt)] + ([_to_expr(images)] if images is not None else [])

    def run(columns: list[pl.Series]) -> pl.Series:
        prompts, image_col = columns[0], (columns[1] if len(columns) > 1 else None)
        _check_columns(prompts, image_col)
        image_list = image_col.to_list() if image_col is not None else [None] * len(prompts)
        bodies = []
        for item in _rows(builder, prompts.to_list(), image_list):
            if isinstance(item, RowError):
                raise InputError(item.message)
            bodies.append(None if item is None else json.dumps(item, ensure_ascii=False))
        return pl.Series("request", bodies, dtype=pl.String)

    return pl.map_batches(exprs, run, return_dtype=pl.String, is_elementwise=True).alias("request")


def _parsed(requests: list[str | None]) -> Iterator[Row]:
    for row, text in enumerate(requests):
        if text is None:
            yield None
            continue
        try:
            body = json.loads(text)
        except ValueError as exc:
            yield RowError(None, "INVALID_INPUT", f"row {row}: request is not JSON: {exc}")
            continue
        if isinstance(body, dict) and body.get("contents"):
            yield body
        else:
            yield RowError(None, "INVALID_INPUT", f"row {row}: request has no 'contents'")


def send(
    requests: IntoExpr,
    *,
    model: str | None = None,
    client: Client | None = None,
    cache: str | CacheMode | None = None,
    sample: int = 0,
    progress: bool | Progress | None = None,
    image_dir: str | None = None,
    raw: bool = False,
) -> pl.Expr:
    """Send a column of JSON request bodies (as made by `request`); returns the reply struct."""
    dtype = reply_dtype(image_files=image_dir is not None, raw=raw)

    def run(column: pl.Series) -> pl.Series:
        if column.dtype not in (pl.String, pl.Null):
            raise InputError(f"request column {column.name!r} must hold JSON strings, not {column.dtype}")
        records = (client or default_client()).send(
            _parsed(column.to_list()),
            total=len(column) - column.null_count(), model=model, cache=cache,
            sample=sample, progress=progress, image_dir=image_dir, raw=raw,
        )
        return to_series("reply", records, dtype)

    return _to_expr(requests).map_batches(run, return_dtype=dtype, is_elementwise=True).alias("reply")
