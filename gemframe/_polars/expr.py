"""The polars expressions: `generate`, `request` and `send` (`turns`, for conversations, is in
`gemframe._polars.conversation`).

Each is a thin `pl.map_batches` over the prompt/image (or request) columns that declares the
reply struct as ``return_dtype`` and is elementwise, so lazy frames know the schema before
running and the streaming engine can feed it morsel by morsel.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Collection, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Union

import polars as pl
import polars.selectors as cs

from .._core.cache import CacheMode
from .._core.client import Client, Row, default_client, named_client
from .._core.context import context_ttl
from .._core.payload import RequestBuilder
from .._core.progress import Progress, job
from .._core.response import reply_dtype
from .._core.spec import Ask, RequestSpec, Unpack, asks, request_spec
from .._errors import InputError, RowError, exception_text

if TYPE_CHECKING:
    from polars.datatypes import DataTypeClass

IntoExpr = Union[str, pl.Expr]
"""A column name or an expression, as polars functions accept."""


def _to_expr(value: IntoExpr) -> pl.Expr:
    return pl.col(value) if isinstance(value, str) else value


def _image_expr(value: IntoExpr | bytes | os.PathLike[str]) -> pl.Expr:
    """A column name, an expression, or one image shared by every row (bytes or a path)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return pl.lit(bytes(value), dtype=pl.Binary)
    if isinstance(value, os.PathLike):
        return pl.lit(os.fspath(value), dtype=pl.String)
    return _to_expr(value)


def _is_text(dtype: pl.DataType) -> bool:
    return dtype in (pl.String, pl.Null, pl.Categorical) or isinstance(dtype, (pl.Categorical, pl.Enum))


def _is_image(dtype: pl.DataType) -> bool:
    inner: pl.DataType | DataTypeClass = dtype
    if isinstance(dtype, (pl.List, pl.Array)):
        inner = dtype.inner
    return inner in (pl.String, pl.Binary, pl.Null) or isinstance(inner, pl.Struct)


def _is_history(dtype: pl.DataType) -> bool:
    return dtype == pl.Null or (
        isinstance(dtype, pl.List) and (dtype.inner == pl.Null or isinstance(dtype.inner, pl.Struct))
    )


def _check_columns(prompts: pl.Series, images: pl.Series | None, history: pl.Series | None = None) -> None:
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
    if history is not None and not _is_history(history.dtype):
        raise InputError(
            f"history column {history.name!r} has dtype {history.dtype}; it must be a list of "
            "turns (structs with role and parts), as gf.turns(...) makes: gf.HISTORY_DTYPE"
        )


def _column_or_null(name: str) -> pl.Expr:
    """The column ``name``, or a null literal when the frame has none. ``pl.col(name)`` would
    make polars fail on a missing column with its own error, which cannot say that the string
    was taken for a column name; this way `_Inputs.columns` sees the stand-in (named
    "literal", not ``name``) and says so, before anything is sent. The schema is unchanged,
    so lazy frames still know the reply's type up front."""
    return pl.coalesce(cs.by_name(name, require_all=False), pl.lit(None))


def _not_a_column(argument: str, name: str) -> str:
    if argument == "prompt":
        fix = f"to send this text as the prompt of every row, pass pl.lit({name!r})"
    elif argument == "images":
        fix = f"for one image for every row, pass pathlib.Path({name!r}) (a file) or pl.lit({name!r}) (a path or URL)"
    else:
        fix = "pass the name of a column of turns (see gf.turns)"
    return f"{argument}={name!r} was taken for a column name, but the frame has no such column; {fix}"


