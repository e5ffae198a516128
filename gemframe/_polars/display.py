"""Looking at generated images: `show` (an HTML grid of prompts and their images, for
notebooks) and `save_images` (a reply column's images as files named by content hash)."""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Mapping
from typing import Any

import polars as pl

from .._core.payload import read_image
from .._core.response import save_image
from .._errors import InputError, clip

__all__ = ["save_images", "show"]

_TEXT_CHARS = 280
_PROMPT_CHARS = 200


class HtmlGrid:
    """Rendered HTML, shown by Jupyter (``_repr_html_``); ``data`` holds the markup. Used only
    when IPython is not installed (otherwise `show` returns ``IPython.display.HTML``)."""

    def __init__(self, data: str) -> None:
        self.data = data

    def _repr_html_(self) -> str:
        return self.data

    def __str__(self) -> str:
        return self.data


def _images_of(value: Any) -> list[Any]:
    """The images in one cell: a reply struct, a list of images, one image, or None."""
    if value is None:
        return []
    if isinstance(value, Mapping) and "images" in value:
        return [i for i in value.get("images") or [] if i is not None]
    if isinstance(value, (list, tuple)):
        return [i for i in value if i is not None]
    return [value]


def _path_of(image: Any) -> str | None:
    """The file path of an image value (a path, or a reply image saved to a file), else None."""
    if isinstance(image, Mapping):
        return image.get("path") if image.get("data") is None else None
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else None


def _picture(image: Any) -> tuple[bytes, str]:
    """An image value's bytes and MIME type, read by `gemframe._core.payload.read_image` (regular
    files only, size-capped): only bytes that sniff as an image are embedded or saved."""
    data, mime = read_image(image)
    if not mime.startswith("image/"):
        raise InputError(f"{_path_of(image) or 'the value'} is {mime}, not an image")
    return data, mime


# What a browser would read as another host or a scheme, once it has dropped what it drops: tabs
# and newlines anywhere, and leading spaces and control characters. A scheme (``https:evil/x``
# is ``https://evil/x`` on an http page) of two letters or more (``C:\x`` is a drive), or two
# slashes either way (``/\host`` is ``//host``).
_BROWSER_DROPS = re.compile(r"[\t\n\r]")
_REMOTE = re.compile(r"[\x00-\x20]*(?:[A-Za-z][A-Za-z0-9+.-]+:|[\\/]{2})")


def _linkable(path: str) -> bool:
    """Whether a path may go into the page as an ``<img src>`` for the viewer's browser to load
    (``embed=False``, or a file not here yet): a local path only. A URL, or anything a browser
    would read as one (`_REMOTE`), would be fetched by the browser unchecked, from data that may
    be hostile, and from wherever the browser runs: a loopback or private address of the
    viewer's own network included."""
    return not _REMOTE.match(_BROWSER_DROPS.sub("", path))


def _img_tag(image: Any, embed: bool, width: int) -> str:
    path = _path_of(image)
    title = f' title="{html.escape(path)}"' if path is not None else ""
    style = f"max-width:{width}px;max-height:{width}px;display:block;margin:4px 0;border-radius:4px"
    if path is not None and not embed:
        if not _linkable(path):  # a URL is never handed to the browser: named, not fetched
            return f'<div style="color:#555">image URL (not fetched, embed=False): {html.escape(path)}</div>'
        return f'<img src="{html.escape(path)}"{title} style="{style}"/>'
    try:  # a URL is fetched as save_images fetches it: public addresses only, capped, sniffed
        data, mime = _picture(image)
    except InputError as exc:  # say why instead of embedding what is not an image
        if path is not None and _linkable(path) and not os.path.exists(path):  # not here (yet): link it
            return f'<img src="{html.escape(path)}"{title} style="{style}"/>'
        return f'<div style="color:#b00020">{html.escape(clip(str(exc), _TEXT_CHARS))}</div>'
    src = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<img src="{src}"{title} style="{style}"/>'


