"""The ``.gemini`` namespaces: ``pl.col("prompt").gemini.generate(...)`` and
``df.gemini.generate("prompt", ...)`` for frames, thin over `gemframe._polars.expr`."""

from __future__ import annotations

from typing import Any

import polars as pl

from . import expr as _expr


@pl.api.register_expr_namespace("gemini")
class GeminiExpr:
    """``pl.col("prompt").gemini.generate(images=...)`` is ``gf.generate(pl.col("prompt"), images=...)``."""

    def __init__(self, expr: pl.Expr) -> None:
        self._expr = expr

    def generate(self, **options: Any) -> pl.Expr:
        """Ask Gemini once per row (see `gemframe.generate`)."""
        return _expr.generate(self._expr, **options)

    def request(self, **options: Any) -> pl.Expr:
        """The request JSON per row, unsent (see `gemframe.request`)."""
        return _expr.request(self._expr, **options)

    def send(self, **options: Any) -> pl.Expr:
        """Send this column of request JSON (see `gemframe.send`)."""
        return _expr.send(self._expr, **options)


class _GeminiFrame:
    def __init__(self, frame: Any) -> None:
        self._frame = frame

    def generate(
        self, prompt: _expr.IntoExpr = "prompt", *, name: str = "reply", unnest: bool = False, **options: Any
    ) -> Any:
        """The frame with a reply column added (or its fields, with ``unnest=True``)."""
        out = self._frame.with_columns(_expr.generate(prompt, **options).alias(name))
        return out.unnest(name) if unnest else out


@pl.api.register_dataframe_namespace("gemini")
class GeminiFrame(_GeminiFrame):
    """``df.gemini.generate("prompt", images="image_path")``."""


@pl.api.register_lazyframe_namespace("gemini")
class GeminiLazyFrame(_GeminiFrame):
    """``lf.gemini.generate("prompt")``, lazily."""