class _Inputs:
    """The input expressions of `generate`/`request` and, per batch, their columns as lists
    (a literal, e.g. one reference image for every row, is broadcast to the batch)."""

    def __init__(self, prompt: IntoExpr, images: Any, history: IntoExpr | None) -> None:
        self.has_images, self.has_history = images is not None, history is not None
        given = [("prompt", prompt), ("images", images), ("history", history)]
        self.exprs: list[pl.Expr] = []
        self.taken: dict[int, tuple[str, str]] = {}  # position -> (argument, string taken for a column name)
        for argument, value in given:
            if value is None and argument != "prompt":
                continue
            if isinstance(value, str):
                self.taken[len(self.exprs)] = (argument, value)
                self.exprs.append(_column_or_null(value))
            else:
                self.exprs.append(_image_expr(value) if argument == "images" else _to_expr(value))

    def columns(self, columns: list[pl.Series]) -> tuple[list[Any], list[Any], list[Any], int]:
        for position, (argument, name) in self.taken.items():
            if columns[position].name != name:  # no such column: the null stood in (_column_or_null)
                raise InputError(_not_a_column(argument, name))
        height = max((len(c) for c in columns if len(c) != 1), default=1)
        columns = [c.new_from_index(0, height) if len(c) == 1 and height != 1 else c for c in columns]
        prompts = columns[0]
        image_col = columns[1] if self.has_images else None
        history_col = columns[-1] if self.has_history else None
        _check_columns(prompts, image_col, history_col)
        asked = prompts.is_not_null()
        if image_col is not None:
            asked = asked | image_col.is_not_null()
        none = [None] * height
        return (
            prompts.to_list(),
            image_col.to_list() if image_col is not None else none,
            history_col.to_list() if history_col is not None else none,
            int(asked.sum()),
        )


def _rows(
    builder: RequestBuilder,
    prompts: list[Any],
    images: list[Any],
    histories: list[Any],
    allow_private_urls: bool = False,
    defer_urls: bool = False,
) -> Iterator[Row]:
    """Each row's request body, or its error: whatever goes wrong while building one row (bad
    input, or anything unforeseen it makes a reader raise) is that row's error and the call
    goes on; ending it would throw away the answers to the rows around it. ``defer_urls``:
    image URLs are left for `Client.send` to fetch (see `RequestBuilder.build`)."""
    for row, (prompt, image, history) in enumerate(zip(prompts, images, histories)):
        try:
            body = builder.build(prompt, image, history, allow_private_urls=allow_private_urls, defer_urls=defer_urls)
        except InputError as exc:
            yield RowError(None, "INVALID_INPUT", f"row {row}: {exc}")
        except Exception as exc:
            yield RowError(None, "INVALID_INPUT", f"row {row}: {exception_text(exc)}")
        else:
            yield body


def _job_progress(
    key: object, sender: Client, model: str | None, progress: bool | Progress | None, total: int, label: str
) -> AbstractContextManager[Progress]:
    """The bar (and failure tally) of one call of an expression: shared with the other calls of
    the same expression in one job (the streaming engine calls it once per morsel, from several
    threads at once or one after another; see `job`), so a job draws one bar, labelled by its
    input column, and warns about failed rows once. A `Progress` passed in is the caller's
    (`gemframe.run`)."""
    if isinstance(progress, Progress):
        return nullcontext(progress)
    enabled = sender.progress if progress is None else progress
    model = model or sender.model
    return job((key, sender, model), total, enabled, model, label)


_MODES = ("live", "batch")


def _check_run(cache: str | CacheMode | None, mode: str) -> None:
    """How-to-run options that can be wrong, checked when the expression is made (not once per
    batch, after some of them were sent)."""
    if cache is not None:
        CacheMode(cache)
    if mode not in _MODES:
        raise ValueError(f"mode must be 'live' or 'batch', not {mode!r}")


