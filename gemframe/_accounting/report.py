"""The run report: what to look at after a batch job, in a terminal and as one HTML file.

``gemframe report OUT.parquet [--html report.html]`` / ``gf.report(path_or_frame, html=...)``:
rows, errors by status, finish reasons, tokens, latency percentiles, cache hits, estimated cost
(split into input, cached input, output, thinking and images) and the manifest's basics; the
HTML file adds small inline-SVG charts (finish reasons, errors by status, latency and token
histograms, drawn here with no plotting dependency), a sample of replies and thumbnails of
generated images. Everything is embedded: the file can be mailed.

Only the columns the summary needs are read from a large output; images only for the rows shown.
"""

from __future__ import annotations

import base64
import html as _html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from .._core.http import redact_url
from .._core.payload import read_image
from .._errors import InputError, clip
from .._files import atomic_write
from .manifest import TALLY_FIELDS, Tally, read_manifest, reply_struct
from .pricing import PARTS, Prices

# The reply fields a report reads: what the manifest tallies, and the total for the token figures.
_STATS_COLUMNS = (*TALLY_FIELDS, "total_tokens")
_THUMB = 160
_THUMB_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WEBP"}
_PALETTE = {"ok": "#3b7dd8", "bad": "#d0473c", "muted": "#8a94a6", "hist": "#5a9e6f"}


def _percentiles(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 1)

    return {
        "count": len(ordered),
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": round(ordered[-1], 1),
        "mean": round(sum(ordered) / len(ordered), 1),
    }


