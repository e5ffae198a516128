"""The ``.gemini`` namespaces: ``pl.col("prompt").gemini.generate(...)`` and
``df.gemini.generate("prompt", ...)`` for frames, thin over `gemframe._polars.expr`.

The column methods take exactly the keywords of the functions they call (typed from those
functions' own signatures: declared once, in `gemframe._polars.expr`); the frame method adds
its own (``name``, ``unnest``, ``prefix``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, cast

import polars as pl

from .._core.cache import CacheMode
from .._core.client import Client
from .._core.progress import Progress
from .._core.spec import Ask, RequestSpec, Unpack, asks
from . import expr as _expr

P = ParamSpec("P")
R = TypeVar("R")


def _on_column(function: Callable[Concatenate[pl.Expr, P], R]) -> Callable[Concatenate[Any, P], R]:
    """A namespace method calling ``function`` with the namespace's column as its first
    argument. Checkers see ``function``'s own keywords (ParamSpec), and so does ``help()``."""

    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return function(self._expr, *args, **kwargs)

    params = list(inspect.signature(function).parameters.values())
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = inspect.signature(function).replace(parameters=[self_param, *params[1:]])  # type: ignore[attr-defined]
    method.__name__ = method.__qualname__ = function.__name__
    method.__doc__ = f"`gemframe.{function.__name__}` of this column.\n\n{function.__doc__}"
    return method


@pl.api.register_expr_namespace("gemini")
class GeminiExpr:
    """``pl.col("prompt").gemini.generate(images=...)`` is ``gf.generate(pl.col("prompt"), images=...)``."""

    def __init__(self, expr: pl.Expr) -> None:
        self._expr = expr

    generate = _on_column(_expr.generate)
    """Ask Gemini once per row (see `gemframe.generate`)."""
    request = _on_column(_expr.request)
    """The request JSON per row, unsent (see `gemframe.request`)."""
    send = _on_column(_expr.send)
    """Send this column of request JSON (see `gemframe.send`)."""


Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


class _GeminiFrame(Generic[Frame]):
    def __init__(self, frame: Frame) -> None:
        self._frame: Frame = frame

    @asks
    # The keywords repeat gf.generate's on purpose: a face a type checker and help() can read
    # (what to ask is one `Ask`/`RequestSpec`; only how to run is spelled out).
    def generate(
        self,
        prompt: _expr.IntoExpr = "prompt",
        *,
        name: str = "reply",
        unnest: bool = False,
        prefix: str | None = None,
        images: _expr.IntoExpr | bytes | os.PathLike[str] | None = None,
        history: _expr.IntoExpr | None = None,
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
    ) -> Frame:
        """The frame with a reply column ``name`` added (see `gemframe.generate` for the other
        arguments), or with its fields as columns (``unnest=True``).

        Unnested, a reply field whose name is already an input column (``text``, ``images``,
        ``error``, ...) becomes ``{name}_{field}`` (``reply_text``), with a warning naming the
        renamed columns; ``prefix="r_"`` prefixes every reply field instead (no warning).
        """
        reply = _expr.generate(
            prompt,
            images=images,
            history=history,
            spec=spec,
            client=client,
            cache=cache,
            progress=progress,
            image_dir=image_dir,
            raw=raw,
            mode=mode,
            batch_state=batch_state,
            poll_interval=poll_interval,
            wait=wait,
            cache_context=cache_context,
            **ask,
        ).alias(name)
        if not unnest:
            return self._frame.with_columns(reply)
        # The names are settled from the schemas (planning sends nothing), before an eager
        # frame's rows are sent: a clash that cannot be resolved is refused first.
        fields = list(cast(pl.Struct, self._frame.lazy().with_columns(reply).collect_schema()[name]).to_schema())
        inputs = [c for c in self._frame.collect_schema() if c != name]  # `name` is replaced
        renamed = _expr.reply_columns(fields, inputs, prefix, name)
        if renamed:
            reply = reply.struct.rename_fields([renamed.get(f, f) for f in fields])
        return self._frame.with_columns(reply).unnest(name)


@pl.api.register_dataframe_namespace("gemini")
class GeminiFrame(_GeminiFrame[pl.DataFrame]):
    """``df.gemini.generate("prompt", images="image_path")``."""


@pl.api.register_lazyframe_namespace("gemini")
class GeminiLazyFrame(_GeminiFrame[pl.LazyFrame]):
    """``lf.gemini.generate("prompt")``, lazily."""