@asks
def generate(
    prompt: IntoExpr,
    *,
    images: IntoExpr | bytes | os.PathLike[str] | None = None,
    history: IntoExpr | None = None,
    spec: RequestSpec | None = None,
    client: Client | None = None,
    cache: str | CacheMode | None = None,
    progress: bool | Progress | None = None,
    image_dir: str | None = None,
    raw: bool = False,
    mode: str = "live",
    batch_state: str | None = None,
    poll_interval: float = 30.0,
    wait: bool = True,
    cache_context: bool | float | str | None = None,
    **ask: Unpack[Ask],
) -> pl.Expr:
    """Ask Gemini once per row; returns the reply struct column (named ``reply``).

    ``images`` holds a path, URL, bytes, or a list of them per row (nulls allowed), or one image
    for every row (``bytes``, a ``pathlib.Path`` or ``pl.lit(...)``); ``history`` is a column of
    earlier turns sent before the prompt (see `gemframe.turns`).

    What to ask is a `gemframe.RequestSpec`, given as ``spec=`` or as its keywords: ``model``,
    ``system``, ``config`` (a generationConfig, snake_case or camelCase keys), ``safety`` (harm
    categories to thresholds), ``response_schema`` (a polars dtype, a dataclass/TypedDict, or a
    JSON-schema dict: asks for JSON and adds a typed ``parsed`` field; a reply that does not fit
    it is a ``PARSE_ERROR`` row error) and ``sample`` (a distinct cached answer for the same
    request). They are checked here, when the expression is made: a bad config raises at
    ``gf.generate(...)``, before any row is read.

    A row with a null prompt and no images gets a null reply and sends nothing. ``image_dir``
    writes generated images there (named by content hash) and returns their paths.
    ``mode="batch"`` sends the misses through the provider's Batch Mode (half price, answered
    within a day) and waits, polling every ``poll_interval`` seconds; stopped and run again, it
    picks up the same jobs (recorded in ``batch_state``, by default in the cache directory);
    ``wait=False`` submits and returns at once, rows not yet answered being ``BATCH_PENDING``.
    ``cache_context`` (None: the client's option) sends the shared prefix (``system`` and
    ``context``) once, by context cache: see `gemframe.Client`.
    """
    spec = request_spec(spec, ask, "generate")  # validated here, once
    _check_run(cache, mode)
    context_ttl(cache_context)  # a bad TTL fails here
    client = named_client(client)  # client="emulator": that provider's shared Client
    schema = spec.schema
    dtype = reply_dtype(image_files=image_dir is not None, raw=raw, parsed=schema.dtype if schema else None)
    inputs = _Inputs(prompt, images, history)

    def run(columns: Sequence[pl.Series]) -> pl.Series:
        prompts, image_list, histories, total = inputs.columns(list(columns))
        sender = client or default_client()
        with _job_progress(run, sender, spec.model, progress, total, columns[0].name) as bar:
            return sender.send(
                _rows(spec.builder, prompts, image_list, histories, sender.allow_private_urls, defer_urls=True),
                total=total,
                spec=spec,
                cache=cache,
                progress=bar,
                image_dir=image_dir,
                raw=raw,
                mode=mode,
                batch_state=batch_state,
                poll_interval=poll_interval,
                wait=wait,
                cache_context=cache_context,
            )

    return pl.map_batches(inputs.exprs, run, return_dtype=dtype, is_elementwise=True).alias("reply")


@asks
def request(
    prompt: IntoExpr,
    *,
    images: IntoExpr | bytes | os.PathLike[str] | None = None,
    history: IntoExpr | None = None,
    spec: RequestSpec | None = None,
    **ask: Unpack[Ask],
) -> pl.Expr:
    """The exact ``generateContent`` JSON body per row, as a String column (``request``),
    without sending anything: to look at, save, diff, or send later with `send`. What to ask
    is a `gemframe.RequestSpec` or its keywords, as for `generate` (``model`` and ``sample``
    are not part of the body: give them to `send`)."""
    spec = request_spec(spec, ask, "request")
    inputs = _Inputs(prompt, images, history)

    def run(columns: Sequence[pl.Series]) -> pl.Series:
        prompts, image_list, histories, _ = inputs.columns(list(columns))
        bodies = []
        for item in _rows(spec.builder, prompts, image_list, histories):
            if isinstance(item, RowError):
                raise InputError(item.message)
            bodies.append(None if item is None else json.dumps(item, ensure_ascii=False))
        return pl.Series("request", bodies, dtype=pl.String)

    return pl.map_batches(inputs.exprs, run, return_dtype=pl.String, is_elementwise=True).alias("request")


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
        if not (isinstance(body, dict) and body.get("contents")):
            yield RowError(None, "INVALID_INPUT", f"row {row}: request has no 'contents'")
        elif not _well_formed(body["contents"]):
            yield RowError(
                None,
                "INVALID_INPUT",
                f"row {row}: request 'contents' must be a list of "
                "turns, each an object whose 'parts' is a list of objects",
            )
        else:
            yield body