class Report:
    """A run report: ``data`` (JSON-able counts), ``text`` (terminal), ``html`` (a whole page).
    Shown as HTML in a notebook, as text by ``print``."""

    def __init__(self, data: dict[str, Any], text: str, fragment: str) -> None:
        self.data, self.text, self.fragment = data, text, fragment
        self.html = _page(fragment, data.get("source"))

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return self.fragment

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the HTML page; returns its path."""
        path = os.fspath(path)
        with atomic_write(path, "w", encoding="utf-8") as f:  # whole, never through a planted symlink
            f.write(self.html)
        return path


def _load(source: Any, reply: str) -> tuple[pl.LazyFrame, str | None]:
    if isinstance(source, (str, os.PathLike)):
        return pl.scan_parquet(os.fspath(source)), os.fspath(source)
    if isinstance(source, pl.LazyFrame):
        source = source.collect()
    if not isinstance(source, pl.DataFrame):
        raise TypeError(f"report() takes a parquet path or a DataFrame, not {type(source).__name__}")
    reply_type = source.schema.get(reply)
    if isinstance(reply_type, pl.Struct):
        clash = [c for c in reply_type.to_schema() if c in source.columns and c != reply]
        source = source.drop(clash).unnest(reply)
    return source.lazy(), None


def report(
    source: str | os.PathLike[str] | pl.DataFrame,
    *,
    html: str | os.PathLike[str] | None = None,
    manifest: Mapping[str, Any] | None = None,
    reply: str = "reply",
    prompt: str | None = None,
    samples: int = 8,
    thumbnails: int = 12,
    model: str | None = None,
    prices: Prices | None = None,
) -> Report:
    """The report of a gemframe output: a parquet path written by ``gemframe run`` /
    `gemframe.run`, or a frame with a ``reply`` column (or its fields unnested).

    ``html`` also writes the HTML page there. ``manifest`` defaults to the one stored in the
    file; ``model`` (else the manifest's) prices the tokens. ``samples`` replies and up to
    ``thumbnails`` generated images are shown.
    """
    lazy, path = _load(source, reply)
    if manifest is None and path is not None:
        manifest = read_manifest(path)
    manifest = dict(manifest or {})
    if isinstance(manifest.get("base_url"), str):  # a manifest from before base URLs were redacted
        manifest["base_url"] = redact_url(manifest["base_url"])
    renamed = manifest.get("reply_columns") or {}
    if renamed:  # reply fields written under other names (input columns had theirs): read those
        lazy = lazy.drop(list(renamed), strict=False).rename({new: old for old, new in renamed.items()}, strict=False)
    schema = lazy.collect_schema()
    present = [c for c in _STATS_COLUMNS if c in schema]
    if "cached" not in present or "error" not in present:
        raise InputError(
            f"{path or 'frame'} has no reply fields (cached, error, ...), only {list(schema)}: report "
            "reads what gemframe run / gf.run / gf.generate wrote"
        )
    stats = lazy.select(present).collect()
    model = model or manifest.get("model")
    tally = Tally()
    tally.add(reply_struct(stats))
    batch = manifest.get("mode") == "batch"
    counts = tally.as_dict(model, prices, batch) if model else tally.as_dict()
    if batch and model == manifest.get("model") and prices is None and isinstance(manifest.get("cost"), Mapping):
        # Batch Mode writes every row from the cache: which answers this run's jobs brought
        # only the run knew, and its manifest says so (the rows alone would say: none)
        for key in ("cache_hits", "cache_misses", "requests_sent", "tokens"):
            counts[key] = manifest.get(key, counts[key])
        paid = {k: manifest["cost"].get(k) for k in ("this_run", "this_run_split")}  # older manifests: no split
        counts["cost"] = {**counts["cost"], **paid}
    elif isinstance(counts.get("cost"), Mapping) and counts["cost"].get("this_run") is not None:
        counts["cost"] = _with_context_caches(counts["cost"], manifest.get("context_caches"))
    answered_rows = stats.filter(pl.col("cached").is_not_null())
    fresh = (
        answered_rows.filter(~pl.col("cached") & (pl.col("attempts").fill_null(0) > 0))
        if "attempts" in present
        else answered_rows.clear()
    )
    latency = (
        fresh.filter(pl.col("latency_ms").is_not_null())["latency_ms"].to_list() if "latency_ms" in present else []
    )
    ok = answered_rows.filter(pl.col("error").is_null())
    prompt = prompt or manifest.get("prompt_column") or ("prompt" if "prompt" in schema else None)
    if prompt is not None and prompt not in schema:
        prompt = None
    errors = sum(counts["errors"].values())
    data = {
        "source": path,
        "rows": counts["rows"],
        "answered": ok.height,
        "rows_without_prompt": counts["rows_without_prompt"],
        "errors": counts["errors"],
        "error_rows": errors,
        "finish_reasons": counts["finish_reasons"],
        "cache_hits": counts["cache_hits"],
        "cache_misses": counts["cache_misses"],
        "requests_sent": counts["requests_sent"],
        "tokens": counts["tokens"],
        "images_generated": counts["images_generated"],
        "latency_ms": _percentiles(latency),
        "cost": counts.get("cost"),
        "model": model,
        "manifest": manifest or None,
    }
    histograms = {
        "input tokens per answer": [v for v in ok["prompt_tokens"].to_list() if v is not None]
        if "prompt_tokens" in present
        else [],
        "output tokens per answer": [v for v in ok["candidates_tokens"].to_list() if v is not None]
        if "candidates_tokens" in present
        else [],
    }
    replies = _sample_replies(lazy, schema, prompt, samples)
    images = _thumbnails(lazy, schema, prompt, thumbnails, os.path.dirname(os.path.abspath(path)) if path else None)
    data["replies_shown"] = replies.height
    data["thumbnails"] = len(images)
    result = Report(data, _text(data, replies, prompt), _fragment(data, replies, prompt, latency, histograms, images))
    if html is not None:
        result.save(html)
    return result


def _sample_replies(lazy: pl.LazyFrame, schema: Mapping[str, Any], prompt: str | None, n: int) -> pl.DataFrame:
    columns = [c for c in (prompt, "sample", "text", "finish_reason", "error") if c and c in schema]
    if n <= 0 or "text" not in schema:
        return pl.DataFrame()
    answered = lazy.filter(pl.col("cached").is_not_null()).with_row_index("_row")
    if "error" not in schema:
        return answered.select(columns).head(n).collect()
    # Failed rows are what a reader looks for: up to half the sample (more when too few rows
    # succeeded), the rest successes; shown in row order.
    failed = answered.filter(pl.col("error").is_not_null()).select("_row", *columns).head(n).collect()
    ok = answered.filter(pl.col("error").is_null()).select("_row", *columns).head(n).collect()
    take_failed = min(failed.height, max(n // 2, n - ok.height))
    shown = pl.concat([ok.head(n - take_failed), failed.head(take_failed)]).sort("_row").drop("_row")
    if isinstance(shown.schema["error"], pl.Struct):  # "STATUS: message", one line
        error = pl.col("error").struct
        shown = shown.with_columns(
            pl.when(pl.col("error").is_not_null())
            .then(pl.concat_str(error.field("status"), pl.lit(": "), error.field("message").fill_null("")))
            .alias("error")
        )
    return shown


def _thumbnails(
    lazy: pl.LazyFrame, schema: Mapping[str, Any], prompt: str | None, n: int, base: str | None
) -> list[dict[str, str]]:
    images_type = schema.get("images")
    if n <= 0 or not isinstance(images_type, pl.List):
        return []
    columns = [c for c in (prompt, "images") if c]
    rows = lazy.filter(pl.col("images").list.len() > 0).select(columns).head(n).collect().to_dicts()
    out: list[dict[str, str]] = []
    for row in rows:
        for image in row["images"] or ():
            if len(out) >= n:
                return out
            data = _image_data(image, base)
            thumb = _thumbnail(data) if data else None
            if thumb:
                out.append({"src": thumb, "caption": str(row.get(prompt) or "") if prompt else ""})
    return out


def _image_data(image: Mapping[str, Any], base: str | None) -> bytes | None:
    """A reply image's bytes (from the file it was saved to: as given, or relative to the
    output's directory), read by `gemframe._core.payload.read_image`: regular files only, capped, and
    only what sniffs as an image; None for anything else (the report goes on without it)."""
    source: Mapping[str, Any] | str | None = image  # the struct (its inline data), or its file's path
    if image.get("data") is None and image.get("path"):
        path = image["path"]
        candidates = [path] + ([os.path.join(base, path)] if base and not os.path.isabs(path) else [])
        source = next((p for p in candidates if os.path.exists(p)), None)
        if source is None:
            return None
    try:
        data, mime = read_image(source)
    except InputError:
        return None
    return data if mime in _THUMB_FORMATS else None


def _thumbnail(data: bytes) -> str | None:
    from PIL import Image

    try:  # only the formats sniffed above: Pillow would also hand EPS and others to outside tools
        with Image.open(io.BytesIO(data), formats=list(_THUMB_FORMATS.values())) as image:
            image.thumbnail((_THUMB, _THUMB))
            buffer = io.BytesIO()
            image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB").save(buffer, "PNG", optimize=True)
    except Exception:  # not an image Pillow reads: skip it, the report is still useful
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _usd(value: float | None) -> str:
    if value is None:
        return "?"
    return f"${value:,.4f}" if value < 100 else f"${value:,.2f}"


def _headline(data: Mapping[str, Any]) -> list[str]:
    m = data["manifest"] or {}
    lines = []
    if m:
        bits = [f"gemframe {m.get('gemframe', '?')}", str(m.get("provider", "?")), str(m.get("model", "?"))]
        if m.get("mode") and m.get("mode") != "live":
            bits.append(f"{m['mode']} mode")
        if m.get("started"):
            bits.append(f"started {m['started']}")
        if m.get("wall_seconds") is not None:
            bits.append(f"{m['wall_seconds']:g} s")
        lines.append(" · ".join(bits))
        inp = m.get("input") or {}
        second = []
        if inp:
            second.append(f"input {os.path.basename(inp.get('path', '?'))} (sha256 {str(inp.get('sha256', ''))[:12]})")
        second.append(f"cache {m.get('cache_mode', '?')}")
        if (m.get("samples") or 1) > 1:
            second.append(f"{m['samples']} samples per row")
        if m.get("system"):
            second.append(f"system {json.dumps(m['system'][:40])}")
        if m.get("config"):
            second.append(f"config {json.dumps(m['config'], sort_keys=True)[:80]}")
        lines.append(" · ".join(second))
    elif data.get("model"):
        lines.append(f"model {data['model']} (no manifest)")
    return lines


def _with_context_caches(cost: Mapping[str, Any], caches: Any) -> dict[str, Any]:
    """A cost recomputed from the rows, plus the context caches the manifest recorded (their
    creation and storage: no row carries them), as the manifest counts them."""
    if not isinstance(caches, list) or not caches:
        return dict(cost)
    usd = round(sum(float(c.get("creation_usd", 0)) + float(c.get("storage_usd", 0)) for c in caches), 9)
    split = {**(cost.get("this_run_split") or {}), "context_cache": usd}
    return {**cost, "this_run": round(cost["this_run"] + usd, 9), "this_run_split": split}


def _split(split: Mapping[str, float]) -> str:
    """A cost's parts, one line: "input $0.0123 · cached input $0.0000 · ..."."""
    return " · ".join(f"{k.replace('_', ' ')} {_usd(split.get(k, 0.0))}" for k in PARTS)


def _bar_lines(counts: Mapping[str, int], width: int = 30) -> list[str]:
    if not counts:
        return ["    (none)"]
    top = max(counts.values())
    label = max(len(k) for k in counts)
    return [f"    {k:<{label}}  {'█' * max(1, round(width * v / top)):<{width}}  {v:,}" for k, v in counts.items()]


def _text(data: Mapping[str, Any], replies: pl.DataFrame, prompt: str | None) -> str:
    t = data["tokens"]
    lines = [f"gemframe report: {data['source'] or 'frame'}"]
    lines += [f"  {line}" for line in _headline(data)]
    lines.append("")
    lines.append(
        f"  rows          {_n(data['rows'])}: {_n(data['answered'])} answered · "
        f"{_n(data['error_rows'])} errors · {_n(data['rows_without_prompt'])} without prompt"
    )
    lines.append(
        f"  cache         {_n(data['cache_hits'])} hits · {_n(data['cache_misses'])} misses · "
        f"{_n(data['requests_sent'])} requests sent"
    )
    lines.append(
        f"  tokens        input {_n(t['input'])} · output {_n(t['output'])} (thoughts {_n(t['thoughts'])})"
        f" · paid this run: input {_n(t['input_paid'])} · output {_n(t['output_paid'])}"
    )
    if data["images_generated"]:
        lines.append(f"  images        {_n(data['images_generated'])} generated")
    cost = data.get("cost")
    if cost and cost.get("this_run") is not None:
        lines.append(
            f"  cost (est.)   {_usd(cost['this_run'])} this run · {_usd(cost['all_rows'])} for all rows "
            f"({cost['priced_as']} list prices{', Batch Mode rate' if cost.get('batch_discount') else ''})"
        )
        if cost.get("this_run_split"):
            lines.append(f"    this run    {_split(cost['this_run_split'])}")
        if cost.get("this_run_split", {}).get("context_cache"):
            caches = (data.get("manifest") or {}).get("context_caches") or []
            tokens = sum(int(c.get("tokens", 0)) for c in caches)
            lines.append(
                f"    + context caches {_usd(cost['this_run_split']['context_cache'])} "
                f"({len(caches)} cache{'s' if len(caches) != 1 else ''}, {_n(tokens)} tokens: creation and storage)"
            )
    elif cost:
        lines.append(f"  cost (est.)   ? ({cost.get('note')})")
    lat = data["latency_ms"]
    if lat["count"]:
        lines.append(
            f"  latency ms    p50 {lat['p50']:g} · p90 {lat['p90']:g} · p99 {lat['p99']:g} · "
            f"max {lat['max']:g}  ({_n(lat['count'])} requests)"
        )
    else:
        lines.append(
            "  latency ms    no requests sent" + (" (every answer came from the cache)" if data["cache_hits"] else "")
        )
    lines += ["", "  finish reasons", *_bar_lines(data["finish_reasons"])]
    lines += ["", "  errors by status", *_bar_lines(data["errors"])]
    if replies.height:
        lines += ["", "  sample replies"]
        for row in replies.to_dicts():
            ask = clip(row.get(prompt), 40) if prompt else ""
            said = (
                clip(row.get("text"), 70)
                if row.get("text") is not None
                else clip(f"[{row.get('error') or 'no text'}]", 70)
            )
            tag = row.get("finish_reason") or ("error" if row.get("error") else "")
            sample = f" #{row['sample']}" if "sample" in row else ""
            lines.append(f"    {ask + sample:<44} → {said}  ({tag})" if prompt else f"    {said}  ({tag})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# HTML and SVG
# ---------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return _html.escape(str(value), quote=True)


def svg_hbars(counts: Mapping[str, int], title: str, color: str = _PALETTE["ok"]) -> str:
    """Horizontal bars, one per label, with counts: an inline SVG string."""
    if not counts:
        return f'<figure class="chart"><figcaption>{_e(title)}</figcaption><p class="none">none</p></figure>'
    label_w, bar_w, row_h = 150, 240, 22
    top = max(counts.values()) or 1
    height = row_h * len(counts) + 8
    rows = []
    for i, (label, value) in enumerate(counts.items()):
        y = 4 + i * row_h
        w = max(2.0, bar_w * value / top)
        rows.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{_e(clip(label, 22))}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{color}" rx="2">'
            f"<title>{_e(label)}: {value:,}</title></rect>"
            f'<text x="{label_w + w + 5:.1f}" y="{y + 15}">{value:,}</text>'
        )
    width = label_w + bar_w + 60
    return (
        f'<figure class="chart"><figcaption>{_e(title)}</figcaption>'
        f'<svg role="img" aria-label="{_e(title)}" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        + "".join(rows)
        + "</svg></figure>"
    )


def svg_histogram(
    values: Sequence[float], title: str, unit: str = "", bins: int = 20, color: str = _PALETTE["hist"]
) -> str:
    """A histogram of values as inline SVG (equal-width bins from min to max)."""
    if not values:
        return f'<figure class="chart"><figcaption>{_e(title)}</figcaption><p class="none">no data</p></figure>'
    lo, hi = min(values), max(values)
    bins = max(1, min(bins, len(set(values))))
    span = (hi - lo) or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / span * bins))] += 1
    whole = all(float(v).is_integer() for v in values)
    fmt = ",.0f" if whole else ",.1f"
    plot_w, plot_h, left, bottom = 320, 110, 36, 22
    top = max(counts)
    bar = plot_w / bins
    rects = []
    for i, c in enumerate(counts):
        h = plot_h * c / top
        a, b = lo + span * i / bins, lo + span * (i + 1) / bins
        rects.append(
            f'<rect x="{left + i * bar + 1:.1f}" y="{8 + plot_h - h:.1f}" width="{max(1.0, bar - 2):.1f}" '
            f'height="{h:.1f}" fill="{color}"><title>{a:{fmt}}–{b:{fmt}}{unit}: {c:,}</title></rect>'
        )
    width, height = left + plot_w + 10, 8 + plot_h + bottom
    axis = (
        f'<line x1="{left}" y1="{8 + plot_h}" x2="{left + plot_w}" y2="{8 + plot_h}" stroke="#999"/>'
        f'<text x="{left}" y="{height - 5}">{lo:,.0f}{unit}</text>'
        f'<text x="{left + plot_w}" y="{height - 5}" text-anchor="end">{hi:,.0f}{unit}</text>'
        f'<text x="{left - 4}" y="16" text-anchor="end">{top:,}</text>'
        f'<text x="{left - 4}" y="{8 + plot_h}" text-anchor="end">0</text>'
    )
    return (
        f'<figure class="chart"><figcaption>{_e(title)} <span class="muted">({len(values):,} values)</span></figcaption>'
        f'<svg role="img" aria-label="{_e(title)}" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        + "".join(rects)
        + axis
        + "</svg></figure>"
    )