def _cells(data: Any, prompt: str | None, reply: str, n: int) -> list[tuple[str | None, Any]]:
    """(prompt, reply-ish value) for the first n rows of a frame or series."""
    if isinstance(data, pl.LazyFrame):
        data = data.head(n).collect()
    if isinstance(data, pl.Series):
        return [(None, v) for v in data.head(n).to_list()]
    if not isinstance(data, pl.DataFrame):
        raise InputError(f"show() takes a polars DataFrame, LazyFrame or Series, not {type(data).__name__}")
    data = data.head(n)
    prompts = data[prompt].cast(pl.String).to_list() if prompt and prompt in data.columns else [None] * data.height
    if reply in data.columns:
        values = data[reply].to_list()
    else:  # an unnested reply: its fields are the frame's columns
        fields = [c for c in ("text", "images", "error") if c in data.columns]
        if not fields:
            raise InputError(
                f"show(): no column {reply!r} (nor unnested reply fields text/images) in the frame; "
                f"pass reply='<your reply column>'"
            )
        values = data.select(fields).to_dicts()
    return list(zip(prompts, values))


def show(
    data: pl.DataFrame | pl.LazyFrame | pl.Series,
    prompt: str | None = "prompt",
    reply: str = "reply",
    n: int = 8,
    *,
    embed: bool = True,
    width: int = 192,
) -> Any:
    """An HTML grid of the first ``n`` rows: each prompt with its generated images, the reply
    text and any error, for a notebook.

    ``data`` is a frame with a ``prompt`` column and a ``reply`` column (or unnested reply
    fields), or a Series of replies, of image lists, or of images. Image bytes are embedded as
    data URIs; image files (``image_dir=``) are read and embedded too, so the grid survives in a
    saved notebook — ``embed=False`` links them by path instead. Image URLs are fetched as
    `save_images` fetches them (public addresses only, at most the API's inline limit, only bytes
    that sniff as an image) and embedded, or the grid says why not; with ``embed=False`` a URL is
    shown as text. A URL never becomes an ``<img src>``: the viewer's browser would fetch it
    unchecked, a loopback or private address of the viewer's network included. Returns
    ``IPython.display.HTML`` (or an object with ``_repr_html_`` without IPython).
    """
    cards = []
    for prompt_text, value in _cells(data, prompt, reply, n):
        body = []
        if prompt_text is not None:
            body.append(f'<div style="font-weight:600">{html.escape(clip(prompt_text, _PROMPT_CHARS))}</div>')
        body.extend(_img_tag(image, embed, width) for image in _images_of(value))
        if isinstance(value, Mapping):
            if value.get("text"):
                body.append(f'<div style="color:#555">{html.escape(clip(value["text"], _TEXT_CHARS))}</div>')
            error = value.get("error")
            if error:
                message = f"{error.get('status')}: {error.get('message')}"
                body.append(f'<div style="color:#b00020">{html.escape(clip(message, _TEXT_CHARS))}</div>')
        elif value is None:
            body.append('<div style="color:#999">(no reply)</div>')
        cards.append(
            '<div style="border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px;'
            f'overflow-wrap:anywhere">{"".join(body)}</div>'
        )
    markup = (
        '<div class="gemframe-grid" style="display:grid;gap:8px;'
        f'grid-template-columns:repeat(auto-fill,minmax({width + 20}px,1fr))">{"".join(cards)}</div>'
    )
    try:
        from IPython.display import HTML
    except ImportError:
        return HtmlGrid(markup)
    return HTML(markup)


def _save_cell(value: Any, directory: str, row: int) -> list[str] | None:
    if value is None:
        return None
    paths = []
    for image in _images_of(value):
        if isinstance(image, Mapping) and image.get("data") is None and image.get("path") is None:
            continue
        try:
            data, mime = _picture(image)
        except InputError as exc:
            raise InputError(f"save_images: row {row}: {exc}") from None
        paths.append(save_image(data, mime, directory))
    return paths


def save_images(images: pl.Series | pl.Expr | str, directory: str | os.PathLike[str]) -> pl.Series | pl.Expr:
    """Write every image of a reply column (or a column of image lists / images) to
    ``directory`` as files named by their content hash; returns their paths as a
    ``list[str]`` column named ``image_paths`` (null for a null reply). Given a Series, returns a Series; given a
    column name or expression, returns an expression: ``df.with_columns(paths=gf.save_images("reply", "out"))``.
    Writing is idempotent: the same image is one file however often it occurs."""
    directory = os.fspath(directory)
    dtype = pl.List(pl.String)

    def run(series: pl.Series) -> pl.Series:
        return pl.Series(
            "paths", [_save_cell(v, directory, row) for row, v in enumerate(series.to_list())], dtype=dtype
        )

    if isinstance(images, pl.Series):
        return run(images).alias("image_paths")
    expr = pl.col(images) if isinstance(images, str) else images
    return expr.map_batches(run, return_dtype=dtype, is_elementwise=True).alias("image_paths")