def _well_formed(contents: Any) -> bool:
    """Whether ``contents`` has the shape the client walks (for image sizes, cache keys): a body
    of another shape is its row's error here, not an exception that ends the call later."""
    return isinstance(contents, list) and all(
        isinstance(turn, dict)
        and isinstance(turn.get("parts") or [], list)
        and all(isinstance(part, dict) for part in turn.get("parts") or ())
        for turn in contents
    )


def send(
    requests: IntoExpr,
    *,
    spec: RequestSpec | None = None,
    model: str | None = None,
    client: Client | None = None,
    cache: str | CacheMode | None = None,
    sample: int = 0,
    progress: bool | Progress | None = None,
    image_dir: str | None = None,
    raw: bool = False,
    response_schema: Any = None,
) -> pl.Expr:
    """Send a column of JSON request bodies (as made by `request`); returns the reply struct.

    The bodies already hold the system instruction, config and safety; what else to ask is the
    ``model``, the ``sample`` and the ``response_schema`` (which parses each reply into a typed
    ``parsed`` field, as in `generate`; the requests should ask for it:
    ``gf.request(..., response_schema=...)``), or a ``spec`` (the `gemframe.RequestSpec` the
    requests were made with: its model, sample and schema are used)."""
    given: dict[str, Any] = {} if sample == 0 else {"sample": sample}
    if model is not None:
        given["model"] = model
    if response_schema is not None:
        given["response_schema"] = response_schema
    spec = request_spec(spec, given, "send")
    _check_run(cache, "live")
    schema = spec.schema
    dtype = reply_dtype(image_files=image_dir is not None, raw=raw, parsed=schema.dtype if schema else None)

    def run(column: pl.Series) -> pl.Series:
        if column.dtype not in (pl.String, pl.Null):
            raise InputError(f"request column {column.name!r} must hold JSON strings, not {column.dtype}")
        sender = client or default_client()
        total = len(column) - column.null_count()
        with _job_progress(run, sender, spec.model, progress, total, column.name) as bar:
            return sender.send(
                _parsed(column.to_list()),
                total=total,
                spec=spec,
                cache=cache,
                progress=bar,
                image_dir=image_dir,
                raw=raw,
            )

    return _to_expr(requests).map_batches(run, return_dtype=dtype, is_elementwise=True).alias("reply")


class ColumnNameWarning(UserWarning):
    """Reply fields were renamed because input columns have their names."""


def reply_columns(
    fields: Sequence[str], columns: Collection[str], prefix: str | None, reply: str = "reply"
) -> dict[str, str]:
    """The new names of the reply fields that must not keep theirs beside ``columns`` (the input
    columns) when the reply is unnested: polars refuses two columns of one name
    (``DuplicateError``). With ``prefix`` given, every field gets it; without, only the fields
    that collide get ``reply + "_"``, with a `ColumnNameWarning` naming them. An `InputError`
    if the names still collide."""
    if prefix is not None:
        renamed = {f: f"{prefix}{f}" for f in fields if prefix}
    else:
        renamed = {f: f"{reply}_{f}" for f in fields if f in columns}
    names = [renamed.get(f, f) for f in fields]
    clash = sorted(set(names) & set(columns))
    if clash:
        how = f"prefix {prefix!r}" if prefix is not None else f"the prefix {reply + '_'!r}"
        raise InputError(
            f"columns {clash} are both input columns and reply fields (with {how}): pass another "
            "prefix= (gemframe run --prefix) or rename the input columns"
        )
    if renamed and prefix is None:
        warnings.warn(
            f"input columns {sorted(renamed)} have the names of reply fields, so those reply fields "
            f"are the columns {[renamed[f] for f in sorted(renamed)]}; choose their names with "
            "prefix= (gemframe run --prefix)",
            ColumnNameWarning,
            stacklevel=3,
        )
    return renamed