# Every rule is scoped to .gfreport, so the report can sit inside a notebook page.
_CSS = """
.gfreport{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;color:#1d2330;max-width:1100px}
.gfreport h1{font-size:20px;margin:0 0 4px} .gfreport h2{font-size:16px;margin:28px 0 8px}
.gfreport .muted{color:#6b7385;font-weight:normal} .gfreport .none{color:#6b7385;margin:4px 0}
.gfreport .cards{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}
.gfreport .card{border:1px solid #dde2ea;border-radius:8px;padding:8px 14px;min-width:120px}
.gfreport .card b{display:block;font-size:20px} .gfreport .card span{color:#6b7385;font-size:12px}
.gfreport .charts{display:flex;flex-wrap:wrap;gap:18px} .gfreport .chart{margin:0}
.gfreport .chart figcaption{font-weight:600;margin-bottom:4px} .gfreport svg text{font-size:11px;fill:#333}
.gfreport table{border-collapse:collapse;width:100%}
.gfreport td,.gfreport th{border-bottom:1px solid #e6e9ef;padding:5px 8px;text-align:left;vertical-align:top}
.gfreport th{background:#f5f7fa} .gfreport td.reply{white-space:pre-wrap;max-width:560px}
.gfreport .thumbs{display:flex;flex-wrap:wrap;gap:12px} .gfreport .thumbs figure{margin:0;width:170px}
.gfreport .thumbs img{max-width:160px;max-height:160px;border:1px solid #dde2ea;border-radius:4px}
.gfreport .thumbs figcaption{font-size:11px;color:#6b7385}
.gfreport pre{background:#f5f7fa;padding:10px;overflow:auto;font-size:12px}
"""


def _fragment(
    data: Mapping[str, Any],
    replies: pl.DataFrame,
    prompt: str | None,
    latency: Sequence[float],
    histograms: Mapping[str, Sequence[float]],
    images: Sequence[Mapping[str, str]],
) -> str:
    t, lat, cost = data["tokens"], data["latency_ms"], data.get("cost") or {}
    cards = [
        ("rows", _n(data["rows"])),
        ("answered", _n(data["answered"])),
        ("errors", _n(data["error_rows"])),
        ("cache hits", _n(data["cache_hits"])),
        ("requests sent", _n(data["requests_sent"])),
        ("input tokens", _n(t["input"])),
        ("output tokens", _n(t["output"])),
        ("images generated", _n(data["images_generated"])),
        ("latency p50 / p90 ms", f"{lat['p50']:g} / {lat['p90']:g}" if lat["count"] else "–"),
        ("est. cost this run", _usd(cost.get("this_run")) if cost else "?"),
        ("est. cost all rows", _usd(cost.get("all_rows")) if cost else "?"),
    ]
    head = "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in cards)
    charts = [
        svg_hbars(data["finish_reasons"], "finish reasons"),
        svg_hbars(data["errors"], "errors by status", _PALETTE["bad"]),
        svg_histogram(latency, "latency of requests sent", " ms"),
        *(svg_histogram(v, k) for k, v in histograms.items()),
    ]
    table = ""
    if replies.height:
        cols = replies.columns
        rows = "".join(
            "<tr>"
            + "".join(
                f'<td class="{"reply" if c == "text" else ""}">{_e(clip(r[c], 600) if c == "text" else ("" if r[c] is None else r[c]))}</td>'
                for c in cols
            )
            + "</tr>"
            for r in replies.to_dicts()
        )
        table = f"<h2>Sample replies</h2><table><tr>{''.join(f'<th>{_e(c)}</th>' for c in cols)}</tr>{rows}</table>"
    costs = ""
    if cost.get("this_run_split") and cost.get("all_rows_split"):  # the parts, by the pricing rule
        rows = "".join(
            f"<tr><td>{_e(k.replace('_', ' '))}</td><td>{_e(_usd(cost['this_run_split'][k]))}</td>"
            f"<td>{_e(_usd(cost['all_rows_split'][k]))}</td></tr>"
            for k in PARTS
        )
        if cost["this_run_split"].get("context_cache"):  # creation and storage: no row carries them
            rows += (
                f"<tr><td>context cache</td><td>{_e(_usd(cost['this_run_split']['context_cache']))}</td><td></td></tr>"
            )
        costs = (
            "<h2>Cost (est.)</h2><table><tr><th>part</th><th>this run</th><th>all rows</th></tr>"
            f"{rows}<tr><th>total</th><th>{_e(_usd(cost['this_run']))}</th><th>{_e(_usd(cost['all_rows']))}</th></tr></table>"
        )
    thumbs = ""
    if images:
        thumbs = (
            '<h2>Generated images</h2><div class="thumbs">'
            + "".join(
                f'<figure><img src="{i["src"]}" alt="{_e(clip(i["caption"], 80))}"><figcaption>{_e(clip(i["caption"], 80))}</figcaption></figure>'
                for i in images
            )
            + "</div>"
        )
    manifest = ""
    if data.get("manifest"):
        manifest = (
            "<h2>Manifest</h2><details><summary>what produced this output</summary><pre>"
            + _e(json.dumps(data["manifest"], indent=2, ensure_ascii=False))
            + "</pre></details>"
        )
    subtitle = "<br>".join(_e(line) for line in _headline(data))
    return (
        f"<div class='gfreport'><style>{_CSS}</style>"
        f"<h1>gemframe report <span class='muted'>{_e(data['source'] or '')}</span></h1>"
        f"<div class='muted'>{subtitle}</div>"
        f"<div class='cards'>{head}</div>{costs}"
        f"<h2>Charts</h2><div class='charts'>{''.join(charts)}</div>"
        f"{table}{thumbs}{manifest}</div>"
    )


def _page(fragment: str, source: str | None) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>gemframe report: {_e(os.path.basename(source or 'frame'))}</title></head>"
        f"<body style='margin:24px'>{fragment}</body></html>\n"
    )
